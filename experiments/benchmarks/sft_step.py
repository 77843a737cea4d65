"""SFT update step (forward + backward + AdamW): rlhf_jax against torch eager.

Our side is `rlhf_jax.steps.make_sft_step` jitted once with the state donated,
AdamW from `rlhf_jax.state.make_optimizer` (global-norm clip 1, weight decay
0.01). The peer is an HF LlamaForCausalLM with the same shapes: logits over the
same `--seq-len` input positions, float32 cross-entropy against the next token,
`backward`, `clip_grad_norm_(1)`, `torch.optim.AdamW` (same betas, eps, decay).
Every one of the B·T positions is a trained token on both sides.

FLOPs are counted analytically and identically for both sides:
  6 · N_matmul · B·T  +  12 · L · T² · D · B
(N_matmul = every weight used in a matmul, the tied LM head included, the
embedding gather not; the attention term counts the full T×T score and
value products, forward + 2× backward, without halving for causality). XLA's
own `cost_analysis()` count for the compiled step is printed alongside.
The matmul peak is measured in the same run: 2048² float32 with numpy and
jax.numpy, and 2048² bfloat16 with jax.numpy, both to a bfloat16 result and
to a float32 one (`preferred_element_type`, the form our bfloat16 model uses;
on AMX CPUs XLA:CPU runs it ~4× faster than the other). "of peak" is against
the float32 peak for `--dtype float32` and the bfloat16 → float32 one otherwise.
"GFLOP/s at 1.2x PEER" is the rate the whole step would need for the issue's target (1.2× the peer's
speed), and in brackets that rate over XLA's own 2048² matmul peak measured now (`jnp f32`, or
`jnp bf16 -> f32`): at 100% or more the target asks every part of the step (attention, norms, loss,
optimizer) to run at the best rate XLA:CPU reaches on one large matmul.
"our step's dots alone" (`dot_bound.py`) reads every dot out of our compiled step (with the chunk loop's trip
count) and runs them one after another, as often as the step does, with XLA (jitted `lax.dot_general`) and with
`torch.matmul` on the same contraction, timed in turns with the step and torch eager: the step's matmul time
at XLA's rate for these small shapes, which the 2048² peak overstates. When it alone exceeds torch eager's
whole step / 1.2, the target needs faster kernels than XLA:CPU's for those shapes, whatever the rest of the
step does (`--per-dot` prints each distinct dot's rate).
With `--dtype bfloat16` torch also runs under `torch.autocast("cpu",
bfloat16)` (oneDNN bfloat16 kernels), the like-for-like peer.

    .venv-bench/bin/python experiments/benchmarks/sft_step.py                 # both sides
    .venv-bench/bin/python experiments/benchmarks/sft_step.py --torch-compile # + torch.compile
    .venv/bin/python experiments/benchmarks/sft_step.py --no-torch            # ours only

Ours runs with the run configs' compute defaults (`--scan-unroll -1 --microbatch -1`: on CPU the layer scan
unrolled and the batch ~1k tokens a forward/backward chunk, gradients accumulated); `--scan-unroll 1
--microbatch 0` is the step before issue 15.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from experiments.benchmarks import _common


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--presets", default="tiny,small", help="comma-separated model presets")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq-len", type=int, default=128, help="input positions per sequence (all trained)")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--dtype", default="float32", help="our compute dtype (params and Adam stay float32)")
  ap.add_argument("--matmul-size", type=int, default=2048)
  ap.add_argument("--no-torch", action="store_true", help="skip the torch peer")
  ap.add_argument("--scan-unroll", type=int, default=-1,
                  help="layers per scan iteration, as config.model.scan_unroll: -1 = auto (the run configs' default)")
  ap.add_argument("--microbatch", type=int, default=-1,
                  help="rows per forward/backward chunk, as config.model.microbatch: -1 = auto, 0 = whole batch")
  ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile(model) (slow to build)")
  ap.add_argument("--no-dot-bound", action="store_true",
                  help="skip timing our step's dots alone (dot_bound.py; a third and fourth side in the timed turns)")
  ap.add_argument("--per-dot", action="store_true", help="print each distinct dot's rate (XLA, torch.matmul)")
  return ap.parse_args()


def model_flops(cfg, batch: int, seq: int) -> float:
  d, hd = cfg.dim, cfg.head_dim
  per_layer = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2 + 3 * d * cfg.mlp_dim
  n_matmul = cfg.n_layers * per_layer + d * cfg.vocab_size
  return 6.0 * n_matmul * batch * seq + 12.0 * cfg.n_layers * seq * seq * d * batch


def matmul_peaks(n: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  flops = 2.0 * n ** 3
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
  out = {"numpy f32": flops / _common.time_calls(lambda: a @ b, warmup=1, repeats=repeats)[0]}
  mm = jax.jit(jnp.dot)
  mm_f32_acc = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  for name, dt, fn in (("jnp f32", jnp.float32, mm), ("jnp bf16", jnp.bfloat16, mm),
                       ("jnp bf16 -> f32", jnp.bfloat16, mm_f32_acc)):
    x, y = jnp.asarray(a, dt), jnp.asarray(b, dt)
    out[name] = flops / _common.time_calls(lambda: fn(x, y).block_until_ready(), warmup=1, repeats=repeats)[0]
  return out


def bench_ours(cfg, tokens, args):
  import jax
  import jax.numpy as jnp
  from rlhf_jax import models, state as state_lib
  from rlhf_jax.steps.sft import make_sft_step

  opt = state_lib.make_optimizer(learning_rate=1e-4, schedule="constant", total_steps=10_000, b1=0.9, b2=0.95,
                                 eps=1e-8, weight_decay=0.01, grad_clip=1.0)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  st = state_lib.create_train_state(params, opt, jax.random.PRNGKey(1))
  tok = jnp.asarray(tokens, jnp.int32)             # [B, T+1]: T inputs, T targets
  batch = {"tokens": tok, "mask": jnp.ones_like(tok), "loss_mask": jnp.ones_like(tok)}
  microbatch = "auto" if args.microbatch == -1 else (args.microbatch or None)
  step = jax.jit(make_sft_step(models.make_apply_fn(cfg), opt, microbatch=microbatch), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(st, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = {"st": st}

  def call():
    holder["st"], m = compiled(holder["st"], batch)
    jax.block_until_ready(m["train/loss"])

  return call, compile_s, compiled


def bench_torch(cfg, tokens, args, torch, *, compile_model: bool, autocast: bool = False):
  import torch.nn.functional as F
  model = _common.hf_llama(cfg, torch).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
  tok = torch.as_tensor(tokens, dtype=torch.long)
  inputs, targets = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
  fwd = torch.compile(model) if compile_model else model

  def call():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      logits = fwd(input_ids=inputs).logits
    loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()

  t0 = time.perf_counter()
  call()  # builds the torch.compile graph when asked
  return call, time.perf_counter() - t0


def main():
  args = parse_args()
  _common.set_threads(args.threads)
  import numpy as np
  from rlhf_jax import models

  torch, why = (None, "--no-torch") if args.no_torch else _common.try_import_torch(args.threads)
  import jax
  print(f"# SFT step: batch {args.batch} x {args.seq_len} tokens, our dtype {args.dtype}, threads {args.threads} "
        f"(cpu_count {os.cpu_count()}), jax {jax.__version__}"
        + (f", torch {torch.__version__}" if torch else f", torch peer skipped: {why}"))
  from experiments.benchmarks.roofline import cpu_flags
  print(f"# cpu flags: {cpu_flags()}; load average at start: {_common.load_average()}")
  peaks = matmul_peaks(args.matmul_size, args.repeats)
  print(_common.markdown_table([f"matmul {args.matmul_size}² peak", "GFLOP/s"],
                               [[k, f"{v / 1e9:,.1f}"] for k, v in peaks.items()]))
  peak = max(peaks["numpy f32"], peaks["jnp f32"]) if args.dtype == "float32" else peaks["jnp bf16 -> f32"]
  jnp_peak = peaks["jnp f32"] if args.dtype == "float32" else peaks["jnp bf16 -> f32"]
  peers = ["torch eager"] + (["torch autocast bf16"] if args.dtype == "bfloat16" else []) + (
      ["torch.compile"] if args.torch_compile else [])
  rows = []
  for preset in args.presets.split(","):
    cfg = models.get_model_config(preset, dtype=args.dtype)
    cfg = dataclasses.replace(cfg, scan_unroll=models.resolve_scan_unroll(args.scan_unroll, cfg.n_layers))
    from rlhf_jax.steps.common import microbatch_rows
    # The step's token buffer is [B, T + 1] (inputs and the shifted targets): chunks are sized by its width.
    mb = microbatch_rows(args.batch, args.seq_len + 1, "auto" if args.microbatch == -1 else (args.microbatch or None))
    print(f"#   {preset}: scan_unroll {cfg.scan_unroll}, {mb} rows a forward/backward chunk")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(args.batch, args.seq_len + 1))
    n_tok = args.batch * args.seq_len
    flops = model_flops(cfg, args.batch, args.seq_len)
    fns = {}
    fns["ours"], compile_s, compiled = bench_ours(cfg, tokens, args)
    if torch is not None:
      fns["torch eager"], _ = bench_torch(cfg, tokens, args, torch, compile_model=False)
      if "torch autocast bf16" in peers:
        fns["torch autocast bf16"], _ = bench_torch(cfg, tokens, args, torch, compile_model=False, autocast=True)
      if args.torch_compile:
        fns["torch.compile"], tc_compile_s = bench_torch(cfg, tokens, args, torch, compile_model=True)
        print(f"#   {preset}: torch.compile first call {tc_compile_s:.1f} s", file=sys.stderr)
    dots = None
    if not args.no_dot_bound:
      from experiments.benchmarks import dot_bound
      dots = dot_bound.compiled_dots(compiled.as_text())
      fns.update(dot_bound.program_callables(dots, torch=torch))
    med = _common.time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    ours_s = med["ours"]
    row = [preset, f"{cfg.num_params() / 1e6:.2f}M", f"{n_tok / ours_s:,.0f}", f"{ours_s * 1e3:,.0f}",
           f"{flops / ours_s / 1e9:,.1f}", f"{flops / ours_s / peak:.0%}", f"{compile_s:.1f}"]
    for name in peers:
      t_s = med.get(name)
      need = flops / (t_s / 1.2) if t_s else 0.0  # the whole step's FLOP rate at 1.2x the peer's speed
      row += ([f"{n_tok / t_s:,.0f}", f"{t_s / ours_s:.2f}x", f"{need / 1e9:,.1f} ({need / jnp_peak:.0%})"]
              if t_s else ["n/a", "n/a", "n/a"])
    print("#   " + preset + ": " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items()), file=sys.stderr,
          flush=True)
    if dots is not None:
      gflop = sum(d.flops * d.count for d in dots) / 1e9
      print(f"#   {preset}: our step runs {sum(d.count for d in dots)} dots, {gflop:.2f} GFLOP", file=sys.stderr)
      t_x, t_t = med["dots alone, XLA"], med.get("dots alone, torch.matmul")
      row.append(f"{t_x * 1e3:,.0f} ({gflop / t_x:.0f})" + (f" / {t_t * 1e3:,.0f} ({gflop / t_t:.0f})" if t_t else ""))
      if args.per_dot:
        print(dot_bound.per_dot_table(dot_bound.time_dots(dots, torch=torch, repeats=args.repeats)))
    rows.append(row)
  header = ["model", "params", "ours tok/s", "ours ms", "ours GFLOP/s", f"of {args.dtype} peak", "compile s"]
  for name in peers:
    header += [f"{name} tok/s", f"speed-up vs {name}", f"GFLOP/s at 1.2x {name} (of jnp peak)"]
  if not args.no_dot_bound:
    header.append("our step's dots alone ms (GFLOP/s), XLA" + (" / torch.matmul" if torch is not None else ""))
  print(_common.markdown_table(header, rows))
  print(f"# load average at end: {_common.load_average()}")


if __name__ == "__main__":
  main()
