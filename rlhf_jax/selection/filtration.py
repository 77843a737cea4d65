"""PF-PPO policy filtration: per-prompt rank-based sample weights (ALGORITHMS §4).

All strategies rank the N samples of each prompt by reward, never across the
batch. Ranking is by reward descending with ties broken by the lowest sample
index first (a stable sort), so "best" is the first maximal sample and "worst"
is the last sample in that order (among the minimal rewards, the highest
index). Best and worst therefore differ whenever N ≥ 2, even if all rewards
tie.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common

STRATEGIES = ("none", "best_of_n", "best_random", "best_worst", "top",
              "top_random", "top_bottom", "pow_k")


def rank_order(rewards_PxN):
  """[P, N] sample indices sorted by reward descending, ties by lowest index."""
  # 0 − r (not −r) maps −0.0 and 0.0 to the same key, so they tie.
  return jnp.argsort(0.0 - jnp.asarray(rewards_PxN, jnp.float32), axis=-1,
                     stable=True)


def _onehot(idx_P, n):
  return (jnp.arange(n)[None, :] == idx_P[:, None]).astype(jnp.float32)


def filtration_weights(rewards_PxN,
                       *,
                       strategy: str,
                       key: Optional[jax.Array] = None,
                       threshold: Optional[float] = None,
                       lower_threshold: Optional[float] = None,
                       k: Optional[float] = None):
  """Per-sample weights [P, N] that implement a PF-PPO filtration strategy.

  Keep-sets (weights 1 for kept samples, 0 otherwise):
    none        all N (PPO-M)
    best_of_n   the best sample
    best_random the best sample + one partner drawn uniformly from the N − 1
                non-best samples (needs `key`)
    best_worst  the best and the worst sample
    top         samples with r > threshold
    top_random  samples with r > threshold, plus each other sample with
                probability 1/2 (needs `key`)
    top_bottom  samples with r > threshold or r < lower_threshold
  Reweighting:
    pow_k       w_pi = N · |r_pi|^k / Σ_j |r_pj|^k, so each prompt's weights sum
                to N (mean weight 1, the scale of "none"); a prompt whose
                rewards are all 0 gets weight 1 everywhere.

  Averaged over the selection randomness, Σ_i weight_i L_i equals
  2 · Σ_rank w_rank L_rank for best_random / best_worst with the paper's
  weight vectors (`filtration_distribution`), and 1 · Σ w L for best_of_n.

  Args:
    rewards_PxN: [P, N] rewards of N samples for each of P prompts.
    strategy: one of STRATEGIES (static).
    key: PRNG key for best_random and top_random.
    threshold: upper threshold for top / top_random / top_bottom.
    lower_threshold: lower threshold for top_bottom.
    k: exponent for pow_k.

  Returns:
    [P, N] float32 weights.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"`strategy` must be one of {STRATEGIES}, got"
                     f" {strategy!r}.")
  common.check_ndim(rewards_PxN, 2, "rewards")
  r = jnp.asarray(rewards_PxN, jnp.float32)
  P, N = r.shape
  needs_key = strategy in ("best_random", "top_random")
  if needs_key and key is None:
    raise ValueError(f"strategy {strategy!r} needs a PRNG `key`.")
  if strategy in ("top", "top_random", "top_bottom") and threshold is None:
    raise ValueError(f"strategy {strategy!r} needs `threshold`.")
  if strategy == "top_bottom" and lower_threshold is None:
    raise ValueError("strategy 'top_bottom' needs `lower_threshold`.")
  if strategy == "pow_k" and k is None:
    raise ValueError("strategy 'pow_k' needs `k`.")

  if strategy == "none":
    return jnp.ones_like(r)
  order_PxN = rank_order(r)
  best_P = order_PxN[:, 0]
  if strategy == "best_of_n":
    return _onehot(best_P, N)
  if strategy == "best_worst":
    return jnp.maximum(_onehot(best_P, N), _onehot(order_PxN[:, -1], N))
  if strategy == "best_random":
    if N == 1:
      return jnp.ones_like(r)
    # Uniform over the N − 1 non-best indices: draw u in [0, N−1) and skip best.
    u_P = jax.random.randint(key, (P,), 0, N - 1)
    partner_P = jnp.where(u_P >= best_P, u_P + 1, u_P)
    return jnp.maximum(_onehot(best_P, N), _onehot(partner_P, N))
  if strategy == "top":
    return (r > threshold).astype(jnp.float32)
  if strategy == "top_random":
    coin = jax.random.bernoulli(key, 0.5, r.shape)
    return ((r > threshold) | coin).astype(jnp.float32)
  if strategy == "top_bottom":
    return ((r > threshold) | (r < lower_threshold)).astype(jnp.float32)
  # pow_k
  mag = jnp.power(jnp.abs(r), k)
  total_P = jnp.sum(mag, axis=-1, keepdims=True)
  return jnp.where(total_P > 0, N * mag / jnp.where(total_P > 0, total_P, 1.0),
                   1.0)


def filtration_distribution(n: int, *, strategy: str):
  """The paper's weight vector w over ranks (best first) for §4.2 strategies.

    none:        (1/n, …, 1/n)
    best_of_n:   (1, 0, …, 0)
    best_random: (1/2, 1/(2(n−1)), …, 1/(2(n−1)))
    best_worst:  (1/2, 0, …, 0, 1/2)
  For n = 1 every strategy is (1,).

  Args:
    n: number of samples per prompt (static).
    strategy: "none", "best_of_n", "best_random" or "best_worst".

  Returns:
    [n] float32 weights summing to 1.
  """
  if n < 1:
    raise ValueError(f"`n` must be >= 1, got {n}.")
  if strategy not in ("none", "best_of_n", "best_random", "best_worst"):
    raise ValueError("`strategy` must be one of none, best_of_n, best_random,"
                     f" best_worst; got {strategy!r}.")
  if n == 1:
    return jnp.ones((1,), jnp.float32)
  if strategy == "none":
    return jnp.full((n,), 1.0 / n, jnp.float32)
  w = jnp.zeros((n,), jnp.float32)
  if strategy == "best_of_n":
    return w.at[0].set(1.0)
  if strategy == "best_random":
    return jnp.full((n,), 0.5 / (n - 1), jnp.float32).at[0].set(0.5)
  return w.at[0].set(0.5).at[-1].add(0.5)
