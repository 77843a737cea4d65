"""Masked reducers, log-prob helpers and loss aggregation shared by every loss.

Everything here is a pure function of arrays. Masks may be boolean or float;
a float mask acts as a per-element weight (0 drops an element). Divisions by a
mask total are guarded so that an all-zero mask yields 0 (not NaN) and finite
gradients.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean")


# ----------------------------------------------------------------------------
# Argument checks (raise ValueError naming the argument)
# ----------------------------------------------------------------------------


def check_ndim(x, ndim: int | Sequence[int], name: str) -> None:
  """Raises ValueError unless `x.ndim` is `ndim` (or one of `ndim`)."""
  allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
  if jnp.ndim(x) not in allowed:
    raise ValueError(
        f"`{name}` must have rank {' or '.join(map(str, allowed))}, got shape"
        f" {jnp.shape(x)}.")


def check_same_shape(x, name_x: str, y, name_y: str) -> None:
  """Raises ValueError unless `x` and `y` have the same shape."""
  if jnp.shape(x) != jnp.shape(y):
    raise ValueError(
        f"`{name_y}` must have the shape of `{name_x}` {jnp.shape(x)}, got"
        f" {jnp.shape(y)}.")


def check_floating(x, name: str) -> None:
  """Raises ValueError unless `x` has a floating dtype."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"`{name}` must be a floating array, got dtype"
                     f" {jnp.result_type(x)}.")


def check_loss_agg(loss_agg: str) -> None:
  if loss_agg not in LOSS_AGGREGATIONS:
    raise ValueError(f"`loss_agg` must be one of {LOSS_AGGREGATIONS}, got"
                     f" {loss_agg!r}.")


def is_number(x) -> bool:
  """True for Python/numpy scalars: hyperparameters we can validate eagerly.

  Traced hyperparameters (e.g. a KL coefficient carried in the train state)
  skip the eager range checks instead of failing on a tracer comparison.
  """
  return isinstance(x, (int, float)) and not isinstance(x, bool) or (
      hasattr(x, "dtype") and getattr(x, "ndim", 1) == 0 and
      not isinstance(x, jax.core.Tracer))


def safe_divide(num, den):
  """`num / den` where `den != 0`, else 0, with finite gradients everywhere."""
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


# ----------------------------------------------------------------------------
# Masked reducers
# ----------------------------------------------------------------------------


def _as_float_mask(mask, like):
  mask = jnp.asarray(mask)
  dtype = jnp.promote_types(jnp.result_type(like), jnp.float32)
  return jnp.broadcast_to(mask, jnp.shape(like)).astype(dtype)


def masked_sum(x, mask, axis=None):
  """Σ x·mask over `axis` (all axes when None). `mask` broadcasts to `x`."""
  x = jnp.asarray(x)
  m = _as_float_mask(mask, x)
  # where() rather than x*m alone so NaN/inf in masked-out slots cannot leak.
  return jnp.sum(jnp.where(m != 0, x * m, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
  """Σ x·mask / Σ mask over `axis`; 0 where the mask total is 0."""
  x = jnp.asarray(x)
  m = _as_float_mask(mask, x)
  return safe_divide(masked_sum(x, m, axis=axis), jnp.sum(m, axis=axis))


def masked_var(x, mask, axis=None, *, unbiased: bool = False):
  """Masked variance: mean of (x − masked_mean)² over the mask.

  With `unbiased=True` the sum of squares is divided by (Σ mask − 1) (Bessel's
  correction for a 0/1 mask); the result is 0 when fewer than two elements are
  valid.
  """
  x = jnp.asarray(x)
  m = _as_float_mask(mask, x)
  mean = masked_mean(x, m, axis=axis)
  mean_b = mean if axis is None else jnp.expand_dims(mean, axis)
  sq = masked_sum(jnp.square(x - mean_b), m, axis=axis)
  count = jnp.sum(m, axis=axis)
  if unbiased:
    count = jnp.where(count > 1, count - 1, 0.0)
  return safe_divide(sq, count)


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8):
  """Normalises `x` to zero mean and unit variance over the masked elements.

  out = (x − μ) / sqrt(σ² + eps), with μ, σ² the masked mean and (biased)
  variance over all elements where mask ≠ 0. With `shift_mean=False` the mean is
  added back (only the scale changes), as OpenRLHF does for rewards. Elements
  outside the mask are set to 0.
  """
  x = jnp.asarray(x)
  m = _as_float_mask(mask, x)
  mean = masked_mean(x, m)
  var = masked_var(x, m)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(m != 0, out, 0.0)


# ----------------------------------------------------------------------------
# Log-probs and entropy
# ----------------------------------------------------------------------------


def token_logprobs(logits_BxTxV, targets_BxT):
  """log softmax(logits)[target] per position, in float32.

  Computed as logits[target] − logsumexp(logits) so the full [B, T, V]
  log-softmax is never materialised in float32 beyond the reduction.

  Args:
    logits_BxTxV: [B, T, V] logits (any float dtype; upcast to float32).
    targets_BxT: [B, T] integer token ids.

  Returns:
    [B, T] float32 log-probabilities of `targets_BxT`.
  """
  check_ndim(logits_BxTxV, 3, "logits")
  check_ndim(targets_BxT, 2, "targets")
  if jnp.shape(logits_BxTxV)[:2] != jnp.shape(targets_BxT):
    raise ValueError(f"`targets` shape {jnp.shape(targets_BxT)} must match the"
                     f" first two dims of `logits` {jnp.shape(logits_BxTxV)}.")
  if not jnp.issubdtype(jnp.result_type(targets_BxT), jnp.integer):
    raise ValueError("`targets` must be an integer array, got dtype"
                     f" {jnp.result_type(targets_BxT)}.")
  logits = logits_BxTxV.astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxT = jnp.take_along_axis(
      logits, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return target_logit_BxT - lse_BxT


def sequence_logprobs(token_logprobs_BxT, mask_BxT):
  """Σ_t log π(y_t) over the masked (response) tokens → [B]."""
  check_ndim(token_logprobs_BxT, 2, "token_logprobs")
  check_same_shape(token_logprobs_BxT, "token_logprobs", mask_BxT, "mask")
  return masked_sum(token_logprobs_BxT, mask_BxT, axis=-1)


def entropy_from_logits(logits, mask=None):
  """Per-position entropy −Σ_v p_v log p_v of softmax(logits), in float32.

  Args:
    logits: [..., V] logits.
    mask: optional array of shape logits.shape[:-1]; masked-out entries are 0.

  Returns:
    Entropy of shape logits.shape[:-1], float32.
  """
  logits = jnp.asarray(logits).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  if mask is not None:
    check_same_shape(ent, "logits[..., 0]", mask, "mask")
    ent = jnp.where(jnp.asarray(mask) != 0, ent, 0.0)
  return ent


# ----------------------------------------------------------------------------
# Loss aggregation
# ----------------------------------------------------------------------------


def check_weights(weights, batch: int):
  if weights is None:
    return
  check_ndim(weights, 1, "weights")
  if jnp.shape(weights)[0] != batch:
    raise ValueError(f"`weights` must have shape [{batch}], got"
                     f" {jnp.shape(weights)}.")


def aggregate_loss(loss_BxT,
                   mask_BxT,
                   *,
                   loss_agg: str,
                   weights_B: Optional[jax.Array] = None):
  """Reduces a per-token loss to a scalar.

  - "seq_mean_token_mean": l_b = Σ_t m·loss / Σ_t m, then
    Σ_b w_b l_b / Σ_b w_b over sequences with at least one valid token (empty
    sequences are excluded so a fully masked row is the same as a dropped row).
  - "token_mean": Σ_{b,t} w_b m_bt loss_bt / Σ_{b,t} w_b m_bt.

  `weights_B` defaults to ones. The result is 0 when nothing is valid.
  """
  check_loss_agg(loss_agg)
  m_BxT = _as_float_mask(mask_BxT, loss_BxT)
  w_B = (jnp.ones(loss_BxT.shape[:1], m_BxT.dtype)
         if weights_B is None else jnp.asarray(weights_B, m_BxT.dtype))
  if loss_agg == "seq_mean_token_mean":
    per_seq_B = masked_mean(loss_BxT, m_BxT, axis=-1)
    has_tokens_B = jnp.sum(m_BxT, axis=-1) > 0
    w_B = jnp.where(has_tokens_B, w_B, 0.0)
    return safe_divide(jnp.sum(w_B * per_seq_B), jnp.sum(w_B))
  return masked_mean(loss_BxT, m_BxT * w_B[:, None])


def token_weights(mask_BxT, weights_B=None):
  """Per-token weights m_bt·w_b used for metrics of weighted losses."""
  m_BxT = jnp.asarray(mask_BxT).astype(jnp.float32)
  if weights_B is None:
    return m_BxT
  return m_BxT * jnp.asarray(weights_B, jnp.float32)[:, None]


def masked_max(x, mask):
  """Max of `x` over mask ≠ 0; 0 when nothing is valid."""
  valid = jnp.asarray(mask) != 0
  return jnp.where(jnp.any(valid), jnp.max(jnp.where(valid, x, -jnp.inf)), 0.0)
