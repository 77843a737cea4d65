"""The Advantage-Model stage and RL with the AM + Selective Rehearsal, end to end on a tiny two-task mixture; and
the PPO step's rehearsal term (coefficient 0 is bitwise the plain step; > 0 trains the selected expert rows only).
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs.base import get_base_config
from tiny_configs import tiny_config
from rlhf_jax import losses, models
from rlhf_jax.config import ConfigError, validate_config
from rlhf_jax.models import ModelConfig
from rlhf_jax.pipelines import am, common, ppo, sft
from rlhf_jax.state import create_train_state
from rlhf_jax.steps import PPOState, make_ppo_step, rehearsal_nll
from rlhf_jax.tasks.registry import make_task
from rlhf_jax.utils import read_metrics


def small_config():
  c = tiny_config()
  c.task.name = "mixture"
  c.task.mixture_tasks = ("synthetic:reverse", "synthetic:double")
  c.task.mixture_weights = (1.0, 1.0)
  c.task.synthetic_max_len = 4
  c.task.num_train = 200
  c.task.num_eval = 20
  c.task.max_response_len = 10
  c.rm.steps = 8
  c.algo.advantage = "gae"
  c.algo.strategy = "none"
  c.algo.minibatches = 2
  c.ppo.reward_source = "am"
  c.ppo.iterations = 2
  c.ppo.prompts_per_iteration = 8
  c.ppo.samples_per_prompt = 2
  c.ppo.rollout_batch = 8
  c.ppo.eval_every = 2
  c.ppo.eval_prompts = 8
  c.ppo.eval_samples = 2
  c.ppo.checkpoint_every = 1
  c.sr.coef = 0.5
  c.sr.clusters = 2
  c.sr.per_cluster = 2
  c.sr.expert_eval = True
  c.logging.every_steps = 4
  c.stages = ("sft", "am", "ppo")
  validate_config(c, get_base_config(), device_count=jax.device_count())
  return c


@pytest.fixture(scope="module")
def am_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("am"))
  config = small_config()
  sft.run_sft(config, workdir)
  am_summary = am.run_am(config, workdir)
  ppo_summary = ppo.run_ppo(config, workdir)
  return config, workdir, am_summary, ppo_summary


def test_mixture_task_from_config_tags_records(tmp_path):
  task = make_task(small_config(), str(tmp_path))
  recs = task.load("train")
  assert task.task_names == ["synthetic:reverse", "synthetic:double"]
  assert {r["task_id"] for r in recs} == {0, 1}
  for r in recs[:20]:  # each record is its own member's: the prompt names the transform
    assert r["prompt"].startswith(("reverse: ", "double: ")[r["task_id"]])
  # Each member grades its own records: the reference responses score 1, a wrong one less.
  assert np.all(task.grade(recs[:10], [r["response"] for r in recs[:10]]) == 1.0)
  assert np.all(task.grade(recs[:10], ["zzzz"] * 10) < 1.0)


def test_bad_mixture_and_rehearsal_configs_name_the_field():
  c = small_config()
  c.task.mixture_tasks = ("synthetic:reverse", "synthetic:nope")
  with pytest.raises(ConfigError) as e:
    validate_config(c, get_base_config())
  assert e.value.field == "config.task.mixture_tasks[1]"
  c = small_config()
  c.task.mixture_weights = (1.0,)
  with pytest.raises(ConfigError) as e:
    validate_config(c, get_base_config())
  assert e.value.field == "config.task.mixture_weights"
  c = small_config()
  c.ppo.reward_source = "rm"  # rehearsal picks examples by AM score
  with pytest.raises(ConfigError) as e:
    validate_config(c, get_base_config())
  assert e.value.field == "config.sr.coef"
  c = small_config()
  c.sr.clusters = 9  # more than the 8 prompts of an iteration
  with pytest.raises(ConfigError) as e:
    validate_config(c, get_base_config())
  assert e.value.field == "config.sr.clusters"


@pytest.mark.slow  # sft + am + ppo with their compilations: ~4 min on the shared 2-core machine
def test_am_stage_trains_both_models_and_reports_per_task(am_run):
  config, workdir, summary, _ = am_run
  out = os.path.join(workdir, "am")
  for f in ("metrics.jsonl", "am.png", "scores.png", "summary.json", "provenance.json"):
    assert os.path.getsize(os.path.join(out, f)) > 0, f
  assert common.has_params(am.final_params_dir(workdir)) and common.has_params(am.rm_params_dir(workdir))
  assert summary["task_names"] == ["synthetic:reverse", "synthetic:double"]
  for name in ("rm", "am"):
    assert 0.0 <= summary[f"eval/{name}_accuracy"] <= 1.0 and 0.0 <= summary[f"eval/{name}_ece"] <= 0.5
    st = summary["scores"][name]
    assert st["reward_std"] > 0 and set(st["per_task"]) <= set(summary["task_names"]) and st["per_task"]
    for t in st["per_task"].values():
      assert t["std"] >= 0 and np.isfinite(t["mean"]) and t["samples"] % config.rm.samples_per_prompt == 0
  rows = read_metrics(os.path.join(out, "metrics.jsonl"))
  train_rows = [r for r in rows if "rm/loss" in r]
  # Both heads start at zero: both BT losses start at exactly log 2 and fall on the same batches.
  assert train_rows[-1]["rm/loss"] < np.log(2.0) and train_rows[-1]["am/rank_loss"] < np.log(2.0)
  assert all(f"am/task{t}/running_mean" in train_rows[-1] for t in range(2))
  # The saved AM is what PPO loads, with the normalisation it needs.
  _, meta = am.load_advantage_model(config, workdir, common.make_mesh(config))
  assert meta["task_names"] == summary["task_names"] and meta["reward_std"] > 0
  assert am.run_am(config, workdir)["reused"]  # a finished stage is reused


@pytest.mark.slow  # sft + am + ppo with their compilations: ~4 min on the shared 2-core machine
def test_rl_with_am_and_rehearsal_writes_per_task_and_forgetting_metrics(am_run):
  config, workdir, _, summary = am_run
  out = os.path.join(workdir, "ppo")
  for f in ("ppo.png", "ppo_tasks.png", "summary.json", "metrics.jsonl"):
    assert os.path.getsize(os.path.join(out, f)) > 0, f
  assert common.has_params(ppo.final_params_dir(workdir)) and os.path.isdir(os.path.join(out, "ckpt"))
  rows = read_metrics(os.path.join(out, "metrics.jsonl"))
  it_rows = [r for r in rows if "kl/ref" in r]
  assert [r["step"] for r in it_rows] == [1, 2]
  for r in it_rows:
    # The PPO/rehearsal split: all 8 prompts go to PPO, at most clusters × per_cluster are rehearsed.
    assert r["rehearsal/ppo_prompts"] == 8 and 1 <= r["rehearsal/selected"] <= 4
    assert r["rehearsal/selected"] == sum(r[f"rehearsal/selected/task{t}"] for t in range(2))
    assert r["rehearsal/nll"] > 0 and r["rehearsal/examples"] == r["rehearsal/selected"]
    assert any(f"true/score/task{t}" in r for t in range(2))
  evals = [r for r in rows if "expert/nll" in r]
  assert [r["step"] for r in evals] == [0, 2]  # before the first iteration and at every evaluation
  assert all(f"expert/nll/task{t}" in evals[0] and f"expert/greedy_score/task{t}" in evals[0] for t in range(2))
  assert summary["reward_source"] == "am" and summary["rehearsal_coef"] == 0.5
  assert set(summary["expert_nll_drift"]) >= {"expert/nll", "expert/nll/task0", "expert/nll/task1"}
  with open(os.path.join(out, "provenance.json")) as f:
    assert json.load(f)["settings"]["sr.coef"] == 0.5  # the rehearsal settings decide this stage


# --- the step: the rehearsal term -----------------------------------------------------------------------------
CFG = ModelConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64, max_seq_len=16)
PLEN, G = 4, 3


def step_inputs(seed=0):
  rng = np.random.default_rng(seed)
  b = 8
  tokens = jnp.asarray(rng.integers(3, CFG.vocab_size, (b, PLEN + G)), jnp.int32)
  mask = jnp.ones((b, PLEN + G), jnp.int32)
  batch = {"tokens": tokens, "mask": mask, "completion_mask": jnp.ones((b, G), jnp.float32),
           "old_logprobs": jnp.asarray(rng.normal(-3, 0.1, (b, G)), jnp.float32),
           "ref_logprobs": jnp.asarray(rng.normal(-3, 0.1, (b, G)), jnp.float32),
           "scores": jnp.asarray(rng.normal(size=b), jnp.float32),
           "advantages": jnp.asarray(rng.normal(size=b), jnp.float32), "weights": jnp.ones(b, jnp.float32)}
  r = 6
  rtok = jnp.asarray(rng.integers(3, CFG.vocab_size, (r, PLEN + G)), jnp.int32)
  loss_mask = jnp.concatenate([jnp.zeros((r, PLEN), jnp.int32), jnp.ones((r, G), jnp.int32)], 1)
  rehearsal = {"tokens": rtok, "mask": jnp.ones_like(rtok), "loss_mask": loss_mask,
               "weights": jnp.asarray([1, 0, 1, 0, 0, 1], jnp.float32)}
  return batch, rehearsal


def make_state(tx):
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  return PPOState(actor=create_train_state(params, tx, jax.random.PRNGKey(1)), critic=None,
                  kl=losses.init_kl_controller(0.05))


def test_rehearsal_coef_zero_is_bitwise_the_plain_step():
  tx = optax.adam(1e-2)
  apply_fn = models.make_apply_fn(CFG)
  kw = dict(prompt_len=PLEN, advantage="grpo", minibatches=2, epochs=2, kl_estimator="k3")
  plain = jax.jit(make_ppo_step(apply_fn, tx, **kw))
  off = jax.jit(make_ppo_step(apply_fn, tx, rehearsal_coef=0.0, **kw))
  batch, rehearsal = step_inputs()
  s_plain, m_plain = plain(make_state(tx), batch)
  s_off, m_off = off(make_state(tx), {**batch, "rehearsal": rehearsal})  # carried, and ignored
  assert set(m_plain) == set(m_off)
  for a, b in zip(jax.tree.leaves((s_plain, m_plain)), jax.tree.leaves((s_off, m_off))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rehearsal_term_trains_the_selected_expert_rows_in_every_minibatch():
  tx = optax.sgd(0.5)
  apply_fn = models.make_apply_fn(CFG)
  batch, rehearsal = step_inputs()
  # Zero advantages and no KL: the PPO loss has no gradient, so only the rehearsal NLL moves the policy.
  batch = {**batch, "advantages": jnp.zeros_like(batch["advantages"])}
  kw = dict(prompt_len=PLEN, advantage="grpo", minibatches=2, epochs=1, kl_estimator="k3")
  state = make_state(tx)
  state = state.replace(kl=losses.init_kl_controller(0.0))
  step = jax.jit(make_ppo_step(apply_fn, tx, rehearsal_coef=1.0, **kw))
  nll = jax.jit(functools.partial(rehearsal_nll, apply_fn))
  before = float(nll(state.actor.params, rehearsal)[0])
  new_state, metrics = step(state, {**batch, "rehearsal": rehearsal})
  after = float(nll(new_state.actor.params, rehearsal)[0])
  assert after < before - 1e-3
  # Reported: the selected rows only, averaged over the 2 minibatches (the first one sees the initial policy).
  assert metrics["rehearsal/examples"] == 3 and after < float(metrics["rehearsal/nll"]) <= before + 1e-5
  # With every example masked out, the rehearsal term is 0 and so is its gradient: the policy does not move.
  none = {**rehearsal, "weights": jnp.zeros(6, jnp.float32)}
  still, m = step(state, {**batch, "rehearsal": none})
  assert float(m["rehearsal/nll"]) == 0.0
  for a, b in zip(jax.tree.leaves(still.actor.params), jax.tree.leaves(state.actor.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
  with pytest.raises(ValueError, match="rehearsal"):
    step(state, batch)
