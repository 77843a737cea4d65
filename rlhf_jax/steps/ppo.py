"""PPO for RLHF as jitted device computations: scoring, selection and the update.

One PPO iteration is three jitted calls after sampling:
  1. `score(...)`: reference log-probs, critic values and reward-model scores
     of the rollout (one forward each);
  2. `select_rows(...)`: policy filtration as a static-size gather of the kept
     samples (rank-based strategies keep a fixed count per prompt) or as
     per-sample weights (threshold and pow-k strategies);
  3. `step(state, batch)`: KL-shaped per-token rewards, GAE, masked whitening,
     then epochs × minibatches of clipped policy and value updates as nested
     `lax.scan`s, and the adaptive-KL controller update.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.losses import KLControllerState
from rlhf_jax.state import TrainState, apply_gradients
from rlhf_jax.steps.common import completion_logprobs, completion_values, sequence_scores

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
  actor: TrainState
  critic: TrainState
  kl: KLControllerState


def make_score_fn(actor_apply: Callable, critic_apply: Callable, reward_apply: Callable, *, prompt_len: int,
                  reward_mean: float = 0.0, reward_std: float = 1.0) -> Callable:
  """`score(ref_params, critic_params, rm_params, tokens, mask) -> dict` for a rollout.

  Returns ref_logprobs [R,G], old_values [R,G], raw RM rewards [R] and the
  normalised rewards (r − mean)/std with the RM's stored statistics.
  """

  def score(ref_params, critic_params, rm_params, tokens_RxS, mask_RxS):
    ref_lp = completion_logprobs(actor_apply, ref_params, tokens_RxS, mask_RxS, prompt_len)
    values = completion_values(critic_apply, critic_params, tokens_RxS, mask_RxS, prompt_len)
    raw = sequence_scores(reward_apply, rm_params, tokens_RxS, mask_RxS)
    return {"ref_logprobs": ref_lp, "old_values": values, "rm_rewards": raw,
            "scores": (raw - reward_mean) / reward_std}

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


def make_ppo_step(actor_apply: Callable, critic_apply: Callable, actor_tx: optax.GradientTransformation,
                  critic_tx: optax.GradientTransformation, *, prompt_len: int, clip_eps: float = 0.2,
                  value_clip_eps: Optional[float] = 0.2, gamma: float = 1.0, lam: float = 0.95,
                  kl_estimator: str = "k1", kl_target: Optional[float] = None, kl_horizon: float = 10_000.0,
                  epochs: int = 1, minibatches: int = 1, loss_agg: str = "seq_mean_token_mean",
                  reward_clip: Optional[float] = 10.0, entropy_coef: float = 0.0) -> Callable:
  """`step(state: PPOState, batch) -> (state, metrics)`: one PPO update on a scored rollout.

  batch (B rows): tokens, mask [B,S]; completion_mask, old_logprobs,
  ref_logprobs, old_values [B,G]; scores [B] (normalised sequence rewards);
  weights [B] (filtration weights, 0 = not trained on). B must be divisible
  by `minibatches`.
  """
  if epochs < 1 or minibatches < 1:
    raise ValueError(f"epochs={epochs} and minibatches={minibatches} must be >= 1")

  def policy_loss_fn(params, mb):
    lp, ent = completion_logprobs(actor_apply, params, mb["tokens"], mb["mask"], prompt_len, with_entropy=True)
    loss, metrics = losses.ppo_policy_loss(lp, mb["old_logprobs"], mb["advantages"], mb["completion_mask"],
                                           clip_eps=clip_eps, loss_agg=loss_agg, weights=mb["weights"])
    ent_mask = mb["completion_mask"] * (mb["weights"] > 0)[:, None]
    entropy = losses.masked_mean(ent, ent_mask)
    return loss - entropy_coef * entropy, {**metrics, "policy/loss": loss, "policy/entropy": entropy}

  def value_loss_fn(params, mb):
    values = completion_values(critic_apply, params, mb["tokens"], mb["mask"], prompt_len)
    loss, metrics = losses.value_loss(values, mb["old_values"], mb["returns"], mb["completion_mask"],
                                      clip_eps=value_clip_eps, loss_agg=loss_agg, weights=mb["weights"])
    return loss, {**metrics, "value/loss": loss}

  def minibatch_update(carry, mb):
    actor, critic = carry
    (_, pm), pg = jax.value_and_grad(policy_loss_fn, has_aux=True)(actor.params, mb)
    (_, vm), vg = jax.value_and_grad(value_loss_fn, has_aux=True)(critic.params, mb)
    actor = apply_gradients(actor, pg, actor_tx)
    critic = apply_gradients(critic, vg, critic_tx)
    return (actor, critic), {**pm, **vm, "policy/grad_norm": optax.global_norm(pg),
                             "value/grad_norm": optax.global_norm(vg)}

  def step(state: PPOState, batch: dict):
    b = batch["tokens"].shape[0]
    if b % minibatches:
      raise ValueError(f"batch of {b} rows is not divisible into {minibatches} minibatches")
    cmask = batch["completion_mask"].astype(jnp.float32)
    weights = batch["weights"].astype(jnp.float32)
    token_rewards, reward_metrics = losses.kl_shaped_rewards(
        batch["scores"], batch["old_logprobs"], batch["ref_logprobs"], cmask, kl_coef=state.kl.kl_coef,
        kind=kl_estimator, reward_clip=reward_clip)
    advantages, returns = losses.gae(token_rewards, batch["old_values"], cmask, gamma=gamma, lam=lam)
    train_mask = cmask * (weights > 0)[:, None]
    advantages = losses.masked_whiten(advantages, train_mask)
    data = {**batch, "advantages": jax.lax.stop_gradient(advantages), "returns": jax.lax.stop_gradient(returns),
            "completion_mask": cmask, "weights": weights}

    rng = jax.random.fold_in(state.actor.rng, state.actor.step)

    def epoch(carry, key):
      perm = jax.random.permutation(key, b)
      mbs = jax.tree.map(lambda x: jnp.take(x, perm, axis=0).reshape(minibatches, b // minibatches, *x.shape[1:]),
                         data)
      return jax.lax.scan(minibatch_update, carry, mbs)

    (actor, critic), mb_metrics = jax.lax.scan(epoch, (state.actor, state.critic), jax.random.split(rng, epochs))

    seq_kl = losses.masked_sum(losses.kl_penalty(batch["old_logprobs"], batch["ref_logprobs"], kind="k1"),
                               cmask, axis=1)
    sample_w = weights / jnp.maximum(jnp.sum(weights), 1e-8)
    mean_kl = jnp.sum(seq_kl * sample_w)
    kl_state = state.kl
    if kl_target is not None:
      kl_state = losses.adaptive_kl_update(kl_state, mean_kl, b, target=kl_target, horizon=kl_horizon)
    metrics = {k: jnp.mean(v) for k, v in mb_metrics.items()}
    metrics.update({
        "kl/ref": mean_kl,
        "kl/coef": state.kl.kl_coef,
        "reward/score": jnp.sum(batch["scores"] * sample_w),
        "reward/shaped_total": jnp.sum(jnp.sum(token_rewards, 1) * sample_w),
        "response/length": jnp.sum(jnp.sum(cmask, 1) * sample_w),
        "filter/kept_fraction": jnp.mean(weights > 0),
        "value/mean": losses.masked_mean(batch["old_values"], train_mask),
    })
    metrics.update({k: v for k, v in reward_metrics.items() if k not in metrics})
    return PPOState(actor=actor, critic=critic, kl=kl_state), metrics

  return step
