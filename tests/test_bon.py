"""Best-of-N inference math (rlhf_jax.bon) against the exact best-of-n law of categoricals (ALGORITHMS §5)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import bon, losses, selection

# Jitted once per shape (n traced), so the loops below do not compile op by op.
bon_distribution = jax.jit(losses.bon_distribution)
kl_exact = jax.jit(bon.bon_kl_exact)
kl_estimate = jax.jit(bon.bon_kl_estimate)


def categorical(seed, k, ties=False):
  rng = np.random.default_rng(seed)
  p = jax.nn.softmax(jnp.asarray(rng.normal(size=k), jnp.float32))
  r = rng.integers(0, max(2, k // 2), size=k) if ties else rng.permutation(k) + 0.1 * rng.normal(size=k)
  return p, jnp.asarray(r, jnp.float32)


def test_best_of_n_indices_first_maximal_wins():
  r = jnp.asarray([[1.0, 3.0, 3.0], [0.0, 0.0, 0.0], [-0.0, 0.0, -1.0], [2.0, -5.0, 7.0]])
  np.testing.assert_array_equal(bon.best_of_n_indices(r), [1, 0, 0, 2])
  ties = jnp.asarray(np.random.default_rng(0).integers(0, 3, size=(64, 5)), jnp.float32)
  idx = jax.jit(bon.best_of_n_indices)(ties)
  np.testing.assert_array_equal(idx, selection.rank_order(ties)[:, 0])
  np.testing.assert_array_equal(jax.nn.one_hot(idx, 5), selection.best_of_n_mask(ties))
  with pytest.raises(ValueError, match="rewards_PxN"):
    bon.best_of_n_indices(jnp.zeros(3))


def test_take_best_gathers_each_prompts_chosen_sample():
  tokens = jnp.arange(2 * 3 * 4).reshape(2, 3, 4)
  tree = {"tokens": tokens, "rewards": jnp.asarray([[0.0, 2.0, 1.0], [5.0, 5.0, 0.0]])}
  best = bon.best_of_n_indices(tree["rewards"])
  out = bon.take_best(tree, best)
  np.testing.assert_array_equal(out["tokens"], jnp.stack([tokens[0, 1], tokens[1, 0]]))
  np.testing.assert_array_equal(out["rewards"], [2.0, 5.0])
  with pytest.raises(ValueError, match="tree"):
    bon.take_best(jnp.zeros((3, 2)), best)


def test_best_of_one_is_plain_sampling():
  p, r = categorical(1, 8, ties=True)
  np.testing.assert_allclose(bon_distribution(p, r, n=1), p, rtol=1e-6)
  samples = jnp.asarray([[0.3], [-1.0]])
  np.testing.assert_array_equal(bon.best_of_n_indices(samples), [0, 0])
  np.testing.assert_array_equal(bon.take_best(samples, bon.best_of_n_indices(samples)), samples[:, 0])
  np.testing.assert_allclose(kl_exact(p, r, n=1), 0.0, atol=1e-6)
  np.testing.assert_allclose(kl_estimate(jnp.asarray(np.random.default_rng(1).normal(size=(3, 50))), n=1),
                             0.0, atol=1e-6)
  assert bon.bon_kl_bound(1) == 0.0


def test_kl_bound_values():
  for n, ref in [(2, 0.193), (4, 0.636), (8, 1.204), (16, 1.835)]:
    assert abs(bon.bon_kl_bound(n) - ref) < 5e-4
  np.testing.assert_allclose(bon.bon_kl_bound(jnp.asarray([1, 2, 16])), [0.0, 0.19314718, 1.8350887], rtol=1e-6)
  with pytest.raises(ValueError, match="`n`"):
    bon.bon_kl_bound(0)


@pytest.mark.parametrize("ties", [False, True])
def test_exact_kl_respects_the_bound(ties):
  for seed in range(5):
    p, r = categorical(seed, 8, ties=ties)
    prev = 0.0
    for n in (2, 4, 8, 16):
      kl = float(kl_exact(p, r, n=n))
      assert prev < kl <= bon.bon_kl_bound(n) + 1e-6
      prev = kl
  # The bound is tight when every outcome is rare: 4000 equiprobable outcomes, distinct rewards.
  m = 4000
  u = jnp.full((m,), 1.0 / m)
  for n in (2, 8):
    np.testing.assert_allclose(kl_exact(u, jnp.arange(m, dtype=jnp.float32), n=n), bon.bon_kl_bound(n),
                               atol=2e-3)


def test_exact_kl_matches_the_definition():
  p, r = categorical(3, 6, ties=True)
  q = bon_distribution(p, r, n=4)
  np.testing.assert_allclose(kl_exact(p, r, n=4), jnp.sum(q * jnp.log(q / p)), rtol=1e-5)


def test_kl_estimate_from_samples_recovers_the_exact_kl_of_a_categorical():
  """The reward law of a categorical has finitely many atoms, so the plug-in estimate is consistent."""
  p, r = categorical(4, 6, ties=True)
  rng = np.random.default_rng(5)
  m = 40_000
  p64 = np.asarray(p, np.float64)
  draws = rng.choice(6, size=(2, m), p=p64 / p64.sum())
  rewards = r[jnp.asarray(draws)]
  for n in (2, 4, 8):
    est = kl_estimate(rewards, n=n)
    exact = float(kl_exact(p, r, n=n))
    assert est.shape == (2,)
    np.testing.assert_allclose(est, exact, atol=0.01)
    assert np.all(est <= bon.bon_kl_bound(n) + 1e-6)


def test_kl_estimate_never_exceeds_the_bound_and_grows_with_m_for_continuous_rewards():
  rng = np.random.default_rng(6)
  ests = []
  for m in (8, 64, 1024):
    est = kl_estimate(jnp.asarray(rng.normal(size=(4, m)), jnp.float32), n=4)
    assert np.all(est <= bon.bon_kl_bound(4) + 1e-6)
    ests.append(float(jnp.mean(est)))
  assert ests[0] < ests[1] < ests[2]
  assert bon.bon_kl_bound(4) - ests[2] < 0.01
  with pytest.raises(ValueError, match="reference_rewards_PxM"):
    bon.bon_kl_estimate(jnp.zeros(4), n=2)


def test_win_rate_counts_ties_as_half():
  np.testing.assert_allclose(bon.win_rate(jnp.asarray([1.0, 2.0, 2.0, 0.0]), jnp.asarray([0.0, 2.0, 3.0, 0.0])),
                             (1 + 0.5 + 0 + 0.5) / 4)
  np.testing.assert_allclose(bon.win_rate(jnp.asarray([1.0, 0.0]), jnp.asarray([0.0, 0.0]),
                                          weights=jnp.asarray([1.0, 0.0])), 1.0)
  with pytest.raises(ValueError, match="reference_rewards"):
    bon.win_rate(jnp.zeros(3), jnp.zeros(2))


@pytest.mark.parametrize("ties", [False, True])
def test_exact_win_rate_of_best_of_n_against_one_reference_sample(ties):
  """Σ_{y,y'} π_BoN(y)·π(y')·win(y, y') ≤ n/(n+1), = 1/2 at n = 1 (ties as half)."""
  p, r = categorical(7, 8, ties=ties)
  pairs = np.array(list(itertools.product(range(8), repeat=2)))
  y, y_ref = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])
  prev = 0.0
  for n in (1, 2, 4, 8):
    q = bon_distribution(p, r, n=n)
    wr = float(jax.jit(bon.win_rate)(r[y], r[y_ref], q[y] * p[y_ref]))
    if n == 1:
      np.testing.assert_allclose(wr, 0.5, rtol=1e-5)
    assert prev < wr <= n / (n + 1) + 1e-6
    prev = wr


def test_reward_quantile_and_effective_n():
  q = bon.reward_quantile(jnp.asarray([1.0, 0.0]), jnp.asarray([[0.0, 1.0, 2.0, 1.0], [0.0, 0.0, -1.0, 5.0]]))
  np.testing.assert_allclose(q, [(1 + 0.5 + 0 + 0.5) / 4, (0.5 + 0.5 + 1 + 0) / 4])
  for n in (1, 2, 4, 8):
    np.testing.assert_allclose(bon.effective_n(n / (n + 1)), n, rtol=1e-5)
  assert bon.effective_n(1.0) == jnp.inf
  # Exact mean quantile of Bo-n on many equiprobable outcomes is n/(n+1), so effective_n recovers n.
  m = 2000
  u = jnp.full((m,), 1.0 / m)
  r = jnp.arange(m, dtype=jnp.float32)
  mid = jnp.cumsum(u) - 0.5 * u  # the mid-quantile of each outcome
  for n in (2, 4):
    mean_q = jnp.sum(bon_distribution(u, r, n=n) * mid)
    np.testing.assert_allclose(bon.effective_n(mean_q), n, rtol=1e-3)
  np.testing.assert_allclose(jnp.sum(u * mid), 0.5, rtol=1e-6)
  assert math.isclose(float(bon.reward_quantile(jnp.zeros(1), jnp.zeros((1, 3)))[0]), 0.5)
