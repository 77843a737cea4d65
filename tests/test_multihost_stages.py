"""Real stages on two processes: `sft` then `grpo` with 2 CPU processes × 1 device equal 1 process × 2 devices.

Both runs go through `python -m experiments.run` (the multi-host one with
`--multihost --coordinator_address=... --num_processes=2 --process_id=i`, gloo
collectives, as tests/test_run_cli.py's toy stage) on the same 2-device
("data") mesh. Every host loads the same global batch and feeds only its rows,
so the multi-host run trains on exactly the one-process batches: the final SFT
and GRPO parameters must be bitwise equal, and so must every logged metric
(held-out evaluation and the graded training samples are combined over hosts,
not process 0's half). Metrics and summaries are written once, by process 0.
"""
import inspect
import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from experiments.configs.base import get_base_config
from xla_flags import xla_flags

# Three processes compiling SFT and GRPO at once: 3-4 min on the shared 2-core machine.
pytestmark = pytest.mark.slow

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600


def small_config():
  c = get_base_config()
  c.model.preset = "tiny"
  c.model.n_layers = 2
  c.model.dim = 64
  c.model.mlp_dim = 128
  c.task.name = "synthetic"
  c.task.synthetic_max_len = 5
  c.task.num_train = 400
  c.task.num_eval = 40
  c.task.max_prompt_len = 20
  c.task.max_response_len = 8
  c.sft.steps = 40
  c.sft.batch_size = 16
  c.sft.eval_every = 20
  c.sft.eval_batches = 2
  c.sft.optimizer.learning_rate = 3e-3
  c.sft.optimizer.warmup_steps = 2
  c.algo.advantage = "grpo"
  c.algo.strategy = "none"
  c.algo.kl_estimator = "k3"
  c.algo.minibatches = 2
  c.ppo.reward_source = "task"
  c.ppo.iterations = 2
  c.ppo.prompts_per_iteration = 8
  c.ppo.samples_per_prompt = 3
  c.ppo.rollout_batch = 8
  c.ppo.eval_every = 2
  c.ppo.eval_prompts = 12  # not a multiple of the batch: the last held-out batch is padded
  c.ppo.eval_samples = 3  # the training sampler's settings: one compilation fewer
  c.ppo.checkpoint_every = 1
  c.checkpoint.every_steps = 5
  c.checkpoint.async_save = False
  c.logging.every_steps = 3
  c.logging.progress = False
  c.logging.tensorboard = False
  c.stages = ("sft", "grpo")
  return c


CONFIG_FILE = ("from experiments.configs.base import get_base_config\n\n\n"
               + textwrap.dedent(inspect.getsource(small_config))
               + "\n\ndef get_config(arg=None):\n  return small_config()\n")



def _timing(key: str) -> bool:
  """Wall-clock and rate metrics differ between any two runs; everything else must not."""
  return key.startswith("time/") or key.endswith("per_s") or key == "wall_s"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO_DIR, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(devices))
  for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"):
    env.pop(k, None)
  return env


def _launch(config_path, workdir, *, devices, multihost_args=()):
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.run", f"--config={config_path}", f"--workdir={workdir}", *multihost_args],
      cwd=REPO_DIR, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(one-process workdir, two-process workdir, the two processes' logs), run concurrently."""
  tmp = tmp_path_factory.mktemp("multihost")
  config_path = tmp / "mh_small.py"
  config_path.write_text(CONFIG_FILE)
  single, multi = tmp / "single", tmp / "multi"
  addr = f"127.0.0.1:{_free_port()}"
  procs = [_launch(config_path, single, devices=2)] + [
      _launch(config_path, multi, devices=1, multihost_args=(
          "--multihost", f"--coordinator_address={addr}", "--num_processes=2", f"--process_id={i}"))
      for i in range(2)]
  outs = _wait(procs)
  return str(single), str(multi), outs[1:]


def _params(directory):
  """A saved parameter tree as numpy arrays on this (test) process."""
  from rlhf_jax import models  # pylint: disable=import-outside-toplevel
  from rlhf_jax.pipelines import common  # pylint: disable=import-outside-toplevel
  config = small_config()
  cfg = common.model_config(config)
  mesh = common.make_mesh(config)
  params, _ = common.load_params(directory, models.abstract_params(cfg), common.param_shardings(cfg, mesh))
  return jax.tree.map(np.asarray, params)


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _same(a, b):
  return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_two_processes_ran_on_one_global_mesh(runs):
  _, _, logs = runs
  for log in logs:
    assert "2 process(es)" in log, log[-2000:]


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_final_params_equal_the_one_process_run(runs, stage):
  single, multi, _ = runs
  a = _params(os.path.join(single, stage, "final"))
  b = _params(os.path.join(multi, stage, "final"))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  if stage == "grpo":  # the RL stage moved the policy: the equality is not that of two untouched SFT copies
    sft = _params(os.path.join(single, "sft", "final"))
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(sft), jax.tree.leaves(a)))


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_metrics_written_once_and_equal_the_one_process_run(runs, stage):
  single, multi, _ = runs
  rows_1, rows_2 = (_rows(os.path.join(w, stage, "metrics.jsonl")) for w in (single, multi))
  steps = [r["step"] for r in rows_2]
  assert steps == [r["step"] for r in rows_1]
  assert len(rows_2) == len({json.dumps(r, sort_keys=True) for r in rows_2})  # process 1 wrote nothing
  keys = set()
  for r1, r2 in zip(rows_1, rows_2):
    assert set(r1) == set(r2)
    for k in r1:
      if not _timing(k):
        keys.add(k)
        assert _same(r1[k], r2[k]), (stage, r1["step"], k, r1[k], r2[k])
  must = {"sft": ("train/loss", "eval/nll"),
          "grpo": ("true/score", "eval/success_rate", "eval/greedy_success", "kl/ref")}[stage]
  assert set(must) <= keys
  s1, s2 = (json.load(open(os.path.join(w, stage, "summary.json"))) for w in (single, multi))
  for k in s1:
    if not _timing(k):
      assert _same(s1[k], s2[k]), (stage, k, s1[k], s2[k])
  leftovers = [f for f in os.listdir(os.path.join(multi, stage)) if f.endswith(".tmp")]
  assert not leftovers
