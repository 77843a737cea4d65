"""Tests for AutoIF pair construction, k-means and rehearsal masks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import selection

pairs = jax.jit(selection.autoif_pair_indices,
                static_argnames=("max_pos", "max_neg", "strict"))


def _pairs_set(c, r, v):
  return {(int(a), int(b)) for a, b, ok in zip(c, r, v) if ok}


def test_autoif_example_gives_four_pairs():
  acc = jnp.array([[1.0, 0.6, 0.0, 0.0, 0.3]])
  c, r, v = pairs(acc, key=jax.random.key(0))
  assert c.shape == (1, 4)
  assert _pairs_set(c[0], r[0], v[0]) == {(0, 2), (0, 3), (1, 2), (1, 3)}


def test_autoif_threshold_rules_and_caps():
  acc = jnp.array([
      [0.5, 0.0, 0.2, 0.2],     # 0.5 is positive only with ≥
      [1.0, 0.9, 0.8, 0.0],     # 3 positives, 1 negative → 2 × 1 pairs
      [1.0, 0.3, 0.0, 0.2],     # 1 × 1
      [1.0, 0.9, 0.7, 0.6],     # no negative → none
  ])
  c, r, v = pairs(acc, key=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(v).sum(1), [0, 2, 1, 0])
  c2, r2, v2 = pairs(acc, key=jax.random.key(1), strict=False)
  assert _pairs_set(c2[0], r2[0], v2[0]) == {(0, 1)}
  for row in range(4):
    for a, b, ok in zip(c[row], r[row], v[row]):
      if ok:
        assert float(acc[row, a]) > 0.5 and float(acc[row, b]) == 0.0


def test_autoif_positive_subsample_is_uniform():
  acc = jnp.array([[1.0, 0.9, 0.8, 0.0]])
  keys = jax.random.split(jax.random.key(2), 3000)
  c, _, v = jax.jit(jax.vmap(lambda k: selection.autoif_pair_indices(
      acc, key=k)))(keys)
  chosen = np.asarray(c)[:, 0, :][np.asarray(v)[:, 0, :] > 0]
  # Each draw keeps 2 of the 3 positives: every positive with prob 2/3.
  freq = np.bincount(chosen, minlength=4)[:3] / 3000
  assert np.max(np.abs(freq - 2 / 3)) < 5 * np.sqrt(2 / 9 / 3000)


def _blobs(seed=0, per=20):
  rng = np.random.default_rng(seed)
  centers = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
  x = np.concatenate([c + rng.normal(0, 0.5, (per, 3)) for c in centers])
  labels = np.repeat(np.arange(3), per)
  return x.astype(np.float32), labels


def test_kmeans_recovers_separated_clusters():
  x, labels = _blobs()
  km = jax.jit(functools.partial(selection.kmeans, k=3, iters=10))
  for seed in range(3):
    cents, assign = km(x, np.ones(len(x)), key=jax.random.key(seed))
    assign = np.asarray(assign)
    # Same partition up to relabelling.
    for lab in range(3):
      assert len(set(assign[labels == lab])) == 1
    assert len(set(assign)) == 3
    for lab in range(3):
      np.testing.assert_allclose(cents[assign[labels == lab][0]],
                                 x[labels == lab].mean(0), atol=1e-4)
  mask = np.ones(len(x))
  mask[:5] = 0
  _, a = km(x, mask, key=jax.random.key(0))
  assert np.all(np.asarray(a)[:5] == -1)


def test_rehearsal_mask_per_cluster_top_k():
  x, labels = _blobs(1, per=10)
  scores = np.random.default_rng(2).normal(size=len(x)).astype(np.float32)
  rm = jax.jit(functools.partial(selection.rehearsal_mask, num_clusters=3,
                                 top_k=2))
  sel = rm(x, scores, np.ones(len(x)), key=jax.random.key(0))
  sel = np.asarray(sel)
  assert sel.sum() == 6
  for lab in range(3):
    idx = np.flatnonzero(labels == lab)
    want = idx[np.argsort(-scores[idx], kind="stable")[:2]]
    assert set(np.flatnonzero(sel)) & set(idx) == set(want)
  mask = np.ones(len(x))
  mask[np.flatnonzero(sel)] = 0      # the previous winners become invalid
  sel2 = np.asarray(rm(x, scores, mask, key=jax.random.key(0)))
  assert sel2.sum() == 6 and not np.any(sel2 * sel)


def test_per_group_top_k_ties_and_ignored_groups():
  scores = jnp.array([1.0, 1.0, 1.0, 5.0, 2.0])
  groups = jnp.array([0, 0, 0, -1, 1])
  np.testing.assert_array_equal(
      selection.per_group_top_k(scores, groups, num_groups=2, top_k=2),
      [1, 1, 0, 0, 1])
