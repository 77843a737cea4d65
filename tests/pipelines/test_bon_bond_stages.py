"""End-to-end smoke tests of the best-of-N (`bon`), rejection-sampling (`rs`) and BOND (`bond`) stages.

On a very small model and the synthetic testbed: each stage writes its checkpoints,
metrics, plots and summary; best-of-1 is plain sampling; best-of-N's reward cannot fall
with N (prefixes of one draw) and its KL estimate is 0 at N = 1 and below the bound;
the BOND policy starts at KL 0 to the reference and the anchor and moves away; an
interrupted BOND run resumes bitwise.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments.configs.base import get_base_config
from tiny_configs import tiny_config
from rlhf_jax import bon, models, rollout
from rlhf_jax.config import validate_config
from rlhf_jax.pipelines import bon as bon_stage, bond, common, rm, rs, sft
from rlhf_jax.utils import read_metrics


def small_config():
  c = tiny_config()
  c.sft.steps = 20
  c.bon.ns = (1, 2, 4)
  c.bon.num_prompts = 8
  c.bon.rollout_batch = 8
  c.rs.rounds = 2
  c.rs.prompts_per_round = 8
  c.rs.samples_per_prompt = 3
  c.rs.sft_steps = 3
  c.rs.sft_batch_size = 8
  c.rs.eval_prompts = 8
  c.rs.eval_samples = 2
  c.rs.rollout_batch = 8
  c.bond.iterations = 3
  c.bond.prompts_per_iteration = 8
  c.bond.reference_samples = 3
  c.bond.reward_source = "task"
  c.bond.eval_every = 3
  c.bond.eval_prompts = 8
  c.bond.eval_samples = 2
  c.bond.checkpoint_every = 1
  c.bond.rollout_batch = 8
  c.bond.eta = 0.1
  c.stages = ("sft", "bon", "rs", "bond")
  validate_config(c, get_base_config(), device_count=jax.device_count())
  return c


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A workdir with a finished SFT stage and a reward model (shared; tests copy it before writing).

  The reward model is the SFT backbone with a random scalar head, saved where the rm stage
  saves its result: the stages only need some scalar scorer of (prompt, response), and
  training one (tests/pipelines/test_pipelines_e2e.py does) would double this file's time.
  """
  workdir = str(tmp_path_factory.mktemp("bonbase"))
  config = small_config()
  sft.run_sft(config, workdir)
  mesh = common.make_mesh(config)
  cfg, params = rm.load_sft_policy(config, workdir, mesh)
  scalar = models.lm_to_scalar_params(jax.device_get(params), cfg, jax.random.PRNGKey(0))
  scalar["score_head"] = jax.random.normal(jax.random.PRNGKey(1), np.shape(scalar["score_head"]), np.float32)
  common.save_params(rm.final_params_dir(workdir), scalar, {"step": 0, "stage": "rm", "reward_mean": 0.0,
                                                             "reward_std": 1.0})
  return config, workdir


def _fresh(base_run, tmp_path, *stages):
  config, base = base_run
  workdir = str(tmp_path / "w")
  for s in ("sft", "rm", "data", *stages):
    if os.path.isdir(os.path.join(base, s)):
      shutil.copytree(os.path.join(base, s), os.path.join(workdir, s))
  return config.copy_and_resolve_references(), workdir


def test_best_of_one_is_plain_sampling_and_best_of_n_picks_the_first_best(base_run):
  config, workdir = base_run
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  task = common.make_task(config, workdir)
  cfg, params = rm.load_sft_policy(config, workdir, mesh)
  records = rollout.load_fitted(task, tok, task.eval_split, max_prompt_len=config.task.max_prompt_len)[:16]
  key = jax.random.PRNGKey(3)
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len
  one = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, num_samples=1, mesh=mesh)
  texts, idx, scores = bon_stage.best_of_n(one, params, tok, records, bon_stage.task_scorer(task), 1,
                                           max_prompt_len=plen, rng=key, batch_size=8, mesh=mesh)
  plain = rollout.generate_texts(one, params, tok, records, batch_size=8, max_prompt_len=plen, rng=key, mesh=mesh)
  assert texts == plain and (idx == 0).all()
  np.testing.assert_array_equal(scores, rollout.grade(task, records, plain))

  four = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, num_samples=4, mesh=mesh)
  rm_params, _ = rm.load_reward_model(config, workdir, mesh)
  scorer = bon_stage.rm_scorer(rm_params, cfg)
  all_texts, r_RxN = bon_stage.sample_scored(four, params, tok, records, scorer, max_prompt_len=plen, rng=key,
                                             batch_size=8, mesh=mesh)
  texts, idx, scores = bon_stage.best_of_n(four, params, tok, records, scorer, 4, max_prompt_len=plen, rng=key,
                                           batch_size=8, mesh=mesh)
  np.testing.assert_array_equal(scores, r_RxN.max(1))
  np.testing.assert_array_equal(idx, [int(np.flatnonzero(r == r.max())[0]) for r in r_RxN])  # first on ties
  assert texts == [all_texts[i * 4 + j] for i, j in enumerate(idx)]
  with pytest.raises(ValueError, match="`n`"):
    bon_stage.best_of_n(four, params, tok, records, scorer, 5, max_prompt_len=plen, rng=key, batch_size=8, mesh=mesh)


def test_bon_stage_reports_reward_kl_and_win_rate(base_run, tmp_path):
  config, workdir = _fresh(base_run, tmp_path)
  summary = bon_stage.run_bon(config, workdir)
  table = {int(n): v for n, v in summary["table"].items()}
  assert sorted(table) == [1, 2, 4] and summary["samples_per_prompt"] == 5
  rewards = [table[n]["reward"] for n in (1, 2, 4)]
  assert rewards == sorted(rewards)  # prefixes of one draw: the best of more samples is never worse
  assert table[1]["kl_estimate"] == 0.0
  for n, row in table.items():
    assert 0.0 <= row["kl_estimate"] <= row["kl_bound"] + 1e-6
    assert row["kl_bound"] == pytest.approx(np.log(n) - (n - 1) / n)
    for key in ("true_score", "success_rate", "win_rate"):
      assert 0.0 <= row[key] <= 1.0, key
  with open(os.path.join(workdir, "bon", "samples.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  r = np.asarray([row["rewards"] for row in rows], np.float32)
  assert r.shape == (8, 5)
  assert table[1]["reward"] == pytest.approx(float(r[:, 0].mean()), abs=1e-6)  # best-of-1 = the first sample
  assert table[4]["reward"] == pytest.approx(float(r[:, :4].max(1).mean()), abs=1e-6)
  assert table[2]["win_rate"] == pytest.approx(float(bon.win_rate(r[:, :2].max(1), r[:, 4])), abs=1e-6)
  assert os.path.getsize(os.path.join(workdir, "bon", "bon.png")) > 0
  assert bon_stage.run_bon(config, workdir)["reused"]


def test_rs_rounds_select_finetune_and_report(base_run, tmp_path):
  config, workdir = _fresh(base_run, tmp_path)
  config.rs.reward_source = "task"
  summary = rs.run_rs(config, workdir)
  out = os.path.join(workdir, "rs")
  rows = read_metrics(os.path.join(out, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [0, 1, 2]
  for r in rows[1:]:
    assert r["rs/kept"] <= 8 and r["rs/kept_prompts"] == 1.0  # best-of-n keeps one per prompt (duplicates merged)
    assert r["true/kept_score"] >= r["true/score"] - 1e-6  # the best by grade is at least the mean grade
    assert r["rs/reward_best"] >= r["rs/reward"] and "eval/greedy_success" in r and "sft/loss" in r
  with open(os.path.join(out, "round_1.jsonl")) as f:
    pairs = [json.loads(line) for line in f]
  assert len(pairs) == rows[1]["rs/kept"] and all(p["reward"] == p["grade"] for p in pairs)
  for key in ("initial_success_rate", "final_success_rate", "initial_greedy", "final_greedy"):
    assert 0.0 <= summary[key] <= 1.0, key
  assert os.path.getsize(os.path.join(out, "rs.png")) > 0
  assert sorted(os.listdir(os.path.join(out, "ckpt")))[-1] == "2"
  assert common.has_params(rs.final_params_dir(workdir))
  np.testing.assert_array_equal(rs.select(np.asarray([[0.2, 0.9, 0.9], [1.0, 0.0, 1.0]]), selection="threshold",
                                          threshold=0.5), [[0, 1, 1], [1, 0, 1]])
  np.testing.assert_array_equal(rs.select(np.asarray([[0.2, 0.9, 0.9], [0.1, 0.0, 0.1]]), selection="best_of_n",
                                          threshold=0.5), [[0, 1, 0], [0, 0, 0]])


class _Crash(Exception):
  pass


def test_bond_trains_and_reports(base_run, tmp_path):
  config, straight = _fresh(base_run, tmp_path)
  summary = bond.run_bond(config, straight)
  out = os.path.join(straight, "bond")
  rows = read_metrics(os.path.join(out, "metrics.jsonl"))
  it_rows = [r for r in rows if "bond/loss" in r]
  assert [r["step"] for r in it_rows] == [1, 2, 3] and "eval/success_rate" in rows[0]
  for key in ("reward/policy", "reward/anchor", "reward/reference", "true/score", "true/success_rate", "kl/ref",
              "kl/ref_k3", "kl/anchor", "quantile/policy_vs_ref", "quantile/log_policy_vs_ref", "effective_n/policy",
              "effective_n/anchor", "policy/entropy", "bond/fw_nll", "bond/bw_loss", "time/rollout"):
    assert key in it_rows[-1], key
  # Iteration 1 samples the SFT policy itself: zero KL to the reference and the anchor (sampler log-probs equal
  # the forward's to ~1e-5 per token); afterwards the policy has moved.
  assert abs(it_rows[0]["kl/ref"]) < 1e-3 and abs(it_rows[0]["kl/anchor"]) < 1e-3
  assert it_rows[-1]["kl/ref_k3"] > 0 and [r["anchor/updates"] for r in it_rows] == [1, 2, 3]
  assert it_rows[0]["reward/policy"] == pytest.approx(it_rows[0]["true/score"], abs=1e-6)  # reward_source "task"
  for key in ("initial_success_rate", "final_success_rate", "initial_greedy", "final_greedy"):
    assert 0.0 <= summary[key] <= 1.0, key
  assert summary["variant"] == "jbond" and summary["anchor_updates"] == 3
  assert os.path.getsize(os.path.join(out, "bond.png")) > 0
  assert sorted(os.listdir(os.path.join(out, "ckpt"))) == ["1", "2", "3"]
  assert bond.run_bond(config, straight)["reused"]


@pytest.mark.slow
def test_bond_resumes_bitwise(base_run, tmp_path, monkeypatch):
  """A BOND run killed in iteration 3 and rerun with the same command equals the uninterrupted run."""
  config, straight = _fresh(base_run, tmp_path)
  crashed = str(tmp_path / "crashed")
  for s in ("sft", "rm", "data"):
    shutil.copytree(os.path.join(straight, s), os.path.join(crashed, s))
  bond.run_bond(config, straight)
  real_update, calls = common.to_host, []

  def crash_on_third(*args, **kwargs):  # to_host runs once per iteration, after the step
    calls.append(1)
    if len(calls) == 3:
      raise _Crash()
    return real_update(*args, **kwargs)

  monkeypatch.setattr(common, "to_host", crash_on_third)
  with pytest.raises(_Crash):
    bond.run_bond(config, crashed)
  monkeypatch.setattr(common, "to_host", real_update)
  bond.run_bond(config, crashed)
  cfg = common.model_config(config)
  mesh = common.make_mesh(config)
  load = lambda w: common.load_params(bond.final_params_dir(w), models.abstract_params(cfg),
                                      common.param_shardings(cfg, mesh))[0]
  for a, b in zip(jax.tree.leaves(load(straight)), jax.tree.leaves(load(crashed))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [r["step"] for r in read_metrics(os.path.join(crashed, "bond", "metrics.jsonl")) if "bond/loss" in r] == \
      [1, 2, 3]
