"""Advantage Model loss — a RECONSTRUCTION (ALGORITHMS §10.2).

Peng et al. 2023 ("Stabilizing RLHF through Advantage Model and Selective
Rehearsal", arXiv 2309.10202) do not publish the exact AM loss in any source we
could retrieve. This module implements the reconstruction fixed in
ALGORITHMS.md Part A / §10.2, not the paper's formulas: a Bradley–Terry ranking
term on advantages, an importance-weighted per-prompt zero-mean term under the
target policy, a bound term on |a|, and per-task mean/variance regulation.
Every term has its own coefficient; a coefficient of 0 turns it off.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common
from rlhf_jax.losses import reward as reward_lib


class TaskStats(NamedTuple):
  """Running per-task statistics of AM scores (a pytree; [num_tasks] each)."""
  mean: jax.Array
  var: jax.Array
  count: jax.Array


def init_task_stats(num_tasks: int, *, target_var: float = 1.0) -> TaskStats:
  return TaskStats(mean=jnp.zeros((num_tasks,), jnp.float32),
                   var=jnp.full((num_tasks,), target_var, jnp.float32),
                   count=jnp.zeros((num_tasks,), jnp.float32))


def task_statistics(scores, task_ids, *, num_tasks: int):
  """Per-task (mean, biased variance, count) of `scores` via segment sums.

  Args:
    scores: [M] scores.
    task_ids: [M] integer task ids in [0, num_tasks).
    num_tasks: number of tasks (static).

  Returns:
    (mean [num_tasks], var [num_tasks], count [num_tasks]); 0 for absent tasks.
  """
  common.check_ndim(scores, 1, "scores")
  common.check_same_shape(scores, "scores", task_ids, "task_ids")
  ones = jnp.ones_like(scores, jnp.float32)
  count = jax.ops.segment_sum(ones, task_ids, num_segments=num_tasks)
  mean = common.safe_divide(
      jax.ops.segment_sum(scores, task_ids, num_segments=num_tasks), count)
  sq = jax.ops.segment_sum(jnp.square(scores - mean[task_ids]), task_ids,
                           num_segments=num_tasks)
  return mean, common.safe_divide(sq, count), count


def update_task_stats(stats: TaskStats, scores, task_ids, *,
                      momentum: float = 0.99) -> TaskStats:
  """EMA update of the running per-task statistics with a batch of scores.

  Tasks absent from the batch keep their statistics; a task seen for the first
  time takes the batch statistics directly.
  """
  num_tasks = stats.mean.shape[0]
  mean, var, count = task_statistics(jax.lax.stop_gradient(scores), task_ids,
                                     num_tasks=num_tasks)
  present = count > 0
  first = present & (stats.count == 0)
  m = jnp.where(first, 0.0, momentum)
  new_mean = jnp.where(present, m * stats.mean + (1 - m) * mean, stats.mean)
  new_var = jnp.where(present, m * stats.var + (1 - m) * var, stats.var)
  return TaskStats(new_mean, new_var, stats.count + count)


def advantage_model_loss(adv_chosen,
                         adv_rejected,
                         logp_target_chosen,
                         logp_target_rejected,
                         logp_behaviour_chosen,
                         logp_behaviour_rejected,
                         task_ids,
                         *,
                         num_tasks: int,
                         mean_coef: float = 1.0,
                         bound_coef: float = 1.0,
                         bound: float = 5.0,
                         regulate_coef: float = 0.1,
                         target_var: float = 1.0,
                         weight_clip: float = 5.0,
                         task_stats: Optional[TaskStats] = None,
                         stats_momentum: float = 0.9):
  """Advantage-model loss (reconstruction of Peng et al. 2023, see module doc).

    L = L_rank + λ_m L_mean + λ_b L_bound + λ_r L_reg
    L_rank  = −mean log σ(a_c − a_r)
    w(y)    = stopgrad(min(π(y|x) / π'(y|x), weight_clip))
    L_mean  = mean_pairs (Σ_{y∈{c,r}} w(y) a(y) / Σ w(y))²     E_π[a|x] ≈ 0
    L_bound = mean_y relu(|a(y)| − B)²
    L_reg   = mean_{tasks in batch} [ μ_k² + (σ²_k − target_var)² ]

  π is the target policy (e.g. SFT) and π' the behaviour policy that generated
  the comparison pair. μ_k, σ²_k are the per-task mean/variance of the scores
  {a_c, a_r} in the batch (segment sums over `task_ids`); when `task_stats` is
  given they are blended with the running statistics,
  μ_k = m·stopgrad(μ_run) + (1 − m)·μ_batch (same for σ²), which lowers the
  variance of the penalty for tasks rare in a batch. Update the running
  statistics separately with `update_task_stats`.

  Args:
    adv_chosen, adv_rejected: [B] AM scores a(x, y_c), a(x, y_r).
    logp_target_chosen, logp_target_rejected: [B] log π(y|x).
    logp_behaviour_chosen, logp_behaviour_rejected: [B] log π'(y|x).
    task_ids: [B] integer task id of each prompt.
    num_tasks: number of tasks (static).
    mean_coef, bound_coef, regulate_coef: λ_m, λ_b, λ_r (0 disables a term).
    bound: B.
    target_var: target per-task variance.
    weight_clip: upper clip of the importance weights.
    task_stats: optional running `TaskStats`.
    stats_momentum: m for blending with `task_stats`.

  Returns:
    (loss, metrics): 'am/loss', 'am/rank_loss', 'am/mean_loss',
    'am/bound_loss', 'am/regulate_loss', 'am/accuracy', 'am/ece',
    'am/weight_mean', 'am/score_mean', 'am/score_std'.
  """
  common.check_ndim(adv_chosen, 1, "adv_chosen")
  for x, name in ((adv_rejected, "adv_rejected"),
                  (logp_target_chosen, "logp_target_chosen"),
                  (logp_target_rejected, "logp_target_rejected"),
                  (logp_behaviour_chosen, "logp_behaviour_chosen"),
                  (logp_behaviour_rejected, "logp_behaviour_rejected"),
                  (task_ids, "task_ids")):
    common.check_same_shape(adv_chosen, "adv_chosen", x, name)
  if not jnp.issubdtype(jnp.result_type(task_ids), jnp.integer):
    raise ValueError("`task_ids` must be an integer array.")
  if any(common.is_number(v) and v <= 0 for v in (bound, weight_clip)):
    raise ValueError("`bound` and `weight_clip` must be > 0.")
  a_c = jnp.asarray(adv_chosen, jnp.float32)
  a_r = jnp.asarray(adv_rejected, jnp.float32)

  rank, rank_metrics = reward_lib.bradley_terry_loss(a_c, a_r)

  def weight(lp_t, lp_b):
    log_w = jnp.minimum(lp_t - lp_b, jnp.log(weight_clip))
    return jax.lax.stop_gradient(jnp.exp(log_w))

  w_c = weight(logp_target_chosen, logp_behaviour_chosen)
  w_r = weight(logp_target_rejected, logp_behaviour_rejected)
  pair_mean = (w_c * a_c + w_r * a_r) / (w_c + w_r)
  mean_term = jnp.mean(jnp.square(pair_mean))

  scores = jnp.concatenate([a_c, a_r])
  bound_term = jnp.mean(jnp.square(jax.nn.relu(jnp.abs(scores) - bound)))

  ids = jnp.concatenate([task_ids, task_ids])
  mu, var, count = task_statistics(scores, ids, num_tasks=num_tasks)
  if task_stats is not None:
    seen = task_stats.count > 0
    m = jnp.where(seen, stats_momentum, 0.0)
    mu = m * jax.lax.stop_gradient(task_stats.mean) + (1 - m) * mu
    var = m * jax.lax.stop_gradient(task_stats.var) + (1 - m) * var
  present = (count > 0).astype(jnp.float32)
  reg_term = common.masked_mean(
      jnp.square(mu) + jnp.square(var - target_var), present)

  loss = (rank + mean_coef * mean_term + bound_coef * bound_term +
          regulate_coef * reg_term)
  metrics = {
      "am/loss": loss,
      "am/rank_loss": rank,
      "am/mean_loss": mean_term,
      "am/bound_loss": bound_term,
      "am/regulate_loss": reg_term,
      "am/accuracy": rank_metrics["rm/accuracy"],
      "am/ece": rank_metrics["rm/ece"],
      "am/weight_mean": jnp.mean(jnp.concatenate([w_c, w_r])),
      "am/score_mean": jnp.mean(scores),
      "am/score_std": jnp.std(scores),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
