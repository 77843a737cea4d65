"""The supervisor model of AutoIF: a pluggable protocol, its prompts and the parsers of its outputs.

Every generation step of §9.1 is one batched method. A supervisor returns
*text*, exactly what a sampled language model would return; the pipeline owns
the parsing (`parse_*` below), so a model-sampling supervisor is only "format
the prompt with the template below, sample, return the strings":

  class PolicySupervisor:                      # sketch; the stage provides it
    def write_verifiers(self, instructions, k):
      return [sample(verifier_prompt(ins), n=k) for ins in instructions]
    ...

`ScriptedSupervisor` (rlhf_jax.autoif.scripted) implements the protocol for
CPU runs with a configurable share of deliberate mistakes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Optional, Protocol, Sequence, runtime_checkable


@dataclasses.dataclass(frozen=True)
class QueryPrompt:
  """One (instruction, query) input of Stage 2; `prompt` is what the responding model sees."""
  instruction_id: int
  instruction: str
  query: str
  prompt: str


@runtime_checkable
class Supervisor(Protocol):
  """What the AutoIF pipeline asks of its supervisor model. All methods are batched and return raw text."""

  def augment_instructions(self, seed_instructions: Sequence[str], num_completions: int) -> list[str]:
    """`num_completions` completions of `augmentation_prompt(seed_instructions)`, each listing new
    instructions one per line (`parse_instruction_list`)."""
    ...

  def write_verifiers(self, instructions: Sequence[str], k: int) -> list[list[str]]:
    """For each instruction, k completions of `verifier_prompt(instruction)`: a ```json block with
    "func" (Python source of `evaluate(response) -> bool`) and "cases" ([{"input", "output"}]),
    read by `parse_verifier_completion`."""
    ...

  def back_translate(self, functions: Sequence[str]) -> list[str]:
    """For each verification function, one completion of `back_translation_prompt(function)`:
    the instruction the function checks (`parse_back_translation`)."""
    ...

  def respond(self, prompts: Sequence[QueryPrompt], k: int) -> list[list[str]]:
    """For each prompt, k sampled responses to `prompt.prompt`."""
    ...

  def rate_quality(self, instructions: Sequence[str], queries: Sequence[str],
                   responses: Sequence[str]) -> list[str]:
    """For each triple, one completion of `quality_prompt(...)` ending in "Score: <0-10>"
    (`parse_quality_score`)."""
    ...


# --------------------------------------------------------------------------------------- prompts


def augmentation_prompt(seed_instructions: Sequence[str], num: int = 50) -> str:
  """Self-instruct prompt (§9.1 step 2): new atomic format constraints checkable by a Python function."""
  examples = "\n".join(f"- {s}" for s in seed_instructions)
  return ("You write instructions that constrain the FORMAT of an answer, each one atomic and checkable by a "
          "short Python function (length, keywords, letter case, punctuation, layout, start or end). Do not "
          "write constraints on style, tone, metaphors, translation or content quality.\n"
          f"Examples:\n{examples}\n"
          f"Write {num} new instructions of this kind, one per line, without numbering.")


def verifier_prompt(instruction: str, num_cases: int = 3) -> str:
  """Verification-function prompt (§9.1 step 3): `evaluate(response) -> bool` and labelled test cases."""
  return ("Write a Python function `evaluate(response: str) -> bool` that returns True exactly when the "
          "response follows the instruction below, using only the standard library, and "
          f"{num_cases} test cases. Reply with one ```json block holding an object with \"func\" (the source "
          "code) and \"cases\" (a list of {\"input\": response, \"output\": true or false}).\n"
          f"Instruction: {instruction}")


def back_translation_prompt(function: str) -> str:
  """Back-translation prompt (§9.1 step 5): the instruction a verification function checks."""
  return ("Here is a Python function that checks whether a response follows an instruction. State that "
          "instruction in one sentence and reply with the sentence only.\n"
          f"```python\n{function}\n```")


def response_prompt(instruction: str, query: str) -> str:
  """The Stage-2 prompt (§9.1 step 6): the query followed by the instruction.

  The same layout as `tasks.instructions.make_prompt` (query, then the
  instruction sentences), so SFT/DPO data and the IFEval-style evaluation
  prompts look alike.
  """
  return f"{query.strip()} {instruction.strip()}"


def quality_prompt(instruction: str, query: str, response: str) -> str:
  """Query-quality prompt (§9.1 step 9): a 0–10 score of how well the response answers the query."""
  return ("Judge whether the response answers the query while following the instruction.\n"
          f"[Instruction] {instruction}\n[Query] {query}\n[Response] {response}\n"
          "Score 0 for a response unrelated to the query, 10 for a helpful, highly related one. "
          "End with one line `Score: <score>`.")


# --------------------------------------------------------------------------------------- parsers

_NUMBERING = re.compile(r"^\s*(?:[-*•]|\d+[.)]|\(\d+\))\s*")


def parse_instruction_list(text: str) -> list[str]:
  """Instructions in an augmentation completion: one per non-empty line, list numbering stripped."""
  out = []
  for line in str(text).splitlines():
    line = _NUMBERING.sub("", line).strip()
    if line:
      out.append(line)
  return out


# The official code drops lines mentioning these before running a function.
_STRIPPED_WORDS = ("download", "requests")


@dataclasses.dataclass(frozen=True)
class VerifierCandidate:
  """One parsed verification function with its labelled test cases ((input, expected) pairs)."""
  source: str
  cases: tuple


def _first_json_block(text: str):
  """The first ```json block that parses (a fence inside the JSON strings does not end it), else the whole text."""
  start = text.find("```json")
  while start >= 0:
    body = start + len("```json")
    end = text.find("```", body)
    while end >= 0:
      try:
        return json.loads(text[body:end])
      except ValueError:
        end = text.find("```", end + 3)
    start = text.find("```json", body)
  try:
    return json.loads(text.strip())
  except ValueError:
    return None


def parse_verifier_completion(text: str) -> Optional[VerifierCandidate]:
  """The function and cases of one `verifier_prompt` completion, or None when it is malformed.

  Reads the first ```json block that parses (or the whole text);
  needs a str "func" and a list "cases" of {"input": str, "output": bool}
  (malformed cases are skipped). Lines containing "download" or "requests"
  are removed from the function, as the official code does.
  """
  obj = _first_json_block(str(text))
  if not isinstance(obj, dict) or not isinstance(obj.get("func"), str) or not isinstance(obj.get("cases"), list):
    return None
  source = "\n".join(l for l in obj["func"].strip().split("\n") if not any(w in l for w in _STRIPPED_WORDS))
  cases = []
  for c in obj["cases"]:
    if isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), bool):
      cases.append((c["input"], c["output"]))
  if not source.strip():
    return None
  return VerifierCandidate(source + "\n", tuple(cases))


def format_verifier_completion(source: str, cases: Sequence[tuple[str, bool]]) -> str:
  """The completion format `parse_verifier_completion` reads (used by scripted supervisors and tests)."""
  obj = {"func": source, "cases": [{"input": x, "output": bool(y)} for x, y in cases]}
  return "```json\n" + json.dumps(obj, indent=1) + "\n```"


def parse_back_translation(text: str) -> str:
  """The instruction of a back-translation completion: its first non-empty line, code fences removed."""
  for line in str(text).replace("```", "\n").splitlines():
    line = _NUMBERING.sub("", line).strip()
    if line:
      return line
  return ""


_SCORE = re.compile(r"score\s*[:=]\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_quality_score(text: str) -> Optional[float]:
  """The last "Score: x" of a quality completion (None when absent)."""
  found = _SCORE.findall(str(text))
  return float(found[-1]) if found else None
