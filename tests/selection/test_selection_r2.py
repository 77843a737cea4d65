"""Tests for r_squared, binned_r_squared and the PF-PPO §4.10 1-D toy."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import selection

r2 = jax.jit(selection.r_squared)
br2 = jax.jit(selection.binned_r_squared, static_argnames="bins")


def _np_binned_r2(x, y, bins):
  order = np.argsort(x, kind="stable")
  n = len(x)
  bin_id = (np.arange(n) * bins) // n
  mx = np.array([x[order][bin_id == b].mean() for b in range(bins)
                 if np.any(bin_id == b)])
  my = np.array([y[order][bin_id == b].mean() for b in range(bins)
                 if np.any(bin_id == b)])
  a, c = np.polyfit(mx, my, 1)
  res = my - (a * mx + c)
  return 1 - (res ** 2).sum() / ((my - my.mean()) ** 2).sum()


def test_r2_exact_linear_and_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=50).astype(np.float32)
  np.testing.assert_allclose(r2(x, 3 * x - 2, np.ones(50)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(br2(x, -2 * x + 1, np.ones(50), bins=10), 1.0,
                             rtol=1e-5)
  y = (x + rng.normal(size=50)).astype(np.float32)
  m = rng.random(50) > 0.3
  np.testing.assert_allclose(r2(x, y, m),
                             np.corrcoef(x[m], y[m])[0, 1] ** 2, rtol=1e-4)
  np.testing.assert_allclose(br2(x, y, m, bins=7), _np_binned_r2(x[m], y[m], 7),
                             rtol=1e-4)
  # Masked equals sliced, and 2-D inputs are flattened.
  np.testing.assert_allclose(br2(x.reshape(5, 10), y.reshape(5, 10),
                                 m.reshape(5, 10), bins=7),
                             br2(x[m], y[m], np.ones(m.sum()), bins=7),
                             rtol=1e-6)
  assert float(r2(x, np.ones(50, np.float32), np.ones(50))) == 0.0


def test_binned_r2_fewer_points_than_bins():
  x = np.array([1.0, 2.0, 3.0, 0.0], np.float32)
  y = np.array([2.0, 4.0, 7.0, 0.0], np.float32)
  m = np.array([1, 1, 1, 0])
  np.testing.assert_allclose(br2(x, y, m, bins=10),
                             np.corrcoef(x[:3], y[:3])[0, 1] ** 2, rtol=1e-5)


def test_pf_ppo_toy_r2_ordering():
  """§4.10 toy: s = sigmoid(k R_true), R_obs = R_true + noise·(1 − |R_true|).

  Natural setup (not tuned): R_true ~ U(−1, 1) i.i.d., P = 2000 prompts, N = 5,
  k = 5, noise ~ N(0, 0.5²), 10 equal-count bins. Measured (seed 0):
    binned R²:   none .985  BoN .859  BR .981  BW .983
    unbinned R²: none .758  BoN .375  BR .767  BW .852
  The spec's full ordering BW > BR > none > BoN does NOT reproduce for the
  binned R² here (none is highest; at noise 1.0 BW < BR < none too); what
  reproduces robustly is that BoN has the lowest R² in both versions and that
  BW beats no filter on the unbinned R². Those are what this test asserts.
  """
  rng = np.random.default_rng(0)
  P, N, k, noise = 2000, 5, 5.0, 0.5
  rt = rng.uniform(-1, 1, (P, N))
  ro = (rt + noise * (1 - np.abs(rt)) * rng.standard_normal((P, N))).astype(
      np.float32)
  s = (1 / (1 + np.exp(-k * rt))).astype(np.float32)
  binned, plain = {}, {}
  for st in ("none", "best_of_n", "best_random", "best_worst"):
    w = jax.jit(functools.partial(selection.filtration_weights, strategy=st))(
        jnp.asarray(ro), key=jax.random.key(1))
    binned[st] = float(br2(ro, s, w, bins=10))
    plain[st] = float(r2(ro, s, w))
  for d in (binned, plain):
    assert d["best_of_n"] < min(d["none"], d["best_random"], d["best_worst"])
  assert plain["best_worst"] > plain["best_random"] > plain["best_of_n"]
  assert plain["best_worst"] > plain["none"]
