"""Jitted autoregressive sampling with a preallocated KV cache.

`Sampler` compiles two functions once per shape:

- `prefill(params, prompt_tokens_BxP, prompt_mask_BxP, rng)` runs the
  left-padded prompts through the model once, writing their keys/values into
  a P-slot cache, then repeats that cache for the N samples of each prompt and
  draws every sample's first token.
- `decode(params, state)` runs the remaining tokens, one slot per iteration,
  until every row has emitted EOS or G tokens exist, as a few `lax.while_loop`
  segments (`decode_segments`): segment j's cache holds only the slots that
  its steps can reach, so early steps attend over the filled part of the
  buffer, not all P + G slots; the cache grows (one copy) between segments.
  The decode state (token buffers and the KV cache) is donated, so XLA
  updates it in place.

On the CPU backend `Sampler(host_threads=)` (auto) splits the prompts into groups
and runs each group's prefill and decode from its own host thread, concurrently,
through the same compiled functions: a decode step's ops are too small for XLA
to spread over the cores. The random numbers are drawn for the whole batch, so
the tokens do not depend on the split.

The cache is one `[R, Hkv, S, Dh]` buffer per layer and the layers run
unrolled on per-layer parameters sliced once per call (`models.transformer`
explains why: no per-step copy of the cache or of the weights).

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

import concurrent.futures
import dataclasses
import os
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.logprobs import head_logits
from rlhf_jax.models.transformer import (KERNEL_LAYOUTS, Transformer, init_cache, kernels_out_in,
                                         positions_from_mask, unscan_params)
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
  cache: Any             # per layer {"k","v"}: [R, Hkv, S', Dh], S' <= S the slots this segment reaches
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


DRAWS = ("gumbel", "inverse_cdf")


def sample_token(logits_RxV: jax.Array, rng: jax.Array, params: SamplingParams, *,
                 draw: str = "gumbel", rows: Optional[tuple] = None) -> tuple[jax.Array, jax.Array]:
  """Draw one token per row; return (token [R], its log-prob under the sampled distribution [R]).

  The sampled distribution is softmax(filter(logits / T)); greedy (T = 0) returns log softmax(logits).
  `draw` is how: "gumbel" (`jax.random.categorical`, the default and the stream earlier
  runs reproduce) or "inverse_cdf" (`_inverse_cdf_draw`: same distribution, other draws, R
  random numbers instead of R·V; faster on CPU).
  `rows` = (offset, total): these R rows are rows [offset, offset + R) of a batch of `total` rows;
  the random numbers are drawn for the whole batch and these rows' taken, so a batch drawn in
  pieces gets the tokens it gets in one call (`offset` may be traced, `total` is static).
  """
  logits = logits_RxV.astype(jnp.float32)
  if params.temperature == 0.0:
    logp = jax.nn.log_softmax(logits, axis=-1)
    token = first_argmax(logits)
  else:
    dist = filter_logits(logits / params.temperature, top_k=params.top_k, top_p=params.top_p)
    logp = jax.nn.log_softmax(dist, axis=-1)
    r, v = dist.shape
    offset, total = rows if rows is not None else (0, r)
    noise = lambda draw_fn, width: jax.lax.dynamic_slice_in_dim(draw_fn(rng, (total, width), jnp.float32), offset, r)
    if draw == "inverse_cdf":
      token = _inverse_cdf_draw(jnp.exp(logp), noise(jax.random.uniform, 1))
    else:
      # Gumbel-max exactly as `jax.random.categorical(rng, dist)` computes it (same noise, same token).
      token = first_argmax(noise(jax.random.gumbel, v) + dist)
  return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def first_argmax(x_RxV: jax.Array) -> jax.Array:
  """`jnp.argmax(x, axis=-1)` (the first maximal index) as a max and a min-reduce, int32 [R].

  XLA:CPU lowers argmax to one variadic (value, index) reduce that does not
  vectorise: for [64, 260] it took 35 us against 7 us for these two plain reduces
  (issue 15), once per decode step. A row without a maximum (NaN) gets the last index.
  """
  v = x_RxV.shape[-1]
  is_max = x_RxV == jnp.max(x_RxV, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(is_max, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.minimum(first, v - 1)


def _inverse_cdf_draw(probs_RxV: jax.Array, uniform_Rx1: jax.Array) -> jax.Array:
  """One token per row drawn from `probs_RxV` by inverting its CDF at a uniform [0, 1) number per row.

  Exact in distribution, like Gumbel-max (`jax.random.categorical`), but it
  needs R random numbers instead of R·V: on CPU the threefry bits for a
  [32, 260] Gumbel draw took ~180 us a step, most of a tiny model's step.
  Token i is drawn when cdf[i-1] <= u·cdf[-1] < cdf[i]; a zero-probability
  token has an empty interval, and the clamp to the last positive entry covers
  u·cdf[-1] rounding up to cdf[-1].
  """
  cdf = jnp.cumsum(probs_RxV, axis=-1)
  u = uniform_Rx1 * cdf[:, -1:]
  token = jnp.sum(cdf <= u, axis=-1)
  v = probs_RxV.shape[-1]
  last_positive = v - 1 - first_argmax((probs_RxV[:, ::-1] > 0).astype(jnp.int32))
  return jnp.minimum(token, last_positive)


class Sampler:
  """Compiled sampler for one model shape and one set of sampling parameters.

  Usage: `out = Sampler(cfg, params_sp, eos_id=..., pad_id=...)(params, prompt_tokens, prompt_mask, rng)`.
  With a `mesh`, the batch and cache are sharded over ("data","fsdp") and the
  cache's KV heads over "tensor", matching the parameters' layout.
  `decode_segments` (None or 0: one per 16 new tokens, at most 4) is the number
  of decode loops, each attending over only the cache slots its steps can reach.
  `draw` picks the sampling algorithm (`sample_token`); it changes which tokens a
  key draws, not their distribution.
  `host_threads` (None = auto): split the prompts into that many equal groups and
  sample each group from its own host thread, concurrently, through the same
  compiled functions. On the CPU backend a decode step's ops are too small for
  XLA to spread over the cores (a tiny-model rollout kept 1.2 of 2 cores busy);
  two groups decode ~1.8× faster there (issue 15). The random numbers are drawn
  for the whole batch (`sample_token(rows=)`), so the tokens do not depend on the
  split (up to the float rounding of matmuls over fewer rows). Auto: on the CPU
  backend without a multi-device mesh, the largest divisor of the prompt count
  not above the usable cores; 1 elsewhere (an accelerator runs one program at a
  time).
  `kernel_layout` (None = auto, `default_kernel_layout`): the memory order the
  decode reads the dense kernels in. "out_in" transposes them once per decode
  call (`models.transformer.kernels_out_in`, one more copy of the layer weights
  while the decode runs) so that every decode matmul contracts the weight's
  contiguous axis; "in_out" reads them as stored. Same values either way, up
  to the float rounding of a differently ordered matmul.
  """

  def __init__(self, cfg: ModelConfig, sampling: SamplingParams, *, eos_id: int, pad_id: int,
               mesh: Optional[Mesh] = None, decode_segments: Optional[int] = None, draw: str = "gumbel",
               host_threads: Optional[int] = None, kernel_layout: Optional[str] = None):
    self.cfg = cfg
    self.sampling = sampling
    self.eos_id = int(eos_id)
    self.pad_id = int(pad_id)
    self.mesh = mesh
    g = sampling.max_new_tokens
    # Default: one segment per 16 decode steps, at most 4 (each segment is one more compiled loop). Per 32 gave
    # 64 new tokens a single loop over every slot: 2-4 segments decode 64 rows x 64 tokens ~8% faster (issue 15).
    self.decode_segments = int(decode_segments) if decode_segments else min(4, max(1, (g - 1) // 16))
    if self.decode_segments <= 0:
      raise ValueError(f"decode_segments must be positive, got {decode_segments}")
    if draw not in DRAWS:
      raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}")
    self.draw = draw
    if host_threads is not None and int(host_threads) < 1:
      raise ValueError(f"host_threads must be >= 1 or None (auto), got {host_threads}")
    if host_threads is not None and int(host_threads) > 1 and mesh is not None and mesh.size > 1:
      raise ValueError(f"host_threads={host_threads} needs a single device; this mesh has {mesh.size}")
    self.host_threads = None if host_threads is None else int(host_threads)
    self._pool, self._pool_size, self._compiled = None, 0, set()
    self.kernel_layout = default_kernel_layout() if kernel_layout is None else kernel_layout
    if self.kernel_layout not in KERNEL_LAYOUTS:
      raise ValueError(f"kernel_layout must be one of {KERNEL_LAYOUTS} or None (auto), got {kernel_layout!r}")
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    self.model = Transformer(unrolled, head="lm")                       # the prefill: kernels as stored
    self.decode_model = Transformer(unrolled, head="lm", kernel_layout=self.kernel_layout)
    self.trace_counts = {"prefill": 0, "decode": 0}
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("total_rows",))
    # The token buffers are donated (updated in place); the prompt cache is not:
    # the decode loops grow it into new buffers, so it has no output to alias.
    self._decode = jax.jit(self._decode_impl, donate_argnums=(1,), static_argnames=("total_rows",))

  # -- sharding helpers ------------------------------------------------------
  def _constrain(self, x, spec):
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def _constrain_state(self, st: DecodeState) -> DecodeState:
    if self.mesh is None:
      return st
    b = shd.BATCH_AXES
    cache = jax.tree.map(lambda c: self._constrain(c, P(b, "tensor", None, None)), st.cache)
    return st._replace(tokens=self._constrain(st.tokens, P(b, None)), mask=self._constrain(st.mask, P(b, None)),
                       logprobs=self._constrain(st.logprobs, P(b, None)), cache=cache)

  def segment_lengths(self, prompt_len: int) -> list[int]:
    """Cache slots of each decode segment: segment j runs the steps that feed slots < its length."""
    g, n = self.sampling.max_new_tokens, self.decode_segments
    s = prompt_len + g
    # Steps 1..g-1 feed slots p..p+g-2; split them into n near-equal runs.
    ends = sorted({prompt_len + 1 + -(-(g - 1) * (j + 1) // n) - 1 for j in range(n)})
    return [min(e, s) for e in ends if e > prompt_len] or [s]

  # -- compiled pieces -------------------------------------------------------
  def _prefill_impl(self, params, prompt_tokens_BxP, prompt_mask_BxP, rng, row_offset=0, total_rows=None):
    """`row_offset`, `total_rows`: these prompts' rows within the whole batch (`sample_token(rows=)`)."""
    self.trace_counts["prefill"] += 1
    sp, n = self.sampling, self.sampling.num_samples
    b, p = prompt_tokens_BxP.shape
    g = sp.max_new_tokens
    s = p + g
    if s > self.cfg.max_seq_len:
      raise ValueError(f"prompt length {p} + max_new_tokens {g} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
    cache = init_cache(self.cfg, b, p)
    hidden, cache = self.model.apply({"params": unscan_params(self.cfg, params)}, prompt_tokens_BxP, prompt_mask_BxP,
                                     positions_BxT=positions_from_mask(prompt_mask_BxP), cache=cache,
                                     cache_index=0, kv_mask_BxS=prompt_mask_BxP, return_hidden=True, out_from=p - 1)
    # Only the last position's logits are needed: B·D·V head FLOPs instead of B·P·D·V, and the last layer
    # computes that position's query and MLP only (`out_from`; every position still writes its keys and values).
    last_logits = head_logits(hidden[:, -1, :], params, self.cfg)
    rep = lambda x: jnp.repeat(x, n, axis=0)  # the prompt is computed once, shared by its N samples
    last_logits = rep(last_logits)
    tokens = jnp.pad(rep(prompt_tokens_BxP), ((0, 0), (0, g)), constant_values=self.pad_id)
    mask = rep(jnp.pad(prompt_mask_BxP, ((0, 0), (0, g))))
    cache = jax.tree.map(rep, cache)
    rng, sub = jax.random.split(rng)
    r = b * n
    token, logp = sample_token(last_logits, sub, sp, draw=self.draw, rows=(row_offset, total_rows or r))
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

  def _decode_impl(self, params, st: DecodeState, cache, row_offset=0, total_rows=None):
    """Decode from the prefill's state (its cache passed apart); returns the state without a cache."""
    self.trace_counts["decode"] += 1
    rows = (row_offset, total_rows or st.tokens.shape[0])
    st = st._replace(cache=cache)
    sp = self.sampling
    g = sp.max_new_tokens
    p = st.tokens.shape[1] - g
    # Sliced per layer once, outside the loops; matrices cast to the compute dtype once too (the
    # model casts each one at use, so this is the same arithmetic without a per-step conversion pass).
    dt = jnp.dtype(self.cfg.dtype)
    layer_params = jax.tree.map(lambda x: x.astype(dt) if x.ndim >= 2 else x, unscan_params(self.cfg, params))
    if self.kernel_layout == "out_in":
      # The barrier keeps the transposed copies: without it XLA folds each transpose back into the dot
      # that reads it, and the loop reads the kernels in their stored order again.
      layer_params = jax.lax.optimization_barrier(kernels_out_in(layer_params))
    layer_params = {"params": layer_params}

    def segment(st: DecodeState, length: int) -> DecodeState:
      last_step = length - p  # this segment's steps feed slots p + step - 1 < length

      def cond(st):
        return (st.step <= last_step) & (st.step < g) & ~jnp.all(st.done)

      def body(st):
        slot = p + st.step - 1                           # slot of the token fed now
        fed = jax.lax.dynamic_slice_in_dim(st.tokens, slot, 1, axis=1)
        fed_mask = jax.lax.dynamic_slice_in_dim(st.mask, slot, 1, axis=1)
        logits, cache = self.decode_model.apply(layer_params, fed, fed_mask, positions_BxT=st.positions[:, None],
                                                cache=st.cache, cache_index=slot, kv_mask_BxS=st.mask[:, :length])
        if sp.temperature == 0.0:
          rng, sub = st.rng, None                        # greedy draws nothing
        else:
          rng, sub = jax.random.split(st.rng)
        token, logp = sample_token(logits[:, 0, :], sub, sp, draw=self.draw, rows=rows)
        alive = ~st.done
        token = jnp.where(alive, token, self.pad_id)
        new = DecodeState(
            step=st.step + 1,
            tokens=jax.lax.dynamic_update_slice_in_dim(st.tokens, token[:, None], slot + 1, axis=1),
            mask=jax.lax.dynamic_update_slice_in_dim(st.mask, alive[:, None].astype(st.mask.dtype), slot + 1,
                                                     axis=1),
            logprobs=jax.lax.dynamic_update_slice_in_dim(st.logprobs, jnp.where(alive, logp, 0.0)[:, None],
                                                         st.step, axis=1),
            done=st.done | (token == self.eos_id),
            positions=st.positions + alive.astype(jnp.int32),
            cache=cache,
            rng=rng,
        )
        return self._constrain_state(new)

      grow = lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, length - c.shape[2]), (0, 0)))
      st = self._constrain_state(st._replace(cache=jax.tree.map(grow, st.cache)))
      return jax.lax.while_loop(cond, body, st)

    for length in self.segment_lengths(p):
      st = segment(st, length)
    return st._replace(cache=())

  # -- public ----------------------------------------------------------------
  def __call__(self, params, prompt_tokens_BxP, prompt_mask_BxP, rng) -> SampleOutput:
    prompt_tokens_BxP = jnp.asarray(prompt_tokens_BxP, jnp.int32)
    prompt_mask_BxP = jnp.asarray(prompt_mask_BxP, jnp.int32)
    if prompt_tokens_BxP.ndim != 2 or prompt_tokens_BxP.shape != prompt_mask_BxP.shape:
      raise ValueError(f"prompt_tokens {prompt_tokens_BxP.shape} and prompt_mask {prompt_mask_BxP.shape} "
                       "must be equal [B, P] shapes")
    b, p = prompt_tokens_BxP.shape
    groups = self.groups(b)
    part = lambda g: self._sample_rows(  # noqa: E731
        params, prompt_tokens_BxP[g[0]], prompt_mask_BxP[g[0]], rng, g[1], g[2])
    k = len(groups)
    if k == 1:
      parts = [part(groups[0])]
    else:
      if self._pool_size != k:
        if self._pool is not None:
          self._pool.shutdown(wait=False)
        self._pool, self._pool_size = concurrent.futures.ThreadPoolExecutor(k, "rlhf_jax-sampler"), k
      first = [part(groups[0])] if (b, p) not in self._compiled else []  # compile in this thread, then fan out
      self._compiled.add((b, p))
      parts = first + list(self._pool.map(part, groups[len(first):]))
    tokens, mask, logprobs = (jnp.concatenate([getattr(x, f) for x in parts]) if k > 1 else getattr(parts[0], f)
                              for f in ("tokens", "mask", "logprobs"))
    completion_mask = mask[:, p:]
    return SampleOutput(tokens=tokens, mask=mask, completion_tokens=tokens[:, p:],
                        completion_logprobs=logprobs * completion_mask,
                        completion_mask=completion_mask, lengths=jnp.sum(completion_mask, axis=1))

  def threads_for(self, num_prompts: int) -> int:
    """Host threads a call with `num_prompts` prompts uses (see `host_threads`)."""
    if self.host_threads is not None:
      if num_prompts % self.host_threads:
        raise ValueError(f"host_threads={self.host_threads} must divide the {num_prompts} prompts of a call")
      return self.host_threads
    single_device = self.mesh is None or self.mesh.size == 1
    cores = _usable_cores() if single_device and jax.default_backend() == "cpu" else 1
    return max((d for d in range(1, min(cores, num_prompts) + 1) if num_prompts % d == 0), default=1)

  def groups(self, num_prompts: int) -> list[tuple[slice, int, Optional[int]]]:
    """How a call with `num_prompts` prompts is split: per host-thread group, (its prompts, the row offset of its
    first row in the whole batch, the whole batch's row count; None when there is one group)."""
    k = self.threads_for(num_prompts)
    c, n = num_prompts // k, self.sampling.num_samples
    total = num_prompts * n if k > 1 else None
    return [(slice(i * c, (i + 1) * c), i * c * n, total) for i in range(k)]

  def _sample_rows(self, params, prompt_tokens_BxP, prompt_mask_BxP, rng, row_offset: int, total_rows):
    """Prefill and decode these prompts (rows [row_offset, ...) of a batch of `total_rows`), finished."""
    st = self._prefill(params, prompt_tokens_BxP, prompt_mask_BxP, rng, row_offset, total_rows=total_rows)
    st = self._decode(params, st._replace(cache=()), st.cache, row_offset, total_rows=total_rows)
    return jax.block_until_ready(st) if total_rows is not None else st


def default_kernel_layout(backend: Optional[str] = None, cpu_flags: Optional[str] = None) -> str:
  """The decode's kernel layout (`Sampler(kernel_layout=None)`): "out_in" on an x86 CPU without AVX-512,
  "in_out" elsewhere.

  On an AVX2-only AMD EPYC the decode's `[32, D] @ [D, F]` matmuls over weights that no longer sit in cache
  ran 1.4-1.6x faster contracting the weight's contiguous axis, and the `small` decode 1.25-1.30x faster
  end to end; on `tiny`, whose weights stay in cache, no change (issue 15, experiments/RESULTS.md). The
  AVX-512 and AMX CPUs are unmeasured, so they keep the stored order; accelerators choose their own layouts.
  `backend`, `cpu_flags` (the `flags` line of /proc/cpuinfo): this process's when None.
  """
  if (backend or jax.default_backend()) != "cpu":
    return "in_out"
  flags = (_cpu_flags() if cpu_flags is None else cpu_flags).split()
  return "out_in" if "avx2" in flags and "avx512f" not in flags else "in_out"


def _cpu_flags() -> str:
  """The `flags` line of /proc/cpuinfo ("" where there is none: not Linux, not x86)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return line.split(":", 1)[1]
  except OSError:
    pass
  return ""


def _usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


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

