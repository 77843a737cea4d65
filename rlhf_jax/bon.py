"""Best-of-N inference math: selection, KL(π_BoN‖π_ref), win rates and quantiles (ALGORITHMS §5).

No sampling here: these are functions of the rewards (and, for categoricals, the
probabilities) that a best-of-N stage computes from its samples. They are pure
`jnp` functions, so they run on the host between jitted calls or inside a jit.

Conventions
- Rewards of N samples of one prompt are a row of `rewards_PxN`; ranking is per
  prompt, never across the batch.
- Ties: the first maximal sample wins (§5 factor (B): "among identical copies
  the first index wins"), the same order as `selection.rank_order` and
  `selection.best_of_n_mask`.
- Win rates and quantiles count a tie as half a win, as the Gemma report does.

KL(π_BoN‖π_ref)
- `bon_kl_bound(n) = log n − (n − 1)/n`: equal to the KL for a continuous reward
  law, an upper bound otherwise (Beirami et al. 2024).
- The KL depends on π_ref only through the law of the reward under π_ref:
  π_BoN(y)/π_ref(y) = (p_≤^n − p_<^n)/(p_≤ − p_<) is a function of r(y)'s tie
  class. `bon_kl_exact` evaluates it for a categorical; `bon_kl_estimate` is the
  plug-in estimate that evaluates the same formula on the empirical reward law of
  M reference samples per prompt (each sample mass 1/M, equal rewards one tie
  class). It never exceeds the bound, is 0 for n = 1, and is consistent when the
  reward law has finitely many atoms (e.g. a pass/fail grader). For a continuous
  law it is biased low (M atoms: it tends to the bound only as M → ∞), so use as
  many reference samples per prompt as the budget allows and report it beside
  the bound.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common
from rlhf_jax.losses.bon import bon_distribution

__all__ = [
    "best_of_n_indices",
    "take_best",
    "bon_kl_bound",
    "bon_kl_exact",
    "bon_kl_estimate",
    "win_rate",
    "reward_quantile",
    "effective_n",
]


def best_of_n_indices(rewards_PxN):
  """Index of each prompt's best sample, the first maximal one on ties: [P] int32.

  Args:
    rewards_PxN: [P, N] rewards of N samples per prompt.

  Returns:
    [P] int32 indices in [0, N).
  """
  common.check_ndim(rewards_PxN, 2, "rewards_PxN")
  if jnp.shape(rewards_PxN)[1] < 1:
    raise ValueError(f"`rewards_PxN` needs N >= 1 samples per prompt, got shape {jnp.shape(rewards_PxN)}.")
  # 0 − r (as in selection.rank_order) maps −0.0 and 0.0 to one value, so they tie; argmin takes the first.
  return jnp.argmin(0.0 - jnp.asarray(rewards_PxN, jnp.float32), axis=-1).astype(jnp.int32)


def take_best(tree, best_P):
  """Gathers the chosen sample of each prompt from every leaf shaped [P, N, ...] → [P, ...].

  Args:
    tree: a pytree of arrays with leading dims [P, N] (tokens, masks, rewards ...).
    best_P: [P] integer indices, e.g. from `best_of_n_indices`.
  """
  common.check_ndim(best_P, 1, "best_P")

  def take(x):
    if jnp.ndim(x) < 2 or jnp.shape(x)[0] != jnp.shape(best_P)[0]:
      raise ValueError(f"every leaf of `tree` must be [P={jnp.shape(best_P)[0]}, N, ...], got {jnp.shape(x)}.")
    idx = jnp.reshape(best_P, (-1, 1) + (1,) * (jnp.ndim(x) - 2)).astype(jnp.int32)
    return jnp.take_along_axis(x, idx, axis=1)[:, 0]

  return jax.tree.map(take, tree)


def bon_kl_bound(n):
  """log n − (n − 1)/n: KL(π_BoN‖π_ref) for continuous rewards, an upper bound in general.

  Works on a Python number (returns a float) or an array of n.
  """
  if common.is_number(n):
    if n < 1:
      raise ValueError(f"`n` must be >= 1, got {n}.")
    return math.log(n) - (n - 1.0) / n
  n = jnp.asarray(n, jnp.float32)
  return jnp.log(n) - (n - 1.0) / n


def bon_kl_exact(probs, rewards, *, n):
  """KL(π_BoN‖π) of a categorical, exact with ties: Σ_y π_BoN(y) log(π_BoN(y)/π(y)).

  Args:
    probs: [..., K] probabilities (rows sum to 1).
    rewards: [..., K] rewards.
    n: number of draws ≥ 1 (Python number or traced scalar).

  Returns:
    [...] float32 KL in nats.
  """
  p = jnp.asarray(probs, jnp.float32)
  q = bon_distribution(p, rewards, n=n)
  pos = (q > 0) & (p > 0)
  log_ratio = jnp.log(jnp.where(pos, q, 1.0)) - jnp.log(jnp.where(pos, p, 1.0))
  # Floating rounding can leave a few ulps of negative KL at n = 1; KL ≥ 0 exactly.
  return jnp.maximum(jnp.sum(jnp.where(pos, q * log_ratio, 0.0), axis=-1), 0.0)


def bon_kl_estimate(reference_rewards_PxM, *, n):
  """Plug-in estimate of KL(π_BoN‖π_ref) per prompt from M reference samples' rewards: [P].

    KL̂ = Σ_i π̂_BoN(y_i) log(π̂_BoN(y_i) / (1/M)),   π̂ = uniform over the M samples,
    π̂_BoN = bon_distribution(π̂, r, n=n)  (ties = one class, exact).

  This is the exact KL of best-of-n on the empirical reward law, so it is ≤ log n − (n − 1)/n,
  0 at n = 1, consistent for reward laws with finitely many atoms and biased low for
  continuous ones (see the module docstring). Average over prompts on the caller's side.

  Args:
    reference_rewards_PxM: [P, M] rewards of M samples of π_ref per prompt (M ≥ 1).
    n: the best-of-n size ≥ 1.
  """
  common.check_ndim(reference_rewards_PxM, 2, "reference_rewards_PxM")
  if common.is_number(n) and n < 1:
    raise ValueError(f"`n` must be >= 1, got {n}.")
  r = jnp.asarray(reference_rewards_PxM, jnp.float32)
  m = r.shape[1]
  if m < 1:
    raise ValueError(f"`reference_rewards_PxM` needs M >= 1 samples per prompt, got shape {r.shape}.")
  return bon_kl_exact(jnp.full(r.shape, 1.0 / m, jnp.float32), r, n=n)


def win_rate(rewards, reference_rewards, weights=None):
  """Mean of 1[r > r_ref] + ½·1[r = r_ref] (ties as half a win), optionally weighted.

  Best-of-n against one reference sample has win rate ≤ n/(n + 1) (Beirami et al.),
  with equality for continuous rewards.

  Args:
    rewards: [...] rewards of the evaluated samples (e.g. the best-of-n ones).
    reference_rewards: same shape, rewards of the paired reference samples.
    weights: optional same-shape weights (0 drops a pair); a weighted mean.

  Returns:
    float32 scalar in [0, 1] (0 when every weight is 0).
  """
  common.check_same_shape(rewards, "rewards", reference_rewards, "reference_rewards")
  r = jnp.asarray(rewards, jnp.float32)
  ref = jnp.asarray(reference_rewards, jnp.float32)
  score = jnp.where(r > ref, 1.0, jnp.where(r == ref, 0.5, 0.0))
  if weights is None:
    return jnp.mean(score)
  common.check_same_shape(rewards, "rewards", weights, "weights")
  return common.masked_mean(score, jnp.asarray(weights, jnp.float32))


def reward_quantile(rewards_B, reference_rewards_BxM):
  """Mid-quantile of each reward among M reference rewards of its prompt: [B].

    q̂(y) = (1/M) Σ_j (1[r_j < r(y)] + ½·1[r_j = r(y)])

  This is the win rate of y against one reference sample. Under best-of-n of the
  reference with continuous rewards, E[q̂] = n/(n + 1); see `effective_n`.
  """
  common.check_ndim(rewards_B, 1, "rewards_B")
  common.check_ndim(reference_rewards_BxM, 2, "reference_rewards_BxM")
  if jnp.shape(reference_rewards_BxM)[0] != jnp.shape(rewards_B)[0]:
    raise ValueError(f"`reference_rewards_BxM` must have leading dim {jnp.shape(rewards_B)[0]},"
                     f" got shape {jnp.shape(reference_rewards_BxM)}.")
  r = jnp.asarray(rewards_B, jnp.float32)[:, None]
  ref = jnp.asarray(reference_rewards_BxM, jnp.float32)
  return jnp.mean(jnp.where(ref < r, 1.0, jnp.where(ref == r, 0.5, 0.0)), axis=-1)


def effective_n(mean_quantile):
  """The n whose best-of-n has this mean quantile: q/(1 − q), inverting E[q̂] = n/(n + 1).

  For a policy trained by iterative Bo-2 distillation, effective_n ≈ 2^M after M
  anchor moves if it tracks Bo-2^M (continuous rewards). q = 1 maps to +inf.
  """
  q = jnp.asarray(mean_quantile, jnp.float32)
  return jnp.where(q < 1.0, q / jnp.where(q < 1.0, 1.0 - q, 1.0), jnp.inf)
