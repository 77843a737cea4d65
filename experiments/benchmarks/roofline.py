"""Roofline accounting of the RL phases: FLOPs and bytes by formula, achieved rates, measured bounds.

For each model (`--presets`; `name:L` runs a preset at reduced depth L, e.g.
`llama_1b:2`), four phases are timed on one rollout batch (B prompts × N
samples, P prompt + G new tokens):

- rollout prefill: `Sampler._prefill` (the prompt forward writing the cache);
- rollout decode:  a full `Sampler` call minus the prefill;
- scoring forward: `steps.completion_logprobs` over the returned [R, P + G] buffer
  (what the reference / old-policy scoring does), `--microbatch` rows at a time;
- update:          one `make_ppo_step` (GRPO advantage, 1 epoch × 1 minibatch, AdamW, `--microbatch`).

`--scan-unroll` / `--microbatch` default to -1, the run configs' auto settings (on CPU: every layer
unrolled, ~1k-token chunks); `--scan-unroll 1 --microbatch 0` is the code before issue 15's update work.

FLOPs and bytes come from the shapes (`phase_costs`, formulas in its docstring),
the bounds are measured in the same run: the jnp matmul peak (2048², float32
and bfloat16) and the memory bandwidth (a 256 MiB float32 copy, read + write
bytes; and a 256 MiB sum, read bytes). The bound of a phase is
max(FLOPs / matmul peak, bytes / bandwidth); "% of bound" is that time over the
measured one. Peak memory: the process's max RSS (CPU "device" memory) and the
decode executable's XLA memory analysis.

    .venv/bin/python -m experiments.benchmarks.roofline                                  # tiny, small
    .venv/bin/python -m experiments.benchmarks.roofline --presets llama_1b:2 --batch 4 --new-tokens 32
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import resource
import sys
import time
from typing import Optional

from experiments.benchmarks import _common

_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_flags() -> str:
  """The SIMD flags of this machine that decide matmul dtypes (they differ between machines of one kind)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
  except OSError:
    return "n/a"
  return " ".join(f for f in _FLAGS if f in flags) or "none of " + "/".join(_FLAGS)


def has_avx512_bf16() -> bool:
  return "avx512_bf16" in cpu_flags().split()


@dataclasses.dataclass
class Cost:
  flops: float
  bytes: float


def _dtype_bytes(name: str) -> int:
  return 2 if name in ("bfloat16", "float16") else 4


def phase_costs(cfg, *, batch: int, prompt_len: int, new_tokens: int, num_samples: int = 1,
                segment_lengths=None, head_on_all_slots: bool = False,
                full_last_layer: Optional[bool] = None) -> dict[str, Cost]:
  """FLOPs and bytes moved of each phase, from the shapes (what our code computes, not the causal minimum).

  Notation: L layers, D width, H / K query / KV heads of size Dh, F MLP width, V vocabulary,
  W = L·(2·D·H·Dh + 2·D·K·Dh + 3·D·F) matrix weights, Wq = 2·D·H·Dh + 3·D·F the part of one layer's
  that only query positions use (q, o, MLP), c compute-dtype bytes, R = B·N rows, S = P + G slots.
  Per token the matrices cost 2·W FLOPs and the head 2·D·V; attention over s keys costs 4·L·H·Dh·s.
  Activations touched per token and layer: A = (6·D + 2·(H + 2K)·Dh + 3·F)·c. The last layer runs its
  queries, attention and MLP only on the positions whose outputs are read (`Transformer(out_from=)`:
  Q = 1 in the prefill, G in scoring); every position still costs it k and v.

  - prefill: B·(P·2W − (P − 1)·2·Wq + 4·H·Dh·P·((L − 1)·P + 1)) + 2·B·D·V (head on the last position only);
    bytes: weights (W + V·D)·c + B·((L − 1)·P + 1)·A + KV written 2·L·B·P·K·Dh·c.
  - decode, summed over steps 1..G-1 (step t attends over its segment's s_t cache slots):
    R·(2W + 2·D·V + 4·L·H·Dh·s_t); bytes per step: weights (W + V·D)·c + KV read 2·L·R·K·Dh·s_t·c
    + logits R·V·4.
  - scoring forward over [R, S], with Q = G (Q = S under `full_last_layer`):
    R·(S·2W − (S − Q)·2·Wq + 4·H·Dh·S·((L − 1)·S + Q)) + R·G·2·D·V (our head runs on the G scored
    slots only; `head_on_all_slots`: on all S, as peers that slice the logits afterwards); bytes:
    weights + R·((L − 1)·S + Q)·A + scores 2·R·H·S·((L − 1)·S + Q)·4 + logits 2·R·G·V·4 (S with
    `head_on_all_slots`).
  - update (forward + backward + AdamW): 3× the scoring FLOPs and bytes, plus 32 bytes a
    float32 parameter (read p, g, m, v; write p, m, v, g).

  `full_last_layer` (default: `head_on_all_slots`, or a layer scan that is not unrolled completely, where our
  last layer runs on every position too): the scoring forward's last layer on all S positions.
  """
  d, h, k, hd, f, l, v = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.n_layers, cfg.vocab_size
  if full_last_layer is None:
    full_last_layer = head_on_all_slots or (cfg.scan_layers and cfg.scan_unroll < cfg.n_layers)
  c = _dtype_bytes(cfg.dtype)
  w = l * (2 * d * h * hd + 2 * d * k * hd + 3 * d * f)
  wq = 2 * d * h * hd + 3 * d * f
  weights = (w + v * d) * c
  act = (6 * d + 2 * (h + 2 * k) * hd + 3 * f) * c
  b, p, g, r = batch, prompt_len, new_tokens, batch * num_samples
  s = p + g
  out = {}
  out["rollout prefill"] = Cost(b * (p * 2 * w - (p - 1) * 2 * wq + 4 * h * hd * p * ((l - 1) * p + 1)) + 2 * b * d * v,
                                weights + b * ((l - 1) * p + 1) * act + 2 * l * b * p * k * hd * c)
  if segment_lengths is None:
    segment_lengths = [s]
  fl = by = 0.0
  for step in range(1, g):
    slots = next(n for n in segment_lengths if p + step - 1 < n) if p + step - 1 < segment_lengths[-1] else s
    fl += r * (2 * w + 2 * d * v + 4 * l * h * hd * slots)
    by += weights + 2 * l * r * k * hd * slots * c + r * v * 4
  out["rollout decode"] = Cost(fl, by)
  head = s if head_on_all_slots else g
  q = s if full_last_layer else g
  q_tokens = (l - 1) * s + q  # token-layers that run queries, attention and MLP
  fwd = Cost(r * (s * 2 * w - (s - q) * 2 * wq + 4 * h * hd * s * q_tokens) + r * head * 2 * d * v,
             weights + r * q_tokens * act + 2 * r * h * s * q_tokens * 4 + 2 * r * head * v * 4)
  out["scoring forward"] = fwd
  out["update"] = Cost(3 * fwd.flops, 3 * fwd.bytes + 32 * cfg.num_params())
  return out


def measure_bounds(*, repeats: int = 5, n: int = 2048, mem_mib: int = 256) -> dict[str, float]:
  """Matmul peaks (FLOP/s) and DRAM bandwidths (bytes/s) measured now, with jnp on this machine.

  The copy is done in place (input donated): a fresh 256 MiB output would measure page faults.
  """
  import jax
  import jax.numpy as jnp
  out = {}
  from rlhf_jax.models.transformer import matmul  # bfloat16 the way the model runs it: accumulated in float32
  for name, dt in (("matmul f32", jnp.float32), ("matmul bf16", jnp.bfloat16)):
    x = jnp.ones((n, n), dt)
    mm = jax.jit(lambda a, b, dt=dt: matmul(a, b, dt))
    out[name] = 2 * n ** 3 / _common.time_calls(lambda: mm(x, x).block_until_ready(), warmup=1, repeats=repeats)[0]
  nbytes = mem_mib * 2 ** 20
  buf = {"a": jnp.ones((nbytes // 4,), jnp.float32)}
  copy = jax.jit(lambda a: a + 1.0, donate_argnums=(0,))

  def do_copy():
    buf["a"] = copy(buf["a"])
    buf["a"].block_until_ready()

  out["DRAM copy bandwidth"] = 2 * nbytes / _common.time_calls(do_copy, warmup=1, repeats=repeats)[0]
  out["DRAM read bandwidth"] = read_bandwidth(nbytes, repeats=repeats)
  return out


def read_bandwidth(nbytes: int, *, repeats: int = 5, passes: int = 0) -> float:
  """Bytes/s of summing a float32 array of `nbytes` `passes` times in one jitted loop.

  Below the last-level cache size this is the cache bandwidth that a small model's
  per-step working set (weights + KV cache) is read at; the loop keeps dispatch out.
  """
  import jax
  import jax.numpy as jnp
  passes = passes or max(1, int(2 ** 28 // max(nbytes, 1)))
  x = jnp.ones((max(nbytes // 4, 1),), jnp.float32)
  f = jax.jit(lambda x: jax.lax.fori_loop(0, passes, lambda i, acc: acc + jnp.sum(x + i.astype(jnp.float32)), 0.0))
  return passes * x.nbytes / _common.time_calls(lambda: f(x).block_until_ready(), warmup=1, repeats=repeats)[0]


def decode_matmul_peak(cfg, rows: int, *, repeats: int = 5, iters: int = 64) -> float:
  """FLOP/s of the decode's own matmul shape, [rows, D] @ [D, F] in the compute dtype as the model runs it
  (`models.transformer.matmul`), in a jitted loop.

  With rows = R = 32 this is far below the 2048² peak: it is the compute bound a decode step can reach.
  """
  import jax
  import jax.numpy as jnp
  dt = jnp.dtype(cfg.dtype)
  a = jnp.ones((rows, cfg.dim), dt)
  w = jnp.ones((cfg.dim, cfg.mlp_dim), dt)
  w2 = jnp.ones((cfg.mlp_dim, cfg.dim), dt)
  from rlhf_jax.models.transformer import matmul  # the model's product (bfloat16: float32-accumulated)
  body = lambda i, x: matmul(matmul(x, w, dt), w2, dt) * 1e-3
  f = jax.jit(lambda a: jax.lax.fori_loop(0, iters, body, a))
  flops = iters * 2 * 2 * rows * cfg.dim * cfg.mlp_dim
  return flops / _common.time_calls(lambda: f(a).block_until_ready(), warmup=1, repeats=repeats)[0]


def decode_weight_matmuls_s(cfg, rows: int, *, kernel_layout: str = "in_out", steps: int = 16,
                            repeats: int = 3) -> float:
  """Seconds a decode step spends in its weight matmuls alone: [rows, D] through every layer's own q, k, v,
  o, gate, up and down kernels and the LM head, in the compute dtype as the model runs them, the kernels
  read in `kernel_layout` (the Sampler's); attention, norms, sampling and buffer updates left out.

  Every layer has its own arrays, so the step's weights stream through the caches as in the decode; the
  one [D, F] weight of `decode_matmul_peak`, reused, stays in cache and gives the rate of a step whose
  weights all fit there.
  """
  import jax
  import jax.numpy as jnp
  from rlhf_jax.models.transformer import matmul
  dt = jnp.dtype(cfg.dtype)
  d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.mlp_dim
  shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # [in, out] of wq wk wv wo gate up down
  out_in = kernel_layout == "out_in"
  layers = [[jnp.full((o, i) if out_in else (i, o), 1e-3, dt) for i, o in shapes] for _ in range(cfg.n_layers)]
  head = jnp.full((cfg.vocab_size, d), 1e-3, dt)  # [V, D]: the tied embedding as the head reads it

  def step(_, x, layers, head):
    mm = lambda a, w: matmul(a, w, dt, w_transposed=out_in)  # noqa: E731
    for wq, wk, wv, wo, wg, wu, wd in layers:
      a = mm(x, wq)
      x = jnp.tanh(x + mm(a, wo) + 1e-6 * (jnp.mean(mm(x, wk)) + jnp.mean(mm(x, wv))))
      x = jnp.tanh(x + mm(jax.nn.silu(mm(x, wg)) * mm(x, wu), wd))
    return x + 1e-6 * jnp.mean(matmul(x, head, dt, w_transposed=True, out_dtype=jnp.float32))

  run = jax.jit(lambda x, layers, head: jax.lax.fori_loop(0, steps, lambda i, x: step(i, x, layers, head), x))
  x = jnp.ones((rows, d), dt)
  return _common.time_calls(lambda: run(x, layers, head).block_until_ready(), warmup=1, repeats=repeats)[0] / steps


def bounds_table(bounds: dict[str, float]) -> str:
  rows = [[k, f"{v / 1e9:,.1f}", "GFLOP/s" if "matmul" in k else "GB/s"] for k, v in bounds.items()]
  return _common.markdown_table(["bound (measured now)", "value", "unit"], rows)


def roofline_row(label: str, phase: str, cost: Cost, seconds: float, *, peak: float, bandwidth: float) -> list:
  """One table row; the bound is max(FLOPs / peak, bytes / bandwidth)."""
  t_compute, t_memory = cost.flops / peak, cost.bytes / bandwidth
  bound = "compute" if t_compute >= t_memory else "memory"
  return [label, phase, f"{cost.flops / 1e9:,.2f}", f"{cost.bytes / 1e6:,.1f}", f"{seconds * 1e3:,.1f}",
          f"{cost.flops / seconds / 1e9:,.1f}", f"{cost.bytes / seconds / 1e9:,.2f}",
          f"{bound} ({peak / 1e9:,.0f} GFLOP/s, {bandwidth / 1e9:,.1f} GB/s)",
          f"{max(t_compute, t_memory) / seconds:.0%}"]


def decode_bounds(cfg, rows: int, prompt_len: int, new_tokens: int, bounds: dict[str, float]) -> tuple[float, float]:
  """(peak FLOP/s, bandwidth) bounding a decode step: the decode-shape matmul rate and the read
  bandwidth at the step's working set (weights + the full KV cache), measured now."""
  c = _dtype_bytes(cfg.dtype)
  kv = 2 * cfg.n_layers * rows * cfg.n_kv_heads * cfg.head_dim * (prompt_len + new_tokens) * c
  weights = phase_costs(cfg, batch=1, prompt_len=1, new_tokens=1)["rollout prefill"].bytes
  ws = int(weights + kv)
  bw = read_bandwidth(ws) if ws < 2 ** 28 else bounds["DRAM read bandwidth"]
  return decode_matmul_peak(cfg, rows), bw


ROOFLINE_HEADER = ["model", "phase", "GFLOP", "MB moved", "ms", "achieved GFLOP/s", "achieved GB/s",
                   "bound (peak, bandwidth used)", "% of bound"]


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--presets", default="tiny,small", help="comma-separated presets; name:L = at depth L")
  ap.add_argument("--batch", type=int, default=32, help="prompts B")
  ap.add_argument("--num-samples", type=int, default=1, help="samples N per prompt")
  ap.add_argument("--prompt-len", type=int, default=16)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
  ap.add_argument("--skip-update", action="store_true", help="time only the rollout and scoring phases")
  ap.add_argument("--draw", default="gumbel", help="Sampler draw: gumbel (default) or inverse_cdf")
  ap.add_argument("--host-threads", type=int, default=0,
                  help="Sampler host_threads (0 = auto: the prompts split over the usable cores; 1 = one call)")
  ap.add_argument("--kernel-layout", default="", choices=("", "in_out", "out_in"),
                  help="the Sampler decode's kernel_layout ('' = auto: out_in on an AVX2-only CPU, in_out elsewhere)")
  ap.add_argument("--scan-unroll", type=int, default=-1,
                  help="layers per scan iteration, as config.model.scan_unroll: -1 = auto (the run configs' default)")
  ap.add_argument("--microbatch", type=int, default=-1,
                  help="rows per scoring/update chunk, as config.model.microbatch: -1 = auto, 0 = whole batch")
  return ap.parse_args()


def run_preset(spec: str, args, bounds) -> list[list]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from rlhf_jax import losses, models, sampling
  from rlhf_jax.state import create_train_state
  from rlhf_jax.steps import PPOState, completion_logprobs, make_ppo_step
  from rlhf_jax.steps.common import map_rows

  name, _, depth = spec.partition(":")
  cfg = models.get_model_config(name, dtype=args.dtype, n_layers=int(depth) if depth else None)
  cfg = dataclasses.replace(cfg, scan_unroll=models.resolve_scan_unroll(args.scan_unroll, cfg.n_layers))
  microbatch = "auto" if args.microbatch == -1 else (args.microbatch or None)
  label = spec + (f" ({cfg.dtype})")
  b, n, p, g = args.batch, args.num_samples, args.prompt_len, args.new_tokens
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  prompt = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, size=(b, p)), jnp.int32)
  mask = jnp.ones_like(prompt)
  sampler = sampling.Sampler(cfg, sampling.SamplingParams(max_new_tokens=g, temperature=1.0, num_samples=n),
                             eos_id=-1, pad_id=0, draw=args.draw, host_threads=args.host_threads or None,
                             kernel_layout=args.kernel_layout or None)
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
  holder = {}

  def sample():
    holder["out"] = sampler(params, prompt, mask, next(keys))
    jax.block_until_ready(holder["out"].completion_tokens)

  prefill = _common.sampler_prefill(sampler, params, prompt, mask, keys)
  times = {}
  times["rollout prefill"] = _common.time_calls(prefill, warmup=1, repeats=args.repeats)[0]
  total = _common.time_calls(sample, warmup=1, repeats=args.repeats)[0]
  times["rollout decode"] = max(total - times["rollout prefill"], 1e-9)
  out = holder["out"]
  apply_fn = models.make_apply_fn(cfg)
  score = jax.jit(lambda prm, t, m: map_rows(lambda t_, m_: completion_logprobs(apply_fn, prm, t_, m_, p),
                                             microbatch, t, m))
  times["scoring forward"] = _common.time_calls(
      lambda: jax.block_until_ready(score(params, out.tokens, out.mask)), warmup=1, repeats=args.repeats)[0]
  if not args.skip_update:
    tx = optax.adamw(1e-5)
    step = jax.jit(make_ppo_step(apply_fn, tx, prompt_len=p, advantage="grpo", temperature=1.0, epochs=1,
                                 minibatches=1, microbatch=microbatch), donate_argnums=(0,))
    r = b * n
    batch = {"tokens": out.tokens, "mask": out.mask, "completion_mask": out.completion_mask,
             "old_logprobs": out.completion_logprobs, "ref_logprobs": out.completion_logprobs,
             "advantages": jnp.linspace(-1.0, 1.0, r), "weights": jnp.ones(r), "scores": jnp.zeros(r)}
    st = {"s": PPOState(actor=create_train_state(params, tx, jax.random.PRNGKey(0)), critic=None,
                        kl=losses.init_kl_controller(0.0))}

    def update():
      st["s"], m = step(st["s"], batch)
      jax.block_until_ready(m)

    times["update"] = _common.time_calls(update, warmup=1, repeats=args.repeats)[0]
  costs = phase_costs(cfg, batch=b, prompt_len=p, new_tokens=g, num_samples=n,
                      segment_lengths=sampler.segment_lengths(p))
  peak = bounds["matmul bf16" if cfg.dtype == "bfloat16" else "matmul f32"]
  dec_peak, dec_bw = decode_bounds(cfg, b * n, p, g, bounds)
  rows = []
  for ph, t in times.items():
    if ph == "rollout decode":
      rows.append(roofline_row(label, ph, costs[ph], t, peak=dec_peak, bandwidth=dec_bw))
    else:
      rows.append(roofline_row(label, ph, costs[ph], t, peak=peak, bandwidth=bounds["DRAM copy bandwidth"]))
  groups = sampler.groups(b)  # the decode executable of one host-thread group (all of them run it)
  first, offset, total = groups[0]
  st_abs = jax.eval_shape(functools.partial(sampler._prefill, total_rows=total), params, prompt[first], mask[first],
                          jax.random.PRNGKey(0), offset)
  mem = sampler._decode.lower(params, st_abs._replace(cache=()), st_abs.cache, offset,
                              total_rows=total).compile().memory_analysis()
  if mem is not None:
    print(f"#   {label}: decode executable memory (one of {len(groups)} host-thread groups): "
          f"arguments {mem.argument_size_in_bytes / 2**20:,.1f} MiB, "
          f"outputs {mem.output_size_in_bytes / 2**20:,.1f} MiB, temporaries {mem.temp_size_in_bytes / 2**20:,.1f} MiB",
          flush=True)
  print(f"#   {label}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()), file=sys.stderr, flush=True)
  return rows


def main():
  args = parse_args()
  _common.set_threads(args.threads)
  import jax
  print(f"# roofline: batch {args.batch} x {args.num_samples} samples, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, threads {args.threads} (cpu_count {os.cpu_count()}), jax {jax.__version__}")
  from rlhf_jax.sampling import default_kernel_layout
  print(f"# cpu flags: {cpu_flags()}; sampler draw {args.draw}, host threads {args.host_threads or 'auto'}, "
        f"decode kernel layout {args.kernel_layout or default_kernel_layout()}; "
        f"scan_unroll {args.scan_unroll}, microbatch "
        f"{args.microbatch} (-1 = auto, as the run configs)")
  print(f"# load average at start: {_common.load_average()}")
  bounds = measure_bounds()
  print(bounds_table(bounds))
  rows = []
  for spec in args.presets.split(","):
    rows += run_preset(spec, args, bounds)
  print(_common.markdown_table(ROOFLINE_HEADER, rows))
  print(f"# peak memory (process max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:,.2f} GiB")
  print(f"# load average at end: {_common.load_average()}")


if __name__ == "__main__":
  main()
