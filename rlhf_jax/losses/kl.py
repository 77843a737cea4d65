"""Per-token KL estimators, KL-shaped rewards and the adaptive KL controller."""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common

KL_KINDS = ("k1", "k2", "k3")

def kl_penalty(logprobs, ref_logprobs, *, kind: str):
  """Per-token estimate of KL(π‖π_ref) from samples y_t ~ π (Schulman 2020).

  With d = log π(y_t) − log π_ref(y_t):
    k1 = d                      unbiased, can be negative
    k2 = d² / 2                 biased, low variance
    k3 = exp(−d) − (−d) − 1     unbiased, ≥ 0

  Args:
    logprobs: [...] log π of the sampled tokens.
    ref_logprobs: [...] log π_ref of the same tokens.
    kind: "k1", "k2" or "k3" (static).

  Returns:
    Array of the shape of `logprobs`.
  """
  if kind not in KL_KINDS:
    raise ValueError(f"`kind` must be one of {KL_KINDS}, got {kind!r}.")
  common.check_same_shape(logprobs, "logprobs", ref_logprobs, "ref_logprobs")
  d = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(ref_logprobs, jnp.float32)
  if kind == "k1":
    return d
  if kind == "k2":
    return 0.5 * jnp.square(d)
  return jnp.expm1(-d) + d

def last_token_mask(mask_BxT):
  """One-hot [B, T] of the last position with mask ≠ 0 (all 0 for empty rows)."""
  valid = jnp.asarray(mask_BxT) != 0
  T = valid.shape[-1]
  last_B = T - 1 - jnp.argmax(valid[:, ::-1], axis=-1)
  onehot = jnp.arange(T)[None, :] == last_B[:, None]
  return (onehot & jnp.any(valid, axis=-1, keepdims=True)).astype(jnp.float32)

def normalize_rewards(rewards, *, mean, std, clip: Optional[float] = None):
  """(r − mean) / std, then clipped to [−clip, clip] (OpenRLHF). clip=None: no clip."""
  out = (jnp.asarray(rewards, jnp.float32) - mean) / std
  if clip is not None:
    out = jnp.clip(out, -clip, clip)
  return out

def kl_shaped_rewards(sequence_rewards,
                      logprobs,
                      ref_logprobs,
                      mask,
                      *,
                      kl_coef,
                      kind: str = "k1",
                      reward_clip: Optional[float] = 10.0):
  """Per-token PPO rewards: KL penalty on every token, RM score on the last.

    r_t = −β kl_t                            for valid t before the last
    r_T = −β kl_T + clip(R, −c, c)           at the last valid token T

  (InstructGPT §3.5; OpenRLHF `compute_reward`). The result is a rollout
  constant and is returned under `stop_gradient`.

  Args:
    sequence_rewards: [B] sequence-level rewards R (already normalised).
    logprobs: [B, T] log π_old of the sampled tokens.
    ref_logprobs: [B, T] log π_ref of the same tokens.
    mask: [B, T] response mask.
    kl_coef: β (Python float or traced scalar, e.g. from `KLControllerState`).
    kind: KL estimator ("k1", "k2", "k3").
    reward_clip: c; None disables clipping.

  Returns:
    (token_rewards [B, T], metrics) with 'kl/ref' (mean over sequences of Σ_t
    kl_t), 'kl/coef', 'reward/score' (mean clipped R), 'reward/clip_frac'.
  """
  common.check_ndim(sequence_rewards, 1, "sequence_rewards")
  common.check_ndim(logprobs, 2, "logprobs")
  common.check_same_shape(logprobs, "logprobs", ref_logprobs, "ref_logprobs")
  common.check_same_shape(logprobs, "logprobs", mask, "mask")
  if jnp.shape(sequence_rewards)[0] != jnp.shape(logprobs)[0]:
    raise ValueError("`sequence_rewards` must have shape"
                     f" [{jnp.shape(logprobs)[0]}], got"
                     f" {jnp.shape(sequence_rewards)}.")
  valid = jnp.asarray(mask) != 0
  kl_BxT = jnp.where(valid, kl_penalty(logprobs, ref_logprobs, kind=kind), 0.0)
  score_B = jnp.asarray(sequence_rewards, jnp.float32)
  clipped_B = score_B if reward_clip is None else jnp.clip(
      score_B, -reward_clip, reward_clip)
  last_BxT = last_token_mask(mask)
  token_rewards = -kl_coef * kl_BxT + last_BxT * clipped_B[:, None]
  metrics = {
      "kl/ref": jnp.mean(jnp.sum(kl_BxT, axis=-1)),
      "kl/coef": jnp.asarray(kl_coef, jnp.float32),
      "reward/score": jnp.mean(clipped_B),
      "reward/clip_frac": jnp.mean((clipped_B != score_B).astype(jnp.float32)),
  }
  return jax.lax.stop_gradient(token_rewards), jax.tree.map(
      jax.lax.stop_gradient, metrics)

class KLControllerState(NamedTuple):
  """State of the KL coefficient controller (a pytree; lives in the train state)."""
  kl_coef: jax.Array

def init_kl_controller(kl_coef: float) -> KLControllerState:
  return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))

def adaptive_kl_update(state: KLControllerState, current_kl, n_steps, *,
                       target: float, horizon: float) -> KLControllerState:
  """Ziegler et al. (2019) proportional controller (ALGORITHMS §3.5).

    e = clip(KL / KL_target − 1, −0.2, 0.2)
    β ← β · (1 + e · n_steps / horizon)

  A fixed coefficient (OpenRLHF `FixedKLController`, used when no KL target is
  configured) is simply not calling this function: the caller keeps `state`
  unchanged when `target` is None.

  Args:
    state: current controller state.
    current_kl: scalar measured KL (e.g. metrics['kl/ref']).
    n_steps: number of samples (or steps) since the last update.
    target: KL_target > 0.
    horizon: controller horizon > 0.

  Returns:
    The new `KLControllerState`.
  """
  if target is None or (common.is_number(target) and target <= 0):
    raise ValueError(f"`target` must be > 0, got {target}; for a fixed KL"
                     " coefficient do not call adaptive_kl_update.")
  if common.is_number(horizon) and horizon <= 0:
    raise ValueError(f"`horizon` must be > 0, got {horizon}.")
  err = jnp.clip(jnp.asarray(current_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
  mult = 1.0 + err * jnp.asarray(n_steps, jnp.float32) / horizon
  return KLControllerState(kl_coef=state.kl_coef * mult)

