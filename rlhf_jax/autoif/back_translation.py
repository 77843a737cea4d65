"""Back-translation consistency (§9.1 step 5): function → instruction, then an NLI-style judge.

The paper back-translates each instruction's verification functions with the
supervisor and classifies (premise = original instruction, hypothesis =
back-translation) with an NLI model (mDeBERTa-v3 XNLI); instructions labelled
contradiction are dropped. The official code back-translates the first 3
functions and drops the instruction if ANY is an argmax contradiction; we do
the same (`num_functions=3`).

The judge is pluggable (`Judge`: premises, hypotheses → labels). For CPU runs
`RuleBasedJudge` stands in for the NLI model: it recovers the catalogue
constraint (type and parameters) from both sentences with the instruction
templates (`constraints.parse_instruction`) and answers
  entailment     both recognised, same type and parameters;
  contradiction  both recognised, different type or parameters (e.g. "fewer than 40
                 characters" back-translated as "fewer than 41 characters");
  neutral        either sentence is not a catalogue template — it cannot tell, so it keeps.
"""

from __future__ import annotations

import collections
from typing import Protocol, Sequence, runtime_checkable

from rlhf_jax.autoif import constraints
from rlhf_jax.autoif.cross_validation import VerifiedInstruction
from rlhf_jax.autoif.report import filter_report
from rlhf_jax.autoif.supervisor import Supervisor, parse_back_translation

NLI_LABELS = ("entailment", "neutral", "contradiction")


@runtime_checkable
class Judge(Protocol):
  """NLI-style judge: one label of NLI_LABELS per (premise, hypothesis)."""

  def __call__(self, premises: Sequence[str], hypotheses: Sequence[str]) -> list[str]:
    ...


class RuleBasedJudge:
  """Compares the catalogue constraints recovered from both sentences (see the module docstring)."""

  def __call__(self, premises: Sequence[str], hypotheses: Sequence[str]) -> list[str]:
    if len(premises) != len(hypotheses):
      raise ValueError(f"premises and hypotheses must have the same length, got {len(premises)} and "
                       f"{len(hypotheses)}")
    out = []
    for p, h in zip(premises, hypotheses):
      a, b = constraints.parse_instruction(p), constraints.parse_instruction(h)
      if a is None or b is None:
        out.append("neutral")
      else:
        out.append("entailment" if a == b else "contradiction")
    return out


def back_translation_filter(supervisor: Supervisor, verified: Sequence[VerifiedInstruction], *, judge: Judge,
                            num_functions: int = 3) -> tuple[list[VerifiedInstruction], dict]:
  """Drops instructions whose back-translated functions contradict them.

  Args:
    supervisor: writes the back-translations (one batched call).
    verified: cross-validated instructions.
    judge: labels (instruction, back-translation) pairs (one batched call).
    num_functions: how many of each instruction's functions to back-translate (the first ones).

  Returns:
    (kept instructions, FilterReport with label counts).
  """
  if num_functions < 1:
    raise ValueError(f"num_functions must be >= 1, got {num_functions}")
  owners, functions = [], []
  for i, v in enumerate(verified):
    for f in v.functions[:num_functions]:
      owners.append(i)
      functions.append(f)
  texts = [parse_back_translation(t) for t in supervisor.back_translate(functions)] if functions else []
  if len(texts) != len(functions):
    raise ValueError(f"supervisor.back_translate returned {len(texts)} texts for {len(functions)} functions")
  labels = judge([verified[i].instruction.text for i in owners], texts) if functions else []
  bad = [l for l in labels if l not in NLI_LABELS]
  if bad or len(labels) != len(functions):
    raise ValueError(f"judge must return one of {NLI_LABELS} per pair; got {len(labels)} labels, invalid {bad[:3]}")
  contradicted = {i for i, l in zip(owners, labels) if l == "contradiction"}
  kept = [v for i, v in enumerate(verified) if i not in contradicted]
  report = filter_report("back_translation", len(verified), len(kept), unit="instructions",
                         functions_back_translated=len(functions),
                         labels=dict(collections.Counter(labels)))
  return kept, report

