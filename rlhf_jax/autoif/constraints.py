"""Seed instructions from the constraint catalogue, and reading constraints back out of text and code.

The catalogue is `rlhf_jax.tasks.instructions` (33 constraint types, each a
parametrised instruction template and the source of its verifier). AutoIF
starts from hand-written atomic seed instructions (§9.1 step 1); ours are one
instance of each type with sampled parameters.

`parse_instruction` inverts the templates (text → type and parameters); the
rule-based back-translation judge and the scripted supervisor use it.
`parse_catalogue_source` recognises a catalogue verifier (constants + body) in
a function's source. Both only *read* text; nothing is executed.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import re
from typing import Any, Optional, Sequence

from rlhf_jax.tasks import instructions as catalogue

# Types whose parameters come from the query (they are not standalone instructions).
QUERY_DEPENDENT = ("startend:repeat_prompt",)


@dataclasses.dataclass(frozen=True)
class Instruction:
  """An AutoIF instruction.

  Attributes:
    text: the instruction sentence.
    origin: "seed" or "augmented".
    type_id, params: the catalogue constraint behind a seed (None when unknown,
      e.g. for supervisor-written instructions).
  """
  text: str
  origin: str = "seed"
  type_id: Optional[str] = None
  params: Optional[tuple] = None  # sorted (name, value) items, hashable

  @property
  def params_dict(self) -> Optional[dict]:
    return None if self.params is None else dict(self.params)


def standalone_types() -> list[str]:
  """Catalogue type ids usable as standalone instructions."""
  return [t.id for t in catalogue.CONSTRAINT_TYPES if t.id not in QUERY_DEPENDENT]


def seed_instructions(*, seed: int = 0, type_ids: Optional[Sequence[str]] = None) -> list[Instruction]:
  """One instruction per constraint type with parameters sampled from `random.Random(seed)` (§9.1 step 1).

  Args:
    seed: sampling seed.
    type_ids: the types to use (default: every standalone type of the catalogue).

  Returns:
    Instructions with origin "seed" and their type and parameters.
  """
  ids = standalone_types() if type_ids is None else list(type_ids)
  for t in ids:
    if t in QUERY_DEPENDENT:
      raise ValueError(f"type_ids: {t!r} takes its parameters from the query and cannot be a seed instruction")
  rng = random.Random(f"autoif-seeds:{seed}")
  types = {t.id: t for t in catalogue.CONSTRAINT_TYPES}
  out = []
  for t in ids:
    if t not in types:
      raise ValueError(f"type_ids: unknown constraint type {t!r}")
    params = types[t].sample(rng, "")
    out.append(Instruction(catalogue.instruction_text(t, params), "seed", t, tuple(sorted(params.items()))))
  return out


def _collapse(text: str) -> str:
  return " ".join(str(text).split())


def _template_regex(type_id: str, template: str, example: dict) -> re.Pattern:
  parts = re.split(r"(\{\w+\})", _collapse(template))
  pattern = []
  seen = set()
  for part in parts:
    m = re.fullmatch(r"\{(\w+)\}", part)
    if not m:
      pattern.append(re.escape(part))
      continue
    name = m.group(1)
    if name in seen:  # a repeated field must repeat the same value
      pattern.append(f"(?P={name})")
      continue
    seen.add(name)
    value_re = r"-?\d+" if isinstance(example.get(name), int) else r".+?"
    pattern.append(f"(?P<{name}>{value_re})")
  return re.compile("".join(pattern), re.DOTALL)


_PATTERNS = [(t.id, t.example_params, _template_regex(t.id, t.template, t.example_params))
             for t in catalogue.CONSTRAINT_TYPES if t.id not in QUERY_DEPENDENT]


def parse_instruction(text: str) -> Optional[tuple[str, dict]]:
  """(type_id, params) of an instruction written with a catalogue template, else None.

  Whitespace runs count as one space (an instruction written on one line
  matches a template with a line break). A match must render back to `text`,
  so a paraphrase or an instruction with extra words is not recognised.
  """
  text = _collapse(text)
  for type_id, example, pattern in _PATTERNS:
    m = pattern.fullmatch(text)
    if not m:
      continue
    params: dict[str, Any] = {}
    for name, value in m.groupdict().items():
      params[name] = int(value) if isinstance(example.get(name), int) else value
    if _collapse(catalogue.instruction_text(type_id, params)) == text:
      return type_id, params
  return None


_BODIES = sorted(((t.id, t.body) for t in catalogue.CONSTRAINT_TYPES), key=lambda x: -len(x[1]))


def parse_catalogue_source(source: str) -> Optional[tuple[str, dict]]:
  """(type_id, params) when `source` is a catalogue verifier (comment lines ignored), else None.

  The source must be upper-case constant assignments of literals followed by
  the type's body, exactly as `instructions.verification_source` writes it.
  """
  lines = [l for l in str(source).split("\n") if not l.lstrip().startswith("#")]
  text = "\n".join(lines).strip("\n") + "\n"
  for type_id, body in _BODIES:
    if not text.endswith(body):
      continue
    header = text[: len(text) - len(body)]
    params = {}
    ok = True
    for line in header.split("\n"):
      if not line.strip():
        continue
      m = re.fullmatch(r"([A-Z][A-Z0-9_]*) = (.+)", line.strip())
      if not m:
        ok = False
        break
      try:
        params[m.group(1).lower()] = ast.literal_eval(m.group(2))
      except (ValueError, SyntaxError):
        ok = False
        break
    ctype = next(t for t in catalogue.CONSTRAINT_TYPES if t.id == type_id)
    if ok and set(params) == set(ctype.example_params):
      return type_id, params
  return None
