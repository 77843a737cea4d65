"""Tests for ppo_policy_loss and value_loss."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses


def grad(fn, **kw):
  # Jitted: op-by-op eager autodiff costs seconds per test on CPU.
  return jax.jit(jax.grad(fn, **kw))



def _np_ppo(lp, old, adv, mask, w, eps_lo, eps_hi, dual, agg):
  ratio = np.exp(lp - old)
  tok = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps_lo, 1 + eps_hi))
  if dual is not None:
    tok = np.where(adv < 0, np.minimum(tok, -dual * adv), tok)
  if agg == "token_mean":
    tw = mask * w[:, None]
    return (tok * tw).sum() / tw.sum()
  per_seq = (tok * mask).sum(1) / np.maximum(mask.sum(1), 1)
  ww = w * (mask.sum(1) > 0)
  return (ww * per_seq).sum() / ww.sum()


def _batch(seed=0, B=4, T=6):
  rng = np.random.default_rng(seed)
  lp = rng.normal(-1.0, 0.3, (B, T)).astype(np.float32)
  old = (lp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
  adv = rng.normal(size=(B, T)).astype(np.float32)
  mask = np.zeros((B, T), np.float32)
  for b in range(B):
    s = rng.integers(0, 2)
    mask[b, s:s + rng.integers(2, T - 1)] = 1
  return lp, old, adv, mask


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("eps_hi,dual", [(None, None), (0.28, None),
                                         (None, 3.0)])
def test_ppo_policy_loss_matches_numpy(agg, eps_hi, dual):
  lp, old, adv, mask = _batch()
  w = np.array([1.0, 0.0, 2.0, 0.5], np.float32)
  fn = jax.jit(functools.partial(losses.ppo_policy_loss, clip_eps=0.2,
                                 clip_eps_high=eps_hi, dual_clip=dual,
                                 loss_agg=agg))
  loss, m = fn(lp, old, adv, mask, weights=w)
  want = _np_ppo(lp, old, adv, mask, w, 0.2, eps_hi or 0.2, dual, agg)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  ratio = np.exp(lp - old)
  tw = mask * w[:, None]
  np.testing.assert_allclose(m["policy/ratio_mean"],
                             (ratio * tw).sum() / tw.sum(), rtol=1e-5)
  np.testing.assert_allclose(m["policy/approx_kl"],
                             ((ratio - 1 - np.log(ratio)) * tw).sum() / tw.sum(),
                             rtol=1e-4)
  np.testing.assert_allclose(m["policy/ratio_max"], ratio[tw > 0].max(),
                             rtol=1e-6)


def test_ppo_clip_frac_hand_case():
  lp = jnp.log(jnp.array([[1.5, 0.5, 1.0, 1.1]]))
  old = jnp.zeros((1, 4))
  adv = jnp.array([[1.0, -1.0, 1.0, -1.0]])
  _, m = jax.jit(functools.partial(losses.ppo_policy_loss, clip_eps=0.2))(
      lp, old, adv, jnp.ones((1, 4)))
  # Token 0: A>0, ρ=1.5>1.2 clipped; token 1: A<0, ρ=.5<.8 clipped; others not.
  np.testing.assert_allclose(m["policy/clip_frac"], 0.5)


def test_ppo_zero_gradient_in_clipped_regions():
  old = jnp.zeros((1, 4))
  lp = jnp.log(jnp.array([[1.5, 0.5, 1.5, 0.5]]))
  adv = jnp.array([[1.0, -1.0, -1.0, 1.0]])
  g = grad(lambda lp: losses.ppo_policy_loss(
      lp, old, adv, jnp.ones((1, 4)), clip_eps=0.2)[0])(lp)
  g = np.asarray(g)[0]
  # Clipped: (A>0, ρ>1+ε) and (A<0, ρ<1−ε) → zero; the other two are live.
  assert g[0] == 0 and g[1] == 0
  assert g[2] != 0 and g[3] != 0


def test_ppo_dual_clip_bounds_negative_advantage_loss():
  lp = jnp.log(jnp.array([[10.0, 10.0]]))
  adv = jnp.array([[-1.0, 1.0]])
  fn = lambda lp: losses.ppo_policy_loss(lp, jnp.zeros((1, 2)), adv,
                                         jnp.ones((1, 2)), clip_eps=0.2,
                                         dual_clip=3.0,
                                         loss_agg="token_mean")
  loss, m = jax.jit(fn)(lp)
  # Token 0: loss bounded by −cA = 3 (not ρ·|A| = 10); token 1: −1.2.
  np.testing.assert_allclose(loss, (3.0 - 1.2) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["policy/dual_clip_frac"], 0.5)
  assert np.all(np.asarray(grad(lambda lp: fn(lp)[0])(lp)) == 0)
  with pytest.raises(ValueError, match="dual_clip"):
    losses.ppo_policy_loss(lp, lp, adv, adv, clip_eps=0.2, dual_clip=0.5)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
def test_ppo_masked_equals_sliced(agg):
  lp, old, adv, _ = _batch(1)
  mask = np.zeros_like(lp)
  mask[:, 1:4] = 1
  mask[2] = 0          # an empty row behaves like a dropped row
  f = jax.jit(functools.partial(losses.ppo_policy_loss, clip_eps=0.2,
                                loss_agg=agg))
  full, _ = f(lp, old, adv, mask)
  keep = np.array([0, 1, 3])
  sl = (slice(None), slice(1, 4))
  sliced, _ = f(lp[keep][sl], old[keep][sl], adv[keep][sl], mask[keep][sl])
  np.testing.assert_allclose(full, sliced, rtol=1e-6)


def test_ppo_all_zero_mask_and_garbage_padding_give_finite_grads():
  lp = jnp.array([[0.0, 500.0]])
  old = jnp.array([[0.0, -500.0]])
  adv = jnp.array([[1.0, 1e30]])
  for mask in (jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]])):
    for agg in ("seq_mean_token_mean", "token_mean"):
      f = lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2,
                                            loss_agg=agg)[0]
      assert np.isfinite(float(jax.jit(f)(lp)))
      g = grad(f)(lp)
      assert np.all(np.isfinite(g)) and float(g[0, 1]) == 0.0


def test_ppo_weights_zero_have_zero_gradient_and_multiply():
  lp, old, adv, mask = _batch(2)
  f = lambda lp, w: losses.ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2,
                                           weights=w)[0]
  w = jnp.array([1.0, 0.0, 1.0, 1.0])
  g = grad(f)(lp, w)
  assert np.all(np.asarray(g)[1] == 0) and np.any(np.asarray(g)[0] != 0)
  # Integer weights = duplicating samples.
  w2 = jnp.array([2.0, 1.0, 1.0, 3.0])
  rep = np.repeat(np.arange(4), np.asarray(w2, int))
  dup, _ = jax.jit(functools.partial(losses.ppo_policy_loss, clip_eps=0.2))(
      lp[rep], old[rep], adv[rep], mask[rep])
  np.testing.assert_allclose(jax.jit(f)(lp, w2), dup, rtol=1e-5)


def test_ppo_stop_gradient_on_old_logprobs_and_advantages():
  lp, old, adv, mask = _batch(3)
  g_old, g_adv = grad(lambda o, a: losses.ppo_policy_loss(
      lp, o, a, mask, clip_eps=0.2)[0], argnums=(0, 1))(old, adv)
  assert np.all(g_old == 0) and np.all(g_adv == 0)


def test_ppo_bandit_fixed_point_is_kl_regularised_optimum():
  """Exact-expectation PPO with k1 KL-shaped reward on a K-armed bandit."""
  K, beta = 6, 0.5
  rng = np.random.default_rng(4)
  logp_ref = jax.nn.log_softmax(jnp.asarray(rng.normal(0, 0.5, K), jnp.float32))
  r = jnp.asarray(rng.uniform(-1, 1, K), jnp.float32)
  target = jax.nn.softmax(logp_ref + r / beta)
  ones = jnp.ones((K, 1))

  def surrogate(theta, logp_old, adv, p_old):
    lp = jax.nn.log_softmax(theta)
    # One sequence per arm, weighted by π_old(arm): the weighted mean is the
    # exact expectation E_{y~π_old}[ℓ(y)].
    return losses.ppo_policy_loss(lp[:, None], logp_old[:, None], adv[:, None],
                                  ones, clip_eps=0.2, weights=p_old)[0]

  def outer(_, theta):
    logp_old = jax.nn.log_softmax(theta)
    p_old = jnp.exp(logp_old)
    tok_r, _ = losses.kl_shaped_rewards(r, logp_old[:, None], logp_ref[:, None],
                                        ones, kl_coef=beta, kind="k1")
    ret = tok_r[:, 0]
    adv = ret - jnp.sum(p_old * ret)          # exact value baseline
    for _ in range(4):                        # PPO epochs on the same rollout
      theta = theta - 2.0 * grad(surrogate)(theta, logp_old, adv, p_old)
    return theta

  theta = jax.jit(lambda t: jax.lax.fori_loop(0, 600, outer, t))(jnp.zeros(K))
  pi = jax.nn.softmax(theta)
  assert 0.5 * float(jnp.abs(pi - target).sum()) < 1e-3
  np.testing.assert_allclose(beta * (jnp.log(pi) - logp_ref),
                             r - jnp.sum(pi * r) + beta * float(
                                 jnp.sum(pi * (jnp.log(pi) - logp_ref))),
                             atol=1e-2)


def test_value_loss_hand_case_and_zero_grad_when_clipped():
  v = jnp.array([[1.0, 0.05, 3.0]])
  old = jnp.zeros((1, 3))
  ret = jnp.array([[-1.0, 0.0, 0.0]])
  mask = jnp.ones((1, 3))
  loss, m = jax.jit(functools.partial(losses.value_loss, clip_eps=0.2,
                                      loss_agg="token_mean"))(v, old, ret, mask)
  # Token 0: Vclip=.2 → max(1.44, 4)=4; token 1: both .0025; token 2:
  # Vclip=.2 → max(.04, 9)=9.
  np.testing.assert_allclose(loss, 0.5 * (4 + 0.0025 + 9) / 3, rtol=1e-5)
  np.testing.assert_allclose(m["value/error"], (4 + 0.0025 + 9) / 3, rtol=1e-5)
  np.testing.assert_allclose(m["value/clip_frac"], 0.0)
  # V − V_old = 1 > ε and G = 3: (Vclip − G)² = 7.84 > (V − G)² = 4, so the
  # clipped (constant) branch is the loss → zero gradient.
  f = lambda v, g: losses.value_loss(v, old, g, mask, clip_eps=0.2,
                                     loss_agg="token_mean")
  vgrad = grad(lambda v, g: f(v, g)[0])
  ret3 = jnp.array([[3.0, 0.0, 0.0]])
  v3 = jnp.array([[1.0, 0.0, 0.0]])
  assert float(vgrad(v3, ret3)[0, 0]) == 0.0
  np.testing.assert_allclose(f(v3, ret3)[1]["value/clip_frac"], 1 / 3)
  # V − V_old = −1 < −ε but G = 3: (−3.2)² = 10.24 < (−4)² = 16, live branch.
  v4 = jnp.array([[-1.0, 0.0, 0.0]])
  np.testing.assert_allclose(vgrad(v4, ret3)[0, 0], (-1.0 - 3.0) / 3, rtol=1e-6)


def test_value_loss_unclipped_masked_sliced_and_finite():
  rng = np.random.default_rng(5)
  v, old, ret = rng.normal(size=(3, 2, 5)).astype(np.float32)
  mask = np.zeros((2, 5), np.float32)
  mask[:, :3] = 1
  vl = jax.jit(losses.value_loss, static_argnames=("clip_eps", "loss_agg"))
  loss, _ = vl(v, old, ret, mask, clip_eps=None)
  np.testing.assert_allclose(loss, 0.5 * np.mean(((v - ret) ** 2)[:, :3]),
                             rtol=1e-5)
  sl, _ = vl(v[:, :3], old[:, :3], ret[:, :3], mask[:, :3],
                            clip_eps=None)
  np.testing.assert_allclose(loss, sl, rtol=1e-6)
  g = grad(lambda v: losses.value_loss(v, old, ret, np.zeros_like(mask),
                                           clip_eps=0.2)[0])(v)
  assert np.all(np.isfinite(g)) and np.all(g == 0)
