"""Tests for sft_loss, bradley_terry_loss and pairwise_calibration."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses


def grad(fn, **kw):
  # Jitted: op-by-op eager autodiff costs seconds per test on CPU.
  return jax.jit(jax.grad(fn, **kw))



def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sft_loss_hand_case_and_masked_equals_sliced():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 6))
  mask = np.zeros((2, 6), np.float32)
  mask[:, 2:5] = 1.0
  loss, metrics = jax.jit(losses.sft_loss)(logits, targets, mask)
  lp = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, -(lp * mask).sum() / mask.sum(), rtol=1e-5)
  sliced, _ = jax.jit(losses.sft_loss)(logits[:, 2:5], targets[:, 2:5], mask[:, 2:5])
  np.testing.assert_allclose(loss, sliced, rtol=1e-6)
  acc = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()
  np.testing.assert_allclose(metrics["sft/accuracy"], acc)
  assert float(metrics["sft/tokens"]) == 6.0


def test_sft_loss_zero_mask_finite_grad():
  logits = jnp.ones((1, 3, 4))
  g = grad(lambda l: losses.sft_loss(l, jnp.zeros((1, 3), jnp.int32),
                                         jnp.zeros((1, 3)))[0])(logits)
  assert np.all(np.isfinite(g)) and np.all(g == 0)


def test_bt_loss_log2_at_init_and_hand_case():
  z = jnp.zeros(4)
  loss, m = jax.jit(losses.bradley_terry_loss)(z, z)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  c = jnp.array([1.0, 0.0, 2.0])
  r = jnp.array([0.0, 1.0, 2.0])
  bt = jax.jit(losses.bradley_terry_loss)
  loss, m = bt(c, r)
  d = np.array([1.0, -1.0, 0.0])
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-d))), rtol=1e-6)
  np.testing.assert_allclose(m["rm/accuracy"], 1 / 3)
  np.testing.assert_allclose(m["rm/margin"], 0.0)
  loss_m, _ = bt(c, r, margin=jnp.array([0.5, 0.0, 1.0]))
  dm = d - np.array([0.5, 0.0, 1.0])
  np.testing.assert_allclose(loss_m, np.mean(np.log1p(np.exp(-dm))), rtol=1e-6)
  with pytest.raises(ValueError, match="rejected_rewards"):
    losses.bradley_terry_loss(c, r[:2])


def test_bt_loss_invariant_to_per_prompt_offset():
  rng = np.random.default_rng(1)
  c, r = rng.normal(size=(2, 8))
  off = rng.normal(size=8)
  bt = jax.jit(losses.bradley_terry_loss)
  a, _ = bt(c, r)
  b, _ = bt(c + off, r + off)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bt_mle_recovers_reward_differences():
  """Exact expected BT loss over all pairs of K items is minimised at r*."""
  K = 5
  r_true = jnp.array([0.3, -1.0, 1.2, 0.0, 0.5])
  i, j = np.triu_indices(K, 1)
  p_ij = jax.nn.sigmoid(r_true[i] - r_true[j])

  def expected_loss(r):
    l_ij = jax.vmap(lambda a, b: losses.bradley_terry_loss(a[None], b[None])[0])
    return jnp.mean(p_ij * l_ij(r[i], r[j]) + (1 - p_ij) * l_ij(r[j], r[i]))

  @jax.jit
  def fit(r):
    return jax.lax.fori_loop(
        0, 2000, lambda _, r: r - 2.0 * grad(expected_loss)(r), r)

  r = fit(jnp.zeros(K))
  np.testing.assert_allclose(r - r.mean(), r_true - r_true.mean(), atol=1e-3)


def test_pairwise_calibration_hand_case():
  # d = c − r gives p = σ(d); confidences and correctness per pair:
  c = jnp.array([np.log(3.0), -np.log(3.0), np.log(9.0), 0.0])
  r = jnp.zeros(4)
  # p = .75 (conf .75, correct), .25 (conf .75, wrong), .9 (conf .9, correct),
  # .5 (conf .5, half correct). bins over [.5, 1] of width .05 (10 bins):
  # bin 5: {.75 c, .75 w} → |1.5 − 1| = .5 ; bin 8: |.9 − 1| = .1 ;
  # bin 0: |.5 − .5| = 0.  ECE = .6 / 4.
  np.testing.assert_allclose(
      jax.jit(lambda a, b: losses.pairwise_calibration(a, b, bins=10))(c, r),
      0.6 / 4, rtol=1e-5)


def test_pairwise_calibration_small_for_true_bt_scores():
  rng = np.random.default_rng(2)
  n = 20000
  r1, r2 = rng.normal(0, 1.5, (2, n))
  first_wins = rng.random(n) < 1 / (1 + np.exp(-(r1 - r2)))
  c = np.where(first_wins, r1, r2)
  r = np.where(first_wins, r2, r1)
  cal = jax.jit(losses.pairwise_calibration)
  ece_true = float(cal(c, r))
  ece_over = float(cal(3 * c, 3 * r))
  assert ece_true < 0.02
  assert ece_over > 0.08
