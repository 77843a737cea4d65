"""Advantage estimators: GAE over tokens and group baselines (GRPO, RLOO)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common


def gae(rewards, values, mask, *, gamma: float, lam: float):
  """Generalised advantage estimation over the masked tokens (Schulman 2016).

    δ_t = r_t + γ V(s_{t+1}) − V(s_t),       V after the last valid token = 0
    A_t = δ_t + γλ A_{t+1}
    G_t = A_t + V(s_t)

  The recursion runs backwards over time with `lax.scan`; the carry holds the
  value and advantage of the next *valid* token, so positions with mask 0
  (left-padded prompts, right padding after EOS) get A = G = 0 and are skipped
  by the recursion. (OpenRLHF instead zeroes padding values and rewards and
  recurses through them, which is equivalent for right padding.)

  Args:
    rewards: [B, T] per-token rewards (e.g. from `kl_shaped_rewards`).
    values: [B, T] V(s_t) at rollout time.
    mask: [B, T] response mask.
    gamma: discount γ.
    lam: GAE λ.

  Returns:
    (advantages, returns), both [B, T] float32, 0 outside the mask.
  """
  common.check_ndim(rewards, 2, "rewards")
  common.check_same_shape(rewards, "rewards", values, "values")
  common.check_same_shape(rewards, "rewards", mask, "mask")
  r_TxB = jnp.asarray(rewards, jnp.float32).T
  v_TxB = jnp.asarray(values, jnp.float32).T
  valid_TxB = (jnp.asarray(mask) != 0).T

  def step(carry, inputs):
    next_value_B, next_adv_B = carry
    r_B, v_B, valid_B = inputs
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = delta_B + gamma * lam * next_adv_B
    carry = (jnp.where(valid_B, v_B, next_value_B),
             jnp.where(valid_B, adv_B, next_adv_B))
    return carry, jnp.where(valid_B, adv_B, 0.0)

  batch = r_TxB.shape[1]
  init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
  _, adv_TxB = jax.lax.scan(step, init, (r_TxB, v_TxB, valid_TxB),
                            reverse=True)
  adv_BxT = adv_TxB.T
  returns_BxT = jnp.where(valid_TxB.T, adv_BxT + v_TxB.T, 0.0)
  return adv_BxT, returns_BxT


def _group_inputs(rewards_PxN, mask):
  common.check_ndim(rewards_PxN, 2, "rewards")
  r = jnp.asarray(rewards_PxN, jnp.float32)
  if mask is None:
    m = jnp.ones_like(r)
  else:
    common.check_same_shape(r, "rewards", mask, "mask")
    m = (jnp.asarray(mask) != 0).astype(jnp.float32)
  return r, m


def grpo_advantages(rewards_PxN, mask=None, *, eps: float = 1e-6,
                    scale: bool = True):
  """Group-relative advantages (GRPO, Shao et al. 2024).

    A_pi = (r_pi − mean_p) / (std_p + eps)      (scale=True)
    A_pi = r_pi − mean_p                         (scale=False, Dr. GRPO)

  mean/std are over the valid samples of prompt p; std is the unbiased (N − 1)
  sample standard deviation as in TRL/DeepSeekMath, and 0 for groups with fewer
  than two valid samples (their advantage is then 0).

  Args:
    rewards_PxN: [P, N] rewards, N samples per prompt.
    mask: optional [P, N] validity mask; invalid samples get advantage 0 and do
      not enter the statistics.
    eps: added to the std.
    scale: divide by the std.

  Returns:
    [P, N] float32 advantages.
  """
  r, m = _group_inputs(rewards_PxN, mask)
  mean_P = common.masked_mean(r, m, axis=1)
  adv = r - mean_P[:, None]
  if scale:
    std_P = jnp.sqrt(common.masked_var(r, m, axis=1, unbiased=True))
    adv = adv / (std_P[:, None] + eps)
  return jnp.where(m != 0, adv, 0.0)


def rloo_advantages(rewards_PxN, mask=None):
  """REINFORCE leave-one-out advantages (Ahmadian et al. 2024).

    A_pi = r_pi − (1/(n_p − 1)) Σ_{j≠i} r_pj,   n_p = valid samples of prompt p

  0 for invalid samples and for groups with fewer than two valid samples.

  Args:
    rewards_PxN: [P, N] rewards.
    mask: optional [P, N] validity mask.

  Returns:
    [P, N] float32 advantages.
  """
  r, m = _group_inputs(rewards_PxN, mask)
  n_P = jnp.sum(m, axis=1, keepdims=True)
  total_P = jnp.sum(r * m, axis=1, keepdims=True)
  others_mean = common.safe_divide(total_P - r, n_P - 1.0)
  return jnp.where((m != 0) & (n_P > 1), r - others_mean, 0.0)


GROUP_ADVANTAGES = ("grpo", "rloo", "reinforce")


def group_advantages(rewards_PxN, mask=None, *, kind: str):
  """Critic-free sequence advantages from the N samples of each prompt.

    grpo       (r − mean_p) / (std_p + eps)     `grpo_advantages`
    rloo       r − mean of the other samples    `rloo_advantages`
    reinforce  r − mean_p                       `grpo_advantages(scale=False)` (group-mean baseline)

  Args:
    rewards_PxN: [P, N] sequence rewards.
    mask: optional [P, N] validity mask (invalid samples neither count nor get an advantage).
    kind: one of GROUP_ADVANTAGES (static).

  Returns:
    [P, N] float32 advantages.
  """
  if kind == "grpo":
    return grpo_advantages(rewards_PxN, mask)
  if kind == "rloo":
    return rloo_advantages(rewards_PxN, mask)
  if kind == "reinforce":
    return grpo_advantages(rewards_PxN, mask, scale=False)
  raise ValueError(f"`kind` must be one of {GROUP_ADVANTAGES}, got {kind!r}.")
