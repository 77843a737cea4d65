"""End-to-end smoke runs of the autoif, dpo and online_dpo stages (and run_ifeval) on a very small model.

One module fixture runs autoif (scripted supervisor) -> SFT on the AutoIF records
(`rlhf_jax.pipelines.autoif:make_sft_task`) -> offline DPO on the AutoIF pairs ->
online DPO graded by the records' verification functions. The tests check that each
stage writes its checkpoints, metrics, plots and summary, that offline DPO starts at
the closed-form loss log 2 (policy = reference) and then lowers the loss and raises
the reward accuracy on its training pairs, that the filters report in/out counts,
and that an interrupted DPO run resumes bit-exactly.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments.configs.base import get_base_config
from rlhf_jax import models
from rlhf_jax.config import ConfigError, validate_config
from rlhf_jax.pipelines import autoif as autoif_stage, common, dpo, online_dpo, sft
from rlhf_jax.utils import read_metrics

TYPES = ("punctuation:no_commas", "content:no_digits", "case:lowercase", "length:max_words")


def small_config(workdir):
  c = get_base_config()
  c.model.preset = "tiny"
  c.model.n_layers = 2
  c.model.dim = 64
  c.model.mlp_dim = 128
  c.task.name = "rlhf_jax.pipelines.autoif:make_sft_task"
  c.task.data_dir = os.path.join(workdir, "data")
  c.task.max_prompt_len = 64
  c.task.max_response_len = 256
  c.autoif.train_types = TYPES
  c.autoif.eval_types = ("format:title", "startend:quotation")
  c.autoif.num_eval = 8
  c.autoif.augment_completions = 1
  c.autoif.verifiers_per_instruction = 4
  c.autoif.queries_per_instruction = 4
  c.autoif.responses_per_prompt = 4
  c.autoif.eval_fraction = 0.2
  c.sft.steps = 20
  c.sft.batch_size = 8
  c.sft.eval_every = 20
  c.sft.eval_batches = 1
  c.sft.optimizer.learning_rate = 3e-3
  c.dpo.steps = 12
  c.dpo.batch_size = 8
  c.dpo.eval_every = 6
  c.dpo.beta = 0.5
  c.dpo.optimizer.learning_rate = 1e-3
  c.dpo.optimizer.warmup_steps = 0
  c.online_dpo.rounds = 2
  c.online_dpo.prompts_per_round = 8
  c.online_dpo.samples_per_prompt = 4
  c.online_dpo.steps_per_round = 2
  c.online_dpo.batch_size = 8
  c.online_dpo.rollout_batch = 8
  c.online_dpo.eval_prompts = 8
  c.online_dpo.eval_samples = 1
  c.online_dpo.eval_every = 2
  c.online_dpo.temperature = 1.0
  c.online_dpo.optimizer.learning_rate = 1e-4
  c.eval.batch_size = 8
  c.checkpoint.every_steps = 4
  c.checkpoint.async_save = False
  c.logging.every_steps = 2
  c.logging.progress = False
  c.logging.tensorboard = False
  c.stages = ("autoif", "sft", "dpo", "online_dpo")
  validate_config(c, get_base_config(), device_count=jax.device_count())
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("autoif_dpo"))
  config = small_config(workdir)
  summaries = {"autoif": autoif_stage.run_autoif(config, workdir)}
  sft.run_sft(config, workdir)
  summaries["dpo"] = dpo.run_dpo(config, workdir)
  summaries["online_dpo"] = online_dpo.run_online_dpo(config, workdir)
  return config, workdir, summaries


def test_autoif_stage_reports_filters_and_writes_datasets(run):
  config, workdir, summaries = run
  s = summaries["autoif"]
  names = [r["name"] for r in s["reports"]]
  assert names[:4] == ["augmentation", "verifier_generation", "cross_validation", "back_translation"]
  for r in s["reports"]:
    assert 0 <= r["out"] <= r["in"] and r["removed"] == r["in"] - r["out"], r
  assert any(r["removed"] > 0 for r in s["reports"] if r["name"] == "cross_validation")
  assert s["sft_records"] == sum(s["sft_split_sizes"].values()) and s["pairs"] == sum(s["pair_split_sizes"].values())
  assert set(s["train_types"]) == set(TYPES)
  for f in ("summary.json", "filters.png", "sft.jsonl", "provenance.json"):
    assert os.path.getsize(os.path.join(workdir, "autoif", f)) > 0, f
  # The written SFT set is a task: records carry their verification functions and the grader runs them.
  task = autoif_stage.make_sft_task(config)
  train = task.load("train")
  assert len(train) == s["sft_split_sizes"]["train"] and all(r["constraints"] for r in train)
  scores = task.grade(train[:6], [r["response"] for r in train[:6]])
  np.testing.assert_array_less(0.5, scores)  # SFT responses passed > 0.5 of their functions
  assert all(set(c["type"] for c in r["constraints"]) <= {"format:title", "startend:quotation"}
             for r in task.load("ifeval"))
  again = autoif_stage.run_autoif(config, workdir)
  assert again["reused"] and again["pairs_dataset"] == s["pairs_dataset"]


def test_dpo_starts_at_log2_and_learns_its_pairs(run):
  _, workdir, summaries = run
  s = summaries["dpo"]
  rows = [r for r in read_metrics(os.path.join(workdir, "dpo", "metrics.jsonl")) if "train/loss" in r]
  assert [r["step"] for r in rows] == list(range(2, 13, 2))
  # At step 1 the policy is the reference: h = 0, loss = log 2 exactly (before its update).
  assert s["initial_eval"]["eval/loss"] == pytest.approx(np.log(2.0), abs=1e-5)
  assert rows[-1]["train/loss"] < rows[0]["train/loss"] and rows[-1]["train/loss"] < np.log(2.0)
  assert rows[-1]["rewards/accuracy"] > 0.5 and rows[-1]["rewards/accuracy"] >= rows[0]["rewards/accuracy"]
  assert rows[-1]["rewards/margin"] > 0
  assert s["final_eval"]["eval/loss"] < np.log(2.0)
  for key in ("train_pairs", "heldout_pairs", "final_train_loss", "final_train_accuracy", "pairs_dataset"):
    assert s[key] is not None, key
  for f in ("dpo.png", "summary.json", "provenance.json"):
    assert os.path.getsize(os.path.join(workdir, "dpo", f)) > 0
  assert common.has_params(dpo.final_params_dir(workdir))
  assert os.path.isdir(os.path.join(workdir, "dpo", "ckpt"))


def test_online_dpo_rounds_write_metrics_and_policy(run):
  _, workdir, summaries = run
  s = summaries["online_dpo"]
  rows = read_metrics(os.path.join(workdir, "online_dpo", "metrics.jsonl"))
  assert "eval/greedy_success" in rows[0] and rows[0]["step"] == 0
  rounds = [r for r in rows if "pairs/count" in r]
  assert [r["step"] for r in rounds] == [1, 2]
  for r in rounds:
    assert 0.0 <= r["true/score"] <= 1.0 and r["pairs/count"] <= 8 * 2 * 2
    if r["pairs/count"]:
      assert "train/loss" in r and "rewards/accuracy" in r
  assert "eval/greedy_score" in rounds[-1]
  assert s["total_pairs"] == sum(r["pairs/count"] for r in rounds)
  for key in ("initial_success_rate", "final_success_rate", "initial_greedy", "final_greedy"):
    assert 0.0 <= s[key] <= 1.0, key
  for f in ("online_dpo.png", "summary.json"):
    assert os.path.getsize(os.path.join(workdir, "online_dpo", f)) > 0
  assert common.has_params(dpo.final_params_dir(workdir, "online_dpo"))


def test_online_pairs_follow_the_autoif_rule():
  acc = np.asarray([[1.0, 0.6, 0.0, 0.0, 0.3], [0.5, 0.0, 0.2, 0.2, 0.2], [0.4, 0.3, 0.2, 0.1, 0.0]], np.float32)
  texts = [[f"p{p}r{i}" for i in range(5)] for p in range(3)]
  records = [{"prompt": f"p{p}"} for p in range(3)]
  from rlhf_jax.autoif import pair_indices  # pylint: disable=import-outside-toplevel
  code = online_dpo.build_pairs(records, texts, acc, pair_indices(acc, seed=0, threshold=0.5, strict=False))
  paper = online_dpo.build_pairs(records, texts, acc, pair_indices(acc, seed=0, threshold=0.5, strict=True))
  assert sorted((p["chosen"], p["rejected"]) for p in code if p["prompt"] == "p0") == [
      ("p0r0", "p0r2"), ("p0r0", "p0r3"), ("p0r1", "p0r2"), ("p0r1", "p0r3")]
  assert [(p["chosen"], p["rejected"]) for p in code if p["prompt"] == "p1"] == [("p1r0", "p1r1")]  # 0.5 >= 0.5
  assert not [p for p in paper if p["prompt"] == "p1"]  # the paper's > 0.5 drops it
  assert not [p for p in code if p["prompt"] == "p2"]  # no positive
  for p in code:
    assert p["metadata"]["chosen_accuracy"] >= 0.5 and p["metadata"]["rejected_accuracy"] == 0.0
  np.testing.assert_allclose(online_dpo.minmax_per_prompt(np.asarray([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])),
                             [[0.0, 1.0, 0.5], [0.5, 0.5, 0.5]])


def test_stream_indices_cover_each_epoch_once():
  seen = np.concatenate([dpo.stream_indices(s, 4, 10, seed=3)[0] for s in range(1, 6)])  # 20 = 2 epochs
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  idx, w = dpo.stream_indices(1, 8, 3, seed=0)
  assert sorted(idx[:3]) == [0, 1, 2] and w.tolist() == [1.0] * 3 + [0.0] * 5


class _Crash(Exception):
  pass


@pytest.mark.slow  # three more DPO runs (~60 s): pytest -m slow
def test_dpo_resume_is_bitwise(run, monkeypatch):
  config, workdir, _ = run
  config = config.copy_and_resolve_references()
  config.dpo.steps = 6
  config.dpo.eval_every = 100
  straight, crashed = os.path.join(workdir, "r_straight"), os.path.join(workdir, "r_crashed")
  for w in (straight, crashed):
    os.makedirs(w)
    for d in ("sft", "autoif"):
      os.symlink(os.path.join(workdir, d), os.path.join(w, d))
  dpo.run_dpo(config, straight)
  real = dpo.stream_indices

  def crash_at_step_5(step, *args, **kwargs):
    if step == 5:
      raise _Crash()
    return real(step, *args, **kwargs)

  monkeypatch.setattr(dpo, "stream_indices", crash_at_step_5)
  with pytest.raises(_Crash):
    dpo.run_dpo(config, crashed)  # the last checkpoint is step 4 (every_steps = 4)
  monkeypatch.setattr(dpo, "stream_indices", real)
  dpo.run_dpo(config, crashed)
  cfg, mesh = common.model_config(config), common.make_mesh(config)
  load = lambda w: common.load_params(dpo.final_params_dir(w), models.abstract_params(cfg),
                                      common.param_shardings(cfg, mesh))[0]
  for a, b in zip(jax.tree.leaves(load(straight)), jax.tree.leaves(load(crashed))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  steps = [r["step"] for r in read_metrics(os.path.join(crashed, "dpo", "metrics.jsonl")) if "train/loss" in r]
  assert steps == [2, 4, 6]


def test_config_checks_name_the_field(tmp_path):
  config = small_config(str(tmp_path))
  for field, value in (("online_dpo.samples_per_prompt", 1), ("dpo.loss_type", "kto"),
                       ("autoif.cross_validation", "strict"), ("online_dpo.reference", "none")):
    bad = config.copy_and_resolve_references()
    section, key = field.split(".")
    bad[section][key] = value
    with pytest.raises(ConfigError, match=f"config.{field}"):
      validate_config(bad, get_base_config(), device_count=jax.device_count())
