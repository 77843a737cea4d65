"""Forward-pass helpers shared by the step factories (device layer)."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import losses


def last_valid_index(mask_BxS: jax.Array) -> jax.Array:
  """Index of the last 1 in each row (`S − 1 − argmax(flip(mask))`)."""
  s = mask_BxS.shape[1]
  return s - 1 - jnp.argmax(jnp.flip(mask_BxS, axis=1) > 0, axis=1)


def sequence_scores(apply_fn: Callable, params, tokens_BxS, mask_BxS) -> jax.Array:
  """Scalar-head output read at each row's last valid token: rewards [B]."""
  values_BxS, _ = apply_fn(params, tokens_BxS, mask_BxS)
  idx = last_valid_index(mask_BxS)
  return jnp.take_along_axis(values_BxS, idx[:, None], axis=1)[:, 0]


def completion_logprobs(apply_fn: Callable, params, tokens_BxS, mask_BxS, prompt_len: int,
                        *, temperature: float = 1.0, with_entropy: bool = False, chunk: Optional[int] = None):
  """log π_T(token) of every completion slot [B, G] (and per-token entropy [B, G]).

  π_T = softmax(logits / T): the distribution the sampler drew from at
  temperature T (`rlhf_jax.sampling`), so importance ratios, KL and entropy all
  refer to what was sampled. The completion occupies slots [prompt_len, S);
  slot s is predicted by the logits at s − 1.

  With `chunk`, the [B, G, V] float32 logits are never materialised: the final
  hidden states (`apply_fn(..., return_hidden=True)`) are unembedded `chunk`
  positions at a time (`models.logprobs.chunked_completion_logprobs`), which is
  what lets a 128k–152k vocabulary fit. Same values and gradients.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
  targets_BxG = tokens_BxS[:, prompt_len:]
  if chunk:
    from rlhf_jax.models.logprobs import chunked_completion_logprobs  # pylint: disable=import-outside-toplevel
    hidden, _ = apply_fn(params, tokens_BxS[:, :-1], mask_BxS[:, :-1], return_hidden=True)
    base = params.get("base", params)  # LoRA adapts attention and MLP only: the unembedding is the base's
    unembed_DxV = base["lm_head"] if "lm_head" in base else base["embedding"].T
    return chunked_completion_logprobs(hidden[:, prompt_len - 1:], unembed_DxV, targets_BxG, chunk=chunk,
                                       temperature=temperature, with_entropy=with_entropy)
  logits, _ = apply_fn(params, tokens_BxS[:, :-1], mask_BxS[:, :-1])
  logits_BxGxV = logits[:, prompt_len - 1:]
  if temperature != 1.0:
    logits_BxGxV = logits_BxGxV.astype(jnp.float32) / temperature
  lp = losses.token_logprobs(logits_BxGxV, targets_BxG)
  if not with_entropy:
    return lp
  return lp, losses.entropy_from_logits(logits_BxGxV)


def completion_values(apply_fn: Callable, params, tokens_BxS, mask_BxS, prompt_len: int) -> jax.Array:
  """Critic values V(s_t) for every completion token t: [B, G].

  The state before completion token t is the prefix ending at slot
  prompt_len + t − 1, so the value is read there.
  """
  values, _ = apply_fn(params, tokens_BxS[:, :-1], mask_BxS[:, :-1])
  return values[:, prompt_len - 1:]
