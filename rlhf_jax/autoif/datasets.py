"""AutoIF outputs: the SFT set and DPO pairs at the instruction and query level (§9.2).

Records use the layout of `rlhf_jax.data` builders: SFT records
{"prompt", "response", "task", "metadata"} and preference pairs
{"prompt", "chosen", "rejected", "metadata"} (metadata a JSON-able dict that
keeps the instruction, the query, the accuracies and the verification
functions, so online DPO can grade new samples with the same functions).

Pairs follow the official code's rule through `selection.autoif_pair_indices`:
positives are responses with accuracy ≥ 0.5 (query level; `strict=True` gives
the paper's > 0.5), negatives accuracy exactly 0; up to 2 positives × 2
negatives sampled per prompt, every combination emitted, so at most 4 pairs a
prompt; identical (prompt, chosen, rejected) triples are emitted once. A
response with no verdict (NaN) is neither.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from rlhf_jax import selection
from rlhf_jax.autoif.cross_validation import VerifiedInstruction
from rlhf_jax.autoif.report import filter_report
from rlhf_jax.autoif.supervisor import QueryPrompt


def pair_indices(accuracy_PxN, *, seed: int, threshold: float = 0.5, strict: bool = False, max_pos: int = 2,
                 max_neg: int = 2) -> list[list[tuple[int, int]]]:
  """Per prompt, the (chosen, rejected) response indices of the AutoIF pair rule.

  Args:
    accuracy_PxN: [P, N] accuracies; NaN (no verdict, or padding) is neither positive nor negative.
    seed: seed of the subsampling key.
    threshold, strict: positives have accuracy ≥ threshold (> with strict).
    max_pos, max_neg: caps per prompt.

  Returns:
    For each prompt, a list of (chosen index, rejected index).
  """
  acc = np.asarray(accuracy_PxN, np.float32)
  if acc.ndim != 2:
    raise ValueError(f"accuracy must be [P, N], got shape {acc.shape}")
  if acc.size == 0:
    return [[] for _ in range(acc.shape[0])]
  # −1 is never a positive (threshold ≥ 0) nor the negative value 0.
  acc = np.where(np.isnan(acc), -1.0, acc)
  chosen, rejected, valid = jax.device_get(selection.autoif_pair_indices(
      acc, key=jax.random.PRNGKey(seed), pos_threshold=threshold, strict=strict, max_pos=max_pos,
      max_neg=max_neg))
  return [[(int(c), int(r)) for c, r, v in zip(cs, rs, vs) if v > 0] for cs, rs, vs in zip(chosen, rejected, valid)]


def sft_records(verified: Sequence[VerifiedInstruction], prompts: Sequence[QueryPrompt],
                kept: Sequence[dict]) -> list[dict]:
  """The SFT set: one record per response that passed the response filters."""
  out = []
  for k in kept:
    qp = prompts[k["prompt_index"]]
    meta = {"instruction": qp.instruction, "query": qp.query, "accuracy": k["accuracy"],
            "functions": list(verified[qp.instruction_id].functions)}
    if "quality" in k:
      meta["quality"] = k["quality"]
    out.append({"prompt": qp.prompt, "response": k["response"], "task": "autoif", "metadata": meta})
  return out


def _emit(pairs: list, seen: set, prompt: str, chosen: str, rejected: str, meta: dict) -> None:
  key = (prompt, chosen, rejected)
  if key not in seen:
    seen.add(key)
    pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "metadata": meta})


def query_level_pairs(verified: Sequence[VerifiedInstruction], prompts: Sequence[QueryPrompt],
                      responses: Sequence[Sequence[str]], accuracy_PxK, *, seed: int = 0, threshold: float = 0.5,
                      strict: bool = False, max_pos: int = 2, max_neg: int = 2) -> tuple[list[dict], dict]:
  """DPO pairs between responses to the same (instruction, query) prompt.

  Returns:
    (pairs, FilterReport over prompts: how many yielded at least one pair).
  """
  idx = pair_indices(accuracy_PxK, seed=seed, threshold=threshold, strict=strict, max_pos=max_pos,
                     max_neg=max_neg)
  acc = np.asarray(accuracy_PxK, np.float64)
  pairs, seen = [], set()
  for p, qp in enumerate(prompts):
    for c, r in idx[p]:
      _emit(pairs, seen, qp.prompt, responses[p][c], responses[p][r],
            {"level": "query", "instruction": qp.instruction, "query": qp.query,
             "chosen_accuracy": float(acc[p, c]), "rejected_accuracy": float(acc[p, r]),
             "functions": list(verified[qp.instruction_id].functions)})
  with_pairs = sum(bool(x) for x in idx)
  report = filter_report("query_pairs", len(prompts), with_pairs, unit="prompts", pairs=len(pairs),
                         threshold=threshold, strict=strict)
  return pairs, report


def instruction_level_pairs(verified: Sequence[VerifiedInstruction], *, seed: int = 0, threshold: float = 0.5,
                            strict: bool = True, max_pos: int = 2, max_neg: int = 2) -> tuple[list[dict], dict]:
  """DPO pairs from the cross-validated test cases: the prompt is the instruction alone.

  A case input is a positive when its pass rate over the instruction's
  functions is > 0.5 (the paper's "accuracy > 0.5 on all functions";
  `strict=False` gives ≥), a negative when it is 0; same sampling as the
  query level.

  Returns:
    (pairs, FilterReport over instructions).
  """
  n = max((len(v.cases) for v in verified), default=0)
  acc = np.full((len(verified), n), np.nan)
  for i, v in enumerate(verified):
    acc[i, :len(v.cases)] = v.case_pass_rates
  idx = pair_indices(acc, seed=seed, threshold=threshold, strict=strict, max_pos=max_pos, max_neg=max_neg)
  pairs, seen = [], set()
  for i, v in enumerate(verified):
    for c, r in idx[i]:
      _emit(pairs, seen, v.instruction.text, v.cases[c][0], v.cases[r][0],
            {"level": "instruction", "instruction": v.instruction.text, "query": "",
             "chosen_accuracy": float(acc[i, c]), "rejected_accuracy": float(acc[i, r]),
             "functions": list(v.functions)})
  report = filter_report("instruction_pairs", len(verified), sum(bool(x) for x in idx), unit="instructions",
                         pairs=len(pairs), threshold=threshold, strict=strict)
  return pairs, report
