"""Tests for dpo_loss: formulas, limits and the bandit optimum."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses


def _dpo(beta, loss_type="sigmoid", label_smoothing=0.0):
  return jax.jit(functools.partial(losses.dpo_loss, beta=beta,
                                   loss_type=loss_type,
                                   label_smoothing=label_smoothing))


def _np_log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def test_dpo_values_at_init():
  z = jnp.full((3,), -5.0)
  np.testing.assert_allclose(_dpo(0.1)(z, z, z, z)[0], np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(_dpo(0.1, "ipo")(z, z, z, z)[0], 25.0, rtol=1e-6)
  np.testing.assert_allclose(_dpo(0.1, "hinge")(z, z, z, z)[0], 1.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_numpy_formulas(loss_type):
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = rng.normal(-10, 3, (4, 6)).astype(np.float32)
  beta, eps = 0.3, (0.1 if loss_type == "sigmoid" else 0.0)
  loss, m = _dpo(beta, loss_type, eps)(pc, pr, rc, rr)
  h = (pc - rc) - (pr - rr)
  if loss_type == "sigmoid":
    want = -(1 - eps) * _np_log_sigmoid(beta * h) - eps * _np_log_sigmoid(-beta * h)
  elif loss_type == "ipo":
    want = (h - 1 / (2 * beta)) ** 2
  else:
    want = np.maximum(0, 1 - beta * h)
  np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["rewards/chosen"], beta * (pc - rc).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(m["rewards/rejected"], beta * (pr - rr).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(m["rewards/margin"], beta * h.mean(), rtol=1e-4)
  np.testing.assert_allclose(m["rewards/accuracy"], (h > 0).mean())


def test_dpo_invariant_to_reference_shift_and_stops_ref_gradient():
  rng = np.random.default_rng(1)
  pc, pr, rc, rr = rng.normal(size=(4, 5)).astype(np.float32)
  a, _ = _dpo(0.5)(pc, pr, rc, rr)
  # The same constant added to log π_ref of both responses of a pair keeps h.
  b, _ = _dpo(0.5)(pc, pr, rc + 3.0, rr + 3.0)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  # So does a constant added to log π and log π_ref of one response.
  c, _ = _dpo(0.5)(pc + 2.0, pr, rc + 2.0, rr)
  np.testing.assert_allclose(a, c, rtol=1e-5)
  g = jax.jit(jax.grad(lambda rc, rr: losses.dpo_loss(pc, pr, rc, rr,
                                                      beta=0.5)[0],
                       argnums=(0, 1)))(rc, rr)
  assert all(np.all(np.asarray(x) == 0) for x in g)


def test_label_smoothing_gradient_vanishes_at_one_minus_eps():
  beta, eps = 0.5, 0.2
  h_star = np.log((1 - eps) / eps) / beta      # σ(βh*) = 1 − ε
  f = lambda h: losses.dpo_loss(h, jnp.zeros(1), jnp.zeros(1), jnp.zeros(1),
                                beta=beta, label_smoothing=eps)[0]
  g = jax.jit(jax.grad(f))
  np.testing.assert_allclose(g(jnp.array([h_star], jnp.float32)), 0.0, atol=1e-6)
  assert float(g(jnp.array([h_star - 1.0]))[0]) < 0
  assert float(g(jnp.array([h_star + 1.0]))[0]) > 0
  # Plain DPO never stops pushing.
  g0 = jax.jit(jax.grad(lambda h: losses.dpo_loss(
      h, jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta=beta)[0]))
  assert float(g0(jnp.array([h_star]))[0]) < 0


def _pairs(K):
  i, j = np.meshgrid(np.arange(K), np.arange(K), indexing="ij")
  off = i != j
  return i[off], j[off]


def test_dpo_bandit_converges_to_kl_optimum():
  """Infinite BT data on all ordered pairs (uniform pair design, full support)."""
  K, beta = 6, 0.5
  rng = np.random.default_rng(2)
  logp_ref = jax.nn.log_softmax(jnp.asarray(rng.normal(0, 0.5, K), jnp.float32))
  r = jnp.asarray(rng.uniform(-1, 1, K), jnp.float32)
  target = jax.nn.softmax(logp_ref + r / beta)
  ci, ri = _pairs(K)
  p_pref = jax.nn.sigmoid(r[ci] - r[ri])        # P(c ≻ r) under BT

  def expected_loss(theta):
    lp = jax.nn.log_softmax(theta)
    per_pair = jax.vmap(lambda a, b, c, d: losses.dpo_loss(
        a[None], b[None], c[None], d[None], beta=beta)[0])(
            lp[ci], lp[ri], logp_ref[ci], logp_ref[ri])
    # Each ordered (c, r) is labelled "c chosen" with probability P(c ≻ r).
    return jnp.mean(p_pref * per_pair)

  theta = jax.jit(lambda t: jax.lax.fori_loop(
      0, 3000, lambda _, t: t - 5.0 * jax.grad(expected_loss)(t), t))(
          jnp.zeros(K))
  pi = jax.nn.softmax(theta)
  assert 0.5 * float(jnp.abs(pi - target).sum()) < 0.01
  implicit = beta * (jnp.log(pi) - logp_ref)
  np.testing.assert_allclose(implicit - implicit.mean(), r - r.mean(),
                             atol=2e-2)


def test_deterministic_preference_two_actions():
  """p(y1 ≻ y2) = 1, uniform π_ref: DPO → π(y2) → 0; IPO → σ(1/(2τ))."""
  logp_ref = jnp.log(jnp.array([0.5, 0.5]))

  def run(loss_type, beta, steps, lr):
    def loss(theta):
      lp = jax.nn.log_softmax(theta)
      return losses.dpo_loss(lp[:1], lp[1:], logp_ref[:1], logp_ref[1:],
                             beta=beta, loss_type=loss_type)[0]
    step = lambda _, t: t - lr * jax.grad(loss)(t)
    return jax.nn.softmax(jax.jit(lambda t: jax.lax.fori_loop(
        0, steps, step, t))(jnp.zeros(2)))

  for beta in (0.1, 1.0):
    assert float(run("sigmoid", beta, 4000, 50.0)[1]) < 0.01
  tau = 0.25
  np.testing.assert_allclose(run("ipo", tau, 500, 0.1)[0],
                             1 / (1 + np.exp(-1 / (2 * tau))), atol=1e-4)


def test_dpo_bad_arguments():
  z = jnp.zeros(2)
  with pytest.raises(ValueError, match="loss_type"):
    losses.dpo_loss(z, z, z, z, beta=0.1, loss_type="kto")
  with pytest.raises(ValueError, match="ref_rejected_logps"):
    losses.dpo_loss(z, z, z, jnp.zeros(3), beta=0.1)
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.dpo_loss(z, z, z, z, beta=0.1, label_smoothing=0.5)
