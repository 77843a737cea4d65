"""R² between reward and true score over kept samples (PF-PPO §4.5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common


def r_squared(x, y, mask=None):
  """Squared Pearson correlation of x and y over entries with mask ≠ 0.

    R² = cov(x, y)² / (var(x) var(y))

  equal to the R² of the least-squares line y ≈ a x + b. 0 when either variance
  is 0 (fewer than two distinct points).

  Args:
    x, y: arrays of the same shape.
    mask: optional array of that shape (float masks weight entries).

  Returns:
    Scalar float32 R² ∈ [0, 1].
  """
  common.check_same_shape(x, "x", y, "y")
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  m = jnp.ones_like(x) if mask is None else jnp.asarray(mask, jnp.float32)
  common.check_same_shape(x, "x", m, "mask")
  mx = common.masked_mean(x, m)
  my = common.masked_mean(y, m)
  cov = common.masked_mean((x - mx) * (y - my), m)
  vx = common.masked_mean(jnp.square(x - mx), m)
  vy = common.masked_mean(jnp.square(y - my), m)
  den = vx * vy
  # Tiny relative variances are numerically zero (constant inputs).
  ok = (vx > 1e-12 * (1 + mx * mx)) & (vy > 1e-12 * (1 + my * my))
  return jnp.where(ok, jnp.clip(common.safe_divide(cov * cov, den), 0.0, 1.0),
                   0.0)


def binned_r_squared(x, y, mask=None, *, bins: int = 10):
  """The PF-PPO paper's binned R² (ALGORITHMS §4.5).

  The masked entries are sorted by x and split into `bins` equal-count groups
  (sizes differ by at most one; equal x values on a boundary are split by
  position). Each non-empty group gives one point (mean x, mean y); the R² of
  the least-squares line through these points (unweighted) is returned — for a
  line with intercept it is the squared Pearson correlation of the bin means.

  Args:
    x: [...] rewards (binning variable).
    y: [...] true scores.
    mask: optional array of that shape; entries with mask ≠ 0 are used.
    bins: number of bins (static).

  Returns:
    Scalar float32 R².
  """
  if bins < 2:
    raise ValueError(f"`bins` must be >= 2, got {bins}.")
  common.check_same_shape(x, "x", y, "y")
  x = jnp.asarray(x, jnp.float32).reshape(-1)
  y = jnp.asarray(y, jnp.float32).reshape(-1)
  valid = (jnp.ones_like(x, bool) if mask is None else
           (jnp.asarray(mask).reshape(-1) != 0))
  if mask is not None:
    common.check_same_shape(x, "x", valid, "mask")
  n_valid = jnp.sum(valid)
  # Invalid entries sort last, so valid entries take ranks 0..n_valid−1.
  order = jnp.argsort(jnp.where(valid, x + 0.0, jnp.inf), stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(x.shape[0]))
  bin_id = (rank * bins) // jnp.maximum(n_valid, 1)
  bin_id = jnp.where(valid, bin_id, bins)     # dump invalid into an extra bin
  seg = lambda v: jax.ops.segment_sum(v, bin_id, num_segments=bins + 1)[:bins]
  count = seg(valid.astype(jnp.float32))
  mean_x = common.safe_divide(seg(jnp.where(valid, x, 0.0)), count)
  mean_y = common.safe_divide(seg(jnp.where(valid, y, 0.0)), count)
  return r_squared(mean_x, mean_y, count > 0)
