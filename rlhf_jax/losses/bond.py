"""BOND / J-BOND: distilling the best-of-n policy (Sessa et al. 2024; ALGORITHMS §6)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common

JBOND_REWARD_LOW = -math.log(16.0)
BASELINES = ("loo", "none")


def jbond_crude_reward(policy_rewards, anchor_rewards):
  """J-BOND's two-sample quantile reward (main text Eq. 17, strict `<`).

    r_J(y) = −log 16  if r(y) < min(r(y'_1), r(y'_2)),  else 0

  With y'_1, y'_2 ~ π_anchor, E[r_J(y)] = −log 16 · (1 − p_≤(y))², which equals
  log p_≤ = −log 2 at the anchor median (App. A.4).

  Args:
    policy_rewards: [B] rewards of the policy samples.
    anchor_rewards: [B, 2] rewards of two anchor samples per prompt.

  Returns:
    [B] float32 rewards in {−log 16, 0}.
  """
  common.check_ndim(policy_rewards, 1, "policy_rewards")
  common.check_ndim(anchor_rewards, 2, "anchor_rewards")
  if jnp.shape(anchor_rewards) != (jnp.shape(policy_rewards)[0], 2):
    raise ValueError("`anchor_rewards` must have shape"
                     f" [{jnp.shape(policy_rewards)[0]}, 2], got"
                     f" {jnp.shape(anchor_rewards)}.")
  worse = policy_rewards < jnp.min(anchor_rewards, axis=-1)
  return jnp.where(worse, JBOND_REWARD_LOW, 0.0).astype(jnp.float32)


def mc_quantile_reward(policy_rewards, anchor_rewards):
  """Monte Carlo log-quantile reward for plain BOND.

    p̂_≤(y) = (1/k) Σ_i 1[r(y'_i) ≤ r(y)],  y'_i ~ π_anchor (or π_ref)
    reward = log max(p̂_≤, 1/(k + 1))

  The clip keeps the reward finite when no anchor sample is beaten.

  Args:
    policy_rewards: [B] rewards of the policy samples.
    anchor_rewards: [B, K] rewards of k anchor samples per prompt.

  Returns:
    [B] float32 log-quantile estimates in [log(1/(k+1)), 0].
  """
  common.check_ndim(policy_rewards, 1, "policy_rewards")
  common.check_ndim(anchor_rewards, 2, "anchor_rewards")
  if jnp.shape(anchor_rewards)[0] != jnp.shape(policy_rewards)[0]:
    raise ValueError("`anchor_rewards` must have leading dim"
                     f" {jnp.shape(policy_rewards)[0]}, got"
                     f" {jnp.shape(anchor_rewards)}.")
  k = jnp.shape(anchor_rewards)[1]
  p_hat = jnp.mean((anchor_rewards <= policy_rewards[:, None]).astype(
      jnp.float32), axis=-1)
  return jnp.log(jnp.maximum(p_hat, 1.0 / (k + 1)))


def bond_backward_return(log_quantile, policy_logps, anchor_logps, *, n):
  """Return of the backward-KL (mode-seeking) BOND policy gradient, stop-grad.

    R(y) = (n − 1) · log p_≤(y) − (log π(y) − log π_anchor(y))

  i.e. log π_BoN(y) − log π(y) with the factor (B) dropped (BOND App. A.3).
  For J-BOND use n = 2 and log p_≤ ≈ r_J.

  Args:
    log_quantile: [B] (estimated) log p_≤(y) against the anchor.
    policy_logps: [B] log π(y) of the policy samples.
    anchor_logps: [B] log π_anchor(y) of the same samples.
    n: the N of the best-of-N target.

  Returns:
    [B] float32 returns (constant for autodiff).
  """
  common.check_ndim(log_quantile, 1, "log_quantile")
  common.check_same_shape(log_quantile, "log_quantile", policy_logps,
                          "policy_logps")
  common.check_same_shape(log_quantile, "log_quantile", anchor_logps,
                          "anchor_logps")
  ret = (n - 1.0) * log_quantile - (policy_logps - anchor_logps)
  return jax.lax.stop_gradient(ret.astype(jnp.float32))


def leave_one_out_baseline(x_B):
  """b_i = mean_{j≠i} x_j (0 for a batch of one)."""
  b = x_B.shape[0]
  if b < 2:
    return jnp.zeros_like(x_B)
  return (jnp.sum(x_B) - x_B) / (b - 1)


def jbond_loss(policy_logps,
               anchor_logps,
               best_anchor_logps,
               r_j,
               *,
               beta: float = 0.5,
               gamma: float = 0.0,
               baseline: str = "loo"):
  """J-BOND surrogate loss (ALGORITHMS §6.4), batch mean.

    L = (1 − β) · L_FW + β · L_BW + γ · L_KL
    L_FW = −mean log π(y'_bo2)                       forward KL: NLL of the
                                                     best of 2 anchor samples
    R    = stopgrad(r_J − (log π(y) − log π_anchor(y)))
    L_BW = −mean (R − b) log π(y)                    backward KL: REINFORCE
    L_KL = mean stopgrad(log π(y) − log π_anchor(y)) · log π(y)
                                                     score-function gradient of
                                                     KL(π‖π_anchor)

  b is the leave-one-out mean of R over the other prompts of the batch
  ("loo") or 0 ("none").

  Args:
    policy_logps: [B] log π_θ(y) of one policy sample per prompt (with grad).
    anchor_logps: [B] log π_anchor(y) of the same samples.
    best_anchor_logps: [B] log π_θ(y'_bo2) of the Bo2 anchor sample (with
      grad).
    r_j: [B] crude quantile rewards from `jbond_crude_reward`.
    beta: Jeffreys mix β ∈ [0, 1] (0.5 recommended).
    gamma: extra KL-to-anchor coefficient γ ≥ 0.
    baseline: "loo" or "none".

  Returns:
    (loss, metrics): 'jbond/loss', 'jbond/fw_nll', 'jbond/bw_loss',
    'jbond/kl_loss', 'jbond/return' (mean R), 'jbond/reward' (mean r_J),
    'jbond/kl_anchor' (mean log π − log π_anchor, a k1 estimate).
  """
  if baseline not in BASELINES:
    raise ValueError(f"`baseline` must be one of {BASELINES}, got"
                     f" {baseline!r}.")
  if common.is_number(beta) and not 0.0 <= beta <= 1.0:
    raise ValueError(f"`beta` must be in [0, 1], got {beta}.")
  if common.is_number(gamma) and gamma < 0:
    raise ValueError(f"`gamma` must be >= 0, got {gamma}.")
  common.check_ndim(policy_logps, 1, "policy_logps")
  for x, name in ((anchor_logps, "anchor_logps"),
                  (best_anchor_logps, "best_anchor_logps"), (r_j, "r_j")):
    common.check_same_shape(policy_logps, "policy_logps", x, name)
  anchor_logps = jax.lax.stop_gradient(anchor_logps)
  log_ratio = jax.lax.stop_gradient(policy_logps - anchor_logps)
  ret_B = bond_backward_return(r_j, policy_logps, anchor_logps, n=2)
  b_B = leave_one_out_baseline(ret_B) if baseline == "loo" else 0.0
  fw = -jnp.mean(best_anchor_logps)
  bw = -jnp.mean(jax.lax.stop_gradient(ret_B - b_B) * policy_logps)
  kl_term = jnp.mean(log_ratio * policy_logps)
  loss = (1.0 - beta) * fw + beta * bw + gamma * kl_term
  metrics = {
      "jbond/loss": loss,
      "jbond/fw_nll": fw,
      "jbond/bw_loss": bw,
      "jbond/kl_loss": kl_term,
      "jbond/return": jnp.mean(ret_B),
      "jbond/reward": jnp.mean(r_j),
      "jbond/kl_anchor": jnp.mean(log_ratio),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def ema_update(anchor_params, params, *, eta):
  """θ_anchor ← (1 − η) θ_anchor + η θ on matching pytrees (J-BOND anchor)."""
  if common.is_number(eta) and not 0.0 <= eta <= 1.0:
    raise ValueError(f"`eta` must be in [0, 1], got {eta}.")
  return jax.tree.map(lambda a, p: ((1.0 - eta) * a + eta * p).astype(a.dtype),
                      anchor_params, params)
