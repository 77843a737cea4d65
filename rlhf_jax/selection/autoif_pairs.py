"""AutoIF preference-pair construction from verifier accuracies (ALGORITHMS §9.2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses import common


def _pick(candidates_PxN, key, max_pick):
  """Up to `max_pick` candidate indices per row, uniformly without replacement."""
  P, N = candidates_PxN.shape
  u = jax.random.uniform(key, (P, N))
  # Candidates get a random key in (0, 1), non-candidates −1: the top entries
  # of a descending sort are a uniform random subset of the candidates.
  score = jnp.where(candidates_PxN, u, -1.0)
  idx = jnp.argsort(-score, axis=-1, stable=True)[:, :max_pick]
  n_cand = jnp.sum(candidates_PxN, axis=-1)
  count = jnp.minimum(n_cand, max_pick)
  return idx.astype(jnp.int32), count


def autoif_pair_indices(accuracy_PxN,
                        *,
                        key,
                        pos_threshold: float = 0.5,
                        neg_value: float = 0.0,
                        max_pos: int = 2,
                        max_neg: int = 2,
                        strict: bool = True):
  """DPO pairs from per-response verification accuracies (AutoIF query level).

  Positives: accuracy > pos_threshold (`strict=True`, the paper's rule, the
  Part A default) or ≥ pos_threshold (`strict=False`, the official code's
  `2_dpo_data_query_construct.py`). Negatives: accuracy == neg_value.

  The code's rule "if either list has ≥ 2 items sample up to 2 of each, else up
  to 1 of each" equals sampling min(max_pos, #pos) positives and
  min(max_neg, #neg) negatives (when both lists have ≤ 1 item the caps do not
  bind), uniformly without replacement; all chosen × rejected combinations are
  emitted, so at most max_pos · max_neg pairs per prompt. A prompt with no
  positive or no negative yields no pair.

  Args:
    accuracy_PxN: [P, N] pass rates in [0, 1] of N responses per prompt.
    key: PRNG key for the subsampling.
    pos_threshold: positive threshold.
    neg_value: the accuracy that marks a negative.
    max_pos, max_neg: caps (static).
    strict: use > (True) or ≥ (False) for positives.

  Returns:
    (chosen_idx, rejected_idx, valid), each [P, max_pos · max_neg]: response
    indices into N (int32) and a float validity mask.
  """
  common.check_ndim(accuracy_PxN, 2, "accuracy")
  if max_pos < 1 or max_neg < 1:
    raise ValueError("`max_pos` and `max_neg` must be >= 1.")
  acc = jnp.asarray(accuracy_PxN, jnp.float32)
  P, N = acc.shape
  pos = acc > pos_threshold if strict else acc >= pos_threshold
  neg = acc == neg_value
  k_pos, k_neg = jax.random.split(key)
  pos_idx, n_pos = _pick(pos, k_pos, min(max_pos, N))
  neg_idx, n_neg = _pick(neg, k_neg, min(max_neg, N))
  # Pad to the caps when N is smaller than them (padded slots are invalid).
  pos_idx = jnp.pad(pos_idx, ((0, 0), (0, max_pos - pos_idx.shape[1])))
  neg_idx = jnp.pad(neg_idx, ((0, 0), (0, max_neg - neg_idx.shape[1])))
  a = jnp.arange(max_pos)
  b = jnp.arange(max_neg)
  chosen = jnp.repeat(pos_idx, max_neg, axis=1)           # a-major
  rejected = jnp.tile(neg_idx, (1, max_pos))
  valid_a = a[None, :] < n_pos[:, None]                   # [P, max_pos]
  valid_b = b[None, :] < n_neg[:, None]                   # [P, max_neg]
  valid = (valid_a[:, :, None] & valid_b[:, None, :]).reshape(P, -1)
  return chosen, rejected, valid.astype(jnp.float32)
