"""Tests for rlhf_jax.losses.common: masked reducers, log-probs, aggregation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import common


def grad(fn, **kw):
  # Jitted: op-by-op eager autodiff costs seconds per test on CPU.
  return jax.jit(jax.grad(fn, **kw))



def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_masked_reducers_hand_case():
  x = jnp.array([[1.0, 2.0, 3.0], [4.0, 100.0, jnp.nan]])
  m = jnp.array([[1, 1, 0], [1, 0, 0]])
  assert float(common.masked_sum(x, m)) == 7.0
  np.testing.assert_allclose(common.masked_mean(x, m), 7.0 / 3)
  np.testing.assert_allclose(common.masked_mean(x, m, axis=1), [1.5, 4.0])
  np.testing.assert_allclose(common.masked_var(x, m), np.var([1.0, 2.0, 4.0]),
                             rtol=1e-6)
  np.testing.assert_allclose(
      common.masked_var(x, m, unbiased=True), np.var([1.0, 2.0, 4.0], ddof=1),
      rtol=1e-6)


def test_masked_mean_all_zero_mask_is_zero_with_finite_grad():
  x = jnp.array([1.0, 2.0])
  m = jnp.zeros(2)
  f = jax.jit(lambda x: common.masked_mean(x, m) + common.masked_var(x, m))
  assert float(f(x)) == 0.0
  assert np.all(np.isfinite(grad(f)(x)))


def test_masked_whiten():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(3.0, 2.0, (4, 7)), jnp.float32)
  m = jnp.asarray(rng.random((4, 7)) > 0.3)
  w = jax.jit(common.masked_whiten)(x, m)
  np.testing.assert_allclose(common.masked_mean(w, m), 0.0, atol=1e-5)
  np.testing.assert_allclose(common.masked_var(w, m), 1.0, rtol=1e-4)
  assert np.all(np.asarray(w)[~np.asarray(m)] == 0)
  w2 = common.masked_whiten(x, m, shift_mean=False)
  np.testing.assert_allclose(common.masked_mean(w2, m), common.masked_mean(x, m),
                             rtol=1e-5)


def test_token_logprobs_matches_numpy_and_is_float32_for_bf16():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (2, 5))
  got = jax.jit(common.token_logprobs)(jnp.asarray(logits), jnp.asarray(targets))
  want = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, want, atol=1e-5)
  bf = jnp.asarray(logits, jnp.bfloat16)
  got_bf = common.token_logprobs(bf, jnp.asarray(targets))
  assert got_bf.dtype == jnp.float32
  want_bf = np.take_along_axis(
      _np_log_softmax(np.asarray(bf.astype(jnp.float32))), targets[..., None],
      -1)[..., 0]
  np.testing.assert_allclose(got_bf, want_bf, atol=1e-5)


def test_token_logprobs_shape_errors():
  with pytest.raises(ValueError, match="targets"):
    common.token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="targets"):
    common.token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)))


def test_sequence_logprobs_and_entropy():
  lp = jnp.array([[-1.0, -2.0, -3.0]])
  assert float(common.sequence_logprobs(lp, jnp.array([[0, 1, 1]]))[0]) == -5.0
  logits = jnp.zeros((2, 3, 6))
  np.testing.assert_allclose(common.entropy_from_logits(logits), np.log(6.0),
                             rtol=1e-6)
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 4)).astype(np.float32)
  p = np.exp(_np_log_softmax(logits))
  np.testing.assert_allclose(
      jax.jit(common.entropy_from_logits)(logits), -(p * np.log(p)).sum(-1),
      rtol=1e-5)
  ent = common.entropy_from_logits(logits, jnp.array([1, 0, 1]))
  assert float(ent[1]) == 0.0


def test_aggregate_loss_hand_case():
  loss = jnp.array([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
  # Sequence means 2 and 2; the empty row is excluded.
  np.testing.assert_allclose(
      common.aggregate_loss(loss, mask, loss_agg="seq_mean_token_mean"), 2.0)
  np.testing.assert_allclose(
      common.aggregate_loss(loss, mask, loss_agg="token_mean"), 2.0)
  w = jnp.array([3.0, 1.0, 7.0])
  np.testing.assert_allclose(
      common.aggregate_loss(loss, mask, loss_agg="seq_mean_token_mean",
                            weights_B=w), (3 * 2 + 1 * 2) / 4)
  loss2 = loss.at[0, 0].set(7.0)   # seq means 5, 2; tokens 7, 3, 2
  np.testing.assert_allclose(
      common.aggregate_loss(loss2, mask, loss_agg="seq_mean_token_mean",
                            weights_B=w), (3 * 5 + 2) / 4)
  np.testing.assert_allclose(
      common.aggregate_loss(loss2, mask, loss_agg="token_mean", weights_B=w),
      (3 * 7 + 3 * 3 + 1 * 2) / (3 * 2 + 1))
  with pytest.raises(ValueError, match="loss_agg"):
    common.aggregate_loss(loss, mask, loss_agg="sum")
