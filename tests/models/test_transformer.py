"""The decoder-only Transformer: shapes, presets, causality, padding, heads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import models
from rlhf_jax.models import get_model_config
from rlhf_jax.models.transformer import unscan_params


@pytest.fixture(scope="module")
def tiny():
  cfg = get_model_config("tiny")
  return cfg, models.init_params(cfg, jax.random.PRNGKey(0)), jax.jit(models.make_apply_fn(cfg))


def test_preset_sizes_match_issue():
  tiny, small = get_model_config("tiny"), get_model_config("small")
  assert 0.5e6 < models.count_params(models.abstract_params(tiny)) == tiny.num_params() < 1.5e6
  assert 15e6 < models.count_params(models.abstract_params(small)) == small.num_params() < 25e6


@pytest.mark.parametrize("preset,expected", [("llama_1b", 1.236e9), ("llama_8b", 8.03e9)])
def test_llama_shapes_abstract_only(preset, expected):
  cfg = get_model_config(preset)
  abstract = models.abstract_params(cfg)  # eval_shape: nothing is allocated
  n = models.count_params(abstract)
  assert n == cfg.num_params()
  assert abs(n - expected) / expected < 0.01
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(abstract))


def test_every_parameter_has_logical_axes(tiny):
  cfg, params, _ = tiny
  specs = models.logical_axes(cfg)
  known = {"vocab", "embed", "heads", "kv", "mlp", "layers", None}
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  shapes = jax.tree.leaves(params)
  assert len(leaves) == len(shapes)
  for spec, arr in zip(leaves, shapes):
    assert len(spec) == arr.ndim and set(spec) <= known and any(a is not None for a in spec)


def test_causal(tiny):
  cfg, params, apply = tiny
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 256)
  changed = tokens.at[:, 8:].set(7)
  a, _ = apply(params, tokens)
  b, _ = apply(params, changed)
  np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)
  assert np.abs(np.asarray(a[:, 8:] - b[:, 8:])).max() > 1e-3


def test_left_padding_changes_nothing(tiny):
  cfg, params, apply = tiny
  seq = jnp.array([[257, 10, 20, 30, 40]])
  ref, _ = apply(params, seq)
  padded = jnp.concatenate([jnp.full((1, 3), 256), seq], 1)
  mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
  out, _ = apply(params, padded, mask)
  np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5, rtol=1e-5)


def test_scan_and_unrolled_layers_agree(tiny):
  cfg, params, apply = tiny
  unrolled_cfg = get_model_config("tiny", scan_layers=False)
  blocks = params["layers"]["block"]
  unrolled = {k: v for k, v in params.items() if k != "layers"}
  for i in range(cfg.n_layers):
    unrolled[f"layer_{i}"] = jax.tree.map(lambda x: x[i], blocks)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, 256)
  a, _ = apply(params, tokens)
  b, _ = jax.jit(models.make_apply_fn(unrolled_cfg))(unrolled, tokens)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_compute_is_close_to_f32(tiny):
  cfg, params, apply = tiny
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 256)
  ref, _ = apply(params, tokens)
  apply16 = jax.jit(models.make_apply_fn(get_model_config("tiny", dtype="bfloat16")), static_argnames="return_hidden")
  out, _ = apply16(params, tokens)
  # The activations are bfloat16; the logits are the head's float32 accumulator, not rounded to bfloat16.
  assert apply16(params, tokens, return_hidden=True)[0].dtype == jnp.bfloat16
  assert out.dtype == jnp.float32
  p32 = jax.nn.softmax(ref, -1)
  p16 = jax.nn.softmax(out.astype(jnp.float32), -1)
  assert float(jnp.abs(p32 - p16).sum(-1).max()) < 0.05


@pytest.mark.parametrize("w_transposed", [False, True])
def test_bf16_matmul_is_the_float32_product_of_the_rounded_inputs(w_transposed):
  # On the CPU a bfloat16 `matmul` accumulates in float32 (custom VJP): its value and both gradients must be
  # the exact products of the bfloat16-rounded operands (cotangent included), up to float32 summation order,
  # and the float32 weight's gradient must come back in float32, unrounded.
  from rlhf_jax.models.transformer import matmul
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 48)).astype(np.float32)
  w = rng.standard_normal((40, 48) if w_transposed else (48, 40)).astype(np.float32)
  ct = rng.standard_normal((64, 40)).astype(np.float32)
  r = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
  x16 = jnp.asarray(x, jnp.bfloat16)

  def f(x, w):
    return matmul(x, w, jnp.bfloat16, w_transposed=w_transposed)

  y, vjp = jax.jit(lambda x, w: jax.vjp(f, x, w))(x16, jnp.asarray(w))
  dx, dw = jax.jit(vjp)(jnp.asarray(ct, jnp.bfloat16))
  wk = r(w).T if w_transposed else r(w)
  exact_y, exact_dx, exact_dw = r(x) @ wk, r(ct) @ wk.T, r(x).T @ r(ct)
  assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  # y and dx are rounded to bfloat16 once at the end (relative error <= 2^-8); dw is float32.
  np.testing.assert_allclose(np.asarray(y, np.float64), exact_y, rtol=2 ** -8, atol=1e-6 * np.abs(exact_y).max())
  np.testing.assert_allclose(np.asarray(dx, np.float64), exact_dx, rtol=2 ** -8, atol=1e-6 * np.abs(exact_dx).max())
  np.testing.assert_allclose(np.asarray(dw, np.float64), (exact_dw.T if w_transposed else exact_dw), rtol=1e-5,
                             atol=1e-5)


def test_bf16_gradients_are_close_to_f32(tiny):
  # The whole model's loss gradient in bfloat16 compute (float32 weights) against float32 compute.
  cfg, params, _ = tiny
  tokens = jax.random.randint(jax.random.PRNGKey(4), (4, 33), 0, 256)

  def grads(dtype):
    apply = models.make_apply_fn(get_model_config("tiny", dtype=dtype))

    def loss(p):
      logits, _ = apply(p, tokens[:, :-1])
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    return jax.jit(jax.grad(loss))(params)

  g32, g16 = grads("float32"), grads("bfloat16")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g32), jax.tree.leaves(g16)):
    assert b.dtype == a.dtype == jnp.float32, path
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    assert rel < 0.05, (jax.tree_util.keystr(path), rel)


def test_scalar_head_from_lm_backbone(tiny):
  cfg, params, _ = tiny
  vparams = models.lm_to_scalar_params(params, cfg, jax.random.PRNGKey(4))
  values, _ = models.make_apply_fn(cfg, head="scalar")(vparams, jnp.ones((3, 7), jnp.int32))
  assert values.shape == (3, 7) and values.dtype == jnp.float32
  np.testing.assert_allclose(values, 0.0)  # zero-initialised head: the RM starts at log 2 loss
  fresh = models.init_params(cfg, jax.random.PRNGKey(4), head="scalar")  # the head a scalar model is born with
  for name in ("score_head", "score_bias"):
    assert vparams[name].dtype == fresh[name].dtype
    np.testing.assert_array_equal(vparams[name], fresh[name])
  # The backbone is shared: same hidden states as the LM.
  h_lm, _ = models.make_apply_fn(cfg)(params, jnp.ones((3, 7), jnp.int32), return_hidden=True)
  h_v, _ = models.make_apply_fn(cfg, head="scalar")(vparams, jnp.ones((3, 7), jnp.int32), return_hidden=True)
  np.testing.assert_allclose(h_lm, h_v)


# The three ways the layers run: a scan (the accelerator default), a scan unrolled completely (the CPU
# default: straight-line layers on stacked weights) and unrolled layers (the cache path's `layer_{i}` params).
LAYER_PATHS = {"scan": dict(scan_unroll=1), "scan_unrolled": dict(scan_unroll=4), "unrolled": dict(scan_layers=False)}


@pytest.mark.parametrize("path", sorted(LAYER_PATHS))
def test_out_from_returns_the_tail_of_every_output(tiny, path):
  """`out_from=k` gives positions [k, T) of the full output, for logits, values and hidden states, and their
  gradients; on straight-line layers the last layer computes only those positions (fewer FLOPs)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  base_cfg, base_params, _ = tiny
  cfg = dataclasses.replace(base_cfg, **LAYER_PATHS[path])
  params = unscan_params(base_cfg, base_params) if not cfg.scan_layers else base_params
  toks = jax.random.randint(jax.random.PRNGKey(5), (3, 9), 0, cfg.vocab_size)
  mask = jnp.ones_like(toks).at[0, :2].set(0)  # a left-padded row
  vparams = models.lm_to_scalar_params(params, cfg, jax.random.PRNGKey(6))
  vparams = dict(vparams, score_head=jax.random.normal(jax.random.PRNGKey(7), vparams["score_head"].shape))
  for head, p in (("lm", params), ("scalar", vparams)):
    apply = models.make_apply_fn(cfg, head=head)
    for kw in ({}, {"return_hidden": True}):
      full, _ = apply(p, toks, mask, **kw)
      tail, _ = apply(p, toks, mask, out_from=4, **kw)
      assert tail.shape == full[:, 4:].shape
      np.testing.assert_allclose(tail, full[:, 4:], rtol=1e-6, atol=1e-6)
  # Gradients of a loss on the tail: the same whether the model or the caller drops the other positions.
  apply = models.make_apply_fn(cfg)
  g_full = jax.grad(lambda q: jnp.sum(jnp.sin(apply(q, toks, mask)[0][:, 4:])))(params)
  g_tail = jax.grad(lambda q: jnp.sum(jnp.sin(apply(q, toks, mask, out_from=4)[0])))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * float(np.max(np.abs(a)))), g_full, g_tail)
  flops = [jax.jit(lambda q, k=k: apply(q, toks, mask, out_from=k)[0]).lower(params).compile().cost_analysis()
           for k in (0, 4)]
  flops = [(f[0] if isinstance(f, list) else f)["flops"] for f in flops]
  if path == "scan":  # every layer runs on all positions inside the loop; only the head is saved
    assert flops[1] < flops[0]
  else:  # the head and the last layer's queries, attention and MLP on 5 of 9 positions
    dim, mlp = cfg.dim, cfg.mlp_dim
    saved_last_layer = 3 * 4 * (2 * dim * dim + 3 * 2 * dim * mlp)  # q, o and MLP matmuls, 4 positions × 3 rows
    assert flops[0] - flops[1] > saved_last_layer, flops
  with pytest.raises(ValueError, match="out_from=9"):
    apply(params, toks, mask, out_from=9)


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match="n_kv_heads"):
    get_model_config("tiny", n_kv_heads=3)
  with pytest.raises(ValueError, match="unknown model preset"):
    get_model_config("huge")


@pytest.mark.parametrize("over", [{}, dict(qkv_bias=True, qk_norm=True, tie_embeddings=False)])
def test_kv_cache_path_equals_full_forward(over):
  """Prefill P tokens into a per-layer cache, then feed the rest one at a time: the logits of a full forward."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  cfg = get_model_config("tiny", **over)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 12), 0, cfg.vocab_size)
  mask = jnp.ones_like(tokens).at[1, :4].set(0)  # a left-padded row
  full, _ = models.make_apply_fn(cfg)(params, tokens, mask)
  model = models.Transformer(dataclasses.replace(cfg, scan_layers=False))
  lp = {"params": unscan_params(cfg, params)}
  p, s = 7, tokens.shape[1]
  positions = models.positions_from_mask(mask)
  cache = models.init_cache(cfg, 3, s)
  assert cache[0]["k"].shape == (3, cfg.n_kv_heads, s, cfg.head_dim) and len(cache) == cfg.n_layers
  kv_mask = mask.at[:, p:].set(0)
  logits, cache = model.apply(lp, tokens[:, :p], mask[:, :p], positions_BxT=positions[:, :p], cache=cache,
                              cache_index=0, kv_mask_BxS=kv_mask)
  steps = [logits]
  for t in range(p, s):
    kv_mask = kv_mask.at[:, t].set(mask[:, t])
    logits, cache = model.apply(lp, tokens[:, t:t + 1], mask[:, t:t + 1], positions_BxT=positions[:, t:t + 1],
                                cache=cache, cache_index=t, kv_mask_BxS=kv_mask)
    steps.append(logits)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1))[real], np.asarray(full)[real], atol=1e-5)


def test_kv_cache_needs_the_unrolled_model(tiny):
  cfg, params, _ = tiny
  with pytest.raises(ValueError, match="scan_layers"):
    models.Transformer(cfg).apply({"params": params}, jnp.ones((1, 2), jnp.int32), cache=models.init_cache(cfg, 1, 4),
                                  kv_mask_BxS=jnp.ones((1, 4), jnp.int32))


@pytest.mark.parametrize("over", [{}, dict(qkv_bias=True, qk_norm=True, tie_embeddings=False)])
def test_out_in_kernels_give_the_same_model(over):
  """`kernels_out_in` params read with `kernel_layout="out_in"`: every kernel's input axes moved last, the
  same logits (with and without a cache, untied head included), and the init shapes of that layout."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from rlhf_jax.models.transformer import kernels_out_in  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(get_model_config("tiny", **over), scan_layers=False)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  moved = kernels_out_in(params)
  d, h, kvh, hd, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
  attn, mlp = moved["layer_0"]["attn"], moved["layer_0"]["mlp"]
  assert attn["wq"].shape == (h, hd, d) and attn["wk"].shape == (kvh, hd, d) and attn["wo"].shape == (d, h, hd)
  assert mlp["w_gate"].shape == (f, d) and mlp["w_down"].shape == (d, f)
  np.testing.assert_array_equal(attn["wo"], np.moveaxis(params["layer_0"]["attn"]["wo"], (0, 1), (1, 2)))
  np.testing.assert_array_equal(moved["embedding"], params["embedding"])
  if not cfg.tie_embeddings:
    assert moved["lm_head"].shape == (cfg.vocab_size, d)
    np.testing.assert_array_equal(attn["bq"], params["layer_0"]["attn"]["bq"])
  out_in = models.Transformer(cfg, kernel_layout="out_in")
  init = nn.meta.unbox(out_in.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32)))
  init_shapes = jax.tree.map(jnp.shape, init)
  assert init_shapes == jax.tree.map(jnp.shape, {"params": moved})
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 12), 0, cfg.vocab_size)
  mask = jnp.ones_like(tokens).at[1, :4].set(0)
  ref, _ = models.Transformer(cfg).apply({"params": params}, tokens, mask)
  got, _ = out_in.apply({"params": moved}, tokens, mask)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  cache = models.init_cache(cfg, 3, 12)
  ref_c, _ = models.Transformer(cfg).apply({"params": params}, tokens, mask, cache=cache, kv_mask_BxS=mask)
  got_c, _ = out_in.apply({"params": moved}, tokens, mask, cache=cache, kv_mask_BxS=mask)
  np.testing.assert_allclose(got_c, ref_c, rtol=1e-5, atol=1e-5)


def test_out_in_kernels_need_unrolled_layers(tiny):
  from rlhf_jax.models.transformer import kernels_out_in  # pylint: disable=import-outside-toplevel
  cfg, params, _ = tiny
  assert cfg.scan_layers
  with pytest.raises(ValueError, match="unrolled"):
    kernels_out_in(params)
  with pytest.raises(ValueError, match="scan_layers"):
    models.Transformer(cfg, kernel_layout="out_in").apply({"params": params}, jnp.ones((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="kernel_layout must be one of"):
    models.Transformer(cfg, kernel_layout="nk").apply({"params": params}, jnp.ones((1, 2), jnp.int32))
