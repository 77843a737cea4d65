"""A scripted supervisor for CPU runs: right most of the time, wrong on purpose the rest.

`ScriptedSupervisor` implements `supervisor.Supervisor` without a model. It
knows the constraint catalogue (`tasks.instructions`): it reads an instruction
with `constraints.parse_instruction`, writes the catalogue's verifier for it,
and answers prompts by rewriting a stock answer to the query so that it meets
the constraint. A configurable share of its outputs is deliberately wrong, so
that every AutoIF filter has something to remove and tests can count what was
removed:

  augmentation      unverifiable style/tone instructions (no verifier can be written for them)
  verifiers         malformed completions; wrong functions: off-by-one thresholds, always True,
                    inverted, raising on some inputs, hanging, not compiling
  test cases        flipped labels
  back-translation  the instruction of another constraint
  responses         off-instruction (the stock answer unchanged) and off-topic (another query's answer)
  quality           scores 9 when the response mentions the query's topic word, else 2

Test-case labels are the truth: the supervisor runs the catalogue verifier on
its candidate cases in the sandbox (never in-process) before flipping some.
Everything is drawn from `random.Random(seed)`: the same calls in the same
order give the same outputs.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from typing import Mapping, Optional, Sequence, Union

from rlhf_jax.autoif import constraints
from rlhf_jax.autoif.supervisor import QueryPrompt, format_verifier_completion
from rlhf_jax.autoif.verification import run_functions
from rlhf_jax.tasks import instructions as catalogue

WRONG_FUNCTION_KINDS = ("off_by_one", "always_true", "inverted", "raises", "hangs", "syntax_error")

UNVERIFIABLE_INSTRUCTIONS = (
    "Write in the style of a Shakespeare sonnet.", "Use a cheerful and warm tone.",
    "Answer as a pirate would.", "Use vivid metaphors throughout.", "Sound like a wise old teacher.",
    "Make the answer feel nostalgic.", "Translate your answer into poetic language.",
)


@dataclasses.dataclass(frozen=True)
class ErrorRates:
  """Shares of deliberately wrong outputs (each a probability in [0, 1])."""
  unverifiable_instruction: float = 0.2
  malformed_completion: float = 0.1
  wrong_function: float = 0.3
  wrong_function_kinds: tuple = WRONG_FUNCTION_KINDS
  mislabelled_case: float = 0.1
  mistranslation: float = 0.05
  off_instruction: float = 0.4
  off_topic: float = 0.1

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name == "wrong_function_kinds":
        bad = set(v) - set(WRONG_FUNCTION_KINDS)
        if not v or bad:
          raise ValueError(f"error_rates.wrong_function_kinds must be a non-empty subset of "
                           f"{WRONG_FUNCTION_KINDS}, got {v!r}")
      elif not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
        raise ValueError(f"error_rates.{f.name} must be a probability in [0, 1], got {v!r}")


def _error_rates(value: Union[None, ErrorRates, Mapping]) -> ErrorRates:
  if value is None:
    return ErrorRates()
  if isinstance(value, ErrorRates):
    return value
  if isinstance(value, Mapping):
    names = {f.name for f in dataclasses.fields(ErrorRates)}
    unknown = set(value) - names
    if unknown:
      raise ValueError(f"error_rates has unknown fields {sorted(unknown)}; known: {sorted(names)}")
    value = dict(value)
    if "wrong_function_kinds" in value:
      value["wrong_function_kinds"] = tuple(value["wrong_function_kinds"])
    return ErrorRates(**value)
  raise ValueError(f"error_rates must be an ErrorRates, a mapping or None, got {type(value).__name__}")


# ------------------------------------------------------------------------------------ stock answers


def topic_word(query: str) -> str:
  """The query's last word, lower-case, letters only ("Describe a rainy day." → "day")."""
  words = re.findall(r"[A-Za-z]+", query)
  return words[-1].lower() if words else "it"


def stock_answer(query: str, rng: random.Random) -> str:
  """A plain few-sentence answer that starts with the query's topic word."""
  t = topic_word(query)
  first = f"{t.capitalize()} is worth a few words."
  rest = [f"Many people think about {t} often, and they have good reasons.",
          f"When it comes to {t}, small details matter.",
          f"My view is simple: {t} brings people together.",
          f"There are 3 things to say about {t}, and 2 of them are good.",
          "That is my short answer.", "Thanks for asking!"]
  return " ".join([first] + rng.sample(rest, rng.randint(2, 4)))


def _sentences(text: str) -> list[str]:
  return [s.strip() for s in re.findall(r"[^.!?]+[.!?]*", text) if s.strip()]


def _words_limit(text: str, n: int) -> str:
  return " ".join(text.split()[:max(n, 1)])


def satisfy(type_id: str, params: Mapping, answer: str, rng: random.Random) -> str:
  """Rewrites `answer` so that it meets the constraint (most of the time; the verifier decides)."""
  p = params
  s = _sentences(answer)
  t = answer.split()[0].strip(".,!?:") if answer.split() else "Answer"
  filler = " It is a topic with many sides."
  if type_id == "length:max_chars":
    out = ""
    for w in answer.split():
      if len(out) + len(w) + 1 >= p["n"]:
        break
      out = f"{out} {w}".strip()
    return out or t[: p["n"] - 1]
  if type_id == "length:min_chars":
    while len(answer) < p["n"]:
      answer += filler
    return answer
  if type_id == "length:max_words":
    return _words_limit(answer, p["n"] - 1)
  if type_id == "length:min_words":
    while len(answer.split()) < p["n"]:
      answer += filler
    return answer
  if type_id == "length:max_sentences":
    return " ".join(s[: p["n"]])
  if type_id == "length:paragraphs":
    s = s + ["More could be said."] * max(0, p["n"] - len(s))
    groups = [s[i::p["n"]] for i in range(p["n"])]
    return "\n***\n".join(" ".join(g) for g in groups)
  if type_id == "keywords:include":
    return f"{answer} It also touches on {p['a']} and {p['b']}."
  if type_id == "keywords:exclude":
    for w in (p["a"], p["b"]):
      answer = re.sub(r"\b" + re.escape(w) + r"\b", "", answer, flags=re.I)
    return " ".join(answer.split())
  if type_id == "keywords:frequency":
    return answer + "".join(f" One more word: {p['w']}." for _ in range(p["n"]))
  if type_id == "keywords:letter_min":
    return f"{answer} {p['c'] * p['n']}"
  if type_id == "keywords:letter_max":
    return " ".join(re.sub(re.escape(p["c"]), "", answer, flags=re.I).split())
  if type_id in ("case:lowercase", "case:capital_words_max"):
    return answer.lower()
  if type_id == "case:uppercase":
    return answer.upper()
  if type_id == "case:capital_words_min":
    return answer + " " + " ".join(["YES"] * p["n"])
  if type_id == "format:json":
    return json.dumps({"answer": answer})
  if type_id == "format:title":
    return f"<<{t}>>\n{answer}"
  if type_id == "format:bullets":
    s = s + ["One more point."] * max(0, p["n"] - len(s))
    return "\n".join(f"* {x}" for x in s[: p["n"]])
  if type_id == "format:sections":
    s = s + ["More could be said."] * max(0, p["n"] - len(s))
    return "\n".join(f"SECTION {i + 1}\n{x}" for i, x in enumerate(s[: p["n"]]))
  if type_id == "format:highlights":
    return answer + "".join(f" *key point {'abcdefgh'[i]}*" for i in range(p["n"]))
  if type_id == "format:two_responses":
    return f"{answer}\n******\n{' '.join(reversed(s))} Or simply: {t}."
  if type_id == "format:placeholders":
    return answer + "".join(f" [{w}]" for w in ("name", "place", "date", "time", "city")[: p["n"]])
  if type_id == "format:constrained":
    return f"{answer} My answer is {rng.choice(['yes', 'no', 'maybe'])}."
  if type_id == "startend:end_phrase":
    return f"{answer} {p['phrase']}"
  if type_id == "startend:start_phrase":
    return f"{p['phrase']} {answer}"
  if type_id == "startend:quotation":
    return f'"{answer}"'
  if type_id == "startend:postscript":
    return f"{answer}\n{p['marker']} Thanks for reading."
  if type_id == "punctuation:no_commas":
    return answer.replace(",", "")
  if type_id == "punctuation:forbidden_char":
    return answer.replace(p["c"], ".")
  if type_id == "punctuation:end_question":
    return f"{answer} What do you think?"
  if type_id == "content:no_digits":
    return " ".join(re.sub(r"\d", "", answer).split())
  if type_id == "content:min_digits":
    return answer + " " + " ".join(str(i + 1) for i in range(p["n"]))
  return answer


# -------------------------------------------------------------------------------- wrong functions


def _int_params(params: Mapping) -> list[str]:
  return [k for k, v in params.items() if isinstance(v, int) and not isinstance(v, bool)]


def wrong_function(kind: str, type_id: str, params: Mapping, rng: random.Random) -> str:
  """A deliberately wrong verifier of one kind (see `WRONG_FUNCTION_KINDS`)."""
  src = catalogue.verification_source(type_id, params)
  if kind == "off_by_one" and _int_params(params):
    name = rng.choice(_int_params(params))
    value = params[name] + rng.choice([-1, 1])
    return catalogue.verification_source(type_id, {**params, name: value if value >= 1 else params[name] + 1})
  if kind in ("off_by_one", "inverted"):
    return (src + "\n_reference = evaluate\n\n\ndef evaluate(response: str) -> bool:\n"
            "    return not _reference(response)\n")
  if kind == "always_true":
    return "def evaluate(response: str) -> bool:\n    return True\n"
  if kind == "raises":
    return (src + "\n_reference = evaluate\n\n\ndef evaluate(response: str) -> bool:\n"
            "    if len(response) % 2 == 0:\n        raise ValueError('unsupported response')\n"
            "    return _reference(response)\n")
  if kind == "hangs":
    return "def evaluate(response: str) -> bool:\n    while True:\n        pass\n"
  if kind == "syntax_error":
    return "def evaluate(response: str) -> bool\n    return len(response) > 0\n"
  raise ValueError(f"kind must be one of {WRONG_FUNCTION_KINDS}, got {kind!r}")


_STYLES = ("", "# Checks the response against the instruction.\n", "# A verification function.\n")


class ScriptedSupervisor:
  """`Supervisor` without a model, with configurable deliberate mistakes (see the module docstring).

  Args:
    seed: seed of its `random.Random`.
    error_rates: an `ErrorRates`, a mapping of some of its fields, or None (defaults).
    cases_per_completion: test cases in each verifier completion.
    timeout_s: sandbox limit when labelling its own test cases.
  """

  def __init__(self, seed: int = 0, error_rates: Union[None, ErrorRates, Mapping] = None, *,
               cases_per_completion: int = 3, timeout_s: float = 5.0):
    if cases_per_completion < 1:
      raise ValueError(f"cases_per_completion must be >= 1, got {cases_per_completion}")
    self.rates = _error_rates(error_rates)
    self.rng = random.Random(f"scripted-supervisor:{seed}")
    self.cases_per_completion = cases_per_completion
    self.timeout_s = timeout_s

  # ---------------------------------------------------------------------------------- Stage 1

  def augment_instructions(self, seed_instructions: Sequence[str], num_completions: int) -> list[str]:
    parsed = [p for p in (constraints.parse_instruction(s) for s in seed_instructions) if p is not None]
    types = {t.id: t for t in catalogue.CONSTRAINT_TYPES}
    out = []
    for _ in range(num_completions):
      lines = []
      for _ in range(5):
        if not parsed or self.rng.random() < self.rates.unverifiable_instruction:
          lines.append(self.rng.choice(UNVERIFIABLE_INSTRUCTIONS))
          continue
        type_id, _ = self.rng.choice(parsed)
        params = types[type_id].sample(self.rng, "")
        lines.append(" ".join(catalogue.instruction_text(type_id, params).split()))
      out.append("\n".join(f"{i + 1}. {l}" for i, l in enumerate(lines)))
    return out

  def _case_pools(self, parsed: Sequence[Optional[tuple]]) -> list[list[tuple[str, bool]]]:
    """Candidate test cases of each parsed instruction, labelled by the catalogue verifier in the sandbox."""
    jobs = []
    for p in parsed:
      if p is None:
        continue
      type_id, params = p
      answers = [stock_answer(q, self.rng) for q in self.rng.sample(catalogue.QUERIES, 6)]
      other = [t for t in constraints.standalone_types() if t != type_id]
      pool = [satisfy(type_id, params, a, self.rng) for a in answers[:4]]
      pool += answers[4:]
      for a in answers[:3]:
        o = self.rng.choice(other)
        pool.append(satisfy(o, next(t for t in catalogue.CONSTRAINT_TYPES if t.id == o).sample(self.rng, ""),
                            a, self.rng))
      jobs.append((catalogue.verification_source(type_id, params), list(dict.fromkeys(pool))))
    runs = run_functions([s for s, _ in jobs], [x for _, x in jobs], timeout_s=self.timeout_s)
    pools, it = [], iter(zip(jobs, runs))
    for p in parsed:
      if p is None:
        pools.append([])
        continue
      (_, inputs), run = next(it)
      pools.append([(x, v) for x, v in zip(inputs, run.verdicts) if v is not None])
    return pools

  def write_verifiers(self, instructions: Sequence[str], k: int) -> list[list[str]]:
    parsed = [constraints.parse_instruction(s) for s in instructions]
    pools = self._case_pools(parsed)
    out = []
    for p, pool in zip(parsed, pools):
      completions = []
      for _ in range(k):
        if p is None or not pool:
          completions.append("I cannot write a Python function that checks this instruction.")
          continue
        if self.rng.random() < self.rates.malformed_completion:
          completions.append('```json\n{"func": "def evaluate(response):\n    return True", "cases": [\n```')
          continue
        type_id, params = p
        if self.rng.random() < self.rates.wrong_function:
          source = wrong_function(self.rng.choice(self.rates.wrong_function_kinds), type_id, params, self.rng)
        else:
          source = self.rng.choice(_STYLES) + catalogue.verification_source(type_id, params)
        cases = self.rng.sample(pool, min(self.cases_per_completion, len(pool)))
        cases = [(x, (not y) if self.rng.random() < self.rates.mislabelled_case else y) for x, y in cases]
        completions.append(format_verifier_completion(source, cases))
      out.append(completions)
    return out

  def back_translate(self, functions: Sequence[str]) -> list[str]:
    out = []
    for f in functions:
      p = constraints.parse_catalogue_source(f)
      if p is None:
        out.append("Respond in any way you like.")
        continue
      type_id, params = p
      if self.rng.random() < self.rates.mistranslation:
        other = self.rng.choice([t for t in catalogue.CONSTRAINT_TYPES
                                 if t.id != type_id and t.id not in constraints.QUERY_DEPENDENT])
        type_id, params = other.id, other.example_params
      out.append(" ".join(catalogue.instruction_text(type_id, params).split()))
    return out

  # ---------------------------------------------------------------------------------- Stage 2

  def respond(self, prompts: Sequence[QueryPrompt], k: int) -> list[list[str]]:
    out = []
    for qp in prompts:
      parsed = constraints.parse_instruction(qp.instruction)
      responses = []
      for _ in range(k):
        query = qp.query
        if self.rng.random() < self.rates.off_topic:
          query = self.rng.choice([q for q in catalogue.QUERIES if topic_word(q) != topic_word(qp.query)])
        answer = stock_answer(query, self.rng)
        if parsed is not None and self.rng.random() >= self.rates.off_instruction:
          answer = satisfy(parsed[0], parsed[1], answer, self.rng)
        responses.append(answer)
      out.append(responses)
    return out

  def rate_quality(self, instructions: Sequence[str], queries: Sequence[str],
                   responses: Sequence[str]) -> list[str]:
    del instructions
    out = []
    for q, r in zip(queries, responses, strict=True):
      on_topic = re.search(r"\b" + re.escape(topic_word(q)) + r"\b", r, re.I) is not None
      out.append(f"The response {'addresses' if on_topic else 'ignores'} the query.\nScore: {9 if on_topic else 2}")
    return out
