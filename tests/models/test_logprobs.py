"""Chunked log-probs equal the plain logits -> log_softmax path, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models.logprobs import chunked_completion_logprobs, head_logits, unembedding

B, T, D, V = 2, 13, 16, 50


def _inputs(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(k1, (B, T, D)), jax.random.normal(k2, (D, V)) * 0.5,
          jax.random.randint(k3, (B, T), 0, V))


def _plain(h, w, y, temperature=1.0):
  logits = (h @ w) / temperature
  logp_all = jax.nn.log_softmax(logits, -1)
  logp = jnp.take_along_axis(logp_all, y[..., None], -1)[..., 0]
  return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, -1)


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])  # divides T, does not, whole, larger than T
def test_values_and_entropy_equal_plain(chunk):
  h, w, y = _inputs()
  logp, ent = jax.jit(lambda h, w, y: chunked_completion_logprobs(h, w, y, chunk=chunk, with_entropy=True,
                                                                  temperature=0.7))(h, w, y)
  ref_logp, ref_ent = _plain(h, w, y, 0.7)
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)
  assert logp.shape == (B, T) and logp.dtype == jnp.float32


def test_gradients_equal_plain():
  h, w, y = _inputs(1)
  weights = jax.random.uniform(jax.random.PRNGKey(9), (B, T))  # e.g. advantages x mask

  def loss(fn):
    def f(h, w):
      logp, ent = fn(h, w)
      return jnp.sum(weights * logp) + 0.1 * jnp.sum(ent)
    return jax.jit(jax.grad(f, argnums=(0, 1)))

  got = loss(lambda h, w: chunked_completion_logprobs(h, w, y, chunk=4, with_entropy=True))(h, w)
  want = loss(lambda h, w: _plain(h, w, y))(h, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_from_the_model_equals_its_logits():
  for tie in (True, False):
    cfg = models.ModelConfig(vocab_size=V, dim=D, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=24, max_seq_len=32,
                             tie_embeddings=tie)
    params = models.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, V)
    apply_fn = models.make_apply_fn(cfg)
    logits, _ = apply_fn(params, tokens)
    hidden, _ = apply_fn(params, tokens, return_hidden=True)
    want = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
    got = chunked_completion_logprobs(hidden[:, :-1], unembedding(params, cfg), tokens[:, 1:], chunk=4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _bf16_round(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transposed_unembedding_is_read_as_stored(dtype):
  # `transposed=True` takes the [V, D] matrix (a tied embedding as stored): the same log-probs and entropies as
  # its [D, V] transpose, and the gradient is the transpose of that one's. In bfloat16 the products are those of
  # the bfloat16-rounded operands accumulated in float32 (the closed form below, in float64), and the float32
  # matrix gets a float32 gradient.
  h, w, y = _inputs(2)
  weights = jax.random.uniform(jax.random.PRNGKey(9), (B, T))

  def grads(transposed):
    def f(h, w):
      logp, ent = chunked_completion_logprobs(h, w, y, chunk=4, with_entropy=True, compute_dtype=dtype,
                                              transposed=transposed)
      return jnp.sum(weights * logp) + 0.1 * jnp.sum(ent), (logp, ent)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w.T if transposed else w)

  (_, (logp, ent)), (gh, gw) = grads(False)
  (_, (logp_t, ent_t)), (gh_t, gw_vd) = grads(True)
  assert gw_vd.shape == (V, D) and gw_vd.dtype == jnp.float32 and logp_t.dtype == jnp.float32
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logp_t, logp, **tol)
  np.testing.assert_allclose(ent_t, ent, **tol)
  np.testing.assert_allclose(gh_t, gh, **tol)
  np.testing.assert_allclose(gw_vd.T, gw, **tol)
  if dtype == jnp.bfloat16:  # closed form: float64 logits of the rounded operands
    z = _bf16_round(h) @ _bf16_round(w)
    logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = np.take_along_axis(logp_all, np.asarray(y)[..., None], -1)[..., 0]
    np.testing.assert_allclose(logp_t, want, rtol=1e-4, atol=1e-4)


def test_head_logits_are_the_models_logits():
  # The sampler's prefill computes its last position's logits with `head_logits`: the model head's product.
  for tie in (True, False):
    for dtype in ("float32", "bfloat16"):
      cfg = models.ModelConfig(vocab_size=V, dim=D, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=24, max_seq_len=32,
                               tie_embeddings=tie, dtype=dtype)
      params = models.init_params(cfg, jax.random.PRNGKey(0))
      tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, V)
      apply_fn = jax.jit(models.make_apply_fn(cfg), static_argnames="return_hidden")
      logits, _ = apply_fn(params, tokens)
      hidden, _ = apply_fn(params, tokens, return_hidden=True)
      got = jax.jit(lambda h, p, cfg=cfg: head_logits(h, p, cfg))(hidden.reshape(-1, D), params)
      assert got.dtype == logits.dtype == jnp.float32
      np.testing.assert_allclose(got.reshape(logits.shape), logits, rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_named():
  h, w, y = _inputs()
  with pytest.raises(ValueError, match="unembed_DxV"):
    chunked_completion_logprobs(h, w.T, y, chunk=4)
  with pytest.raises(ValueError, match=r"\[V, D=16\] \(transposed=True\)"):
    chunked_completion_logprobs(h, w, y, chunk=4, transposed=True)
  with pytest.raises(ValueError, match="targets_BxT"):
    chunked_completion_logprobs(h, w, y[:, 1:], chunk=4)
  with pytest.raises(ValueError, match="chunk"):
    chunked_completion_logprobs(h, w, y, chunk=0)
