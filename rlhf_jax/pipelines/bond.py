"""The `bond` stage: BOND / J-BOND (ALGORITHMS §6) on any task, with `steps.make_bond_step`.

Policy and anchor start from the SFT policy, which is also the frozen reference π_ref.
Each iteration, for P = bond.prompts_per_iteration train prompts:
  rollout   1 sample of the policy, k = bond.anchor_samples samples of the anchor (the sampler takes the
            anchor's params, `state.anchor_params`), and M = bond.reference_samples samples of π_ref (only
            for the quantile metrics), all through the shared rollout path at temperature 1
  score     the reward (`bond.reward_source`: the RM on the sampled tokens, or the task's grade) of every
            sample; the task's grade of the policy samples is always computed as the true score
  update    one jitted `make_bond_step` (J-BOND by default: β 0.5, η 0.02, γ 0, EMA anchor inside the
            state; plain BOND with `bond.variant="bond"`, hard anchor copies with `bond.hard_anchor_every`)
Metrics every iteration: rewards of policy / anchor / reference samples, true score and success
rate, KL of the policy to the reference (k1 and k3 sequence sums on its samples) and to the
anchor (k3, from the step), the policy's mid-quantile q̂ among the reference samples' rewards
(`bon.reward_quantile`; log q̂ clipped at 1/(2M)), `bon.effective_n` = q̄/(1 − q̄) of the policy
and of the anchor (J-BOND tracks Bo-2 of the anchor: the policy's effective N should be about
twice the anchor's), entropy, the loss terms. Held-out evaluation every `bond.eval_every`
iterations as in the ppo stage. The whole `BONDState` (policy, optimizer, anchor, anchor
count) is checkpointed every `bond.checkpoint_every` iterations; rerunning the same command
resumes, bitwise.

Writes `<workdir>/bond/`: `ckpt/`, `final/` (policy params), `metrics.jsonl`, `tb/`, `bond.png`,
`summary.json` (initial/final held-out success and greedy success, final KL, effective N, ...).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import bon, losses, models, rollout
from rlhf_jax import sharding as shd
from rlhf_jax.checkpointing import Checkpointer, abstract_like
from rlhf_jax.pipelines import bon as bon_stage, common, rm as rm_stage
from rlhf_jax.steps import BONDState, completion_logprobs, create_bond_state, make_bond_step
from rlhf_jax.tasks.base import success
from rlhf_jax.utils import MetricsWriter, Progress, Timers, plot_metrics


def final_params_dir(workdir: str) -> str:
  return os.path.join(workdir, "bond", "final")


def make_ref_kl_fn(apply_fn, *, prompt_len: int):
  """`kl(ref_params, tokens, mask, completion_mask, logprobs) -> {kl/ref, kl/ref_k3}`: sequence-summed KL
  estimators of the sampling policy to π_ref on its own samples (means over rows), as the ppo step reports."""

  def kl(ref_params, tokens_BxS, mask_BxS, cmask_BxG, logprobs_BxG):
    ref_lp = completion_logprobs(apply_fn, ref_params, tokens_BxS, mask_BxS, prompt_len)
    cmask = cmask_BxG.astype(jnp.float32)
    k1 = losses.masked_sum(losses.kl_penalty(logprobs_BxG, ref_lp, kind="k1"), cmask, 1)
    k3 = losses.masked_sum(losses.kl_penalty(logprobs_BxG, ref_lp, kind="k3"), cmask, 1)
    return {"kl/ref": jnp.mean(k1), "kl/ref_k3": jnp.mean(k3), "response/length": jnp.mean(jnp.sum(cmask, 1))}

  return kl


def quantile_metrics(policy_r_P: np.ndarray, anchor_r_PxK: np.ndarray, ref_r_PxM: np.ndarray) -> dict[str, float]:
  """The policy's and the anchor's reward mid-quantiles among the reference samples, and their effective N."""
  m = ref_r_PxM.shape[1]
  q_pol = np.asarray(bon.reward_quantile(policy_r_P, ref_r_PxM))
  k = anchor_r_PxK.shape[1]
  q_anc = np.asarray(bon.reward_quantile(anchor_r_PxK.reshape(-1), np.repeat(ref_r_PxM, k, axis=0)))
  return {"quantile/policy_vs_ref": float(q_pol.mean()),
          "quantile/log_policy_vs_ref": float(np.log(np.maximum(q_pol, 0.5 / m)).mean()),
          "quantile/anchor_vs_ref": float(q_anc.mean()),
          "effective_n/policy": float(bon.effective_n(q_pol.mean())),
          "effective_n/anchor": float(bon.effective_n(q_anc.mean()))}


def run_bond(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, "bond")
  common.check_provenance(out_dir, config, "bond")
  # finished = final parameters *and* summary: a run stopped between the two redoes its end from the checkpoint
  if common.has_params(final_params_dir(workdir)) and os.path.exists(os.path.join(out_dir, "summary.json")):
    print(f"[bond] reusing the finished stage in {final_params_dir(workdir)}")
    with open(os.path.join(out_dir, "summary.json")) as f:
      return {"reused": True, **json.load(f)}
  bc = config.bond
  p_count, k, m = bc.prompts_per_iteration, bc.anchor_samples, bc.reference_samples
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len

  # --- mesh, models, data --------------------------------------------------------------
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  task = common.make_task(config, workdir)
  cfg, sft_params = rm_stage.load_sft_policy(config, workdir, mesh)
  score_fn = bon_stage.make_scorer(bc.reward_source, config, workdir, mesh, task, cfg)
  train = rollout.load_fitted(task, tok, "train", max_prompt_len=plen, stage="bond")
  held_out = rollout.load_fitted(task, tok, task.eval_split, max_prompt_len=plen, stage="bond")[:bc.eval_prompts]
  order = np.random.default_rng(config.seed + 7).permutation(len(train))

  # --- state: policy and anchor from SFT ---------------------------------------------------
  tx = common.optimizer(bc, optimizer_section=bc.optimizer, total_steps=bc.iterations)
  rng = jax.random.PRNGKey(config.seed + 8)
  copy = lambda r, tree: jax.tree.map(jnp.copy, tree)  # the state owns its buffers (it is donated)
  policy, policy_sh = common.create_state(copy, models.logical_axes(cfg), tx, mesh, rng, sft_params)
  rep = shd.replicated(mesh)
  state_sh = BONDState(policy=policy_sh, anchor_params=policy_sh.params, anchor_updates=rep)
  state = jax.jit(create_bond_state, out_shardings=state_sh)(policy)
  ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), max_to_keep=config.checkpoint.max_to_keep,
                      save_interval_steps=bc.checkpoint_every, async_save=config.checkpoint.async_save)
  start_it = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(state, sharding=state_sh))
    start_it = int(meta["iteration"])
    print(f"[bond] resumed at iteration {start_it}")
  metrics_path = os.path.join(out_dir, "metrics.jsonl")
  common.drop_rows_after(metrics_path, start_it)

  # --- compiled pieces -------------------------------------------------------------------
  lm_apply = models.make_apply_fn(cfg)
  make = lambda num, t=1.0: rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=t, num_samples=num,
                                                 mesh=mesh)
  policy_sampler, anchor_sampler, ref_sampler = make(1), make(k), make(m)
  eval_sampler, greedy = make(bc.eval_samples), make(1, 0.0)
  update = jax.jit(make_bond_step(lm_apply, tx, prompt_len=plen, variant=bc.variant, beta=bc.beta, gamma=bc.gamma,
                                  eta=bc.eta, hard_anchor_every=bc.hard_anchor_every, n=bc.n, baseline=bc.baseline,
                                  kl_estimator="k3"),
                   in_shardings=(state_sh, None), out_shardings=(state_sh, rep), donate_argnums=0)
  ref_kl = jax.jit(make_ref_kl_fn(lm_apply, prompt_len=plen))

  def evaluate(params) -> dict[str, float]:
    if not held_out:
      return {}
    return rollout.evaluate_policy(task, eval_sampler, greedy, params, tok, held_out, batch_size=bc.rollout_batch,
                                   max_prompt_len=plen, rng=jax.random.PRNGKey(config.seed + 11), mesh=mesh,
                                   ks=sorted({1, bc.eval_samples}))

  # --- loop ------------------------------------------------------------------------------
  writer = MetricsWriter(out_dir, tensorboard=config.logging.tensorboard)
  timers = Timers()
  t0 = time.time()
  initial = {}
  if start_it == 0 and bc.eval_at_start:
    initial = evaluate(state.policy.params)
    writer.write(0, initial)
  elif start_it > 0:
    initial = common.first_eval_row(metrics_path)
  anchor_desc = f"hard copy every {bc.hard_anchor_every}" if bc.hard_anchor_every else f"EMA η={bc.eta}"
  print(f"[bond] {task.name}: {bc.variant} β={bc.beta} γ={bc.gamma} anchor {anchor_desc}, {p_count} prompts × "
        f"(1 policy + {k} anchor + {m} reference) samples, reward = {bc.reward_source}; held-out "
        f"({len(held_out)} prompts) success {initial.get('eval/success_rate', float('nan')):.3f}, greedy "
        f"{initial.get('eval/greedy_success', float('nan')):.3f}")
  progress = Progress(bc.iterations, desc=f"bond[{bc.variant}]", initial=start_it, quiet=not config.logging.progress)
  metrics, last_eval = {}, {}
  for it in range(start_it + 1, bc.iterations + 1):
    records = [train[int(order[((it - 1) * p_count + j) % len(order)])] for j in range(p_count)]
    key = common.fold(rng, it)
    with timers("rollout"):
      sample = lambda smp, params, i: rollout.sample(smp, params, tok, records, max_prompt_len=plen,
                                                     rng=jax.random.fold_in(key, i), mesh=mesh)
      ro, ro_a, ro_r = sample(policy_sampler, state.policy.params, 0), sample(anchor_sampler, state.anchor_params, 1), \
          sample(ref_sampler, sft_params, 2)
    with timers("score"):
      r_pol, r_anc, r_ref = score_fn(ro), score_fn(ro_a).reshape(p_count, k), score_fn(ro_r).reshape(p_count, m)
      truth = rollout.grade(task, ro.records, ro.texts, n=1)
      kl = ref_kl(sft_params, ro.out.tokens, ro.out.mask, ro.out.completion_mask, ro.out.completion_logprobs)
    with timers("update"):
      s = ro_a.out.tokens.shape[1]
      batch = {"tokens": ro.out.tokens, "mask": ro.out.mask, "completion_mask": ro.out.completion_mask,
               "rewards": rollout.shard_rows(r_pol, mesh),
               "anchor_tokens": ro_a.out.tokens.reshape(p_count, k, s),
               "anchor_mask": ro_a.out.mask.reshape(p_count, k, s),
               "anchor_completion_mask": ro_a.out.completion_mask.reshape(p_count, k, -1),
               "anchor_rewards": rollout.shard_rows(r_anc, mesh),
               "weights": rollout.shard_rows(np.ones((p_count,), np.float32), mesh)}
      state, metrics = update(state, batch)
      metrics = common.to_host({**metrics, **kl})
    metrics.update(quantile_metrics(r_pol, r_anc, r_ref))
    metrics.update({"reward/reference": float(r_ref.mean()), "true/score": float(truth.mean()),
                    "true/success_rate": float(success(truth).mean())})
    metrics.update(timers.summary(reset=True))
    if it % bc.eval_every == 0 or it == bc.iterations:
      with timers("eval"):
        last_eval = evaluate(state.policy.params)
      metrics.update(last_eval)
    writer.write(it, metrics)
    ckpt.save(it, state, meta={"iteration": it})
    progress.update(it, reward=metrics["reward/policy"], score=metrics["true/score"], kl=metrics["kl/ref"],
                    n_eff=metrics["effective_n/policy"],
                    **({"heldout": last_eval["eval/success_rate"]} if "eval/success_rate" in last_eval else {}))
  progress.close()
  ckpt.wait()
  ckpt.close()
  writer.close()

  common.save_params(final_params_dir(workdir), state.policy.params,
                     {"step": bc.iterations, "stage": "bond", "variant": bc.variant})
  plot_metrics(metrics_path,
               {"reward of samples": ["reward/policy", "reward/anchor", "reward/reference"],
                "grade of policy samples": ["true/score", "true/success_rate"],
                "held-out (T samples)": ["eval/success_rate", "eval/score"],
                "held-out greedy success": ["eval/greedy_success"],
                "KL (nats)": ["kl/ref", "kl/ref_k3", "kl/anchor"],
                "reward mid-quantile vs reference": ["quantile/policy_vs_ref", "quantile/anchor_vs_ref"],
                "effective N = q/(1 − q)": ["effective_n/policy", "effective_n/anchor"],
                "entropy (nats/token)": ["policy/entropy"],
                "loss terms": ["bond/fw_nll", "bond/bw_loss"], "anchor updates": ["anchor/updates"]},
               os.path.join(out_dir, "bond.png"), title=f"{bc.variant} on {task.name} (β={bc.beta}, {anchor_desc})")
  final = last_eval or initial
  summary = {
      "stage": "bond", "task": task.name, "variant": bc.variant, "beta": bc.beta, "eta": bc.eta, "gamma": bc.gamma,
      "hard_anchor_every": bc.hard_anchor_every, "reward_source": bc.reward_source, "iterations": bc.iterations,
      "heldout_prompts": len(held_out), "eval_samples": bc.eval_samples, "wall_s": time.time() - t0,
      "initial_success_rate": initial.get("eval/success_rate"), "final_success_rate": final.get("eval/success_rate"),
      "initial_greedy": initial.get("eval/greedy_success"), "final_greedy": final.get("eval/greedy_success"),
      "initial_score": initial.get("eval/score"), "final_score": final.get("eval/score"),
      "final_kl": metrics.get("kl/ref"), "final_kl_k3": metrics.get("kl/ref_k3"),
      "final_kl_anchor": metrics.get("kl/anchor"), "final_effective_n": metrics.get("effective_n/policy"),
      "final_anchor_effective_n": metrics.get("effective_n/anchor"), "anchor_updates": metrics.get("anchor/updates"),
  }
  common.write_json(os.path.join(out_dir, "summary.json"), summary)
  fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
  print(f"[bond] done in {summary['wall_s']:.0f} s: held-out success {fmt(summary['initial_success_rate'])} -> "
        f"{fmt(summary['final_success_rate'])}, greedy {fmt(summary['initial_greedy'])} -> "
        f"{fmt(summary['final_greedy'])}, KL(π‖ref) {fmt(summary['final_kl'])}")
  return summary
