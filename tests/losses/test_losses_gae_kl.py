"""Tests for gae, group advantages, KL estimators, shaped rewards, KL control."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses


def _ref_gae(r, v, m, gamma, lam):
  """Plain-python reference: recursion over the valid tokens only."""
  B, T = r.shape
  adv = np.zeros((B, T))
  for b in range(B):
    idx = [t for t in range(T) if m[b, t]]
    next_v, next_a = 0.0, 0.0
    for t in reversed(idx):
      delta = r[b, t] + gamma * next_v - v[b, t]
      next_a = delta + gamma * lam * next_a
      next_v = v[b, t]
      adv[b, t] = next_a
  return adv, (adv + v) * m


def _masks():
  m = np.zeros((4, 7), bool)
  m[0, :] = True            # full
  m[1, 2:5] = True          # leading (prompt) and trailing (padding) zeros
  m[2, 0:3] = True          # right-padded
  # row 3 empty
  return m


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.0), (1.0, 1.0),
                                       (0.99, 0.5)])
def test_gae_matches_python_reference(gamma, lam):
  rng = np.random.default_rng(0)
  r, v = rng.normal(size=(2, 4, 7)).astype(np.float32)
  m = _masks()
  adv, ret = jax.jit(functools.partial(losses.gae, gamma=gamma, lam=lam))(r, v, m)
  want_adv, want_ret = _ref_gae(r, v, m, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, atol=1e-5)
  assert np.all(np.asarray(adv)[~m] == 0)


def test_gae_limits():
  rng = np.random.default_rng(1)
  r, v = rng.normal(size=(2, 4, 7)).astype(np.float32)
  m = _masks()
  f = jax.jit(losses.gae, static_argnames=("gamma", "lam"))
  # λ = 0: A_t = δ_t = r_t + γ V_{t+1} − V_t, V after the last valid token 0.
  adv0, _ = f(r, v, m, gamma=0.9, lam=0.0)
  v_next = np.zeros_like(v)
  for b in range(4):
    idx = np.flatnonzero(m[b])
    for a, c in zip(idx[:-1], idx[1:]):
      v_next[b, a] = v[b, c]
  np.testing.assert_allclose(adv0, (r + 0.9 * v_next - v) * m, atol=1e-5)
  # λ = γ = 1: A_t = Σ_{t' ≥ t} r_t' − V_t (Monte Carlo return minus baseline).
  adv1, ret1 = f(r, v, m, gamma=1.0, lam=1.0)
  rm = r * m
  mc = np.cumsum(rm[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(adv1, (mc - v) * m, atol=1e-5)
  np.testing.assert_allclose(ret1, mc * m, atol=1e-5)


def test_gae_every_token_gets_rm_score_when_v0_beta0():
  m = _masks()
  lp = jnp.zeros(m.shape)
  score = jnp.array([1.5, -2.0, 0.5, 3.0])
  rew, _ = jax.jit(functools.partial(losses.kl_shaped_rewards, kl_coef=0.0))(
      score, lp, lp, m)
  adv, _ = jax.jit(functools.partial(losses.gae, gamma=1.0, lam=1.0))(
      rew, jnp.zeros(m.shape), m)
  np.testing.assert_allclose(adv, np.where(m, np.asarray(score)[:, None], 0.0))


_kl = jax.jit(losses.kl_penalty, static_argnames="kind")


def test_kl_penalty_values_and_unbiasedness():
  lp = jnp.log(jnp.array([0.5, 0.25]))
  ref = jnp.log(jnp.array([0.25, 0.5]))
  d = np.log(2.0)
  np.testing.assert_allclose(_kl(lp, ref, kind="k1"), [d, -d],
                             rtol=1e-6)
  np.testing.assert_allclose(_kl(lp, ref, kind="k2"),
                             [d * d / 2, d * d / 2], rtol=1e-6)
  np.testing.assert_allclose(_kl(lp, ref, kind="k3"),
                             [0.5 - 1 + d, 2 - 1 - d], rtol=1e-5)
  with pytest.raises(ValueError, match="kind"):
    losses.kl_penalty(lp, ref, kind="k4")
  # Exact expectation over a categorical: E_π[k1] = E_π[k3] = KL(π‖ref).
  rng = np.random.default_rng(2)
  lp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=9), jnp.float32))
  ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=9), jnp.float32))
  p = jnp.exp(lp)
  kl = float(jnp.sum(p * (lp - ref)))
  for kind in ("k1", "k3"):
    np.testing.assert_allclose(
        jnp.sum(p * _kl(lp, ref, kind=kind)), kl, rtol=1e-5)
  assert np.all(np.asarray(_kl(lp, ref, kind="k3")) >= 0)


def test_kl_shaped_rewards_hand_case():
  m = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.float32)
  lp = jnp.array([[0.0, -1.0, -1.0, -2.0, 9.0], [-1.0, -1.0, 5.0, 5.0, 5.0]])
  ref = jnp.array([[0.0, -1.5, -1.0, -1.0, 0.0], [-2.0, -1.0, 0.0, 0.0, 0.0]])
  score = jnp.array([20.0, -0.5])
  rew, met = jax.jit(functools.partial(losses.kl_shaped_rewards, kl_coef=0.1,
                                       reward_clip=10.0))(score, lp, ref, m)
  want = np.array([[0, -0.05, 0, 0.1 + 10.0, 0], [-0.1, -0.5, 0, 0, 0]])
  np.testing.assert_allclose(rew, want, atol=1e-6)
  np.testing.assert_allclose(met["kl/ref"], ((0.5 + 0 - 1) + (1 + 0)) / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(met["reward/clip_frac"], 0.5)
  np.testing.assert_allclose(
      losses.last_token_mask(jnp.array([[0, 0, 0], [1, 0, 1]])),
      [[0, 0, 0], [0, 0, 1]])


def test_normalize_rewards():
  r = jnp.array([0.0, 10.0, 1000.0])
  np.testing.assert_allclose(
      losses.normalize_rewards(r, mean=5.0, std=2.0, clip=10.0),
      [-2.5, 2.5, 10.0])
  np.testing.assert_allclose(
      losses.normalize_rewards(r, mean=0.0, std=1.0, clip=None), r)


def test_adaptive_kl_controller_matches_formula():
  state = losses.init_kl_controller(0.2)
  upd = jax.jit(functools.partial(losses.adaptive_kl_update, target=6.0,
                                  horizon=10000.0))
  for kl, n in [(6.6, 256), (1.0, 512), (100.0, 128), (6.0, 64)]:
    new = upd(state, kl, n)
    e = np.clip(kl / 6.0 - 1, -0.2, 0.2)
    np.testing.assert_allclose(new.kl_coef, float(state.kl_coef) *
                               (1 + e * n / 10000.0), rtol=1e-6)
    state = new
  with pytest.raises(ValueError, match="target"):
    losses.adaptive_kl_update(state, 1.0, 1, target=None, horizon=1.0)


def test_grpo_and_rloo_advantages():
  r = np.array([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  m = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
  adv = jax.jit(losses.grpo_advantages)(r)
  want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
  grpo = jax.jit(losses.grpo_advantages, static_argnames="scale")
  adv_m = grpo(r, m)
  np.testing.assert_allclose(adv_m[0, :3], [-1.0, 0.0, 1.0], rtol=1e-5)
  assert float(adv_m[0, 3]) == 0 and np.all(np.asarray(adv_m[1]) == 0)
  np.testing.assert_allclose(grpo(r, scale=False),
                             r - r.mean(1, keepdims=True))
  loo = jax.jit(losses.rloo_advantages)(r, m)
  np.testing.assert_allclose(loo[0], [1 - 2.5, 2 - 2.0, 3 - 1.5, 0.0])
  assert np.all(np.asarray(loo[1]) == 0)
  full = jax.jit(losses.rloo_advantages)(r)
  np.testing.assert_allclose(np.asarray(full).sum(1), 0.0, atol=1e-5)


def test_group_advantages_masked_equals_sliced():
  rng = np.random.default_rng(3)
  r = rng.normal(size=(3, 6)).astype(np.float32)
  m = np.ones_like(r)
  m[:, 4:] = 0
  for fn in (jax.jit(losses.grpo_advantages), jax.jit(losses.rloo_advantages)):
    full = np.asarray(fn(r, m))
    np.testing.assert_allclose(full[:, :4], fn(r[:, :4]), rtol=1e-5, atol=1e-6)
    assert np.all(full[:, 4:] == 0)
