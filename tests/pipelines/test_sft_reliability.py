"""The SFT stage under preemption, divergence, corrupt final parameters; metrics never repeat a step.

In-process tests send a real SIGTERM to this process at a chosen step (from
the progress callback); the command-line test (slow) sends it from outside to
`python -m experiments.run` and reruns the same command.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs.base import get_base_config
from rlhf_jax import checkpointing, models
from rlhf_jax.config import validate_config
from rlhf_jax.pipelines import common, sft
from rlhf_jax.utils import Progress, read_metrics
from rlhf_jax.utils.divergence import TrainingDiverged
from rlhf_jax.utils.metrics import truncate_metrics
from rlhf_jax.utils.preemption import PREEMPTED_EXIT_CODE, Preempted
from xla_flags import xla_flags

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 12

# The tiny model and task used by every test here, as command-line overrides and as a config.
OVERRIDES = {
    "model.n_layers": 1, "model.dim": 32, "model.mlp_dim": 64, "model.n_heads": 2, "model.n_kv_heads": 1,
    "task.name": "synthetic", "task.max_prompt_len": 32, "task.max_response_len": 16, "task.num_train": 256,
    "task.num_eval": 32, "sft.steps": STEPS, "sft.batch_size": 8, "sft.eval_every": 6, "sft.eval_batches": 1,
    "checkpoint.every_steps": 5, "checkpoint.async_save": False, "logging.every_steps": 3,
    "logging.progress": False, "logging.tensorboard": False,
}


def small_config(data_dir: str):
  c = get_base_config()
  c.stages = ("sft",)
  for key, value in OVERRIDES.items():
    section, field = key.split(".")
    setattr(c[section], field, value)
  c.task.data_dir = data_dir
  validate_config(c, get_base_config(), device_count=jax.device_count())
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
  """An uninterrupted run: (config, workdir)."""
  config = small_config(data_dir)
  workdir = str(tmp_path_factory.mktemp("straight"))
  sft.run_sft(config, workdir)
  return config, workdir


def _final_params(config, workdir):
  cfg = common.model_config(config)
  params, _ = common.load_params(sft.final_params_dir(workdir), models.abstract_params(cfg),
                                 common.param_shardings(cfg, common.make_mesh(config)))
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def _assert_same_params(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.dtype == y.dtype and np.array_equal(x, y)


def _assert_no_repeated_rows(path):
  seen = set()
  for row in read_metrics(path):
    for key in row:
      if key != "step":
        assert (row["step"], key) not in seen, f"{key} logged twice at step {row['step']}"
        seen.add((row["step"], key))


# --- metrics -----------------------------------------------------------------------
def test_truncate_metrics_keeps_rows_up_to_the_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "train/loss": 1.0 / s} for s in (3, 6, 9)] + [{"step": 6, "eval/nll": 2.0}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 12, "train/lo')  # torn last line
  assert truncate_metrics(path, 6) == 2  # step 9 and the torn line
  assert read_metrics(path) == [rows[0], rows[1], rows[3]]
  assert truncate_metrics(path, 6) == 0 and truncate_metrics(tmp_path / "missing.jsonl", 0) == 0


# --- preemption ------------------------------------------------------------------------
def _sigterm_at(step_to_signal):
  class SigtermAt(Progress):
    def update(self, step, **kw):
      super().update(step, **kw)
      if step == step_to_signal:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the loop's next line
  return SigtermAt


def test_sigterm_checkpoints_at_the_step_and_the_rerun_is_bitwise(straight, tmp_path, monkeypatch, capsys):
  config, straight_dir = straight
  workdir = str(tmp_path / "w")
  monkeypatch.setattr(sft, "Progress", _sigterm_at(7))  # between checkpoints (every 5) and log rows (every 3)
  with pytest.raises(Preempted) as e:
    sft.run_sft(config, workdir)
  assert e.value.code == PREEMPTED_EXIT_CODE and e.value.step == 7
  assert "[sft] preempted (termination signal) at step 7" in capsys.readouterr().err
  ckpt_dir = os.path.join(workdir, "sft", "ckpt")
  with checkpointing.Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.all_steps() == [5, 7] and ckpt.restore_meta()["data_position"] == 7
  assert not os.path.exists(sft.final_params_dir(workdir))
  assert max(r["step"] for r in read_metrics(os.path.join(workdir, "sft", "metrics.jsonl"))) == 7
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the guard

  monkeypatch.undo()
  sft.run_sft(config, workdir)
  _assert_same_params(_final_params(config, workdir), _final_params(config, straight_dir))
  metrics = os.path.join(workdir, "sft", "metrics.jsonl")
  _assert_no_repeated_rows(metrics)
  assert [r["step"] for r in read_metrics(metrics)] == sorted(r["step"] for r in read_metrics(metrics))


def test_resume_drops_rows_logged_after_the_checkpoint(straight, tmp_path):
  """A kill -9 after step 9 leaves rows for steps 6-9 that the resumed run (from step 5) logs again."""
  config, straight_dir = straight
  workdir = str(tmp_path / "w")
  shutil.copytree(os.path.join(straight_dir, "sft"), os.path.join(workdir, "sft"))
  shutil.rmtree(sft.final_params_dir(workdir))
  for step in (12, 10):
    shutil.rmtree(os.path.join(workdir, "sft", "ckpt", str(step)))
  metrics = os.path.join(workdir, "sft", "metrics.jsonl")
  truncate_metrics(metrics, 9)  # what the killed run had logged
  sft.run_sft(config, workdir)
  _assert_no_repeated_rows(metrics)
  _assert_same_params(_final_params(config, workdir), _final_params(config, straight_dir))


# --- divergence --------------------------------------------------------------------------
def test_nonfinite_updates_are_skipped_then_stop_the_run(data_dir, tmp_path, monkeypatch):
  config = small_config(data_dir)
  make_apply_fn = models.make_apply_fn

  def overflowing(cfg):  # a model whose logits overflow: every loss and gradient is NaN
    apply_fn = make_apply_fn(cfg)
    return lambda params, *a, **k: jax.tree.map(lambda x: x * np.float32("nan"), apply_fn(params, *a, **k))

  monkeypatch.setattr(models, "make_apply_fn", overflowing)
  config.sft.max_consecutive_skips = 2
  config.checkpoint.every_steps = 2
  workdir = str(tmp_path / "w")
  with pytest.raises(TrainingDiverged) as e:
    sft.run_sft(config, workdir)
  msg = str(e.value)
  assert msg.startswith("[sft] training diverged: 3 consecutive updates") and "steps 1-3" in msg
  assert "hold no NaN/Inf" in msg and e.value.step == 3
  rows = [r for r in read_metrics(os.path.join(workdir, "sft", "metrics.jsonl")) if "train/skipped" in r]
  assert rows and all(r["train/skipped"] == 1.0 for r in rows)
  assert not os.path.exists(sft.final_params_dir(workdir))
  with checkpointing.Checkpointer(os.path.join(workdir, "sft", "ckpt")) as ckpt:
    assert ckpt.all_steps() == [2] and ckpt.verify() is None  # finite (the updates were skipped), intact


# --- corrupt final parameters ------------------------------------------------------------
def test_corrupt_final_params_are_reported_and_rebuilt(straight, tmp_path, capsys):
  config, straight_dir = straight
  workdir = str(tmp_path / "w")
  shutil.copytree(os.path.join(straight_dir, "sft"), os.path.join(workdir, "sft"))
  final = sft.final_params_dir(workdir)
  (step_dir,) = [os.path.join(final, d) for d in os.listdir(final) if d.isdigit()]
  # Another (intact, readable) array store under the final meta: values silently wrong without checksums.
  shutil.rmtree(os.path.join(step_dir, "state"))
  with checkpointing.Checkpointer(os.path.join(workdir, "sft", "ckpt")) as ckpt:
    other = os.path.join(ckpt.directory, str(ckpt.all_steps()[0]))
  tmp = str(tmp_path / "other")
  common.save_params(tmp, _restore_params(config, other), {"step": STEPS})
  shutil.copytree(os.path.join(tmp, str(STEPS), "state"), os.path.join(step_dir, "state"))

  capsys.readouterr()
  assert not common.has_params(final)
  out = capsys.readouterr().out
  assert f"the saved parameters at {final} are corrupt and will not be reused: checksum mismatch" in out
  cfg = common.model_config(config)
  with pytest.raises(checkpointing.CheckpointError, match="cannot be used; rerun the stage that produces them"):
    common.load_params(final, models.abstract_params(cfg), common.param_shardings(cfg, common.make_mesh(config)))

  summary = sft.run_sft(config, workdir)
  out = capsys.readouterr().out
  assert "reusing" not in out and f"[sft] rebuilding {final}" in out and summary["steps"] == STEPS
  _assert_same_params(_final_params(config, workdir), _final_params(config, straight_dir))
  assert sorted(os.listdir(os.path.dirname(final))).count("final") == 1
  assert not [d for d in os.listdir(os.path.dirname(final)) if d.startswith("final.")]  # no leftovers


def _restore_params(config, step_dir):
  """The params of a training checkpoint (as a tree of arrays)."""
  cfg = common.model_config(config)
  mesh = common.make_mesh(config)
  tx = common.optimizer(config.sft)
  state, sh = common.create_state(lambda r: models.init_params(cfg, r), models.logical_axes(cfg), tx, mesh,
                                  jax.random.PRNGKey(0))
  with checkpointing.Checkpointer(os.path.dirname(step_dir)) as ckpt:
    restored, _ = ckpt.restore(checkpointing.abstract_like(state, sharding=sh),
                               step=int(os.path.basename(step_dir)))
  return restored.params


# --- the command line: SIGTERM from outside, rerun the same command ------------------------
def _cli(workdir, data_dir, steps):
  args = [sys.executable, "-m", "experiments.run", "--config=sft.py", f"--workdir={workdir}"]
  over = dict(OVERRIDES, **{"sft.steps": steps, "checkpoint.every_steps": 1000, "logging.every_steps": 1,
                            "sft.eval_every": 1000, "task.data_dir": data_dir})
  args += [f"--config.{k}={v}" for k, v in over.items()]
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  return args, env


@pytest.mark.slow
def test_cli_sigterm_then_rerun_equals_an_uninterrupted_run(data_dir, tmp_path):
  steps = 300  # ~1-3 s of training after the first row: the signal lands mid-run on any machine
  interrupted, straight_dir = str(tmp_path / "interrupted"), str(tmp_path / "straight")
  args, env = _cli(interrupted, data_dir, steps)
  proc = subprocess.Popen(args, cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(interrupted, "sft", "metrics.jsonl")
  deadline = time.time() + 240
  while not (os.path.exists(metrics) and read_metrics(metrics)):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
  line = [l for l in err.splitlines() if "preempted" in l][-1]
  step = int(line.split("at step ")[1].split(";")[0])
  assert 1 <= step < steps and "Traceback" not in err
  assert os.path.isdir(os.path.join(interrupted, "sft", "ckpt", str(step)))

  rerun = subprocess.run(args, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=240)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed at step {step}" in rerun.stdout
  args, env = _cli(straight_dir, data_dir, steps)
  once = subprocess.run(args, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=240)
  assert once.returncode == 0, once.stderr[-3000:]

  leaves = {}
  for name, w in (("interrupted", interrupted), ("straight", straight_dir)):
    with checkpointing.Checkpointer(sft.final_params_dir(w)) as ckpt:
      assert ckpt.verify() is None
      step_dir = os.path.join(ckpt.directory, str(ckpt.latest_step()))
    leaves[name] = _read_host_params(step_dir)
  assert leaves["interrupted"].keys() == leaves["straight"].keys()
  for k in leaves["straight"]:
    assert np.array_equal(leaves["interrupted"][k], leaves["straight"][k]), k
  _assert_no_repeated_rows(metrics)


def _read_host_params(step_dir):
  """Every array of a saved step as numpy, by leaf name (no model or mesh needed)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.CheckpointManager(os.path.dirname(step_dir), item_handlers={
      "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}) as manager:
    step = int(os.path.basename(step_dir))
    saved = manager.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: np.empty(tuple(m.shape), np.dtype(m.dtype)), getattr(saved, "tree", saved))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
