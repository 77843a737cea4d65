"""One PPO iteration of rlhf_jax against google-tunix 0.1.7's PPOLearner (issue 5, part 6).

An iteration = rollout (sample `--new-tokens` tokens for every prompt) + score
(reference log-probs, critic values, reward-model score) + update (`--epochs`
× `--minibatches` clipped policy and value steps), on the same model shape
(our `tiny` preset, f32, random weights), the same prompt tokens, prompt
length and generation length on both sides. Our side runs in this process;
tunix runs in its own venv (it pins its own jax/flax) through
`_tunix_ppo_worker.py`, one after the other, never at the same time. Warm-up
iterations (compilation) are excluded; the median of the timed iterations is
reported, with the process CPU time of an iteration (all threads; less
sensitive than wall-clock to other load on a shared machine).

    # once: the tunix venv (~1.5 GB)
    python3 -m venv .venv-tunix && .venv-tunix/bin/pip install google-tunix==0.1.7
    # the comparison (~5 min on 2 cores)
    .venv/bin/python experiments/benchmarks/ppo_vs_tunix.py
    .venv/bin/python experiments/benchmarks/ppo_vs_tunix.py --no-tunix   # ours only
    .venv/bin/python experiments/benchmarks/ppo_vs_tunix.py --scan-unroll 1 --microbatch 0   # before issue 15
    # paired rounds (ours, then tunix, 5 times; ~10 min): medians and the same-round speed-ups
    .venv/bin/python experiments/benchmarks/ppo_vs_tunix.py --grpo --rounds 5

Ours runs with the run configs' compute defaults (`model.scan_unroll` and `model.microbatch` = -1, auto: on CPU
the layer scan unrolled and forwards/backwards ~1k tokens at a time); the flags set them. After the tables, a
roofline of each phase: FLOPs by formula (`roofline.phase_costs`), the bound at the matmul peak and bandwidth
measured in the same run, and what 2× tunix would take as a fraction of the iteration's bound.

Layout: tunix's PPO has no samples-per-prompt (`_num_generations() == 1`), so
the comparison runs 64 prompts × 1 sample on both sides; an extra row shows
ours at 16 prompts × 4 samples (the same 64 rollouts; our sampler prefills
each prompt once and decodes 4 samples).

What is the same: model shape and dtype; 64 rollouts × 64 new tokens from
64-token prompts (no padding, EOS disabled: every completion is full length);
temperature 1, no top-k/top-p; reference, critic and reward model are full
4-layer models; KL penalty in the reward (β = 0.04, k3 estimator), GAE(γ=1,
λ=0.95), whitened advantages, clip 0.2, value clip 0.2, 1 epoch of 4
minibatches of 16 rows, each a policy step and a value step; Adam(0.9, 0.95)
with global-norm clipping 1.0 for actor and critic.

What differs (each side does it its own way):
  * tunix rolls out per minibatch: with mini_batch_size=16 its global step
    generates and scores 16 prompts, updates, then the next 16 (4 rollouts of
    16 rows per iteration); ours generates and scores all 64 in one batch,
    then runs the 4 minibatch updates.
  * tunix recomputes the old policy log-probs with an extra actor forward after
    sampling; ours keeps the sampler's log-probs (one forward fewer).
  * tunix's prompts go through its string interface (an id-list tokenizer);
    ours are token arrays. tunix's lm head is untied (its critic builder
    replaces `lm_head`); ours is tied (same FLOPs).
  * ours computes the per-token entropy in the policy loss (coefficient 0);
    tunix skips it when its entropy coefficient is None.
  * tunix 0.1.7 builds its token rewards as `zeros_like(completion_ids)`
    (int32), so the RM score is truncated to an integer before the KL term is
    subtracted (a FutureWarning in its log); no effect on the cost.
  * phase timings: tunix's update wrappers wait for the new parameters (so the
    split is clean); its `score` also holds the GAE/whitening and its metric
    host transfers, ours the three forwards only (GAE is inside our update).

Numbers measured on the 2-core machine are in the report of the session that
wrote this file; they swing with the load of the shared machine (the load
averages are printed with every table).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from experiments.benchmarks import _common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "experiments", "benchmarks", "_tunix_ppo_worker.py")
DEFAULT_TUNIX_PYTHON = os.path.join(ROOT, ".venv-tunix", "bin", "python")


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--prompts", type=int, default=64, help="prompts per iteration (1 sample each)")
  ap.add_argument("--grouped", default="16x4",
                  help="extra row of ours: PROMPTSxSAMPLES with the same rollout count ('' = off)")
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--epochs", type=int, default=1)
  ap.add_argument("--minibatches", type=int, default=4)
  ap.add_argument("--warmup", type=int, default=2, help="untimed iterations (compilation)")
  ap.add_argument("--iters", type=int, default=5, help="timed iterations")
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--microbatch", type=int, default=-1,
                  help="rows per forward/backward chunk in scoring and the update, as config.model.microbatch: "
                       "-1 = auto (the run configs' default), 0 = whole batch / minibatch")
  ap.add_argument("--scan-unroll", type=int, default=-1,
                  help="layers per scan iteration, as config.model.scan_unroll: -1 = auto (the run configs' default)")
  ap.add_argument("--no-roofline", action="store_true", help="skip the per-phase roofline table")
  ap.add_argument("--draw", default="gumbel", help="our Sampler's draw: gumbel (default) or inverse_cdf")
  ap.add_argument("--host-threads", type=int, default=0,
                  help="our Sampler's host_threads (0 = auto: the prompts split over the usable cores; 1 = one call)")
  ap.add_argument("--kernel-layout", default="", choices=("", "in_out", "out_in"),
                  help="the Sampler decode's kernel_layout ('' = auto: out_in on an AVX2-only CPU, in_out elsewhere)")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--tunix-python", default=DEFAULT_TUNIX_PYTHON, help="python of the tunix venv")
  ap.add_argument("--tunix-timeout", type=int, default=1800, help="seconds")
  ap.add_argument("--no-tunix", action="store_true", help="time ours only")
  ap.add_argument("--grpo", action="store_true",
                  help="also time our critic-free GRPO iteration at --grouped (no critic: not tunix's algorithm)")
  ap.add_argument("--rounds", type=int, default=1,
                  help="repeat the whole measurement (ours, then tunix) this many times; the table gives each "
                       "field's median over rounds and the paired (same-round) speed-ups are listed: this VM's "
                       "speed drifts by ±15%% over minutes")
  ap.add_argument("--json", default="", help="also write both results to this file")
  return ap.parse_args()


def make_prompts(args, vocab: int):
  import numpy as np
  rng = np.random.default_rng(args.seed)
  # [iteration, prompt, position]; any id is a valid prompt token on both sides.
  return rng.integers(0, vocab, size=(args.warmup + args.iters, args.prompts, args.prompt_len)).astype(np.int32)


def bench_ours(args, prompts, *, num_prompts: int, num_samples: int, advantage: str = "gae"):
  """Median seconds of one rlhf_jax PPO iteration and of its phases.

  `advantage="grpo"`: the critic-free iteration (group advantages over the N samples of a prompt, KL as a k3
  loss term): no critic state, no value forward in scoring, no value steps in the update.
  """
  import jax
  import jax.numpy as jnp
  from rlhf_jax import losses, models
  from rlhf_jax.sampling import Sampler, SamplingParams
  from rlhf_jax.state import create_train_state, make_optimizer
  from rlhf_jax.steps import PPOState, make_ppo_score_fn, make_ppo_step, select_rows

  cfg = models.get_model_config(args.preset, dtype="float32", param_dtype="float32")
  cfg = dataclasses.replace(cfg, scan_unroll=models.resolve_scan_unroll(args.scan_unroll, cfg.n_layers))
  microbatch = "auto" if args.microbatch == -1 else (args.microbatch or None)
  rows = num_prompts * num_samples
  if rows % args.minibatches:
    raise ValueError(f"--minibatches={args.minibatches} must divide the {rows} rollouts of an iteration")
  keys = jax.random.split(jax.random.PRNGKey(args.seed), 5)
  actor_params = models.init_params(cfg, keys[0])
  ref_params = jax.tree.map(jnp.copy, actor_params)                    # reference = initial policy
  # critic = policy backbone + value head; its own buffers (the update donates both states)
  critic_params = jax.tree.map(jnp.copy, models.lm_to_scalar_params(actor_params, cfg, keys[1]))
  rm_params = models.init_params(cfg, keys[2], head="scalar")           # reward model: its own random weights

  def tx():
    return make_optimizer(learning_rate=1e-6, schedule="constant", total_steps=1, b1=0.9, b2=0.95,
                          weight_decay=0.0, grad_clip=1.0)

  actor_tx, critic_tx = tx(), tx()
  gae = advantage == "gae"
  state = PPOState(actor=create_train_state(actor_params, actor_tx, keys[3]),
                   critic=create_train_state(critic_params, critic_tx, keys[4]) if gae else None,
                   kl=losses.init_kl_controller(0.04))
  lm_apply, scalar_apply = models.make_apply_fn(cfg), models.make_apply_fn(cfg, head="scalar")
  # eos_id outside the vocabulary: every row generates all new tokens, as on the tunix side.
  sampler = Sampler(cfg, SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, num_samples=num_samples),
                    eos_id=-1, pad_id=0, draw=args.draw, host_threads=args.host_threads or None,
                    kernel_layout=args.kernel_layout or None)
  score = jax.jit(make_ppo_score_fn(lm_apply, prompt_len=args.prompt_len, critic_apply=scalar_apply if gae else None,
                                    reward_apply=scalar_apply, microbatch=microbatch))

  def select_fn(batch):
    if not gae:
      batch = dict(batch, advantages=losses.group_advantages(batch["scores"].reshape(num_prompts, num_samples),
                                                             kind=advantage).reshape(-1))
    return select_rows(batch, jnp.ones((num_prompts, num_samples), jnp.float32), keep=None)

  select = jax.jit(select_fn)
  update = jax.jit(make_ppo_step(lm_apply, actor_tx, critic_apply=scalar_apply if gae else None,
                                 critic_tx=critic_tx if gae else None, advantage=advantage,
                                 prompt_len=args.prompt_len,
                                 clip_eps=0.2, value_clip_eps=0.2, gamma=1.0, lam=0.95, kl_estimator="k3",
                                 epochs=args.epochs, minibatches=args.minibatches, entropy_coef=0.0,
                                 microbatch=microbatch),
                   donate_argnums=0)

  def iteration(state, it):
    pt = jnp.asarray(prompts[it, :num_prompts])
    pm = jnp.ones_like(pt)
    key = jax.random.fold_in(jax.random.PRNGKey(args.seed + 1), it)
    c0, t0 = time.process_time(), time.perf_counter()
    out = sampler(state.actor.params, pt, pm, key)
    jax.block_until_ready(out.tokens)
    t1 = time.perf_counter()
    sc = score(ref_params, state.critic.params if gae else None, rm_params, out.tokens, out.mask)
    jax.block_until_ready(sc)
    t2 = time.perf_counter()
    batch = {"tokens": out.tokens, "mask": out.mask, "completion_mask": out.completion_mask,
             "old_logprobs": out.completion_logprobs, "ref_logprobs": sc["ref_logprobs"], "scores": sc["rm_scores"]}
    if gae:
      batch["old_values"] = sc["old_values"]
    batch = select(batch)
    state, metrics = update(state, batch)
    metrics = jax.device_get(metrics)  # the pipeline logs them every iteration
    t3, c3 = time.perf_counter(), time.process_time()
    assert int(out.lengths.min()) == args.new_tokens, "EOS must be disabled"
    return state, {"iteration": t3 - t0, "rollout": t1 - t0, "score": t2 - t1, "update": t3 - t2, "cpu": c3 - c0}

  times = []
  for it in range(args.warmup + args.iters):
    state, t = iteration(state, it)
    times.append(t)
  assert sampler.trace_counts == {"prefill": 1, "decode": 1}, sampler.trace_counts
  timed = times[args.warmup:]
  med = {k: statistics.median(t[k] for t in timed) for k in timed[0]}
  return {"side": "rlhf_jax" if gae else f"rlhf_jax {advantage} (no critic)", "prompts": num_prompts,
          "samples_per_prompt": num_samples,
          "iteration_s": med["iteration"], "rollout_s": med["rollout"], "score_s": med["score"],
          "update_s": med["update"], "cpu_s": med["cpu"], "first_iteration_s": times[0]["iteration"],
          "iteration_s_all": [t["iteration"] for t in times], "jax_version": jax.__version__,
          "scan_unroll": cfg.scan_unroll, "microbatch": str(microbatch),
          "sampler_host_threads": sampler.threads_for(num_prompts), "kernel_layout": sampler.kernel_layout,
          "costs": iteration_costs(cfg, args, num_prompts=num_prompts, num_samples=num_samples, critic=gae,
                                   segment_lengths=sampler.segment_lengths(args.prompt_len))}


def iteration_costs(cfg, args, *, num_prompts: int, num_samples: int, critic: bool, segment_lengths=None,
                    old_logprob_forward: bool = False, head_on_all_slots: bool = False) -> dict:
  """FLOPs and bytes of each phase of one iteration, by `roofline.phase_costs`'s formulas.

  rollout = prefill + decode; score = reference (LM head) + RM (+ critic) forwards (+ the old-policy forward
  tunix adds); update = epochs × (policy + critic) forward + backward (3× a forward) + AdamW bytes. A scalar
  head's forward is the LM forward minus the 2·D·V head FLOPs (and logit bytes) per headed slot: the
  G completion slots on our side, all S slots with `head_on_all_slots` (tunix slices the logits after).
  """
  from experiments.benchmarks import roofline
  c = roofline.phase_costs(cfg, batch=num_prompts, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                           num_samples=num_samples, segment_lengths=segment_lengths,
                           head_on_all_slots=head_on_all_slots)
  headed = args.prompt_len + args.new_tokens if head_on_all_slots else args.new_tokens
  rows_tokens = num_prompts * num_samples * headed
  lm = c["scoring forward"]
  scalar = (lm.flops - rows_tokens * 2 * cfg.dim * cfg.vocab_size, lm.bytes - rows_tokens * 2 * cfg.vocab_size * 4)
  n_scalar = 2 if critic else 1
  n_lm = 2 if old_logprob_forward else 1
  adam = 32 * cfg.num_params() * (2 if critic else 1)
  return {
      "rollout prefill": (c["rollout prefill"].flops, c["rollout prefill"].bytes),
      "rollout decode": (c["rollout decode"].flops, c["rollout decode"].bytes),
      "score": (n_lm * lm.flops + n_scalar * scalar[0], n_lm * lm.bytes + n_scalar * scalar[1]),
      "update": (args.epochs * 3 * (lm.flops + (scalar[0] if critic else 0)),
                 args.epochs * (3 * (lm.bytes + (scalar[1] if critic else 0)) + adam)),
  }


def roofline_table(args, results, cfg) -> str:
  """Per phase: GFLOP by formula, measured ms, and two bounds measured now with % of each.

  "peak": max(FLOPs / 2048² matmul peak, bytes / DRAM copy bandwidth) (the decode at its own shape and working
  set, as roofline.py). "shape": the same with the matmul rate XLA reaches at the model's own projection shape,
  [2048 tokens, D] @ [D, F] (a minibatch of 16 × 128; tiny's D = 128 matmuls cannot reach the 2048² peak).
  """
  from experiments.benchmarks import roofline
  bounds = roofline.measure_bounds(repeats=3)
  peak, bw = bounds["matmul f32"], bounds["DRAM copy bandwidth"]
  shape_peak = roofline.decode_matmul_peak(cfg, 2048)
  lines = [f"matmul f32 2048² peak {peak / 1e9:,.1f} GFLOP/s, at the model's shape [2048, {cfg.dim}] @ "
           f"[{cfg.dim}, {cfg.mlp_dim}] {shape_peak / 1e9:,.1f} GFLOP/s, DRAM copy {bw / 1e9:,.1f} GB/s (measured now)"]
  header = ["side", "prompts×samples", "phase", "GFLOP", "ms", "achieved GFLOP/s", "bound ms (peak)", "% of it",
            "bound ms (shape)", "% of it"]
  rows = []
  for r in results:
    costs = r.get("costs")
    if costs is None:
      continue
    rows_n = r["prompts"] * r["samples_per_prompt"]
    dec_peak, dec_bw = roofline.decode_bounds(cfg, rows_n, args.prompt_len, args.new_tokens, bounds)
    dec = max(costs["rollout decode"][0] / dec_peak, costs["rollout decode"][1] / dec_bw)
    bound, flops, measured = {}, {}, {}
    for name, pk in (("peak", peak), ("shape", shape_peak)):
      b = {"rollout": max(costs["rollout prefill"][0] / pk, costs["rollout prefill"][1] / bw) + dec,
           "score": max(costs["score"][0] / pk, costs["score"][1] / bw),
           "update": max(costs["update"][0] / pk, costs["update"][1] / bw)}
      b["iteration"] = sum(b.values())
      bound[name] = b
    flops = {"rollout": costs["rollout prefill"][0] + costs["rollout decode"][0], "score": costs["score"][0],
             "update": costs["update"][0]}
    flops["iteration"] = sum(flops.values())
    measured = {"rollout": r["rollout_s"], "score": r["score_s"], "update": r["update_s"],
                "iteration": r["iteration_s"]}
    r["bound_s"] = {k: v["iteration"] for k, v in bound.items()}
    for ph in ("rollout", "score", "update", "iteration"):
      rows.append([r["side"], f"{r['prompts']}×{r['samples_per_prompt']}", ph, f"{flops[ph] / 1e9:,.1f}",
                   f"{measured[ph] * 1e3:,.1f}", f"{flops[ph] / measured[ph] / 1e9:,.1f}",
                   f"{bound['peak'][ph] * 1e3:,.1f}", f"{bound['peak'][ph] / measured[ph]:.0%}",
                   f"{bound['shape'][ph] * 1e3:,.1f}", f"{bound['shape'][ph] / measured[ph]:.0%}"])
  lines.append(_common.markdown_table(header, rows))
  return "\n".join(lines)


def bench_tunix(args, prompts_path: str):
  cmd = [args.tunix_python, WORKER, "--prompts-file", prompts_path, "--new-tokens", str(args.new_tokens),
         "--mini-batch", str(args.prompts // args.minibatches), "--epochs", str(args.epochs),
         "--warmup", str(args.warmup), "--iters", str(args.iters), "--threads", str(args.threads)]
  from rlhf_jax import models
  cfg = models.get_model_config(args.preset)
  cmd += ["--vocab", str(cfg.vocab_size), "--dim", str(cfg.dim), "--layers", str(cfg.n_layers),
          "--heads", str(cfg.n_heads), "--kv-heads", str(cfg.n_kv_heads), "--mlp", str(cfg.mlp_dim),
          "--rope-theta", str(cfg.rope_theta), "--norm-eps", str(cfg.norm_eps)]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  print("[ppo_vs_tunix] running the tunix worker: " + " ".join(cmd), file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.tunix_timeout)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT_JSON ")]
  if proc.returncode != 0 or not lines:
    sys.stderr.write(proc.stderr[-6000:])
    raise RuntimeError(f"tunix worker failed (exit {proc.returncode})")
  return json.loads(lines[-1][len("RESULT_JSON "):])


def _microbatch_rows(args, r) -> int:
  from rlhf_jax.steps.common import microbatch_rows
  mb = r["microbatch"]
  mb = None if mb == "None" else (mb if mb == "auto" else int(mb))
  return microbatch_rows(r["prompts"] * r["samples_per_prompt"] // args.minibatches,
                         args.prompt_len + args.new_tokens, mb)  # the [rows, P + G] token buffer sizes "auto"


def _median_over_rounds(runs: list) -> dict:
  """One row's result with every timing field the median over rounds (the per-round values kept)."""
  if len(runs) == 1:
    return runs[0]
  out = dict(runs[0])
  for key in ("iteration_s", "rollout_s", "score_s", "update_s", "cpu_s", "prepare_s"):
    if key in out:
      out[key] = statistics.median(r[key] for r in runs)
  out["rounds"] = [{k: r[k] for k in ("iteration_s", "rollout_s", "score_s", "update_s", "cpu_s") if k in r}
                   for r in runs]
  return out


def row(r, *, new_tokens: int, tunix_s, tunix_cpu_s):
  rollouts = r["prompts"] * r["samples_per_prompt"]
  ms = lambda s: 1000.0 * s  # noqa: E731
  return [r["side"], f"{r['prompts']}×{r['samples_per_prompt']}", ms(r["iteration_s"]), ms(r["rollout_s"]),
          ms(r["score_s"]), ms(r["update_s"]), ms(r["cpu_s"]), rollouts / r["iteration_s"],
          rollouts * new_tokens / r["rollout_s"],
          f"{tunix_s / r['iteration_s']:.2f}×" if tunix_s else "n/a",
          f"{tunix_cpu_s / r['cpu_s']:.2f}×" if tunix_cpu_s else "n/a"]


def main():
  args = parse_args()
  _common.set_threads(args.threads)
  if not args.no_tunix and not os.path.exists(args.tunix_python):
    sys.exit(f"tunix venv not found at {args.tunix_python}. Create it with\n"
             f"  python3 -m venv {os.path.join(ROOT, '.venv-tunix')} && "
             f"{os.path.join(ROOT, '.venv-tunix', 'bin', 'pip')} install google-tunix==0.1.7\n"
             "or pass --tunix-python PATH, or --no-tunix to time ours only.")
  if args.prompts % args.minibatches:
    sys.exit(f"--minibatches={args.minibatches} must divide --prompts={args.prompts}")
  import numpy as np
  from rlhf_jax import models
  prompts = make_prompts(args, models.get_model_config(args.preset).vocab_size)
  load_before = _common.load_average()

  if args.grouped:
    p, n = (int(x) for x in args.grouped.lower().split("x"))
    if p * n != args.prompts:
      sys.exit(f"--grouped={args.grouped} must give {args.prompts} rollouts")
  if args.rounds < 1:
    sys.exit(f"--rounds={args.rounds} must be >= 1")
  rounds = []
  for i in range(args.rounds):
    if args.rounds > 1:
      print(f"[ppo_vs_tunix] round {i + 1} of {args.rounds}", file=sys.stderr, flush=True)
    res = [bench_ours(args, prompts, num_prompts=args.prompts, num_samples=1)]
    if args.grouped:
      res.append(bench_ours(args, prompts, num_prompts=p, num_samples=n))
      if args.grpo:  # the critic-free iteration on the same rollouts: a different algorithm from tunix's PPO row
        res.append(bench_ours(args, prompts, num_prompts=p, num_samples=n, advantage="grpo"))
    if i == 0:  # KiB on Linux; before the roofline's buffers and later rounds' copies
      ours_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if not args.no_tunix:
      with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prompts.npy")
        np.save(path, prompts)
        res.append(bench_tunix(args, path))
    rounds.append(res)
  results = [_median_over_rounds([rd[j] for rd in rounds]) for j in range(len(rounds[0]))]
  tunix = results[-1] if not args.no_tunix else None
  load_after = _common.load_average()

  tunix_s = tunix["iteration_s"] if tunix else None
  tunix_cpu_s = tunix["cpu_s"] if tunix else None
  header = ["side", "prompts×samples", "iteration ms", "rollout ms", "score ms", "update ms", "CPU ms/iter",
            "rollouts/s", "rollout tokens/s", "speed-up (wall)", "speed-up (CPU)"]
  print(f"\nPPO iteration, preset {args.preset} f32: {args.prompts} rollouts × {args.new_tokens} new tokens, "
        f"prompt length {args.prompt_len}, {args.epochs} epoch × {args.minibatches} minibatches; "
        f"median of {args.iters} after {args.warmup} warm-up; {args.threads} threads; "
        f"load avg before {load_before}, after {load_after}")
  from experiments.benchmarks import roofline
  print(f"cpu flags: {roofline.cpu_flags()}; ours with scan_unroll {results[0]['scan_unroll']}, "
        f"microbatch {results[0]['microbatch']} (resolved: {_microbatch_rows(args, results[0])} rows a chunk), "
        f"draw {args.draw}, sampler host threads {[r.get('sampler_host_threads') for r in results[:-1 if tunix else None]]}, "
        f"decode kernel layout {results[0].get('kernel_layout')}\n")
  print(_common.markdown_table(header, [row(r, new_tokens=args.new_tokens, tunix_s=tunix_s, tunix_cpu_s=tunix_cpu_s)
                                                for r in results]))
  if args.rounds > 1:
    print(f"\n(each field: the median over {args.rounds} rounds of the per-round medians; speed-ups are of those)")
    if tunix:
      for j, r in enumerate(results[:-1]):
        paired = [rd[-1]["iteration_s"] / rd[j]["iteration_s"] for rd in rounds]
        r["paired_speedups"] = paired
        print(f"paired speed-up, {r['side']} {r['prompts']}×{r['samples_per_prompt']} (tunix / ours in the same "
              f"round): {', '.join(f'{x:.2f}×' for x in paired)}; median {statistics.median(paired):.2f}×")
  if not args.no_roofline:
    from rlhf_jax import models
    cfg = models.get_model_config(args.preset, dtype="float32", param_dtype="float32")
    if tunix:  # same shapes; its rollout per minibatch costs the same FLOPs; one more actor forward in `score`
      tunix["costs"] = iteration_costs(cfg, args, num_prompts=args.prompts, num_samples=1, critic=True,
                                       old_logprob_forward=True, head_on_all_slots=True)
    print(f"\nRoofline of the iteration (FLOPs by formula, experiments/benchmarks/roofline.py):\n")
    print(roofline_table(args, results, cfg))
    if tunix:
      ours, target = results[0], tunix["iteration_s"] / 2
      print(f"\n2× tunix = {target * 1e3:,.0f} ms an iteration. Our 64×1 iteration's bound is "
            f"{ours['bound_s']['peak'] * 1e3:,.0f} ms at the 2048² peak and {ours['bound_s']['shape'] * 1e3:,.0f} ms "
            f"at the model-shape matmul rate: 2× takes {ours['bound_s']['peak'] / target:.0%} / "
            f"{ours['bound_s']['shape'] / target:.0%} of them over the whole iteration; we run at "
            f"{ours['bound_s']['peak'] / ours['iteration_s']:.0%} / "
            f"{ours['bound_s']['shape'] / ours['iteration_s']:.0%} (tunix {tunix['bound_s']['peak'] / tunix['iteration_s']:.0%} / "
            f"{tunix['bound_s']['shape'] / tunix['iteration_s']:.0%}).")
  print(f"\nPeak memory (process max RSS, the CPU 'device' memory): ours {ours_rss:.2f} GiB (all our rows of the "
        f"first round in one process, the largest counts)" + (f", tunix {tunix['max_rss_gib']:.2f} GiB" if tunix and
                                           "max_rss_gib" in tunix else "") + ".")
  if tunix:
    print(f"\ntunix score = old-logprob, reference, critic and RM forwards + GAE (its `prepare` minus rollout); "
          f"tunix rolls out 4 × {tunix['mini_batch']} rows per iteration (per minibatch). "
          f"First (compiling) iteration: ours {results[0]['first_iteration_s']:.1f} s, "
          f"tunix {tunix['first_iteration_s']:.1f} s.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"load_before": load_before, "load_after": load_after, "results": results}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
