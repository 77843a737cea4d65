"""Reward-model stage: preference pairs from the SFT policy's samples, labelled by the task's grader, then BT.

1. sample `rm.samples_per_prompt` completions from the SFT policy for
   `rm.num_prompts` train prompts (the rollout path) and grade them with the
   task (`Task.grade`: sandbox, verifier or exact match; partial credit);
2. pair a better with a worse completion of the same prompt (grades differing
   by more than `rm.min_score_gap`; at most `rm.max_pairs_per_prompt` per
   prompt) into a TFDS preference-pair dataset, holding out `rm.eval_fraction`
   of the prompts;
3. train a scalar-head model initialised from the SFT backbone with the BT
   loss; report held-out pairwise accuracy and calibration (ECE);
4. store the RM's score mean/std over held-out samples with its parameters
   (what PPO normalises rewards with), and the R² of score against grade.

The RM is a learned, imperfect model of the grade: it only ever sees text.

Writes `<workdir>/rm/`: `final/` (params + normalisation statistics),
`samples.jsonl`, `metrics.jsonl`, `tb/`, `rm.png`, `summary.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data, losses, models, rollout
from rlhf_jax import sharding as shd
from rlhf_jax.pipelines import common, sft
from rlhf_jax.selection import r_squared
from rlhf_jax.steps import make_rm_eval_step, make_rm_step, make_score_fn
from rlhf_jax.tokenizer import encode_pairs
from rlhf_jax.checkpointing import Checkpointer, abstract_like
from rlhf_jax.utils import MetricsWriter, Progress, plot_metrics
from rlhf_jax.utils.preemption import PreemptionGuard


def final_params_dir(workdir: str) -> str:
  return os.path.join(workdir, "rm", "final")


def load_sft_policy(config, workdir: str, mesh):
  cfg = common.model_config(config)
  params, _ = common.load_params(sft.final_params_dir(workdir), models.abstract_params(cfg),
                                 common.param_shardings(cfg, mesh))
  return cfg, params


def load_reward_model(config, workdir: str, mesh) -> tuple[Any, dict]:
  """RM params and their meta (incl. `reward_mean`, `reward_std`)."""
  cfg = common.model_config(config)
  return common.load_params(final_params_dir(workdir), models.abstract_params(cfg, head="scalar"),
                            common.param_shardings(cfg, mesh, head="scalar"))


def make_pairs(groups: list[dict], *, max_pairs: int, min_gap: float, seed: int) -> list[dict]:
  """(better, worse) completion pairs of the same prompt by grade; duplicates collapsed."""
  rnd = random.Random(seed)
  pairs = []
  for g in groups:
    best = {}
    for c, s in zip(g["completions"], g["scores"]):
      best[c] = max(best.get(c, -1.0), s)
    items = sorted(best.items())
    combos = [(c, r) for c, sc in items for r, sr in items if sc - sr > min_gap]
    rnd.shuffle(combos)
    for c, r in combos[:max_pairs]:
      pairs.append({"prompt": g["prompt"], "chosen": c, "rejected": r,
                    "metadata": json.dumps({"key": g["key"], "chosen_score": best[c], "rejected_score": best[r]})})
  return pairs


def _encode_pairs(tok, batch, config) -> dict[str, np.ndarray]:
  c = encode_pairs(tok, batch["prompt"], batch["chosen"], config.task.max_prompt_len, config.task.max_response_len)
  r = encode_pairs(tok, batch["prompt"], batch["rejected"], config.task.max_prompt_len,
                   config.task.max_response_len)
  return {"chosen_tokens": c["tokens"], "chosen_mask": c["mask"], "rejected_tokens": r["tokens"],
          "rejected_mask": r["mask"]}


def _record_key(record: dict, i: int) -> str:
  """A record's identifier for the pair metadata (string ids only: a mixture's integer task_id names the task)."""
  for k in ("problem_id", "key", "task_id"):
    if isinstance(record.get(k), str) and record[k]:
      return record[k]
  return f"{i}:{record['prompt'][:40]}"


def run_rm(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, "rm")
  common.check_provenance(out_dir, config, "rm")
  if common.has_params(final_params_dir(workdir)):
    print(f"[rm] reusing the finished RM stage in {final_params_dir(workdir)}")
    return {"reused": True}
  rc = config.rm
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  task = common.make_task(config, workdir)
  cfg, sft_params = load_sft_policy(config, workdir, mesh)
  rng = jax.random.PRNGKey(config.seed + 1)
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len

  # --- 1. sample and grade ----------------------------------------------------------
  train = rollout.load_fitted(task, tok, "train", max_prompt_len=plen, stage="rm")
  order = np.random.default_rng(config.seed).permutation(len(train))[: rc.num_prompts]
  records = [train[int(i)] for i in order]
  n = rc.samples_per_prompt
  temperature = config.sampling.temperature if rc.temperature is None else rc.temperature
  sampler = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=temperature, top_k=config.sampling.top_k,
                                 top_p=config.sampling.top_p, num_samples=n, mesh=mesh)
  print(f"[rm] sampling {n} completions for {len(records)} {task.name} prompts and grading them")
  texts = rollout.generate_texts(sampler, sft_params, tok, records, batch_size=config.ppo.rollout_batch,
                                 max_prompt_len=plen, rng=rng, mesh=mesh)
  per_prompt = [texts[i * n:(i + 1) * n] for i in range(len(records))]
  if rc.include_reference:  # graded like any other candidate; helps when the SFT policy rarely succeeds
    per_prompt = [c + [r["response"]] if r.get("response") else c for c, r in zip(per_prompt, records)]
  flat = [c for cs in per_prompt for c in cs]
  owners = [records[i] for i, cs in enumerate(per_prompt) for _ in cs]
  scores = task.grade(owners, flat)
  offsets = np.cumsum([0] + [len(cs) for cs in per_prompt])
  groups = [{"key": _record_key(r, i), "prompt": r["prompt"], "completions": per_prompt[i],
             "scores": scores[offsets[i]:offsets[i + 1]].tolist()} for i, r in enumerate(records)]
  own = np.asarray([g["scores"][:n] for g in groups])  # the policy's own samples only
  sft_score, sft_success = float(own.mean()), float((own >= 1 - 1e-6).mean())
  with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
    for g in groups:
      f.write(json.dumps(g) + "\n")
  n_eval = max(1, int(round(rc.eval_fraction * len(groups))))
  # Held-out pairs use the policy's own samples only: that is what the RM will have to judge in RL.
  eval_groups = [{**g, "completions": g["completions"][:n], "scores": g["scores"][:n]} for g in groups[:n_eval]]
  pairs = {"train": make_pairs(groups[n_eval:], max_pairs=rc.max_pairs_per_prompt, min_gap=rc.min_score_gap,
                               seed=config.seed),
           "validation": make_pairs(eval_groups, max_pairs=rc.max_pairs_per_prompt, min_gap=rc.min_score_gap,
                                    seed=config.seed)}
  print(f"[rm] SFT samples: mean grade {sft_score:.3f}, success {sft_success:.3f}; pairs: {len(pairs['train'])} "
        f"train, {len(pairs['validation'])} held out")
  if len(pairs["train"]) < 2 or not pairs["validation"]:
    raise RuntimeError(f"too few preference pairs ({len(pairs['train'])} train, {len(pairs['validation'])} held "
                       f"out): the SFT policy's samples of a prompt rarely differ in grade (mean {sft_score:.3f}). "
                       "Raise config.rm.num_prompts / samples_per_prompt or the sampling temperature.")
  # The dataset is named by its content: a finished dataset of the same name is reused as is.
  digest = hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()[:12]
  builder = data.build_preference_pairs(common.data_dir(config, workdir), pairs, name=f"pairs_{digest}")
  train_src, eval_src = data.load_split(builder, "train"), data.load_split(builder, "validation")

  # --- 2. init from the SFT backbone, step --------------------------------------------
  tx = common.optimizer(rc)
  state, state_sh = common.create_state(lambda r, p: models.lm_to_scalar_params(p, cfg, r),
                                        models.logical_axes(cfg, head="scalar"), tx, mesh, rng, sft_params)
  apply_fn = models.make_apply_fn(cfg, head="scalar")
  bsh = shd.batch_sharding(mesh, 2)
  batch_sh = {k: bsh for k in ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")}
  rep = shd.replicated(mesh)
  train_step = jax.jit(make_rm_step(apply_fn, tx, margin=rc.margin, microbatch=common.microbatch(config)),
                       in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep), donate_argnums=0)
  eval_step = jax.jit(make_rm_eval_step(apply_fn), in_shardings=(state_sh.params, batch_sh))
  bs = min(rc.batch_size, len(train_src))

  def evaluate(params) -> dict[str, float]:
    """Every held-out pair: the last batch is padded by repetition (static shapes) and trimmed."""
    records_ = [eval_src[i] for i in range(len(eval_src))]
    padded = records_ + [records_[-1]] * (-len(records_) % bs)
    chosen, rejected = [], []
    for i in range(0, len(padded), bs):
      c, r = eval_step(params, shd.shard_batch(_encode_pairs(tok, data.collate(padded[i:i + bs]), config), mesh))
      chosen.append(rollout.local_rows(c))
      rejected.append(rollout.local_rows(r))
    c = jnp.asarray(np.concatenate(chosen)[:len(records_)])
    r = jnp.asarray(np.concatenate(rejected)[:len(records_)])
    _, m = losses.bradley_terry_loss(c, r)
    return {f"eval/{k.split('/')[-1]}": float(v) for k, v in m.items()}

  # --- 3. loop ------------------------------------------------------------------------
  # Resumable: the state and the loader position are checkpointed; SIGTERM checkpoints at the next step and exits 75.
  ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), max_to_keep=config.checkpoint.max_to_keep,
                      save_interval_steps=config.checkpoint.every_steps, async_save=config.checkpoint.async_save)
  start = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(state, sharding=state_sh))
    start = int(meta["data_position"])
    print(f"[rm] resumed at step {start}")
  common.drop_rows_after(os.path.join(out_dir, "metrics.jsonl"), start)
  loader = data.make_grain_loader(train_src, batch_size=bs, seed=config.seed, shuffle=True, num_epochs=None,
                                  start_index=start)
  writer = MetricsWriter(out_dir, tensorboard=config.logging.tensorboard)
  progress = Progress(rc.steps, desc="rm", initial=start, quiet=not config.logging.progress)
  pending = []
  with PreemptionGuard() as guard:
    for step, batch in zip(range(start + 1, rc.steps + 1), loader):
      state, metrics = train_step(state, shd.shard_batch(_encode_pairs(tok, batch, config), mesh))
      pending.append(metrics)
      if step % config.logging.every_steps == 0 or step == rc.steps:
        host = common.mean_metrics([common.to_host(m) for m in pending])
        pending = []
        progress.update(step, loss=host["train/loss"], acc=host.get("rm/accuracy", 0.0))
        writer.write(step, host)
      if step % max(1, rc.steps // 4) == 0 or step == rc.steps:
        writer.write(step, evaluate(state.params))
      ckpt.save(step, state, meta={"data_position": loader.position})
      if guard.should_stop(step) and step < rc.steps:
        ckpt.save(step, state, meta={"data_position": loader.position}, force=True)
        ckpt.wait()
        guard.exit(stage="rm", step=step, checkpoint=os.path.join(ckpt.directory, str(step)))
  ckpt.wait()
  ckpt.close()
  progress.close()
  final_eval = evaluate(state.params)

  # --- 4. reward normalisation statistics (held-out policy samples) -----------------
  score = jax.jit(make_score_fn(apply_fn))
  eval_texts = [c for g in eval_groups for c in g["completions"]]
  eval_prompts = [g["prompt"] for g in eval_groups for _ in g["completions"]]
  rm_scores = rollout.score_texts(score, state.params, tok, eval_prompts, eval_texts, batch_size=bs,
                                  max_prompt_len=plen, max_response_len=rlen, mesh=mesh)
  grades = np.asarray([s for g in eval_groups for s in g["scores"]], np.float32)
  stats = {"reward_mean": float(rm_scores.mean()), "reward_std": float(max(rm_scores.std(), 1e-6)),
           "heldout_score_grade_r2": float(r_squared(jnp.asarray(rm_scores), jnp.asarray(grades)))}
  writer.write(rc.steps, {**final_eval, **{f"eval/{k}": v for k, v in stats.items()}})
  writer.close()
  common.save_params(final_params_dir(workdir), state.params, {"step": rc.steps, "stage": "rm", **stats})
  common.export_hf(config, state.params, out_dir, head="scalar")  # rm/hf/ (*ForSequenceClassification), hf_path only
  plot_metrics(os.path.join(out_dir, "metrics.jsonl"),
               {"BT loss": ["train/loss", "eval/loss"], "pairwise accuracy": ["rm/accuracy", "eval/accuracy"]},
               os.path.join(out_dir, "rm.png"), title="Reward model")
  summary = {"task": task.name, "sft_sample_grade": sft_score, "sft_sample_success": sft_success,
             "train_pairs": len(pairs["train"]), "heldout_pairs": len(pairs["validation"]), **final_eval, **stats}
  common.write_json(os.path.join(out_dir, "summary.json"), summary)
  print(f"[rm] done: held-out accuracy {final_eval.get('eval/accuracy', float('nan')):.3f} on "
        f"{len(pairs['validation'])} pairs, R² of score vs grade {stats['heldout_score_grade_r2']:.3f}")
  return summary
