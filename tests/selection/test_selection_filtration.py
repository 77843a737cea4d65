"""Tests for PF-PPO filtration weights and rejection masks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import selection


def fw(strategy, **kw):
  return jax.jit(functools.partial(selection.filtration_weights,
                                   strategy=strategy, **kw))


R = np.array([[0.1, 0.9, 0.5, -0.3, 0.9],      # tie at the top (idx 1, 4)
              [0.0, 0.0, 0.0, 0.0, 0.0],       # all tied
              [2.0, -1.0, 3.0, -1.0, 0.0]],    # tie at the bottom (1, 3)
             np.float32)


def test_deterministic_keep_sets():
  np.testing.assert_array_equal(fw("none")(R), np.ones_like(R))
  np.testing.assert_array_equal(
      fw("best_of_n")(R), [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 1, 0, 0]])
  # best = first maximal; worst = last in (reward desc, index asc) order.
  np.testing.assert_array_equal(
      fw("best_worst")(R), [[0, 1, 0, 1, 0], [1, 0, 0, 0, 1], [0, 0, 1, 1, 0]])
  np.testing.assert_array_equal(
      selection.best_of_n_mask(R), fw("best_of_n")(R))
  np.testing.assert_array_equal(
      fw("top", threshold=0.4)(R), R > 0.4)
  np.testing.assert_array_equal(
      fw("top_bottom", threshold=0.4, lower_threshold=-0.5)(R),
      (R > 0.4) | (R < -0.5))
  np.testing.assert_array_equal(selection.threshold_mask(R, threshold=0.4),
                                R > 0.4)


def test_best_random_keeps_best_plus_one_other():
  keys = jax.random.split(jax.random.key(0), 64)
  w = jax.jit(jax.vmap(lambda k: selection.filtration_weights(
      R, strategy="best_random", key=k)))(keys)
  w = np.asarray(w)
  np.testing.assert_array_equal(w.sum(-1), 2.0)
  best = np.asarray(fw("best_of_n")(R))
  assert np.all(w[:, best > 0] == 1)
  one = selection.filtration_weights(R[:, :1], strategy="best_random",
                                     key=keys[0])
  np.testing.assert_array_equal(one, 1.0)


def test_best_random_partner_is_uniform_over_non_best():
  n_keys, N = 20000, 5
  r = jnp.asarray(R[:1])
  keys = jax.random.split(jax.random.key(1), n_keys)
  w = jax.jit(jax.vmap(lambda k: selection.filtration_weights(
      r, strategy="best_random", key=k)))(keys)
  freq = np.asarray(w)[:, 0].mean(0)
  assert freq[1] == 1.0                                # best (first max)
  others = np.delete(freq, 1)
  p = 1 / (N - 1)
  se = np.sqrt(p * (1 - p) / n_keys)
  assert np.max(np.abs(others - p)) < 5 * se


def test_keep_two_estimator_identity():
  """E_selection[Σ_i weight_i L_i] = 2 Σ_rank w_rank L_rank (§4.4)."""
  rng = np.random.default_rng(0)
  P, N = 3, 5
  r = jnp.asarray(rng.normal(size=(P, N)), jnp.float32)
  L = rng.normal(size=(P, N))
  order = np.asarray(selection.rank_order(r))
  L_ranked = np.take_along_axis(L, order, axis=1)
  for strategy, scale in (("best_worst", 2.0), ("best_of_n", 1.0),
                          ("none", float(N))):
    w = np.asarray(selection.filtration_distribution(N, strategy=strategy))
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
    got = (np.asarray(fw(strategy)(r)) * L).sum(1)
    np.testing.assert_allclose(got, scale * L_ranked @ w, rtol=1e-5)
  n_keys = 20000
  keys = jax.random.split(jax.random.key(2), n_keys)
  ws = np.asarray(jax.jit(jax.vmap(lambda k: selection.filtration_weights(
      r, strategy="best_random", key=k)))(keys))
  per_key = (ws * L).sum(-1)                            # [keys, P]
  w_br = np.asarray(selection.filtration_distribution(N, strategy="best_random"))
  se = per_key.std(0) / np.sqrt(n_keys)
  assert np.all(np.abs(per_key.mean(0) - 2 * L_ranked @ w_br) < 5 * se + 1e-9)


def test_filtration_distribution_values():
  np.testing.assert_allclose(
      selection.filtration_distribution(5, strategy="best_random"),
      np.array([0.4, 0.1, 0.1, 0.1, 0.1]) / 0.8)   # the code's 0.4/0.1 weights
  np.testing.assert_allclose(
      selection.filtration_distribution(4, strategy="best_worst"),
      [0.5, 0, 0, 0.5])
  np.testing.assert_allclose(
      selection.filtration_distribution(1, strategy="best_worst"), [1.0])


def test_top_random_and_pow_k():
  keys = jax.random.split(jax.random.key(3), 4000)
  w = np.asarray(jax.jit(jax.vmap(lambda k: selection.filtration_weights(
      R, strategy="top_random", key=k, threshold=0.4)))(keys))
  top = R > 0.4
  assert np.all(w[:, top] == 1)
  freq = w[:, ~top].mean(0)
  assert np.max(np.abs(freq - 0.5)) < 5 * np.sqrt(0.25 / 4000)
  pw = np.asarray(fw("pow_k", k=2.0)(R))
  np.testing.assert_allclose(pw.mean(1), 1.0, rtol=1e-6)
  mag = np.abs(R[[0, 2]]) ** 2
  np.testing.assert_allclose(pw[[0, 2]], 5 * mag / mag.sum(1, keepdims=True),
                             rtol=1e-5)
  np.testing.assert_allclose(pw[1], 1.0)              # all-zero rewards


def test_filtration_argument_errors():
  with pytest.raises(ValueError, match="strategy"):
    selection.filtration_weights(R, strategy="best")
  with pytest.raises(ValueError, match="key"):
    selection.filtration_weights(R, strategy="best_random")
  with pytest.raises(ValueError, match="threshold"):
    selection.filtration_weights(R, strategy="top")
  with pytest.raises(ValueError, match="rewards"):
    selection.filtration_weights(R[0], strategy="none")
