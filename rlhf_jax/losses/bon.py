"""The exact best-of-n distribution of a discrete policy (ALGORITHMS §5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common


def _bon_1d(probs_K, rewards_K, n):
  order = jnp.argsort(rewards_K)
  sorted_r = rewards_K[order]
  cum = jnp.concatenate([jnp.zeros((1,), probs_K.dtype),
                         jnp.cumsum(probs_K[order])])
  # p_≤ / p_< by binary search, so tied rewards share their whole tie class.
  p_le = cum[jnp.searchsorted(sorted_r, rewards_K, side="right")]
  p_lt = cum[jnp.searchsorted(sorted_r, rewards_K, side="left")]
  p_le = jnp.clip(p_le, 0.0, 1.0)
  p_lt = jnp.minimum(jnp.clip(p_lt, 0.0, 1.0), p_le)
  # (p_≤^n − p_<^n)/(p_≤ − p_<) = p_≤^(n−1) · (1 − q^n)/(1 − q), q = p_</p_≤,
  # written with log1p/expm1 so it stays accurate when the tie class is tiny
  # (q → 1, where it tends to n) and exact at q = 0.
  pos = p_le > 0
  safe_le = jnp.where(pos, p_le, 1.0)
  x = jnp.where(pos, (p_le - p_lt) / safe_le, 0.0)   # 1 − q
  has_gap = x > 0
  log_q = jnp.log1p(-jnp.where(has_gap, x, 0.5))
  ratio = jnp.where(has_gap, jnp.expm1(n * log_q) / jnp.expm1(log_q), n)
  factor_a = jnp.exp((n - 1.0) * jnp.log(safe_le))
  return jnp.where(pos, probs_K * factor_a * ratio, 0.0)


def bon_distribution(probs, rewards, *, n):
  """π_BoN(y) = π(y) · (p_≤(y)^n − p_<(y)^n) / (p_≤(y) − p_<(y)).

  The law of the best of n i.i.d. draws from `probs`, where p_≤(y) and p_<(y) are
  the probabilities that one draw has reward ≤ r(y) (< r(y)). Ties are exact:
  draws with equal reward are broken by draw order, so a tie class of mass
  d = p_≤ − p_< receives total mass p_≤^n − p_<^n shared ∝ π(y). With distinct
  rewards this reduces to p_≤^n − p_<^n. (BOND Thm 1, factor (B).) The limit
  d → 0 is taken analytically (factor → n·p_≤^(n−1)).

  Args:
    probs: [..., K] probabilities over K outcomes (rows sum to 1).
    rewards: [..., K] rewards of the outcomes.
    n: number of draws ≥ 1; a Python number or a traced scalar (no recompiles).

  Returns:
    [..., K] float32 best-of-n probabilities.
  """
  common.check_same_shape(probs, "probs", rewards, "rewards")
  if jnp.ndim(probs) < 1:
    raise ValueError("`probs` must have rank >= 1.")
  if common.is_number(n) and n < 1:
    raise ValueError(f"`n` must be >= 1, got {n}.")
  p = jnp.asarray(probs, jnp.float32)
  r = jnp.asarray(rewards, jnp.float32)
  n = jnp.asarray(n, jnp.float32)
  shape = p.shape
  out = jax.vmap(_bon_1d, in_axes=(0, 0, None))(
      p.reshape(-1, shape[-1]), r.reshape(-1, shape[-1]), n)
  return out.reshape(shape)
