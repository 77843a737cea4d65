"""The jitted BOND / J-BOND update (rlhf_jax.steps.bond) on categorical bandits with exact expectations.

The policy and the anchor are free logit tables behind the Transformer's `apply_fn` interface, so
π_θ is a softmax that the tests read exactly. "Exact" batches enumerate every outcome (y, y'_1..y'_k)
once and weight it by its probability π_θ(y)·Π π_anchor(y'_i); the step's weighted means are then
the exact expected losses, and their gradients the exact expected gradients.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import losses, selection
from rlhf_jax.state import create_train_state
from rlhf_jax.steps.bond import BATCH_KEYS, BONDState, create_bond_state, make_bond_step, weighted_loo_baseline

K = 8  # one-token responses; slot 0 is the prompt


def bandit_apply(params, tokens, mask=None, **_):
  del mask
  return jnp.broadcast_to(params["logits"], (*tokens.shape, params["logits"].shape[-1])), None


def bigram_apply(params, tokens, mask=None, **_):
  """Logits of the next token = table[current token]: multi-token responses with exact log-probs."""
  del mask
  return params["table"][tokens], None


def problem(seed, k_out=K):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=k_out), jnp.float32)
  r = jnp.asarray(rng.permutation(k_out), jnp.float32) + 0.1 * jnp.asarray(rng.normal(size=k_out), jnp.float32)
  return logits, r


def p_le_of(pi, r):
  return jnp.sum(jnp.where(r[None, :] <= r[:, None], pi[None, :], 0.0), axis=1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def enumerated_batch(state, r, k, k_out=K):
  """All K^(1+k) outcomes (y, y'_1..y'_k), weighted by π_θ(y)·Π π_anchor(y'_i)."""
  combos = np.array(list(itertools.product(range(k_out), repeat=1 + k)), np.int32)
  y, a = jnp.asarray(combos[:, 0]), jnp.asarray(combos[:, 1:])
  rows = combos.shape[0]
  pi = jax.nn.softmax(state.policy.params["logits"])
  pa = jax.nn.softmax(state.anchor_params["logits"])
  zeros = jnp.zeros((rows,), jnp.int32)
  return {
      "tokens": jnp.stack([zeros, y], 1),
      "mask": jnp.ones((rows, 2), jnp.int32),
      "completion_mask": jnp.ones((rows, 1), jnp.float32),
      "rewards": r[y],
      "anchor_tokens": jnp.stack([jnp.zeros_like(a), a], -1),
      "anchor_mask": jnp.ones((rows, k, 2), jnp.int32),
      "anchor_completion_mask": jnp.ones((rows, k, 1), jnp.float32),
      "anchor_rewards": r[a],
      "weights": pi[y] * jnp.prod(pa[a], axis=1),
  }


def run_exact(step, state, r, k, steps):
  """`steps` exact-expectation updates in one jitted scan (the batch is rebuilt from each state)."""

  @jax.jit
  def go(state):
    def body(s, _):
      s, m = step(s, enumerated_batch(s, r, k))
      return s, m
    return jax.lax.scan(body, state, None, length=steps)

  return go(state)


# One compiled lr-0 step (4 outcomes, 64 enumerated rows) shared by the metric, EMA and tie tests.
ETA = 0.1
LR0_STEP = jax.jit(make_bond_step(bandit_apply, optax.sgd(0.0), prompt_len=1, eta=ETA, baseline="none"))


def bandit_state(logits, tx, anchor_logits=None):
  policy = create_train_state({"logits": jnp.asarray(logits, jnp.float32)}, tx, jax.random.PRNGKey(0))
  anchor = None if anchor_logits is None else {"logits": jnp.asarray(anchor_logits, jnp.float32)}
  return create_bond_state(policy, anchor)


def tv(p, q):
  return 0.5 * float(jnp.sum(jnp.abs(p - q)))


def fixed_point_of(bo_n, target, beta, start_logits):
  """argmin_π (1 − β)·KL(bo_n‖π) + β·KL(π‖target) by plain gradient descent on the closed form."""

  def obj(l):
    lp = jax.nn.log_softmax(l)
    return (1 - beta) * -jnp.sum(bo_n * lp) + beta * jnp.sum(jnp.exp(lp) * (lp - jnp.log(target)))

  @jax.jit
  def solve(l):
    return jax.lax.fori_loop(0, 4000, lambda _, l: l - 1.0 * jax.grad(obj)(l), l)

  return jax.nn.softmax(solve(start_logits))


# ----------------------------------------------------------------------------------------------
# Fixed points with a frozen anchor (η = 0), exact expectations
# ----------------------------------------------------------------------------------------------


def test_jbond_forward_term_fixed_point_is_best_of_2_of_the_anchor():
  logits, r = problem(0)
  step = make_bond_step(bandit_apply, optax.sgd(1.0), prompt_len=1, variant="jbond", beta=0.0, eta=0.0,
                        baseline="none")
  state, _ = run_exact(step, bandit_state(logits, optax.sgd(1.0)), r, 2, 1500)
  bo2 = losses.bon_distribution(jax.nn.softmax(logits), r, n=2)
  assert tv(jax.nn.softmax(state.policy.params["logits"]), bo2) < 1e-3
  np.testing.assert_array_equal(state.anchor_params["logits"], logits)  # η = 0: frozen


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_jbond_fixed_point_matches_its_closed_form_target(beta):
  """β = 1: π_anchor·16^(−(1−p_≤)²)/Z (E[r_J] = −log16·(1−p_≤)²); β = 0.5: the Jeffreys mix with Bo-2.

  The crude reward is exact only at the anchor median, so neither equals Bo-2: the distance to
  Bo-2 is the crude reward's bias, not optimisation error, and shrinks as β → 0.
  """
  logits, r = problem(0)
  pa = jax.nn.softmax(logits)
  step = make_bond_step(bandit_apply, optax.sgd(1.0), prompt_len=1, variant="jbond", beta=beta, eta=0.0,
                        baseline="none")
  state, metrics = run_exact(step, bandit_state(logits, optax.sgd(1.0)), r, 2, 1500)
  pi = jax.nn.softmax(state.policy.params["logits"])
  q = pa * 16.0 ** (-(1.0 - p_le_of(pa, r)) ** 2)
  q = q / q.sum()
  bo2 = losses.bon_distribution(pa, r, n=2)
  target = q if beta == 1.0 else fixed_point_of(bo2, q, beta, logits)
  assert tv(pi, target) < 1e-3
  assert 0.0 < tv(pi, bo2) < tv(q, bo2) + 1e-6
  # The exact expected r_J under π at convergence is what the step reports.
  exact_rj = -math.log(16.0) * float(jnp.sum(pi * (1.0 - p_le_of(pa, r)) ** 2))
  np.testing.assert_allclose(metrics["bond/reward"][-1], exact_rj, rtol=1e-3, atol=1e-5)


def test_jbond_reward_is_calibrated_at_the_anchor_median():
  """E[r_J] over two anchor draws = −log 16·(1 − p_≤)², −log 2 at p_≤ = 1/2 (App. A.4); from the step's metric."""
  pa = jnp.full((4,), 0.25)
  r = jnp.arange(4.0)
  state = bandit_state(jnp.log(pa), optax.sgd(0.0))
  batch = enumerated_batch(state, r, 2, 4)
  # Keep only y = outcome 1 (p_≤ = 1/2) by zeroing the other rows' weights.
  batch["weights"] = jnp.where(batch["tokens"][:, 1] == 1, batch["weights"], 0.0)
  _, metrics = LR0_STEP(state, batch)
  np.testing.assert_allclose(metrics["bond/reward"], -math.log(2.0), rtol=1e-6)


def test_bond_mc_quantile_fixed_points():
  """Plain BOND, k = 3 anchor samples, n = 2: β = 0 → Bo-2(π_anchor) (best of the first n);
  β = 1 → π_anchor·exp((n−1)·E[log max(p̂, 1/(k+1))])/Z with k·p̂ ~ Binomial(k, p_≤)."""
  k_out, k, n = 6, 3, 2
  logits, r = problem(1, k_out)
  pa = jax.nn.softmax(logits)
  ple = p_le_of(pa, r)
  e_log = sum(math.comb(k, j) * ple ** j * (1 - ple) ** (k - j) * math.log(max(j / k, 1 / (k + 1)))
              for j in range(k + 1))
  target_bw = pa * jnp.exp((n - 1) * e_log)
  target_bw = target_bw / target_bw.sum()

  def go(beta):
    step = make_bond_step(bandit_apply, optax.sgd(1.0), prompt_len=1, variant="bond", n=n, beta=beta, eta=0.0,
                          baseline="none")

    @jax.jit
    def run(s):
      return jax.lax.fori_loop(0, 1500, lambda _, s: step(s, enumerated_batch(s, r, k, k_out))[0], s)

    return jax.nn.softmax(run(bandit_state(logits, optax.sgd(1.0))).policy.params["logits"])

  assert tv(go(0.0), losses.bon_distribution(pa, r, n=n)) < 1e-3
  assert tv(go(1.0), target_bw) < 1e-3


# ----------------------------------------------------------------------------------------------
# Moving anchors
# ----------------------------------------------------------------------------------------------


def test_iterated_exact_best_of_2_is_best_of_2_to_the_m():
  logits, r = problem(2)
  p = jax.nn.softmax(logits)
  bon = jax.jit(losses.bon_distribution)
  q = p
  for m in range(1, 5):
    q = bon(q, r, n=2)
    np.testing.assert_allclose(q, bon(p, r, n=2 ** m), atol=1e-6)


def test_iterative_bond_with_hard_anchor_tracks_best_of_2_to_the_m():
  """Forward-only J-BOND, exact expectations, hard anchor copy every 400 steps: after M copies the
  policy is Bo-2^(M+1) of the start (each round distils Bo-2 of the current anchor)."""
  logits, r = problem(3)
  every, rounds = 400, 3
  step = make_bond_step(bandit_apply, optax.sgd(2.0), prompt_len=1, variant="jbond", beta=0.0,
                        hard_anchor_every=every, baseline="none")
  state, metrics = run_exact(step, bandit_state(logits, optax.sgd(2.0)), r, 2, every * rounds)
  assert int(state.anchor_updates) == rounds
  pi = jax.nn.softmax(state.policy.params["logits"])
  pa = jax.nn.softmax(state.anchor_params["logits"])
  np.testing.assert_array_equal(state.anchor_params["logits"], state.policy.params["logits"])
  assert tv(pi, losses.bon_distribution(jax.nn.softmax(logits), r, n=2 ** rounds)) < 0.01
  assert tv(pa, pi) == 0.0
  np.testing.assert_array_equal(metrics["anchor/updates"][every - 2:every + 1], [0, 1, 1])


def test_ema_anchor_with_a_frozen_policy():
  """θ_a after k steps = θ + (1 − η)^k (θ_a,0 − θ) when the policy does not move (lr 0)."""
  eta, steps = ETA, 7
  rng = np.random.default_rng(4)
  theta, anchor0 = rng.normal(size=4), rng.normal(size=4)
  state = bandit_state(theta, optax.sgd(0.0), anchor_logits=anchor0)
  batch = enumerated_batch(state, jnp.arange(4, dtype=jnp.float32), 2, 4)
  for _ in range(steps):
    state, _ = LR0_STEP(state, batch)
  np.testing.assert_array_equal(state.policy.params["logits"], jnp.asarray(theta, jnp.float32))
  np.testing.assert_allclose(state.anchor_params["logits"], theta + (1 - eta) ** steps * (anchor0 - theta),
                             rtol=1e-5, atol=1e-6)
  assert int(state.anchor_updates) == steps


def test_hard_anchor_copies_exactly_every_k_steps():
  every = 3
  logits, r = problem(5)
  state = bandit_state(logits, optax.adam(0.1))
  step = jax.jit(make_bond_step(bandit_apply, optax.adam(0.1), prompt_len=1, hard_anchor_every=every, eta=0.5))
  batch = enumerated_batch(state, r, 2)
  anchor = state.anchor_params["logits"]
  for t in range(1, 10):
    state, metrics = step(state, batch)
    if t % every == 0:
      np.testing.assert_array_equal(state.anchor_params["logits"], state.policy.params["logits"])
      anchor = state.anchor_params["logits"]
    else:
      np.testing.assert_array_equal(state.anchor_params["logits"], anchor)  # untouched, eta ignored
      assert not np.array_equal(anchor, state.policy.params["logits"])
    assert int(metrics["anchor/updates"]) == t // every


# ----------------------------------------------------------------------------------------------
# The loss, masks, traces and arguments
# ----------------------------------------------------------------------------------------------


def sampled_bigram_batch(seed, b, k, g, vocab=5, prompt_len=2):
  rng = np.random.default_rng(seed)
  s = prompt_len + g
  tokens = rng.integers(0, vocab, size=(b, s))
  a_tokens = rng.integers(0, vocab, size=(b, k, s))
  a_tokens[:, :, :prompt_len] = tokens[:, None, :prompt_len]  # the anchor answers the same prompt
  lens = rng.integers(1, g + 1, size=b)
  a_lens = rng.integers(1, g + 1, size=(b, k))
  cmask = (np.arange(g)[None] < lens[:, None]).astype(np.float32)
  a_cmask = (np.arange(g)[None, None] < a_lens[..., None]).astype(np.float32)
  ones_p = np.ones((b, prompt_len))
  return {
      "tokens": jnp.asarray(tokens, jnp.int32),
      "mask": jnp.asarray(np.concatenate([ones_p, cmask], 1), jnp.int32),
      "completion_mask": jnp.asarray(cmask),
      "rewards": jnp.asarray(rng.integers(0, 3, size=b), jnp.float32),  # ties are frequent
      "anchor_tokens": jnp.asarray(a_tokens, jnp.int32),
      "anchor_mask": jnp.asarray(np.concatenate([np.ones((b, k, prompt_len)), a_cmask], 2), jnp.int32),
      "anchor_completion_mask": jnp.asarray(a_cmask),
      "anchor_rewards": jnp.asarray(rng.integers(0, 3, size=(b, k)), jnp.float32),
      "weights": jnp.ones((b,), jnp.float32),
  }


def bigram_state(seed, tx, vocab=5):
  rng = np.random.default_rng(seed)
  policy = create_train_state({"table": jnp.asarray(rng.normal(size=(vocab, vocab)), jnp.float32)}, tx,
                              jax.random.PRNGKey(0))
  return create_bond_state(policy, {"table": jnp.asarray(rng.normal(size=(vocab, vocab)), jnp.float32)})


def seq_logp(table, tokens, cmask, prompt_len):
  lp = jax.nn.log_softmax(table[tokens[..., prompt_len - 1:-1]])
  tok = jnp.take_along_axis(lp, tokens[..., prompt_len:, None], -1)[..., 0]
  return jnp.sum(tok * cmask, -1)


def test_jbond_step_equals_the_reference_loss_on_multi_token_sequences():
  """All weights 1: the step's loss and update are those of losses.jbond_loss on sequence sums, with
  the forward target the first maximal of the two anchor samples (and the γ term on)."""
  lr, pl, beta, gamma = 0.1, 2, 0.5, 0.7
  batch = sampled_bigram_batch(6, b=6, k=2, g=3, prompt_len=pl)
  state = bigram_state(7, optax.sgd(lr))
  step = jax.jit(make_bond_step(bigram_apply, optax.sgd(lr), prompt_len=pl, beta=beta, gamma=gamma, eta=0.25))
  new, metrics = step(state, batch)

  ar = batch["anchor_rewards"]
  best = jnp.where(ar[:, 1] > ar[:, 0], 1, 0)  # ties: the first sample
  best_tok = batch["anchor_tokens"][jnp.arange(6), best]
  best_cm = batch["anchor_completion_mask"][jnp.arange(6), best]
  anchor_logp = seq_logp(state.anchor_params["table"], batch["tokens"], batch["completion_mask"], pl)
  r_j = losses.jbond_crude_reward(batch["rewards"], ar)

  def ref_loss(table):
    return losses.jbond_loss(seq_logp(table, batch["tokens"], batch["completion_mask"], pl), anchor_logp,
                             seq_logp(table, best_tok, best_cm, pl), r_j, beta=beta, gamma=gamma)

  (loss, ref_metrics), grad = jax.jit(jax.value_and_grad(ref_loss, has_aux=True))(state.policy.params["table"])
  np.testing.assert_allclose(metrics["bond/loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["bond/fw_nll"], ref_metrics["jbond/fw_nll"], rtol=1e-5)
  np.testing.assert_allclose(metrics["kl/anchor_log_ratio"], ref_metrics["jbond/kl_anchor"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["bond/reward"], jnp.mean(r_j), rtol=1e-6)
  expected = state.policy.params["table"] - lr * grad
  np.testing.assert_allclose(new.policy.params["table"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.anchor_params["table"], 0.75 * state.anchor_params["table"] + 0.25 * expected,
                             rtol=1e-5, atol=1e-6)
  # k3 estimate of KL(π‖π_anchor): Σ_t (exp(−d_t) − 1 + d_t), mean over rows.
  lp = jax.nn.log_softmax(state.policy.params["table"][batch["tokens"][:, pl - 1:-1]])
  la = jax.nn.log_softmax(state.anchor_params["table"][batch["tokens"][:, pl - 1:-1]])
  d = jnp.take_along_axis(lp - la, batch["tokens"][:, pl:, None], -1)[..., 0]
  np.testing.assert_allclose(metrics["kl/anchor"], jnp.mean(jnp.sum((jnp.expm1(-d) + d) * batch["completion_mask"],
                                                                    -1)), rtol=1e-5)
  assert float(metrics["kl/anchor"]) >= 0.0
  for key in ("policy/entropy", "policy/grad_norm", "bond/beats_all", "bond/below_all", "bond/quantile"):
    assert np.isfinite(metrics[key]), key


@pytest.mark.parametrize("variant,k", [("jbond", 2), ("bond", 4)])
def test_zero_weight_rows_do_not_change_the_update(variant, k):
  """Rows with weight 0 (any content) leave the update, the baseline and the metrics unchanged."""
  batch = sampled_bigram_batch(8, b=5, k=k, g=3)
  junk = sampled_bigram_batch(9, b=3, k=k, g=3)
  junk["rewards"] = junk["rewards"] * 100.0 - 50.0
  junk["weights"] = jnp.zeros((3,))
  padded = jax.tree.map(lambda a, b: jnp.concatenate([a, b], 0), batch, junk)
  state = bigram_state(10, optax.adam(0.05))
  step = jax.jit(make_bond_step(bigram_apply, optax.adam(0.05), prompt_len=2, variant=variant, n=2, gamma=0.3))
  a, ma = step(state, batch)
  b, mb = step(state, padded)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  for key in ma:
    np.testing.assert_allclose(ma[key], mb[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_weighted_leave_one_out_baseline():
  x = jnp.asarray([1.0, 2.0, 4.0, 8.0])
  np.testing.assert_allclose(weighted_loo_baseline(x, jnp.ones(4)), losses.leave_one_out_baseline(x), rtol=1e-6)
  w = jnp.asarray([1.0, 0.0, 1.0, 1.0])
  np.testing.assert_allclose(weighted_loo_baseline(x, w), [6.0, 13 / 3, 4.5, 2.5])
  np.testing.assert_allclose(weighted_loo_baseline(x, jnp.asarray([0.0, 0.0, 1.0, 0.0])), [4.0, 4.0, 0.0, 4.0])


def test_one_trace_for_many_batches():
  traces = []
  inner = make_bond_step(bigram_apply, optax.adam(0.01), prompt_len=2, variant="bond", n=2)

  def counted(state, batch):
    traces.append(1)
    return inner(state, batch)

  step = jax.jit(counted, donate_argnums=0)
  state = bigram_state(11, optax.adam(0.01))
  for seed in range(4):
    batch = sampled_bigram_batch(seed, b=4, k=3, g=3)
    batch["weights"] = jnp.asarray(np.random.default_rng(seed).integers(0, 2, size=4), jnp.float32)
    state, metrics = step(state, batch)
    assert all(np.isfinite(v) for v in jax.tree.leaves(metrics))
  assert len(traces) == 1
  assert isinstance(state, BONDState) and int(state.policy.step) == 4


def test_bad_arguments_raise_value_errors():
  tx = optax.sgd(0.1)
  with pytest.raises(ValueError, match="variant"):
    make_bond_step(bigram_apply, tx, prompt_len=2, variant="ipo")
  with pytest.raises(ValueError, match="`n`"):
    make_bond_step(bigram_apply, tx, prompt_len=2, variant="jbond", n=4)
  for kw, name in [({"beta": 1.5}, "beta"), ({"gamma": -1.0}, "gamma"), ({"eta": 2.0}, "eta"),
                   ({"hard_anchor_every": 0}, "hard_anchor_every"), ({"baseline": "mean"}, "baseline"),
                   ({"kl_estimator": "k4"}, "kl_estimator"), ({"prompt_len": 0}, "prompt_len")]:
    with pytest.raises(ValueError, match=name):
      make_bond_step(bigram_apply, tx, **{"prompt_len": 2, **kw})
  state = bigram_state(0, tx)
  with pytest.raises(ValueError, match="exactly 2 anchor samples"):
    make_bond_step(bigram_apply, tx, prompt_len=2)(state, sampled_bigram_batch(0, b=2, k=3, g=2))
  with pytest.raises(ValueError, match="k >= n"):
    make_bond_step(bigram_apply, tx, prompt_len=2, variant="bond", n=4)(state, sampled_bigram_batch(0, b=2, k=3, g=2))
  batch = sampled_bigram_batch(0, b=2, k=2, g=2)
  with pytest.raises(ValueError, match="missing keys"):
    make_bond_step(bigram_apply, tx, prompt_len=2)(state, {k: v for k, v in batch.items() if k != "weights"})
  batch["completion_mask"] = batch["completion_mask"][:, :1]
  with pytest.raises(ValueError, match="completion_mask"):
    make_bond_step(bigram_apply, tx, prompt_len=2)(state, batch)
  assert set(BATCH_KEYS) == set(sampled_bigram_batch(0, b=1, k=2, g=1))
  with pytest.raises(ValueError, match="anchor_params"):
    create_bond_state(state.policy, {"other": jnp.zeros(1)})


def test_forward_target_ties_pick_the_first_anchor_sample():
  """Equal anchor rewards: y'_1 is the Bo-2 sample (consistent with selection.rank_order)."""
  state = bandit_state(jnp.log(jnp.asarray([0.1, 0.2, 0.3, 0.4])), optax.sgd(0.0))
  batch = enumerated_batch(state, jnp.zeros(4), 2, 4)
  batch["weights"] = jnp.ones_like(batch["weights"])
  _, metrics = LR0_STEP(state, batch)
  first = batch["anchor_tokens"][:, 0, 1]
  np.testing.assert_allclose(metrics["bond/fw_nll"], -jnp.mean(jnp.log(jnp.asarray([0.1, 0.2, 0.3, 0.4]))[first]),
                             rtol=1e-6)
  assert int(selection.rank_order(batch["anchor_rewards"][:1])[0, 0]) == 0


def test_sharded_batch_equals_unsharded():
  """The batch split over 8 CPU devices (data axis) gives the single-device update (the LOO baseline is global)."""
  devices = np.array(jax.devices()[:8])
  if devices.size < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
  mesh = Mesh(devices, ("data",))
  batch = sampled_bigram_batch(12, b=8, k=2, g=3)
  batch["weights"] = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 1], jnp.float32)
  state = bigram_state(13, optax.adam(0.05))
  step = jax.jit(make_bond_step(bigram_apply, optax.adam(0.05), prompt_len=2))
  expected, expected_metrics = step(state, batch)
  sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))), batch)
  got, got_metrics = step(state, sharded)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), expected, got)
  for key in expected_metrics:
    np.testing.assert_allclose(expected_metrics[key], got_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
