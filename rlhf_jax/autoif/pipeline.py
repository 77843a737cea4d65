"""The whole AutoIF data pipeline (§9.1), one function call; each step is its own function in this package.

  seed_instructions ─ augment_instructions ─ generate_verifiers ─ cross_validate_instructions
    ─ back_translation_filter ─ make_query_prompts ─ sample_responses ─ score_responses
    ─ instruction_following_filter ─ quality_filter ─ sft_records
                                   └ query_level_pairs, instruction_level_pairs

Every generated function and response runs in the sandbox. Each filter adds a
FilterReport (in / out / removed, plus details) to `AutoIFResult.reports`.
The `autoif` stage wraps this with a model supervisor, dataset writing and
plots; tests and CPU runs use `ScriptedSupervisor`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from rlhf_jax.autoif.back_translation import Judge, RuleBasedJudge, back_translation_filter
from rlhf_jax.autoif.constraints import Instruction, seed_instructions
from rlhf_jax.autoif.cross_validation import CrossValidationConfig, cross_validate_instructions
from rlhf_jax.autoif.datasets import instruction_level_pairs, query_level_pairs, sft_records
from rlhf_jax.autoif.generation import augment_instructions, generate_verifiers
from rlhf_jax.autoif.responses import instruction_following_filter, make_query_prompts, quality_filter, \
    sample_responses, score_responses
from rlhf_jax.autoif.supervisor import Supervisor
from rlhf_jax.tasks import instructions as catalogue

_RULE_JUDGE = RuleBasedJudge()


@dataclasses.dataclass(frozen=True)
class AutoIFConfig:
  """Sizes and thresholds of one AutoIF run (defaults: the paper's thresholds, CPU-scale sizes).

  Attributes:
    seed: seeds the seed-instruction parameters, the query draw and the pair sampling.
    seed_type_ids: catalogue types of the seed instructions (None: all standalone types).
    augment_completions: supervisor completions of the augmentation prompt (0: seeds only).
    max_instruction_chars: longer augmented instructions are dropped.
    verifiers_per_instruction: K candidate functions (with cases) per instruction.
    cross_validation: thresholds (`CrossValidationConfig.paper()` / `.code()`); None skips the
      filter (the "w/o cross verification" ablation).
    back_translation_functions: functions back-translated per instruction (the code: 3).
    queries: the query pool (default: the instruction task's queries).
    queries_per_instruction: queries paired with each instruction (the paper: 16).
    query_chars: queries kept when min < len < max (the code: (20, 300)).
    responses_per_prompt: K responses per prompt (the paper: 8).
    response_threshold, response_strict: SFT responses need accuracy > 0.5 (paper) / ≥ with strict=False.
    min_quality_score, quality_strict: quality filter (≥ 8, paper; > 8 with strict); None skips it.
    pair_threshold, pair_strict: query-level positives: accuracy ≥ 0.5 (code, default) / > 0.5 (paper).
    instruction_pair_threshold, instruction_pair_strict: instruction-level positives (> 0.5).
    max_pos, max_neg: pair caps per prompt (2 × 2).
    timeout_s, memory_mb, max_workers: sandbox limits of each program (one function on its inputs).
  """
  seed: int = 0
  seed_type_ids: Optional[tuple] = None
  augment_completions: int = 4
  max_instruction_chars: int = 300
  verifiers_per_instruction: int = 8
  cross_validation: Optional[CrossValidationConfig] = CrossValidationConfig()
  back_translation_functions: int = 3
  queries: tuple = catalogue.QUERIES
  queries_per_instruction: int = 16
  query_chars: tuple = (0, 300)
  responses_per_prompt: int = 8
  response_threshold: float = 0.5
  response_strict: bool = True
  min_quality_score: Optional[float] = 8.0
  quality_strict: bool = False
  pair_threshold: float = 0.5
  pair_strict: bool = False
  instruction_pair_threshold: float = 0.5
  instruction_pair_strict: bool = True
  max_pos: int = 2
  max_neg: int = 2
  timeout_s: float = 5.0
  memory_mb: int = 512
  max_workers: Optional[int] = None


@dataclasses.dataclass
class AutoIFResult:
  """Everything a run produced.

  Attributes:
    sft: SFT records (`datasets.sft_records`).
    pairs: DPO pairs, instruction level then query level (metadata["level"]).
    instructions: every instruction after augmentation.
    verified: instructions that survived cross-validation and back-translation, with functions and cases.
    prompts, responses, accuracy: Stage 2 prompts, their K responses and accuracies [P, K].
    reports: one FilterReport per step, in pipeline order.
  """
  sft: list
  pairs: list
  instructions: list
  verified: list
  prompts: list
  responses: list
  accuracy: np.ndarray
  reports: list


def run_autoif(supervisor: Supervisor, config: AutoIFConfig = AutoIFConfig(), *,
               seeds: Optional[Sequence[Instruction]] = None,
               judge: Optional[Judge] = _RULE_JUDGE) -> AutoIFResult:
  """Runs §9.1 end to end with `supervisor` and returns the SFT set, DPO pairs and filter reports.

  Args:
    supervisor: the generator (a `Supervisor`).
    config: sizes and thresholds.
    seeds: seed instructions (default: `seed_instructions(seed=config.seed, type_ids=config.seed_type_ids)`).
    judge: the back-translation judge (default `RuleBasedJudge`); None skips the filter.
  """
  sandbox = dict(timeout_s=config.timeout_s, memory_mb=config.memory_mb, max_workers=config.max_workers)
  reports = []
  if seeds is None:
    seeds = seed_instructions(seed=config.seed, type_ids=config.seed_type_ids)
  # Stage 1: instructions, verification functions, cross-validation, back-translation.
  instructions, r = augment_instructions(supervisor, seeds, num_completions=config.augment_completions,
                                         max_chars=config.max_instruction_chars)
  reports.append(r)
  candidates, r = generate_verifiers(supervisor, instructions, k=config.verifiers_per_instruction)
  reports.append(r)
  verified, r = cross_validate_instructions(instructions, candidates, config=config.cross_validation, **sandbox)
  reports.append(r)
  if judge is not None:
    verified, r = back_translation_filter(supervisor, verified, judge=judge,
                                          num_functions=config.back_translation_functions)
    reports.append(r)
  # Stage 2: prompts, responses, accuracy, response filters.
  prompts, r = make_query_prompts(verified, config.queries, per_instruction=config.queries_per_instruction,
                                  seed=config.seed, query_chars=tuple(config.query_chars))
  reports.append(r)
  responses = sample_responses(supervisor, prompts, k=config.responses_per_prompt)
  accuracy = (score_responses(verified, prompts, responses, **sandbox) if prompts
              else np.zeros((0, config.responses_per_prompt)))
  kept, r = instruction_following_filter(prompts, responses, accuracy, threshold=config.response_threshold,
                                         strict=config.response_strict)
  reports.append(r)
  if config.min_quality_score is not None:
    kept, r = quality_filter(supervisor, prompts, kept, min_score=config.min_quality_score,
                             strict=config.quality_strict)
    reports.append(r)
  # Outputs: the SFT set and DPO pairs at both levels.
  sft = sft_records(verified, prompts, kept)
  ins_pairs, r = instruction_level_pairs(verified, seed=config.seed, threshold=config.instruction_pair_threshold,
                                         strict=config.instruction_pair_strict, max_pos=config.max_pos,
                                         max_neg=config.max_neg)
  reports.append(r)
  query_pairs, r = query_level_pairs(verified, prompts, responses, accuracy, seed=config.seed + 1,
                                     threshold=config.pair_threshold, strict=config.pair_strict,
                                     max_pos=config.max_pos, max_neg=config.max_neg)
  reports.append(r)
  return AutoIFResult(sft=sft, pairs=ins_pairs + query_pairs, instructions=list(instructions),
                      verified=list(verified), prompts=list(prompts), responses=responses, accuracy=accuracy,
                      reports=reports)
