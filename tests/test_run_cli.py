"""The command line: config lookup, overrides, validation before compute, stages.

Every test runs `python -m experiments.run` in a subprocess. The stages are a
test module written to a temporary directory and named `module:function`, so
these tests do not depend on the real pipelines.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from experiments import run as run_lib
from xla_flags import xla_flags

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_STAGES = textwrap.dedent('''
    import json, os

    def _log(workdir, name, config):
      with open(os.path.join(workdir, "stages.log"), "a") as f:
        f.write(json.dumps({"stage": name, "steps": config.sft.steps}) + "\\n")

    def first(config, workdir):
      _log(workdir, "first", config)

    def second(config, workdir):
      import jax  # stages may use jax; run.py imported it already
      _log(workdir, "second", config)

    not_a_function = 3

    def distributed(config, workdir):
      """Cross-process sum over a global mesh, and a multi-host checkpoint."""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from rlhf_jax import checkpointing
      mesh = Mesh(np.array(jax.devices()), ("data",))
      sharding = NamedSharding(mesh, P("data"))
      local = np.full((jax.local_device_count(),), jax.process_index() + 1.0,
                      np.float32)
      x = jax.make_array_from_process_local_data(sharding, local)
      total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
      with checkpointing.Checkpointer(os.path.join(workdir, "ckpt")) as ckpt:
        ckpt.save(1, {"x": x}, meta={"n": jax.process_count()})
      with checkpointing.Checkpointer(os.path.join(workdir, "ckpt")) as ckpt:
        restored, meta = ckpt.restore(checkpointing.abstract_like({"x": x}))
      same = bool(jax.jit(lambda a, b: jnp.all(a == b),
                          out_shardings=NamedSharding(mesh, P()))(restored["x"], x))
      out = {"process_count": jax.process_count(),
             "process_index": jax.process_index(),
             "device_count": jax.device_count(), "sum": float(total),
             "restored_equal": same, "meta": meta}
      path = os.path.join(workdir, f"dist_{jax.process_index()}.json")
      with open(path, "w") as f:
        json.dump(out, f)
''')

CUSTOM_CONFIG = textwrap.dedent('''
    from experiments.configs.base import get_base_config

    def get_config(arg=None):
      config = get_base_config()
      config.stages = ("fake_stages_cli:first",)
      config.sft.steps = int(arg) if arg else 7
      return config
''')


@pytest.fixture
def env(tmp_path):
  (tmp_path / "fake_stages_cli.py").write_text(FAKE_STAGES)
  e = dict(os.environ)
  e["PYTHONPATH"] = os.pathsep.join([REPO_DIR, str(tmp_path)])
  e.pop("JAX_COORDINATOR_ADDRESS", None)
  e.pop("TPU_WORKER_HOSTNAMES", None)
  return e


def _run(env, *args, cwd=REPO_DIR, timeout=120):
  return subprocess.run([sys.executable, "-m", "experiments.run", *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _stages(*names):
  return "--config.stages=(" + "".join(f"'fake_stages_cli:{n}'," for n in names) + ")"


def test_runs_stages_in_order_and_writes_config(env, tmp_path):
  workdir = tmp_path / "work"
  p = _run(env, "--config=sft", _stages("first", "second"),
           "--config.sft.steps=31", f"--workdir={workdir}")
  assert p.returncode == 0, p.stderr[-3000:]
  log = [json.loads(l) for l in (workdir / "stages.log").read_text().splitlines()]
  assert log == [{"stage": "first", "steps": 31}, {"stage": "second", "steps": 31}]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["sft"]["steps"] == 31
  assert saved["stages"] == ["fake_stages_cli:first", "fake_stages_cli:second"]


def test_unwritable_workdir_exits_2_and_a_second_run_keeps_the_first_config(env, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  p = _run(env, "--config=sft", _stages("first"), f"--workdir={blocker}/work")
  assert p.returncode == 2 and "--workdir" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
  workdir = tmp_path / "work"
  assert _run(env, "--config=sft", _stages("first"), "--config.sft.steps=31", f"--workdir={workdir}").returncode == 0
  assert _run(env, "--config=sft", _stages("first"), "--config.sft.steps=50", f"--workdir={workdir}").returncode == 0
  assert json.loads((workdir / "config.json").read_text())["sft"]["steps"] == 31  # the first run's, kept
  kept = sorted(json.loads(f.read_text())["sft"]["steps"] for f in (workdir / "invocations").iterdir())
  assert kept == [31, 50]


def test_config_path_with_arg_and_default_workdir(env, tmp_path):
  cfg = tmp_path / "myexp.py"
  cfg.write_text(CUSTOM_CONFIG)
  p = _run(env, f"--config={cfg}:5", cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  log = (tmp_path / "runs" / "myexp" / "stages.log").read_text()
  assert json.loads(log) == {"stage": "first", "steps": 5}


def _assert_usage_error(p, *needles):
  assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
  for needle in needles:
    assert needle in p.stderr, p.stderr[-3000:]


def test_unknown_override_exits_2_naming_field(env, tmp_path):
  p = _run(env, "--config=sft.py", "--config.sft.stepz=3", f"--workdir={tmp_path}/w")
  _assert_usage_error(p, "config.sft.stepz: unknown field")
  p = _run(env, "--config=sft.py", "--config.nosection.x=3")
  _assert_usage_error(p, "config.nosection.x: unknown field")
  assert not (tmp_path / "w").exists()


def test_wrong_type_override_exits_2_naming_field(env):
  p = _run(env, "--config=sft", "--config.sft.batch_size=big")
  _assert_usage_error(p, "config.sft.batch_size")


def test_impossible_combination_exits_2_before_compute(env, tmp_path):
  start = time.time()
  p = _run(env, "--config=sft", _stages("first"), "--config.sampling.top_p=1.5",
           f"--workdir={tmp_path}/w")
  _assert_usage_error(p, "config.sampling.top_p: must be in (0, 1]")
  assert not (tmp_path / "w").exists()
  p = _run(env, "--config=sft", _stages("first"), "--config.sft.optimizer.warmup_steps=10000")
  _assert_usage_error(p, "config.sft.optimizer.warmup_steps")
  assert time.time() - start < 60


def test_device_dependent_check_exits_2(env, tmp_path):
  # conftest gives 8 CPU devices; a (3, 1, 1) mesh cannot be built on them.
  p = _run(env, "--config=sft", _stages("first"), "--config.mesh.shape=(3,1,1)",
           f"--workdir={tmp_path}/w")
  _assert_usage_error(p, "config.mesh.shape", "8 are available")
  assert not (tmp_path / "w").exists()
  p = _run(env, "--config=sft", _stages("first"), "--config.sft.batch_size=12")
  _assert_usage_error(p, "config.sft.batch_size", "data-parallel size 8")


def test_unknown_config_name_exits_2(env):
  p = _run(env, "--config=no_such_config")
  _assert_usage_error(p, "unknown config 'no_such_config'", "available:", "sft")
  p = _run(env)
  _assert_usage_error(p, "--config is required")


def _runnable_configs():
  names = [f[:-3] for f in os.listdir(os.path.join(REPO_DIR, "experiments", "configs"))
           if f.endswith(".py") and not f.startswith("_") and f != "base.py"]
  assert "sft" in names and "pfppo" in names
  return sorted(names)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_configs_exit_0(env, flag):
  p = _run(env, flag)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.startswith("usage: python -m experiments.run --config=NAME")
  listed = p.stdout.split("\navailable configs (", 1)[1].split("\nflags:", 1)[0]
  assert sorted(line.split()[0] for line in listed.splitlines()[1:] if line.strip()) == _runnable_configs()
  assert "--workdir" in p.stdout and "--config=NAME --help" in p.stdout


def test_config_help_lists_fields_with_values_exit_0(env, tmp_path):
  import ml_collections
  from experiments.configs import sft
  p = _run(env, "--config=sft", "--config.sft.steps=31", "--help", f"--workdir={tmp_path}/w")
  assert p.returncode == 0, p.stderr[-3000:]
  shown = dict(line.strip().split(" = ", 1) for line in p.stdout.splitlines() if " = " in line)

  def leaves(node, prefix=""):
    for key in node.keys():
      if isinstance(node[key], ml_collections.ConfigDict):
        yield from leaves(node[key], f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", node[key]

  expected = {name: repr(value) for name, value in leaves(sft.get_config())}
  expected["sft.steps"] = "31"  # overrides are applied
  assert {k.strip(): v for k, v in shown.items()} == expected
  assert not (tmp_path / "w").exists()  # nothing ran
  # A bad override with --help is still a usage error.
  _assert_usage_error(_run(env, "--config=sft", "--config.sft.stepz=3", "--help"),
                      "config.sft.stepz: unknown field")


def test_unknown_stage_exits_2(env, tmp_path):
  p = _run(env, "--config=sft", "--config.stages=('first','no_such_stage')",
           f"--workdir={tmp_path}/w")
  _assert_usage_error(p, "config.stages", "unknown stage")
  p = _run(env, "--config=sft", _stages("not_a_function"))
  _assert_usage_error(p, "config.stages[0]", "no function not_a_function")
  p = _run(env, "--config=sft", _stages("missing"))
  _assert_usage_error(p, "no function missing")
  assert not (tmp_path / "w").exists()


def test_stray_positional_argument_exits_2(env):
  _assert_usage_error(_run(env, "--config=sft", _stages("first"), "oops"),
                      "unexpected arguments: oops")


def test_resolve_config_path():
  assert run_lib.resolve_config_path("sft").endswith("experiments/configs/sft.py")
  assert run_lib.resolve_config_path("sft.py:3").endswith("configs/sft.py:3")
  assert run_lib.config_name("/a/b/sft.py:3") == "sft"
  with pytest.raises(run_lib.UsageError, match="unknown config"):
    run_lib.resolve_config_path("nope.py")


def test_is_multihost_detection():
  assert not run_lib.is_multihost(False, {})
  assert run_lib.is_multihost(True, {})
  assert run_lib.is_multihost(False, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert run_lib.is_multihost(False, {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
  assert not run_lib.is_multihost(False, {"TPU_WORKER_HOSTNAMES": "localhost"})


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_distributed_run(env, tmp_path):
  """The multi-host path: 2 CPU processes × 2 devices, gloo collectives."""
  env = dict(env, XLA_FLAGS=xla_flags(2),
             JAX_PLATFORMS="cpu")
  workdir = tmp_path / "dist"
  addr = f"127.0.0.1:{_free_port()}"
  args = ["--config=sft", _stages("distributed"), "--config.sft.batch_size=32",
          f"--workdir={workdir}", "--multihost", f"--coordinator_address={addr}",
          "--num_processes=2"]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.run", *args, f"--process_id={i}"],
      cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=180))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads((workdir / f"dist_{i}.json").read_text()) for i in range(2)]
  for i, r in enumerate(results):
    assert r["process_count"] == 2 and r["process_index"] == i
    assert r["device_count"] == 4
    assert r["sum"] == 2 * 1.0 + 2 * 2.0  # each process contributes 2 devices
    assert r["restored_equal"] and r["meta"] == {"n": 2}
  assert (workdir / "config.json").exists()
