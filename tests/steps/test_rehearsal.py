"""Selective Rehearsal on device (rlhf_jax.steps.rehearsal): embeddings, selection masks, the NLL term.

k-means itself (partition recovery, centroids, masked rows) is tested in tests/selection; here: the step-level
pieces on the real (tiny) Transformer and their static-shape, single-trace and bitwise-off contracts.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, models
from rlhf_jax.models import ModelConfig
from rlhf_jax.steps.rehearsal import add_rehearsal_loss, prompt_embeddings, rehearsal_nll, select_rehearsal
from rlhf_jax.steps.sft import sft_logits_targets

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64, max_seq_len=32)


@pytest.fixture(scope="module")
def lm():
  params = jax.jit(functools.partial(models.init_params, CFG))(jax.random.PRNGKey(0))
  return models.make_apply_fn(CFG), params


def left_pad(rows, length, pad=0):
  tokens = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    tokens[i, length - len(r):] = r
    mask[i, length - len(r):] = 1
  return jnp.asarray(tokens), jnp.asarray(mask)


def test_prompt_embeddings_are_masked_means_and_ignore_padding(lm):
  apply_fn, params = lm
  rows = [[5, 6, 7], [9, 10, 11, 12, 13], [1]]
  tokens, mask = left_pad(rows, 8)
  emb = jax.jit(functools.partial(prompt_embeddings, apply_fn))(params, tokens, mask)
  assert emb.shape == (3, CFG.dim) and emb.dtype == jnp.float32
  hidden = jax.jit(functools.partial(apply_fn, return_hidden=True))
  for i, r in enumerate(rows):
    # The same prompt alone, unpadded: padding changes nothing.
    h, _ = hidden(params, jnp.asarray([r]), jnp.ones((1, len(r)), jnp.int32))
    np.testing.assert_allclose(emb[i], h[0].mean(0), atol=1e-5, rtol=1e-5)
  # No gradient flows through the selection's inputs.
  g = jax.jit(jax.grad(lambda p: prompt_embeddings(apply_fn, p, tokens, mask).sum()))(params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g))


def test_selection_on_policy_embeddings_takes_the_best_expert_of_each_prompt_family(lm):
  """Three families of prompts (one repeated token each, ragged lengths): one pick per family, the top AM score."""
  apply_fn, params = lm
  rng = np.random.default_rng(0)
  fam = np.repeat(np.arange(3), 5)
  rows = [[int(t)] * int(n) for t, n in zip(np.array([3, 30, 50])[fam], rng.integers(5, 9, fam.size))]
  tokens, mask = left_pad(rows, 10)
  emb = jax.jit(functools.partial(prompt_embeddings, apply_fn))(params, tokens, mask)
  scores = jnp.asarray(rng.normal(size=fam.size), jnp.float32)
  sel = jax.jit(functools.partial(select_rehearsal, k_clusters=3, per_cluster=1))(
      emb, scores, jnp.ones(fam.size), key=jax.random.PRNGKey(1))
  sel = np.asarray(sel)
  want = [np.flatnonzero(fam == f)[np.argmax(np.asarray(scores)[fam == f])] for f in range(3)]
  np.testing.assert_array_equal(np.flatnonzero(sel), sorted(want))


def blobs(seed, per=6):
  rng = np.random.default_rng(seed)
  centers = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) * rng.uniform(1, 5, (3, 1))
  x = np.concatenate([c + rng.normal(0, 0.05, (per, 3)) for c in centers]).astype(np.float32)
  return x, np.repeat(np.arange(3), per)


def test_selection_is_a_static_shape_mask_traced_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def sel_fn(x, scores, valid, key):
    return select_rehearsal(x, scores, valid, k_clusters=3, per_cluster=2, key=key)

  for seed in range(4):
    x, labels = blobs(seed)
    rng = np.random.default_rng(10 + seed)
    scores = rng.normal(size=len(x)).astype(np.float32)
    valid = (rng.random(len(x)) > 0.2).astype(np.float32)
    sel = np.asarray(sel_fn(x, scores, valid, key=jax.random.PRNGKey(seed)))
    assert sel.shape == (len(x),) and sel.dtype == np.float32
    assert np.all(sel[valid == 0] == 0)
    for lab in range(3):  # the top-2 valid scores of each blob (the blobs differ in direction, not only norm)
      idx = np.flatnonzero((labels == lab) & (valid > 0))
      want = idx[np.argsort(-scores[idx], kind="stable")[:2]]
      assert set(np.flatnonzero(sel[labels == lab] > 0) + lab * 6) == set(want)


def test_select_rehearsal_rejects_bad_arguments():
  x, _ = blobs(0)
  s = np.zeros(len(x), np.float32)
  with pytest.raises(ValueError, match="k_clusters"):
    select_rehearsal(x, s, None, k_clusters=len(x) + 1, per_cluster=1, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="per_cluster"):
    select_rehearsal(x, s, None, k_clusters=2, per_cluster=0, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="am_scores_B"):
    select_rehearsal(x, s[:-1], None, k_clusters=2, per_cluster=1, key=jax.random.PRNGKey(0))


def expert_batch(rng, weights, length=10):
  r = len(weights)
  tokens = rng.integers(1, CFG.vocab_size, (r, length)).astype(np.int32)
  mask = np.ones((r, length), np.int32)
  mask[:, :2] = 0  # left padding
  loss_mask = np.zeros((r, length), np.int32)
  loss_mask[:, 6:] = 1  # the expert response
  return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask),
          "weights": jnp.asarray(weights, jnp.float32)}


def test_rehearsal_nll_is_the_sft_loss_on_the_selected_rows(lm):
  apply_fn, params = lm
  batch = expert_batch(np.random.default_rng(0), [1, 0, 1, 0])
  nll, m = jax.jit(functools.partial(rehearsal_nll, apply_fn))(params, batch)
  keep = np.array([0, 2])
  sliced = {k: v[keep] for k, v in batch.items()}
  want, _ = jax.jit(lambda p: losses.sft_loss(*sft_logits_targets(apply_fn, p, sliced)))(params)
  np.testing.assert_allclose(nll, want, rtol=1e-5)
  assert float(m["rehearsal/examples"]) == 2 and float(m["rehearsal/tokens"]) == 2 * 4
  # Nothing selected: 0 with finite (zero) gradients.
  empty = {**batch, "weights": jnp.zeros(4)}
  val, g = jax.jit(jax.value_and_grad(lambda p: rehearsal_nll(apply_fn, p, empty)[0]))(params)
  assert float(val) == 0.0 and all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g))


def test_coefficient_zero_leaves_the_loss_and_gradient_bitwise_unchanged(lm):
  apply_fn, params = lm
  rng = np.random.default_rng(1)
  policy = expert_batch(rng, [1, 1, 1])
  rehearse = expert_batch(rng, [0, 1, 1, 0])
  # A poisoned rehearsal batch (NaN weights): any traced `0 * nll` would turn the loss and gradient into NaN.
  poisoned = {**rehearse, "weights": rehearse["weights"].at[0].set(jnp.nan)}

  def base_loss(p):  # a stand-in for the PPO loss
    logits, _ = apply_fn(p, policy["tokens"][:, :-1], policy["mask"][:, :-1])
    return losses.sft_loss(logits, policy["tokens"][:, 1:], policy["loss_mask"][:, 1:])[0]

  def with_rehearsal(p, coef, batch=rehearse):
    return add_rehearsal_loss(base_loss(p), apply_fn, p, batch, coef=coef)[0]

  l0, g0 = jax.jit(jax.value_and_grad(base_loss))(params)
  for batch in (rehearse, poisoned):
    l1, g1 = jax.jit(jax.value_and_grad(functools.partial(with_rehearsal, coef=0.0, batch=batch)))(params)
    assert np.asarray(l0).tobytes() == np.asarray(l1).tobytes()
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert np.isnan(float(with_rehearsal(params, 0.5, poisoned)))

  # coef > 0 adds exactly coef · NLL.
  l2 = jax.jit(functools.partial(with_rehearsal, coef=0.5))(params)
  np.testing.assert_allclose(l2, l0 + 0.5 * jax.jit(rehearsal_nll, static_argnums=0)(apply_fn, params, rehearse)[0],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="coef"):
    jax.jit(with_rehearsal)(params, 0.0)  # a traced coefficient cannot be switched off statically
  with pytest.raises(ValueError, match="coef"):
    add_rehearsal_loss(l0, apply_fn, params, rehearse, coef=-1.0)
