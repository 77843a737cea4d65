"""Supervised fine-tuning (token-level NLL) loss."""
from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses import common


def sft_loss(logits, targets, mask):
  """Token-mean negative log-likelihood over the masked (response) tokens.

  L = −Σ_{b,t} m_bt log softmax(logits_bt)[y_bt] / Σ_{b,t} m_bt

  Every valid token of the batch counts once (the "token_mean" reduction), the
  usual SFT / rejection-sampling fine-tuning objective (ALGORITHMS §7, §9.2).

  Args:
    logits: [B, T, V] next-token logits aligned with `targets` (logits[:, t]
      predicts targets[:, t]).
    targets: [B, T] integer token ids.
    mask: [B, T] response mask (1 = token is trained on); float masks weight
      tokens.

  Returns:
    (loss, metrics) with metrics 'sft/nll', 'sft/accuracy' (argmax = target over
    the mask), 'sft/tokens' (Σ mask), 'sft/perplexity'.
  """
  common.check_ndim(mask, 2, "mask")
  common.check_same_shape(targets, "targets", mask, "mask")
  return sft_loss_from_logprobs(common.token_logprobs(logits, targets), token_correct(logits, targets), mask)


def token_correct(logits, targets):
  """1.0 where the argmax of `logits` [B, T, V] is the target [B, T], else 0.0."""
  return (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)


def sft_loss_from_logprobs(logp_BxT, correct_BxT, mask):
  """`sft_loss` from the targets' log-probs and `token_correct` ([B, T] each): the same loss and metrics."""
  common.check_same_shape(logp_BxT, "logp_BxT", mask, "mask")
  nll = common.masked_mean(-logp_BxT, mask)
  metrics = {
      "sft/nll": nll,
      "sft/accuracy": common.masked_mean(correct_BxT, mask),
      "sft/tokens": jnp.sum(jnp.asarray(mask, jnp.float32)),
      "sft/perplexity": jnp.exp(nll),
  }
  return nll, metrics
