"""End-to-end smoke tests of the SFT, RM and PPO stages on a very small model.

They check that every stage writes its checkpoints, metrics, plots and
summaries, that training moves the numbers the way it must, and that an
interrupted SFT run resumes bit-exactly.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments.configs.base import get_base_config
from rlhf_jax import models
from rlhf_jax.config import validate_config
from rlhf_jax.pipelines import common, ppo, rm, sft
from rlhf_jax.utils import read_metrics


def small_config(**task):
  c = get_base_config()
  c.model.preset = "tiny"
  c.model.n_layers = 2
  c.model.dim = 64
  c.model.mlp_dim = 128
  c.task.name = "minicode"
  c.task.max_prompt_len = 176
  c.task.max_response_len = 64
  c.task.difficulties = (1,)
  c.sft.steps = 40
  c.sft.batch_size = 8
  c.sft.eval_every = 20
  c.sft.eval_batches = 1
  c.sft.optimizer.learning_rate = 3e-3
  c.rm.num_prompts = 16  # 4 held out
  c.rm.samples_per_prompt = 2
  c.rm.include_canonical = True
  c.rm.eval_fraction = 0.25
  c.rm.steps = 12
  c.rm.batch_size = 8
  c.rm.optimizer.learning_rate = 1e-3
  c.algo.strategy = "best_random"
  c.algo.minibatches = 2
  c.ppo.iterations = 2
  c.ppo.prompts_per_iteration = 8
  c.ppo.samples_per_prompt = 3
  c.ppo.rollout_batch = 8
  c.ppo.eval_every = 2
  c.ppo.eval_problems = 8
  c.checkpoint.every_steps = 10
  c.checkpoint.async_save = False
  c.logging.every_steps = 5
  c.logging.progress = False
  c.stages = ("sft", "rm", "ppo")
  for k, v in task.items():
    setattr(c.task, k, v)
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
  assert os.listdir(os.path.join(workdir, "sft", "tb"))
  rows = [r for r in read_metrics(os.path.join(workdir, "sft", "metrics.jsonl")) if "train/loss" in r]
  assert rows[-1]["train/loss"] < 0.7 * rows[0]["train/loss"]
  assert common.has_params(sft.final_params_dir(workdir))


def test_rm_learns_the_pairs(pfppo_run):
  _, workdir, summary, _ = pfppo_run
  assert summary["train_pairs"] >= 2 and summary["heldout_pairs"] >= 1
  rows = [r for r in read_metrics(os.path.join(workdir, "rm", "metrics.jsonl")) if "train/loss" in r]
  assert rows[-1]["train/loss"] < np.log(2.0)  # a zero-initialised head starts at exactly log 2
  meta = json.load(open(os.path.join(workdir, "rm", "summary.json")))
  assert meta["reward_std"] > 0 and np.isfinite(meta["reward_mean"])
  assert os.path.getsize(os.path.join(workdir, "rm", "rm.png")) > 0
  with open(os.path.join(workdir, "rm", "samples.jsonl")) as f:
    assert len(f.readlines()) == 16


def test_ppo_writes_metrics_plots_and_policy(pfppo_run):
  _, workdir, _, summary = pfppo_run
  rows = read_metrics(os.path.join(workdir, "ppo", "metrics.jsonl"))
  it_rows = [r for r in rows if "kl/ref" in r]
  assert len(it_rows) == 2
  for key in ("reward/score", "kl/ref", "policy/entropy", "policy/clip_frac", "value/error", "response/length",
              "true/pass_rate", "true/rm_corr", "filter/r2", "filter/r2_binned", "time/rollout", "time/update",
              "time/sandbox", "time/score"):
    assert key in it_rows[-1], key
  assert it_rows[-1]["filter/kept_fraction"] == 1.0  # compacted: every row of the update is a kept row
  assert "eval/pass@1" in rows[0] and "eval/pass@1" in it_rows[-1]
  for f in ("ppo.png", "r2.png", "summary.json"):
    assert os.path.getsize(os.path.join(workdir, "ppo", f)) > 0
  assert set(summary["r2_first_rollout"]) == {"none", "best_of_n", "best_random", "best_worst"}
  assert common.has_params(ppo.final_params_dir(workdir))


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


def test_eval_and_r2_stages_report(pfppo_run):
  from rlhf_jax.pipelines import eval as eval_stage, r2  # pylint: disable=import-outside-toplevel
  config, workdir, _, _ = pfppo_run
  config = config.copy_and_resolve_references()
  config.eval.num_problems = 8
  config.eval.batch_size = 8
  config.sampling.temperature = 0.0
  report = eval_stage.run_eval(config, workdir)
  assert report["policy"] == ppo.final_params_dir(workdir)
  assert report["num_problems"] == 8 and 0.0 <= report["pass@1"] <= 1.0
  assert os.path.exists(os.path.join(workdir, "eval", "report.json"))
  config.sampling.temperature = 1.0
  config.eval.split = "validation"
  table = r2.run_r2(config, workdir)["table"]
  assert set(table) == {"none", "best_of_n", "best_random", "best_worst"}
  assert table["none"]["kept"] == 8 * 3 and table["best_of_n"]["kept"] == 8 and table["best_worst"]["kept"] == 16
  assert os.path.getsize(os.path.join(workdir, "r2", "r2.png")) > 0


def test_oracle_reward_control_trains_on_the_test_outcome(pfppo_run, tmp_path):
  """`ppo.reward_source="oracle"` (a control experiment) rewards exactly the sandbox's pass/fail at noise 0."""
  config, workdir, _, _ = pfppo_run
  config = config.copy_and_resolve_references()
  config.ppo.reward_source = "oracle"
  config.ppo.oracle_noise = 0.0
  config.ppo.iterations = 1
  config.ppo.eval_at_start = False
  run_dir = str(tmp_path / "oracle")
  os.makedirs(run_dir)
  for stage in ("sft", "rm"):
    os.symlink(os.path.join(workdir, stage), os.path.join(run_dir, stage))
  summary = ppo.run_ppo(config, run_dir)
  assert summary["reward_source"] == "oracle"
  row = [r for r in read_metrics(os.path.join(run_dir, "ppo", "metrics.jsonl")) if "kl/ref" in r][-1]
  # The update's mean reward over the kept rows is the kept rows' true pass rate.
  assert row["reward/score"] == pytest.approx(row["true/pass_rate_kept"], abs=1e-6)


def test_reward_source_is_validated():
  from rlhf_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  c = small_config()
  c.ppo.reward_source = "sandbox"
  with pytest.raises(ConfigError, match="ppo.reward_source"):
    validate_config(c, get_base_config(), device_count=jax.device_count())
