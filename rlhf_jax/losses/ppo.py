"""PPO clipped policy surrogate and clipped value loss (ALGORITHMS §3.4)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common


def _check_btx(arrays_and_names):
  (first, first_name) = arrays_and_names[0]
  common.check_ndim(first, 2, first_name)
  for x, name in arrays_and_names[1:]:
    common.check_same_shape(first, first_name, x, name)


def ppo_policy_loss(logprobs,
                    old_logprobs,
                    advantages,
                    mask,
                    *,
                    clip_eps: float,
                    clip_eps_high: Optional[float] = None,
                    dual_clip: Optional[float] = None,
                    loss_agg: str = "seq_mean_token_mean",
                    weights=None):
  """PPO clipped surrogate, per token, aggregated over the mask.

    ρ_t = exp(log π_θ(y_t) − log π_old(y_t))
    ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε_high))       (Schulman 2017)
    dual clip (Ye et al. 2020), for A_t < 0 only:  ℓ_t = min(ℓ_t, −c A_t), c > 1

  Then `loss_agg` reduces ℓ (see `common.aggregate_loss`): "seq_mean_token_mean"
  (per-sequence token mean, then weighted mean over sequences; OpenRLHF/PF-PPO)
  or "token_mean" (weighted mean over all valid tokens).

  `old_logprobs` and `advantages` are rollout constants: they pass through
  `stop_gradient` here.

  Args:
    logprobs: [B, T] log π_θ of the sampled tokens (differentiated).
    old_logprobs: [B, T] log π_old at rollout time.
    advantages: [B, T] advantages (already whitened if desired).
    mask: [B, T] response mask.
    clip_eps: ε (lower clip; also the upper clip unless `clip_eps_high`).
    clip_eps_high: optional ε_high for an asymmetric clip range.
    dual_clip: optional c > 1 for dual clipping of negative advantages.
    loss_agg: "seq_mean_token_mean" or "token_mean".
    weights: optional [B] per-sample weights (filtration); 0 drops a sample.

  Returns:
    (loss, metrics) with 'policy/loss', 'policy/clip_frac' (fraction of tokens
    whose clipped branch is active), 'policy/approx_kl' (k3 estimate of
    KL(π_old‖π_θ) = E[ρ − 1 − log ρ]), 'policy/ratio_mean', 'policy/ratio_max'
    and, with dual clip, 'policy/dual_clip_frac'. Metrics are weighted by
    mask·weights.
  """
  _check_btx([(logprobs, "logprobs"), (old_logprobs, "old_logprobs"),
              (advantages, "advantages"), (mask, "mask")])
  common.check_loss_agg(loss_agg)
  common.check_weights(weights, jnp.shape(logprobs)[0])
  if clip_eps is None or (common.is_number(clip_eps) and clip_eps < 0):
    raise ValueError(f"`clip_eps` must be >= 0, got {clip_eps}.")
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  if common.is_number(eps_high) and eps_high < 0:
    raise ValueError(f"`clip_eps_high` must be >= 0, got {clip_eps_high}.")
  if common.is_number(dual_clip) and dual_clip <= 1.0:
    raise ValueError(f"`dual_clip` must be > 1, got {dual_clip}.")

  old_logprobs = jax.lax.stop_gradient(old_logprobs)
  advantages = jax.lax.stop_gradient(advantages)
  valid = jnp.asarray(mask) != 0
  # Zero the log-ratio on padding so exp() cannot overflow into NaN gradients.
  log_ratio = jnp.where(valid, logprobs - old_logprobs, 0.0)
  ratio = jnp.exp(log_ratio)
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
  loss_unclipped = -advantages * ratio
  loss_clipped = -advantages * clipped_ratio
  loss_tok = jnp.maximum(loss_unclipped, loss_clipped)
  metric_w = common.token_weights(mask, weights)
  metrics = {}
  if dual_clip is not None:
    dual_bound = -dual_clip * advantages
    dual_active = (advantages < 0) & (loss_tok > dual_bound)
    loss_tok = jnp.where(advantages < 0, jnp.minimum(loss_tok, dual_bound),
                         loss_tok)
    metrics["policy/dual_clip_frac"] = common.masked_mean(
        dual_active.astype(jnp.float32), metric_w)
  loss = common.aggregate_loss(loss_tok, mask, loss_agg=loss_agg,
                               weights_B=weights)
  clipped = (loss_clipped > loss_unclipped).astype(jnp.float32)
  metrics.update({
      "policy/loss": loss,
      "policy/clip_frac": common.masked_mean(clipped, metric_w),
      "policy/approx_kl": common.masked_mean(ratio - 1.0 - log_ratio, metric_w),
      "policy/ratio_mean": common.masked_mean(ratio, metric_w),
      "policy/ratio_max": common.masked_max(ratio, metric_w),
  })
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def value_loss(values,
               old_values,
               returns,
               mask,
               *,
               clip_eps: Optional[float],
               loss_agg: str = "seq_mean_token_mean",
               weights=None):
  """Clipped value loss (OpenRLHF / PPO2 style).

    V_clip = V_old + clip(V − V_old, −ε, ε)
    ℓ_t = 0.5 · max((V_clip − G)², (V − G)²)        (ε = None: 0.5 (V − G)²)

  reduced with `loss_agg` like `ppo_policy_loss`. `old_values` and `returns`
  pass through `stop_gradient`.

  Args:
    values: [B, T] current value predictions (differentiated).
    old_values: [B, T] values at rollout time.
    returns: [B, T] value targets G (e.g. from `gae`).
    mask: [B, T] response mask.
    clip_eps: ε, or None for an unclipped loss.
    loss_agg: "seq_mean_token_mean" or "token_mean".
    weights: optional [B] per-sample weights.

  Returns:
    (loss, metrics) with 'value/loss', 'value/clip_frac' (fraction of tokens
    where the clipped branch is the larger one), 'value/error' (mean (V − G)²),
    'value/mean' (mean V).
  """
  _check_btx([(values, "values"), (old_values, "old_values"),
              (returns, "returns"), (mask, "mask")])
  common.check_loss_agg(loss_agg)
  common.check_weights(weights, jnp.shape(values)[0])
  if common.is_number(clip_eps) and clip_eps < 0:
    raise ValueError(f"`clip_eps` must be >= 0 or None, got {clip_eps}.")
  old_values = jax.lax.stop_gradient(old_values)
  returns = jax.lax.stop_gradient(returns)
  sq_unclipped = jnp.square(values - returns)
  if clip_eps is None:
    loss_tok = 0.5 * sq_unclipped
    clipped = jnp.zeros_like(sq_unclipped)
  else:
    v_clip = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    sq_clipped = jnp.square(v_clip - returns)
    loss_tok = 0.5 * jnp.maximum(sq_clipped, sq_unclipped)
    clipped = (sq_clipped > sq_unclipped).astype(jnp.float32)
  loss = common.aggregate_loss(loss_tok, mask, loss_agg=loss_agg,
                               weights_B=weights)
  metric_w = common.token_weights(mask, weights)
  metrics = {
      "value/loss": loss,
      "value/clip_frac": common.masked_mean(clipped, metric_w),
      "value/error": common.masked_mean(sq_unclipped, metric_w),
      "value/mean": common.masked_mean(values, metric_w),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
