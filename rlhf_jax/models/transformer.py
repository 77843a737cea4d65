"""Decoder-only Transformer (Llama family) in Flax Linen.

RMSNorm, rotary position embeddings (optionally Llama-3 scaled), SwiGLU MLP,
grouped-query attention, optionally tied embeddings, QKV biases (Qwen2) and
per-head QK RMSNorm (Qwen3). Every parameter carries logical axis names
(`vocab`, `embed`, `heads`, `kv`, `mlp`, `layers`) that `rlhf_jax.sharding`
maps onto the mesh. Parameters cross `jit` as plain pytrees.

One module serves every role: `head="lm"` gives next-token logits (policy,
reference), `head="scalar"` gives one value per token (reward model, critic,
advantage model) from a linear head on the final hidden state.

Layout conventions
- tokens_BxT sit in a fixed buffer. Prompts are left-padded, responses
  right-padded; `mask_BxT` marks real tokens. RoPE positions count real tokens
  (`cumsum(mask) - 1`), so padding never shifts a position.
- A KV cache is a tuple with one dict `{"k", "v"}` of `[B, Hkv, S, Dh]` arrays
  per layer, indexed by buffer slot (`init_cache`). A call with a cache writes
  its T tokens at `cache_index` and attends to every valid slot at or before
  its own (`kv_mask_BxS` marks the valid slots of the whole buffer). The cache
  path runs the layers unrolled (`scan_layers=False`, params in the `layer_{i}`
  layout, see `unscan_params`): each layer's cache is then its own buffer, which
  a decode loop updates in place and the attention matmuls read directly, with
  no per-step slice or transpose copy of the cache.
- Dense kernels are stored input axes first (`[in..., out...]`, e.g. wq
  `[D, H, Dh]`). `Transformer(kernel_layout="out_in")` reads them with the input
  axes last instead (torch's `[out, in]` Linear layout), as `kernels_out_in`
  lays them out: same values, other memory order, the form XLA:CPU's small-row
  matmuls ran fastest on an AVX2 CPU (the sampler's decode, issue 15).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig

Array = jax.Array
_NEG_INF = -1e30


def _dtype(name: str):
  return jnp.dtype(name)


def _param(module: nn.Module, name: str, shape, axes, init, cfg: ModelConfig):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, _dtype(cfg.param_dtype))


KERNEL_LAYOUTS = ("in_out", "out_in")
# Dense kernels by name, with their number of input axes (the leading ones in the stored "in_out" layout).
_KERNEL_INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1, "lm_head": 1}


def _kernel(module: nn.Module, name: str, shape, axes, init, cfg: ModelConfig, layout: str):
  """A dense kernel of logical shape `shape` = [in..., out...], stored in `layout` ("out_in": input axes last)."""
  if layout not in KERNEL_LAYOUTS:
    raise ValueError(f"kernel_layout must be one of {KERNEL_LAYOUTS}, got {layout!r}")
  if layout == "out_in":
    n_in = _KERNEL_INPUT_AXES[name]
    shape, axes = tuple(shape[n_in:]) + tuple(shape[:n_in]), tuple(axes[n_in:]) + tuple(axes[:n_in])
  return _param(module, name, shape, axes, init, cfg)


def kernels_out_in(params: Any) -> Any:
  """Params with every dense kernel's input axes moved last (the `kernel_layout="out_in"` storage).

  Takes unrolled params (`unscan_params`: one `layer_{i}` per layer); the embedding, norms, biases and a
  scalar head stay as they are. Inside one `jit`, XLA folds a transpose into the dot that reads it; a
  caller that wants the new memory order must produce it apart (`Sampler` puts an optimization barrier
  between this and its decode loop).
  """
  if "layers" in params:
    raise ValueError("kernels_out_in takes unrolled params (unscan_params), got a stacked 'layers' tree")

  def move(path, w):
    name = getattr(path[-1], "key", None)
    n_in = _KERNEL_INPUT_AXES.get(name)
    return w if n_in is None else jnp.moveaxis(w, tuple(range(n_in)), tuple(range(w.ndim - n_in, w.ndim)))

  return jax.tree_util.tree_map_with_path(move, params)


def positions_from_mask(mask_BxT: Array) -> Array:
  """RoPE position of every slot: the number of real tokens before it."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[tuple] = None) -> Array:
  """Inverse frequencies [head_dim / 2] of the rotary embedding, float32.

  inv_freq_i = theta^(-2i / head_dim). `scaling` (ModelConfig.rope_scaling)
  rescales them as Hugging Face does: "linear" divides by `factor`; "llama3"
  (Llama 3.1) keeps wavelengths below original_len / high_freq_factor, divides
  those above original_len / low_freq_factor by `factor`, and in between
  interpolates with s = (original_len / wavelen - low) / (high - low):
  inv_freq' = (1 - s) * inv_freq / factor + s * inv_freq.
  """
  d = head_dim
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  if scaling is None:
    return inv_freq
  sc = dict(scaling)
  factor = float(sc["factor"])
  if sc["rope_type"] == "linear":
    return inv_freq / factor
  if sc["rope_type"] != "llama3":
    raise ValueError(f"rope_scaling type {sc['rope_type']!r} is not supported")
  low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
  old_len = float(sc["original_max_position_embeddings"])
  low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
  wavelen = 2 * jnp.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_BxTxHxD: Array, positions_BxT: Array, theta: float, scaling: Optional[tuple] = None) -> Array:
  """Rotary embedding, rotate-half convention (as Llama in Hugging Face)."""
  d = x_BxTxHxD.shape[-1]
  inv_freq = rope_inv_freq(d, theta, scaling)
  angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(angles_BxTxF)[:, :, None, :]
  sin = jnp.sin(angles_BxTxF)[:, :, None, :]
  x = x_BxTxHxD.astype(jnp.float32)
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale over the last axis, in float32; `axes` names that axis."""
  cfg: ModelConfig
  axes: tuple = ("embed",)

  @nn.compact
  def __call__(self, x):
    scale = _param(self, "scale", (x.shape[-1],), self.axes, nn.initializers.ones, self.cfg)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (y * scale.astype(jnp.float32)).astype(_dtype(self.cfg.dtype))


def _row_major_transpose(a: Array) -> Array:
  """a.T [N, M] of a 2-D `a` as a row-major copy that XLA cannot fold back into the consuming dot.

  XLA:CPU folds a transpose into the dot that reads it (contracting the lhs over its rows), and runs such
  a dot, when bfloat16, upcast to float32 (`operand_upcaster`: YNNPACK's bfloat16 kernels take a row-major
  lhs contracted over its last axis only). Flattening behind an optimization barrier forces the copy.
  """
  return jax.lax.optimization_barrier(a.T.reshape(-1)).reshape(a.shape[1], a.shape[0])


def _dot_f32_acc(a_MxK: Array, b: Array, b_contract: int) -> Array:
  """a @ b (`b_contract` 0: b is [K, N]) or a @ bᵀ (1: b is [N, K]), low-precision inputs, float32 result.

  The optimization barriers keep XLA from folding a transpose of an operand or of the result into the
  dot after its `operand_upcaster` has judged it a YNNPACK bfloat16 dot: the folded dot is no longer one
  YNNPACK takes, and XLA:CPU (jax 0.10.2) then fails at run time ("Unsupported element type for
  DotThunk::Execute: BF16 x BF16 = F32"; seen on the transpose of a weight gradient).
  """
  a_MxK, b = jax.lax.optimization_barrier((a_MxK, b))
  out = jax.lax.dot_general(a_MxK, b, (((1,), (b_contract,)), ((), ())), preferred_element_type=jnp.float32)
  return jax.lax.optimization_barrier(out)


@functools.lru_cache(maxsize=None)
def _f32_acc_matmul(x_dtype, w_dtype, dtype, w_transposed: bool) -> Callable[[Array, Array], Array]:
  """x [M, K] @ w [K, N] (or @ wᵀ for `w_transposed`, w [N, K] as stored) with both cast to the
  low-precision `dtype`, accumulated and returned in float32; so are the gradient products, whose
  results come back in x's and w's own dtypes (a float32 weight gets its gradient unrounded).

  Every product is a row-major dot contracted over the lhs' last axis, the form YNNPACK (XLA:CPU's matmul
  library) runs on bfloat16 inputs with float32 output: on an AMX CPU 4–5× the float32 rate, with AVX-512 BF16
  only ≈ 2× (issue 15, experiments/RESULTS.md). Autodiff of `jnp.dot(x, w, preferred_element_type=float32)` would
  give float32 × bfloat16 and transposed-lhs products, which XLA:CPU runs in float32.
  """
  w_contract = 1 if w_transposed else 0

  def fwd(x_MxK, w):
    x_MxK, w = x_MxK.astype(dtype), w.astype(dtype)
    return _dot_f32_acc(x_MxK, w, w_contract), (x_MxK, w)

  def bwd(res, g_MxN):
    x_MxK, w = res
    g_MxN = g_MxN.astype(dtype)
    dx = _dot_f32_acc(g_MxN, w, 1 - w_contract)                                   # g @ wᵀ
    if w_transposed:
      dw = _dot_f32_acc(_row_major_transpose(g_MxN), x_MxK, 0)                    # gᵀ @ x: [N, K]
    else:
      dw = _dot_f32_acc(_row_major_transpose(x_MxK), g_MxN, 0)                    # xᵀ @ g: [K, N]
    return dx.astype(x_dtype), dw.astype(w_dtype)

  matmul = jax.custom_vjp(lambda x_MxK, w: fwd(x_MxK, w)[0])
  matmul.defvjp(fwd, bwd)
  return matmul


def matmul(x_MxK: Array, w: Array, dtype, w_transposed: bool = False, out_dtype=None) -> Array:
  """x @ w (w [K, N]), or x @ wᵀ with `w_transposed` (w [N, K], e.g. a tied embedding as stored), with both
  operands cast to the compute dtype `dtype`; the result in `out_dtype` (default `dtype`).

  The model's every weight product goes through here. Sub-float32 dtypes on the CPU backend accumulate in
  float32 (`_f32_acc_matmul`: bfloat16 → float32 is the form XLA:CPU runs fast; bfloat16 → bfloat16 it runs
  at about the float32 rate or below); elsewhere (float32; accelerators, whose bfloat16 dots accumulate in
  float32 anyway) a plain `jnp.dot`. `out_dtype=jnp.float32` keeps the float32 accumulator unrounded (the LM
  head's logits).
  """
  dtype = jnp.dtype(dtype)
  out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
  if dtype.itemsize >= 4 or jax.default_backend() != "cpu":
    out = jnp.dot(x_MxK.astype(dtype), (w.T if w_transposed else w).astype(dtype), preferred_element_type=out_dtype)
    return out.astype(out_dtype)
  fn = _f32_acc_matmul(jnp.dtype(x_MxK.dtype), jnp.dtype(w.dtype), dtype, w_transposed)
  return fn(x_MxK, w).astype(out_dtype)


def _dense(x, kernel, dtype, layout: str = "in_out", n_in: int = 1):
  """x[..., in] @ kernel on flattened 2-D views (faster grads on XLA:CPU); the kernel's `n_in` input axes
  lead (`layout` "in_out") or trail ("out_in"), and the result has the kernel's output axes."""
  lead = x.shape[:-1]
  if layout == "out_in":
    out_shape = kernel.shape[:kernel.ndim - n_in]
    y = matmul(x.reshape(-1, x.shape[-1]), kernel.reshape(-1, x.shape[-1]), dtype, w_transposed=True)
  else:
    out_shape = kernel.shape[n_in:]
    y = matmul(x.reshape(-1, x.shape[-1]), kernel.reshape(x.shape[-1], -1), dtype)
  return y.reshape(*lead, *out_shape)


class Attention(nn.Module):
  cfg: ModelConfig
  kernel_layout: str = "in_out"

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, attn_bias_BxTxS, cache, cache_index, q_from=0):
    """Keys and values from all T positions, queries (and the output) from positions [q_from, T) only."""
    cfg = self.cfg
    dt = _dtype(cfg.dtype)
    h, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    init = nn.initializers.normal(stddev=cfg.dim ** -0.5)
    lay = self.kernel_layout
    wq = _kernel(self, "wq", (cfg.dim, h, hd), ("embed", "heads", "kv"), init, cfg, lay)
    wk = _kernel(self, "wk", (cfg.dim, kvh, hd), ("embed", "heads", "kv"), init, cfg, lay)
    wv = _kernel(self, "wv", (cfg.dim, kvh, hd), ("embed", "heads", "kv"), init, cfg, lay)
    wo = _kernel(self, "wo", (h, hd, cfg.dim), ("heads", "kv", "embed"),
                 nn.initializers.normal(stddev=(h * hd) ** -0.5 / (2 * cfg.n_layers) ** 0.5), cfg, lay)

    q, k, v = _dense(x_BxTxD[:, q_from:], wq, dt, lay), _dense(x_BxTxD, wk, dt, lay), _dense(x_BxTxD, wv, dt, lay)
    if cfg.qkv_bias:  # Qwen2
      q = q + _param(self, "bq", (h, hd), ("heads", "kv"), nn.initializers.zeros, cfg).astype(dt)
      k = k + _param(self, "bk", (kvh, hd), ("heads", "kv"), nn.initializers.zeros, cfg).astype(dt)
      v = v + _param(self, "bv", (kvh, hd), ("heads", "kv"), nn.initializers.zeros, cfg).astype(dt)
    if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
      q = RMSNorm(cfg, axes=("kv",), name="q_norm")(q)
      k = RMSNorm(cfg, axes=("kv",), name="k_norm")(k)
    q = apply_rope(q, positions_BxT[:, q_from:], cfg.rope_theta, cfg.rope_scaling)
    k = apply_rope(k, positions_BxT, cfg.rope_theta, cfg.rope_scaling)

    b, t = q.shape[:2]
    # Heads before positions: (b, k) are the leading batch dims of both attention matmuls and each
    # produces its result in the layout the next op reads. With the [B, T, Hkv, G, Dh] layout XLA
    # computed the scores as k·qᵀ and copy-transposed the [B, Hkv, G, T, S] block after every
    # forward (issue 15: scoring forwards ~10% faster this way).
    q = q.reshape(b, t, kvh, h // kvh, hd).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, Dh]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # [B, Hkv, T, Dh]
    if cache is not None:
      # This layer's cache {"k","v"}: [B, Hkv, S, Dh], in the same heads-first layout, so the
      # (loop-carried, in-place updated) buffer is read as it is: the [B, S, Hkv, Dh] layout
      # made XLA copy-transpose the whole layer cache at every decode step.
      at = (0, 0, cache_index, 0)
      cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at),
               "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)}
      k, v = cache["k"].astype(dt), cache["v"].astype(dt)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (hd ** -0.5) + attn_bias_BxTxS[:, None, None, q_from:, :]
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v).transpose(0, 3, 1, 2, 4).reshape(b * t, h * hd)
    y = _dense(out, wo, dt, lay, n_in=2).reshape(b, t, cfg.dim)
    return y, cache


class MLP(nn.Module):
  cfg: ModelConfig
  kernel_layout: str = "in_out"

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt = _dtype(cfg.dtype)
    lay = self.kernel_layout
    init = nn.initializers.normal(stddev=cfg.dim ** -0.5)
    w_gate = _kernel(self, "w_gate", (cfg.dim, cfg.mlp_dim), ("embed", "mlp"), init, cfg, lay)
    w_up = _kernel(self, "w_up", (cfg.dim, cfg.mlp_dim), ("embed", "mlp"), init, cfg, lay)
    w_down = _kernel(self, "w_down", (cfg.mlp_dim, cfg.dim), ("mlp", "embed"),
                     nn.initializers.normal(stddev=cfg.mlp_dim ** -0.5 / (2 * cfg.n_layers) ** 0.5), cfg, lay)
    hidden = nn.silu(_dense(x, w_gate, dt, lay)) * _dense(x, w_up, dt, lay)
    return _dense(hidden, w_down, dt, lay)


class Block(nn.Module):
  cfg: ModelConfig
  kernel_layout: str = "in_out"

  @nn.compact
  def __call__(self, x, cache, positions, attn_bias, cache_index, q_from=0):
    """One layer; `cache` is this layer's `{"k","v"}` cache (or None).

    `q_from` (static): return positions [q_from, T) only; the others still give their keys and values.
    """
    y, cache = Attention(self.cfg, self.kernel_layout, name="attn")(RMSNorm(self.cfg, name="attn_norm")(x),
                                                                    positions, attn_bias, cache, cache_index, q_from)
    x = x[:, q_from:] + y
    x = x + MLP(self.cfg, self.kernel_layout, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x))
    return x, cache


class _ScanBlock(nn.Module):
  """Block with the (carry, broadcast...) signature nn.scan expects; the carry is the hidden state.

  Only the cache-free forward scans its layers (the cache path runs them unrolled).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, attn_bias, cache_index):
    x, _ = Block(self.cfg, name="block")(x, None, positions, attn_bias, cache_index)
    return x, None


def attention_bias(mask_BxT: Array, kv_mask_BxS: Optional[Array], cache_index) -> Array:
  """Additive attention bias: causal over buffer slots and blind to padding.

  Without a cache the keys are the T query tokens; with one they are the S
  buffer slots and query t sits at slot `cache_index + t`.
  """
  t = mask_BxT.shape[1]
  if kv_mask_BxS is None:
    q_slot, k_slot, k_valid = jnp.arange(t), jnp.arange(t), mask_BxT
  else:
    q_slot = cache_index + jnp.arange(t)
    k_slot, k_valid = jnp.arange(kv_mask_BxS.shape[1]), kv_mask_BxS
  allowed = (k_slot[None, None, :] <= q_slot[None, :, None]) & (k_valid[:, None, :] > 0)
  # A fully masked row (a padding query) would softmax over nothing: let it see itself.
  if kv_mask_BxS is None:
    allowed = allowed | jnp.eye(t, dtype=bool)[None]
  else:
    allowed = allowed | (k_slot[None, None, :] == q_slot[None, :, None])
  return jnp.where(allowed, 0.0, _NEG_INF).astype(jnp.float32)


class Transformer(nn.Module):
  """Decoder-only LM; `head` is "lm" (logits) or "scalar" (per-token values).

  __call__(tokens_BxT, mask_BxT, *, positions_BxT=None, cache=None,
           cache_index=0, kv_mask_BxS=None, return_hidden=False, out_from=0)
    -> (out, new_cache)  where out is logits [B,T,V] (float32: the head's
       accumulator, not rounded to the compute dtype), values [B,T] (float32),
       or, with return_hidden, the final normalised hidden states [B,T,D] (in
       the compute dtype).
  `out_from` (a static int) returns `out` for positions [out_from, T) only: the
  final norm and the head skip the positions nobody reads (the prompt, when only
  a completion is scored), which for a large vocabulary is much of a forward, and
  on straight-line layers so does the last layer's query side (q, attention, o,
  MLP; every position still gives it keys and values).
  `kernel_layout="out_in"` reads the dense kernels with their input axes last
  (params through `kernels_out_in`; unrolled layers only).
  """

  cfg: ModelConfig
  head: str = "lm"
  kernel_layout: str = "in_out"

  @nn.compact
  def __call__(self, tokens_BxT, mask_BxT=None, *, positions_BxT=None, cache=None, cache_index=0,
               kv_mask_BxS=None, return_hidden=False, out_from=0):
    cfg = self.cfg
    if self.head not in ("lm", "scalar"):
      raise ValueError(f"Transformer.head must be 'lm' or 'scalar', got {self.head!r}")
    if mask_BxT is None:
      mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    if positions_BxT is None:
      positions_BxT = positions_from_mask(mask_BxT)
    if (cache is None) != (kv_mask_BxS is None):
      raise ValueError("cache and kv_mask_BxS must be given together")
    if cache is not None and (cfg.scan_layers or len(cache) != cfg.n_layers):
      raise ValueError("a KV cache needs the unrolled model (ModelConfig.scan_layers=False, params through "
                       f"unscan_params) and one cache entry per layer ({cfg.n_layers}), got scan_layers="
                       f"{cfg.scan_layers} and {len(cache)} entries")
    if self.kernel_layout not in KERNEL_LAYOUTS:
      raise ValueError(f"kernel_layout must be one of {KERNEL_LAYOUTS}, got {self.kernel_layout!r}")
    if self.kernel_layout != "in_out" and cfg.scan_layers:
      raise ValueError(f"kernel_layout={self.kernel_layout!r} needs the unrolled model (ModelConfig.scan_layers="
                       "False, params through kernels_out_in(unscan_params(cfg, params)))")
    dt = _dtype(cfg.dtype)

    embed = _param(self, "embedding", (cfg.vocab_size, cfg.dim), ("vocab", "embed"),
                   nn.initializers.normal(stddev=0.02), cfg)
    x = jnp.take(embed, tokens_BxT, axis=0).astype(dt)
    bias = attention_bias(mask_BxT, kv_mask_BxS, cache_index)

    if not 0 <= out_from < x.shape[1]:
      raise ValueError(f"out_from={out_from} must lie in [0, T={x.shape[1]})")
    # The last layer computes queries, attention output and MLP for positions [out_from, T) only: the rest of
    # its work would feed outputs nobody reads (issue 15: ~1/(2L) of a scoring forward and backward when the
    # prompt is half the sequence). That needs the layers as straight-line code: unrolled layers, or a layer
    # scan unrolled completely (the CPU default), whose stacked weights are then applied layer by layer.
    # A partly unrolled scan (the accelerator default) runs every layer on all T positions and slices after.
    # A scan_layers model also runs on its params' per-layer view (`unscan_params`: `layer_{i}` trees, same
    # values), as straight-line layers: what the steps' chunk loops hand it on CPU (`make_apply_fn`'s
    # `layer_views`), so that no chunk slices the stacked weights or concatenates their gradients again.
    given = {} if self.is_initializing() else self.variables.get("params", {})
    per_layer_view = cfg.scan_layers and "layers" not in given and "layer_0" in given
    if cfg.scan_layers and not per_layer_view and (self.is_initializing() or cfg.scan_unroll < cfg.n_layers):
      stack = nn.scan(
          _ScanBlock,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.n_layers,
          unroll=min(cfg.scan_unroll, cfg.n_layers),
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="layers")
      x, _ = stack(x, positions_BxT, bias, cache_index)
      x = x[:, out_from:]
      new_cache = None
    elif cfg.scan_layers and not per_layer_view:
      stacked = nn.meta.unbox(self.variables["params"]["layers"]["block"])  # [L, ...] leaves, as nn.scan made them
      block = Block(cfg, parent=None)
      for i in range(cfg.n_layers):
        x, _ = block.apply({"params": jax.tree.map(lambda w, i=i: w[i], stacked)}, x, None, positions_BxT, bias,
                           cache_index, out_from if i == cfg.n_layers - 1 else 0)
      new_cache = None
    else:
      caches = []
      for i in range(cfg.n_layers):
        x, c = Block(cfg, self.kernel_layout, name=f"layer_{i}")(
            x, None if cache is None else cache[i], positions_BxT, bias, cache_index,
            out_from if i == cfg.n_layers - 1 else 0)
        caches.append(c)
      new_cache = None if cache is None else tuple(caches)

    h = RMSNorm(cfg, name="final_norm")(x)
    if return_hidden:
      return h, new_cache
    if self.head == "scalar":
      w = _param(self, "score_head", (cfg.dim, 1), ("embed", None), nn.initializers.zeros, cfg)
      b = self.param("score_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (1,),
                     _dtype(cfg.param_dtype))
      values = jnp.dot(h.reshape(-1, cfg.dim).astype(jnp.float32), w.astype(jnp.float32)) + b.astype(jnp.float32)
      return values.reshape(h.shape[:2]), new_cache
    if cfg.tie_embeddings:
      logits = matmul(h.reshape(-1, cfg.dim), embed, dt, w_transposed=True, out_dtype=jnp.float32)
    else:
      w = _kernel(self, "lm_head", (cfg.dim, cfg.vocab_size), ("embed", "vocab"),
                  nn.initializers.normal(stddev=cfg.dim ** -0.5), cfg, self.kernel_layout)
      logits = matmul(h.reshape(-1, cfg.dim), w, dt, w_transposed=self.kernel_layout == "out_in",
                      out_dtype=jnp.float32)
    return logits.reshape(*h.shape[:2], cfg.vocab_size), new_cache


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = None) -> tuple:
  """Zeroed KV cache: one `{"k","v"}: [B, Hkv, S, Dh]` per layer, in the compute dtype."""
  shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
  dt = _dtype(cfg.dtype) if dtype is None else dtype
  return tuple({"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(cfg.n_layers))


def unscan_params(cfg: ModelConfig, params: Any) -> Any:
  """Params of a `scan_layers` model in the `layer_{i}` layout of the same model unrolled.

  The cache (sampling) path runs `Transformer(dataclasses.replace(cfg, scan_layers=False))`
  on these, and the `scan_layers` model itself accepts them (straight-line layers). Inside `jit`
  the per-layer slices are taken once, outside any decode or chunk loop.
  """
  if not cfg.scan_layers or "layers" not in params:
    return params
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(cfg.n_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"]["block"])
  return out


def rescan_params(cfg: ModelConfig, params: Any) -> Any:
  """The inverse of `unscan_params`: `layer_{i}` trees stacked back into the `layers` tree of a `scan_layers`
  model (e.g. gradients accumulated per layer)."""
  if not cfg.scan_layers or "layer_0" not in params:
    return params
  names = [f"layer_{i}" for i in range(cfg.n_layers)]
  out = {k: v for k, v in params.items() if k not in names}
  out["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])}
  return out
