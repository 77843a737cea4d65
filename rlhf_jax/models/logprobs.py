"""Token log-probabilities without materialising [B, T, V] float32 logits.

At a real vocabulary (128k Llama 3, 152k Qwen) the float32 logits of a
modest batch are gigabytes: [4, 512, 151936] is 1.2 GB, and the backward pass
holds as much again. `chunked_completion_logprobs` takes the final hidden
states and the unembedding matrix instead and walks the sequence in chunks
of `chunk` positions (`lax.map`), each chunk under `jax.checkpoint`: the
forward keeps only the per-token results, the backward recomputes one
chunk's logits at a time. Peak memory is O(B · chunk · V) instead of
O(B · T · V); the result equals the plain path (logits -> log_softmax ->
gather) to float32 rounding, in values and gradients.

    logp[b, t]    = z[b, t, y[b, t]] - logsumexp_v z[b, t, v],  z = (h @ W) / temperature
    entropy[b, t] = logsumexp_v z - sum_v softmax(z)_v z_v
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import matmul


def head_logits(hidden_MxD: jax.Array, params, cfg: ModelConfig) -> jax.Array:
  """float32 logits [M, V] of final hidden states [M, D]: the product the model's LM head computes (the tied
  embedding read as stored, no transposed copy; `transformer.matmul`)."""
  if cfg.tie_embeddings:
    return matmul(hidden_MxD, params["embedding"], cfg.dtype, w_transposed=True, out_dtype=jnp.float32)
  return matmul(hidden_MxD, unembedding(params, cfg), cfg.dtype, out_dtype=jnp.float32)


def unembedding(params, cfg: ModelConfig) -> jax.Array:
  """The [D, V] matrix mapping final hidden states to logits: the tied embedding's transpose or lm_head."""
  if cfg.tie_embeddings:
    return params["embedding"].T
  if "lm_head" not in params:
    raise ValueError("params have no lm_head (an untied ModelConfig needs one)")
  return params["lm_head"]


def chunked_completion_logprobs(hidden_BxTxD: jax.Array, unembed_DxV: jax.Array, targets_BxT: jax.Array, *,
                                chunk: int, temperature: float = 1.0, with_entropy: bool = False,
                                compute_dtype: Optional[jnp.dtype] = None, transposed: bool = False):
  """Log-probability of `targets_BxT` under softmax(hidden @ unembed / temperature), chunk by chunk.

  Args:
    hidden_BxTxD: final (normalised) hidden states, e.g. `apply_fn(..., return_hidden=True)`; position t
      predicts `targets_BxT[:, t]` (pass the hidden states of positions 0..T-2 and the tokens 1..T-1).
    unembed_DxV: the unembedding matrix (`unembedding(params, cfg)`).
    targets_BxT: int token ids.
    chunk: positions per chunk; T need not be a multiple (the last chunk is padded and its padding dropped).
    temperature: logits are divided by it (the sampled distribution's log-probs).
    with_entropy: also return the per-token entropy of the distribution.
    compute_dtype: dtype of the matmul inputs (default: hidden's); accumulation, softmax and outputs are float32.
    transposed: `unembed_DxV` is given as its transpose [V, D] (a tied embedding as stored), read as it is.

  Returns:
    logp_BxT float32, or (logp_BxT, entropy_BxT) with `with_entropy`.
  """
  if hidden_BxTxD.ndim != 3:
    raise ValueError(f"hidden_BxTxD must be [B, T, D], got shape {hidden_BxTxD.shape}")
  b, t, d = hidden_BxTxD.shape
  if unembed_DxV.ndim != 2 or unembed_DxV.shape[1 if transposed else 0] != d:
    want = f"[V, D={d}] (transposed=True)" if transposed else f"[D={d}, V]"
    raise ValueError(f"unembed_DxV must be {want}, got shape {unembed_DxV.shape}")
  if targets_BxT.shape != (b, t):
    raise ValueError(f"targets_BxT must be [B, T] = {(b, t)}, got shape {targets_BxT.shape}")
  if int(chunk) <= 0:
    raise ValueError(f"chunk must be positive, got {chunk}")
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  chunk = min(int(chunk), t)
  n = -(-t // chunk)
  pad = n * chunk - t
  dt = compute_dtype or hidden_BxTxD.dtype
  h = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  y = jnp.pad(targets_BxT.astype(jnp.int32), ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(h_BxCxD, y_BxC, w):
    # The model's head product (float32 accumulator; on the CPU the bfloat16 form XLA runs fast). `w` enters in
    # its own dtype so that its gradient is summed over the chunks in that dtype, not rounded to `dt` first.
    z = matmul(h_BxCxD.reshape(-1, d), w, dt, w_transposed=transposed, out_dtype=jnp.float32)
    z = z.reshape(*h_BxCxD.shape[:2], -1) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    logp = jnp.take_along_axis(z, y_BxC[..., None], axis=-1)[..., 0] - lse
    if not with_entropy:
      return logp, jnp.zeros_like(logp)
    return logp, lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)

  logp_NxBxC, ent_NxBxC = jax.lax.map(lambda xs: one_chunk(xs[0], xs[1], unembed_DxV), (h, y))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
  if with_entropy:
    return unchunk(logp_NxBxC), unchunk(ent_NxBxC)
  return unchunk(logp_NxBxC)
