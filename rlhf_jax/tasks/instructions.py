"""Verifiable instruction following (IFEval / AutoIF style).

A prompt is a short generic query plus one to three atomic constraints
("Use fewer than 20 words.", "Include a title in double angular brackets, like
<<title>>.", ...). Every constraint type has

* a parametrised instruction text (``str.format`` with its parameters),
* a verification function as SOURCE CODE: ``def evaluate(response: str) -> bool``
  preceded by its parameters as upper-case constants; it runs in the sandbox
  (``rlhf_jax.execution``), never in this process, exactly like the functions
  AutoIF generates (ALGORITHMS.md §9),
* labelled test cases ``(response, expected)`` for example parameters, which
  the test suite runs through the sandbox.

Checks follow IFEval's definitions (Zhou et al. 2023, ``instructions.py``).
Scores follow IFEval's reporting: a response is *strictly* correct on an
instruction if ``response.strip()`` is non-empty and the check holds; it is
*loosely* correct if the check holds on any non-empty variant among the
response, the response without its first line, without its last line, without
both, and each of those with markdown asterisks removed. Accuracy is reported
at prompt level (all instructions of the prompt followed) and instruction level
(fraction of instructions followed), strict and loose.

Batching: one sandbox program per (response, all constraints of its prompt)
prints a JSON object of boolean lists; the result is used only when the
sandbox reports a clean run (``passed``), so a verifier that exits early or
crashes the program scores every instruction of that response as not followed.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import random
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "ConstraintType", "CONSTRAINT_TYPES", "QUERIES", "SPLITS",
    "verification_source", "instruction_text", "make_prompt", "generate_prompts",
    "verification_program", "parse_verification_output", "check_responses",
    "score_instruction_responses", "prompt_sources",
]

SPLITS = ("train", "test")
_TEST_FRACTION = 0.1
MAX_PROMPT_BYTES = 300
RESULT_MARKER = "@@IFEVAL_RESULT@@"


@dataclasses.dataclass(frozen=True)
class ConstraintType:
  """One verifiable constraint type.

  Attributes:
    id: "category:name".
    template: instruction text, ``str.format``-ed with the parameters.
    body: verification source after the parameter constants; it defines
      ``evaluate(response: str) -> bool`` and may read the constants.
    sample: ``sample(rng, query) -> params``.
    example_params: parameters the labelled ``cases`` are written for.
    cases: labelled ``(response, expected)`` pairs under ``example_params``
      (strict semantics).
    conflicts: ids or categories it cannot be combined with in one prompt.
  """
  id: str
  template: str
  body: str
  sample: Callable[[random.Random, str], dict]
  example_params: dict
  cases: tuple[tuple[str, bool], ...]
  conflicts: tuple[str, ...] = ()

  @property
  def category(self) -> str:
    return self.id.split(":", 1)[0]


def _choice(**options: Sequence) -> Callable[[random.Random, str], dict]:
  def sample(rng: random.Random, query: str) -> dict:
    del query
    return {k: rng.choice(list(v)) for k, v in options.items()}
  return sample


_KEYWORDS = ("water", "light", "friend", "simple", "future", "garden", "music",
             "travel", "energy", "window", "story", "number")
_PHRASES = ("Is there anything else I can help with?", "Any other questions?",
            "That is all.", "Hope this helps.")
_STARTS = ("Sure.", "Here is my answer:", "Well,", "In short,")

_CT = ConstraintType
CONSTRAINT_TYPES: tuple[ConstraintType, ...] = (
    # ------------------------------------------------------------------ length
    _CT("length:max_chars", "Answer in fewer than {n} characters.",
        "def evaluate(response: str) -> bool:\n"
        "    return len(response) < N\n",
        _choice(n=(40, 60, 80, 100, 150, 200)), {"n": 40},
        (("Short answer.", True), ("x" * 39, True), ("x" * 40, False),
         ("This answer is certainly longer than forty characters.", False))),
    _CT("length:min_chars", "Write at least {n} characters.",
        "def evaluate(response: str) -> bool:\n"
        "    return len(response) >= N\n",
        _choice(n=(20, 40, 60, 100)), {"n": 20},
        (("x" * 20, True), ("A reply of sufficient length.", True),
         ("Too short.", False), ("", False))),
    _CT("length:max_words", "Use fewer than {n} words.",
        "def evaluate(response: str) -> bool:\n"
        "    return len(response.split()) < N\n",
        _choice(n=(5, 10, 15, 20, 30)), {"n": 5},
        (("one two three four", True), ("Yes.", True),
         ("one two three four five", False), ("a b c d e f g", False))),
    _CT("length:min_words", "Use at least {n} words.",
        "def evaluate(response: str) -> bool:\n"
        "    return len(response.split()) >= N\n",
        _choice(n=(5, 10, 20, 30)), {"n": 5},
        (("one two three four five", True), ("This sentence has six words in it.", True),
         ("Too few words.", False), ("one two three four", False))),
    _CT("length:max_sentences", "Use at most {n} sentences.",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    parts = [p for p in re.split(r'[.!?]+', response) if p.strip()]\n"
        "    return len(parts) <= N\n",
        _choice(n=(1, 2, 3)), {"n": 2},
        (("One. Two.", True), ("Just one sentence", True),
         ("One. Two. Three.", False), ("Hi! How are you? Fine.", False))),
    _CT("length:paragraphs",
        "Write exactly {n} paragraphs separated by the markdown divider ***.",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    paragraphs = re.split(r'\\s?\\*\\*\\*\\s?', response)\n"
        "    count = len(paragraphs)\n"
        "    for i, p in enumerate(paragraphs):\n"
        "        if not p.strip():\n"
        "            if i == 0 or i == len(paragraphs) - 1:\n"
        "                count -= 1\n"
        "            else:\n"
        "                return False\n"
        "    return count == N\n",
        _choice(n=(2, 3)), {"n": 2},
        (("First part.\n***\nSecond part.", True), ("A\n***\nB\n***", True),
         ("Only one paragraph.", False), ("A\n***\n***\nB", False),
         ("A *** B *** C", False))),
    # ---------------------------------------------------------------- keywords
    _CT("keywords:include", "Include the words '{a}' and '{b}'.",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    return all(re.search(r'\\b' + re.escape(w) + r'\\b', response, re.I)\n"
        "               for w in (A, B))\n",
        lambda rng, q: dict(zip("ab", rng.sample(_KEYWORDS, 2))), {"a": "water", "b": "light"},
        (("Water and light are both needed.", True), ("LIGHT over water", True),
         ("Only water here.", False), ("Waterfalls and lighthouses.", False))),
    _CT("keywords:exclude", "Do not use the words '{a}' or '{b}'.",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    return not any(re.search(r'\\b' + re.escape(w) + r'\\b', response, re.I)\n"
        "                   for w in (A, B))\n",
        lambda rng, q: dict(zip("ab", rng.sample(_KEYWORDS, 2))), {"a": "water", "b": "light"},
        (("A waterfall at night.", True), ("Nothing to see.", True),
         ("Water is wet.", False), ("the light", False))),
    _CT("keywords:frequency", "Use the word '{w}' at least {n} times.",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    return len(re.findall(r'\\b' + re.escape(W) + r'\\b', response, re.I)) >= N\n",
        _choice(w=_KEYWORDS, n=(2, 3)), {"w": "story", "n": 2},
        (("A story within a Story.", True), ("story story story", True),
         ("One story only.", False), ("stories and history", False))),
    _CT("keywords:letter_min", "Use the letter '{c}' at least {n} times.",
        "def evaluate(response: str) -> bool:\n"
        "    return response.lower().count(C) >= N\n",
        _choice(c="aeiost", n=(3, 5, 8)), {"c": "s", "n": 3},
        (("Suns set slowly.", True), ("sss", True), ("Ss", False), ("No such luck", False))),
    _CT("keywords:letter_max", "Use the letter '{c}' fewer than {n} times.",
        "def evaluate(response: str) -> bool:\n"
        "    return response.lower().count(C) < N\n",
        _choice(c="aeiost", n=(2, 3, 5)), {"c": "e", "n": 3},
        (("Hello there.", False), ("Fine.", True), ("Good job!", True), ("Eeee", False))),
    # ---------------------------------------------------------------- case
    _CT("case:lowercase", "Use only lowercase letters.",
        "def evaluate(response: str) -> bool:\n"
        "    return response.islower()\n",
        _choice(), {},
        (("all lowercase, really.", True), ("ok 123", True),
         ("Not lowercase.", False), ("123", False))),
    _CT("case:uppercase", "Write your whole answer in capital letters.",
        "def evaluate(response: str) -> bool:\n"
        "    return response.isupper()\n",
        _choice(), {},
        (("ALL CAPS HERE!", True), ("OK 42", True), ("Mostly CAPS", False), ("lower", False))),
    _CT("case:capital_words_max", "Use fewer than {n} words in all capital letters.",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    words = re.findall(r'\\w+', response)\n"
        "    return sum(w.isupper() for w in words) < N\n",
        _choice(n=(2, 3, 5)), {"n": 2},
        (("Only ONE shouted word.", True), ("none here", True),
         ("TWO BIG words", False), ("I AM HERE", False))),
    _CT("case:capital_words_min", "Use at least {n} words in all capital letters.",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    words = re.findall(r'\\w+', response)\n"
        "    return sum(w.isupper() for w in words) >= N\n",
        _choice(n=(2, 3, 5)), {"n": 2},
        (("TWO BIG words", True), ("I AM HERE", True),
         ("Only ONE shouted word.", False), ("none here", False))),
    # ---------------------------------------------------------------- format
    _CT("format:json", "Wrap your entire answer in JSON.",
        "import json\n"
        "def evaluate(response: str) -> bool:\n"
        "    value = response.strip()\n"
        "    for prefix in ('```json', '```Json', '```JSON', '```'):\n"
        "        value = value.removeprefix(prefix)\n"
        "    value = value.removesuffix('```').strip()\n"
        "    try:\n"
        "        json.loads(value)\n"
        "    except ValueError:\n"
        "        return False\n"
        "    return True\n",
        _choice(), {},
        (('{"answer": "yes"}', True), ('```json\n{"a": [1, 2]}\n```', True),
         ("answer: yes", False), ('{"a": 1', False))),
    _CT("format:title", "Include a title in double angular brackets, like <<title>>.",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    return any(t.strip('<>').strip() for t in re.findall(r'<<[^\\n]+>>', response))\n",
        _choice(), {},
        (("<<My Poem>>\nRoses are red.", True), ("Text <<T>> more", True),
         ("<Title>\nText", False), ("<< >> nothing", False))),
    _CT("format:bullets", "Use exactly {n} bullet points, like:\n* point",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    stars = re.findall(r'^\\s*\\*[^\\*].*$', response, flags=re.MULTILINE)\n"
        "    dashes = re.findall(r'^\\s*-.*$', response, flags=re.MULTILINE)\n"
        "    return len(stars) + len(dashes) == N\n",
        _choice(n=(2, 3, 4)), {"n": 2},
        (("* one\n* two", True), ("Intro:\n- a\n- b\nEnd.", True),
         ("* one\n* two\n* three", False), ("one, two", False))),
    _CT("format:sections",
        "Use {n} sections, each starting with 'SECTION X' (X = 1, 2, ...).",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    return len(re.split(r'\\s?SECTION\\s?\\d+\\s?', response)) - 1 >= N\n",
        _choice(n=(2, 3)), {"n": 2},
        (("SECTION 1\nIntro.\nSECTION 2\nBody.", True), ("SECTION 1 a SECTION 2 b SECTION 3 c", True),
         ("SECTION 1\nOnly one.", False), ("Section 1 and Section 2", False))),
    _CT("format:highlights",
        "Highlight at least {n} parts with markdown, like *highlighted part*.",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    count = 0\n"
        "    for h in re.findall(r'\\*[^\\n\\*]*\\*', response):\n"
        "        if h.strip('*').strip():\n"
        "            count += 1\n"
        "    for h in re.findall(r'\\*\\*[^\\n\\*]*\\*\\*', response):\n"
        "        if h.removeprefix('**').removesuffix('**').strip():\n"
        "            count += 1\n"
        "    return count >= N\n",
        _choice(n=(1, 2, 3)), {"n": 2},
        (("*one* and *two*", True), ("*a* then **b**", True), ("**bold** only", False),
         ("*one* only", False), ("no marks", False))),
    _CT("format:two_responses",
        "Give two different answers separated by six asterisks: ******.",
        "def evaluate(response: str) -> bool:\n"
        "    parts = response.split('******')\n"
        "    valid = []\n"
        "    for i, p in enumerate(parts):\n"
        "        if not p.strip():\n"
        "            if i != 0 and i != len(parts) - 1:\n"
        "                return False\n"
        "        else:\n"
        "            valid.append(p)\n"
        "    return len(valid) == 2 and valid[0].strip() != valid[1].strip()\n",
        _choice(), {},
        (("Yes.\n******\nNo.", True), ("A ****** B ******", True),
         ("Same ****** Same", False), ("Only one answer.", False))),
    _CT("format:placeholders",
        "Include at least {n} placeholders in square brackets, like [name].",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    return len(re.findall(r'\\[.*?\\]', response)) >= N\n",
        _choice(n=(1, 2, 3)), {"n": 2},
        (("Dear [name], at [address].", True), ("[a][b]", True),
         ("Dear [name].", False), ("No placeholders", False))),
    _CT("format:constrained",
        "Answer with one of: 'My answer is yes.', 'My answer is no.', 'My answer is maybe.'",
        "def evaluate(response: str) -> bool:\n"
        "    value = response.strip()\n"
        "    return any(o in value for o in\n"
        "               ('My answer is yes.', 'My answer is no.', 'My answer is maybe.'))\n",
        _choice(), {},
        (("My answer is yes.", True), ("Hmm. My answer is maybe.", True),
         ("my answer is yes.", False), ("Yes.", False))),
    # ---------------------------------------------------------------- startend
    _CT("startend:end_phrase", "End your answer with the exact phrase '{phrase}'",
        "def evaluate(response: str) -> bool:\n"
        "    return response.strip().strip('\"').lower().endswith(PHRASE.strip().lower())\n",
        _choice(phrase=_PHRASES), {"phrase": "Any other questions?"},
        (("Done. Any other questions?", True), ('"Ok. any other questions?"', True),
         ("Any other questions? Bye.", False), ("Done.", False))),
    _CT("startend:start_phrase", "Start your answer with '{phrase}'",
        "def evaluate(response: str) -> bool:\n"
        "    return response.strip().lower().startswith(PHRASE.strip().lower())\n",
        _choice(phrase=_STARTS), {"phrase": "Well,"},
        (("Well, it depends.", True), ("  well, maybe", True),
         ("It is well, then.", False), ("Well it depends", False))),
    _CT("startend:quotation", "Wrap your entire answer in double quotation marks.",
        "def evaluate(response: str) -> bool:\n"
        "    value = response.strip()\n"
        "    return len(value) > 1 and value[0] == '\"' and value[-1] == '\"'\n",
        _choice(), {},
        (('"Quoted answer."', True), ('  "x"  ', True), ("'single'", False), ('"', False))),
    _CT("startend:postscript", "At the end, add a postscript starting with {marker}",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    if MARKER == 'P.P.S':\n"
        "        pattern = r'\\s*p\\.\\s?p\\.\\s?s.*$'\n"
        "    elif MARKER == 'P.S.':\n"
        "        pattern = r'\\s*p\\.\\s?s\\..*$'\n"
        "    else:\n"
        "        pattern = r'\\s*' + re.escape(MARKER.lower()) + r'.*$'\n"
        "    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))\n",
        _choice(marker=("P.S.", "P.P.S")), {"marker": "P.S."},
        (("Hello.\nP.S. Bye.", True), ("Hi. p.s. see you", True),
         ("Hello. PS bye", False), ("Hello.", False))),
    _CT("startend:repeat_prompt",
        "First repeat the request above word for word, then answer it.",
        "def evaluate(response: str) -> bool:\n"
        "    return response.strip().lower().startswith(PROMPT.strip().lower())\n",
        lambda rng, q: {"prompt": q}, {"prompt": "Name a color."},
        (("Name a color. Blue.", True), ("name a color.\nRed", True),
         ("Blue.", False), ("A color: blue.", False)),
        conflicts=("length", "keywords", "case", "punctuation", "content")),
    # ------------------------------------------------------------- punctuation
    _CT("punctuation:no_commas", "Do not use any commas.",
        "def evaluate(response: str) -> bool:\n"
        "    return ',' not in response\n",
        _choice(), {},
        (("No commas here.", True), ("Fine; thanks.", True), ("Yes, sir.", False), (",", False))),
    _CT("punctuation:forbidden_char", "Do not use the character '{c}'.",
        "def evaluate(response: str) -> bool:\n"
        "    return C not in response\n",
        _choice(c=("!", "?", ";", ":")), {"c": "!"},
        (("Calm answer.", True), ("Why?", True), ("Wow!", False), ("a!b", False))),
    _CT("punctuation:end_question", "End your answer with a question.",
        "def evaluate(response: str) -> bool:\n"
        "    return response.rstrip().endswith('?')\n",
        _choice(), {},
        (("Do you agree?", True), ("Yes. Why? ", True), ("Yes.", False), ("? no", False))),
    # ---------------------------------------------------------------- content
    _CT("content:no_digits", "Do not use any digits.",
        "def evaluate(response: str) -> bool:\n"
        "    return not any(c.isdigit() for c in response)\n",
        _choice(), {},
        (("Two apples.", True), ("none", True), ("2 apples", False), ("Room 101.", False))),
    _CT("content:min_digits", "Include at least {n} numbers written as digits.",
        "import re\n"
        "def evaluate(response: str) -> bool:\n"
        "    return len(re.findall(r'\\d+', response)) >= N\n",
        _choice(n=(1, 2, 3)), {"n": 2},
        (("1 and 2", True), ("In 1990 I was 12.", True), ("One and two.", False), ("Only 7.", False))),
)

_TYPES: dict[str, ConstraintType] = {t.id: t for t in CONSTRAINT_TYPES}
assert len(_TYPES) == len(CONSTRAINT_TYPES), "duplicate constraint type id"

# Cross-category incompatibilities (pairs are symmetric). Within a category at
# most one constraint is used per prompt.
_CONFLICTS = {
    "format:json": ("startend", "punctuation", "content:min_digits", "length:paragraphs"),
    "format:constrained": ("length", "keywords", "case", "format", "startend", "punctuation",
                           "content"),
    "format:sections": ("case:lowercase", "content:no_digits", "case:capital_words_max"),
    "format:two_responses": ("length:paragraphs", "length:max_sentences"),
    "format:bullets": ("length:paragraphs",),
    "case:lowercase": ("startend:postscript",),
    "case:uppercase": ("keywords:letter_max",),
    "startend:quotation": ("format:two_responses",),
    "punctuation:end_question": ("startend",),
    "length:max_chars": ("format:sections", "format:two_responses", "startend:postscript"),
}

QUERIES: tuple[str, ...] = (
    "Describe a rainy day.", "Explain why the sky is blue.", "Give advice to a new student.",
    "Write a short poem about the sea.", "Describe your ideal breakfast.",
    "Explain what a computer does.", "Suggest a name for a cat.", "Describe a busy market.",
    "Write a note to a neighbour.", "Explain how plants grow.", "Describe a good friend.",
    "Give tips for better sleep.", "Write a review of a small cafe.",
    "Explain what money is for.", "Describe a walk in the forest.",
    "Write a slogan for a bike shop.", "Explain how to make tea.", "Describe the moon.",
    "Give reasons to learn music.", "Write a short story about a robot.",
    "Explain why exercise helps.", "Describe a winter morning.", "Write a thank-you message.",
    "Explain what a map is.", "Suggest a weekend plan.", "Describe an old library.",
    "Write an invitation to a party.", "Explain how a bridge stays up.",
    "Describe your favourite season.", "Give advice for a job interview.",
    "Write a riddle about time.", "Explain why we need rules.", "Describe a city at night.",
    "Write a short speech for a birthday.", "Explain how rain forms.",
    "Describe a quiet village.", "Name three uses of water.", "Write a limerick about a dog.",
    "Explain what a friend is.", "Describe a train journey.",
)


def _validate_params(ctype: ConstraintType, params: Mapping[str, Any]) -> None:
  missing = set(ctype.example_params) - set(params)
  if missing:
    raise ValueError(f"params for {ctype.id!r} are missing {sorted(missing)}")


def _get_type(type_id: str) -> ConstraintType:
  if type_id not in _TYPES:
    raise ValueError(f"unknown constraint type {type_id!r}; known: {sorted(_TYPES)}")
  return _TYPES[type_id]


def verification_source(type_id: str, params: Mapping[str, Any]) -> str:
  """Source of ``evaluate(response) -> bool`` for one constraint instance.

  The parameters become upper-case module constants in front of the type's
  fixed body, e.g. ``N = 40\\ndef evaluate(response: str) -> bool: ...``.
  """
  ctype = _get_type(type_id)
  _validate_params(ctype, params)
  header = "".join(f"{k.upper()} = {v!r}\n" for k, v in sorted(params.items()))
  return header + ctype.body


def instruction_text(type_id: str, params: Mapping[str, Any]) -> str:
  """The instruction sentence of one constraint instance."""
  ctype = _get_type(type_id)
  _validate_params(ctype, params)
  return ctype.template.format(**params)


def _compatible(a: ConstraintType, b: ConstraintType) -> bool:
  if a.category == b.category:
    return False
  for x, y in ((a, b), (b, a)):
    banned = set(_CONFLICTS.get(x.id, ())) | set(x.conflicts)
    if y.id in banned or y.category in banned:
      return False
  return True


def _prompt_split(query: str, constraints: Sequence[Mapping[str, Any]]) -> str:
  key = query + "|" + json.dumps(
      sorted([c["type"], c["params"]] for c in constraints), sort_keys=True)
  u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
  return "test" if u < _TEST_FRACTION else "train"


def make_prompt(query: str, constraints: Sequence[tuple[str, Mapping[str, Any]]]) -> dict:
  """Builds a prompt record from a query and ``(type_id, params)`` pairs.

  Returns:
    ``{"key", "prompt", "query", "constraints": [{"type", "params",
    "instruction"}], "split"}``; ``prompt`` is the query followed by the
    instruction sentences.
  """
  if not isinstance(query, str) or not query.strip():
    raise ValueError(f"query must be a non-empty str, got {query!r}")
  if not constraints:
    raise ValueError("constraints must not be empty")
  items = []
  for type_id, params in constraints:
    items.append({"type": type_id, "params": dict(params),
                  "instruction": instruction_text(type_id, params)})
  prompt = " ".join([query] + [c["instruction"] for c in items])
  split = _prompt_split(query, items)
  key = "IF/" + hashlib.sha256(
      (prompt + "|" + json.dumps([c["params"] for c in items], sort_keys=True)).encode()
  ).hexdigest()[:12]
  return {"key": key, "prompt": prompt, "query": query, "constraints": items, "split": split}


def generate_prompts(split: str, num_prompts: int, *, seed: int = 0,
                     max_constraints: int = 3,
                     queries: Sequence[str] = QUERIES,
                     type_ids: Sequence[str] | None = None,
                     max_prompt_bytes: int = MAX_PROMPT_BYTES,
                     max_attempts_per_prompt: int = 200) -> list[dict]:
  """Distinct instruction-following prompts of one split.

  Each prompt draws a query and 1..``max_constraints`` compatible constraint
  types (at most one per category, no known conflicts), then their
  parameters, all from ``random.Random(seed)``. The split is a hash of
  (query, constraints), so train and test never share a prompt.

  Args:
    split: "train" or "test".
    num_prompts: how many distinct prompts.
    seed: sampling seed (same seed, same list).
    max_constraints: most constraints per prompt (1..3 is IFEval-like).
    queries: the query pool.
    type_ids: restrict to these constraint types (default: all).
    max_prompt_bytes: prompts longer than this (UTF-8) are resampled.
    max_attempts_per_prompt: sampling budget before ValueError.

  Returns:
    Prompt records as returned by ``make_prompt``.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if not isinstance(num_prompts, int) or num_prompts < 0:
    raise ValueError(f"num_prompts must be an int >= 0, got {num_prompts!r}")
  if max_constraints < 1:
    raise ValueError(f"max_constraints must be >= 1, got {max_constraints}")
  types = [_get_type(t) for t in (type_ids if type_ids is not None else _TYPES)]
  rng = random.Random(f"ifeval:{seed}:{split}")
  out, seen, attempts = [], set(), 0
  while len(out) < num_prompts:
    attempts += 1
    if attempts > max_attempts_per_prompt * max(num_prompts, 1):
      raise ValueError(f"found only {len(out)} distinct {split!r} prompts of {num_prompts}")
    query = rng.choice(list(queries))
    k = rng.randint(1, max_constraints)
    chosen: list[ConstraintType] = []
    for t in rng.sample(types, len(types)):
      if len(chosen) == k:
        break
      if all(_compatible(t, c) for c in chosen):
        chosen.append(t)
    record = make_prompt(query, [(t.id, t.sample(rng, query)) for t in chosen])
    if (len(record["prompt"].encode()) > max_prompt_bytes or record["split"] != split
        or record["key"] in seen):
      continue
    seen.add(record["key"])
    out.append(record)
  return out


def prompt_sources(prompt: Mapping[str, Any]) -> list[str]:
  """The verification sources of a prompt's constraints, in order.

  A constraint may carry its own ``"source"`` (e.g. a function generated by
  AutoIF); otherwise it is built from its type and parameters.
  """
  constraints = prompt.get("constraints")
  if isinstance(constraints, str):  # stored as JSON in datasets
    constraints = json.loads(constraints)
  if not constraints:
    raise ValueError("prompt has no constraints")
  return [c["source"] if c.get("source") else verification_source(c["type"], c["params"])
          for c in constraints]


_PROGRAM = '''\
import json

RESPONSE = {response!r}
SOURCES = {sources!r}


def _variants(r):
    # IFEval loose variants: drop the first and/or last line, strip asterisks.
    lines = r.split("\\n")
    base = [r, "\\n".join(lines[1:]).strip(), "\\n".join(lines[:-1]).strip(),
            "\\n".join(lines[1:-1]).strip()]
    return base + [v.replace("*", "") for v in base]


def _check(fn, r):
    try:
        return bool(fn(r))
    except Exception:
        return False


strict, loose = [], []
for src in SOURCES:
    namespace = {{"__name__": "verifier"}}
    try:
        exec(compile(src, "<verifier>", "exec"), namespace)
        fn = namespace["evaluate"]
    except Exception:
        strict.append(False)
        loose.append(False)
        continue
    strict.append(bool(RESPONSE.strip()) and _check(fn, RESPONSE))
    loose.append(any(v.strip() and _check(fn, v) for v in _variants(RESPONSE)))
print({marker!r} + json.dumps({{"strict": strict, "loose": loose}}))
'''


def verification_program(response: str, sources: Sequence[str]) -> str:
  """One sandbox program that checks ``response`` against every source.

  It prints ``RESULT_MARKER + {"strict": [...], "loose": [...]}`` (one boolean
  per source). A verifier that raises scores False; one that fails to define
  ``evaluate`` scores False.
  """
  if not isinstance(response, str):
    raise ValueError(f"response must be a str, got {type(response).__name__}")
  return _PROGRAM.format(response=response, sources=list(sources), marker=RESULT_MARKER)


def parse_verification_output(result: Any, num_sources: int) -> dict:
  """Reads a sandbox ``ExecutionResult`` of ``verification_program``.

  Returns:
    ``{"strict": [bool]*num_sources, "loose": [...], "status": str,
    "valid": bool}``; when the run was not clean or printed no well-formed
    result, every instruction counts as not followed and ``valid`` is False.
  """
  failed = {"strict": [False] * num_sources, "loose": [False] * num_sources,
            "status": result.status, "valid": False}
  if not result.passed:
    return failed
  lines = [l for l in result.stdout.splitlines() if l.startswith(RESULT_MARKER)]
  if not lines:
    return failed
  try:
    data = json.loads(lines[-1][len(RESULT_MARKER):])
    strict = [bool(x) for x in data["strict"]]
    loose = [bool(x) for x in data["loose"]]
  except (ValueError, KeyError, TypeError):
    return failed
  if len(strict) != num_sources or len(loose) != num_sources:
    return failed
  return {"strict": strict, "loose": loose, "status": result.status, "valid": True}


def check_responses(prompts: Sequence[Mapping[str, Any]], responses: Sequence[str], *,
                    timeout_s: float = 10.0, memory_mb: int = 512,
                    max_workers: int | None = None) -> list[dict]:
  """Per-instruction strict/loose results of ``responses[i]`` to ``prompts[i]``.

  One sandbox program per response (``execute_many``, one batch).

  Returns:
    One dict per response, as ``parse_verification_output``, plus ``types``.
  """
  if len(prompts) != len(responses):
    raise ValueError(f"prompts and responses must have the same length, got "
                     f"{len(prompts)} and {len(responses)}")
  from rlhf_jax.execution import execute_many  # host layer; imported lazily

  sources = [prompt_sources(p) for p in prompts]
  programs = [verification_program(r, s) for r, s in zip(responses, sources)]
  results = execute_many(programs, timeout_s=timeout_s, memory_mb=memory_mb,
                         max_workers=max_workers)
  out = []
  for prompt, src, res in zip(prompts, sources, results):
    parsed = parse_verification_output(res, len(src))
    constraints = prompt["constraints"]
    if isinstance(constraints, str):
      constraints = json.loads(constraints)
    parsed["types"] = [c.get("type", "custom") for c in constraints]
    out.append(parsed)
  return out


def aggregate_scores(checked: Sequence[Mapping[str, Any]]) -> dict:
  """IFEval's four accuracies from ``check_responses`` output.

  prompt-level = mean over responses of all(instructions followed);
  instruction-level = followed instructions / all instructions; each strict
  and loose. Also per-type instruction accuracy and sandbox status counts.
  """
  if not checked:
    raise ValueError("checked must not be empty")
  n_inst = sum(len(c["strict"]) for c in checked)
  per_type: dict[str, dict[str, float]] = collections.defaultdict(
      lambda: {"count": 0, "strict": 0, "loose": 0})
  for c in checked:
    for t, s, l in zip(c["types"], c["strict"], c["loose"]):
      per_type[t]["count"] += 1
      per_type[t]["strict"] += int(s)
      per_type[t]["loose"] += int(l)
  return {
      "prompt_level_strict_acc": sum(all(c["strict"]) for c in checked) / len(checked),
      "inst_level_strict_acc": sum(sum(c["strict"]) for c in checked) / n_inst,
      "prompt_level_loose_acc": sum(all(c["loose"]) for c in checked) / len(checked),
      "inst_level_loose_acc": sum(sum(c["loose"]) for c in checked) / n_inst,
      "num_responses": len(checked),
      "num_instructions": n_inst,
      "num_invalid_runs": sum(not c["valid"] for c in checked),
      "status_counts": dict(collections.Counter(c["status"] for c in checked)),
      "per_type": {t: {"count": v["count"], "strict_acc": v["strict"] / v["count"],
                       "loose_acc": v["loose"] / v["count"]}
                   for t, v in sorted(per_type.items())},
  }


def score_instruction_responses(prompts: Sequence[Mapping[str, Any]],
                                responses: Sequence[str], **kwargs) -> dict:
  """IFEval strict/loose accuracy at prompt and instruction level.

  Args:
    prompts: prompt records (``make_prompt`` / ``generate_prompts`` / dataset rows).
    responses: one response per prompt.
    **kwargs: ``timeout_s``, ``memory_mb``, ``max_workers`` for the sandbox.

  Returns:
    ``aggregate_scores(...)`` plus ``"results"``: the per-response lists.
  """
  checked = check_responses(prompts, responses, **kwargs)
  report = aggregate_scores(checked)
  report["results"] = [{"strict": c["strict"], "loose": c["loose"], "status": c["status"]}
                       for c in checked]
  return report


def labelled_cases(type_id: str) -> tuple[dict, list[tuple[str, bool]]]:
  """(example params, labelled strict cases) of a constraint type."""
  ctype = _get_type(type_id)
  return dict(ctype.example_params), list(ctype.cases)
