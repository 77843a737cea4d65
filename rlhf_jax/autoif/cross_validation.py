"""Cross-validation of verification functions and test cases by execution (ALGORITHMS §9.1 step 4).

The rule is a pure function of a verdict matrix (`cross_validate`); running
the functions in the sandbox and the bookkeeping around it is
`cross_validate_instructions`.

Paper (default, `CrossValidationConfig.paper()`): a test case is kept if its
accuracy across the functions (the share of functions whose verdict equals its
label) is > 0.5; a function is kept if its accuracy across the kept cases is
> 0.5; at least one function and one case must survive.

Official code (`CrossValidationConfig.code()`, `3_cross_validation.py`): the
instruction needs ≥ 3 unique compiling functions and ≥ 10 unique cases; a case
is kept if ANY function agrees with its label; a function is kept if its
accuracy on the kept cases is ≥ 0.8, a raise or timeout counting as a
disagreement.

Shared by both: functions that do not compile or define no `evaluate` are
removed first (they do not count towards the minimum); a None verdict (the
function raised) is left out of the accuracy means unless `none_is_wrong`;
a function that timed out or crashed the interpreter on any case is never
kept (it cannot serve as a verifier), though its verdicts up to the hang still
count for the cases.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from rlhf_jax.autoif.constraints import Instruction
from rlhf_jax.autoif.report import filter_report
from rlhf_jax.autoif.supervisor import VerifierCandidate
from rlhf_jax.autoif.verification import FunctionRun, pass_rates, run_functions, verdict_matrix

CASE_RULES = ("majority", "any")


@dataclasses.dataclass(frozen=True)
class CrossValidationConfig:
  """Thresholds of the cross-validation filter (defaults: the paper's).

  Attributes:
    min_functions: unique compiling functions an instruction needs before filtering.
    min_cases: unique test cases an instruction needs before filtering.
    case_rule: "majority" (case accuracy across functions > case_threshold) or
      "any" (some function agrees with the label).
    case_threshold: threshold of the "majority" rule.
    function_threshold: a function's accuracy on the kept cases must pass it.
    function_strict: > (True) or ≥ (False) for `function_threshold`.
    none_is_wrong: a None verdict counts as a disagreement in function
      accuracy (the code) instead of being left out (the paper's mean).
  """
  min_functions: int = 1
  min_cases: int = 1
  case_rule: str = "majority"
  case_threshold: float = 0.5
  function_threshold: float = 0.5
  function_strict: bool = True
  none_is_wrong: bool = False

  def __post_init__(self):
    if self.case_rule not in CASE_RULES:
      raise ValueError(f"case_rule must be one of {CASE_RULES}, got {self.case_rule!r}")
    if self.min_functions < 1 or self.min_cases < 1:
      raise ValueError(f"min_functions and min_cases must be >= 1, got {self.min_functions}, {self.min_cases}")
    for name in ("case_threshold", "function_threshold"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

  @classmethod
  def paper(cls) -> "CrossValidationConfig":
    return cls()

  @classmethod
  def code(cls) -> "CrossValidationConfig":
    return cls(min_functions=3, min_cases=10, case_rule="any", function_threshold=0.8, function_strict=False,
               none_is_wrong=True)


def cross_validate(verdicts_FxC, labels_C, *, config: CrossValidationConfig = CrossValidationConfig(),
                   usable_F=None) -> tuple[np.ndarray, np.ndarray]:
  """Which functions and cases survive (pure; see the module docstring for the rules).

  Args:
    verdicts_FxC: [F, C] verdicts of F compiling functions on C cases: 1.0 /
      0.0, NaN for None.
    labels_C: [C] expected outputs (bool).
    config: thresholds.
    usable_F: [F] bool, False for functions that timed out or crashed (never
      kept); default all True.

  Returns:
    (keep_F, keep_C) bool masks; both all False when the instruction fails
    (too few functions or cases, or nothing survives).
  """
  v = np.asarray(verdicts_FxC, np.float64)
  labels = np.asarray(labels_C, bool)
  if v.ndim != 2 or labels.shape != (v.shape[1],):
    raise ValueError(f"verdicts must be [F, C] and labels [C]; got {v.shape} and {labels.shape}")
  f, c = v.shape
  usable = np.ones(f, bool) if usable_F is None else np.asarray(usable_F, bool)
  none_F, none_C = np.zeros(f, bool), np.zeros(c, bool)
  if f < config.min_functions or c < config.min_cases:
    return none_F, none_C
  agree = np.where(np.isnan(v), np.nan, (v == labels[None, :].astype(np.float64)).astype(np.float64))
  if config.case_rule == "any":
    keep_C = np.any(agree == 1.0, axis=0)
  else:
    keep_C = np.nan_to_num(pass_rates(agree), nan=0.0) > config.case_threshold
  if not keep_C.any():
    return none_F, none_C
  kept = agree[:, keep_C]
  if config.none_is_wrong:
    acc_F = np.nan_to_num(kept, nan=0.0).mean(axis=1)
  else:
    acc_F = np.nan_to_num(pass_rates(kept.T), nan=-1.0)  # no verdict at all: never kept
  keep_F = (acc_F > config.function_threshold if config.function_strict
            else acc_F >= config.function_threshold) & usable
  if not keep_F.any():
    return none_F, none_C
  return keep_F, keep_C


@dataclasses.dataclass(frozen=True)
class VerifiedInstruction:
  """An instruction with its cross-validated functions and cases.

  Attributes:
    instruction: the instruction.
    functions: sources of the surviving functions (deduplicated).
    cases: the surviving (input, label) test cases.
    case_pass_rates: per surviving case, the share of surviving functions
      that return True on its input (None verdicts left out; NaN if none).
  """
  instruction: Instruction
  functions: tuple
  cases: tuple
  case_pass_rates: tuple


def _dedup_cases(candidates: Sequence[VerifierCandidate]) -> list[tuple[str, bool]]:
  return list(dict.fromkeys(c for cand in candidates for c in cand.cases))


def cross_validate_instructions(instructions: Sequence[Instruction],
                                candidates: Sequence[Sequence[VerifierCandidate]], *,
                                config: Optional[CrossValidationConfig] = CrossValidationConfig(),
                                timeout_s: float = 5.0,
                                memory_mb: int = 512, max_workers: Optional[int] = None
                                ) -> tuple[list[VerifiedInstruction], dict]:
  """Runs every unique function of every instruction on that instruction's unique cases and filters.

  One sandbox program per (instruction, unique function), all in one
  `execute_many` batch. A case listed with both labels is two cases (at most
  one of them can agree with a function).

  `config=None` is the "w/o cross verification" ablation: every function that
  compiles and finishes its cases is kept, with every case.

  Returns:
    (verified instructions, FilterReport) with counts of instructions,
    functions and cases in and out, and why instructions were dropped.
  """
  if len(instructions) != len(candidates):
    raise ValueError(f"instructions and candidates must have the same length, got {len(instructions)} "
                     f"and {len(candidates)}")
  jobs = []  # (instruction index, source, case inputs)
  per_instruction = []
  for i, cands in enumerate(candidates):
    sources = list(dict.fromkeys(c.source for c in cands))
    cases = _dedup_cases(cands)
    per_instruction.append((sources, cases))
    for s in sources:
      jobs.append((i, s, [x for x, _ in cases]))
  runs = run_functions([s for _, s, _ in jobs], [x for _, _, x in jobs], timeout_s=timeout_s,
                       memory_mb=memory_mb, max_workers=max_workers)
  by_instruction: dict[int, list[FunctionRun]] = {}
  for (i, _, _), run in zip(jobs, runs):
    by_instruction.setdefault(i, []).append(run)

  counts = dict(functions_in=0, functions_compiled=0, functions_out=0, cases_in=0, cases_out=0,
                timeouts=0, too_few=0, nothing_survived=0)
  verified = []
  for i, (ins, (sources, cases)) in enumerate(zip(instructions, per_instruction)):
    ins_runs = by_instruction.get(i, [])
    counts["functions_in"] += len(sources)
    counts["cases_in"] += len(cases)
    compiled = [(s, r) for s, r in zip(sources, ins_runs) if r.status not in ("compile_error", "no_evaluate")]
    counts["functions_compiled"] += len(compiled)
    counts["timeouts"] += sum(r.status == "timeout" for _, r in compiled)
    min_functions, min_cases = (1, 1) if config is None else (config.min_functions, config.min_cases)
    if len(compiled) < min_functions or len(cases) < min_cases:
      counts["too_few"] += 1
      continue
    v = verdict_matrix([r for _, r in compiled])
    if config is None:
      keep_F, keep_C = np.array([r.usable for _, r in compiled]), np.ones(len(cases), bool)
    else:
      keep_F, keep_C = cross_validate(v, [y for _, y in cases], config=config,
                                      usable_F=[r.usable for _, r in compiled])
    if not keep_F.any():
      counts["nothing_survived"] += 1
      continue
    functions = tuple(s for (s, _), k in zip(compiled, keep_F) if k)
    kept_cases = tuple(c for c, k in zip(cases, keep_C) if k)
    rates = pass_rates(v[np.ix_(keep_F, keep_C)])
    counts["functions_out"] += len(functions)
    counts["cases_out"] += len(kept_cases)
    verified.append(VerifiedInstruction(ins, functions, kept_cases, tuple(float(r) for r in rates)))
  report = filter_report("cross_validation", len(instructions), len(verified), unit="instructions",
                         rule=None if config is None else dataclasses.asdict(config), **counts)
  return verified, report
