r"""Runs the pipeline stages of a config.

  python -m experiments.run --config=sft.py [--config.sft.steps=50 ...] [--workdir=DIR]
  python -m experiments.run --help                   # usage and the available configs
  python -m experiments.run --config=sft.py --help   # the config's fields and their values

`--config` takes a name in experiments/configs/ (`sft`, `sft.py`), a path to a
config file, and optionally `:arg` passed to its `get_config(arg)`. Every field
can be overridden with `--config.<section>.<field>=<value>` (tuples as
`"(2,2,2)"`). The config is validated against the schema
(experiments/configs/base.py) before any compute; an invalid config, an unknown
override, a wrong type or an unknown stage prints the field to stderr and exits
with status 2.

Multi-host (a TPU pod slice, or several processes): pass `--multihost` on every
host (implied by JAX_COORDINATOR_ADDRESS or a multi-worker TPU environment), and
`jax.distributed.initialize()` is called before any device is touched.
On a single machine it is never called. For a local multi-process test, pass
`--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=i`.

The workdir (default `runs/<config name>`) receives config.json and whatever the
stages write (checkpoints, metrics.jsonl, tb/, plots). Stages run in order;
stage `x` is `rlhf_jax.pipelines.x.run_x(config, workdir)`, or
`package.module:function` for a custom stage.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
USAGE_ERROR = 2

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config: a name in experiments/configs/, a path, and optional :arg.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<config name>).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (run on every host).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host; else auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


class UsageError(Exception):
  """A problem with the command line or config: exit 2 before any compute."""


def _fail(message: str) -> None:
  print(f"experiments.run: error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR)


# --- config lookup -----------------------------------------------------------------
def available_configs() -> list[str]:
  """Names of the runnable configs in experiments/configs/ (not `base`, not `_private`)."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and not f.startswith("_") and f != "base.py")


def resolve_config_path(spec: str) -> str:
  """`sft` / `sft.py` / `path/to/x.py`, each with optional `:arg` → a file path (+ :arg)."""
  path, sep, arg = spec.partition(":")
  candidates = [path, os.path.join(CONFIG_DIR, path)]
  if not path.endswith(".py"):
    candidates.append(os.path.join(CONFIG_DIR, path + ".py"))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate + sep + arg
  raise UsageError(f"--config: unknown config {path!r} (not a file, not in "
                   f"{CONFIG_DIR}); available: {', '.join(available_configs())}")


def config_name(spec: str) -> str:
  """`experiments/configs/sft.py:arg` → `sft` (the default workdir name)."""
  path = spec.partition(":")[0]
  return os.path.splitext(os.path.basename(path))[0]


def _rewrite_config_arg(argv: Sequence[str]) -> list[str]:
  """Replaces the --config value by a resolvable path; absl would not search."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      argv[i] = "--config=" + resolve_config_path(arg[len("--config="):])
      return argv
    if arg == "--config" and i + 1 < len(argv):
      argv[i + 1] = resolve_config_path(argv[i + 1])
      return argv
  raise UsageError(f"--config is required, e.g. --config=sft.py (available: "
                   f"{', '.join(available_configs())}; --help shows more)")


# --- help ---------------------------------------------------------------------------
_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")
_OWN_FLAGS = ("config", "workdir", "multihost", "coordinator_address", "num_processes", "process_id")


def _summary(path: str) -> str:
  """First line of a config file's docstring, read without importing it."""
  try:
    with open(path, encoding="utf-8") as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
  except (OSError, SyntaxError, ValueError):
    return ""
  return doc.strip().split("\n", 1)[0]


def usage() -> str:
  """`--help` without a config: how to run, the available configs, the flags."""
  names = available_configs()
  width = max(map(len, names), default=0)
  lines = ["usage: python -m experiments.run --config=NAME[:ARG] [--config.SECTION.FIELD=VALUE ...] "
           "[--workdir=DIR]", "", __doc__.strip(), "",
           f"available configs ({CONFIG_DIR}):"]
  lines += [f"  {n:<{width}}  {_summary(os.path.join(CONFIG_DIR, n + '.py'))}".rstrip() for n in names]
  lines += ["", "flags:"]
  lines += [f"  --{name}: {flags.FLAGS[name].help}" for name in _OWN_FLAGS]
  lines += ["", "A config's fields and their values: python -m experiments.run --config=NAME --help"]
  return "\n".join(lines)


def config_fields(config, prefix: str = "") -> list[tuple[str, object]]:
  """(dotted name, value) of every leaf field of a ConfigDict, in key order."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  out = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      out += config_fields(value, f"{prefix}{key}.")
    else:
      out.append((f"{prefix}{key}", value))
  return out


def describe_config(spec: str, config) -> str:
  """`--config=X --help`: the config's fields (overrides applied) and their values."""
  fields = config_fields(config)
  width = max((len(name) for name, _ in fields), default=0)
  lines = [f"config {config_name(spec)} ({spec.partition(':')[0]}): {len(fields)} fields; set any with "
           "--config.NAME=VALUE", ""]
  lines += [f"  {name:<{width}} = {value!r}" for name, value in fields]
  return "\n".join(lines)


def _print_help(argv: Sequence[str]) -> None:
  """Prints usage (no --config) or the config's fields, then exits 0."""
  argv = [a for a in argv if a not in _HELP_FLAGS]
  if not any(a == "--config" or a.startswith("--config=") for a in argv):
    print(usage(), flush=True)
    sys.exit(0)
  try:
    argv = _rewrite_config_arg(argv)
    flags.FLAGS(argv)
    config = _CONFIG.value
  except UsageError as e:
    _fail(str(e))
  except flags.Error as e:
    _fail(_unknown_override(argv) or str(e))
  except Exception as e:  # pylint: disable=broad-except
    _fail(_unknown_override(argv) or f"{type(e).__name__}: {e}")
  print(describe_config(flags.FLAGS["config"].config_filename, config), flush=True)
  sys.exit(0)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parser for app.run that turns every flag problem into exit 2."""
  if any(a in _HELP_FLAGS for a in argv[1:]):
    _print_help(argv)
  try:
    argv = _rewrite_config_arg(argv)
    rest = flags.FLAGS(argv)
    _CONFIG.value  # loads the file now: config_flags defers its errors to access
  except UsageError as e:
    _fail(str(e))
  except flags.Error as e:
    _fail(_unknown_override(argv) or str(e))
  except Exception as e:  # pylint: disable=broad-except
    # config_flags raises KeyError/AttributeError for unknown override paths and
    # TypeError/IOError for broken config files.
    _fail(_unknown_override(argv) or f"{type(e).__name__}: {e}")
  return rest


def _unknown_override(argv: Sequence[str]) -> str | None:
  """Names the first `--config.a.b=` override whose field does not exist.

  config_flags reports only the last path component, so on a parse failure the
  config file is loaded again here and each override path is walked.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  try:
    spec = next(a[len("--config="):] for a in argv if a.startswith("--config="))
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_run_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None  # the original error says more
  for a in argv:
    if not a.startswith("--config."):
      continue
    field = a[2:].split("=", 1)[0]
    node = config
    for part in field.split(".")[1:]:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        return (f"{field}: unknown field (no {part!r} in "
                f"{field.rsplit('.', 1)[0]}); overrides may only set fields "
                "that exist in the config")
      node = node[part]
  return None


# --- multi-host ------------------------------------------------------------------
def is_multihost(flag: bool, environ=os.environ) -> bool:
  """True on a multi-process run: the flag, JAX_COORDINATOR_ADDRESS, or a TPU pod."""
  workers = environ.get("TPU_WORKER_HOSTNAMES", "")
  return bool(flag or environ.get("JAX_COORDINATOR_ADDRESS")
              or len([w for w in workers.split(",") if w]) > 1)


# --- stages -----------------------------------------------------------------------
def resolve_stages(stages: Sequence[str]) -> list[tuple[str, Callable]]:
  """Imports each stage's function once, before anything runs."""
  from rlhf_jax.config import stage_module  # pylint: disable=import-outside-toplevel
  resolved = []
  for i, stage in enumerate(stages):
    module_name, fn_name = stage_module(stage)
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
      if e.name and module_name.startswith(e.name):
        raise UsageError(f"config.stages[{i}]: unknown stage {stage!r} "
                         f"(no module {module_name})") from e
      raise
    fn = getattr(module, fn_name, None)
    if not callable(fn):
      raise UsageError(f"config.stages[{i}]: stage {stage!r}: {module_name} has "
                       f"no function {fn_name}(config, workdir)")
    resolved.append((stage, fn))
  return resolved


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  # Cheap checks first: no jax import before the config is known to be sane.
  from experiments.configs.base import get_base_config  # pylint: disable=import-outside-toplevel
  from rlhf_jax.config import ConfigError, config_to_json, validate_config  # pylint: disable=import-outside-toplevel

  config = _CONFIG.value
  name = config_name(flags.FLAGS["config"].config_filename)
  schema = get_base_config()
  try:
    validate_config(config, schema)
    stage_fns = resolve_stages(config.stages)
  except (ConfigError, UsageError) as e:
    _fail(f"invalid config: {e}")

  # Orbax logs every checkpoint step at INFO; keep the console for progress bars.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tfds.display_progress_bar(False)  # dataset builds take seconds; our stages show their own bars
  if is_multihost(_MULTIHOST.value):
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  try:
    validate_config(config, schema, device_count=jax.device_count())
  except ConfigError as e:
    _fail(f"invalid config: {e}")

  workdir = os.path.abspath(_WORKDIR.value or os.path.join("runs", name))
  try:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK):
      raise PermissionError(f"no write permission on {workdir}")
    if jax.process_index() == 0:
      # Every invocation keeps its own config (an eval run never overwrites the training run's);
      # config.json is the first run's, and each stage keeps its own provenance.json.
      text = config_to_json(config) + "\n"
      runs_dir = os.path.join(workdir, "invocations")
      os.makedirs(runs_dir, exist_ok=True)
      _write_atomic(os.path.join(runs_dir, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{name}.json"), text)
      if not os.path.exists(os.path.join(workdir, "config.json")):
        _write_atomic(os.path.join(workdir, "config.json"), text)
  except OSError as e:
    _fail(f"--workdir: cannot write to {workdir}: {e.strerror or e}")
  print(f"[run] config {name}, workdir {workdir}, {jax.process_count()} process(es), "
        f"{jax.device_count()} device(s), stages {[s for s, _ in stage_fns]}", flush=True)
  logging.info("config %s, workdir %s, %d processes, %d devices, stages %s",
               name, workdir, jax.process_count(), jax.device_count(),
               [s for s, _ in stage_fns])
  from rlhf_jax.checkpointing import CheckpointError  # pylint: disable=import-outside-toplevel
  from rlhf_jax.pipelines.common import SettingsChanged  # pylint: disable=import-outside-toplevel
  from rlhf_jax.utils.divergence import TrainingDiverged  # pylint: disable=import-outside-toplevel
  for stage, fn in stage_fns:
    start = time.time()
    logging.info("stage %s: start", stage)
    try:
      fn(config, workdir)
    except SettingsChanged as e:  # a usage error: what exists was made with other settings
      _fail(f"stage {stage}: {e}")
    except (CheckpointError, TrainingDiverged) as e:
      print(f"experiments.run: error: stage {stage}: {e}", file=sys.stderr, flush=True)
      sys.exit(1)
    print(f"[run] stage {stage}: done in {time.time() - start:.1f} s", flush=True)
  return 0


def run_cli(argv: Sequence[str] | None = None) -> None:
  """Entry point (also the console script)."""
  app.run(main, argv=list(argv) if argv is not None else None, flags_parser=parse_flags)


if __name__ == "__main__":
  run_cli()
