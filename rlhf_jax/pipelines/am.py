"""Advantage-Model stage, and the Selective Rehearsal / per-task pieces the RL stages use (ALGORITHMS.md §10).

The `am` stage trains an Advantage Model — a RECONSTRUCTION of Peng et al. 2023 (`steps.make_am_step`, §10.2) —
and, beside it, a Bradley–Terry RM on the very same pairs, batches and number of steps:

1. sample `rm.samples_per_prompt` completions of the SFT policy for `rm.num_prompts` train prompts and grade them
   (the rm stage's procedure, same RNG: the same samples), build the pairs with `rm.make_pairs` (the same
   preference-pair dataset as the rm stage), holding out `rm.eval_fraction` of the prompts;
2. train both from the SFT backbone for `rm.steps` steps of `rm.batch_size` pairs with the `rm.optimizer`: the RM
   with `make_rm_step`, the AM with `make_am_step` (its `am.*` coefficients; `task_ids` from the mixture's tags,
   `prompt_ids` group the pairs of one prompt; the samples are the target policy's, so every importance weight
   is 1); with all AM coefficients 0 the two runs are bitwise identical;
3. per task: held-out ranking accuracy and ECE (`losses.pairwise_calibration`) of both; the mean and std of both
   models' scores on the held-out prompts' policy samples, raw and after the global normalisation PPO applies,
   and the mean |per-prompt mean| (the AM's defining property E_π[a|x] = 0);
4. per-task score histograms (RM vs AM, normalised) as `scores.png`.

Writes `<workdir>/am/`: `final/` (the AM's params + normalisation statistics, what `ppo.reward_source="am"`
loads), `rm_final/` (the RM trained beside it), `metrics.jsonl`, `am.png`, `scores.png`, `summary.json`.

`RLExtras` is what the ppo/grpo stages call for the rest of §10: Selective Rehearsal batches (prompt
embeddings of the iteration's prompts from the current policy, k-means, per-cluster choice of expert examples by
AM score, `steps.select_rehearsal`), per-task training metrics, and the forgetting measurement (per task: NLL of
the held-out expert responses and greedy score).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data, losses, models, rollout
from rlhf_jax import sharding as shd
from rlhf_jax.pipelines import common, rm as rm_stage
from rlhf_jax.steps import AMState, init_am_state, make_am_step, make_rm_eval_step, make_rm_step, make_score_fn
from rlhf_jax.steps.common import sequence_scores
from rlhf_jax.steps.rehearsal import prompt_embeddings, select_rehearsal
from rlhf_jax.steps.sft import sft_logits_targets
from rlhf_jax.tokenizer import encode_pairs, encode_prompts
from rlhf_jax.utils import MetricsWriter, Progress, plot_metrics


def final_params_dir(workdir: str) -> str:
  return os.path.join(workdir, "am", "final")


def rm_params_dir(workdir: str) -> str:
  return os.path.join(workdir, "am", "rm_final")


def load_advantage_model(config, workdir: str, mesh) -> tuple[Any, dict]:
  """AM params and their meta (`reward_mean`, `reward_std` as the RM's, `task_names`, per-task statistics)."""
  cfg = common.model_config(config)
  return common.load_params(final_params_dir(workdir), models.abstract_params(cfg, head="scalar"),
                            common.param_shardings(cfg, mesh, head="scalar"))


def task_info(task, records: Sequence[dict]) -> tuple[np.ndarray, list[str]]:
  """int32 task ids of records and the task names: a mixture's tags, else one task (id 0)."""
  if hasattr(task, "task_ids") and hasattr(task, "task_names"):
    return np.asarray(task.task_ids(records), np.int32), list(task.task_names)
  return np.zeros(len(records), np.int32), [task.name]


def _am_kwargs(config, num_tasks: int) -> dict:
  ac = config.am
  return dict(num_tasks=num_tasks, mean_coef=ac.mean_coef, bound_coef=ac.bound_coef, bound=ac.bound,
              regulation_coef=ac.regulation_coef, stats_momentum=ac.stats_momentum,
              importance_clip=ac.importance_clip, target_var=ac.target_var)


def _pair_stats(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
  _, m = losses.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected))
  return {"accuracy": float(m["rm/accuracy"]),
          "ece": float(losses.pairwise_calibration(jnp.asarray(chosen), jnp.asarray(rejected)))}


def run_am(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, "am")
  common.check_provenance(out_dir, config, "am")
  if common.has_params(final_params_dir(workdir)) and os.path.exists(os.path.join(out_dir, "summary.json")):
    print(f"[am] reusing the finished AM stage in {final_params_dir(workdir)}")
    with open(os.path.join(out_dir, "summary.json")) as f:
      return {"reused": True, **json.load(f)}
  rc = config.rm
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  task = common.make_task(config, workdir)
  cfg, sft_params = rm_stage.load_sft_policy(config, workdir, mesh)
  rng = jax.random.PRNGKey(config.seed + 1)  # the rm stage's: the same samples and initial heads
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len

  # --- 1. sample and grade (the rm stage's procedure), pairs via rm.make_pairs ----------------
  train = rollout.load_fitted(task, tok, "train", max_prompt_len=plen, stage="am")
  order = np.random.default_rng(config.seed).permutation(len(train))[: rc.num_prompts]
  records = [train[int(i)] for i in order]
  task_ids, task_names = task_info(task, records)
  num_tasks = len(task_names)
  n = rc.samples_per_prompt
  temperature = config.sampling.temperature if rc.temperature is None else rc.temperature
  sampler = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=temperature, top_k=config.sampling.top_k,
                                 top_p=config.sampling.top_p, num_samples=n, mesh=mesh)
  print(f"[am] sampling {n} completions for {len(records)} {task.name} prompts ({num_tasks} tasks) and grading them")
  texts = rollout.generate_texts(sampler, sft_params, tok, records, batch_size=config.ppo.rollout_batch,
                                 max_prompt_len=plen, rng=rng, mesh=mesh)
  per_prompt = [texts[i * n:(i + 1) * n] for i in range(len(records))]
  if rc.include_reference:
    per_prompt = [c + [r["response"]] if r.get("response") else c for c, r in zip(per_prompt, records)]
  owners = [records[i] for i, cs in enumerate(per_prompt) for _ in cs]
  scores = task.grade(owners, [c for cs in per_prompt for c in cs])
  offsets = np.cumsum([0] + [len(cs) for cs in per_prompt])
  groups = [{"key": rm_stage._record_key(r, i), "prompt": r["prompt"], "completions": per_prompt[i],  # pylint: disable=protected-access
             "scores": scores[offsets[i]:offsets[i + 1]].tolist(), "task_id": int(task_ids[i])}
            for i, r in enumerate(records)]
  n_eval = max(1, int(round(rc.eval_fraction * len(groups))))
  eval_groups = [{**g, "completions": g["completions"][:n], "scores": g["scores"][:n]} for g in groups[:n_eval]]
  strip = lambda gs: [{k: v for k, v in g.items() if k != "task_id"} for g in gs]  # the rm stage's exact pairs
  pairs = {"train": rm_stage.make_pairs(strip(groups[n_eval:]), max_pairs=rc.max_pairs_per_prompt,
                                        min_gap=rc.min_score_gap, seed=config.seed),
           "validation": rm_stage.make_pairs(strip(eval_groups), max_pairs=rc.max_pairs_per_prompt,
                                             min_gap=rc.min_score_gap, seed=config.seed)}
  if len(pairs["train"]) < 2 or not pairs["validation"]:
    raise RuntimeError(f"too few preference pairs ({len(pairs['train'])} train, {len(pairs['validation'])} held "
                       "out): raise config.rm.num_prompts / samples_per_prompt or the sampling temperature")
  # A pair's prompt gives its task and its prompt group (pairs of one prompt form one group of the mean term).
  prompt_index = {}
  for i, g in enumerate(groups):
    prompt_index.setdefault(g["prompt"], (i, g["task_id"]))
  digest = hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()[:12]
  builder = data.build_preference_pairs(common.data_dir(config, workdir), pairs, name=f"pairs_{digest}")
  train_src, eval_src = data.load_split(builder, "train"), data.load_split(builder, "validation")
  print(f"[am] pairs: {len(pairs['train'])} train, {len(pairs['validation'])} held out; per task (train): "
        + ", ".join(f"{name} {sum(prompt_index[p['prompt']][1] == k for p in pairs['train'])}"
                    for k, name in enumerate(task_names)))

  def encode(batch) -> dict[str, np.ndarray]:
    out = rm_stage._encode_pairs(tok, batch, config)  # pylint: disable=protected-access
    idx = [prompt_index[p] for p in batch["prompt"]]
    out["prompt_ids"] = np.asarray([i for i, _ in idx], np.int32)
    out["task_ids"] = np.asarray([t for _, t in idx], np.int32)
    return out

  # --- 2. both models from the SFT backbone, the same batches --------------------------------
  tx = common.optimizer(rc)
  init = lambda r, p: models.lm_to_scalar_params(p, cfg, r)
  rm_state, state_sh = common.create_state(init, models.logical_axes(cfg, head="scalar"), tx, mesh, rng, sft_params)
  am_model, _ = common.create_state(init, models.logical_axes(cfg, head="scalar"), tx, mesh, rng, sft_params)
  am_state = init_am_state(am_model, num_tasks=num_tasks, target_var=config.am.target_var)
  rep = shd.replicated(mesh)
  am_sh = AMState(model=state_sh, task_stats=jax.tree.map(lambda _: rep, am_state.task_stats))
  apply_fn = models.make_apply_fn(cfg, head="scalar")
  rm_step = jax.jit(make_rm_step(apply_fn, tx, margin=rc.margin, microbatch=common.microbatch(config)),
                    in_shardings=(state_sh, None), out_shardings=(state_sh, rep), donate_argnums=0)
  am_step = jax.jit(make_am_step(apply_fn, tx, **_am_kwargs(config, num_tasks)), in_shardings=(am_sh, None),
                    out_shardings=(am_sh, rep), donate_argnums=0)
  eval_step = jax.jit(make_rm_eval_step(apply_fn))
  bs = min(rc.batch_size, len(train_src))
  eval_records = [eval_src[i] for i in range(len(eval_src))]
  eval_tasks = np.asarray([prompt_index[r["prompt"]][1] for r in eval_records], np.int32)

  def pair_scores(params) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every held-out pair (the last batch padded by repetition, then trimmed)."""
    padded = eval_records + [eval_records[-1]] * (-len(eval_records) % bs)
    chosen, rejected = [], []
    for i in range(0, len(padded), bs):
      c, r = eval_step(params, shd.shard_batch(rm_stage._encode_pairs(tok, data.collate(padded[i:i + bs]), config),  # pylint: disable=protected-access
                                               mesh))
      chosen.append(rollout.local_rows(c))
      rejected.append(rollout.local_rows(r))
    return np.concatenate(chosen)[:len(eval_records)], np.concatenate(rejected)[:len(eval_records)]

  def evaluate(rm_params, am_params) -> dict[str, float]:
    out = {}
    for name, params in (("rm", rm_params), ("am", am_params)):
      c, r = pair_scores(params)
      for k, v in _pair_stats(c, r).items():
        out[f"eval/{name}_{k}"] = v
      for t in range(num_tasks):
        sel = eval_tasks == t
        if sel.any():
          for k, v in _pair_stats(c[sel], r[sel]).items():
            out[f"eval/{name}_{k}/task{t}"] = v
    return out

  loader = data.make_grain_loader(train_src, batch_size=bs, seed=config.seed, shuffle=True, num_epochs=None)
  writer = MetricsWriter(out_dir, tensorboard=config.logging.tensorboard)
  progress = Progress(rc.steps, desc="am", quiet=not config.logging.progress)
  pending = []
  for step, batch in zip(range(1, rc.steps + 1), loader):
    enc = shd.shard_batch(encode(batch), mesh)
    pair_batch = {k: v for k, v in enc.items() if k not in ("prompt_ids", "task_ids")}
    rm_state, rm_m = rm_step(rm_state, pair_batch)
    am_state, am_m = am_step(am_state, enc)
    m = {f"rm/{k.split('/')[-1]}": v for k, v in rm_m.items()}
    m.update({k: v for k, v in am_m.items() if not k.startswith("train/")})
    m["am/grad_norm"] = am_m["train/grad_norm"]
    pending.append(m)
    if step % config.logging.every_steps == 0 or step == rc.steps:
      host = common.mean_metrics([common.to_host(x) for x in pending])
      pending = []
      progress.update(step, rm_loss=host["rm/loss"], am_loss=host["am/loss"], am_acc=host["am/accuracy"])
      writer.write(step, host)
    if step % max(1, rc.steps // 4) == 0 or step == rc.steps:
      writer.write(step, evaluate(rm_state.params, am_state.model.params))
  progress.close()
  final_eval = evaluate(rm_state.params, am_state.model.params)

  # --- 3. scores of the held-out prompts' policy samples, per task ---------------------------
  score = jax.jit(make_score_fn(apply_fn))
  eval_texts = [c for g in eval_groups for c in g["completions"]]
  eval_prompts = [g["prompt"] for g in eval_groups for _ in g["completions"]]
  sample_tasks = np.repeat([g["task_id"] for g in eval_groups], n)
  stats, hist = {}, {}
  for name, params in (("rm", rm_state.params), ("am", am_state.model.params)):
    s = rollout.score_texts(score, params, tok, eval_prompts, eval_texts, batch_size=bs, max_prompt_len=plen,
                            max_response_len=rlen, mesh=mesh)
    mean, std = float(s.mean()), float(max(s.std(), 1e-6))
    z = (s - mean) / std  # what PPO trains on
    stats[name] = {"reward_mean": mean, "reward_std": std, "per_task": {}}
    hist[name] = z
    per_prompt_mean = s.reshape(len(eval_groups), n).mean(1)
    for t, tname in enumerate(task_names):
      sel = sample_tasks == t
      if not sel.any():
        continue
      st = float(s[sel].std())
      stats[name]["per_task"][tname] = {
          "samples": int(sel.sum()), "mean": float(s[sel].mean()), "std": st,
          "mean_over_std": float(s[sel].mean() / max(st, 1e-6)),
          "normalised_mean": float(z[sel].mean()), "normalised_std": float(z[sel].std()),
          "abs_prompt_mean": float(np.abs(per_prompt_mean[np.asarray([g["task_id"] == t for g in eval_groups])]
                                          ).mean()),
          "ranking_accuracy": final_eval.get(f"eval/{name}_accuracy/task{t}"),
          "ece": final_eval.get(f"eval/{name}_ece/task{t}")}
  writer.write(rc.steps, final_eval)
  writer.close()

  # --- 4. save, plot, summarise ---------------------------------------------------------------
  task_stats = jax.device_get(am_state.task_stats)
  meta = {"step": rc.steps, "stage": "am", "task_names": task_names, "reward_mean": stats["am"]["reward_mean"],
          "reward_std": stats["am"]["reward_std"], "running_task_mean": np.asarray(task_stats.mean).tolist(),
          "running_task_std": np.sqrt(np.asarray(task_stats.var)).tolist()}
  common.save_params(final_params_dir(workdir), am_state.model.params, meta)
  common.save_params(rm_params_dir(workdir), rm_state.params,
                     {"step": rc.steps, "stage": "am/rm", "task_names": task_names,
                      "reward_mean": stats["rm"]["reward_mean"], "reward_std": stats["rm"]["reward_std"]})
  plot_metrics(os.path.join(out_dir, "metrics.jsonl"),
               {"BT loss (train)": ["rm/loss", "am/rank_loss"], "pairwise accuracy (train)": ["rm/accuracy",
                                                                                             "am/accuracy"],
                "held-out accuracy": ["eval/rm_accuracy", "eval/am_accuracy"],
                "held-out ECE": ["eval/rm_ece", "eval/am_ece"],
                "AM extra terms": ["am/mean_loss", "am/bound_loss", "am/regulate_loss"],
                "AM running task mean": [f"am/task{t}/running_mean" for t in range(num_tasks)]},
               os.path.join(out_dir, "am.png"), title="Advantage model vs reward model (same pairs)")
  plot_score_histograms(hist, sample_tasks, task_names, os.path.join(out_dir, "scores.png"),
                        bins=config.am.hist_bins)
  summary = {"task": task.name, "task_names": task_names, "train_pairs": len(pairs["train"]),
             "heldout_pairs": len(pairs["validation"]), "heldout_samples": len(eval_texts), "steps": rc.steps,
             **final_eval, "scores": stats, "am_settings": config.am.to_dict()}
  common.write_json(os.path.join(out_dir, "summary.json"), summary)
  print(f"[am] done: held-out accuracy RM {final_eval['eval/rm_accuracy']:.3f} / AM {final_eval['eval/am_accuracy']:.3f}"
        f", ECE RM {final_eval['eval/rm_ece']:.3f} / AM {final_eval['eval/am_ece']:.3f}; per-task mean/std "
        + "; ".join(f"{t}: RM {stats['rm']['per_task'][t]['mean_over_std']:+.2f} AM "
                    f"{stats['am']['per_task'][t]['mean_over_std']:+.2f}" for t in stats["am"]["per_task"]))
  return summary


def plot_score_histograms(z: dict[str, np.ndarray], task_ids: np.ndarray, task_names: Sequence[str], out_png: str,
                          *, bins: int = 20) -> str:
  """One panel per task: the RM's and the AM's normalised scores ((s − mean) / std over all tasks) overlaid."""
  from rlhf_jax.utils.plotting import _figure, _fit_texts, _save  # pylint: disable=import-outside-toplevel
  k = len(task_names)
  fig = _figure(figsize=(4.2 * k, 3.4))
  axes = np.atleast_1d(fig.subplots(1, k, squeeze=False)[0])
  lo = min(float(v.min()) for v in z.values())
  hi = max(float(v.max()) for v in z.values())
  edges = np.linspace(lo, hi + 1e-6, bins + 1)
  for t, (ax, name) in enumerate(zip(axes, task_names)):
    sel = task_ids == t
    for model, v in z.items():
      if sel.any():
        ax.hist(v[sel], bins=edges, alpha=0.5, label=f"{model.upper()} (mean {v[sel].mean():+.2f}, std "
                f"{v[sel].std():.2f})")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_title(f"task {t}: {name}", fontsize=10)
    ax.set_xlabel("normalised score (all-task z)")
    ax.set_ylabel("held-out samples")
    ax.legend(fontsize=7)
  fig.suptitle("RM vs AM score distributions per task (held-out policy samples)")
  _fit_texts(fig)
  return _save(fig, out_png)


# ----------------------------------------------------------------------------------------------------------------
# What the RL stages use: Selective Rehearsal batches, per-task metrics, the forgetting measurement
# ----------------------------------------------------------------------------------------------------------------


def _row_nll(apply_fn, params, batch):
  """Per-row summed response NLL and token count (teacher forcing, T = 1)."""
  logits, targets, loss_mask = sft_logits_targets(apply_fn, params, batch)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  tok_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  m = loss_mask.astype(jnp.float32)
  return -jnp.sum(tok_lp * m, axis=1), jnp.sum(m, axis=1)


class RLExtras:
  """Selective Rehearsal, per-task metrics and forgetting for `pipelines.ppo.run_rl` (module docstring).

  Args:
    config, task, tok, cfg, mesh: the RL stage's.
    am_params: the AM (needed for rehearsal, `sr.coef > 0`), else None.
    held_out: the stage's held-out records (the expert set is those with a "response" that fits).
  """

  def __init__(self, config, task, tok, cfg, mesh, *, am_params=None, held_out: Sequence[dict] = ()):
    self.config, self.task, self.tok, self.mesh = config, task, tok, mesh
    self.plen, self.rlen = config.task.max_prompt_len, config.task.max_response_len
    self.coef = float(config.sr.coef)
    self.am_params = am_params
    _, self.task_names = task_info(task, held_out or task.load(task.eval_split)[:1])
    self.lm_apply = models.make_apply_fn(cfg)
    self.batch = config.ppo.rollout_batch
    if self.coef:
      if am_params is None:
        raise ValueError("config.sr.coef > 0 needs the AM (ppo.reward_source='am')")
      scalar_apply = models.make_apply_fn(cfg, head="scalar")
      k, per = int(config.sr.clusters), int(config.sr.per_cluster)

      def select(actor_params, am_params_, prompt_tokens, prompt_mask, tokens, mask, valid, key):
        emb = prompt_embeddings(self.lm_apply, actor_params, prompt_tokens, prompt_mask)
        am_scores = sequence_scores(scalar_apply, am_params_, tokens, mask)
        return select_rehearsal(emb, am_scores, valid, k_clusters=k, per_cluster=per, key=key), am_scores

      self._select = jax.jit(select)
    self.expert = []
    if config.sr.expert_eval:
      fitted, _ = rollout.fit_records(tok, held_out, self.plen, self.rlen)
      self.expert = [r for r in fitted if r.get("response")]
      self._nll = jax.jit(lambda p, b: _row_nll(self.lm_apply, p, b))
      self._greedy = rollout.make_sampler(cfg, tok, max_new_tokens=self.rlen, temperature=0.0, mesh=mesh)

  # --- Selective Rehearsal ---------------------------------------------------------------------
  def rehearsal(self, actor_params, records: Sequence[dict], key) -> tuple[Optional[dict], dict[str, float]]:
    """The rehearsal batch of an iteration's prompts (None when off) and the PPO/rehearsal split metrics."""
    if not self.coef:
      return None, {}
    enc = encode_pairs(self.tok, [r["prompt"] for r in records], [r.get("response") or "" for r in records],
                       self.plen, self.rlen)
    fits = [bool(r.get("response")) and len(self.tok.encode(r["response"])) + 1 <= self.rlen for r in records]
    pt, pm = encode_prompts(self.tok, [r["prompt"] for r in records], self.plen)
    put = lambda x: rollout.shard_rows(np.asarray(x), self.mesh)
    sel, am_scores = self._select(actor_params, self.am_params, put(pt), put(pm), put(enc["tokens"]),
                                  put(enc["mask"]), put(np.asarray(fits, np.float32)), key)
    batch = {k: put(enc[k]) for k in ("tokens", "mask", "loss_mask")}
    batch["weights"] = sel
    sel_host = rollout.local_rows(sel)
    ids, _ = task_info(self.task, records)
    metrics = {"rehearsal/selected": float(sel_host.sum()), "rehearsal/selected_frac": float(sel_host.mean()),
               "rehearsal/ppo_prompts": float(len(records)), "rehearsal/eligible": float(np.sum(fits)),
               "rehearsal/am_score_selected": float((rollout.local_rows(am_scores) * sel_host).sum()
                                                    / max(sel_host.sum(), 1.0))}
    for t in range(len(self.task_names)):
      metrics[f"rehearsal/selected/task{t}"] = float(sel_host[ids == t].sum())
    return batch, metrics

  # --- per-task training metrics ---------------------------------------------------------------
  def iteration_metrics(self, records: Sequence[dict], rewards_PxN: np.ndarray, truth_PxN: np.ndarray) -> dict:
    """Reward trained on and true score of the iteration's samples, per task."""
    ids, _ = task_info(self.task, records)
    out = {}
    for t in range(len(self.task_names)):
      sel = ids == t
      if sel.any():
        out[f"true/score/task{t}"] = float(truth_PxN[sel].mean())
        out[f"true/success_rate/task{t}"] = float((truth_PxN[sel] >= 1 - 1e-6).mean())
        out[f"reward/score/task{t}"] = float(rewards_PxN[sel].mean())
    return out

  # --- forgetting: the held-out expert set ---------------------------------------------------------
  def expert_metrics(self, params) -> dict[str, float]:
    """Per task: mean token NLL of the expert responses and the greedy score (and over all tasks)."""
    if not self.expert:
      return {}
    recs = self.expert
    ids, _ = task_info(self.task, recs)
    nll, count = [], []
    for i in range(0, len(recs), self.batch):
      chunk = list(recs[i:i + self.batch])
      real = len(chunk)
      chunk += [chunk[-1]] * (self.batch - real)
      enc = encode_pairs(self.tok, [r["prompt"] for r in chunk], [r["response"] for r in chunk], self.plen,
                         self.rlen)
      s, c = self._nll(params, shd.shard_batch({k: enc[k] for k in ("tokens", "mask", "loss_mask")}, self.mesh))
      nll.append(rollout.local_rows(s)[:real])
      count.append(rollout.local_rows(c)[:real])
    nll, count = np.concatenate(nll), np.concatenate(count)
    texts = rollout.generate_texts(self._greedy, params, self.tok, recs, batch_size=self.batch,
                                   max_prompt_len=self.plen, rng=jax.random.PRNGKey(0), mesh=self.mesh)
    greedy = rollout.grade(self.task, recs, texts, n=1)
    out = {"expert/nll": float(nll.sum() / max(count.sum(), 1)), "expert/greedy_score": float(greedy.mean())}
    for t in range(len(self.task_names)):
      sel = ids == t
      if sel.any():
        out[f"expert/nll/task{t}"] = float(nll[sel].sum() / max(count[sel].sum(), 1))
        out[f"expert/greedy_score/task{t}"] = float(greedy[sel].mean())
    return out

  def plot(self, metrics_path: str, out_png: str, title: str) -> None:
    k = range(len(self.task_names))
    plot_metrics(metrics_path,
                 {"true score of training samples": [f"true/score/task{t}" for t in k],
                  "reward trained on": [f"reward/score/task{t}" for t in k],
                  "expert-set NLL (nats/token)": [f"expert/nll/task{t}" for t in k],
                  "expert-set greedy score": [f"expert/greedy_score/task{t}" for t in k],
                  "rehearsed examples per task": [f"rehearsal/selected/task{t}" for t in k],
                  "rehearsal NLL (selected)": ["rehearsal/nll"]},
                 out_png, title=title + " — per task: " + ", ".join(f"task{t}={n}" for t, n in
                                                                   enumerate(self.task_names)))

  def summary(self, initial: dict, final: dict) -> dict:
    keys = [k for k in final if k.startswith("expert/")]
    return {"task_names": self.task_names,
            "expert_initial": {k: initial.get(k) for k in keys}, "expert_final": {k: final.get(k) for k in keys},
            "expert_nll_drift": {k: final[k] - initial[k] for k in keys if "/nll" in k and k in initial}}
