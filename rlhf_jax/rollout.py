"""One rollout path for every stage: fit records, sample, decode, grade, score texts.

  records, skipped = fit_records(tok, task.load("train"), max_prompt_len, max_response_len)
  sampler = make_sampler(cfg, tok, max_new_tokens=G, temperature=T, num_samples=N, mesh=mesh)
  ro = sample(sampler, params, tok, records[:P], max_prompt_len=L, rng=key, mesh=mesh)
  scores = grade(task, ro.records, ro.texts, n=N)        # host-local [P_local · N]
  texts = generate_texts(sampler, params, tok, records, batch_size=B, ...)   # any count, fixed shapes

Shapes never change between calls (the last batch is padded by repetition), so
the sampler compiles once. Multi-host: `sample` takes this host's records
(`host_rows` says which rows of the batch are its); the global device arrays
are assembled from the hosts' rows, and each host decodes and grades only its
own rows (`local_rows`), never a `device_get` of a globally sharded array.
`generate_texts` and `score_texts` take all records on every host, feed each
host's rows and return all results everywhere (`all_rows`, a small all-gather),
as one process on the same mesh would.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as shd
from rlhf_jax.models import ModelConfig
from rlhf_jax.sampling import SampleOutput, Sampler, SamplingParams, get_sampler
from rlhf_jax.tasks.base import success
from rlhf_jax.tokenizer import Tokenizer, encode_pairs, encode_prompts, format_prompt

Record = Mapping[str, Any]


# --- records --------------------------------------------------------------------------
def prompt_length(tok: Tokenizer, record: Record) -> int:
  """Tokens a record's prompt takes in the buffer (BOS + prompt, in the chat template if the tokenizer uses one)."""
  return (tok.bos_id is not None) + len(tok.encode(format_prompt(tok, record["prompt"])))


def fit_records(tok: Tokenizer, records: Sequence[Record], max_prompt_len: int,
                max_response_len: Optional[int] = None) -> tuple[list[Record], int]:
  """The records whose prompt (and reference response + EOS, if any) fit; never truncated.

  Returns (kept records, number skipped). Callers report the count: a cut
  prompt loses its question, a cut reference answer is wrong.
  """
  kept = []
  for r in records:
    if prompt_length(tok, r) > max_prompt_len:
      continue
    if max_response_len is not None and r.get("response") is not None and \
        len(tok.encode(r["response"])) + 1 > max_response_len:
      continue
    kept.append(r)
  return kept, len(records) - len(kept)


def load_fitted(task, tok: Tokenizer, split: str, *, max_prompt_len: int, max_response_len: Optional[int] = None,
                stage: str = "", log: Callable[[str], None] = print) -> list[Record]:
  """`task.load(split)` minus the records that do not fit, with the skipped count logged (never silent)."""
  records, skipped = fit_records(tok, task.load(split), max_prompt_len, max_response_len)
  if skipped:
    log(f"[{stage or task.name}] {task.name}/{split}: skipped {skipped} of {skipped + len(records)} records that "
        f"do not fit max_prompt_len={max_prompt_len}" + (f", max_response_len={max_response_len}"
                                                          if max_response_len else ""))
  if not records:
    raise ValueError(f"task {task.name!r} split {split!r}: no record fits max_prompt_len={max_prompt_len}"
                     + (f" and max_response_len={max_response_len}" if max_response_len else ""))
  return records


# --- sampling -------------------------------------------------------------------------
def make_sampler(cfg: ModelConfig, tok: Tokenizer, *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, mesh=None) -> Sampler:
  """The (cached) compiled sampler for these settings."""
  sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      num_samples=num_samples)
  return get_sampler(cfg, sp, eos_id=tok.eos_id, pad_id=tok.pad_id, mesh=mesh)


def host_rows(n: int, mesh=None) -> slice:
  """The rows of a global batch of `n` rows that this process feeds and holds (its devices' shards).

  What `sharding.shard_batch` expects from this process: each host passes
  `rows[host_rows(n, mesh)]` of the global batch. All rows on one process or
  without a mesh.
  """
  if mesh is None or jax.process_count() == 1:
    return slice(0, n)
  index = shd.batch_sharding(mesh, 1).addressable_devices_indices_map((n,))
  ranges = sorted({(i[0].start or 0, n if i[0].stop is None else i[0].stop) for i in index.values()})
  if any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
    raise ValueError(f"this process's rows of the batch are not contiguous on mesh {dict(mesh.shape)}: {ranges}")
  return slice(ranges[0][0], ranges[-1][1])


def all_rows(x: Any) -> np.ndarray:
  """Every row of a global array, on every process (multi-host: a small all-gather; else a device_get)."""
  if jax.process_count() == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in global row order (all rows on one process).

  A replicated array gives the rows this process would hold were it batch-sharded (`host_rows`).
  """
  if jax.process_count() == 1 or not hasattr(x, "addressable_shards"):
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated and hasattr(x.sharding, "mesh"):
    return np.asarray(x.addressable_data(0))[host_rows(x.shape[0], x.sharding.mesh)]
  pieces = {}
  for s in x.addressable_shards:
    start = s.index[0].start or 0
    pieces.setdefault(start, np.asarray(s.data))
  return np.concatenate([pieces[k] for k in sorted(pieces)], axis=0)


def decode(tok: Tokenizer, out: SampleOutput) -> list[str]:
  """Completion strings of this process's rows (up to EOS)."""
  toks, mask = local_rows(out.completion_tokens), local_rows(out.completion_mask)
  return [tok.decode(t[m > 0]) for t, m in zip(toks, mask)]


@dataclasses.dataclass
class Rollout:
  """One sampled batch: device arrays for the update, host-local text for grading.

  Rows are prompt-major: sample n of prompt p is row p·N + n.
  """
  records: list          # this host's records, one per prompt
  n: int                 # samples per prompt
  out: SampleOutput      # global device arrays [R, ...], R = P·N
  texts: list            # this host's completions [P_local · N]

  def repeated_records(self) -> list:
    return [r for r in self.records for _ in range(self.n)]


def sample(sampler: Sampler, params: Any, tok: Tokenizer, records: Sequence[Record], *, max_prompt_len: int,
           rng: jax.Array, mesh=None) -> Rollout:
  """N samples for each record (a fixed-size batch: the caller keeps len(records) constant)."""
  pt, pm = encode_prompts(tok, [r["prompt"] for r in records], max_prompt_len)
  if mesh is not None:
    pt, pm = shd.shard_batch((pt, pm), mesh)
  out = sampler(params, pt, pm, rng)
  return Rollout(records=list(records), n=sampler.sampling.num_samples, out=out, texts=decode(tok, out))


def generate_texts(sampler: Sampler, params: Any, tok: Tokenizer, records: Sequence[Record], *, batch_size: int,
                   max_prompt_len: int, rng: jax.Array, mesh=None) -> list[str]:
  """Completions (N per record, record-major) for any number of records, in fixed-size batches.

  Multi-host: every process passes the same `records`; each feeds its rows of
  every batch (`host_rows`) and gets all completions back (an all-gather of the
  completion tokens), so the result is that of one process on the same mesh.
  """
  texts: list[str] = []
  n = sampler.sampling.num_samples
  rows = host_rows(batch_size, mesh)
  for i in range(0, len(records), batch_size):
    chunk = list(records[i:i + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)
    ro = sample(sampler, params, tok, chunk[rows], max_prompt_len=max_prompt_len, rng=jax.random.fold_in(rng, i),
                mesh=mesh)
    if jax.process_count() == 1:
      batch_texts = ro.texts
    else:
      toks, mask = all_rows(ro.out.completion_tokens), all_rows(ro.out.completion_mask)
      batch_texts = [tok.decode(t[m > 0]) for t, m in zip(toks, mask)]
    texts.extend(batch_texts[:real * n])
  return texts


# --- grading --------------------------------------------------------------------------
def grade(task, records: Sequence[Record], texts: Sequence[str], *, n: int = 1) -> np.ndarray:
  """Scores in [0, 1] of `texts` (N per record, record-major) from the task's grader."""
  if len(texts) != len(records) * n:
    raise ValueError(f"{len(texts)} completions for {len(records)} records × {n} samples")
  return task.grade([r for r in records for _ in range(n)], list(texts))


def pass_at_k(success_PxN: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
  """Unbiased pass@k over prompts from a [P, N] 0/1 success matrix."""
  from rlhf_jax.evaluation.metrics import pass_at_k as estimator  # pylint: disable=import-outside-toplevel
  n = success_PxN.shape[1]
  c = success_PxN.sum(1).astype(np.int64)
  return {f"pass@{k}": float(np.mean(estimator(np.full_like(c, n), c, k))) for k in ks if k <= n}


def evaluate_policy(task, sampler: Sampler, greedy: Optional[Sampler], params: Any, tok: Tokenizer,
                    records: Sequence[Record], *, batch_size: int, max_prompt_len: int, rng: jax.Array,
                    mesh=None, ks: Sequence[int] = (1,)) -> dict[str, float]:
  """Held-out metrics of a policy on fixed records: T-sample mean score, success rate, pass@k, greedy success.

  `sampler` draws N samples at the training temperature; `greedy` (optional) is
  a temperature-0, N = 1 sampler.
  """
  n = sampler.sampling.num_samples
  texts = generate_texts(sampler, params, tok, records, batch_size=batch_size, max_prompt_len=max_prompt_len,
                         rng=rng, mesh=mesh)
  scores = grade(task, records, texts, n=n).reshape(len(records), n)
  ok = success(scores)
  lengths = np.asarray([len(t) for t in texts], np.float32)
  out = {"eval/score": float(scores.mean()), "eval/success_rate": float(ok.mean()),
         "eval/length_chars": float(lengths.mean()),
         "eval/distinct_frac": float(len(set(texts)) / max(len(texts), 1)), **{
             f"eval/{k}": v for k, v in pass_at_k(ok, ks).items()}}
  if greedy is not None:
    g = generate_texts(greedy, params, tok, records, batch_size=batch_size, max_prompt_len=max_prompt_len,
                       rng=rng, mesh=mesh)
    gs = grade(task, records, g, n=1)
    out["eval/greedy_score"] = float(gs.mean())
    out["eval/greedy_success"] = float(success(gs).mean())
  return out


# --- scoring texts --------------------------------------------------------------------
def score_texts(score_fn: Callable, params: Any, tok: Tokenizer, prompts: Sequence[str], texts: Sequence[str], *,
                batch_size: int, max_prompt_len: int, max_response_len: int, mesh=None) -> np.ndarray:
  """`score_fn(params, tokens, mask) -> [B]` (e.g. a jitted RM) over (prompt, text) pairs, fixed-size batches.

  Multi-host: every process passes all pairs, feeds its rows of each batch and gets all scores back.
  """
  if len(prompts) != len(texts):
    raise ValueError(f"{len(prompts)} prompts but {len(texts)} texts")
  out = []
  rows = host_rows(batch_size, mesh)
  for i in range(0, len(texts), batch_size):
    p, t = list(prompts[i:i + batch_size]), list(texts[i:i + batch_size])
    real = len(t)
    p += [p[-1]] * (batch_size - real)
    t += [t[-1]] * (batch_size - real)
    enc = encode_pairs(tok, p[rows], t[rows], max_prompt_len, max_response_len)
    batch = (enc["tokens"], enc["mask"])
    if mesh is not None:
      batch = shd.shard_batch(batch, mesh)
    out.append(all_rows(score_fn(params, *batch))[:real])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def shard_rows(x: np.ndarray, mesh=None) -> jax.Array:
  """A host-local [rows, ...] array as (this host's part of) a global batch-sharded device array."""
  return jnp.asarray(x) if mesh is None else shd.shard_batch(np.asarray(x), mesh)
