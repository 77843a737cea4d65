"""Bradley–Terry reward-model loss and pairwise calibration (ALGORITHMS §2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common


def pairwise_calibration(chosen, rejected, *, bins: int = 10):
  """Expected calibration error of the BT preference probability.

  p = σ(r_c − r_r) is the model's probability that the labelled-chosen response
  wins. As a top-label classifier its confidence is c = max(p, 1 − p) ∈ [0.5, 1]
  and its prediction is correct when p > 0.5 (p = 0.5 counts as half correct).
  Confidences are put into `bins` equal-width bins over [0.5, 1] and

    ECE = Σ_b (n_b / n) · |mean confidence_b − accuracy_b|

  (Guo et al. 2017), computed with segment sums (jittable, static shapes).

  Args:
    chosen: [B] scores of the preferred responses.
    rejected: [B] scores of the dispreferred responses.
    bins: number of confidence bins (static).

  Returns:
    Scalar ECE in [0, 0.5].
  """
  common.check_ndim(chosen, 1, "chosen")
  common.check_same_shape(chosen, "chosen", rejected, "rejected")
  if bins < 1:
    raise ValueError(f"`bins` must be >= 1, got {bins}.")
  p = jax.nn.sigmoid((jnp.asarray(chosen) - jnp.asarray(rejected)).astype(
      jnp.float32))
  conf = jnp.maximum(p, 1.0 - p)
  correct = jnp.where(p > 0.5, 1.0, jnp.where(p == 0.5, 0.5, 0.0))
  idx = jnp.clip(jnp.floor((conf - 0.5) * 2.0 * bins), 0, bins - 1).astype(
      jnp.int32)
  count = jax.ops.segment_sum(jnp.ones_like(conf), idx, num_segments=bins)
  conf_sum = jax.ops.segment_sum(conf, idx, num_segments=bins)
  acc_sum = jax.ops.segment_sum(correct, idx, num_segments=bins)
  # |Σ conf − Σ acc| / n per bin equals (n_b/n)|mean conf − acc|.
  return jnp.sum(jnp.abs(conf_sum - acc_sum)) / jnp.maximum(jnp.sum(count), 1.0)


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin=None):
  """Bradley–Terry pairwise loss, batch mean.

  L = −mean_b log σ(r_c − r_r − m_b)   (InstructGPT Eq. 1; Llama 2 margin m)

  Args:
    chosen_rewards: [B] scalar rewards of the preferred responses.
    rejected_rewards: [B] scalar rewards of the dispreferred responses.
    margin: optional scalar or [B] margin m (Llama 2); None means 0.

  Returns:
    (loss, metrics): 'rm/loss', 'rm/accuracy' (r_c > r_r; ties count 0),
    'rm/margin' (mean r_c − r_r), 'rm/chosen', 'rm/rejected' (means),
    'rm/ece' (pairwise_calibration with 10 bins).
  """
  common.check_ndim(chosen_rewards, 1, "chosen_rewards")
  common.check_same_shape(chosen_rewards, "chosen_rewards", rejected_rewards,
                          "rejected_rewards")
  rc = jnp.asarray(chosen_rewards, jnp.float32)
  rr = jnp.asarray(rejected_rewards, jnp.float32)
  diff = rc - rr
  logits = diff
  if margin is not None:
    margin = jnp.asarray(margin, jnp.float32)
    if margin.ndim not in (0, 1) or (margin.ndim == 1 and
                                     margin.shape != rc.shape):
      raise ValueError("`margin` must be a scalar or have the shape of"
                       f" `chosen_rewards` {rc.shape}, got {margin.shape}.")
    logits = diff - margin
  loss = -jnp.mean(jax.nn.log_sigmoid(logits))
  metrics = {
      "rm/loss": loss,
      "rm/accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
      "rm/margin": jnp.mean(diff),
      "rm/chosen": jnp.mean(rc),
      "rm/rejected": jnp.mean(rr),
      "rm/ece": pairwise_calibration(rc, rr, bins=10),
  }
  return loss, metrics
