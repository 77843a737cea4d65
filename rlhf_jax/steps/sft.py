"""Supervised fine-tuning step: next-token NLL on response tokens only."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.state import TrainState, apply_gradients_with_status
from rlhf_jax.steps.common import Microbatch, rowwise_value_and_grad


def sft_logits_targets(apply_fn: Callable, params: Any, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Logits predicting tokens[:, 1:], the targets and the response mask."""
  tokens, mask = batch["tokens"], batch["mask"]
  logits, _ = apply_fn(params, tokens[:, :-1], mask[:, :-1])
  return logits, tokens[:, 1:], batch["loss_mask"][:, 1:]


def make_sft_step(apply_fn: Callable, optimizer: optax.GradientTransformation, *,
                  microbatch: Microbatch = None) -> Callable:
  """`step(state, batch) -> (state, metrics)` for batches from `tokenizer.encode_pairs`.

  batch: tokens, mask, loss_mask, each [B, L] int32 (prompt left-padded,
  response right-padded; loss_mask marks response tokens incl. EOS).
  metrics include `train/skipped` (1.0 when a non-finite loss or gradient
  skipped the update, see `state.apply_gradients_with_status`).
  microbatch: rows per forward/backward (gradient accumulation, the same
  gradient; `steps.common.microbatch_rows`: None, a number of rows or "auto").
  """

  def rows_fn(params, rows):
    logits, _ = apply_fn(params, rows["tokens"][:, :-1], rows["mask"][:, :-1])
    targets = rows["tokens"][:, 1:]
    return losses.token_logprobs(logits, targets), losses.token_correct(logits, targets)

  def step(state: TrainState, batch: dict):
    loss_mask = batch["loss_mask"][:, 1:]
    fill = (jnp.zeros(loss_mask.shape, jnp.float32),) * 2
    (loss, metrics), grads = rowwise_value_and_grad(
        rows_fn, lambda out: losses.sft_loss_from_logprobs(*out, loss_mask), state.params,
        {"tokens": batch["tokens"], "mask": batch["mask"]}, fill=fill,
        microbatch=microbatch, layer_views=getattr(apply_fn, "layer_views", None))
    # A non-finite loss or gradient skips the update (params unchanged); `train/skipped` is 1.0 then.
    new_state, skipped = apply_gradients_with_status(state, grads, optimizer, loss=loss)
    metrics = {**metrics, "train/loss": loss, "train/grad_norm": optax.global_norm(grads), "train/skipped": skipped}
    return new_state, metrics

  return step


def make_sft_eval_step(apply_fn: Callable) -> Callable:
  """`eval_step(params, batch) -> metrics` (same loss, no update)."""

  def eval_step(params, batch):
    logits, targets, loss_mask = sft_logits_targets(apply_fn, params, batch)
    return losses.sft_loss(logits, targets, loss_mask)[1]

  return eval_step
