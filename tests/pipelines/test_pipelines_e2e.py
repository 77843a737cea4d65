"""End-to-end smoke tests of the SFT, RM, PPO and GRPO stages on a very small model and the synthetic testbed.

They check that every stage writes its checkpoints, metrics, plots and
summaries, that training moves the numbers the way it must, that an
interrupted SFT or RL run resumes bit-exactly, and that a finished stage is
never silently reused with other settings.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments.configs.base import get_base_config
from tiny_configs import tiny_config
from rlhf_jax import models
from rlhf_jax.config import validate_config
from rlhf_jax.pipelines import common, grpo, ppo, rm, sft
from rlhf_jax.utils import read_metrics


def small_config():
  c = tiny_config()
  c.algo.strategy = "best_random"
  c.algo.minibatches = 2
  c.ppo.iterations = 2
  c.ppo.prompts_per_iteration = 8
  c.ppo.samples_per_prompt = 3
  c.ppo.rollout_batch = 8
  c.ppo.eval_every = 2
  c.ppo.eval_prompts = 8
  c.ppo.eval_samples = 2
  c.ppo.checkpoint_every = 1
  c.stages = ("sft", "rm", "ppo")
  validate_config(c, get_base_config(), device_count=jax.device_count())
  return c


def grpo_config():
  c = small_config()
  c.stages = ("sft", "grpo")
  c.algo.advantage = "grpo"
  c.algo.strategy = "none"
  c.algo.kl_estimator = "k3"
  c.ppo.reward_source = "task"
  c.ppo.iterations = 4
  c.ppo.eval_every = 4
  validate_config(c, get_base_config(), device_count=jax.device_count())
  return c


@pytest.fixture(scope="module")
def pfppo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pfppo"))
  config = small_config()
  sft.run_sft(config, workdir)
  rm_summary = rm.run_rm(config, workdir)
  ppo_summary = ppo.run_ppo(config, workdir)
  return config, workdir, rm_summary, ppo_summary


def test_sft_writes_and_learns(pfppo_run):
  _, workdir, _, _ = pfppo_run
  for f in ("metrics.jsonl", "loss.png", "summary.json"):
    assert os.path.getsize(os.path.join(workdir, "sft", f)) > 0
  rows = [r for r in read_metrics(os.path.join(workdir, "sft", "metrics.jsonl")) if "train/loss" in r]
  assert rows[-1]["train/loss"] < 0.7 * rows[0]["train/loss"]
  assert common.has_params(sft.final_params_dir(workdir))


def test_rm_learns_the_pairs(pfppo_run):
  _, workdir, summary, _ = pfppo_run
  assert summary["train_pairs"] >= 2 and summary["heldout_pairs"] >= 1
  rows = [r for r in read_metrics(os.path.join(workdir, "rm", "metrics.jsonl")) if "train/loss" in r]
  assert rows[-1]["train/loss"] < np.log(2.0)  # a zero-initialised head starts at exactly log 2
  meta = json.load(open(os.path.join(workdir, "rm", "summary.json")))
  assert meta["reward_std"] > 0 and np.isfinite(meta["reward_mean"]) and meta["task"] == "synthetic"
  assert os.path.getsize(os.path.join(workdir, "rm", "rm.png")) > 0
  with open(os.path.join(workdir, "rm", "samples.jsonl")) as f:
    groups = [json.loads(line) for line in f]
  assert len(groups) == 16 and all(0.0 <= s <= 1.0 for g in groups for s in g["scores"])


def test_ppo_writes_metrics_plots_and_policy(pfppo_run):
  _, workdir, _, summary = pfppo_run
  rows = read_metrics(os.path.join(workdir, "ppo", "metrics.jsonl"))
  it_rows = [r for r in rows if "kl/ref" in r]
  assert [r["step"] for r in it_rows] == [1, 2]  # one row per iteration, none repeated
  for key in ("reward/score", "kl/ref", "kl/ref_k3", "policy/entropy", "policy/clip_frac", "value/error",
              "response/length", "true/score", "true/success_rate", "true/rm_corr", "filter/r2", "filter/r2_binned",
              "time/rollout", "time/update", "time/grade", "time/score"):
    assert key in it_rows[-1], key
  assert it_rows[-1]["kl/ref_k3"] >= 0.0
  assert it_rows[-1]["filter/kept_fraction"] == 1.0  # compacted: every row of the update is a kept row
  assert "eval/success_rate" in rows[0] and "eval/greedy_success" in it_rows[-1] and "eval/pass@2" in it_rows[-1]
  for f in ("ppo.png", "r2.png", "summary.json", "provenance.json"):
    assert os.path.getsize(os.path.join(workdir, "ppo", f)) > 0
  for key in ("initial_success_rate", "final_success_rate", "initial_greedy", "final_greedy"):
    assert 0.0 <= summary[key] <= 1.0, key
  assert set(summary["r2_first_rollout"]) == {"none", "best_of_n", "best_random", "best_worst"}
  assert common.has_params(ppo.final_params_dir(workdir))


def test_rerun_with_other_settings_is_refused(pfppo_run):
  """Issue 14.1: a finished stage rerun with a new strategy must not report it next to the old policy."""
  config, workdir, _, _ = pfppo_run
  config = config.copy_and_resolve_references()
  config.algo.strategy = "best_worst"
  with pytest.raises(common.SettingsChanged, match="algo.strategy: 'best_random' -> 'best_worst'"):
    ppo.run_ppo(config, workdir)
  same = ppo.run_ppo(pfppo_run[0], workdir)  # the same settings reuse the finished stage
  assert same["reused"] and same["strategy"] == "best_random"


def test_sft_resume_is_bitwise(tmp_path):
  config = small_config()
  config.sft.steps = 6
  config.sft.optimizer.total_steps = 6  # the same schedule for the 3-step and the 6-step runs
  config.checkpoint.every_steps = 3
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  sft.run_sft(config, straight)
  config.sft.steps = 3
  sft.run_sft(config, resumed)
  shutil.rmtree(sft.final_params_dir(resumed))  # as if the 6-step run had been interrupted at step 3
  config.sft.steps = 6
  sft.run_sft(config, resumed)
  cfg = common.model_config(config)
  mesh = common.make_mesh(config)
  load = lambda w: common.load_params(sft.final_params_dir(w), models.abstract_params(cfg),
                                      common.param_shardings(cfg, mesh))[0]
  for a, b in zip(jax.tree.leaves(load(straight)), jax.tree.leaves(load(resumed))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Crash(Exception):
  pass


def _count_step_traces(monkeypatch) -> list:
  """Every trace of the RL update made after this call (one per compilation: a retrace is a new program)."""
  traces, make = [], ppo.make_ppo_step

  def counting(*args, **kwargs):
    step = make(*args, **kwargs)

    def traced(state, batch):
      traces.append(1)
      return step(state, batch)
    return traced

  monkeypatch.setattr(ppo, "make_ppo_step", counting)
  return traces


def test_grpo_learns_resumes_bitwise_and_writes_its_summary(tmp_path, monkeypatch):
  """An RL run killed after iteration 2 and rerun with the same command equals the uninterrupted run."""
  config = grpo_config()
  straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
  sft.run_sft(config, straight)
  shutil.copytree(os.path.join(straight, "sft"), os.path.join(crashed, "sft"))
  traces = _count_step_traces(monkeypatch)
  summary = grpo.run_grpo(config, straight)
  assert len(traces) == 1, f"the update was traced {len(traces)} times in {config.ppo.iterations} iterations"
  assert summary["advantage"] == "grpo" and summary["reward_source"] == "task"
  for key in ("initial_success_rate", "final_success_rate", "initial_greedy", "final_greedy"):
    assert 0.0 <= summary[key] <= 1.0, key

  from rlhf_jax import rollout  # pylint: disable=import-outside-toplevel
  real_grade, calls = rollout.grade, []

  def crash_on_third(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3 + 1:  # the 3rd iteration's grading (the first call is the held-out evaluation at start)
      raise _Crash()
    return real_grade(*args, **kwargs)

  monkeypatch.setattr(rollout, "grade", crash_on_third)
  with pytest.raises(_Crash):
    grpo.run_grpo(config, crashed)
  monkeypatch.setattr(rollout, "grade", real_grade)
  assert not common.has_params(ppo.final_params_dir(crashed, "grpo"))
  traces.clear()
  grpo.run_grpo(config, crashed)
  assert len(traces) == 1  # the restored state has the types of the state the step returns

  cfg = common.model_config(config)
  mesh = common.make_mesh(config)
  load = lambda w: common.load_params(ppo.final_params_dir(w, "grpo"), models.abstract_params(cfg),
                                      common.param_shardings(cfg, mesh))[0]
  for a, b in zip(jax.tree.leaves(load(straight)), jax.tree.leaves(load(crashed))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = [r["step"] for r in read_metrics(os.path.join(crashed, "grpo", "metrics.jsonl")) if "kl/ref" in r]
  assert rows == [1, 2, 3, 4]  # the rows of the lost iteration are not repeated
  assert os.path.getsize(os.path.join(crashed, "grpo", "grpo.png")) > 0

  # Stopped after the final parameters were written but before the summary: the rerun finishes the stage
  # (from its checkpoint) instead of failing on the missing summary, and changes nothing it had.
  os.remove(os.path.join(crashed, "grpo", "summary.json"))
  again = grpo.run_grpo(config, crashed)
  assert not again.get("reused") and os.path.exists(os.path.join(crashed, "grpo", "summary.json"))
  for a, b in zip(jax.tree.leaves(load(straight)), jax.tree.leaves(load(crashed))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = [r["step"] for r in read_metrics(os.path.join(crashed, "grpo", "metrics.jsonl")) if "kl/ref" in r]
  assert rows == [1, 2, 3, 4]


def test_eval_and_r2_stages_report(pfppo_run):
  from rlhf_jax.pipelines import eval as eval_stage, r2  # pylint: disable=import-outside-toplevel
  config, workdir, _, _ = pfppo_run
  config = config.copy_and_resolve_references()
  config.eval.num_problems = 8
  config.eval.batch_size = 8
  config.eval.num_samples = 2
  config.eval.ks = (1, 2)
  report = eval_stage.run_eval(config, workdir)
  assert report["policy"] == ppo.final_params_dir(workdir)
  assert report["num_prompts"] == 8 and 0.0 <= report["pass@1"] <= report["pass@2"] <= 1.0
  assert os.path.exists(os.path.join(workdir, "eval", "report.json"))
  table = r2.run_r2(config, workdir)["table"]
  assert set(table) == {"none", "best_of_n", "best_random", "best_worst"}
  assert table["none"]["kept"] == 8 * 3 and table["best_of_n"]["kept"] == 8 and table["best_worst"]["kept"] == 16
  assert os.path.getsize(os.path.join(workdir, "r2", "r2.png")) > 0


def test_task_reward_with_midrange_noise():
  from rlhf_jax.pipelines.ppo import noisy_reward  # pylint: disable=import-outside-toplevel
  s = np.asarray([0.0, 0.5, 1.0] * 2000, np.float32)
  r = noisy_reward(s, std=0.5, shape="midrange", rng=np.random.default_rng(0)).reshape(-1, 3)
  np.testing.assert_array_equal(r[:, 0], 0.0)  # no noise at the extremes
  np.testing.assert_array_equal(r[:, 2], 1.0)
  assert abs(r[:, 1].std() - 0.5) < 0.03 and abs(r[:, 1].mean() - 0.5) < 0.03
  np.testing.assert_array_equal(noisy_reward(s, std=0.0, shape="constant", rng=np.random.default_rng(0)), s)


def test_rl_preemption_checkpoints_exits_75_and_resumes(tmp_path, monkeypatch):
  """SIGTERM during an RL stage: checkpoint at the next iteration boundary, exit 75; the rerun finishes."""
  from rlhf_jax.utils import preemption  # pylint: disable=import-outside-toplevel
  config = grpo_config()
  workdir = str(tmp_path / "run")
  sft.run_sft(config, workdir)
  monkeypatch.setattr(preemption.PreemptionGuard, "should_stop", lambda self, step: step == 2)
  with pytest.raises(preemption.Preempted) as e:
    grpo.run_grpo(config, workdir)
  assert e.value.code == preemption.PREEMPTED_EXIT_CODE == 75
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "grpo", "ckpt")) if d.isdigit())[-1] == 2
  monkeypatch.undo()
  summary = grpo.run_grpo(config, workdir)
  assert summary["iterations"] == 4
  rows = [r["step"] for r in read_metrics(os.path.join(workdir, "grpo", "metrics.jsonl")) if "kl/ref" in r]
  assert rows == [1, 2, 3, 4]


def test_rl_stops_on_consecutive_non_finite_updates(tmp_path):
  """A learning rate that overflows the parameters: updates are skipped, then the run stops with a clear error."""
  from rlhf_jax.utils.divergence import TrainingDiverged  # pylint: disable=import-outside-toplevel
  config = grpo_config()
  config.ppo.actor_optimizer.learning_rate = 1e38
  config.ppo.actor_optimizer.grad_clip = 0.0
  config.ppo.max_consecutive_skips = 1
  workdir = str(tmp_path / "run")
  sft.run_sft(config, workdir)
  with pytest.raises(TrainingDiverged, match="grpo"):
    grpo.run_grpo(config, workdir)
  assert not common.has_params(ppo.final_params_dir(workdir, "grpo"))


def test_sft_resumed_with_another_batch_size_is_refused(tmp_path):
  """Issue 14.1: changing batch size on resume went through silently; training longer stays allowed."""
  config = small_config()
  config.sft.steps = 2
  workdir = str(tmp_path / "run")
  sft.run_sft(config, workdir)
  shutil.rmtree(sft.final_params_dir(workdir))  # an unfinished run
  config.sft.batch_size = 8
  with pytest.raises(common.SettingsChanged, match="sft.batch_size: 16 -> 8"):
    sft.run_sft(config, workdir)
  config.sft.batch_size = 16
  config.sft.steps = 3
  assert sft.run_sft(config, workdir)["steps"] == 3
