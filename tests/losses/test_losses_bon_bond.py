"""Tests for bon_distribution and the BOND / J-BOND pieces."""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

bon_static = jax.jit(losses.bon_distribution, static_argnames="n")
# n traced: one compile per shape serves every n.
_bon_traced = jax.jit(lambda p, r, n: losses.bon_distribution(p, r, n=n))


def bon(p, r, *, n):
  return _bon_traced(p, r, jnp.float32(n))


def _problem(K=8, seed=0):
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.ones(K)).astype(np.float32)
  r = rng.normal(size=K).astype(np.float32)
  return p, r


def _kl(p, q):
  p = np.asarray(p, np.float64)
  q = np.asarray(q, np.float64)
  nz = p > 0
  return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def test_bon_basic_properties():
  p, r = _problem()
  np.testing.assert_allclose(bon(p, r, n=1), p, rtol=1e-5)
  prev = -np.inf
  for n in (1, 2, 3, 4, 8, 16):
    q = np.asarray(bon(p, r, n=n))
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-5)
    if n in (1, 4):
      np.testing.assert_allclose(q, bon_static(p, r, n=n), rtol=1e-5)
    assert _kl(q, p) <= math.log(n) - (n - 1) / n + 1e-6
    er = float(np.sum(q * r))
    assert er >= prev - 1e-6
    prev = er
  # Distinct rewards: p_≤^n − p_<^n.
  order = np.argsort(r)
  cum = np.cumsum(p[order].astype(np.float64))
  want = np.empty(8)
  want[order] = cum ** 4 - (cum - p[order]) ** 4
  np.testing.assert_allclose(bon(p, r, n=4), want, rtol=1e-4, atol=1e-7)


def test_bon_matches_monte_carlo():
  p, r = _problem(seed=1)
  n, draws = 4, 200_000
  rng = np.random.default_rng(7)
  samples = rng.choice(len(p), size=(draws, n), p=p / p.sum())
  best = samples[np.arange(draws), np.argmax(r[samples], axis=1)]
  freq = np.bincount(best, minlength=len(p)) / draws
  q = np.asarray(bon(p, r, n=n))
  se = np.sqrt(q * (1 - q) / draws)
  assert np.all(np.abs(freq - q) <= 5 * se + 1e-6)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_bon_ties_match_brute_force_enumeration(n):
  p = np.array([0.1, 0.3, 0.2, 0.15, 0.25])
  r = np.array([1.0, 0.0, 1.0, 0.0, -1.0])     # two tie classes
  want = np.zeros(5)
  for tup in itertools.product(range(5), repeat=n):
    prob = np.prod(p[list(tup)])
    rewards = r[list(tup)]
    want[tup[int(np.argmax(rewards))]] += prob   # first maximal draw wins
  np.testing.assert_allclose(bon(p, r, n=n), want, rtol=1e-5, atol=1e-7)


def test_bon_composition_and_kl_bound_tightness():
  p, r = _problem(seed=2)
  np.testing.assert_allclose(bon(bon(p, r, n=2), r, n=2), bon(p, r, n=4),
                             rtol=1e-4, atol=1e-7)
  rt = r.copy()
  rt[1] = rt[3]                                   # with a tie
  np.testing.assert_allclose(bon(bon(p, rt, n=2), rt, n=2), bon(p, rt, n=4),
                             rtol=1e-4, atol=1e-7)
  # Many near-uniform outcomes: the KL approaches log n − (n − 1)/n.
  K = 2000
  pu = np.full(K, 1.0 / K, np.float32)
  ru = np.arange(K, dtype=np.float32)
  for n in (2, 4, 8):
    bound = math.log(n) - (n - 1) / n
    kl = _kl(bon(pu, ru, n=n), pu)
    assert bound - 0.01 < kl <= bound + 1e-4


def test_bon_tiny_tie_class_is_accurate():
  """(p_≤^n − p_<^n)/(p_≤ − p_<) must not cancel catastrophically."""
  p = np.array([1e-6, 1e-6, 1.0 - 2e-6], np.float64)
  r = np.array([5.0, 5.0, 0.0])
  n = 8
  q = np.asarray(bon(p.astype(np.float32), r, n=n), np.float64)
  # Exact: the tie class {0,1} has mass 1 − (1 − 2e-6)^8, split equally.
  cls = -np.expm1(n * np.log1p(-2e-6))
  np.testing.assert_allclose(q[:2], cls / 2, rtol=1e-4)
  np.testing.assert_allclose(q[2], (1 - 2e-6) ** n, rtol=1e-5)


def test_jbond_crude_reward_and_calibration():
  pol = jnp.array([0.0, 1.0, 2.0, 1.0])
  anc = jnp.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [0.5, 3.0]])
  np.testing.assert_allclose(jax.jit(losses.jbond_crude_reward)(pol, anc),
                             [-math.log(16), 0.0, 0.0, 0.0])
  # Exact expectation over all anchor pairs from a uniform K-point anchor law,
  # for a policy sample at the median: −log 16 · (1 − p_≤)².
  K = 201
  vals = np.arange(K, dtype=np.float32)
  a1, a2 = np.meshgrid(vals, vals, indexing="ij")
  anchors = jnp.asarray(np.stack([a1.ravel(), a2.ravel()], -1))
  median = jnp.full((K * K,), 100.0)
  e = float(jnp.mean(losses.jbond_crude_reward(median, anchors)))
  p_le = 101 / 201
  np.testing.assert_allclose(e, -math.log(16) * (1 - p_le) ** 2, rtol=1e-5)
  assert abs(e - (-math.log(2))) < 0.01
  # Monte Carlo with continuous anchors: E[r_J] at the median = −log 2.
  rng = np.random.default_rng(3)
  m = 200_000
  anc = jnp.asarray(rng.random((m, 2)), jnp.float32)
  rj = np.asarray(losses.jbond_crude_reward(jnp.full((m,), 0.5), anc))
  se = rj.std() / np.sqrt(m)
  assert abs(rj.mean() + math.log(2)) < 4 * se


def test_mc_quantile_reward():
  pol = jnp.array([0.0, 2.0, 5.0])
  anc = jnp.array([[1.0, 2.0, 3.0, 4.0]] * 3)
  np.testing.assert_allclose(
      jax.jit(losses.mc_quantile_reward)(pol, anc),
      [math.log(1 / 5), math.log(2 / 4), 0.0], rtol=1e-6)


def test_bond_backward_return_zero_gradient_at_bon():
  """With the exact return log π_BoN − log π, π = π_BoN is stationary."""
  p, r = _problem(seed=4)
  n = 4
  logp_ref = jnp.log(jnp.asarray(p))
  q = bon(p, r, n=n)
  theta = jnp.log(q)
  order = np.argsort(r)
  p_le = np.empty(8)
  p_le[order] = np.cumsum(p[order])
  # Exact log quantile incl. factor (B): log p_≤ + log B / (n − 1).
  log_b = jnp.log(q) - logp_ref - (n - 1) * jnp.log(jnp.asarray(p_le))
  logq = jnp.log(jnp.asarray(p_le, jnp.float32)) + log_b / (n - 1)

  def surrogate(theta):
    lp = jax.nn.log_softmax(theta)
    ret = losses.bond_backward_return(logq, lp, logp_ref, n=n)
    return -jnp.sum(jax.lax.stop_gradient(jnp.exp(lp)) * ret * lp)

  ret = losses.bond_backward_return(logq, jnp.log(q), logp_ref, n=n)
  np.testing.assert_allclose(ret, 0.0, atol=1e-4)
  np.testing.assert_allclose(jax.jit(jax.grad(surrogate))(theta), 0.0,
                             atol=1e-4)


def test_jbond_loss_hand_case_and_gradients():
  rng = np.random.default_rng(5)
  lp, la, lb = rng.normal(-5, 1, (3, 4)).astype(np.float32)
  rj = np.array([-math.log(16), 0.0, 0.0, -math.log(16)], np.float32)
  beta, gamma = 0.5, 0.3
  f = jax.jit(functools.partial(losses.jbond_loss, beta=beta, gamma=gamma))
  loss, m = f(lp, la, lb, rj)
  R = rj - (lp - la)
  b = (R.sum() - R) / 3
  want = ((1 - beta) * -lb.mean() + beta * -((R - b) * lp).mean() +
          gamma * ((lp - la) * lp).mean())
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m["jbond/return"], R.mean(), rtol=1e-5)
  g_lp, g_la, g_lb = jax.jit(jax.grad(
      lambda *a: losses.jbond_loss(*a, rj, beta=beta, gamma=gamma)[0],
      argnums=(0, 1, 2)))(lp, la, lb)
  np.testing.assert_allclose(g_lp, (-beta * (R - b) + gamma * (lp - la)) / 4,
                             rtol=1e-4)
  assert np.all(np.asarray(g_la) == 0)
  np.testing.assert_allclose(g_lb, -(1 - beta) / 4 * np.ones(4), rtol=1e-6)
  loss0, _ = losses.jbond_loss(lp, la, lb, rj, baseline="none")
  np.testing.assert_allclose(
      loss0, 0.5 * -lb.mean() + 0.5 * -(R * lp).mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="baseline"):
    losses.jbond_loss(lp, la, lb, rj, baseline="mean")


def test_ema_update_k_steps():
  anchor0 = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(3.0)}
  params = {"w": jnp.array([0.0, 2.0]), "b": jnp.array(-1.0)}
  eta, k = 0.02, 25
  upd = jax.jit(functools.partial(losses.ema_update, eta=eta))
  a = anchor0
  for _ in range(k):
    a = upd(a, params)
  for name in ("w", "b"):
    np.testing.assert_allclose(
        a[name], params[name] + (1 - eta) ** k * (anchor0[name] - params[name]),
        rtol=1e-5)
