"""Stage 1 generation: instruction augmentation and candidate verification functions (§9.1 steps 2–3)."""

from __future__ import annotations

from typing import Sequence

from rlhf_jax.autoif import constraints
from rlhf_jax.autoif.constraints import Instruction
from rlhf_jax.autoif.report import filter_report
from rlhf_jax.autoif.supervisor import Supervisor, VerifierCandidate, parse_instruction_list, \
    parse_verifier_completion


def _key(text: str) -> str:
  return " ".join(text.lower().split())


def augment_instructions(supervisor: Supervisor, seeds: Sequence[Instruction], *, num_completions: int,
                         max_chars: int = 300) -> tuple[list[Instruction], dict]:
  """D_ins = dedup(D_seed ∪ D_aug) (§9.1 step 2).

  The supervisor writes `num_completions` lists of new instructions; lines are
  parsed with `parse_instruction_list`, whitespace-collapsed, and kept unless
  empty, longer than `max_chars` or a duplicate (case- and
  whitespace-insensitive) of a seed or an earlier instruction. Augmented
  instructions written with a catalogue template get its type and parameters.

  Returns:
    (seeds first, then the new instructions; FilterReport over seeds + generated lines).
  """
  if num_completions < 0:
    raise ValueError(f"num_completions must be >= 0, got {num_completions}")
  completions = supervisor.augment_instructions([s.text for s in seeds], num_completions) if num_completions else []
  if len(completions) != num_completions:
    raise ValueError(f"supervisor.augment_instructions returned {len(completions)} completions, "
                     f"expected {num_completions}")
  generated = [" ".join(line.split()) for c in completions for line in parse_instruction_list(c)]
  out, seen = [], set()
  duplicates = too_long = 0
  for s in seeds:
    if _key(s.text) not in seen:
      seen.add(_key(s.text))
      out.append(s)
    else:
      duplicates += 1
  for text in generated:
    if len(text) > max_chars:
      too_long += 1
      continue
    if _key(text) in seen:
      duplicates += 1
      continue
    seen.add(_key(text))
    parsed = constraints.parse_instruction(text)
    out.append(Instruction(text, "augmented", *(parsed[0], tuple(sorted(parsed[1].items()))) if parsed
                           else (None, None)))
  report = filter_report("augmentation", len(seeds) + len(generated), len(out), unit="instructions",
                         seeds=len(seeds), generated=len(generated), duplicates=duplicates, too_long=too_long)
  return out, report


def generate_verifiers(supervisor: Supervisor, instructions: Sequence[Instruction], *,
                       k: int) -> tuple[list[list[VerifierCandidate]], dict]:
  """K candidate verification functions with test cases per instruction (§9.1 step 3).

  Completions that do not parse (`parse_verifier_completion`) are dropped
  here; an instruction left without any candidate fails cross-validation.

  Returns:
    (candidates per instruction, FilterReport over completions).
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  completions = supervisor.write_verifiers([i.text for i in instructions], k)
  if len(completions) != len(instructions) or any(len(c) != k for c in completions):
    raise ValueError(f"supervisor.write_verifiers must return {k} completions for each of "
                     f"{len(instructions)} instructions")
  candidates = [[c for c in (parse_verifier_completion(t) for t in comps) if c is not None]
                for comps in completions]
  n_in = sum(len(c) for c in completions)
  n_out = sum(len(c) for c in candidates)
  report = filter_report("verifier_generation", n_in, n_out, unit="completions",
                         instructions=len(instructions),
                         instructions_with_candidates=sum(bool(c) for c in candidates),
                         cases=sum(len(c.cases) for cs in candidates for c in cs))
  return candidates, report
