"""Online / iterative DPO stage (ALGORITHMS §8.3, AutoIF §9.2): sample, grade, pair, DPO, repeat.

Each round r = 1..`online_dpo.rounds`, for `prompts_per_round` train prompts of the task:
  sample   K = `samples_per_prompt` responses per prompt from the CURRENT policy at
           `online_dpo.temperature` (AutoIF: 0.8) through the shared rollout path
  grade    reward_source "task": the task's grader (for AutoIF records: the pass rate of the
           instruction's cross-validated verification functions, in the sandbox) is the accuracy;
           "rm": the learned reward model's score, min–max scaled per prompt to [0, 1]
  pair     the AutoIF rule (`autoif.pair_indices` → `selection.autoif_pair_indices`):
           positives accuracy ≥ `pos_threshold` (the official code; `pos_strict=True` gives the
           paper's >), negatives accuracy == 0; up to `max_pos` × `max_neg` (2 × 2) pairs a prompt
  update   `steps_per_round` DPO steps of `batch_size` pairs (`make_dpo_step`), reference fixed
           to the SFT policy (`reference_dir`) unless `reference_update="previous"` (π_ref = π_r,
           the start of the round); reference log-probs precomputed once per round or inline
Every `eval_every` rounds (and before the first) the policy is measured on fixed held-out prompts
of the task's eval split (`rollout.evaluate_policy`: T-sample score and success, greedy success).
The whole state is checkpointed after every round; rounds are functions of their index, so a
rerun of the same command continues where it stopped, bitwise.

Writes `<workdir>/online_dpo/`: `ckpt/`, `final/`, `metrics.jsonl`, `tb/`, `online_dpo.png`,
`summary.json`.
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
from rlhf_jax.autoif import pair_indices
from rlhf_jax.checkpointing import Checkpointer, abstract_like
from rlhf_jax.pipelines import common, dpo as dpo_stage, rm as rm_stage
from rlhf_jax.steps import make_score_fn
from rlhf_jax.steps.dpo import make_dpo_step, make_sequence_logps_fn
from rlhf_jax.utils import MetricsWriter, Progress, Timers, plot_metrics
from rlhf_jax.utils.metrics import truncate_metrics

STAGE = "online_dpo"


def unique_prompts(records) -> list:
  """One record per distinct prompt (AutoIF SFT sets hold several responses a prompt), first seen kept."""
  seen, out = set(), []
  for r in records:
    if r["prompt"] not in seen:
      seen.add(r["prompt"])
      out.append(r)
  return out


def minmax_per_prompt(scores_PxK: np.ndarray) -> np.ndarray:
  """RM scores scaled per prompt to [0, 1] (best 1, worst 0; a prompt whose scores are all equal gets 0.5)."""
  lo, hi = scores_PxK.min(1, keepdims=True), scores_PxK.max(1, keepdims=True)
  span = hi - lo
  return np.where(span > 0, (scores_PxK - lo) / np.where(span > 0, span, 1.0), 0.5).astype(np.float32)


def build_pairs(records, texts_PxK, accuracy_PxK, idx) -> list[dict]:
  """Pair dicts (prompt, chosen, rejected, metadata) from per-prompt (chosen, rejected) index lists."""
  pairs = []
  for p, rec in enumerate(records):
    for c, r in idx[p]:
      pairs.append({"prompt": rec["prompt"], "chosen": texts_PxK[p][c], "rejected": texts_PxK[p][r],
                    "metadata": {"chosen_accuracy": float(accuracy_PxK[p, c]),
                                 "rejected_accuracy": float(accuracy_PxK[p, r])}})
  return pairs


def run_online_dpo(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, STAGE)
  common.check_provenance(out_dir, config, STAGE)
  oc = config.online_dpo
  final_dir = dpo_stage.final_params_dir(workdir, STAGE)
  if common.has_params(final_dir) and os.path.exists(os.path.join(out_dir, "summary.json")):
    print(f"[{STAGE}] reusing the finished stage in {final_dir}")
    with open(os.path.join(out_dir, "summary.json")) as f:
      return {"reused": True, **json.load(f)}
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len
  lengths = dict(max_prompt_len=plen, max_response_len=rlen)
  k, p_count, bs = oc.samples_per_prompt, oc.prompts_per_round, oc.batch_size
  temperature = config.sampling.temperature if oc.temperature is None else oc.temperature

  # --- mesh, models, data ------------------------------------------------------------------
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  task = common.make_task(config, workdir)
  cfg = common.model_config(config)
  ref_dir = dpo_stage.policy_dir(oc.reference_dir, workdir)
  init_dir = dpo_stage.policy_dir(oc.init_dir or oc.reference_dir, workdir)
  ref_params = dpo_stage.load_policy(config, ref_dir, mesh)
  init_params = ref_params if init_dir == ref_dir else dpo_stage.load_policy(config, init_dir, mesh)
  use_rm = oc.reward_source == "rm"
  rm_params = rm_stage.load_reward_model(config, workdir, mesh)[0] if use_rm else None
  train = unique_prompts(rollout.load_fitted(task, tok, "train", max_prompt_len=plen, stage=STAGE))
  held_out = rollout.load_fitted(task, tok, task.eval_split, max_prompt_len=plen, stage=STAGE)[:oc.eval_prompts]
  order = np.random.default_rng(config.seed + 2).permutation(len(train))

  # --- state ----------------------------------------------------------------------------------
  tx = common.optimizer(oc, optimizer_section=oc.optimizer, total_steps=oc.rounds * oc.steps_per_round)
  rng = jax.random.PRNGKey(config.seed + 7)
  copy = lambda r, p: jax.tree.map(jnp.copy, p)
  state, state_sh = common.create_state(copy, models.logical_axes(cfg), tx, mesh, rng, init_params)
  ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), max_to_keep=config.checkpoint.max_to_keep,
                      save_interval_steps=1, async_save=config.checkpoint.async_save)
  start_round = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(state, sharding=state_sh))
    start_round = int(meta["round"])
    print(f"[{STAGE}] resumed after round {start_round}")
  truncate_metrics(os.path.join(out_dir, "metrics.jsonl"), start_round)

  # --- compiled pieces ------------------------------------------------------------------------
  apply_fn = models.make_apply_fn(cfg)
  rep = shd.replicated(mesh)
  hyper = dict(beta=oc.beta, loss_type=oc.loss_type, label_smoothing=oc.label_smoothing)
  inline = oc.reference == "inline"
  step_fn = jax.jit(make_dpo_step(apply_fn, tx, reference=oc.reference, microbatch=common.microbatch(config), **hyper),
                    in_shardings=(state_sh, None) + ((state_sh.params,) if inline else ()),
                    out_shardings=(state_sh, rep), donate_argnums=0)
  logps = jax.jit(make_sequence_logps_fn(apply_fn))
  sampler = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=temperature, num_samples=k, mesh=mesh)
  eval_sampler = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=temperature,
                                      num_samples=oc.eval_samples, mesh=mesh)
  greedy = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=0.0, mesh=mesh)
  rm_score = jax.jit(make_score_fn(models.make_apply_fn(cfg, head="scalar"))) if use_rm else None

  def evaluate(params) -> dict[str, float]:
    if not held_out:
      return {}
    return rollout.evaluate_policy(task, eval_sampler, greedy, params, tok, held_out, batch_size=oc.rollout_batch,
                                   max_prompt_len=plen, rng=jax.random.PRNGKey(config.seed + 11), mesh=mesh,
                                   ks=sorted({1, oc.eval_samples}))

  # --- loop -----------------------------------------------------------------------------------
  writer = MetricsWriter(out_dir, tensorboard=config.logging.tensorboard)
  timers = Timers()
  t0 = time.time()
  initial = {}
  if start_round == 0 and oc.eval_at_start:
    initial = evaluate(state.params)
    writer.write(0, initial)
  elif start_round > 0:
    initial = common.first_eval_row(os.path.join(out_dir, "metrics.jsonl"))
  print(f"[{STAGE}] {task.name}: {oc.rounds} rounds × {p_count} prompts × {k} samples at T={temperature}, "
        f"reward {oc.reward_source}, positives accuracy {'>' if oc.pos_strict else '≥'} {oc.pos_threshold}, "
        f"reference {ref_dir} ({oc.reference_update}, {oc.reference}); held-out ({len(held_out)} prompts) success "
        f"{initial.get('eval/success_rate', float('nan')):.3f}, greedy {initial.get('eval/greedy_success', float('nan')):.3f}")
  progress = Progress(oc.rounds, desc=STAGE, initial=start_round, quiet=not config.logging.progress)
  last_eval, metrics, total_pairs = {}, {}, 0
  for rnd in range(start_round + 1, oc.rounds + 1):
    key = common.fold(rng, rnd)
    records = [train[int(order[((rnd - 1) * p_count + j) % len(order)])] for j in range(p_count)]
    round_ref = ref_params if oc.reference_update == "sft" else jax.tree.map(jnp.copy, state.params)
    with timers("rollout"):
      texts = rollout.generate_texts(sampler, state.params, tok, records, batch_size=oc.rollout_batch,
                                     max_prompt_len=plen, rng=jax.random.fold_in(key, 0), mesh=mesh)
    texts_PxK = [texts[i * k:(i + 1) * k] for i in range(p_count)]
    with timers("grade"):
      truth = rollout.grade(task, records, texts, n=k).reshape(p_count, k)
      if use_rm:
        scores = rollout.score_texts(rm_score, rm_params, tok, [r["prompt"] for r in records for _ in range(k)],
                                     texts, batch_size=oc.rollout_batch * k, mesh=mesh, **lengths)
        accuracy = minmax_per_prompt(scores.reshape(p_count, k))
      else:
        accuracy = truth
    idx = pair_indices(accuracy, seed=int(jax.random.randint(jax.random.fold_in(key, 1), (), 0, 2**31 - 1)),
                       threshold=oc.pos_threshold, strict=oc.pos_strict, max_pos=oc.max_pos, max_neg=oc.max_neg)
    pairs, skipped = dpo_stage.fit_pairs(tok, build_pairs(records, texts_PxK, accuracy, idx), **lengths)
    total_pairs += len(pairs)
    metrics = {"true/score": float(truth.mean()), "true/success_rate": float((truth >= 1 - 1e-6).mean()),
               "pairs/count": len(pairs), "pairs/skipped_too_long": skipped,
               "pairs/prompts_with_pairs": float(np.mean([bool(x) for x in idx])),
               "pairs/positive_frac": float(np.mean(accuracy >= oc.pos_threshold if not oc.pos_strict
                                                    else accuracy > oc.pos_threshold)),
               "pairs/negative_frac": float(np.mean(accuracy == 0.0)),
               "response/length_chars": float(np.mean([len(t) for t in texts]))}
    if pairs:
      with timers("update"):
        if not inline:
          ref_c, ref_r = dpo_stage.sequence_logps(logps, round_ref, tok, pairs, batch_size=bs, mesh=mesh, **lengths)
        step_metrics = []
        for s in range(1, oc.steps_per_round + 1):
          sel, w = dpo_stage.stream_indices(s, bs, len(pairs), config.seed * 100_003 + rnd)
          batch = dpo_stage.encode_pair_batch(tok, [pairs[i] for i in sel], weights=w, **lengths)
          if not inline:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_c[sel], ref_r[sel]
          args = (round_ref,) if inline else ()
          state, m = step_fn(state, shd.shard_batch(batch, mesh), *args)
          step_metrics.append(m)
        metrics.update(common.mean_metrics([common.to_host(m) for m in step_metrics]))
    else:
      print(f"[{STAGE}] round {rnd}: no prompt had both a positive and a negative sample; no update")
    metrics.update(timers.summary(reset=True))
    if rnd % oc.eval_every == 0 or rnd == oc.rounds:
      last_eval = evaluate(state.params)
      metrics.update(last_eval)
    writer.write(rnd, metrics)
    ckpt.save(rnd, state, meta={"round": rnd})
    progress.update(rnd, score=metrics["true/score"], pairs=len(pairs), loss=metrics.get("train/loss", float("nan")),
                    **({"heldout": last_eval["eval/success_rate"]} if "eval/success_rate" in last_eval else {}))
  progress.close()
  ckpt.wait()
  ckpt.close()
  writer.close()

  common.save_params(final_dir, state.params, {"step": oc.rounds, "stage": STAGE, "loss_type": oc.loss_type,
                                               "beta": oc.beta})
  plot_metrics(os.path.join(out_dir, "metrics.jsonl"),
               {"grade of the round's samples": ["true/score", "true/success_rate"],
                "pairs per round": ["pairs/count"], "DPO loss": ["train/loss"],
                "reward accuracy": ["rewards/accuracy"], "implicit reward margin β·h": ["rewards/margin"],
                "held-out (T samples)": ["eval/success_rate", "eval/score"],
                "held-out greedy": ["eval/greedy_success", "eval/greedy_score"]},
               os.path.join(out_dir, f"{STAGE}.png"), title=f"online DPO on {task.name} ({oc.loss_type}, β={oc.beta})")
  final = last_eval or initial
  summary = {"stage": STAGE, "task": task.name, "rounds": oc.rounds, "reward_source": oc.reward_source,
             "reference": ref_dir, "reference_update": oc.reference_update, "init": init_dir,
             "total_pairs": total_pairs, "heldout_prompts": len(held_out), "wall_s": time.time() - t0,
             "initial_success_rate": initial.get("eval/success_rate"),
             "final_success_rate": final.get("eval/success_rate"),
             "initial_greedy": initial.get("eval/greedy_success"), "final_greedy": final.get("eval/greedy_success"),
             "initial_score": initial.get("eval/score"), "final_score": final.get("eval/score"),
             "initial_greedy_score": initial.get("eval/greedy_score"),
             "final_greedy_score": final.get("eval/greedy_score"), "final_round": metrics}
  common.write_json(os.path.join(out_dir, "summary.json"), summary)
  fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
  print(f"[{STAGE}] done in {summary['wall_s']:.0f} s, {total_pairs} pairs: held-out score (T={temperature}) "
        f"{fmt(summary['initial_score'])} -> {fmt(summary['final_score'])}, greedy score "
        f"{fmt(summary['initial_greedy_score'])} -> {fmt(summary['final_greedy_score'])}")
  return summary
