"""DPO step: sigmoid (DPO, cDPO), IPO and hinge on chosen/rejected sequences of one prompt (ALGORITHMS §8).

The reference log-probs come either precomputed once per dataset (offline DPO:
`make_sequence_logps_fn` over the dataset, then `ref_chosen_logps` /
`ref_rejected_logps` in every batch) or from the reference parameters inside
the same jitted call (`reference="inline"`: `step(state, batch, ref_params)`),
under `stop_gradient` either way.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.losses.dpo import DPO_LOSS_TYPES
from rlhf_jax.state import TrainState, apply_gradients_with_status
from rlhf_jax.steps.common import Microbatch, map_rows, rowwise_value_and_grad

REFERENCES = ("precomputed", "inline")
_PAIR_KEYS = ("chosen_tokens", "chosen_mask", "chosen_loss_mask", "rejected_tokens", "rejected_mask",
              "rejected_loss_mask", "weights")


def sequence_logps(apply_fn: Callable, params, tokens_BxS, mask_BxS, loss_mask_BxS) -> jax.Array:
  """log π(y|x) = Σ_t loss_mask_t · log softmax(logits_{t−1})[y_t] (float32): [B].

  Layout of `tokenizer.encode_pairs`: slot t is predicted by the logits at
  t − 1, and `loss_mask` marks the response tokens (EOS included), so the
  prompt and the padding contribute nothing.
  """
  logits_BxTxV, _ = apply_fn(params, tokens_BxS[:, :-1], mask_BxS[:, :-1])
  lp_BxT = losses.token_logprobs(logits_BxTxV, tokens_BxS[:, 1:])
  return losses.sequence_logprobs(lp_BxT, loss_mask_BxS[:, 1:])


def make_sequence_logps_fn(apply_fn: Callable) -> Callable:
  """`logps(params, tokens, mask, loss_mask) -> [B]` (jittable): reference log-probs once per dataset."""

  def logps(params, tokens_BxS, mask_BxS, loss_mask_BxS):
    return sequence_logps(apply_fn, params, tokens_BxS, mask_BxS, loss_mask_BxS)

  return logps


def pair_logps(apply_fn: Callable, params, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(log π(y_w|x), log π(y_l|x)), each [B], from ONE forward over chosen ++ rejected [2B, S]."""
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], 0)
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], 0)
  loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]], 0)
  logps_2B = sequence_logps(apply_fn, params, tokens, mask, loss_mask)
  b = batch["chosen_tokens"].shape[0]
  return logps_2B[:b], logps_2B[b:]


def _check_batch(batch: dict, reference: str) -> None:
  keys = _PAIR_KEYS + (("ref_chosen_logps", "ref_rejected_logps") if reference == "precomputed" else ())
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"DPO batch is missing {missing} (reference={reference!r}); it has {sorted(batch)}")
  shape = jnp.shape(batch["chosen_tokens"])
  if len(shape) != 2:
    raise ValueError(f"`chosen_tokens` must be [B, S], got shape {shape}")
  for k in _PAIR_KEYS[1:6]:
    if jnp.shape(batch[k]) != shape:
      raise ValueError(f"`{k}` must have the shape of `chosen_tokens` {shape}, got {jnp.shape(batch[k])}")
  for k in ("weights", "ref_chosen_logps", "ref_rejected_logps"):
    if k in batch and jnp.shape(batch[k]) != shape[:1]:
      raise ValueError(f"`{k}` must have shape [{shape[0]}], got {jnp.shape(batch[k])}")


def make_dpo_step(apply_fn: Callable, optimizer: optax.GradientTransformation, *, beta: float,
                  loss_type: str = "sigmoid", label_smoothing: float = 0.0, reference: str = "precomputed",
                  ref_apply_fn: Optional[Callable] = None, microbatch: Microbatch = None) -> Callable:
  """DPO update on preference pairs.

  With h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), sequence
  log-probs summed over response tokens, the per-pair loss is `losses.dpo_loss`'s:
    sigmoid: −(1 − ε) log σ(βh) − ε log σ(−βh)   (ε = label_smoothing: cDPO)
    ipo:     (h − 1/(2β))²
    hinge:   max(0, 1 − βh)
  reduced as the weighted mean Σ_b w_b ℓ_b / Σ_b w_b (0 when Σ w = 0). A pair
  of weight 0 (padding, invalid pair) is a mask: it changes neither the loss
  nor the gradient, and the batch keeps its static shape.

  batch (layout of `tokenizer.encode_pairs`: prompt left-padded, response
  right-padded, loss_mask marks response tokens incl. EOS):
    chosen_tokens, chosen_mask, chosen_loss_mask,
    rejected_tokens, rejected_mask, rejected_loss_mask   [B, S] int
    weights                                              [B] float (0 = masked pair)
    ref_chosen_logps, ref_rejected_logps                 [B] (reference="precomputed" only)

  Args:
    apply_fn: `apply_fn(params, tokens, mask) -> (logits, cache)` of the policy.
    optimizer: the transformation that built `state.opt_state`.
    beta: β > 0.
    loss_type: "sigmoid", "ipo" or "hinge".
    label_smoothing: ε ∈ [0, 0.5) (sigmoid only).
    reference: "precomputed" — `step(state, batch)` reads the reference
      log-probs from the batch; "inline" — `step(state, batch, ref_params)`
      computes them in the same call with `ref_apply_fn` (default `apply_fn`).
    ref_apply_fn: the reference model's apply_fn (inline only).
    microbatch: pairs per forward/backward chunk (gradient accumulation, the same gradient;
      `steps.common.microbatch_rows`: None, a number of pairs or "auto").

  Returns:
    `step(state, batch[, ref_params]) -> (state, metrics)`; metrics (all
    weighted by the pair weights): 'dpo/loss', 'dpo/logits', 'rewards/chosen',
    'rewards/rejected' (β(log π − log π_ref)), 'rewards/margin',
    'rewards/accuracy', 'logps/chosen', 'logps/rejected', 'dpo/pairs' (Σ w),
    'train/loss', 'train/grad_norm', 'train/skipped'.
  """
  if reference not in REFERENCES:
    raise ValueError(f"`reference` must be one of {REFERENCES}, got {reference!r}")
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"`loss_type` must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
  if not beta > 0:
    raise ValueError(f"`beta` must be > 0, got {beta}")
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"`label_smoothing` must be in [0, 0.5), got {label_smoothing}")
  if loss_type != "sigmoid" and label_smoothing != 0:
    raise ValueError(f"`label_smoothing` only applies to loss_type='sigmoid', got loss_type={loss_type!r}")
  if ref_apply_fn is not None and reference != "inline":
    raise ValueError("`ref_apply_fn` is only used with reference='inline'")
  ref_apply_fn = apply_fn if ref_apply_fn is None else ref_apply_fn

  def rows_fn(params, pairs):
    return pair_logps(apply_fn, params, pairs)

  def loss_fn(outputs, weights_B, ref_chosen_B, ref_rejected_B):
    chosen_B, rejected_B = outputs
    loss, metrics = losses.dpo_loss(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, beta=beta,
                                    loss_type=loss_type, label_smoothing=label_smoothing, weights=weights_B)
    mean = lambda x: losses.masked_mean(jax.lax.stop_gradient(x), weights_B)
    metrics = {**metrics, "logps/chosen": mean(chosen_B), "logps/rejected": mean(rejected_B),
               "dpo/pairs": jnp.sum(weights_B)}
    return loss, metrics

  def update(state: TrainState, batch: dict, ref_chosen_B, ref_rejected_B):
    ref_chosen_B = jax.lax.stop_gradient(jnp.asarray(ref_chosen_B, jnp.float32))
    ref_rejected_B = jax.lax.stop_gradient(jnp.asarray(ref_rejected_B, jnp.float32))
    weights_B = jax.lax.stop_gradient(jnp.asarray(batch["weights"], jnp.float32))
    pairs = {k: batch[k] for k in _PAIR_KEYS[:6]}
    # The DPO loss is a weighted mean of per-pair terms: chunks of pairs accumulate the exact gradient.
    (loss, metrics), grads = rowwise_value_and_grad(
        rows_fn, lambda out: loss_fn(out, weights_B, ref_chosen_B, ref_rejected_B), state.params, pairs,
        fill=(ref_chosen_B, ref_rejected_B), microbatch=microbatch,
        layer_views=getattr(apply_fn, "layer_views", None))
    new_state, skipped = apply_gradients_with_status(state, grads, optimizer, loss=loss)
    return new_state, {**metrics, "train/loss": loss, "train/grad_norm": optax.global_norm(grads),
                       "train/skipped": skipped}

  if reference == "precomputed":

    def step(state: TrainState, batch: dict):
      _check_batch(batch, reference)
      return update(state, batch, batch["ref_chosen_logps"], batch["ref_rejected_logps"])

  else:

    def step(state: TrainState, batch: dict, ref_params):
      _check_batch(batch, reference)
      pairs = {k: batch[k] for k in _PAIR_KEYS[:6]}
      ref_chosen_B, ref_rejected_B = map_rows(lambda rows: pair_logps(ref_apply_fn, ref_params, rows), microbatch,
                                              pairs)
      return update(state, batch, ref_chosen_B, ref_rejected_B)

  return step
