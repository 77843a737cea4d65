"""The RL stages `ppo` and `grpo`: one loop for PPO/PF-PPO (GAE + critic) and GRPO/RLOO/REINFORCE (no critic).

Each iteration (ALGORITHMS.md §4.4), for P prompts and N samples per prompt of any task:
  rollout   the shared rollout path draws N completions per prompt at temperature T
  score     one fused jitted call: reference log-probs, critic values ("gae"), RM rewards (reward_source "rm")
  grade     the task's grader on this host's completions: the true score, used for metrics
            (success rate, RM–truth correlation, R²) — and as the reward only with
            reward_source "task" (optionally + noise: a controlled mechanism test)
  prepare   group advantages over all N samples (critic-free), filtration weights
            (`algo.strategy`), a static gather of the kept rows for rank-based strategies
  update    one jitted update: epochs × minibatches, adaptive KL

Every `ppo.eval_every` iterations (and before the first) the policy is measured on a
fixed held-out prompt set of the task's eval split: mean grade and success rate of
T-samples, pass@k, greedy success, length and the share of distinct completions.
The whole RL state (actor, critic, KL controller; the data position and loop RNG are
functions of the iteration) is checkpointed every `ppo.checkpoint_every` iterations;
rerunning the same command continues where it stopped, bitwise.

Writes `<workdir>/<stage>/`: `ckpt/`, `final/` (actor params), `metrics.jsonl`, `tb/`,
`<stage>.png` (reward, success, KL, entropy, length over iterations), `r2.png`
(R² per strategy on the first rollout, when the reward is noisy or learned),
`summary.json` (initial/final held-out success rate and greedy success, …).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, models, rollout
from rlhf_jax import sharding as shd
from rlhf_jax.checkpointing import Checkpointer, abstract_like
from rlhf_jax.pipelines import am as am_stage, analysis, common, rm as rm_stage
from rlhf_jax.steps import PPOState, critic_from_reward_model, make_ppo_step, make_prepare_fn, \
    make_ppo_score_fn
from rlhf_jax.utils import MetricsWriter, Progress, Timers, plot_bars, plot_metrics
from rlhf_jax.utils.divergence import NonFiniteGuard
from rlhf_jax.utils.preemption import PreemptionGuard


def final_params_dir(workdir: str, stage: str = "ppo") -> str:
  return os.path.join(workdir, stage, "final")


def _filtration_kwargs(config) -> dict[str, Any]:
  pc, strategy = config.ppo, config.algo.strategy
  kw: dict[str, Any] = {}
  if strategy in ("top", "top_random", "top_bottom"):
    kw["threshold"] = pc.threshold
  if strategy == "top_bottom":
    kw["lower_threshold"] = pc.lower_threshold
  if strategy == "pow_k":
    kw["k"] = pc.pow_k
  return kw


def noisy_reward(scores: np.ndarray, *, std: float, shape: str, rng: np.random.Generator) -> np.ndarray:
  """Task grade + noise: "constant" std, or "midrange" std·(1 − |2s − 1|), largest at s = 0.5 (§4.10)."""
  if std == 0:
    return scores.astype(np.float32)
  scale = std * (1.0 - np.abs(2.0 * scores - 1.0)) if shape == "midrange" else np.full_like(scores, std)
  return (scores + scale * rng.standard_normal(scores.shape)).astype(np.float32)


def run_ppo(config, workdir: str) -> dict[str, Any]:
  return run_rl(config, workdir, stage="ppo")


def run_rl(config, workdir: str, *, stage: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, stage)
  common.check_provenance(out_dir, config, "ppo_am" if config.ppo.reward_source == "am" else "ppo")
  pc, ac = config.ppo, config.algo
  # finished = final parameters *and* summary: a run stopped between the two redoes its end from the checkpoint
  if common.has_params(final_params_dir(workdir, stage)) and os.path.exists(os.path.join(out_dir, "summary.json")):
    print(f"[{stage}] reusing the finished stage in {final_params_dir(workdir, stage)}")
    import json  # pylint: disable=import-outside-toplevel
    with open(os.path.join(out_dir, "summary.json")) as f:
      return {"reused": True, **json.load(f)}
  p_count, n, advantage = pc.prompts_per_iteration, pc.samples_per_prompt, ac.advantage
  use_rm = pc.reward_source in ("rm", "am")  # "am": the advantage model (am stage) is scored like the RM
  temperature = config.sampling.temperature
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len

  # --- mesh, models, data --------------------------------------------------------------
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  task = common.make_task(config, workdir)
  cfg, sft_params = rm_stage.load_sft_policy(config, workdir, mesh)
  rm_params, reward_mean, reward_std, rm_cfg = None, 0.0, 1.0, cfg
  reward_stage = am_stage if pc.reward_source == "am" else rm_stage
  external_rm = bool(config.rm.get("hf_path")) and pc.reward_source == "rm"  # statistics below, once sampled
  if external_rm:
    rm_cfg, rm_params = common.load_external_reward_model(config, cfg, mesh)
  elif use_rm or advantage == "gae":
    if common.has_params(reward_stage.final_params_dir(workdir)):
      load = am_stage.load_advantage_model if reward_stage is am_stage else rm_stage.load_reward_model
      rm_params, rm_meta = load(config, workdir, mesh)
      reward_mean, reward_std = float(rm_meta["reward_mean"]), float(rm_meta["reward_std"])
    elif use_rm:
      raise FileNotFoundError(f"ppo.reward_source={pc.reward_source!r} needs a trained model in "
                              f"{reward_stage.final_params_dir(workdir)}: run the {pc.reward_source} stage first")
  train = rollout.load_fitted(task, tok, "train", max_prompt_len=plen, stage=stage)
  held_out = rollout.load_fitted(task, tok, task.eval_split, max_prompt_len=plen, stage=stage)[:pc.eval_prompts]
  if external_rm:  # normalised by its scores of SFT samples of the held-out prompts (the evaluation sampler's)
    stats_sampler = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=temperature,
                                         num_samples=pc.eval_samples, mesh=mesh)
    reward_mean, reward_std = common.reward_statistics(config, rm_cfg, rm_params, stats_sampler, sft_params, tok,
                                                       held_out, batch_size=pc.rollout_batch,
                                                       rng=jax.random.PRNGKey(config.seed + 13), mesh=mesh)
    print(f"[{stage}] reward model {config.rm.hf_path}: score mean {reward_mean:.4g}, std {reward_std:.4g} on "
          f"{len(held_out)} x {pc.eval_samples} SFT samples of held-out prompts")
  # Per-task metrics, forgetting (sr.expert_eval) and Selective Rehearsal (sr.coef): pipelines/am.py.
  extras = am_stage.RLExtras(config, task, tok, cfg, mesh, held_out=held_out,
                             am_params=rm_params if pc.reward_source == "am" else None)
  # Each host samples and grades its own slice of every iteration's prompts.
  order = np.random.default_rng(config.seed + 2).permutation(len(train))

  # --- state: actor and reference from SFT; critic from the RM (normalised) or the SFT backbone ----
  updates = pc.iterations * ac.epochs * ac.minibatches
  # LoRA (model.lora_rank): the actor is {"base", "lora"}, only adapters train; the reference is its base.
  actor_tx = common.policy_optimizer(config, common.optimizer(pc, optimizer_section=pc.actor_optimizer,
                                                              total_steps=updates))
  rng = jax.random.PRNGKey(config.seed + 3)
  copy = lambda r, tree: jax.tree.map(jnp.copy, tree)  # the states own their buffers (they are donated)
  if common.lora_rank(config):
    actor, actor_sh = common.policy_state(config, cfg, actor_tx, mesh, rng, sft_params)
  else:
    actor, actor_sh = common.create_state(copy, models.logical_axes(cfg), actor_tx, mesh, rng, sft_params)
  rep = shd.replicated(mesh)
  critic = critic_sh = critic_tx = scalar_apply = None
  if advantage == "gae":
    critic_tx = common.optimizer(pc, optimizer_section=pc.critic_optimizer, total_steps=updates)
    # an external RM's shape may differ: critic from SFT then
    if rm_params is not None and not external_rm and pc.critic_init == "rm":
      init_critic = lambda r, p: critic_from_reward_model(p, reward_mean=reward_mean, reward_std=reward_std)
      critic, critic_sh = common.create_state(init_critic, models.logical_axes(cfg, head="scalar"), critic_tx,
                                              mesh, rng, rm_params)
    else:
      critic, critic_sh = common.create_state(lambda r, p: models.lm_to_scalar_params(p, cfg, r),
                                              models.logical_axes(cfg, head="scalar"), critic_tx, mesh, rng,
                                              sft_params)
    scalar_apply = models.make_apply_fn(cfg, head="scalar")
  if common.lora_rank(config):
    sft_params = None  # the reference is the actor's frozen base (`common.reference_of`): no second copy
  # Born replicated on the mesh, as the step returns it: an uncommitted scalar here would give the step's
  # second call another input type and a second compilation of the whole update.
  kl_sh = jax.tree.map(lambda _: rep, jax.eval_shape(losses.init_kl_controller, ac.kl_coef))
  kl = jax.jit(lambda: losses.init_kl_controller(ac.kl_coef), out_shardings=kl_sh)()
  state = PPOState(actor=actor, critic=critic, kl=kl)
  state_sh = PPOState(actor=actor_sh, critic=critic_sh, kl=kl_sh)

  ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), max_to_keep=config.checkpoint.max_to_keep,
                      save_interval_steps=pc.checkpoint_every, async_save=config.checkpoint.async_save)
  start_it = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(state, sharding=state_sh))
    start_it = int(meta["iteration"])
    print(f"[{stage}] resumed at iteration {start_it}")
  common.drop_rows_after(os.path.join(out_dir, "metrics.jsonl"), start_it)

  # --- compiled pieces -------------------------------------------------------------------
  lm_apply = common.policy_apply_fn(config, cfg)  # over {"base", "lora"} with LoRA; samplers get merged params
  sampler = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=temperature, num_samples=n, mesh=mesh)
  eval_sampler = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=temperature,
                                      num_samples=pc.eval_samples, mesh=mesh)
  greedy = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=0.0, mesh=mesh)
  score = jax.jit(make_ppo_score_fn(lm_apply, prompt_len=plen, temperature=temperature, critic_apply=scalar_apply,
                                    reward_apply=models.make_apply_fn(rm_cfg, head="scalar") if use_rm else None,
                                    reward_mean=reward_mean, reward_std=reward_std,
                                    logprob_chunk=pc.logprob_chunk or None,
                                    microbatch=common.microbatch(config)))
  prepare = jax.jit(make_prepare_fn(advantage=advantage, strategy=ac.strategy, n=n, **_filtration_kwargs(config)))
  update = jax.jit(make_ppo_step(lm_apply, actor_tx, prompt_len=plen, advantage=advantage, critic_apply=scalar_apply,
                                 critic_tx=critic_tx, temperature=temperature, clip_eps=ac.clip_eps,
                                 value_clip_eps=ac.value_clip_eps, gamma=ac.gamma, lam=ac.lam,
                                 kl_estimator=ac.kl_estimator, kl_target=ac.kl_target, kl_horizon=ac.kl_horizon,
                                 epochs=ac.epochs, minibatches=ac.minibatches, loss_agg=ac.loss_agg,
                                 reward_clip=ac.reward_clip, entropy_coef=pc.entropy_coef,
                                 rehearsal_coef=extras.coef, logprob_chunk=pc.logprob_chunk or None,
                                 microbatch=common.microbatch(config)),
                   in_shardings=(state_sh, None), out_shardings=(state_sh, rep), donate_argnums=0)

  def evaluate(params) -> dict[str, float]:
    if not held_out:
      return {}
    params = common.plain_params(config, params)
    out = rollout.evaluate_policy(task, eval_sampler, greedy, params, tok, held_out, batch_size=pc.rollout_batch,
                                  max_prompt_len=plen, rng=jax.random.PRNGKey(config.seed + 11), mesh=mesh,
                                  ks=sorted({1, pc.eval_samples}))
    return {**out, **extras.expert_metrics(params)}

  # --- loop ------------------------------------------------------------------------------
  writer = MetricsWriter(out_dir, tensorboard=config.logging.tensorboard)
  timers = Timers()
  t0 = time.time()
  initial = {}
  if start_it == 0 and pc.eval_at_start:
    initial = evaluate(state.actor.params)
    writer.write(0, initial)
  elif start_it > 0:
    initial = common.first_eval_row(os.path.join(out_dir, "metrics.jsonl"))
  reward_desc = f"the learned {pc.reward_source.upper()}" if use_rm else ("the task's grade" + (
      f" + {pc.reward_noise_shape} noise (std {pc.reward_noise})" if pc.reward_noise else ""))
  print(f"[{stage}] {task.name}: {advantage} advantages, strategy {ac.strategy}, {p_count} prompts × {n} samples at "
        f"T={temperature}, reward = {reward_desc}; held-out ({len(held_out)} prompts) success "
        f"{initial.get('eval/success_rate', float('nan')):.3f}, greedy {initial.get('eval/greedy_success', float('nan')):.3f}")
  progress = Progress(pc.iterations, desc=f"{stage}[{advantage},{ac.strategy}]", initial=start_it,
                      quiet=not config.logging.progress)
  nonfinite = NonFiniteGuard(pc.max_consecutive_skips, stage=stage,
                             kept=f"the checkpoints in {ckpt.directory} hold the last finite state")
  r2_first, metrics, last_eval = None, {}, {}
  local = rollout.host_rows(p_count, mesh)  # this host's prompts: its rows of the global batch
  # SIGTERM (preemption): checkpoint at the next iteration boundary, then exit 75; rerunning resumes
  with PreemptionGuard() as preemption:
    for it in range(start_it + 1, pc.iterations + 1):
      records_all = [train[int(order[((it - 1) * p_count + j) % len(order)])] for j in range(p_count)]
      records = records_all[local]
      key = common.fold(rng, it)
      with timers("rollout"):
        policy = common.plain_params(config, state.actor.params)  # LoRA merged for the sampler
        ro = rollout.sample(sampler, policy, tok, records, max_prompt_len=plen,
                            rng=jax.random.fold_in(key, 0), mesh=mesh)
      with timers("score"):
        ref_params = common.reference_of(config, state.actor.params, sft_params)  # LoRA: the actor's base
        sc = score(ref_params, state.critic.params if state.critic is not None else None, rm_params, ro.out.tokens,
                   ro.out.mask)
        jax.block_until_ready(sc)
      with timers("grade"):
        truth_local = rollout.grade(task, ro.records, ro.texts, n=n)  # host-local [P_local · N]
        # every host's grades [P · N] (multi-host: a small all-gather): rewards and metrics as on one process
        truth = rollout.all_rows(rollout.shard_rows(truth_local, mesh))
      if use_rm:
        train_scores = sc["rm_scores"]
        rewards_host = rollout.all_rows(sc["rm_rewards"])
      else:
        rewards_host = noisy_reward(truth, std=pc.reward_noise, shape=pc.reward_noise_shape,
                                    rng=np.random.default_rng([config.seed, it]))
        train_scores = rollout.shard_rows(rewards_host[local.start * n:local.stop * n], mesh)
      with timers("update"):
        batch = {"tokens": ro.out.tokens, "mask": ro.out.mask, "completion_mask": ro.out.completion_mask,
                 "old_logprobs": ro.out.completion_logprobs, "ref_logprobs": sc["ref_logprobs"]}
        if "old_values" in sc:
          batch["old_values"] = sc["old_values"]
        batch, weights_PxN = prepare(batch, train_scores.reshape(p_count, n), jax.random.fold_in(key, 1))
        rehearsal, sr_metrics = extras.rehearsal(policy, records, jax.random.fold_in(key, 2))
        if rehearsal is not None:  # after `prepare`: the rehearsal rows are not the rollout's (never filtered)
          batch = {**batch, "rehearsal": rehearsal}
        state, metrics = update(state, batch)
        metrics = common.to_host(metrics)
      # host-side diagnostics: the trained-on reward against the task's grade, on all and on kept samples
      rewards = rewards_host.reshape(-1, n)
      truth_PxN = truth.reshape(-1, n)
      weights = rollout.all_rows(weights_PxN)
      if use_rm or pc.reward_noise:
        metrics.update(analysis.r2_diagnostics(rewards, truth_PxN, weights, bins=pc.r2_bins))
        if r2_first is None:
          r2_first = analysis.r2_table(rewards, truth_PxN, bins=pc.r2_bins, key=jax.random.fold_in(key, 1))
      ok = (truth_PxN >= 1 - 1e-6).astype(np.float32)
      metrics.update({"true/score": float(truth_PxN.mean()), "true/success_rate": float(ok.mean()),
                      "true/score_kept": float((truth_PxN * weights).sum() / max(weights.sum(), 1e-8)),
                      "true/groups_with_contrast": float(np.mean(truth_PxN.max(1) > truth_PxN.min(1)))})
      trained_on = rollout.all_rows(train_scores).reshape(-1, n)
      metrics.update({**sr_metrics, **extras.iteration_metrics(records_all, trained_on, truth_PxN)})
      metrics.update(timers.summary(reset=True))
      if it % pc.eval_every == 0 or it == pc.iterations:
        with timers("eval"):
          last_eval = evaluate(state.actor.params)
        metrics.update(last_eval)
      writer.write(it, metrics)
      # an iteration whose policy updates were all non-finite counts as skipped
      nonfinite.update(float(metrics["policy/skipped"] >= 1.0), step=it)
      ckpt.save(it, state, meta={"iteration": it})
      if preemption.should_stop(it) and it < pc.iterations:
        ckpt.save(it, state, meta={"iteration": it}, force=True)
        ckpt.wait()
        preemption.exit(stage=stage, step=it, checkpoint=os.path.join(ckpt.directory, str(it)))
      progress.update(it, reward=metrics["reward/score"], score=metrics["true/score"], kl=metrics["kl/ref"],
                      **({"heldout": last_eval["eval/success_rate"]} if "eval/success_rate" in last_eval else {}))
  progress.close()
  ckpt.wait()
  ckpt.close()
  writer.close()

  final_params = common.plain_params(config, state.actor.params)  # LoRA merged
  common.save_params(final_params_dir(workdir, stage), final_params,
                     {"step": pc.iterations, "stage": stage, "advantage": advantage, "strategy": ac.strategy})
  common.export_hf(config, final_params, out_dir)  # <out_dir>/hf/ with model.hf_path
  plot_metrics(os.path.join(out_dir, "metrics.jsonl"),
               {"reward trained on": ["reward/score"],
                "grade of training samples": ["true/score", "true/success_rate"],
                "held-out (T samples)": ["eval/success_rate", "eval/score"],
                "held-out greedy success": ["eval/greedy_success"],
                "KL to reference (nats)": ["kl/ref", "kl/ref_k3"], "entropy (nats/token)": ["policy/entropy"],
                "response length (tokens)": ["response/length"], "R² (kept samples)": ["filter/r2", "filter/r2_binned"]},
               os.path.join(out_dir, f"{stage}.png"), title=f"{stage} on {task.name} ({advantage}, {ac.strategy})")
  extras.plot(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, f"{stage}_tasks.png"),
              title=f"{stage} on {task.name} (reward {pc.reward_source}, rehearsal λ={extras.coef:g})")
  if r2_first:
    plot_bars({k: v["r2_binned"] for k, v in r2_first.items()}, os.path.join(out_dir, "r2.png"),
              title="binned R² of reward vs grade, per strategy (first rollout)", ylabel="R²")
  final = last_eval or initial
  summary = {
      "stage": stage, "task": task.name, "advantage": advantage, "strategy": ac.strategy,
      "reward_source": pc.reward_source, "reward_noise": pc.reward_noise, "iterations": pc.iterations,
      "heldout_prompts": len(held_out), "eval_samples": pc.eval_samples, "wall_s": time.time() - t0,
      "initial_success_rate": initial.get("eval/success_rate"), "final_success_rate": final.get("eval/success_rate"),
      "initial_greedy": initial.get("eval/greedy_success"), "final_greedy": final.get("eval/greedy_success"),
      "initial_score": initial.get("eval/score"), "final_score": final.get("eval/score"),
      "final_kl": metrics.get("kl/ref"), "final_kl_k3": metrics.get("kl/ref_k3"), "r2_first_rollout": r2_first,
      "rehearsal_coef": extras.coef, **extras.summary(initial, final),
  }
  common.write_json(os.path.join(out_dir, "summary.json"), summary)
  fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
  print(f"[{stage}] done in {summary['wall_s']:.0f} s: held-out success (T={temperature}) "
        f"{fmt(summary['initial_success_rate'])} -> {fmt(summary['final_success_rate'])}, greedy "
        f"{fmt(summary['initial_greedy'])} -> {fmt(summary['final_greedy'])}")
  return summary
