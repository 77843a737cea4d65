"""The decode step's attention alone: how its time scales with the KV cache, and the rewrites tried on it.

A profile of the tiny sampler (RESULTS.md, issue 15) put the decode's q·kᵀ + softmax fusion at 28% of the
call while doing the least arithmetic. This script isolates that attention, in the sampler's layout (queries
`[B, Hkv, G, 1, Dh]`, one layer's cache `[B, Hkv, S, Dh]`), inside a jitted `fori_loop` of `--steps` steps
(dispatch stays out), and prints two tables:

1. the model's formulation (`rlhf_jax.models.transformer.Attention`'s cache path) at several cache lengths,
   with the bytes of K and V read a step and the rate they are read at, beside the read bandwidth measured now
   at the same working-set size (`roofline.read_bandwidth`): equal rates mean the attention is bound by
   reading the cache, not by arithmetic;
2. rewrites of the same attention at the longest length, timed in turns in one process, each checked against
   the model's formulation (max |difference| of the outputs after the loop).

    .venv/bin/python -m experiments.benchmarks.decode_attention                 # tiny's shape at batch 32
    .venv/bin/python -m experiments.benchmarks.decode_attention --kv-heads 4 --group 2 --head-dim 64
"""
from __future__ import annotations

import argparse
import os
import sys

from experiments.benchmarks import _common


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=32, help="rows (the sampler benchmark's batch)")
  p.add_argument("--kv-heads", type=int, default=2, help="KV heads (tiny: 2)")
  p.add_argument("--group", type=int, default=2, help="query heads per KV head (tiny: 4 / 2)")
  p.add_argument("--head-dim", type=int, default=32, help="head dimension (tiny: 32)")
  p.add_argument("--lengths", default="36,72,143", help="cache slots attended (tiny, prompt 16 + 128 new: "
                                                         "the 4 decode segments reach 48..143)")
  p.add_argument("--steps", type=int, default=128, help="attention calls in one jitted loop")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--threads", type=int, default=2)
  args = p.parse_args()
  try:
    args.lengths = [int(x) for x in args.lengths.split(",")]
  except ValueError:
    p.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
  for name in ("batch", "kv_heads", "group", "head_dim", "steps", "repeats", "threads"):
    if getattr(args, name) <= 0:
      p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
  if min(args.lengths) <= 0:
    p.error(f"--lengths must be positive, got {args.lengths}")
  return args


def formulations(scale: float):
  """name -> attention(q [B,K,G,1,D], k [B,K,S,D], v [B,K,S,D], bias [B,1,1,1,S]) -> [B,K,G,1,D]."""
  import jax
  import jax.numpy as jnp

  def model(q, k, v, bias):  # as `Attention` with a cache
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale + bias
    return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(s, axis=-1), v)

  def q_prescaled(q, k, v, bias):
    s = jnp.einsum("bkgtd,bksd->bkgts", q * scale, k, preferred_element_type=jnp.float32) + bias
    return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(s, axis=-1), v)

  def barrier_after_dot(q, k, v, bias):  # the dot alone in its fusion, the softmax in another
    s = jax.lax.optimization_barrier(jnp.einsum("bkgtd,bksd->bkgts", q * scale, k,
                                                preferred_element_type=jnp.float32))
    return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(s + bias, axis=-1), v)

  def multiply_reduce(q, k, v, bias):  # q·kᵀ as an elementwise product and a sum over D
    s = jnp.sum(q[:, :, :, 0, None, :] * scale * k[:, :, None, :, :], axis=-1)[:, :, :, None, :] + bias
    return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(s, axis=-1), v)

  def one_batch_dim(q, k, v, bias):  # (b, k) folded into one batch dimension of both dots
    b, kh, g, _, d = q.shape
    sl = k.shape[2]
    s = jax.lax.dot_general((q * scale).reshape(b * kh, g, d), k.reshape(b * kh, sl, d),
                            (((2,), (2,)), ((0,), (0,)))).reshape(b, kh, g, 1, sl) + bias
    p = jax.nn.softmax(s, axis=-1).reshape(b * kh, g, sl)
    return jax.lax.dot_general(p, v.reshape(b * kh, sl, d), (((2,), (1,)), ((0,), (0,)))).reshape(b, kh, g, 1, d)

  def normalise_after(q, k, v, bias):  # exp(s - max) · v, divided by the row sum afterwards
    s = jnp.einsum("bkgtd,bksd->bkgts", q * scale, k, preferred_element_type=jnp.float32) + bias
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return jnp.einsum("bkgts,bksd->bkgtd", e, v) / jnp.sum(e, axis=-1, keepdims=True)

  def bf16_cache_cast(q, k, v, bias):  # the cache stored in bf16, cast to f32 at use
    return model(q, k.astype(jnp.float32), v.astype(jnp.float32), bias)

  def bf16_cache_dots(q, k, v, bias):  # bf16 operands, f32 accumulation
    s = jnp.einsum("bkgtd,bksd->bkgts", (q * scale).astype(jnp.bfloat16), k,
                   preferred_element_type=jnp.float32) + bias
    p = jax.nn.softmax(s, axis=-1).astype(jnp.bfloat16)
    return jnp.einsum("bkgts,bksd->bkgtd", p, v, preferred_element_type=jnp.float32)

  f32 = {"model (as Attention)": model, "q pre-scaled": q_prescaled, "barrier after q·kᵀ": barrier_after_dot,
         "multiply + reduce": multiply_reduce, "(b, k) as one batch dim": one_batch_dim,
         "normalise after probs·v": normalise_after}
  bf16 = {"bf16 cache, cast at use": bf16_cache_cast, "bf16 cache, bf16 dots": bf16_cache_dots}
  return f32, bf16


def main():
  args = parse_args()
  _common.set_threads(args.threads)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from experiments.benchmarks import roofline

  b, kh, g, d = args.batch, args.kv_heads, args.group, args.head_dim
  f32, bf16 = formulations(d ** -0.5)

  def looped(fn):
    body = lambda i, q, k, v, bias: q + 1e-3 * fn(q, k, v, bias)  # each step depends on the last
    return jax.jit(lambda q, k, v, bias: jax.lax.fori_loop(0, args.steps, lambda i, q: body(i, q, k, v, bias), q))

  def inputs(s, *, padded: bool):
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(b, kh, g, 1, d), jnp.float32)
    k = jnp.asarray(rng.randn(b, kh, s, d), jnp.float32)
    v = jnp.asarray(rng.randn(b, kh, s, d), jnp.float32)
    keep = rng.rand(b, 1, 1, 1, s) < 0.9 if padded else np.ones((b, 1, 1, 1, s), bool)
    keep[..., 0] = True  # no row fully masked
    return q, k, v, jnp.asarray(np.where(keep, 0.0, -1e9), jnp.float32)

  print(f"# decode attention: batch {b}, {kh} KV heads x {g} query heads, head dim {d}, {args.steps} steps a "
        f"jitted loop, median of {args.repeats}; threads {args.threads} (cpu_count {os.cpu_count()}), "
        f"jax {jax.__version__}")
  print(f"# cpu flags: {roofline.cpu_flags()}; load average at start: {_common.load_average()}")

  rows = []
  for s in args.lengths:
    q, k, v, bias = inputs(s, padded=False)
    f = looped(f32["model (as Attention)"])
    sec = _common.time_calls(lambda: f(q, k, v, bias).block_until_ready(), warmup=1, repeats=args.repeats)[0]
    nbytes = k.nbytes + v.nbytes
    bw = roofline.read_bandwidth(nbytes, repeats=args.repeats)
    flops = 2 * 2 * b * kh * g * s * d
    step = sec / args.steps
    rows.append([s, f"{nbytes / 2 ** 20:.2f}", f"{step * 1e6:.1f}", f"{flops / step / 1e9:.1f}",
                 f"{nbytes / step / 1e9:.1f}", f"{bw / 1e9:.1f}"])
  print(_common.markdown_table(["cache slots S", "K+V MiB a step", "µs a step", "GFLOP/s", "cache read GB/s",
                                "read bandwidth now (same bytes) GB/s"], rows))

  s = max(args.lengths)
  q, k, v, bias = inputs(s, padded=True)
  kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  runs = {name: (looped(fn), (q, k, v, bias)) for name, fn in f32.items()}
  runs.update({name: (looped(fn), (q, kb, vb, bias)) for name, fn in bf16.items()})
  ref = runs["model (as Attention)"][0](q, k, v, bias)
  diffs = {name: float(jnp.max(jnp.abs(f(*a) - ref))) for name, (f, a) in runs.items()}
  med = _common.time_interleaved({name: (lambda f=f, a=a: f(*a).block_until_ready()) for name, (f, a) in runs.items()},
                                 warmup=1, repeats=args.repeats)
  base = med["model (as Attention)"]
  print(f"\nrewrites at S = {s}, ~10% of slots masked, timed in turns:")
  print(_common.markdown_table(["formulation", "µs a step", "vs model", "max |diff| after the loop"],
                               [[n, f"{med[n] / args.steps * 1e6:.1f}", f"{base / med[n]:.2f}x", f"{diffs[n]:.1e}"]
                                for n in runs]))
  print(f"# load average at end: {_common.load_average()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
