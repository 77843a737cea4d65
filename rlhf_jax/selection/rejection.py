"""Rejection-sampling masks (Llama 2 best-of-K RS-FT, RAFT, threshold RS)."""
from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses import common


def best_of_n_mask(rewards_PxN):
  """[P, N] float mask with 1 at each prompt's best sample (first on ties)."""
  common.check_ndim(rewards_PxN, 2, "rewards")
  n = rewards_PxN.shape[-1]
  best_P = jnp.argmax(rewards_PxN, axis=-1)
  return (jnp.arange(n)[None, :] == best_P[:, None]).astype(jnp.float32)


def threshold_mask(rewards, *, threshold):
  """Float mask of samples with reward strictly above `threshold` (AM §7)."""
  return (jnp.asarray(rewards) > threshold).astype(jnp.float32)
