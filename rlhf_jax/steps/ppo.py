"""PPO-style policy optimisation for every online algorithm: PPO (GAE + critic), GRPO, RLOO, REINFORCE.

One RL iteration after sampling is three jitted calls:
  1. `score(...)`: one fused call for the rollout's reference log-probs and, when
     present, critic values and reward-model scores;
  2. `prepare(...)`: critic-free group advantages (GRPO / RLOO / REINFORCE, over
     all N samples of each prompt), policy filtration weights (PF-PPO), and a
     static-size gather of the kept rows for rank-based strategies;
  3. `step(state, batch)`: for `advantage="gae"`, KL-shaped per-token rewards,
     GAE and masked whitening (weighted by the filtration weights) with a
     critic; for group advantages, the sequence advantage on every completion
     token and the KL as a loss term; then epochs × minibatches of clipped
     policy (and value) updates as nested `lax.scan`s, and the adaptive-KL
     controller update.

Log-probs everywhere are those of the sampled distribution softmax(logits / T)
(`temperature`), the same quantity the sampler reports, so the first
minibatch's importance ratio is 1.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses, selection
from rlhf_jax.losses import KLControllerState
from rlhf_jax.state import TrainState, apply_gradients_with_status
from rlhf_jax.steps.common import Microbatch, completion_logprobs, completion_values, map_rows, \
    rowwise_value_and_grad, sequence_scores
from rlhf_jax.steps.rehearsal import add_rehearsal_loss

ADVANTAGES = ("gae",) + losses.GROUP_ADVANTAGES

# Rank-based strategies keep a fixed number of samples per prompt, so the
# update can run on a compacted batch (PF-PPO Table 4: 2nm, not 5nm, passes).
_KEEP_PER_PROMPT = {"best_of_n": lambda n: 1, "best_random": lambda n: min(2, n), "best_worst": lambda n: min(2, n),
                    "none": lambda n: n}


def kept_per_prompt(strategy: str, n: int) -> Optional[int]:
  """Static number of samples a strategy keeps per prompt, None if it varies."""
  fn = _KEEP_PER_PROMPT.get(strategy)
  return None if fn is None else fn(n)


@flax.struct.dataclass
class PPOState:
  """actor, critic (None for critic-free advantages) and the KL controller."""
  actor: TrainState
  critic: Optional[TrainState]
  kl: KLControllerState


def critic_from_reward_model(rm_params: Any, *, reward_mean: float, reward_std: float) -> Any:
  """Critic initial parameters from an RM whose outputs are normalised as (r − mean) / std.

  The value head is the RM's head scaled by 1/std with its bias shifted, so the
  critic starts out predicting the normalised reward the PPO rewards use.
  """
  out = dict(rm_params)
  out["score_head"] = rm_params["score_head"] / reward_std
  out["score_bias"] = (rm_params["score_bias"] - reward_mean) / reward_std
  return out


def make_score_fn(actor_apply: Callable, *, prompt_len: int, temperature: float = 1.0,
                  critic_apply: Optional[Callable] = None, reward_apply: Optional[Callable] = None,
                  reward_mean: float = 0.0, reward_std: float = 1.0, logprob_chunk: Optional[int] = None,
                  microbatch: Microbatch = None) -> Callable:
  """`score(ref_params, critic_params, rm_params, tokens, mask) -> dict`: one fused call for a rollout.

  Returns `ref_logprobs` [R, G] (at `temperature`), `old_values` [R, G] when
  there is a critic, and `rm_rewards` [R] (raw) and `rm_scores` [R]
  ((r − mean) / std) when there is a reward model. Pass None for the params of
  what is absent. `microbatch`: run each forward that many rows at a time
  (`map_rows`: None, a number of rows or "auto"; same values).
  """

  def score(ref_params, critic_params, rm_params, tokens_RxS, mask_RxS):
    out = {"ref_logprobs": map_rows(
        lambda t, m: completion_logprobs(actor_apply, ref_params, t, m, prompt_len, temperature=temperature,
                                         chunk=logprob_chunk), microbatch, tokens_RxS, mask_RxS)}
    if critic_apply is not None:
      out["old_values"] = map_rows(lambda t, m: completion_values(critic_apply, critic_params, t, m, prompt_len),
                                   microbatch, tokens_RxS, mask_RxS)
    if reward_apply is not None:
      raw = map_rows(lambda t, m: sequence_scores(reward_apply, rm_params, t, m, read_from=prompt_len - 1), microbatch,
                     tokens_RxS, mask_RxS)
      out["rm_rewards"] = raw
      out["rm_scores"] = (raw - reward_mean) / reward_std
    return out

  return score


def select_rows(batch: dict, weights_PxN: jax.Array, *, keep: Optional[int]) -> dict:
  """Apply filtration: gather `keep` rows per prompt, or attach weights to all rows.

  Rows of `batch` are prompt-major (row p·N + n). With `keep` set, the kept
  rows (the `keep` largest weights of each prompt, ties to the lower index)
  form a [P·keep] batch; otherwise every row stays and `weights` scales it.
  """
  p, n = weights_PxN.shape
  if keep is None:
    return {**batch, "weights": weights_PxN.reshape(-1)}
  tie_break = -jnp.arange(n, dtype=jnp.float32) * 1e-6
  _, idx_PxK = jax.lax.top_k(weights_PxN + tie_break, keep)
  rows = (jnp.arange(p)[:, None] * n + idx_PxK).reshape(-1)
  out = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), batch)
  out["weights"] = jnp.take_along_axis(weights_PxN, idx_PxK, axis=1).reshape(-1)
  return out


def make_prepare_fn(*, advantage: str, strategy: str = "none", n: int, compact: bool = True,
                    **filtration_kwargs) -> Callable:
  """`prepare(batch, scores_PxN, key) -> (batch, weights_PxN)`, jittable.

  Adds `scores` [P·N] and, for critic-free advantages, the sequence
  `advantages` [P·N] computed over all N samples of each prompt (before
  filtration, so a filtered sample's baseline is still its whole group); then
  the filtration weights of `strategy` and, with `compact` and a rank-based
  strategy, the static-size gather of the kept rows.
  """
  if advantage not in ADVANTAGES:
    raise ValueError(f"advantage must be one of {ADVANTAGES}, got {advantage!r}")
  keep = kept_per_prompt(strategy, n) if compact else None

  def prepare(batch: dict, scores_PxN: jax.Array, key: jax.Array):
    batch = {**batch, "scores": scores_PxN.reshape(-1)}
    if advantage != "gae":
      batch["advantages"] = losses.group_advantages(scores_PxN, kind=advantage).reshape(-1)
    weights = selection.filtration_weights(scores_PxN, strategy=strategy, key=key, **filtration_kwargs)
    return select_rows(batch, weights, keep=keep), weights

  return prepare


def make_ppo_step(actor_apply: Callable, actor_tx: optax.GradientTransformation, *, prompt_len: int,
                  advantage: str = "gae", critic_apply: Optional[Callable] = None,
                  critic_tx: Optional[optax.GradientTransformation] = None, temperature: float = 1.0,
                  clip_eps: float = 0.2, value_clip_eps: Optional[float] = 0.2, gamma: float = 1.0, lam: float = 0.95,
                  kl_estimator: str = "k1", kl_in_reward: Optional[bool] = None, kl_target: Optional[float] = None,
                  kl_horizon: float = 10_000.0, epochs: int = 1, minibatches: int = 1,
                  loss_agg: str = "seq_mean_token_mean", reward_clip: Optional[float] = 10.0,
                  entropy_coef: float = 0.0, rehearsal_coef: float = 0.0,
                  logprob_chunk: Optional[int] = None, microbatch: Microbatch = None) -> Callable:
  """`step(state: PPOState, batch) -> (state, metrics)`: one policy update on a scored rollout.

  Args:
    actor_apply, actor_tx: the policy's apply_fn and optimizer.
    prompt_len: P; completions occupy slots [P, S) of `tokens`.
    advantage: "gae" (critic, KL-shaped token rewards, GAE, whitening) or a
      critic-free group estimator "grpo" / "rloo" / "reinforce" (the batch
      carries `advantages` [B] from `make_prepare_fn`; no critic state).
    critic_apply, critic_tx: the critic (required for "gae", unused otherwise).
    temperature: T of the sampled distribution softmax(logits / T).
    logprob_chunk: compute log-probs `chunk` positions at a time without the [B, G, V] float32 logits
      (`completion_logprobs(chunk=...)`; for 128k+ vocabularies).
    microbatch: rows per forward/backward inside a minibatch (gradient accumulation,
      `steps.common.rowwise_value_and_grad`): the same gradient, a smaller working set (faster on XLA:CPU at
      ~2k tokens a chunk); None = the whole minibatch at once, "auto" = that on CPU and the whole minibatch on
      accelerators (`steps.common.microbatch_rows`).
    kl_in_reward: KL to the reference as a per-token reward penalty (True,
      InstructGPT) or as a loss term on the k-estimator (False, GRPO); default
      True for "gae", False otherwise. Its coefficient is `state.kl.kl_coef`.
    rehearsal_coef: λ_R of Selective Rehearsal (a Python number): every minibatch's policy loss gains
      λ_R · NLL of the expert examples `batch["rehearsal"]` (`steps.rehearsal.add_rehearsal_loss`). 0 (default):
      `batch["rehearsal"]` is ignored and the step is bit for bit the one without rehearsal.
    Others: as `losses.ppo_policy_loss`, `losses.value_loss`, `losses.gae`,
      `losses.kl_shaped_rewards`, `losses.adaptive_kl_update`.

  batch (B rows): tokens, mask [B, S]; completion_mask, old_logprobs,
  ref_logprobs [B, G]; old_values [B, G] ("gae"); scores [B] (normalised
  sequence rewards); advantages [B] (group estimators); weights [B]
  (filtration weights; 0 = not trained on, fractional = reweighted);
  rehearsal (with rehearsal_coef > 0): a dict of tokens, mask, loss_mask [R, L] and weights [R] (the
  selection mask), not split into minibatches: every minibatch sees all of it.
  B must be divisible by `minibatches`.
  """
  if advantage not in ADVANTAGES:
    raise ValueError(f"advantage must be one of {ADVANTAGES}, got {advantage!r}")
  use_critic = advantage == "gae"
  if use_critic and (critic_apply is None or critic_tx is None):
    raise ValueError("advantage='gae' needs critic_apply and critic_tx")
  if epochs < 1 or minibatches < 1:
    raise ValueError(f"epochs={epochs} and minibatches={minibatches} must be >= 1")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  kl_in_reward = use_critic if kl_in_reward is None else kl_in_reward

  # Each loss is a per-row forward (`*_rows`) and a loss of its outputs that sums per-row terms with fixed
  # normalisers, so `rowwise_value_and_grad` can run the forward `microbatch` rows at a time.
  def policy_rows(params, mb):
    lp, ent = completion_logprobs(actor_apply, params, mb["tokens"], mb["mask"], prompt_len,
                                  temperature=temperature, with_entropy=True, chunk=logprob_chunk)
    # Without an entropy bonus the entropy is a metric only: no backward pass through it.
    return lp, ent if entropy_coef else jax.lax.stop_gradient(ent)

  def policy_loss_fn(outputs, mb, kl_coef):
    lp, ent = outputs
    loss, metrics = losses.ppo_policy_loss(lp, mb["old_logprobs"], mb["advantages"], mb["completion_mask"],
                                           clip_eps=clip_eps, loss_agg=loss_agg, weights=mb["weights"])
    ent_mask = mb["completion_mask"] * (mb["weights"] > 0)[:, None]
    entropy = losses.masked_mean(ent, ent_mask)
    total = loss - entropy_coef * entropy
    metrics = {**metrics, "policy/loss": loss, "policy/entropy": entropy}
    if not kl_in_reward:
      kl_tok = losses.kl_penalty(lp, mb["ref_logprobs"], kind=kl_estimator)
      kl_loss = losses.aggregate_loss(kl_tok, mb["completion_mask"], loss_agg=loss_agg, weights_B=mb["weights"])
      total = total + kl_coef * kl_loss
      metrics["policy/kl_loss"] = kl_loss
    return total, metrics

  def value_rows(params, mb):
    return completion_values(critic_apply, params, mb["tokens"], mb["mask"], prompt_len)

  def value_loss_fn(values, mb):
    loss, metrics = losses.value_loss(values, mb["old_values"], mb["returns"], mb["completion_mask"],
                                      clip_eps=value_clip_eps, loss_agg=loss_agg, weights=mb["weights"])
    return loss, {**metrics, "value/loss": loss}

  def minibatch_update(carry, mb, rehearsal=None):
    actor, critic, kl_coef = carry
    rehearsal_fn = None
    if rehearsal_coef:
      rehearsal_fn = lambda p: add_rehearsal_loss(0.0, actor_apply, p, rehearsal, coef=rehearsal_coef)  # noqa: E731
    (loss, metrics), pg = rowwise_value_and_grad(
        policy_rows, lambda out: policy_loss_fn(out, mb, kl_coef), actor.params, mb,
        fill=(mb["old_logprobs"], jnp.zeros_like(mb["old_logprobs"])), microbatch=microbatch, extra_fn=rehearsal_fn,
        layer_views=getattr(actor_apply, "layer_views", None))
    actor, metrics["policy/skipped"] = apply_gradients_with_status(actor, pg, actor_tx, loss=loss)
    metrics["policy/grad_norm"] = optax.global_norm(pg)
    if use_critic:
      (vloss, vm), vg = rowwise_value_and_grad(value_rows, lambda out: value_loss_fn(out, mb), critic.params, mb,
                                               fill=mb["old_values"], microbatch=microbatch,
                                               layer_views=getattr(critic_apply, "layer_views", None))
      critic, vm["value/skipped"] = apply_gradients_with_status(critic, vg, critic_tx, loss=vloss)
      metrics.update(vm)
      metrics["value/grad_norm"] = optax.global_norm(vg)
    return (actor, critic, kl_coef), metrics

  def step(state: PPOState, batch: dict):
    b = batch["tokens"].shape[0]
    if b % minibatches:
      raise ValueError(f"batch of {b} rows is not divisible into {minibatches} minibatches")
    cmask = batch["completion_mask"].astype(jnp.float32)
    weights = batch["weights"].astype(jnp.float32)
    weighted_mask = cmask * weights[:, None]  # fractional weights (pow_k) weight the whitening statistics too
    kl_coef = state.kl.kl_coef
    data = {k: v for k, v in batch.items() if k not in ("scores", "advantages", "rehearsal")}
    rehearsal = batch.get("rehearsal") if rehearsal_coef else None
    if rehearsal_coef and rehearsal is None:
      raise ValueError("rehearsal_coef > 0 needs `batch['rehearsal']` (tokens, mask, loss_mask, weights)")
    data.update(completion_mask=cmask, weights=weights)
    extra = {}
    if use_critic:
      token_rewards, reward_metrics = losses.kl_shaped_rewards(
          batch["scores"], batch["old_logprobs"], batch["ref_logprobs"], cmask,
          kl_coef=kl_coef if kl_in_reward else 0.0, kind=kl_estimator, reward_clip=reward_clip)
      adv, returns = losses.gae(token_rewards, batch["old_values"], cmask, gamma=gamma, lam=lam)
      adv = losses.masked_whiten(adv, weighted_mask)
      data["returns"] = jax.lax.stop_gradient(returns)
      extra["reward/shaped_total"] = jnp.sum(jnp.sum(token_rewards, 1) * weights) / jnp.maximum(jnp.sum(weights),
                                                                                                  1e-8)
      extra["value/mean"] = losses.masked_mean(batch["old_values"], weighted_mask)
      extra["reward/clip_frac"] = reward_metrics["reward/clip_frac"]
    else:
      if kl_in_reward:
        raise ValueError("group advantages take the KL as a loss term (kl_in_reward=False)")
      adv = batch["advantages"][:, None] * cmask
    data["advantages"] = jax.lax.stop_gradient(adv)

    rng = jax.random.fold_in(state.actor.rng, state.actor.step)

    def epoch(carry, key):
      perm = jax.random.permutation(key, b)
      mbs = jax.tree.map(lambda x: jnp.take(x, perm, axis=0).reshape(minibatches, b // minibatches, *x.shape[1:]),
                         data)
      return jax.lax.scan(lambda c, mb: minibatch_update(c, mb, rehearsal), carry, mbs)

    (actor, critic, _), mb_metrics = jax.lax.scan(epoch, (state.actor, state.critic, state.kl.kl_coef),
                                                  jax.random.split(rng, epochs))

    sample_w = weights / jnp.maximum(jnp.sum(weights), 1e-8)
    seq_kl = losses.masked_sum(losses.kl_penalty(batch["old_logprobs"], batch["ref_logprobs"], kind="k1"), cmask, 1)
    seq_k3 = losses.masked_sum(losses.kl_penalty(batch["old_logprobs"], batch["ref_logprobs"], kind="k3"), cmask, 1)
    mean_kl = jnp.sum(seq_kl * sample_w)
    kl_state = state.kl
    if kl_target is not None:
      kl_state = losses.adaptive_kl_update(kl_state, mean_kl, b, target=kl_target, horizon=kl_horizon)
    metrics = {k: jnp.mean(v) for k, v in mb_metrics.items()}
    metrics.update(extra)
    metrics.update({
        "kl/ref": mean_kl,
        "kl/ref_k3": jnp.sum(seq_k3 * sample_w),
        "kl/coef": state.kl.kl_coef,
        "reward/score": jnp.sum(batch["scores"] * sample_w),
        "response/length": jnp.sum(jnp.sum(cmask, 1) * sample_w),
        "filter/kept_fraction": jnp.mean(weights > 0),
    })
    if not use_critic:
      metrics["advantage/abs_mean"] = jnp.sum(jnp.abs(batch["advantages"]) * sample_w)
    return PPOState(actor=actor, critic=critic, kl=kl_state), metrics

  return step
