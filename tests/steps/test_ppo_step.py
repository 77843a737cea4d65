"""The jitted PPO update (rlhf_jax.steps.ppo) on categorical bandits.

The policy is a bare logit vector behind the same `apply_fn` interface the
Transformer has, so these tests run the real step — KL-shaped rewards, GAE,
whitening, epochs × minibatches scans, the optimizer — on problems with a
known answer.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import losses, selection
from rlhf_jax.state import create_train_state
from rlhf_jax.steps import PPOState, make_ppo_step, make_prepare_fn, select_rows

K = 6  # actions = tokens of a one-token completion; slot 0 is the prompt


def bandit_apply(params, tokens, mask=None, **_):
  del mask
  return jnp.broadcast_to(params["logits"], (*tokens.shape, K)), None


def baseline_apply(params, tokens, mask=None, **_):
  del mask
  return jnp.broadcast_to(params["v"], tokens.shape), None


def make_state(logits, tx_actor, tx_critic, kl_coef):
  actor = create_train_state({"logits": jnp.asarray(logits, jnp.float32)}, tx_actor, jax.random.PRNGKey(0))
  critic = create_train_state({"v": jnp.zeros((), jnp.float32)}, tx_critic, jax.random.PRNGKey(1))
  return PPOState(actor=actor, critic=critic, kl=losses.init_kl_controller(kl_coef))


def exact_batch(state, ref_logits, r):
  """Every action once, weighted by π(a): the weighted loss is the exact expectation."""
  pi = jax.nn.softmax(state.actor.params["logits"])
  acts = jnp.arange(K)
  return {
      "tokens": jnp.stack([jnp.zeros(K, jnp.int32), acts], 1),
      "mask": jnp.ones((K, 2), jnp.int32),
      "completion_mask": jnp.ones((K, 1), jnp.float32),
      "old_logprobs": jnp.log(pi)[:, None],
      "ref_logprobs": jax.nn.log_softmax(ref_logits)[:, None],
      "old_values": jnp.zeros((K, 1)),
      "scores": r,
      "weights": pi,
  }


def test_ppo_fixed_point_is_the_kl_regularised_optimum():
  rng = np.random.default_rng(0)
  ref_logits = jnp.asarray(rng.normal(size=K), jnp.float32)
  r = jnp.asarray(rng.normal(size=K), jnp.float32)
  beta = 0.5
  step = jax.jit(make_ppo_step(bandit_apply, optax.adam(0.03), critic_apply=baseline_apply, critic_tx=optax.adam(0.03),
                               prompt_len=1,
                               clip_eps=0.2, value_clip_eps=None, gamma=1.0, lam=1.0, epochs=2, minibatches=1,
                               reward_clip=None))
  state = make_state(ref_logits, optax.adam(0.03), optax.adam(0.03), beta)
  for _ in range(600):
    state, metrics = step(state, exact_batch(state, ref_logits, r))
  pi = jax.nn.softmax(state.actor.params["logits"])
  target = jax.nn.softmax(ref_logits + r / beta)  # π_ref·exp(r/β)/Z
  tv = 0.5 * float(jnp.abs(pi - target).sum())
  assert tv < 0.01, (pi, target)
  assert np.isfinite(metrics["policy/loss"])


def test_filtered_ppo_learns_with_a_perfect_reward():
  """best_random on N = 4 samples per prompt, rows compacted by select_rows, sampled rollouts."""
  r = jnp.asarray([0.0, 0.2, 0.1, 1.0, 0.3, 0.05])
  p_count, n = 32, 4
  tx = optax.adam(0.05)
  step = jax.jit(make_ppo_step(bandit_apply, tx, critic_apply=baseline_apply, critic_tx=tx, prompt_len=1, clip_eps=0.2, gamma=1.0,
                               lam=1.0, epochs=1, minibatches=2))
  state = make_state(jnp.zeros(K), tx, tx, 0.001)

  @jax.jit
  def rollout(state, key):
    k1, k2 = jax.random.split(key)
    logits = state.actor.params["logits"]
    acts = jax.random.categorical(k1, logits, shape=(p_count * n,))
    batch = {"tokens": jnp.stack([jnp.zeros_like(acts), acts], 1), "mask": jnp.ones((p_count * n, 2), jnp.int32),
             "completion_mask": jnp.ones((p_count * n, 1)),
             "old_logprobs": jax.nn.log_softmax(logits)[acts][:, None],
             "ref_logprobs": jnp.full((p_count * n, 1), -np.log(K)), "old_values": jnp.zeros((p_count * n, 1)),
             "scores": r[acts]}
    w = selection.filtration_weights(r[acts].reshape(p_count, n), strategy="best_random", key=k2)
    return select_rows(batch, w, keep=2)

  for i in range(150):
    batch = rollout(state, jax.random.PRNGKey(i))
    assert batch["tokens"].shape[0] == p_count * 2
    state, _ = step(state, batch)
  pi = jax.nn.softmax(state.actor.params["logits"])
  assert float(pi[3]) > 0.9, pi


def test_select_rows_gathers_exactly_the_kept_samples():
  rewards = jnp.asarray([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
  batch = {"id": jnp.arange(6)}
  w = selection.filtration_weights(rewards, strategy="best_worst")
  out = select_rows(batch, w, keep=2)
  assert sorted(np.asarray(out["id"][:2]).tolist()) == [0, 1]
  assert sorted(np.asarray(out["id"][2:]).tolist()) == [3, 4]
  np.testing.assert_array_equal(out["weights"], 1.0)
  full = select_rows(batch, w, keep=None)
  np.testing.assert_array_equal(full["weights"], np.asarray(w).reshape(-1))


def test_zero_weight_rows_do_not_move_the_policy():
  tx = optax.sgd(0.1)
  step = jax.jit(make_ppo_step(bandit_apply, tx, critic_apply=baseline_apply, critic_tx=tx, prompt_len=1, clip_eps=0.2))
  state = make_state(jnp.zeros(K), tx, tx, 0.0)
  batch = exact_batch(state, jnp.zeros(K), jnp.arange(K, dtype=jnp.float32))
  batch["weights"] = jnp.zeros(K).at[2].set(1.0)
  new, _ = step(state, batch)
  # Only row 2 is trained on; with one sample the whitened advantage is 0 → no policy change.
  np.testing.assert_allclose(new.actor.params["logits"], state.actor.params["logits"], atol=1e-6)


def test_update_compiles_once_for_new_content():
  tx = optax.adam(1e-2)
  step = jax.jit(chex.assert_max_traces(make_ppo_step(bandit_apply, tx, critic_apply=baseline_apply, critic_tx=tx, prompt_len=1,
                                                      clip_eps=0.2, kl_target=1.0, kl_horizon=100.0), n=1))
  state = make_state(jnp.zeros(K), tx, tx, 0.1)
  for i in range(3):
    state, m = step(state, exact_batch(state, jnp.zeros(K), jnp.asarray(np.random.default_rng(i).normal(size=K),
                                                                          jnp.float32)))
  assert float(m["kl/coef"]) != 0.1  # the adaptive controller moved


def test_indivisible_minibatches_are_rejected():
  tx = optax.sgd(0.1)
  step = make_ppo_step(bandit_apply, tx, critic_apply=baseline_apply, critic_tx=tx, prompt_len=1, clip_eps=0.2, minibatches=4)
  state = make_state(jnp.zeros(K), tx, tx, 0.0)
  with pytest.raises(ValueError, match="minibatches"):
    step(state, exact_batch(state, jnp.zeros(K), jnp.zeros(K)))


def test_grpo_needs_no_critic_and_learns_with_filtration():
  """Critic-free group advantages (over all N samples) composed with best_random filtration and compaction."""
  r = jnp.asarray([0.0, 0.2, 0.1, 1.0, 0.3, 0.05])
  p_count, n = 32, 4
  tx = optax.adam(0.05)
  step = jax.jit(make_ppo_step(bandit_apply, tx, advantage="grpo", prompt_len=1, clip_eps=0.2, epochs=1,
                               minibatches=2, kl_estimator="k3"))
  prepare = jax.jit(make_prepare_fn(advantage="grpo", strategy="best_random", n=n))
  actor = create_train_state({"logits": jnp.zeros(K)}, tx, jax.random.PRNGKey(0))
  state = PPOState(actor=actor, critic=None, kl=losses.init_kl_controller(0.001))
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(actor)) + 1  # actor + KL coefficient, nothing else

  @jax.jit
  def rollout(state, key):
    logits = state.actor.params["logits"]
    acts = jax.random.categorical(key, logits, shape=(p_count * n,))
    return {"tokens": jnp.stack([jnp.zeros_like(acts), acts], 1), "mask": jnp.ones((p_count * n, 2), jnp.int32),
            "completion_mask": jnp.ones((p_count * n, 1)), "old_logprobs": jax.nn.log_softmax(logits)[acts][:, None],
            "ref_logprobs": jnp.full((p_count * n, 1), -np.log(K))}, r[acts].reshape(p_count, n)

  for i in range(120):
    batch, scores = rollout(state, jax.random.PRNGKey(i))
    batch, _ = prepare(batch, scores, jax.random.PRNGKey(10_000 + i))
    assert batch["tokens"].shape[0] == p_count * 2 and "advantages" in batch
    state, m = step(state, batch)
  assert state.critic is None and "value/loss" not in m
  pi = jax.nn.softmax(state.actor.params["logits"])
  assert float(pi[3]) > 0.9, pi


@pytest.mark.parametrize("kind", ["grpo", "rloo", "reinforce"])
def test_group_advantages_are_computed_over_the_whole_group_before_filtration(kind):
  scores = jnp.asarray([[1.0, 0.0, 0.5, 0.25], [0.2, 0.2, 0.9, 0.1]])
  batch = {"id": jnp.arange(8)}
  out, w = make_prepare_fn(advantage=kind, strategy="best_worst", n=4)(batch, scores, jax.random.PRNGKey(0))
  full = np.asarray(losses.group_advantages(scores, kind=kind)).reshape(-1)
  np.testing.assert_allclose(np.asarray(out["advantages"]), full[np.asarray(out["id"])], rtol=1e-6)
  assert out["id"].shape == (4,)  # best + worst of each prompt


def test_fractional_weights_equal_duplicated_rows():
  """A row of weight 2 trains exactly like the same row twice (whitening statistics included)."""
  tx = optax.sgd(0.1)
  step = jax.jit(make_ppo_step(bandit_apply, tx, critic_apply=baseline_apply, critic_tx=tx, prompt_len=1,
                               clip_eps=0.2, loss_agg="token_mean", value_clip_eps=None, reward_clip=None))
  state = make_state(jnp.asarray([0.1, -0.2, 0.3, 0.0, 0.5, -0.1]), tx, tx, 0.05)
  base = exact_batch(state, jnp.zeros(K), jnp.asarray([0.3, -1.0, 0.5, 2.0, 0.1, -0.4]))
  rows = jnp.asarray([0, 1, 3, 4])
  weighted = jax.tree.map(lambda x: x[rows], base)
  weighted["weights"] = jnp.asarray([2.0, 1.0, 1.0, 0.5])
  dup_rows = jnp.asarray([0, 0, 1, 3, 4])
  dup = jax.tree.map(lambda x: x[dup_rows], base)
  dup["weights"] = jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.5])
  new_w, _ = step(state, weighted)
  new_d, _ = step(state, dup)
  np.testing.assert_allclose(new_w.actor.params["logits"], new_d.actor.params["logits"], atol=1e-6)
  np.testing.assert_allclose(new_w.critic.params["v"], new_d.critic.params["v"], atol=1e-6)


def test_gae_requires_a_critic_and_unknown_advantages_are_rejected():
  tx = optax.sgd(0.1)
  with pytest.raises(ValueError, match="critic"):
    make_ppo_step(bandit_apply, tx, prompt_len=1)
  with pytest.raises(ValueError, match="advantage"):
    make_ppo_step(bandit_apply, tx, prompt_len=1, advantage="vtrace")


def test_chunked_log_probs_give_the_same_update():
  """`logprob_chunk` (no [B, G, V] logits) changes nothing in the update: same log-probs, same gradients."""
  from rlhf_jax import models  # pylint: disable=import-outside-toplevel
  from rlhf_jax.sampling import Sampler, SamplingParams  # pylint: disable=import-outside-toplevel
  from rlhf_jax.tokenizer import ByteTokenizer, encode_prompts  # pylint: disable=import-outside-toplevel
  tok = ByteTokenizer()
  cfg = models.get_model_config("tiny", n_layers=2, dim=64, mlp_dim=128)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  apply_fn = models.make_apply_fn(cfg)
  pt, pm = encode_prompts(tok, ["abc", "de"], 8)
  out = Sampler(cfg, SamplingParams(max_new_tokens=6, temperature=0.8, num_samples=2), eos_id=tok.eos_id,
                pad_id=tok.pad_id)(params, pt, pm, jax.random.PRNGKey(1))
  batch = {"tokens": out.tokens, "mask": out.mask, "completion_mask": out.completion_mask,
           "old_logprobs": out.completion_logprobs, "ref_logprobs": out.completion_logprobs - 0.1,
           "advantages": jnp.asarray([1.0, -1.0, 0.5, -0.5]), "weights": jnp.ones(4), "scores": jnp.zeros(4)}
  tx = optax.sgd(1.0)  # params move by exactly the gradient (Adam would amplify float32 summation-order noise)
  results = []
  for chunk in (None, 3):
    state = PPOState(actor=create_train_state(params, tx, jax.random.PRNGKey(0)), critic=None,
                     kl=losses.init_kl_controller(0.1))
    step = jax.jit(make_ppo_step(apply_fn, tx, prompt_len=8, advantage="grpo", temperature=0.8, kl_estimator="k3",
                                 logprob_chunk=chunk))
    results.append(step(state, batch))
  (a, ma), (b, mb) = results
  for x, y in zip(jax.tree.leaves(a.actor.params), jax.tree.leaves(b.actor.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6)
  for key in ("policy/loss", "policy/entropy", "policy/kl_loss", "policy/ratio_mean"):
    np.testing.assert_allclose(float(ma[key]), float(mb[key]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("coef", [0.0, 0.3])
def test_entropy_bonus_gradient_is_the_entropy_gradient(coef):
  """With zero advantages and no KL the only gradient is −coef·∇H(π); without a bonus the entropy is a
  metric only (no backward through it) and the policy does not move."""
  logits = jnp.asarray([0.5, -1.0, 2.0, 0.0, 0.3, -0.2], jnp.float32)
  lr = 0.1
  step = jax.jit(make_ppo_step(bandit_apply, optax.sgd(lr), prompt_len=1, advantage="grpo", epochs=1,
                               minibatches=1, entropy_coef=coef, kl_in_reward=False))
  actor = create_train_state({"logits": logits}, optax.sgd(lr), jax.random.PRNGKey(0))
  state = PPOState(actor=actor, critic=None, kl=losses.init_kl_controller(0.0))
  lp = jax.nn.log_softmax(logits)
  batch = {"tokens": jnp.stack([jnp.zeros(K, jnp.int32), jnp.arange(K)], 1), "mask": jnp.ones((K, 2), jnp.int32),
           "completion_mask": jnp.ones((K, 1), jnp.float32), "old_logprobs": lp[:, None], "ref_logprobs": lp[:, None],
           "scores": jnp.zeros(K), "advantages": jnp.zeros(K), "weights": jnp.ones(K)}
  new, metrics = step(state, batch)
  entropy = lambda x: -jnp.sum(jax.nn.softmax(x) * jax.nn.log_softmax(x))  # noqa: E731
  np.testing.assert_allclose(metrics["policy/entropy"], entropy(logits), rtol=1e-5)
  want = logits + lr * coef * jax.grad(entropy)(logits)
  np.testing.assert_allclose(new.actor.params["logits"], want, rtol=1e-5, atol=1e-7)
