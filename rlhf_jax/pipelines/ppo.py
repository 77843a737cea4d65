"""PPO / PF-PPO stage on MiniCode: actor = SFT, reference = SFT (frozen), critic = RM, reward = RM.

Each iteration (ALGORITHMS.md §4.4), for P prompts and N samples per prompt:
  rollout   the jitted sampler draws N completions per prompt (prompt prefilled once)
  score     jitted forwards: reference log-probs, critic values, RM rewards (normalised)
  sandbox   the completions run against their hidden tests: the true score, used
            only for metrics (pass rate, RM–truth correlation, R²), never for training
            — except in the control experiment `ppo.reward_source="oracle"`, which
            trains on pass/fail + Gaussian noise to measure what a better RM would buy
  filter    `selection.filtration_weights(strategy)` per prompt; rank-based
            strategies are compacted to the kept rows (a static-size gather)
  update    one jitted PPO update: KL-shaped rewards, GAE, whitening, epochs ×
            minibatches of policy and value steps, adaptive KL

Writes `<workdir>/ppo/`: `final/` (actor params), `metrics.jsonl`, `tb/`,
`ppo.png` (reward, KL, pass@1 over iterations), `r2.png` (R² per strategy on
the SFT policy's rollouts), `summary.json`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, models, selection
from rlhf_jax import sharding as shd
from rlhf_jax.pipelines import analysis, common, rm as rm_stage, rollout, task_data
from rlhf_jax.sampling import Sampler, SamplingParams
from rlhf_jax.steps import PPOState, kept_per_prompt, make_ppo_score_fn, make_ppo_step, select_rows
from rlhf_jax.tokenizer import encode_prompts
from rlhf_jax.utils import MetricsWriter, Progress, Timers, plot_bars, plot_metrics


def final_params_dir(workdir: str) -> str:
  return os.path.join(workdir, "ppo", "final")


def _filtration_kwargs(config) -> dict[str, Any]:
  pc, strategy = config.ppo, config.algo.strategy
  kw: dict[str, Any] = {"strategy": strategy}
  if strategy in ("top", "top_random", "top_bottom"):
    if pc.threshold is None:
      raise ValueError(f"config.ppo.threshold is required for strategy {strategy!r}")
    kw["threshold"] = pc.threshold
  if strategy == "top_bottom":
    if pc.lower_threshold is None:
      raise ValueError("config.ppo.lower_threshold is required for strategy 'top_bottom'")
    kw["lower_threshold"] = pc.lower_threshold
  if strategy == "pow_k":
    kw["k"] = pc.pow_k
  return kw


def run_ppo(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, "ppo")
  pc, ac = config.ppo, config.algo
  p_count, n = pc.prompts_per_iteration, pc.samples_per_prompt
  keep = kept_per_prompt(ac.strategy, n)
  rows = p_count * (keep if keep is not None else n)
  if rows % ac.minibatches:
    raise ValueError(f"config.algo.minibatches={ac.minibatches} does not divide the {rows} rows an update trains on "
                     f"(prompts_per_iteration={p_count} × {keep or n} kept per prompt)")
  filt_kw = _filtration_kwargs(config)

  # --- mesh, models, data --------------------------------------------------------------
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  cfg, sft_params = rm_stage.load_sft_policy(config, workdir, mesh)
  rm_params, rm_meta = rm_stage.load_reward_model(config, workdir, mesh)
  reward_mean, reward_std = float(rm_meta["reward_mean"]), float(rm_meta["reward_std"])
  train = task_data.minicode_split(config, workdir, "train")
  test = task_data.minicode_split(config, workdir, "test")
  eval_problems = [test[i] for i in range(len(test) if not pc.eval_problems else min(pc.eval_problems, len(test)))]
  order = np.random.default_rng(config.seed + 2).permutation(len(train))
  plen = config.task.max_prompt_len

  # --- state: actor and reference from SFT, critic from the RM ---------------------------
  updates = pc.iterations * ac.epochs * ac.minibatches
  actor_tx = common.optimizer(pc, optimizer_section=pc.actor_optimizer, total_steps=updates)
  critic_tx = common.optimizer(pc, optimizer_section=pc.critic_optimizer, total_steps=updates)
  rng = jax.random.PRNGKey(config.seed + 3)
  copy = lambda r, tree: jax.tree.map(jnp.copy, tree)  # the states own their buffers (they are donated)
  actor, actor_sh = common.create_state(copy, models.logical_axes(cfg), actor_tx, mesh, rng, sft_params)
  critic, critic_sh = common.create_state(copy, models.logical_axes(cfg, head="scalar"), critic_tx, mesh, rng,
                                          rm_params)
  state = PPOState(actor=actor, critic=critic, kl=losses.init_kl_controller(ac.kl_coef))
  rep = shd.replicated(mesh)
  state_sh = PPOState(actor=actor_sh, critic=critic_sh, kl=jax.tree.map(lambda _: rep, state.kl))

  # --- compiled pieces -------------------------------------------------------------------
  lm_apply, scalar_apply = models.make_apply_fn(cfg), models.make_apply_fn(cfg, head="scalar")
  sampler = Sampler(cfg, SamplingParams(max_new_tokens=config.task.max_response_len,
                                        temperature=config.sampling.temperature, top_k=config.sampling.top_k,
                                        top_p=config.sampling.top_p, num_samples=n),
                    eos_id=tok.eos_id, pad_id=tok.pad_id, mesh=mesh)
  greedy = Sampler(cfg, SamplingParams(max_new_tokens=config.task.max_response_len, temperature=0.0),
                   eos_id=tok.eos_id, pad_id=tok.pad_id, mesh=mesh)
  score = jax.jit(make_ppo_score_fn(lm_apply, scalar_apply, scalar_apply, prompt_len=plen,
                                    reward_mean=reward_mean, reward_std=reward_std))

  @jax.jit
  def filter_batch(batch, scores_PxN, key):
    weights = selection.filtration_weights(scores_PxN, key=key, **filt_kw)
    return select_rows(batch, weights, keep=keep), weights

  update = jax.jit(make_ppo_step(lm_apply, scalar_apply, actor_tx, critic_tx, prompt_len=plen, clip_eps=ac.clip_eps,
                                 value_clip_eps=ac.value_clip_eps, gamma=ac.gamma, lam=ac.lam,
                                 kl_estimator=ac.kl_estimator, kl_target=ac.kl_target, kl_horizon=ac.kl_horizon,
                                 epochs=ac.epochs, minibatches=ac.minibatches, loss_agg=ac.loss_agg,
                                 reward_clip=ac.reward_clip, entropy_coef=pc.entropy_coef),
                   in_shardings=(state_sh, None), out_shardings=(state_sh, rep), donate_argnums=0)

  def pass_at_1(params) -> float:
    return rollout.greedy_pass_at_1(greedy, params, tok, eval_problems, batch_size=pc.rollout_batch,
                                    max_prompt_len=plen, mesh=mesh)

  # --- loop ------------------------------------------------------------------------------
  writer = MetricsWriter(out_dir, tensorboard=config.logging.tensorboard)
  timers = Timers()
  t0 = time.time()
  sft_pass = pass_at_1(state.actor.params) if pc.eval_at_start else float("nan")
  if pc.eval_at_start:
    writer.write(0, {"eval/pass@1": sft_pass})
  start = f"SFT greedy pass@1 {sft_pass:.3f}" if pc.eval_at_start else "no evaluation at start"
  print(f"[ppo] strategy {ac.strategy}: {p_count} prompts × {n} samples, update on {rows} rows; {start} "
        f"({len(eval_problems)} test problems)")
  progress = Progress(pc.iterations, desc=f"ppo[{ac.strategy}]", quiet=not config.logging.progress)
  r2_first = None
  for it in range(1, pc.iterations + 1):
    idx = [int(order[((it - 1) * p_count + j) % len(order)]) for j in range(p_count)]
    problems = [train[i] for i in idx]
    key = common.fold(rng, it)
    with timers("rollout"):
      pt, pm = shd.shard_batch(encode_prompts(tok, [p["prompt"] for p in problems], plen), mesh)
      out = sampler(state.actor.params, pt, pm, jax.random.fold_in(key, 0))
      jax.block_until_ready(out.tokens)
    with timers("score"):
      sc = score(sft_params, state.critic.params, rm_params, out.tokens, out.mask)
      jax.block_until_ready(sc)
    with timers("sandbox"):
      toks, cmask = jax.device_get((out.completion_tokens, out.completion_mask))
      texts = [tok.decode(t[m > 0]) for t, m in zip(toks, cmask)]
      passed = rollout.grade_minicode(problems, texts, n=n)
    if pc.reward_source == "oracle":  # control experiment: train on the test outcome + noise, not the RM
      noise = np.random.default_rng([config.seed, it]).normal(0.0, pc.oracle_noise, passed.shape)
      oracle = jnp.asarray(passed + noise, jnp.float32)
      sc = {**sc, "rm_rewards": oracle, "scores": oracle}
    with timers("update"):
      batch = {"tokens": out.tokens, "mask": out.mask, "completion_mask": out.completion_mask,
               "old_logprobs": out.completion_logprobs, "ref_logprobs": sc["ref_logprobs"],
               "old_values": sc["old_values"], "scores": sc["scores"]}
      scores_PxN = sc["scores"].reshape(p_count, n)
      fkey = jax.random.fold_in(key, 1)
      batch, weights_PxN = filter_batch(batch, scores_PxN, fkey)
      state, metrics = update(state, batch)
      metrics = common.to_host(metrics)
    # host-side diagnostics: RM reward vs the sandbox's truth, on all and on kept samples
    rewards = np.asarray(sc["rm_rewards"]).reshape(p_count, n)
    truth = passed.reshape(p_count, n)
    weights = np.asarray(weights_PxN)  # the same weights the update used
    diag = analysis.r2_diagnostics(rewards, truth, weights, bins=pc.r2_bins)
    if r2_first is None:
      r2_first = analysis.r2_table(rewards, truth, bins=pc.r2_bins, key=fkey)
    metrics.update(diag)
    metrics.update({"true/pass_rate": float(truth.mean()),
                    "true/pass_rate_kept": float((truth * weights).sum() / max(weights.sum(), 1e-8))})
    metrics.update(timers.summary(reset=True))
    if it % pc.eval_every == 0 or it == pc.iterations:
      metrics["eval/pass@1"] = pass_at_1(state.actor.params)
    writer.write(it, metrics)
    progress.update(it, reward=metrics["reward/score"], kl=metrics["kl/ref"], pass_rate=metrics["true/pass_rate"],
                    **({"pass@1": metrics["eval/pass@1"]} if "eval/pass@1" in metrics else {}))
  progress.close()
  writer.close()

  common.save_params(final_params_dir(workdir), state.actor.params,
                     {"step": pc.iterations, "stage": "ppo", "strategy": ac.strategy})
  final_pass = metrics.get("eval/pass@1", float("nan"))
  plot_metrics(os.path.join(out_dir, "metrics.jsonl"),
               {"RM reward (normalised)": ["reward/score"], "KL to reference": ["kl/ref"],
                "greedy pass@1 (test)": ["eval/pass@1"], "true pass rate of samples": ["true/pass_rate",
                                                                                       "true/pass_rate_kept"],
                "R² (kept samples)": ["filter/r2", "filter/r2_binned"], "entropy": ["policy/entropy"]},
               os.path.join(out_dir, "ppo.png"), title=f"PF-PPO ({ac.strategy})")
  if r2_first:
    plot_bars({k: v["r2_binned"] for k, v in r2_first.items()}, os.path.join(out_dir, "r2.png"),
              title="binned R² of RM reward vs. pass, per strategy (first rollout)", ylabel="R²")
  summary = {"strategy": ac.strategy, "reward_source": pc.reward_source, "sft_pass@1": sft_pass,
             "final_pass@1": final_pass, "iterations": pc.iterations, "wall_s": time.time() - t0,
             "r2_first_rollout": r2_first}
  common.write_json(os.path.join(out_dir, "summary.json"), summary)
  print(f"[ppo] done: greedy pass@1 {sft_pass:.3f} (SFT) -> {final_pass:.3f} in {summary['wall_s']:.0f} s"
        if pc.eval_at_start else f"[ppo] done: greedy pass@1 {final_pass:.3f} in {summary['wall_s']:.0f} s")
  return summary
