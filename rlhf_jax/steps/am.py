"""Advantage-Model step — a RECONSTRUCTION of Peng et al. 2023 (ALGORITHMS.md Part A, §10.2).

"Stabilizing RLHF through Advantage Model and Selective Rehearsal" (arXiv 2309.10202) does not publish its AM loss
in any source we could retrieve. This step trains the reconstruction that ALGORITHMS.md Part A fixes, not the
paper's formulas. With a(x, y) the scalar-head score read at the last valid token (as the RM):

  L       = L_rank + λ_m L_mean + λ_b L_bound + λ_r L_reg
  L_rank  = −Σ_b v_b log σ(a(x,y_c) − a(x,y_r)) / Σ_b v_b                 Bradley–Terry on advantages
  w(y)    = stopgrad(min(π(y|x) / π'(y|x), importance_clip))             π target (SFT), π' behaviour
  Ê_g     = Σ_{b∈g} v_b Σ_{y∈{c,r}} w(y) a(x,y) / Σ_{b∈g} v_b Σ_y w(y)   per-prompt E_π[a|x], self-normalised IS
  L_mean  = mean over groups g of Ê_g²                                   E_π[a|x] ≈ 0
  L_bound = Σ_b v_b Σ_y relu(|a(x,y)| − B)² / (2 Σ_b v_b)                keep scores in [−B, B]
  L_reg   = mean over tasks k in the batch of μ̃_k² + (σ̃²_k − target_var)²
  μ̃_k     = m·stopgrad(μ_run,k) + (1 − m)·μ_batch,k                     (same for σ̃²; m = 0 for a task never seen)

v_b is the pair's weight (`weights`, default 1). A group g is one pair (the §10.2 formula) or, when the batch
carries `prompt_ids`, all pairs of one prompt. Prefer prompt groups whenever several pairs share a prompt: the
per-pair square Σ_pairs Ê² also penalises the spread of the pair means, so it shrinks the score scale against
L_rank (and self-normalised IS over two samples is biased); a prompt group constrains only its mean.

μ_batch,k and σ²_batch,k are the mean and biased variance of the scores {a_c, a_r} of the batch's pairs of task k;
the running statistics (μ_run, σ²_run) live in `AMState.task_stats` and are updated after each step with
`losses.update_task_stats` (EMA with momentum m = `stats_momentum`) from the pre-update scores.

Coefficients are Python numbers fixed when the step is built: a coefficient of 0 removes its term from the traced
loss, so with all three at 0 the update is, bit for bit, `steps.make_rm_step`'s (no `0 · term` that a NaN could
poison, no extra rounding).
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.losses import common
from rlhf_jax.state import TrainState, apply_gradients
from rlhf_jax.steps.rm import _pair_scores

PAIR_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")
LOGP_KEYS = ("chosen_logp_target", "chosen_logp_behaviour", "rejected_logp_target", "rejected_logp_behaviour")


@flax.struct.dataclass
class AMState:
  """The AM stage's whole jitted state: the model's TrainState and the running per-task score statistics."""

  model: TrainState
  task_stats: losses.TaskStats


def init_am_state(model: TrainState, *, num_tasks: int, target_var: float = 1.0) -> AMState:
  """Step-0 `AMState`: running means 0, variances `target_var`, counts 0 (a task's first batch replaces them)."""
  _check_num_tasks(num_tasks)
  return AMState(model=model, task_stats=losses.init_task_stats(num_tasks, target_var=target_var))


def _check_num_tasks(num_tasks):
  if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(f"`num_tasks` must be an int >= 1, got {num_tasks!r}")


# ----------------------------------------------------------------------------------------------------------------
# Terms (pure functions of the pair scores; each also gives the step's metrics)
# ----------------------------------------------------------------------------------------------------------------


def _rank_term(a_c, a_r, pair_w):
  """BT loss and accuracy; `pair_w` None is the RM's exact unweighted path."""
  if pair_w is None:
    loss, m = losses.bradley_terry_loss(a_c, a_r)
    return loss, m["rm/accuracy"]
  diff = a_c - a_r
  return (common.masked_mean(-jax.nn.log_sigmoid(diff), pair_w),
          common.masked_mean((diff > 0).astype(jnp.float32), pair_w))


def _importance_weights(batch, importance_clip):
  """w(y_c), w(y_r) [B]: clipped π/π' from sequence log-probs; 1 when the batch carries none (on-policy pairs)."""
  if LOGP_KEYS[0] not in batch:
    ones = jnp.ones(batch["chosen_tokens"].shape[:1], jnp.float32)
    return ones, ones

  def weight(lp_t, lp_b):
    log_w = jnp.minimum(jnp.asarray(lp_t, jnp.float32) - jnp.asarray(lp_b, jnp.float32), jnp.log(importance_clip))
    return jax.lax.stop_gradient(jnp.exp(log_w))

  return (weight(batch["chosen_logp_target"], batch["chosen_logp_behaviour"]),
          weight(batch["rejected_logp_target"], batch["rejected_logp_behaviour"]))


def _mean_term(a_c, a_r, w_c, w_r, pair_w, prompt_ids):
  """mean_g Ê_g² (module docstring); groups are pairs, or prompts when `prompt_ids` is given."""
  num_B = pair_w * (w_c * a_c + w_r * a_r)
  den_B = pair_w * (w_c + w_r)
  if prompt_ids is None:
    est_B = common.safe_divide(num_B, den_B)
    share_B = (pair_w > 0).astype(jnp.float32)
  else:
    same_BxB = prompt_ids[:, None] == prompt_ids[None, :]
    # Masked sums, not matmuls: a TPU's default matmul precision would round the scores to bf16.
    group_sum = lambda x_B: jnp.sum(jnp.where(same_BxB, x_B[None, :], 0.0), axis=1)
    est_B = common.safe_divide(group_sum(num_B), group_sum(den_B))
    # Each group's shares sum to 1, so every prompt counts once whatever its number of pairs.
    share_B = common.safe_divide(pair_w, group_sum(pair_w))
  return common.masked_mean(jnp.square(est_B), share_B)


def _bound_term(a_c, a_r, pair_w, bound):
  excess = jnp.square(jax.nn.relu(jnp.abs(jnp.concatenate([a_c, a_r])) - bound))
  return common.masked_mean(excess, jnp.concatenate([pair_w, pair_w]))


def _stat_ids(task_ids, pair_w, num_tasks):
  """Task ids of the 2B scores; pairs with weight 0 get id `num_tasks`, which segment sums drop."""
  ids = jnp.where(pair_w > 0, task_ids, num_tasks).astype(jnp.int32)
  return jnp.concatenate([ids, ids])


def _regulation_term(a_c, a_r, ids_2B, stats, *, num_tasks, momentum, target_var):
  mu, var, count = losses.task_statistics(jnp.concatenate([a_c, a_r]), ids_2B, num_tasks=num_tasks)
  m = jnp.where(stats.count > 0, momentum, 0.0)
  mu = m * jax.lax.stop_gradient(stats.mean) + (1 - m) * mu
  var = m * jax.lax.stop_gradient(stats.var) + (1 - m) * var
  return common.masked_mean(jnp.square(mu) + jnp.square(var - target_var), (count > 0).astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------


def _check_batch(batch, num_tasks):
  for k in PAIR_KEYS:
    if k not in batch:
      raise ValueError(f"AM batch lacks `batch[{k!r}]`; it needs {PAIR_KEYS} (as the RM step)")
  b = batch["chosen_tokens"].shape[0]
  for k in PAIR_KEYS:
    if batch[k].ndim != 2 or batch[k].shape[0] != b:
      raise ValueError(f"`batch[{k!r}]` must be [B={b}, S], got shape {batch[k].shape}")
  have = [k for k in LOGP_KEYS if k in batch]
  if have and len(have) != len(LOGP_KEYS):
    raise ValueError(f"AM batch carries {have} but not all of {LOGP_KEYS}: give all four sequence log-probs "
                     "or none (none means the pairs were sampled from the target policy, w = 1)")
  if num_tasks > 1 and "task_ids" not in batch:
    raise ValueError(f"AM batch lacks `batch['task_ids']` [B] (int), needed with num_tasks={num_tasks}")
  for k in (*have, "weights", "task_ids", "prompt_ids"):
    if k in batch and batch[k].shape != (b,):
      raise ValueError(f"`batch[{k!r}]` must have shape [B={b}], got {batch[k].shape}")
  for k in ("task_ids", "prompt_ids"):
    if k in batch and not jnp.issubdtype(batch[k].dtype, jnp.integer):
      raise ValueError(f"`batch[{k!r}]` must be an integer array, got dtype {batch[k].dtype}")


def make_am_step(apply_fn: Callable, optimizer: optax.GradientTransformation, *, num_tasks: int,
                 mean_coef: float = 1.0, bound_coef: float = 1.0, bound: float = 5.0,
                 regulation_coef: float = 0.1, stats_momentum: float = 0.9, importance_clip: float = 5.0,
                 target_var: float = 1.0) -> Callable:
  """`step(state: AMState, batch) -> (state, metrics)`: one update of the AM loss (module docstring).

  Args:
    apply_fn: scalar-head model, `apply_fn(params, tokens, mask) -> (values [B, S], _)`; a(x, y) is read at the
      last valid token (`steps.sequence_scores`).
    optimizer: the transformation that built `state.model.opt_state`.
    num_tasks: number of tasks K (static); `task_ids` are in [0, K) (others are left out of the statistics).
    mean_coef, bound_coef, regulation_coef: λ_m, λ_b, λ_r, Python numbers >= 0; 0 removes the term.
    bound: B > 0.
    stats_momentum: m in [0, 1): EMA momentum of the running statistics and their weight in the regulation term.
    importance_clip: upper clip (> 0) of the importance weights π/π'.
    target_var: the per-task variance the regulation term aims at (> 0).

  batch (arrays, leading dimension B):
    chosen_tokens, chosen_mask, rejected_tokens, rejected_mask [B, S]: as `make_rm_step`.
    task_ids [B] int: the task of each pair's prompt (required when num_tasks > 1; else all 0).
    weights [B] float, optional: per-pair weight / mask (0 drops a pair from every term and the statistics);
      absent = all ones, computed exactly as the RM step computes its loss.
    chosen_logp_target, chosen_logp_behaviour, rejected_logp_target, rejected_logp_behaviour [B], optional: the
      sequence log-probs log π(y|x) under the target policy (SFT) and log π'(y|x) under the policy that sampled the
      pair; all four or none (none: the pairs come from the target policy and every w = 1).
    prompt_ids [B] int, optional: pairs with equal ids share a prompt and form one group of the mean term.

  Returns:
    step; metrics: train/loss, train/grad_norm, am/loss, am/rank_loss, am/mean_loss, am/bound_loss,
    am/regulate_loss (every term is reported, also those switched off), am/accuracy, am/importance_weight,
    am/score_mean, am/score_std, am/score_abs_max, and for i < num_tasks am/task{i}/mean, am/task{i}/std,
    am/task{i}/count (this batch; 0 for absent tasks), am/task{i}/running_mean, am/task{i}/running_std (after the
    update).
  """
  _check_num_tasks(num_tasks)
  for name, v in (("mean_coef", mean_coef), ("bound_coef", bound_coef), ("regulation_coef", regulation_coef)):
    if not (common.is_number(v) and float(v) >= 0):
      raise ValueError(f"`{name}` must be a Python number >= 0 (0 switches the term off), got {v!r}")
  for name, v in (("bound", bound), ("importance_clip", importance_clip), ("target_var", target_var)):
    if not (common.is_number(v) and float(v) > 0):
      raise ValueError(f"`{name}` must be a number > 0, got {v!r}")
  if not (common.is_number(stats_momentum) and 0.0 <= float(stats_momentum) < 1.0):
    raise ValueError(f"`stats_momentum` must be in [0, 1), got {stats_momentum!r}")
  stat_kw = dict(num_tasks=num_tasks, momentum=stats_momentum, target_var=target_var)

  def inputs(batch):
    b = batch["chosen_tokens"].shape[0]
    pair_w = None if "weights" not in batch else jnp.asarray(batch["weights"], jnp.float32)
    pw = jnp.ones((b,), jnp.float32) if pair_w is None else pair_w
    task_ids = batch["task_ids"] if "task_ids" in batch else jnp.zeros((b,), jnp.int32)
    return pair_w, pw, _stat_ids(task_ids, pw, num_tasks), batch.get("prompt_ids")

  def loss_fn(params, batch, stats):
    a_c, a_r = _pair_scores(apply_fn, params, batch)
    pair_w, pw, ids_2B, prompt_ids = inputs(batch)
    loss, _ = _rank_term(a_c, a_r, pair_w)
    if mean_coef:
      w_c, w_r = _importance_weights(batch, importance_clip)
      loss = loss + mean_coef * _mean_term(a_c, a_r, w_c, w_r, pw, prompt_ids)
    if bound_coef:
      loss = loss + bound_coef * _bound_term(a_c, a_r, pw, bound)
    if regulation_coef:
      loss = loss + regulation_coef * _regulation_term(a_c, a_r, ids_2B, stats, **stat_kw)
    return loss, (a_c, a_r)

  def step(state: AMState, batch: dict):
    _check_batch(batch, num_tasks)
    stats = state.task_stats
    (loss, (a_c, a_r)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.model.params, batch, stats)
    model = apply_gradients(state.model, grads, optimizer)
    a_c, a_r = jax.lax.stop_gradient(a_c), jax.lax.stop_gradient(a_r)
    pair_w, pw, ids_2B, prompt_ids = inputs(batch)
    new_stats = losses.update_task_stats(stats, jnp.concatenate([a_c, a_r]), ids_2B, momentum=stats_momentum)

    # Metrics: every term from the pre-update scores, outside the differentiated function.
    w_c, w_r = _importance_weights(batch, importance_clip)
    rank, accuracy = _rank_term(a_c, a_r, pair_w)
    scores_2B, w_2B = jnp.concatenate([a_c, a_r]), jnp.concatenate([pw, pw])
    metrics = {
        "train/loss": loss,
        "train/grad_norm": optax.global_norm(grads),
        "am/loss": loss,
        "am/rank_loss": rank,
        "am/mean_loss": _mean_term(a_c, a_r, w_c, w_r, pw, prompt_ids),
        "am/bound_loss": _bound_term(a_c, a_r, pw, bound),
        "am/regulate_loss": _regulation_term(a_c, a_r, ids_2B, stats, **stat_kw),
        "am/accuracy": accuracy,
        "am/importance_weight": common.masked_mean(jnp.concatenate([w_c, w_r]), w_2B),
        "am/score_mean": common.masked_mean(scores_2B, w_2B),
        "am/score_std": jnp.sqrt(common.masked_var(scores_2B, w_2B)),
        "am/score_abs_max": jnp.max(jnp.where(w_2B > 0, jnp.abs(scores_2B), 0.0)),
    }
    mu, var, count = losses.task_statistics(scores_2B, ids_2B, num_tasks=num_tasks)
    for i in range(num_tasks):
      metrics[f"am/task{i}/mean"] = mu[i]
      metrics[f"am/task{i}/std"] = jnp.sqrt(var[i])
      metrics[f"am/task{i}/count"] = count[i]
      metrics[f"am/task{i}/running_mean"] = new_stats.mean[i]
      metrics[f"am/task{i}/running_std"] = jnp.sqrt(new_stats.var[i])
    return AMState(model=model, task_stats=new_stats), metrics

  return step

