"""Selective Rehearsal: k-means over prompt embeddings, per-cluster top-k (AM §10)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common


def _sq_dists(x_BxD, c_KxD):
  return (jnp.sum(x_BxD * x_BxD, -1)[:, None] - 2.0 * x_BxD @ c_KxD.T +
          jnp.sum(c_KxD * c_KxD, -1)[None, :])


def _kmeans_pp_init(x_BxD, w_B, k, key):
  """k-means++ seeding (Arthur & Vassilvitskii 2007) over rows with w_B > 0."""
  B, D = x_BxD.shape
  keys = jax.random.split(key, k)
  first = jax.random.categorical(keys[0], jnp.log(w_B))
  cents = jnp.zeros((k, D), x_BxD.dtype).at[0].set(x_BxD[first])
  d2 = jnp.sum(jnp.square(x_BxD - x_BxD[first]), -1)

  def body(i, carry):
    cents, d2 = carry
    p = w_B * d2
    # If every point coincides with a centroid, fall back to the weights.
    p = jnp.where(jnp.sum(p) > 0, p, w_B)
    nxt = jax.random.categorical(keys[i], jnp.log(p))
    cents = cents.at[i].set(x_BxD[nxt])
    d2 = jnp.minimum(d2, jnp.sum(jnp.square(x_BxD - x_BxD[nxt]), -1))
    return cents, d2

  cents, _ = jax.lax.fori_loop(1, k, body, (cents, d2))
  return cents


def kmeans(x_BxD, mask=None, *, k: int, iters: int, key):
  """Lloyd's k-means with k-means++ seeding and a fixed iteration count.

  Runs `iters` assignment/update rounds in a `lax.fori_loop` (static shapes,
  jittable). A cluster that loses all its points keeps its previous centroid.

  Args:
    x_BxD: [B, D] points.
    mask: optional [B] validity mask; invalid rows are ignored (assignment −1).
    k: number of clusters (static, ≤ number of valid points).
    iters: number of Lloyd iterations (static).
    key: PRNG key for the seeding.

  Returns:
    (centroids [k, D] float32, assignments [B] int32).
  """
  common.check_ndim(x_BxD, 2, "x")
  if k < 1:
    raise ValueError(f"`k` must be >= 1, got {k}.")
  x = jnp.asarray(x_BxD, jnp.float32)
  B = x.shape[0]
  w_B = (jnp.ones((B,), jnp.float32) if mask is None else
         (jnp.asarray(mask) != 0).astype(jnp.float32))
  if mask is not None:
    common.check_ndim(mask, 1, "mask")
  cents = _kmeans_pp_init(x, w_B, k, key)

  def assign(c):
    return jnp.argmin(_sq_dists(x, c), axis=-1)

  def body(_, c):
    a = assign(c)
    sums = jax.ops.segment_sum(x * w_B[:, None], a, num_segments=k)
    counts = jax.ops.segment_sum(w_B, a, num_segments=k)
    return jnp.where(counts[:, None] > 0,
                     sums / jnp.maximum(counts, 1.0)[:, None], c)

  cents = jax.lax.fori_loop(0, iters, body, cents)
  a = jnp.where(w_B > 0, assign(cents), -1).astype(jnp.int32)
  return cents, a


def per_group_top_k(scores_B, groups_B, *, num_groups: int, top_k: int):
  """Float mask of the `top_k` highest scores within each group.

  Ties go to the lowest index. Entries with group −1 (or ≥ num_groups) are
  never selected.
  """
  B = scores_B.shape[0]
  g = jnp.where((groups_B >= 0) & (groups_B < num_groups), groups_B,
                num_groups)
  # Primary key group, secondary −score; lexsort is stable (lowest index first).
  order = jnp.lexsort((0.0 - scores_B.astype(jnp.float32), g))
  g_sorted = g[order]
  counts = jax.ops.segment_sum(jnp.ones((B,), jnp.int32), g,
                               num_segments=num_groups + 1)
  starts = jnp.cumsum(counts) - counts
  pos_in_group = jnp.arange(B) - starts[g_sorted]
  keep_sorted = (pos_in_group < top_k) & (g_sorted < num_groups)
  return jnp.zeros((B,), jnp.float32).at[order].set(
      keep_sorted.astype(jnp.float32))


def rehearsal_mask(embeddings,
                   scores,
                   mask=None,
                   *,
                   num_clusters: int,
                   top_k: int,
                   key,
                   iters: int = 20):
  """Selective-rehearsal selection: per-cluster top-k examples by AM score.

  Clusters the embeddings with `kmeans` and keeps, inside every cluster, the
  `top_k` examples with the highest score (e.g. AM score of the expert
  response), the "representative example discovery" step of Peng et al. 2023
  (as reconstructed in ALGORITHMS §10.2).

  Args:
    embeddings: [B, D] prompt (or prompt ⊕ response) embeddings.
    scores: [B] scores used for the ranking inside a cluster.
    mask: optional [B] validity mask (invalid rows are never selected).
    num_clusters: c (static).
    top_k: examples kept per cluster (static).
    key: PRNG key for the k-means seeding.
    iters: Lloyd iterations.

  Returns:
    [B] float32 mask of the selected examples.
  """
  common.check_ndim(embeddings, 2, "embeddings")
  common.check_ndim(scores, 1, "scores")
  if scores.shape[0] != embeddings.shape[0]:
    raise ValueError(f"`scores` must have shape [{embeddings.shape[0]}], got"
                     f" {scores.shape}.")
  _, assign = kmeans(embeddings, mask, k=num_clusters, iters=iters, key=key)
  return per_group_top_k(jnp.asarray(scores), assign,
                         num_groups=num_clusters, top_k=top_k)
