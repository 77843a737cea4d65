"""Creating and converting parameter pytrees (plain dicts of arrays)."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer, rescan_params, unscan_params


def _dummy_inputs():
  return jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)


def _boxed_init(cfg: ModelConfig, head: str, rng):
  return Transformer(cfg, head=head).init(rng, *_dummy_inputs())["params"]


@functools.partial(jax.jit, static_argnames=("cfg", "head"))
def _init_params(cfg: ModelConfig, rng, head: str):
  return nn.unbox(_boxed_init(cfg, head, rng))


def init_params(cfg: ModelConfig, rng, *, head: str = "lm"):
  """Initialised parameters as a plain pytree (no logical-axis boxes).

  One compiled program per (cfg, head): Flax's init runs the model's forward to
  create the parameters, which op by op compiled dozens of small programs
  (tiny preset: 4.7 s against 1.9 s jitted). Callers that shard create them
  with `rlhf_jax.sharding.init_sharded` instead, which jits this function with
  out_shardings.
  """
  return _init_params(cfg, rng, head=head)


def abstract_params(cfg: ModelConfig, *, head: str = "lm"):
  """ShapeDtypeStructs of the parameters, without allocating them."""
  return jax.eval_shape(lambda r: init_params(cfg, r, head=head), jax.random.PRNGKey(0))


def logical_axes(cfg: ModelConfig, *, head: str = "lm"):
  """PartitionSpecs of logical axis names, one per parameter (same tree as params)."""
  boxed = jax.eval_shape(lambda r: _boxed_init(cfg, head, r), jax.random.PRNGKey(0))
  return nn.get_partition_spec(boxed)


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def lm_to_scalar_params(lm_params, cfg: ModelConfig, rng):
  """Backbone of a language model with a fresh scalar head: RM/critic init from SFT.

  The head is what `init_params(cfg, rng, head="scalar")` creates, zeros (so `rng` changes nothing), made
  directly: initialising a whole scalar model to keep its head compiled one more init program per config.
  """
  del rng  # the scalar head is zero-initialised
  shapes = abstract_params(cfg, head="scalar")
  out = {k: v for k, v in lm_params.items() if k != "lm_head"}
  for name in ("score_head", "score_bias"):
    out[name] = jnp.zeros(shapes[name].shape, shapes[name].dtype)
  return out


def make_apply_fn(cfg: ModelConfig, *, head: str = "lm") -> Callable:
  """`apply_fn(params, tokens, mask, **kw) -> (out, cache)` for step factories.

  `apply_fn.layer_views`: for a `scan_layers` model whose layers run as straight-line code (the CPU default,
  `scan_unroll` = every layer), the pair (`unscan_params`, `rescan_params`) of this config; else None. The
  apply function takes params in either layout; the steps' chunk loops (`steps.rowwise_value_and_grad`) run on
  the per-layer view and accumulate per-layer gradients, restacked once a step: slicing the stacked weights and
  concatenating their gradients in every chunk cost the small preset's SFT step 5% on an AVX2 CPU (issue 15).
  """
  model = Transformer(cfg, head=head)

  def apply_fn(params, tokens_BxT, mask_BxT=None, **kwargs):
    return model.apply({"params": params}, tokens_BxT, mask_BxT, **kwargs)

  straight_line = cfg.scan_layers and cfg.scan_unroll >= cfg.n_layers
  apply_fn.layer_views = ((functools.partial(unscan_params, cfg), functools.partial(rescan_params, cfg))
                          if straight_line else None)
  return apply_fn
