"""Stage 2: instruction × query prompts, K responses each, their accuracy in the sandbox, and the two
response filters (§9.1 steps 6–9)."""

from __future__ import annotations

import random
from typing import Optional, Sequence

import numpy as np

from rlhf_jax.autoif.cross_validation import VerifiedInstruction
from rlhf_jax.autoif.report import filter_report
from rlhf_jax.autoif.supervisor import QueryPrompt, Supervisor, parse_quality_score, response_prompt
from rlhf_jax.autoif.verification import pass_rates, run_functions, verdict_matrix


def make_query_prompts(verified: Sequence[VerifiedInstruction], queries: Sequence[str], *, per_instruction: int,
                       seed: int = 0, query_chars: tuple[int, int] = (0, 300)) -> tuple[list[QueryPrompt], dict]:
  """Each instruction with `per_instruction` random queries (§9.1 step 6; the paper uses 16 ShareGPT queries).

  Queries are kept when min < len(query) < max (`query_chars`; the official
  code uses (20, 300)). Each instruction draws its queries without
  replacement from `random.Random(seed)` (all of them when there are fewer).

  Returns:
    (prompts, FilterReport over queries).
  """
  if per_instruction < 1:
    raise ValueError(f"per_instruction must be >= 1, got {per_instruction}")
  lo, hi = query_chars
  usable = list(dict.fromkeys(q.strip() for q in queries if lo < len(q.strip()) < hi))
  rng = random.Random(f"autoif-queries:{seed}")
  prompts = []
  for i, v in enumerate(verified):
    for q in rng.sample(usable, min(per_instruction, len(usable))):
      prompts.append(QueryPrompt(i, v.instruction.text, q, response_prompt(v.instruction.text, q)))
  report = filter_report("queries", len(queries), len(usable), unit="queries", prompts=len(prompts))
  return prompts, report


def sample_responses(supervisor: Supervisor, prompts: Sequence[QueryPrompt], *, k: int) -> list[list[str]]:
  """K responses per prompt from the supervisor (§9.1 step 7; the paper uses K = 8)."""
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  out = supervisor.respond(list(prompts), k) if prompts else []
  if len(out) != len(prompts) or any(len(r) != k or not all(isinstance(x, str) for x in r) for r in out):
    raise ValueError(f"supervisor.respond must return {k} strings for each of {len(prompts)} prompts")
  return [list(r) for r in out]


def score_responses(verified: Sequence[VerifiedInstruction], prompts: Sequence[QueryPrompt],
                    responses: Sequence[Sequence[str]], *, timeout_s: float = 5.0, memory_mb: int = 512,
                    max_workers: Optional[int] = None) -> np.ndarray:
  """Accuracy of every response over its instruction's surviving functions: [P, K] (§9.1 step 8).

  accuracy = mean over functions of the verdicts that are not None (a
  function that raises on a response is neither pass nor fail); NaN when no
  function gave a verdict. One sandbox program per (instruction, function)
  runs on all responses to that instruction, all in one batch.
  """
  if len(prompts) != len(responses):
    raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
  k = len(responses[0]) if responses else 0
  if any(len(r) != k for r in responses):
    raise ValueError("every prompt needs the same number of responses")
  rows: dict[int, list[int]] = {}
  for p, qp in enumerate(prompts):
    rows.setdefault(qp.instruction_id, []).append(p)
  jobs = []
  for i, ps in rows.items():
    flat = [r for p in ps for r in responses[p]]
    for f in verified[i].functions:
      jobs.append((i, f, flat))
  runs = run_functions([f for _, f, _ in jobs], [x for _, _, x in jobs], timeout_s=timeout_s,
                       memory_mb=memory_mb, max_workers=max_workers)
  acc = np.full((len(prompts), k), np.nan)
  for i, ps in rows.items():
    mine = [r for (j, _, _), r in zip(jobs, runs) if j == i]
    if not mine:
      continue
    rates = pass_rates(verdict_matrix(mine))
    acc[ps] = rates.reshape(len(ps), k)
  return acc


def instruction_following_filter(prompts: Sequence[QueryPrompt], responses: Sequence[Sequence[str]],
                                 accuracy_PxK, *, threshold: float = 0.5,
                                 strict: bool = True) -> tuple[list[dict], dict]:
  """Responses whose accuracy passes the threshold (§9.1 step 8).

  Paper: accuracy > 0.5 (`strict=True`, the default); official code:
  accuracy > 0 (`threshold=0`). A response with no verdict (NaN) is dropped.

  Returns:
    (kept items {"prompt_index", "response", "accuracy"}, FilterReport over responses).
  """
  acc = np.asarray(accuracy_PxK, np.float64)
  if acc.shape != (len(prompts), len(responses[0]) if responses else 0):
    raise ValueError(f"accuracy must be [P, K] = [{len(prompts)}, K], got {acc.shape}")
  ok = np.nan_to_num(acc, nan=-1.0)
  keep = ok > threshold if strict else ok >= threshold
  kept = [{"prompt_index": p, "response": responses[p][j], "accuracy": float(acc[p, j])}
          for p, j in zip(*np.nonzero(keep))]
  report = filter_report("instruction_following", acc.size, len(kept), unit="responses",
                         prompts_in=len(prompts), prompts_out=len({k["prompt_index"] for k in kept}),
                         no_verdict=int(np.isnan(acc).sum()), threshold=threshold, strict=strict)
  return kept, report


def quality_filter(supervisor: Supervisor, prompts: Sequence[QueryPrompt], kept: Sequence[dict], *,
                   min_score: float = 8.0, strict: bool = False) -> tuple[list[dict], dict]:
  """The supervisor scores instruction/query/response consistency 0–10 (§9.1 step 9).

  Paper: samples below 8 are dropped (score ≥ 8, `strict=False`); official
  code: score > 8 (`strict=True`). A completion without a score is dropped.

  Returns:
    (kept items with "quality" added, FilterReport over responses).
  """
  if not kept:
    return [], filter_report("quality", 0, 0, unit="responses", unscored=0)
  texts = supervisor.rate_quality([prompts[k["prompt_index"]].instruction for k in kept],
                                  [prompts[k["prompt_index"]].query for k in kept], [k["response"] for k in kept])
  if len(texts) != len(kept):
    raise ValueError(f"supervisor.rate_quality returned {len(texts)} completions for {len(kept)} responses")
  scores = [parse_quality_score(t) for t in texts]
  out = [{**k, "quality": s} for k, s in zip(kept, scores)
         if s is not None and (s > min_score if strict else s >= min_score)]
  report = filter_report("quality", len(kept), len(out), unit="responses",
                         unscored=sum(s is None for s in scores), min_score=min_score, strict=strict)
  return out, report
