"""Sampler throughput: rlhf_jax.sampling.Sampler against Hugging Face `generate`.

Both sides generate exactly `--new-tokens` tokens for `--batch` prompts of
`--prompt-len` random tokens (EOS disabled, KV cache on), from a model with the
same shapes (our preset; an HF LlamaForCausalLM built from a matching local
LlamaConfig with random weights), on `--threads` threads, greedy and with
temperature sampling (temperature 1, no top-k/top-p on either side). The
reported time is the median of `--repeats` warm calls, the two sides timed in
turns; our compile time (the first call minus a warm one) is reported
separately. With `--dtype bfloat16` HF also runs with its weights in bfloat16
("HF bf16"), the like-for-like peer; "HF" stays float32.

It also prints the decode's roofline (`roofline.py`): FLOPs and bytes of the
decode by formula, the achieved rates, and the bounds measured in the same run
(the matmul rate at the decode's [B, D] @ [D, F] shape, the read bandwidth at the
step's working set), plus the per-step floor of the decode loop (the same
sampler on a 1-layer, width-8 model: what the while_loop, sampling and buffer
updates cost with almost no model).

    .venv-bench/bin/python experiments/benchmarks/sampler_throughput.py            # both sides
    .venv/bin/python experiments/benchmarks/sampler_throughput.py --presets tiny   # ours only
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from experiments.benchmarks import _common


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--presets", default="tiny,small", help="comma-separated model presets")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--prompt-len", type=int, default=16)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--temperatures", default="0,1", help="comma-separated; 0 = greedy")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--dtype", default="float32", help="our compute dtype (params stay float32); bfloat16 "
                  "(float32-accumulated matmuls) is the faster one on AMX CPUs for the small preset (README)")
  ap.add_argument("--decode-segments", type=int, default=0, help="Sampler decode_segments (0 = its default)")
  ap.add_argument("--draw", default="gumbel", help="Sampler draw: gumbel (default) or inverse_cdf")
  ap.add_argument("--host-threads", type=int, default=0,
                  help="Sampler host_threads (0 = auto: the prompts split over the usable cores; 1 = one call)")
  ap.add_argument("--kernel-layout", default="", choices=("", "in_out", "out_in"),
                  help="the Sampler decode's kernel_layout ('' = auto: out_in on an AVX2-only CPU, in_out elsewhere)")
  ap.add_argument("--no-torch", action="store_true", help="skip the Hugging Face peer")
  return ap.parse_args()


def bench_ours(cfg, prompt, temperature, args):
  import jax
  import jax.numpy as jnp
  from rlhf_jax import models, sampling

  params = models.init_params(cfg, jax.random.PRNGKey(0))
  sp = sampling.SamplingParams(max_new_tokens=args.new_tokens, temperature=temperature)
  # eos_id outside the vocabulary: every row generates all new tokens, as on the HF side.
  sampler = sampling.Sampler(cfg, sp, eos_id=-1, pad_id=0, decode_segments=args.decode_segments or None,
                             draw=args.draw, host_threads=args.host_threads or None,
                             kernel_layout=args.kernel_layout or None)
  tokens = jnp.asarray(prompt, jnp.int32)
  mask = jnp.ones_like(tokens)
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))

  def call():
    out = sampler(params, tokens, mask, next(keys))
    jax.block_until_ready(out.completion_tokens)
    return out

  t0 = time.perf_counter()
  out = call()
  first = time.perf_counter() - t0
  assert out.completion_tokens.shape == (args.batch, args.new_tokens)
  assert int(out.lengths.min()) == args.new_tokens, "EOS must be disabled"
  t0 = time.perf_counter()
  call()
  compile_s = max(first - (time.perf_counter() - t0), 0.0)
  prefill = _common.sampler_prefill(sampler, params, tokens, mask, keys)
  return call, compile_s, sampler, prefill


def _loop_floor_ms(args) -> float:
  """Milliseconds a decode step costs with (almost) no model: the loop's own per-step overhead."""
  import dataclasses
  import numpy as np
  from rlhf_jax import models
  cfg = dataclasses.replace(models.get_model_config("tiny"), n_layers=1, dim=8, n_heads=2, n_kv_heads=1, mlp_dim=8,
                            vocab_size=16)
  prompt = np.zeros((args.batch, args.prompt_len), np.int64) + 3
  call = bench_ours(cfg, prompt, 1.0, args)[0]
  return _common.time_calls(call, warmup=1, repeats=args.repeats)[0] / args.new_tokens * 1e3


def bench_hf(cfg, prompt, temperature, args, torch, bf16: bool = False):
  model = _common.hf_llama(cfg, torch).eval()
  if bf16:  # the like-for-like peer of our bfloat16 compute (oneDNN bfloat16 kernels; AMX where the CPU has it)
    model = model.to(torch.bfloat16)
  ids = torch.as_tensor(prompt, dtype=torch.long)
  attn = torch.ones_like(ids)
  kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True,
            eos_token_id=None, pad_token_id=0)
  if temperature > 0:
    kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
  else:
    kw.update(do_sample=False)
  gen = iter(range(1000))

  def call():
    torch.manual_seed(next(gen))
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=attn, **kw)
    assert out.shape == (args.batch, args.prompt_len + args.new_tokens), out.shape
    return out

  return call


def main():
  args = parse_args()
  _common.set_threads(args.threads)
  import numpy as np
  from rlhf_jax import models

  torch, why = (None, "--no-torch") if args.no_torch else _common.try_import_torch(args.threads)
  import jax
  from experiments.benchmarks import roofline
  from rlhf_jax.sampling import default_kernel_layout
  print(f"# sampler throughput: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"threads {args.threads} (cpu_count {os.cpu_count()}), jax {jax.__version__}"
        + (f", torch {torch.__version__}" if torch else f", HF peer skipped: {why}"))
  print(f"# cpu flags: {roofline.cpu_flags()}; our dtype {args.dtype}, draw {args.draw}, sampler host threads "
        f"{args.host_threads or 'auto'} (usable cores {len(os.sched_getaffinity(0))}), decode kernel layout "
        f"{args.kernel_layout or default_kernel_layout()}")
  print(f"# load average at start: {_common.load_average()}")
  rows, roof_rows, decode_step_ms = [], [], {}
  for preset in args.presets.split(","):
    cfg = models.get_model_config(preset, dtype=args.dtype)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg.vocab_size, size=(args.batch, args.prompt_len))
    n_new = args.batch * args.new_tokens
    for temperature in (float(t) for t in args.temperatures.split(",")):
      fns = {}
      fns["ours"], compile_s, sampler, prefill = bench_ours(cfg, prompt, temperature, args)
      prefill_s = _common.time_calls(prefill, warmup=1, repeats=args.repeats)[0]
      if torch is not None:
        fns["hf"] = bench_hf(cfg, prompt, temperature, args, torch)
        if args.dtype == "bfloat16":
          fns["hf bf16"] = bench_hf(cfg, prompt, temperature, args, torch, bf16=True)
      med = _common.time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
      assert sampler.trace_counts == {"prefill": 1, "decode": 1}, sampler.trace_counts  # compiled once
      ours_s, hf_s = med["ours"], med.get("hf")
      mode = "greedy" if temperature == 0 else f"T={temperature:g}"
      rows.append([preset, mode, f"{n_new / ours_s:,.0f}", f"{ours_s * 1e3:,.0f}", f"{compile_s:.1f}",
                   f"{n_new / hf_s:,.0f}" if hf_s else "n/a", f"{hf_s * 1e3:,.0f}" if hf_s else "n/a",
                   f"{hf_s / ours_s:.2f}x" if hf_s else "n/a"]
                  + ([f"{med['hf bf16'] * 1e3:,.0f}", f"{med['hf bf16'] / ours_s:.2f}x"] if "hf bf16" in med else []))
      costs = roofline.phase_costs(cfg, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                   segment_lengths=sampler.segment_lengths(args.prompt_len))
      peak, bw = roofline.decode_bounds(cfg, args.batch, args.prompt_len, args.new_tokens, {
          "DRAM read bandwidth": roofline.read_bandwidth(2 ** 28)})
      roof_rows.append(roofline.roofline_row(f"{preset} {mode}", "rollout decode", costs["rollout decode"],
                                             max(ours_s - prefill_s, 1e-9), peak=peak, bandwidth=bw))
      decode_step_ms.setdefault(preset, {})[mode] = (ours_s - prefill_s) / (args.new_tokens - 1) * 1e3
      print(f"#   {preset} {mode}: ours {ours_s * 1e3:.0f} ms (prefill {prefill_s * 1e3:.1f} ms)"
            + (f", HF {hf_s * 1e3:.0f} ms" if hf_s else "")
            + (f", HF bf16 {med['hf bf16'] * 1e3:.0f} ms" if "hf bf16" in med else ""), file=sys.stderr, flush=True)
  print(_common.markdown_table(
      ["model", "mode", "ours tok/s", "ours ms", "ours compile s", "HF generate tok/s", "HF ms", "speed-up"]
      + (["HF bf16 ms", "speed-up vs HF bf16"] if args.dtype == "bfloat16" and torch is not None else []), rows))
  print(_common.markdown_table(roofline.ROOFLINE_HEADER, roof_rows))
  for preset, modes in decode_step_ms.items():
    cfg = models.get_model_config(preset, dtype=args.dtype)
    alone = {lay: roofline.decode_weight_matmuls_s(cfg, args.batch, kernel_layout=lay) * 1e3
             for lay in ("in_out", "out_in")}
    print(f"# {preset}: a decode step's weight matmuls alone (each layer's own weights), kernels in_out "
          f"{alone['in_out']:.2f} ms, out_in {alone['out_in']:.2f} ms; the measured decode step (layout "
          f"{sampler.kernel_layout}): " + ", ".join(f"{m} {v:.2f} ms" for m, v in modes.items()))
  floor = _loop_floor_ms(args)
  print(f"# decode loop floor (1 layer, width 8, vocab 16, same batch/steps): {floor:.3f} ms a step, "
        f"{floor * args.new_tokens:.1f} ms a call")
  print(f"# load average at end: {_common.load_average()}")


if __name__ == "__main__":
  main()
