"""Selective Rehearsal on device (ALGORITHMS.md Part A, §10.2 — a reconstruction of Peng et al. 2023).

Three jittable pieces the PPO/GRPO stages compose:

  emb_B×D  = prompt_embeddings(policy_apply, params, prompt_tokens, prompt_mask)    mean-pooled final hidden states
  sel_B    = select_rehearsal(emb, am_scores, valid, k_clusters=c, per_cluster=k)   k-means, per-cluster top-k by AM
  L        = L_PPO + λ_R · NLL(D_R)                                                 add_rehearsal_loss(...)

D_R is the set of expert (SFT) examples whose mask is 1. Everything is a mask over static shapes: the number of
selected examples changes nothing about the compiled program. The paper embeds with SimCSE; we use the policy's
own hidden states (Part A) and, by default, L2-normalise them so k-means clusters by direction (cosine), as
SimCSE similarity does.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import losses, selection
from rlhf_jax.losses import common
from rlhf_jax.steps.sft import sft_logits_targets

REHEARSAL_KEYS = ("tokens", "mask", "loss_mask", "weights")


def prompt_embeddings(apply_fn: Callable, params, tokens_BxT, mask_BxT) -> jax.Array:
  """Mean over real tokens of the final (normalised) hidden states: [B, D] float32, no gradient.

    emb_b = Σ_t mask_bt h_bt / Σ_t mask_bt      (0 for a row without real tokens)

  Args:
    apply_fn: a model `apply_fn(params, tokens, mask, return_hidden=True) -> (h [B, T, D], _)` (the Transformer's).
    params: its parameters.
    tokens_BxT, mask_BxT: prompts (left padding is fine: padded slots are masked out).
  """
  common.check_ndim(tokens_BxT, 2, "tokens_BxT")
  common.check_same_shape(tokens_BxT, "tokens_BxT", mask_BxT, "mask_BxT")
  h_BxTxD, _ = apply_fn(params, tokens_BxT, mask_BxT, return_hidden=True)
  m_BxT = jnp.asarray(mask_BxT, jnp.float32)
  total_BxD = jnp.einsum("btd,bt->bd", h_BxTxD.astype(jnp.float32), m_BxT,
                         precision=jax.lax.Precision.HIGHEST)
  return jax.lax.stop_gradient(common.safe_divide(total_BxD, jnp.sum(m_BxT, axis=1, keepdims=True)))


def select_rehearsal(embeddings_BxD, am_scores_B, valid_B=None, *, k_clusters: int, per_cluster: int, key,
                     iters: int = 20, normalize: bool = True) -> jax.Array:
  """Rehearsal mask: k-means over the embeddings, then the `per_cluster` highest AM scores in each cluster.

  Args:
    embeddings_BxD: [B, D] prompt embeddings (`prompt_embeddings`).
    am_scores_B: [B] AM scores a(x, y_expert) of each prompt's expert response.
    valid_B: optional [B] mask; invalid rows are neither clustered nor selected.
    k_clusters: c, the number of clusters (static, 1 <= c <= B).
    per_cluster: examples kept per cluster (static, >= 1).
    key: PRNG key of the k-means++ seeding (e.g. `fold_in(rng, iteration)`).
    iters: Lloyd iterations (static).
    normalize: L2-normalise the embeddings first (cluster by direction).

  Returns:
    [B] float32 mask, at most `k_clusters * per_cluster` ones; ties go to the lower index.
  """
  common.check_ndim(embeddings_BxD, 2, "embeddings_BxD")
  common.check_ndim(am_scores_B, 1, "am_scores_B")
  b = embeddings_BxD.shape[0]
  if am_scores_B.shape[0] != b:
    raise ValueError(f"`am_scores_B` must have shape [{b}], got {am_scores_B.shape}")
  if valid_B is not None and jnp.shape(valid_B) != (b,):
    raise ValueError(f"`valid_B` must have shape [{b}], got {jnp.shape(valid_B)}")
  if not isinstance(k_clusters, int) or not 1 <= k_clusters <= b:
    raise ValueError(f"`k_clusters` must be an int in [1, B={b}], got {k_clusters!r}")
  if not isinstance(per_cluster, int) or per_cluster < 1:
    raise ValueError(f"`per_cluster` must be an int >= 1, got {per_cluster!r}")
  if not isinstance(iters, int) or iters < 0:
    raise ValueError(f"`iters` must be an int >= 0, got {iters!r}")
  x_BxD = jnp.asarray(embeddings_BxD, jnp.float32)
  if normalize:
    x_BxD = x_BxD * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x_BxD), -1, keepdims=True), 1e-24))
  return selection.rehearsal_mask(x_BxD, jnp.asarray(am_scores_B, jnp.float32), valid_B, num_clusters=k_clusters,
                                  top_k=per_cluster, key=key, iters=iters)


def rehearsal_nll(apply_fn: Callable, params, batch: dict):
  """Weighted next-token NLL on the selected expert examples (token mean).

    NLL = −Σ_{b,t} s_b m_bt log π(y_bt | y_<bt) / Σ_{b,t} s_b m_bt     (0 when nothing is selected)

  Args:
    apply_fn: the policy, `apply_fn(params, tokens, mask) -> (logits, _)`.
    params: policy parameters (the gradient flows into them).
    batch: tokens, mask, loss_mask [R, L] (as `tokenizer.encode_pairs`: prompt left-padded, the expert response
      right-padded, loss_mask on response tokens) and weights [R] (the `select_rehearsal` mask, s_b).

  Returns:
    (nll, metrics): rehearsal/nll, rehearsal/examples (Σ s_b), rehearsal/tokens (Σ s_b m_bt),
    rehearsal/accuracy (argmax = target over the selected tokens).
  """
  for k in REHEARSAL_KEYS:
    if k not in batch:
      raise ValueError(f"rehearsal batch lacks `batch[{k!r}]`; it needs {REHEARSAL_KEYS}")
  r = batch["tokens"].shape[0]
  if jnp.shape(batch["weights"]) != (r,):
    raise ValueError(f"`batch['weights']` must have shape [R={r}], got {jnp.shape(batch['weights'])}")
  logits, targets, loss_mask = sft_logits_targets(apply_fn, params, batch)
  weights_R = jnp.asarray(batch["weights"], jnp.float32)
  token_w = jnp.asarray(loss_mask, jnp.float32) * weights_R[:, None]
  nll, m = losses.sft_loss(logits, targets, token_w)
  return nll, {"rehearsal/nll": nll, "rehearsal/examples": jnp.sum(weights_R), "rehearsal/tokens": m["sft/tokens"],
               "rehearsal/accuracy": m["sft/accuracy"]}


def add_rehearsal_loss(loss, apply_fn: Callable, params, batch: Optional[dict], *, coef: float):
  """`loss + coef · rehearsal_nll(...)`, for use inside a step's differentiated loss.

  `coef` is a Python number fixed when the step is built. With 0 this returns `loss` itself and `{}` without
  running the model on the rehearsal batch, so the loss and its gradient are bit-for-bit those of the step
  without rehearsal (a traced `loss + 0.0 * nll` would not be: 0 · NaN is NaN).

  Returns:
    (loss, metrics) with the `rehearsal_nll` metrics (empty when coef is 0).
  """
  if not common.is_number(coef) or isinstance(coef, jax.core.Tracer):
    raise ValueError(f"`coef` must be a Python number fixed when the step is built, got {type(coef).__name__}")
  if float(coef) < 0:
    raise ValueError(f"`coef` must be >= 0, got {coef}")
  if float(coef) == 0:
    return loss, {}
  if batch is None:
    raise ValueError("`batch` (the rehearsal batch) is required when coef > 0")
  nll, metrics = rehearsal_nll(apply_fn, params, batch)
  return loss + coef * nll, metrics
