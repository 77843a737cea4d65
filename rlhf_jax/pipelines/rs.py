"""The `rs` stage: rejection-sampling fine-tuning (ALGORITHMS §7; Llama 2 RS-FT, RAFT, threshold RS).

Each of `rs.rounds` rounds, starting from the SFT policy:
  sample    N = rs.samples_per_prompt completions for a fresh slice of `rs.prompts_per_round` train prompts
            from the current policy (the rollout path, sampling.temperature)
  score     by the reward (`rs.reward_source`: the RM on the sampled tokens, or the task's grade); the task's
            grade is always computed as the true score
  select    "best_of_n": each prompt's best sample (first on ties; `selection.best_of_n_mask`), kept only if
            its reward > rs.threshold when one is set; "threshold": every sample with reward > rs.threshold
            (`selection.threshold_mask`), duplicates of a prompt collapsed
  SFT       `rs.sft_steps` steps of `steps.make_sft_step` on the selected (prompt, response) pairs
            (`tokenizer.encode_pairs`), batches drawn by a seeded permutation of the pairs
The held-out T-sample success, pass@k and greedy success are measured before round 1
and after every round. The whole train state (params and optimizer) is checkpointed
after every round; rerunning the same command resumes at the next round, bitwise.

Writes `<workdir>/rs/`: `ckpt/`, `final/`, `round_<r>.jsonl` (the selected pairs),
`metrics.jsonl` (one row per round), `rs.png`, `summary.json`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models, rollout
from rlhf_jax import sharding as shd
from rlhf_jax.checkpointing import Checkpointer, abstract_like
from rlhf_jax.pipelines import bon as bon_stage, common, rm as rm_stage
from rlhf_jax.selection import best_of_n_mask, threshold_mask
from rlhf_jax.steps import make_sft_step
from rlhf_jax.tasks.base import success
from rlhf_jax.tokenizer import encode_pairs
from rlhf_jax.utils import MetricsWriter, Progress, plot_metrics, read_metrics


def final_params_dir(workdir: str) -> str:
  return os.path.join(workdir, "rs", "final")


def select(rewards_PxN: np.ndarray, *, selection: str, threshold=None) -> np.ndarray:
  """[P, N] 0/1 mask of the kept samples (module docstring)."""
  r = jnp.asarray(rewards_PxN, jnp.float32)
  if selection == "best_of_n":
    mask = best_of_n_mask(r)
    if threshold is not None:
      mask = mask * threshold_mask(r, threshold=threshold)
  elif selection == "threshold":
    if threshold is None:
      raise ValueError("selection 'threshold' needs a `threshold`")
    mask = threshold_mask(r, threshold=threshold)
  else:
    raise ValueError(f"`selection` must be 'best_of_n' or 'threshold', got {selection!r}")
  return np.asarray(mask)


def run_rs(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, "rs")
  common.check_provenance(out_dir, config, "rs")
  # finished = final parameters *and* summary: a run stopped between the two redoes its end from the checkpoint
  if common.has_params(final_params_dir(workdir)) and os.path.exists(os.path.join(out_dir, "summary.json")):
    print(f"[rs] reusing the finished stage in {final_params_dir(workdir)}")
    with open(os.path.join(out_dir, "summary.json")) as f:
      return {"reused": True, **json.load(f)}
  rc = config.rs
  n, p_count = rc.samples_per_prompt, rc.prompts_per_round
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len
  temperature = config.sampling.temperature

  # --- mesh, models, data --------------------------------------------------------------
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  task = common.make_task(config, workdir)
  cfg, sft_params = rm_stage.load_sft_policy(config, workdir, mesh)
  score_fn = bon_stage.make_scorer(rc.reward_source, config, workdir, mesh, task, cfg)
  train = rollout.load_fitted(task, tok, "train", max_prompt_len=plen, stage="rs")
  held_out = rollout.load_fitted(task, tok, task.eval_split, max_prompt_len=plen, stage="rs")[:rc.eval_prompts]
  order = np.random.default_rng(config.seed + 5).permutation(len(train))

  # --- state, step -------------------------------------------------------------------------
  tx = common.optimizer(rc, optimizer_section=rc.optimizer, total_steps=rc.rounds * rc.sft_steps)
  rng = jax.random.PRNGKey(config.seed + 6)
  copy = lambda r, tree: jax.tree.map(jnp.copy, tree)
  state, state_sh = common.create_state(copy, models.logical_axes(cfg), tx, mesh, rng, sft_params)
  bsh = shd.batch_sharding(mesh, 2)
  rep = shd.replicated(mesh)
  train_step = jax.jit(make_sft_step(models.make_apply_fn(cfg), tx, microbatch=common.microbatch(config)),
                       in_shardings=(state_sh, {"tokens": bsh, "mask": bsh, "loss_mask": bsh}),
                       out_shardings=(state_sh, rep), donate_argnums=0)
  ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), max_to_keep=config.checkpoint.max_to_keep,
                      save_interval_steps=1, async_save=config.checkpoint.async_save)
  start = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(state, sharding=state_sh))
    start = int(meta["round"])
    print(f"[rs] resumed after round {start}")
  metrics_path = os.path.join(out_dir, "metrics.jsonl")
  common.drop_rows_after(metrics_path, start)

  sampler = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=temperature, num_samples=n, mesh=mesh)
  eval_sampler = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=temperature,
                                      num_samples=rc.eval_samples, mesh=mesh)
  greedy = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=0.0, mesh=mesh)

  def evaluate(params) -> dict[str, float]:
    if not held_out:
      return {}
    return rollout.evaluate_policy(task, eval_sampler, greedy, params, tok, held_out, batch_size=rc.rollout_batch,
                                   max_prompt_len=plen, rng=jax.random.PRNGKey(config.seed + 11), mesh=mesh,
                                   ks=sorted({1, rc.eval_samples}))

  # --- rounds ------------------------------------------------------------------------------
  writer = MetricsWriter(out_dir, tensorboard=config.logging.tensorboard)
  t0 = time.time()
  initial, last_eval = {}, {}
  if start == 0:
    initial = evaluate(state.params)
    writer.write(0, initial)
  else:
    initial = common.first_eval_row(metrics_path)
  print(f"[rs] {task.name}: {rc.rounds} rounds of {p_count} prompts × {n} samples, {rc.selection} by "
        f"{rc.reward_source}, {rc.sft_steps} SFT steps each; held-out success "
        f"{initial.get('eval/success_rate', float('nan')):.3f}, greedy {initial.get('eval/greedy_success', float('nan')):.3f}")
  progress = Progress(rc.rounds, desc=f"rs[{rc.selection}]", initial=start, quiet=not config.logging.progress)
  for r in range(start + 1, rc.rounds + 1):
    records = [train[int(order[((r - 1) * p_count + j) % len(order)])] for j in range(p_count)]
    key = common.fold(rng, r)
    texts, rewards_PxN = bon_stage.sample_scored(sampler, state.params, tok, records, score_fn, max_prompt_len=plen,
                                                 rng=jax.random.fold_in(key, 0), batch_size=rc.rollout_batch,
                                                 mesh=mesh)
    truth_PxN = rollout.grade(task, records, texts, n=n).reshape(p_count, n)
    keep_PxN = select(rewards_PxN, selection=rc.selection, threshold=rc.threshold)
    pairs, seen = [], set()
    for i, rec in enumerate(records):
      for j in np.flatnonzero(keep_PxN[i]):
        text = texts[i * n + int(j)]
        if (i, text) not in seen:
          seen.add((i, text))
          pairs.append({"prompt": rec["prompt"], "response": text, "reward": float(rewards_PxN[i, j]),
                        "grade": float(truth_PxN[i, j])})
    with open(os.path.join(out_dir, f"round_{r}.jsonl"), "w") as f:
      for pr in pairs:
        f.write(json.dumps(pr) + "\n")
    kept_truth = np.asarray([pr["grade"] for pr in pairs], np.float32)
    metrics = {"rs/reward": float(rewards_PxN.mean()), "rs/reward_best": float(rewards_PxN.max(1).mean()),
               "rs/kept": float(len(pairs)), "rs/kept_prompts": float(keep_PxN.any(1).mean()),
               "true/score": float(truth_PxN.mean()), "true/success_rate": float(success(truth_PxN).mean()),
               "true/kept_score": float(kept_truth.mean()) if pairs else float("nan"),
               "true/kept_success": float(success(kept_truth).mean()) if pairs else float("nan")}
    if pairs:  # SFT on the selected pairs; with nothing selected the round changes nothing
      enc = encode_pairs(tok, [pr["prompt"] for pr in pairs], [pr["response"] for pr in pairs], plen, rlen)
      prng = np.random.default_rng([config.seed, r])
      perm = np.concatenate([prng.permutation(len(pairs)) for _ in range(
          -(-rc.sft_steps * rc.sft_batch_size // len(pairs)))])
      losses_ = []
      for s in range(rc.sft_steps):
        rows = perm[s * rc.sft_batch_size:(s + 1) * rc.sft_batch_size]
        state, m = train_step(state, shd.shard_batch({k: v[rows] for k, v in enc.items()}, mesh))
        losses_.append(m["train/loss"])
      host = [float(x) for x in jax.device_get(losses_)]
      metrics.update({"sft/loss_first": host[0], "sft/loss_last": host[-1], "sft/loss": float(np.mean(host))})
    last_eval = evaluate(state.params)
    metrics.update(last_eval)
    writer.write(r, metrics)
    ckpt.save(r, state, meta={"round": r}, force=True)
    progress.update(r, reward=metrics["rs/reward"], kept=len(pairs),
                    **({"heldout": last_eval["eval/success_rate"]} if "eval/success_rate" in last_eval else {}))
  progress.close()
  ckpt.wait()
  ckpt.close()
  writer.close()

  common.save_params(final_params_dir(workdir), state.params, {"step": rc.rounds, "stage": "rs"})
  plot_metrics(metrics_path, {"reward of the round's samples": ["rs/reward", "rs/reward_best"],
                              "grade of samples (all, kept)": ["true/score", "true/kept_score"],
                              "held-out success (T samples)": ["eval/success_rate", "eval/score"],
                              "held-out greedy success": ["eval/greedy_success"],
                              "SFT loss (nats/token)": ["sft/loss_first", "sft/loss_last"],
                              "selected pairs": ["rs/kept"]},
               os.path.join(out_dir, "rs.png"), title=f"rejection sampling on {task.name} ({rc.selection})")
  if not last_eval:
    rows = [row for row in read_metrics(metrics_path) if "eval/success_rate" in row]
    last_eval = rows[-1] if rows else initial
  summary = {"stage": "rs", "task": task.name, "selection": rc.selection, "reward_source": rc.reward_source,
             "rounds": rc.rounds, "heldout_prompts": len(held_out), "wall_s": time.time() - t0,
             "initial_success_rate": initial.get("eval/success_rate"),
             "final_success_rate": last_eval.get("eval/success_rate"),
             "initial_greedy": initial.get("eval/greedy_success"), "final_greedy": last_eval.get("eval/greedy_success"),
             "initial_score": initial.get("eval/score"), "final_score": last_eval.get("eval/score")}
  common.write_json(os.path.join(out_dir, "summary.json"), summary)
  fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
  print(f"[rs] done in {summary['wall_s']:.0f} s: held-out success {fmt(summary['initial_success_rate'])} -> "
        f"{fmt(summary['final_success_rate'])}, greedy {fmt(summary['initial_greedy'])} -> "
        f"{fmt(summary['final_greedy'])}")
  return summary
