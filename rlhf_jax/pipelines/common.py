"""Host-side pieces shared by the pipeline stages: model, mesh, data, state, checkpoints."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from rlhf_jax import models, sharding as shd
from rlhf_jax.checkpointing import Checkpointer, CheckpointError, abstract_like
from rlhf_jax.config import optimizer_kwargs
from rlhf_jax.models import ModelConfig
from rlhf_jax.state import TrainState, create_train_state, make_optimizer
from rlhf_jax.tokenizer import ByteTokenizer, Tokenizer

# Fields of the config's `model` section that override the preset's ModelConfig.
_MODEL_OVERRIDES = ("max_seq_len", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim")


def model_config(config) -> ModelConfig:
  over = {k: config.model.get(k) for k in _MODEL_OVERRIDES if config.model.get(k) is not None}
  return models.get_model_config(config.model.preset, dtype=config.model.dtype,
                                 param_dtype=config.model.param_dtype, **over)


def make_mesh(config) -> Mesh:
  return shd.make_mesh(tuple(config.mesh.shape))


def tokenizer(config) -> Tokenizer:
  del config
  return ByteTokenizer()


def data_dir(config, workdir: str) -> str:
  return config.task.data_dir or os.path.join(workdir, "data")


def make_task(config, workdir: str):
  """The config's task (built-in or `package.module:make_task`), its datasets under the data dir."""
  from rlhf_jax.tasks.registry import make_task as _make_task  # pylint: disable=import-outside-toplevel
  return _make_task(config, data_dir(config, workdir))


# --- provenance: a finished stage is reused only with the settings that made it -----------------
# The config sections that decide each stage's result (its own and those of the stages it builds on).
_BASE_SECTIONS = ("seed", "model", "task")
STAGE_SECTIONS = {
    "sft": _BASE_SECTIONS + ("sft",),
    "rm": _BASE_SECTIONS + ("sft", "rm", "sampling"),
    "ppo": _BASE_SECTIONS + ("sft", "rm", "sampling", "algo", "ppo"),
    "autoif": _BASE_SECTIONS + ("autoif",),
    "dpo": _BASE_SECTIONS + ("sft", "autoif", "dpo"),
    "online_dpo": _BASE_SECTIONS + ("sft", "rm", "autoif", "sampling", "online_dpo"),
    "bon": _BASE_SECTIONS + ("sft", "rm", "sampling", "bon"),
    "rs": _BASE_SECTIONS + ("sft", "rm", "sampling", "rs"),
    "bond": _BASE_SECTIONS + ("sft", "rm", "sampling", "bond"),
    "am": _BASE_SECTIONS + ("sft", "rm", "sampling", "am"),
    "ppo_am": _BASE_SECTIONS + ("sft", "rm", "sampling", "am", "algo", "ppo", "sr"),
}


def stage_settings(config, stage: str) -> dict:
  """The flattened settings that decide a stage's result, `{"algo.strategy": "best_random", ...}`."""
  sections = STAGE_SECTIONS.get(stage, STAGE_SECTIONS["ppo"])
  flat: dict[str, Any] = {}

  def walk(prefix, node):
    if hasattr(node, "items"):
      for k, v in node.items():
        walk(f"{prefix}.{k}" if prefix else k, v)
    else:
      flat[prefix] = list(node) if isinstance(node, tuple) else node

  for name in sections:
    if name in config:
      walk(name, config[name])
  # Where results are written and how often they are shown does not change them.
  return {k: v for k, v in flat.items() if not k.startswith("task.data_dir")}


def _commit() -> str:
  import subprocess  # pylint: disable=import-outside-toplevel
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
  except Exception:  # pylint: disable=broad-except
    return "unknown"


class SettingsChanged(ValueError):
  """A stage's saved work was made with other settings than this run's (a usage error: exit 2)."""


def check_provenance(out_dir: str, config, stage: str) -> None:
  """Records the stage's settings, or refuses when its saved work came from different ones.

  A finished or partly trained stage is reused only with the settings that
  produced it; otherwise the run stops here, naming every changed field,
  instead of reporting new settings next to old parameters.
  """
  path = os.path.join(out_dir, "provenance.json")
  settings = stage_settings(config, stage)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f).get("settings", {})
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k, "<absent>") != settings.get(k, "<absent>"))
    if changed:
      shown = "; ".join(f"{k}: {saved.get(k, '<absent>')!r} -> {settings.get(k, '<absent>')!r}" for k in changed[:8])
      more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
      raise SettingsChanged(
          f"stage {stage!r} in {out_dir} was run with other settings: {shown}{more}. Its results are kept as they "
          f"are. Run the new settings in a new --workdir (to reuse finished earlier stages, copy or symlink their "
          f"directories into it), or delete {out_dir} to redo this stage.")
    return
  os.makedirs(out_dir, exist_ok=True)
  write_json(path, {"stage": stage, "settings": settings, "commit": _commit(), "seed": int(config.seed)})


def stage_dir(workdir: str, stage: str) -> str:
  path = os.path.join(workdir, stage)
  os.makedirs(path, exist_ok=True)
  return path


def optimizer(section, *, optimizer_section=None, total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """The optimizer of a stage section (its `optimizer` and `steps`), or of an explicit optimizer section."""
  if optimizer_section is None:
    return make_optimizer(**optimizer_kwargs(section))
  kwargs = dict(optimizer_section.to_dict())
  if kwargs.get("total_steps") is None:
    kwargs["total_steps"] = int(total_steps)
  return make_optimizer(**kwargs)


# --- state --------------------------------------------------------------------------
def state_shardings(abstract_state: TrainState, param_shardings: Any, tx, mesh: Mesh) -> TrainState:
  rep = shd.replicated(mesh)
  return TrainState(step=rep, params=param_shardings,
                    opt_state=shd.opt_state_shardings(tx, abstract_state.opt_state, param_shardings, mesh), rng=rep)


def create_state(init_params_fn: Callable[..., Any], logical_specs: Any, tx, mesh: Mesh, rng: jax.Array,
                 *init_args: Any) -> tuple[TrainState, TrainState]:
  """A TrainState born sharded: eval_shape → specs → jit(init, out_shardings).

  `init_params_fn(rng, *init_args)` builds the parameters: fresh, or from an
  earlier stage's params passed in `init_args` (arguments, not closed-over
  constants, so they are not baked into the program). Returns (state,
  state_shardings).
  """
  param_sh = shd.logical_to_sharding(logical_specs, mesh)

  def init(rng, *args):
    return create_train_state(init_params_fn(rng, *args), tx, rng)

  abstract = jax.eval_shape(init, rng, *init_args)
  sh = state_shardings(abstract, param_sh, tx, mesh)
  return jax.jit(init, out_shardings=sh)(rng, *init_args), sh


def param_shardings(cfg: ModelConfig, mesh: Mesh, *, head: str = "lm"):
  return shd.logical_to_sharding(models.logical_axes(cfg, head=head), mesh)


def save_params(directory: str, params: Any, meta: dict) -> None:
  """Final parameters of a stage (what later stages load), with checksums; replaces what `directory` held.

  Written by orbax into `<directory>.tmp`, then swapped in by renames, so a
  crash leaves the old or the new parameters complete, never a mix; an earlier
  (or corrupt) copy is replaced even when it has the same step. Raises
  `CheckpointError` (params with NaN/Inf, disk full, ...) with nothing replaced.
  """
  import shutil  # pylint: disable=import-outside-toplevel

  def sync_processes(name: str) -> None:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(name)

  step = int(meta.get("step", 0))
  if "://" in directory:  # object stores cannot rename directories: orbax's own atomic commit
    with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
      ckpt.save(step, {"params": params}, meta=meta, force=True)
    return
  directory = os.path.abspath(directory)
  tmp, old = f"{directory}.tmp", f"{directory}.old"
  main = jax.process_index() == 0
  if main:
    shutil.rmtree(tmp, ignore_errors=True)
  sync_processes(f"save_params-clear-{directory}")
  with Checkpointer(tmp, max_to_keep=1, async_save=False) as ckpt:
    ckpt.save(step, {"params": params}, meta=meta, force=True)
  if main:
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(directory):
      os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
  sync_processes(f"save_params-swap-{directory}")


def load_params(directory: str, abstract_params: Any, shardings: Any) -> tuple[Any, dict]:
  """Parameters saved by `save_params`, restored straight into `shardings` and checked against their checksums.

  Raises:
    CheckpointError: nothing saved there, or the saved parameters are
      unreadable or corrupt (the message says which and how to redo them).
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"no saved parameters at {directory}: run the stage that produces them first")
  target = {"params": abstract_like(abstract_params, sharding=shardings)}
  try:
    with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
      restored, meta = ckpt.restore(target)
  except CheckpointError as e:
    raise CheckpointError(f"the saved parameters at {directory} cannot be used; rerun the stage that produces "
                          f"them (it rebuilds them from its training checkpoints). {e}") from None
  return restored["params"], meta


def has_params(directory: str) -> bool:
  """True when `directory` holds final parameters that read back intact (checksums verified).

  Corrupt or unreadable parameters count as absent, with a one-line notice on
  stdout naming the problem, so a stage rebuilds them instead of reporting
  that it reuses them. Reads the whole parameter tree onto the host.
  """
  if not os.path.isdir(directory):
    return False
  try:
    with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
      if ckpt.latest_step() is None:
        return False
      problem = ckpt.verify()
  except CheckpointError as e:
    problem = str(e).splitlines()[0]
  if problem is not None:
    print(f"[params] the saved parameters at {directory} are corrupt and will not be reused: {problem}", flush=True)
    return False
  return True


def _json_safe(obj: Any) -> Any:
  """Non-finite floats become null (valid JSON); numpy scalars become Python numbers."""
  if isinstance(obj, dict):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  if isinstance(obj, (np.generic, np.ndarray)) and np.ndim(obj) == 0:
    obj = obj.item()
  if isinstance(obj, float) and not np.isfinite(obj):
    return None
  return obj


def write_json(path: str, obj: Any) -> None:
  """Atomic, strictly valid JSON write (tmp + rename; NaN/inf written as null)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(_json_safe(obj), f, indent=2, sort_keys=True, default=float, allow_nan=False)
  os.replace(tmp, path)


def to_host(tree: Any) -> Any:
  """One device_get for a tree of metrics, converted to Python floats."""
  return jax.tree.map(lambda x: float(np.asarray(x)), jax.device_get(tree))


def mean_metrics(items: list[dict]) -> dict:
  return {k: float(np.mean([m[k] for m in items])) for k in items[0]} if items else {}


def fold(rng: jax.Array, *ints: int) -> jax.Array:
  for i in ints:
    rng = jax.random.fold_in(rng, i)
  return rng

