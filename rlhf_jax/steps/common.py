"""Forward-pass helpers shared by the step factories (device layer)."""

from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from rlhf_jax import losses


def last_valid_index(mask_BxS: jax.Array) -> jax.Array:
  """Index of the last 1 in each row (`S − 1 − argmax(flip(mask))`)."""
  s = mask_BxS.shape[1]
  return s - 1 - jnp.argmax(jnp.flip(mask_BxS, axis=1) > 0, axis=1)


def sequence_scores(apply_fn: Callable, params, tokens_BxS, mask_BxS, read_from: int = 0) -> jax.Array:
  """Scalar-head output read at each row's last valid token: rewards [B].

  `read_from` (static): every row's last valid token lies at or after this slot, so the model computes its
  head (and its last layer's queries) only from there (`out_from`). Left-padded prompts of length P followed
  by their completions qualify with `read_from=P - 1`, even with an empty completion.
  """
  values_BxS, _ = apply_fn(params, tokens_BxS, mask_BxS, **({"out_from": read_from} if read_from else {}))
  idx = last_valid_index(mask_BxS)
  if values_BxS.shape[1] != tokens_BxS.shape[1]:  # slots [read_from, S) (an apply_fn may ignore `out_from`)
    idx = idx - read_from
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
    hidden = _completion_outputs(apply_fn, params, tokens_BxS, mask_BxS, prompt_len, return_hidden=True)
    base = params.get("base", params)  # LoRA adapts attention and MLP only: the unembedding is the base's
    tied = "lm_head" not in base  # the tied embedding [V, D] is read as stored
    return chunked_completion_logprobs(hidden, base["embedding"] if tied else base["lm_head"], targets_BxG,
                                       chunk=chunk, temperature=temperature, with_entropy=with_entropy,
                                       transposed=tied)
  logits_BxGxV = _completion_outputs(apply_fn, params, tokens_BxS, mask_BxS, prompt_len)
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
  return _completion_outputs(apply_fn, params, tokens_BxS, mask_BxS, prompt_len)


def _completion_outputs(apply_fn: Callable, params, tokens_BxS, mask_BxS, prompt_len: int, **kwargs) -> jax.Array:
  """The model's outputs at slots [prompt_len − 1, S − 1): those that predict (or value) the completion.

  Asks the model for those positions only (`out_from`, the Transformer's: no final norm and head on the
  prompt); an `apply_fn` that ignores `out_from` and returns every position is sliced here.
  """
  out, _ = apply_fn(params, tokens_BxS[:, :-1], mask_BxS[:, :-1], out_from=prompt_len - 1, **kwargs)
  g = tokens_BxS.shape[1] - prompt_len
  return out if out.shape[1] == g else out[:, prompt_len - 1:]


# Tokens per chunk of "auto" micro-batching on XLA:CPU: a forward or backward over ~1k tokens of the tiny/small
# presets at a time keeps its working set in cache (experiments/benchmarks/README.md, issue 15).
AUTO_MICROBATCH_TOKENS = 1024
Microbatch = Union[int, str, None]  # rows per chunk, "auto", or None / 0 for the whole batch


def microbatch_rows(rows: int, tokens_per_row: int, microbatch: Microbatch) -> int:
  """Rows per chunk: the largest divisor of `rows` that is at most the requested size.

  microbatch: None or 0 (whole batch), a number of rows, or "auto": on the CPU
  backend `AUTO_MICROBATCH_TOKENS // tokens_per_row` rows, elsewhere the whole
  batch (accelerators want the big matmuls).
  """
  if microbatch is None:
    return rows
  if microbatch == "auto":
    if jax.default_backend() != "cpu":
      return rows
    microbatch = max(1, AUTO_MICROBATCH_TOKENS // max(int(tokens_per_row), 1))
  if isinstance(microbatch, str) or int(microbatch) < 0:
    raise ValueError(f"microbatch must be None, 'auto' or a number of rows >= 0, got {microbatch!r}")
  k = int(microbatch)
  if k == 0 or k >= rows:
    return rows
  return max(d for d in range(1, k + 1) if rows % d == 0)


def _chunks(tree, microbatch: Microbatch) -> tuple[int, int]:
  """(rows, number of chunks) of a pytree of row-major arrays; "auto" sizes chunks by the widest leaf (the
  token buffer, not e.g. the completion-only advantages)."""
  leaves = jax.tree.leaves(tree)
  rows = leaves[0].shape[0]
  tokens_per_row = max([x.shape[1] for x in leaves if x.ndim > 1], default=1)
  return rows, rows // microbatch_rows(rows, tokens_per_row, microbatch)


def map_rows(fn: Callable, microbatch: Microbatch, *arrays):
  """`fn(*arrays)` computed `microbatch` rows at a time (`lax.map`), the per-row results concatenated.

  `arrays`: arrays or pytrees of arrays, all with the same leading (row) axis.

  `fn` must act on each row independently (a model forward); the result is
  that of one call on all rows. `microbatch`: see `microbatch_rows`. On XLA:CPU
  a tiny-preset forward over 1–2k tokens at a time ran 1.6× faster than over 8k
  (the working set stays in cache; experiments/RESULTS.md, issue 15).
  """
  rows, n = _chunks(arrays, microbatch)
  if n == 1:
    return fn(*arrays)
  chunks = jax.tree.map(lambda a: a.reshape(n, rows // n, *a.shape[1:]), arrays)
  out = jax.lax.map(lambda xs: fn(*xs), chunks)
  return jax.tree.map(lambda x: x.reshape(rows, *x.shape[2:]), out)


def rowwise_value_and_grad(rows_fn: Callable, loss_fn: Callable, params, batch: dict, *, fill,
                           microbatch: Microbatch = None, extra_fn: Optional[Callable] = None,
                           layer_views: Optional[tuple[Callable, Callable]] = None):
  """`((loss, aux), grads)` of `loss_fn(rows_fn(params, batch)) + extra_fn(params)`, the model run in row chunks.

  rows_fn(params, batch) -> per-row outputs (a pytree of [B, ...] arrays: a
    forward over the rows of `batch`, each row independent of the others).
  loss_fn(outputs) -> (loss, aux): must be a sum of per-row terms with
    normalisers that do not depend on the outputs (every `losses.aggregate_loss`
    mode, masked means over fixed masks): then row b's gradient depends on row
    b's outputs only.
  fill: outputs of the structure of `rows_fn`'s that stand for the rows outside
    a chunk (constants, e.g. the old log-probs; any finite values give the same
    gradient).
  extra_fn(params) -> (loss, metrics), optional: a term over other data (the
    rehearsal NLL), added to the loss; its metrics are merged into `aux`.

  With `microbatch` (`microbatch_rows`: at most that many rows, or "auto") the
  gradient is accumulated over chunks (`lax.scan`), each chunk's loss being `loss_fn` of `fill` with
  the chunk's rows replaced by their outputs; the sum over chunks is the
  gradient of the whole batch's loss, and `(loss, aux)` are `loss_fn` of all
  outputs. Gradient accumulation on the same rows: one forward and one backward
  per row as without chunks, a working set `B / microbatch` times smaller.
  Without it (None), one `jax.value_and_grad` of the whole expression.
  layer_views: optional (to_view, from_view), two inverse re-layouts of `params` that `rows_fn` accepts
    either way (`models.make_apply_fn(cfg).layer_views`: the stacked layer weights and their per-layer
    view). With chunks, the loop runs on `to_view(params)` and accumulates the gradient in that layout,
    brought back by `from_view` once: no chunk slices the stacked weights or concatenates their gradients.
  """
  rows, n = _chunks(batch, microbatch)

  def full(p):
    loss, aux = loss_fn(rows_fn(p, batch))
    if extra_fn is not None:
      extra, metrics = extra_fn(p)
      loss, aux = loss + extra, {**aux, **metrics}
    return loss, aux

  if n == 1:
    return jax.value_and_grad(full, has_aux=True)(params)
  size = rows // n
  chunks = jax.tree.map(lambda x: x.reshape(n, size, *x.shape[1:]), batch)
  to_view, from_view = layer_views or (lambda p: p, lambda p: p)
  loop_params = to_view(params)

  def body(acc, xs):
    i, chunk = xs

    def chunk_loss(p):
      out = rows_fn(p, chunk)
      rows_out = jax.tree.map(lambda f, o: jax.lax.dynamic_update_slice_in_dim(f.astype(o.dtype), o, i * size, 0),
                              fill, out)
      return loss_fn(rows_out)[0], out

    grads, out = jax.grad(chunk_loss, has_aux=True)(loop_params)
    return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads), out

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), loop_params)
  acc, outs = jax.lax.scan(body, zeros, (jnp.arange(n), chunks))
  acc = from_view(acc)
  outputs = jax.tree.map(lambda x: x.reshape(rows, *x.shape[2:]), outs)
  loss, aux = loss_fn(jax.lax.stop_gradient(outputs))
  if extra_fn is not None:
    (extra, metrics), extra_grads = jax.value_and_grad(extra_fn, has_aux=True)(params)
    loss, aux = loss + extra, {**aux, **metrics}
    acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, extra_grads)
  grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
  return (loss, aux), grads
