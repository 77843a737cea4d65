"""DPO and its cheap variants (IPO, hinge) on sequence log-probs (ALGORITHMS §8)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen_logps,
             policy_rejected_logps,
             ref_chosen_logps,
             ref_rejected_logps,
             *,
             beta: float,
             loss_type: str = "sigmoid",
             label_smoothing: float = 0.0,
             weights=None):
  """Direct preference optimisation losses, (weighted) batch mean.

  With h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)):
    sigmoid: −(1 − ε) log σ(βh) − ε log σ(−βh)   (DPO, Rafailov 2023; cDPO ε)
    ipo:     (h − 1/(2β))²                        (IPO, Azar 2023, τ = β)
    hinge:   max(0, 1 − βh)                       (SLiC / RSO)

  Reference log-probs are constants (`stop_gradient`). With `weights` w the
  reduction is Σ w·ℓ / Σ w (0 when Σ w = 0): a pair of weight 0 (padding, an
  invalid pair) changes neither the loss, its gradient nor the metrics.

  Args:
    policy_chosen_logps: [B] sequence log-probs log π(y_w|x) (differentiated).
    policy_rejected_logps: [B] log π(y_l|x).
    ref_chosen_logps: [B] log π_ref(y_w|x).
    ref_rejected_logps: [B] log π_ref(y_l|x).
    beta: β > 0.
    loss_type: "sigmoid", "ipo" or "hinge" (static).
    label_smoothing: ε ∈ [0, 0.5) for the sigmoid loss (cDPO).
    weights: optional [B] non-negative pair weights (a constant); None = 1.

  Returns:
    (loss, metrics): 'dpo/loss', 'rewards/chosen' (mean β(pc − rc)),
    'rewards/rejected', 'rewards/margin', 'rewards/accuracy' (chosen implicit
    reward strictly larger), 'dpo/logits' (mean βh).
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"`loss_type` must be one of {DPO_LOSS_TYPES}, got"
                     f" {loss_type!r}.")
  if common.is_number(beta) and beta <= 0:
    raise ValueError(f"`beta` must be > 0, got {beta}.")
  if common.is_number(label_smoothing) and not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"`label_smoothing` must be in [0, 0.5), got"
                     f" {label_smoothing}.")
  if (loss_type != "sigmoid" and
      (not common.is_number(label_smoothing) or label_smoothing != 0)):
    raise ValueError("`label_smoothing` only applies to loss_type='sigmoid'.")
  common.check_ndim(policy_chosen_logps, 1, "policy_chosen_logps")
  for x, name in ((policy_rejected_logps, "policy_rejected_logps"),
                  (ref_chosen_logps, "ref_chosen_logps"),
                  (ref_rejected_logps, "ref_rejected_logps")):
    common.check_same_shape(policy_chosen_logps, "policy_chosen_logps", x, name)
  if weights is not None:
    common.check_same_shape(policy_chosen_logps, "policy_chosen_logps", weights, "weights")
  ref_chosen_logps = jax.lax.stop_gradient(ref_chosen_logps)
  ref_rejected_logps = jax.lax.stop_gradient(ref_rejected_logps)
  chosen_logratio = (policy_chosen_logps - ref_chosen_logps).astype(jnp.float32)
  rejected_logratio = (policy_rejected_logps -
                       ref_rejected_logps).astype(jnp.float32)
  h = chosen_logratio - rejected_logratio
  if loss_type == "sigmoid":
    per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) -
                label_smoothing * jax.nn.log_sigmoid(-beta * h))
  elif loss_type == "ipo":
    per_pair = jnp.square(h - 1.0 / (2.0 * beta))
  else:
    per_pair = jax.nn.relu(1.0 - beta * h)
  if weights is None:
    mean = jnp.mean
  else:
    w = jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
    mean = lambda x: common.masked_mean(x, w)
  loss = mean(per_pair)
  chosen_rewards = beta * chosen_logratio
  rejected_rewards = beta * rejected_logratio
  metrics = {
      "dpo/loss": loss,
      "dpo/logits": mean(beta * h),
      "rewards/chosen": mean(chosen_rewards),
      "rewards/rejected": mean(rejected_rewards),
      "rewards/margin": mean(chosen_rewards - rejected_rewards),
      "rewards/accuracy": mean(
          (chosen_rewards > rejected_rewards).astype(jnp.float32)),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
