"""Bradley–Terry reward-model step on preference pairs."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.state import TrainState, apply_gradients
from rlhf_jax.steps.common import Microbatch, rowwise_value_and_grad, sequence_scores


def _pair_scores(apply_fn, params, batch):
  """One forward for chosen and rejected together: rewards [B] each."""
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], 0)
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], 0)
  scores = sequence_scores(apply_fn, params, tokens, mask)
  b = batch["chosen_tokens"].shape[0]
  return scores[:b], scores[b:]


def make_rm_step(apply_fn: Callable, optimizer: optax.GradientTransformation, *,
                 margin: Optional[float] = None, microbatch: Microbatch = None) -> Callable:
  """`step(state, batch) -> (state, metrics)`; BT loss −log σ(r_c − r_r [− m]).

  batch: chosen_tokens, chosen_mask, rejected_tokens, rejected_mask, each
  [B, S] (prompt left-padded, response right-padded). `apply_fn` is a
  scalar-head model; the reward is its value at the last valid token.
  microbatch: pairs per forward/backward chunk (the BT loss is a mean of per-pair
  terms, so accumulating over chunks gives the same gradient; `steps.common.microbatch_rows`).
  """

  def loss_fn(scores):
    chosen, rejected = scores
    m = None if margin is None else jnp.full_like(chosen, margin)
    return losses.bradley_terry_loss(chosen, rejected, margin=m)

  def step(state: TrainState, batch: dict):
    pairs = {k: batch[k] for k in ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")}
    zeros = jnp.zeros(pairs["chosen_tokens"].shape[:1], jnp.float32)
    (loss, metrics), grads = rowwise_value_and_grad(lambda p, rows: _pair_scores(apply_fn, p, rows), loss_fn,
                                                    state.params, pairs, fill=(zeros, zeros), microbatch=microbatch,
                                                    layer_views=getattr(apply_fn, "layer_views", None))
    return apply_gradients(state, grads, optimizer), {**metrics, "train/loss": loss,
                                                     "train/grad_norm": optax.global_norm(grads)}

  return step


def make_rm_eval_step(apply_fn: Callable) -> Callable:
  """`eval_step(params, batch) -> (chosen_rewards, rejected_rewards)` for accuracy/calibration."""

  def eval_step(params, batch):
    return _pair_scores(apply_fn, params, batch)

  return eval_step


def make_score_fn(apply_fn: Callable) -> Callable:
  """`score(params, tokens, mask) -> rewards [B]` (read at the last valid token)."""

  def score(params, tokens_BxS, mask_BxS):
    return sequence_scores(apply_fn, params, tokens_BxS, mask_BxS)

  return score
