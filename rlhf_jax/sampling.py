"""Jitted autoregressive sampling with a preallocated KV cache.

`Sampler` compiles two functions once per shape:

- `prefill(params, prompt_tokens_BxP, prompt_mask_BxP, rng)` runs the
  left-padded prompts through the model once, writing their keys/values into
  a cache sized for the whole buffer (P + G slots), then repeats that cache
  for the N samples of each prompt and draws every sample's first token.
- `decode(params, state)` runs a `lax.while_loop` over the remaining tokens,
  one slot per iteration, until every row has emitted EOS or G tokens exist.
  The decode state (token buffers and the KV cache) is donated, so XLA
  updates it in place.

Rows are prompt-major: sample n of prompt p is row `p * N + n`.

Log-probs are those of the distribution actually sampled: `log_softmax(logits / T)`
at temperature T (with top-k / top-p, of the filtered distribution that was
sampled). They equal `steps.completion_logprobs(..., temperature=T)` over the
returned buffer, which is what PPO's importance ratio, the KL and the entropy
use, so the first minibatch's ratio is exactly 1. RL stages refuse top-k/top-p
(the training forward has no filter). Greedy decoding (T = 0) reports the
model's own log-probs (T = 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer, positions_from_mask
from rlhf_jax import sharding as shd


class SampleOutput(NamedTuple):
  """Result of `Sampler.__call__`; R = B·N rows, S = P + G slots."""
  tokens: jax.Array              # [R, S] prompt (left-padded) then completion (right-padded)
  mask: jax.Array                # [R, S] 1 on real tokens
  completion_tokens: jax.Array   # [R, G]
  completion_logprobs: jax.Array  # [R, G] float32 log π(token | prefix), 0 outside the mask
  completion_mask: jax.Array     # [R, G] 1 on generated tokens up to and including EOS
  lengths: jax.Array             # [R] number of generated tokens


class DecodeState(NamedTuple):
  step: jax.Array        # scalar int32: number of completion tokens written
  tokens: jax.Array      # [R, S]
  mask: jax.Array        # [R, S]
  logprobs: jax.Array    # [R, G]
  done: jax.Array        # [R] bool
  positions: jax.Array   # [R] RoPE position of the next token to feed
  cache: Any             # {"k","v"}: [L, R, S, Hkv, Dh]
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int
  temperature: float = 1.0   # 0 = greedy
  top_k: int = 0             # 0 = off
  top_p: float = 1.0         # 1 = off
  num_samples: int = 1

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.num_samples <= 0:
      raise ValueError(f"num_samples must be positive, got {self.num_samples}")


def filter_logits(logits_RxV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Set logits outside the top-k / nucleus to -inf (always keeps the argmax)."""
  neg = jnp.finfo(logits_RxV.dtype).min
  if top_k and top_k < logits_RxV.shape[-1]:
    kth = jax.lax.top_k(logits_RxV, top_k)[0][..., -1:]
    logits_RxV = jnp.where(logits_RxV < kth, neg, logits_RxV)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits_RxV, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest logit still inside the nucleus is the cut-off.
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits_RxV = jnp.where(logits_RxV < cutoff, neg, logits_RxV)
  return logits_RxV


def sample_token(logits_RxV: jax.Array, rng: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
  """Draw one token per row; return (token [R], its log-prob under the sampled distribution [R]).

  The sampled distribution is softmax(filter(logits / T)); greedy (T = 0) returns log softmax(logits).
  """
  logits = logits_RxV.astype(jnp.float32)
  if params.temperature == 0.0:
    token = jnp.argmax(logits, axis=-1)
    dist = logits
  else:
    dist = filter_logits(logits / params.temperature, top_k=params.top_k, top_p=params.top_p)
    token = jax.random.categorical(rng, dist, axis=-1)
  logp = jax.nn.log_softmax(dist, axis=-1)
  return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


class Sampler:
  """Compiled sampler for one model shape and one set of sampling parameters.

  Usage: `out = Sampler(cfg, params_sp, eos_id=..., pad_id=...)(params, prompt_tokens, prompt_mask, rng)`.
  With a `mesh`, the batch and cache are sharded over ("data","fsdp") and the
  cache's KV heads over "tensor", matching the parameters' layout.
  """

  def __init__(self, cfg: ModelConfig, sampling: SamplingParams, *, eos_id: int, pad_id: int,
               mesh: Optional[Mesh] = None):
    self.cfg = cfg
    self.sampling = sampling
    self.eos_id = int(eos_id)
    self.pad_id = int(pad_id)
    self.mesh = mesh
    self.model = Transformer(cfg, head="lm")
    self.trace_counts = {"prefill": 0, "decode": 0}
    self._prefill = jax.jit(self._prefill_impl)
    self._decode = jax.jit(self._decode_impl, donate_argnums=(1,))

  # -- sharding helpers ------------------------------------------------------
  def _constrain(self, x, spec):
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def _constrain_state(self, st: DecodeState) -> DecodeState:
    b = shd.BATCH_AXES
    cache = jax.tree.map(lambda c: self._constrain(c, P(None, b, None, "tensor", None)), st.cache)
    return st._replace(tokens=self._constrain(st.tokens, P(b, None)), mask=self._constrain(st.mask, P(b, None)),
                       logprobs=self._constrain(st.logprobs, P(b, None)), cache=cache)

  # -- compiled pieces -------------------------------------------------------
  def _prefill_impl(self, params, prompt_tokens_BxP, prompt_mask_BxP, rng):
    self.trace_counts["prefill"] += 1
    sp, n = self.sampling, self.sampling.num_samples
    b, p = prompt_tokens_BxP.shape
    g = sp.max_new_tokens
    s = p + g
    if s > self.cfg.max_seq_len:
      raise ValueError(f"prompt length {p} + max_new_tokens {g} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
    kv_mask_BxS = jnp.pad(prompt_mask_BxP, ((0, 0), (0, g)))
    shape = (self.cfg.n_layers, b, s, self.cfg.n_kv_heads, self.cfg.head_dim)
    cache = {"k": jnp.zeros(shape, jnp.dtype(self.cfg.dtype)), "v": jnp.zeros(shape, jnp.dtype(self.cfg.dtype))}
    logits, cache = self.model.apply({"params": params}, prompt_tokens_BxP, prompt_mask_BxP,
                                     positions_BxT=positions_from_mask(prompt_mask_BxP), cache=cache,
                                     cache_index=0, kv_mask_BxS=kv_mask_BxS)
    rep = lambda x: jnp.repeat(x, n, axis=0)  # the prompt is computed once, shared by its N samples
    last_logits = rep(logits[:, -1, :])
    tokens = jnp.pad(rep(prompt_tokens_BxP), ((0, 0), (0, g)), constant_values=self.pad_id)
    mask = rep(kv_mask_BxS)
    cache = jax.tree.map(lambda c: jnp.repeat(c, n, axis=1), cache)
    rng, sub = jax.random.split(rng)
    token, logp = sample_token(last_logits, sub, sp)
    r = b * n
    st = DecodeState(
        step=jnp.array(1, jnp.int32),
        tokens=tokens.at[:, p].set(token),
        mask=mask.at[:, p].set(1),
        logprobs=jnp.zeros((r, g), jnp.float32).at[:, 0].set(logp),
        done=token == self.eos_id,
        positions=jnp.sum(mask, axis=1).astype(jnp.int32),
        cache=cache,
        rng=rng,
    )
    return self._constrain_state(st)

  def _decode_impl(self, params, st: DecodeState):
    self.trace_counts["decode"] += 1
    sp = self.sampling
    g = sp.max_new_tokens
    p = st.tokens.shape[1] - g

    def cond(st):
      return (st.step < g) & ~jnp.all(st.done)

    def body(st):
      slot = p + st.step - 1                           # slot of the token fed now
      fed = jax.lax.dynamic_slice_in_dim(st.tokens, slot, 1, axis=1)
      fed_mask = jax.lax.dynamic_slice_in_dim(st.mask, slot, 1, axis=1)
      logits, cache = self.model.apply({"params": params}, fed, fed_mask, positions_BxT=st.positions[:, None],
                                       cache=st.cache, cache_index=slot, kv_mask_BxS=st.mask)
      rng, sub = jax.random.split(st.rng)
      token, logp = sample_token(logits[:, 0, :], sub, sp)
      alive = ~st.done
      token = jnp.where(alive, token, self.pad_id)
      new = DecodeState(
          step=st.step + 1,
          tokens=jax.lax.dynamic_update_slice_in_dim(st.tokens, token[:, None], slot + 1, axis=1),
          mask=jax.lax.dynamic_update_slice_in_dim(st.mask, alive[:, None].astype(st.mask.dtype), slot + 1, axis=1),
          logprobs=jax.lax.dynamic_update_slice_in_dim(st.logprobs, jnp.where(alive, logp, 0.0)[:, None],
                                                       st.step, axis=1),
          done=st.done | (token == self.eos_id),
          positions=st.positions + alive.astype(jnp.int32),
          cache=cache,
          rng=rng,
      )
      return self._constrain_state(new)

    return jax.lax.while_loop(cond, body, st)

  # -- public ----------------------------------------------------------------
  def __call__(self, params, prompt_tokens_BxP, prompt_mask_BxP, rng) -> SampleOutput:
    prompt_tokens_BxP = jnp.asarray(prompt_tokens_BxP, jnp.int32)
    prompt_mask_BxP = jnp.asarray(prompt_mask_BxP, jnp.int32)
    if prompt_tokens_BxP.ndim != 2 or prompt_tokens_BxP.shape != prompt_mask_BxP.shape:
      raise ValueError(f"prompt_tokens {prompt_tokens_BxP.shape} and prompt_mask {prompt_mask_BxP.shape} "
                       "must be equal [B, P] shapes")
    st = self._decode(params, self._prefill(params, prompt_tokens_BxP, prompt_mask_BxP, rng))
    p = prompt_tokens_BxP.shape[1]
    completion_mask = st.mask[:, p:]
    return SampleOutput(tokens=st.tokens, mask=st.mask, completion_tokens=st.tokens[:, p:],
                        completion_logprobs=st.logprobs * completion_mask,
                        completion_mask=completion_mask, lengths=jnp.sum(completion_mask, axis=1))


_SAMPLERS: dict[Any, Sampler] = {}


def get_sampler(cfg: ModelConfig, sampling: SamplingParams, *, eos_id: int, pad_id: int,
                mesh: Optional[Mesh] = None) -> Sampler:
  """The compiled sampler for these static settings, built once per process and reused."""
  key = (cfg, sampling, int(eos_id), int(pad_id), mesh)
  if key not in _SAMPLERS:
    _SAMPLERS[key] = Sampler(cfg, sampling, eos_id=eos_id, pad_id=pad_id, mesh=mesh)
  return _SAMPLERS[key]


def generate(params, prompt_tokens_BxP, prompt_mask_BxP, rng, *, cfg: ModelConfig, max_new_tokens: int,
             eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_samples: int = 1, mesh: Optional[Mesh] = None) -> SampleOutput:
  """Functional entry point; compiled samplers are cached by their static settings."""
  sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      num_samples=num_samples)
  return get_sampler(cfg, sp, eos_id=eos_id, pad_id=pad_id, mesh=mesh)(params, prompt_tokens_BxP, prompt_mask_BxP,
                                                                        rng)

