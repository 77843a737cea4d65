"""MiniCode: procedurally generated Python function-writing problems.

Each problem is in HumanEval format (``task_id``, ``prompt``, ``entry_point``,
``canonical_solution``, ``test``) and is built from a small compositional
grammar: a pipeline of 1–3 operations over one value of one of three families

* ``list``: ``xs: list[int]`` — maps (``add k``, ``clamp to [lo, hi]``, ...),
  filters (``keep elements divisible by k``, ...), reorderings and reducers
  (``sum``, ``max``, ``count k``, ...);
* ``str``: ``s: str`` — word and character rewrites (``reverse every word``,
  ``replace 'a' by 'b'``, ...) and counters (``count vowels``, ...);
* ``int``: ``n: int`` — arithmetic and digit operations.

The difficulty of a problem is its number of operations. Every operation
contributes one docstring phrase and one line of code in a fixed style
(``xs = <expr>`` for intermediate stages, ``return <expr>`` for the last), so a
small byte-level model can learn the mapping phrase + constants -> code::

    def add_keepdiv_sum(xs: list[int]) -> int:
        \"\"\"Add 3 to each element, then keep elements divisible by 2, then return the sum.
        >>> add_keepdiv_sum([1, 4, 5])
        12
        \"\"\"
        xs = [x + 3 for x in xs]
        xs = [x for x in xs if x % 2 == 0]
        return sum(xs)

Splits: a problem is identified by its *combination* (template id = the
family and the operation names; parameters = the operations' constants).
The split of a combination is a fixed function of a hash of the combination,
so train, validation and test never share one, whatever seed generated them.
Test inputs depend only on the combination too, so a problem is the same
problem in every generated set.

The expected outputs of the hidden tests come from a Python reference of each
operation (a lambda written next to its code template); the test suite checks
through the sandbox that the canonical code agrees with that reference.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Any, Callable, Iterator, Mapping, Sequence

SPLITS = ("train", "validation", "test")
# Fractions of the combination space that go to each split (by hash).
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
DIFFICULTIES = (1, 2, 3)
FAMILIES = ("list", "str", "int")

# Byte budget of the small byte-level policy (context ~512 bytes).
MAX_PROMPT_BYTES = 300
MAX_COMPLETION_BYTES = 120

_VOWELS = "aeiou"
_LETTERS = "aeinorst"  # frequent letters, so replace/count ops have effect
_WORDS = (
    "apple", "stone", "river", "tree", "moon", "star", "rain", "sea", "note",
    "rose", "sand", "iron", "salt", "tent", "nest", "ant", "oat", "ear", "tin",
    "one", "east", "art", "ice", "sir", "toe", "rat", "sun", "net", "ore", "tea",
)


@dataclasses.dataclass(frozen=True)
class Op:
  """One grammar operation.

  Attributes:
    name: short name, used in template ids and entry-point names.
    family: "list", "str" or "int" (the type it consumes).
    reducer: True when it maps the family type to a scalar (it must be last).
    phrase: docstring phrase, ``str.format``-ed with the parameters.
    code: Python expression over the family variable, formatted with the
      parameters (``{k!r}`` style keeps strings quoted).
    fn: reference implementation ``fn(value, **params)``.
    params: parameter name -> tuple of allowed values.
    returns: annotation of the value after the op.
    constraint: optional predicate on the parameter dict (e.g. lo < hi).
  """
  name: str
  family: str
  reducer: bool
  phrase: str
  code: str
  fn: Callable[..., Any]
  params: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
  returns: str = ""
  constraint: Callable[[dict], bool] | None = None


_VAR = {"list": "xs", "str": "s", "int": "n"}
_TYPE = {"list": "list[int]", "str": "str", "int": "int"}


def _L(name, phrase, code, fn, params=None, constraint=None):
  return Op(name, "list", False, phrase, code, fn, params or {}, "list[int]", constraint)


def _LR(name, phrase, code, fn, params=None, returns="int"):
  return Op(name, "list", True, phrase, code, fn, params or {}, returns)


def _S(name, phrase, code, fn, params=None, constraint=None):
  return Op(name, "str", False, phrase, code, fn, params or {}, "str", constraint)


def _SR(name, phrase, code, fn, params=None, returns="int"):
  return Op(name, "str", True, phrase, code, fn, params or {}, returns)


def _I(name, phrase, code, fn, params=None):
  return Op(name, "int", False, phrase, code, fn, params or {}, "int")


def _IR(name, phrase, code, fn, params=None, returns="int"):
  return Op(name, "int", True, phrase, code, fn, params or {}, returns)


_K19 = tuple(range(1, 10))
_K25 = (2, 3, 4, 5)
_CHARS = tuple(_LETTERS)

OPS: tuple[Op, ...] = (
    # ---- list -> list
    _L("add", "add {k} to each element", "[x + {k} for x in xs]",
       lambda xs, k: [x + k for x in xs], {"k": _K19}),
    _L("sub", "subtract {k} from each element", "[x - {k} for x in xs]",
       lambda xs, k: [x - k for x in xs], {"k": _K19}),
    _L("mul", "multiply each element by {k}", "[x * {k} for x in xs]",
       lambda xs, k: [x * k for x in xs], {"k": _K25}),
    _L("mod", "replace each element by its remainder mod {k}", "[x % {k} for x in xs]",
       lambda xs, k: [x % k for x in xs], {"k": (2, 3, 4, 5, 6, 7)}),
    _L("square", "square each element", "[x * x for x in xs]",
       lambda xs: [x * x for x in xs]),
    _L("neg", "negate each element", "[-x for x in xs]",
       lambda xs: [-x for x in xs]),
    _L("abs", "take the absolute value of each element", "[abs(x) for x in xs]",
       lambda xs: [abs(x) for x in xs]),
    _L("clamp", "clamp each element to [{lo}, {hi}]", "[min(max(x, {lo}), {hi}) for x in xs]",
       lambda xs, lo, hi: [min(max(x, lo), hi) for x in xs],
       {"lo": (-3, -2, -1, 0, 1, 2), "hi": (2, 3, 4, 5, 6)},
       constraint=lambda p: p["hi"] - p["lo"] >= 2),
    _L("keepdiv", "keep elements divisible by {k}", "[x for x in xs if x % {k} == 0]",
       lambda xs, k: [x for x in xs if x % k == 0], {"k": _K25}),
    _L("keepodd", "keep the odd elements", "[x for x in xs if x % 2 == 1]",
       lambda xs: [x for x in xs if x % 2 == 1]),
    _L("keepgt", "keep elements greater than {k}", "[x for x in xs if x > {k}]",
       lambda xs, k: [x for x in xs if x > k], {"k": tuple(range(-3, 6))}),
    _L("keeplt", "keep elements less than {k}", "[x for x in xs if x < {k}]",
       lambda xs, k: [x for x in xs if x < k], {"k": tuple(range(-2, 7))}),
    _L("drop", "remove every {k}", "[x for x in xs if x != {k}]",
       lambda xs, k: [x for x in xs if x != k], {"k": tuple(range(-3, 7))}),
    _L("rev", "reverse the list", "xs[::-1]", lambda xs: xs[::-1]),
    _L("sort", "sort ascending", "sorted(xs)", lambda xs: sorted(xs)),
    _L("sortdesc", "sort descending", "sorted(xs, reverse=True)",
       lambda xs: sorted(xs, reverse=True)),
    _L("head", "keep the first {k} elements", "xs[:{k}]",
       lambda xs, k: xs[:k], {"k": (1, 2, 3, 4)}),
    _L("tail", "drop the first {k} elements", "xs[{k}:]",
       lambda xs, k: xs[k:], {"k": (1, 2, 3)}),
    _L("dedup", "remove duplicates, keeping first occurrences", "list(dict.fromkeys(xs))",
       lambda xs: list(dict.fromkeys(xs))),
    # ---- list -> scalar
    _LR("sum", "return the sum", "sum(xs)", lambda xs: sum(xs)),
    _LR("len", "return the number of elements", "len(xs)", lambda xs: len(xs)),
    _LR("max", "return the largest element (0 if empty)", "max(xs, default=0)",
        lambda xs: max(xs, default=0)),
    _LR("min", "return the smallest element (0 if empty)", "min(xs, default=0)",
        lambda xs: min(xs, default=0)),
    _LR("count", "return how many elements equal {k}", "xs.count({k})",
        lambda xs, k: xs.count(k), {"k": tuple(range(-2, 6))}),
    _LR("first", "return the first element (0 if empty)", "xs[0] if xs else 0",
        lambda xs: xs[0] if xs else 0),
    _LR("range", "return max minus min (0 if empty)", "max(xs) - min(xs) if xs else 0",
        lambda xs: max(xs) - min(xs) if xs else 0),
    # ---- str -> str
    _S("rev", "reverse the string", "s[::-1]", lambda s: s[::-1]),
    _S("revwords", "reverse every word", "' '.join(w[::-1] for w in s.split(' '))",
       lambda s: " ".join(w[::-1] for w in s.split(" "))),
    _S("wordorder", "reverse the order of the words", "' '.join(s.split(' ')[::-1])",
       lambda s: " ".join(s.split(" ")[::-1])),
    _S("upper", "convert to uppercase", "s.upper()", lambda s: s.upper()),
    _S("swapcase", "swap the case of every letter", "s.swapcase()", lambda s: s.swapcase()),
    _S("capwords", "capitalize every word", "' '.join(w.capitalize() for w in s.split(' '))",
       lambda s: " ".join(w.capitalize() for w in s.split(" "))),
    _S("replace", "replace {a!r} by {b!r}", "s.replace({a!r}, {b!r})",
       lambda s, a, b: s.replace(a, b), {"a": _CHARS, "b": _CHARS},
       constraint=lambda p: p["a"] != p["b"]),
    _S("remove", "remove every {c!r}", "s.replace({c!r}, '')",
       lambda s, c: s.replace(c, ""), {"c": _CHARS}),
    _S("novowels", "remove the vowels", "''.join(c for c in s if c not in 'aeiou')",
       lambda s: "".join(c for c in s if c not in _VOWELS)),
    _S("nospaces", "remove the spaces", "s.replace(' ', '')", lambda s: s.replace(" ", "")),
    _S("rotate", "move the first {k} characters to the end", "s[{k}:] + s[:{k}]",
       lambda s, k: s[k:] + s[:k], {"k": (1, 2, 3)}),
    _S("double", "double every character", "''.join(c * 2 for c in s)",
       lambda s: "".join(c * 2 for c in s)),
    _S("headwords", "keep the first {k} words", "' '.join(s.split(' ')[:{k}])",
       lambda s, k: " ".join(s.split(" ")[:k]), {"k": (1, 2, 3)}),
    _S("sortwords", "sort the words", "' '.join(sorted(s.split(' ')))",
       lambda s: " ".join(sorted(s.split(" ")))),
    # ---- str -> scalar
    _SR("vowels", "return the number of vowels", "sum(c in 'aeiou' for c in s)",
        lambda s: sum(c in _VOWELS for c in s)),
    _SR("count", "return how many times {c!r} occurs", "s.count({c!r})",
        lambda s, c: s.count(c), {"c": _CHARS}),
    _SR("len", "return the length", "len(s)", lambda s: len(s)),
    _SR("words", "return the number of words", "len(s.split())", lambda s: len(s.split())),
    _SR("find", "return the index of the first {c!r} (-1 if none)", "s.find({c!r})",
        lambda s, c: s.find(c), {"c": _CHARS}),
    # ---- int -> int
    _I("add", "add {k}", "n + {k}", lambda n, k: n + k, {"k": _K19}),
    _I("sub", "subtract {k}", "n - {k}", lambda n, k: n - k, {"k": _K19}),
    _I("mul", "multiply by {k}", "n * {k}", lambda n, k: n * k, {"k": _K25}),
    _I("div", "floor-divide by {k}", "n // {k}", lambda n, k: n // k, {"k": _K25}),
    _I("mod", "take the remainder mod {k}", "n % {k}", lambda n, k: n % k,
       {"k": (2, 3, 4, 5, 6, 7, 10)}),
    _I("abs", "take the absolute value", "abs(n)", lambda n: abs(n)),
    _I("square", "square it", "n * n", lambda n: n * n),
    _I("revdigits", "reverse the digits of its absolute value", "int(str(abs(n))[::-1])",
       lambda n: int(str(abs(n))[::-1])),
    # ---- int -> scalar
    _IR("digitsum", "return the sum of the digits of its absolute value",
        "sum(int(d) for d in str(abs(n)))", lambda n: sum(int(d) for d in str(abs(n)))),
    _IR("ndigits", "return the number of digits of its absolute value", "len(str(abs(n)))",
        lambda n: len(str(abs(n)))),
    _IR("even", "return whether it is even", "n % 2 == 0", lambda n: n % 2 == 0,
        returns="bool"),
    _IR("triangle", "return the sum of 1..n (0 if n < 1)", "sum(range(n + 1))",
        lambda n: sum(range(n + 1))),
)

_OPS_BY_FAMILY: dict[str, tuple[Op, ...]] = {
    f: tuple(op for op in OPS if op.family == f) for f in FAMILIES}
_OP_INDEX = {(op.family, op.name): op for op in OPS}


@dataclasses.dataclass(frozen=True)
class Problem:
  """A HumanEval-format problem plus its generating combination."""
  task_id: str
  prompt: str
  entry_point: str
  canonical_solution: str
  test: str
  template: str
  parameters: dict
  difficulty: int
  split: str

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def program_for(problem: Mapping[str, Any] | Problem, completion: str) -> str:
  """The program that tests ``completion`` of ``problem`` (HumanEval convention).

  ``prompt + completion + "\\n" + test``, then ``check(entry_point)`` run by a
  grader the completion cannot fool (``execution.grading.guarded_program``:
  builtins snapshotted before the prompt, every value the candidate returns
  rebuilt as a plain builtin value or a ``TypeError``); it runs to its end
  cleanly iff every hidden assert holds on what the candidate really computed.

  Args:
    problem: a ``Problem`` or a dict with ``prompt``, ``test``, ``entry_point``.
    completion: the function body (text that continues the prompt).

  Returns:
    Python source to run in the sandbox.
  """
  if isinstance(problem, Problem):
    problem = problem.to_dict()
  for key in ("prompt", "test", "entry_point"):
    if key not in problem:
      raise ValueError(f"problem is missing the field {key!r}")
  if not isinstance(completion, str):
    raise ValueError(f"completion must be a str, got {type(completion).__name__}")
  from rlhf_jax.execution.grading import guarded_program  # noqa: PLC0415 - host-only helper
  return guarded_program(problem["prompt"], completion, problem["test"], problem["entry_point"])


# ----------------------------------------------------------------------------
# Combinations, hashing and splits.


def combination_key(template: str, parameters: Mapping[str, Any]) -> str:
  """Canonical string of a (template, parameters) combination."""
  return template + "|" + json.dumps(dict(parameters), sort_keys=True)


def _digest(text: str) -> bytes:
  return hashlib.sha256(text.encode("utf-8")).digest()


def split_of(template: str, parameters: Mapping[str, Any]) -> str:
  """The split a combination belongs to: a fixed function of its hash."""
  u = int.from_bytes(_digest(combination_key(template, parameters))[:8], "big") / 2.0**64
  acc = 0.0
  for split in SPLITS:
    acc += SPLIT_FRACTIONS[split]
    if u < acc:
      return split
  return SPLITS[-1]


def _sample_params(op: Op, rng: random.Random) -> dict | None:
  for _ in range(20):
    p = {name: rng.choice(values) for name, values in op.params.items()}
    if op.constraint is None or op.constraint(p):
      return p
  return None


def _sample_combination(family: str, difficulty: int, rng: random.Random):
  """Random op chain: ``difficulty - 1`` distinct transforms + transform-or-reducer."""
  ops = _OPS_BY_FAMILY[family]
  transforms = [op for op in ops if not op.reducer]
  chain = rng.sample(transforms, difficulty - 1)
  last = rng.choice([op for op in ops if op not in chain])
  chain.append(last)
  params = []
  for op in chain:
    p = _sample_params(op, rng)
    if p is None:
      return None
    params.append(p)
  template = family + ":" + "+".join(op.name for op in chain)
  flat = {f"{i}.{name}": v for i, p in enumerate(params) for name, v in p.items()}
  return template, flat


def _parse(template: str, parameters: Mapping[str, Any]) -> tuple[str, list[Op], list[dict]]:
  family, names = template.split(":", 1)
  chain = [_OP_INDEX[(family, name)] for name in names.split("+")]
  params: list[dict] = [{} for _ in chain]
  for key, value in parameters.items():
    i, name = key.split(".", 1)
    params[int(i)][name] = value
  return family, chain, params


# ----------------------------------------------------------------------------
# Test inputs.


def _random_input(family: str, rng: random.Random):
  if family == "list":
    return [rng.randint(-5, 9) for _ in range(rng.randint(2, 7))]
  if family == "str":
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 4)))
  return rng.choice([rng.randint(-99, 99), rng.randint(100, 999), rng.randint(-9, 9)])


_EDGE_INPUTS = {"list": ([], [4], [-3]), "str": ("", "sea"), "int": (0, -7)}


def _run_chain(chain: Sequence[Op], params: Sequence[dict], value):
  for op, p in zip(chain, params):
    value = op.fn(value, **p)
  return value


def _is_trivial(value) -> bool:
  # Outputs that `return None/0/[]/''` (or `pass`) would match.
  return value is None or value == 0 or value == [] or value == ""


_NUM_CASES = 7


def _make_cases(chain, params, family, rng) -> list[tuple[Any, Any]] | None:
  """Edge cases + random cases, or None if the function is degenerate.

  Degenerate = the tests could not tell the canonical solution from a trivial
  one: fewer than two distinct outputs, no output that differs from the input,
  or no output outside {None, 0, [], ''}.
  """
  cases, seen = [], set()
  for x in _EDGE_INPUTS[family]:
    cases.append((x, _run_chain(chain, params, x)))
    seen.add(repr(x))
  for _ in range(40):
    if len(cases) >= _NUM_CASES:
      break
    x = _random_input(family, rng)
    if repr(x) in seen:
      continue
    seen.add(repr(x))
    cases.append((x, _run_chain(chain, params, x)))
  outputs = {repr(y) for _, y in cases}
  if len(outputs) < 2:
    return None
  if all(repr(x) == repr(y) for x, y in cases):
    return None
  nontrivial = [(x, y) for x, y in cases
                if not _is_trivial(y) and repr(x) != repr(y)]
  # Need an example for the docstring that is informative, taken from the
  # random (non-edge) cases and short enough for the byte budget.
  nontrivial = [(x, y) for x, y in nontrivial
                if repr(x) not in {repr(e) for e in _EDGE_INPUTS[family]}
                and len(repr(x)) + len(repr(y)) <= 60]
  if not nontrivial:
    return None
  # Every operation must matter: dropping any intermediate one changes some
  # output, so no docstring phrase can be ignored (e.g. "replace 'i' by 'a',
  # then count vowels" is rejected).
  for i in range(len(chain) - 1):
    rest_chain = [op for j, op in enumerate(chain) if j != i]
    rest_params = [p for j, p in enumerate(params) if j != i]
    if all(repr(_run_chain(rest_chain, rest_params, x)) == repr(y) for x, y in cases):
      return None
  example = nontrivial[0]
  cases.remove(example)
  return [example] + cases


# ----------------------------------------------------------------------------
# Problem construction.


def _render(family, chain, params, cases, template, parameters, split) -> Problem:
  var, arg_type = _VAR[family], _TYPE[family]
  entry_point = "_".join(op.name for op in chain)
  if entry_point in {"len", "sum", "max", "min", "abs", "range", "sort", "upper", "double"}:
    entry_point = family + "_" + entry_point  # don't shadow builtins
  phrases = [op.phrase.format(**p) for op, p in zip(chain, params)]
  doc = ", then ".join(phrases)
  doc = doc[0].upper() + doc[1:] + "."
  ex_in, ex_out = cases[0]
  prompt = (f"def {entry_point}({var}: {arg_type}) -> {chain[-1].returns}:\n"
            f'    """{doc}\n'
            f"    >>> {entry_point}({ex_in!r})\n"
            f"    {ex_out!r}\n"
            f'    """\n')
  lines = [f"    {var} = {op.code.format(**p)}\n" for op, p in zip(chain[:-1], params[:-1])]
  lines.append(f"    return {chain[-1].code.format(**params[-1])}\n")
  test = "def check(candidate):\n" + "".join(
      f"    assert candidate({x!r}) == {y!r}\n" for x, y in cases)
  task_id = "MiniCode/" + _digest(combination_key(template, parameters)).hex()[:12]
  return Problem(task_id=task_id, prompt=prompt, entry_point=entry_point,
                 canonical_solution="".join(lines), test=test, template=template,
                 parameters=dict(parameters), difficulty=len(chain), split=split)


def make_problem(template: str, parameters: Mapping[str, Any]) -> Problem | None:
  """The problem of one combination, or None if it is degenerate or too long.

  Deterministic: the hidden test inputs are drawn from an RNG seeded by the
  combination's hash, so the same combination always gives the same problem.
  """
  family, chain, params = _parse(template, parameters)
  rng = random.Random(_digest("cases:" + combination_key(template, parameters)))
  cases = _make_cases(chain, params, family, rng)
  if cases is None:
    return None
  problem = _render(family, chain, params, cases, template, parameters,
                    split_of(template, parameters))
  if (len(problem.prompt.encode()) > MAX_PROMPT_BYTES
      or len(problem.canonical_solution.encode()) > MAX_COMPLETION_BYTES):
    return None
  return problem


def _redundant(template: str) -> bool:
  # Pairs whose composition is the identity or collapses to one op; they would
  # teach the model that phrases can be ignored.
  names = template.split(":", 1)[1].split("+")
  pairs = set(zip(names, names[1:]))
  return bool(pairs & {("rev", "rev"), ("neg", "neg"), ("sort", "sortdesc"),
                       ("sortdesc", "sort"), ("sort", "sort"), ("abs", "abs"),
                       ("upper", "swapcase"), ("swapcase", "swapcase"),
                       ("wordorder", "wordorder"), ("revwords", "revwords")})


def generate_problems(split: str, num_per_difficulty: Mapping[int, int] | int, *,
                      seed: int = 0,
                      families: Sequence[str] = FAMILIES,
                      max_attempts_per_problem: int = 400) -> list[Problem]:
  """Generates distinct MiniCode problems of one split.

  Combinations are sampled with ``random.Random(seed)`` (family uniformly from
  ``families``, then operations and constants uniformly); those whose hash
  puts them in another split, degenerate ones and duplicates are skipped.

  Args:
    split: "train", "validation" or "test".
    num_per_difficulty: problems to generate per difficulty, e.g.
      ``{1: 100, 2: 1000, 3: 1000}``; an int means that many per difficulty.
    seed: sampling seed; the same seed gives the same list.
    families: which families to draw from.
    max_attempts_per_problem: sampling budget; exhausting it (the split has
      fewer distinct combinations than asked) raises ValueError.

  Returns:
    Problems ordered by difficulty, then by generation order.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if isinstance(num_per_difficulty, int):
    num_per_difficulty = {d: num_per_difficulty for d in DIFFICULTIES}
  for d, n in num_per_difficulty.items():
    if d not in DIFFICULTIES:
      raise ValueError(f"num_per_difficulty has difficulty {d}; allowed {DIFFICULTIES}")
    if not isinstance(n, int) or n < 0:
      raise ValueError(f"num_per_difficulty[{d}] must be an int >= 0, got {n!r}")
  for f in families:
    if f not in FAMILIES:
      raise ValueError(f"families has {f!r}; allowed {FAMILIES}")
  problems: list[Problem] = []
  for difficulty in sorted(num_per_difficulty):
    want = num_per_difficulty[difficulty]
    rng = random.Random(f"{seed}:{split}:{difficulty}")
    seen: set[str] = set()
    found: list[Problem] = []
    attempts = 0
    while len(found) < want:
      attempts += 1
      if attempts > max_attempts_per_problem * max(want, 1):
        raise ValueError(
            f"split {split!r} difficulty {difficulty}: found only {len(found)} distinct "
            f"problems of the {want} asked for (families={tuple(families)}); ask for fewer")
      combo = _sample_combination(rng.choice(tuple(families)), difficulty, rng)
      if combo is None:
        continue
      template, params = combo
      key = combination_key(template, params)
      if key in seen or split_of(template, params) != split or _redundant(template):
        seen.add(key)
        continue
      seen.add(key)
      problem = make_problem(template, params)
      if problem is not None:
        found.append(problem)
    problems.extend(found)
  return problems


def iter_all_combinations(difficulty: int = 1,
                          families: Sequence[str] = FAMILIES) -> Iterator[tuple[str, dict]]:
  """Every (template, parameters) combination of difficulty 1 (exhaustive).

  Higher difficulties are too many to enumerate; this is for inspection and
  for tests of split coverage.
  """
  if difficulty != 1:
    raise ValueError(f"only difficulty 1 is enumerable, got {difficulty}")
  import itertools
  for f in families:
    for op in _OPS_BY_FAMILY[f]:
      names = list(op.params)
      for values in itertools.product(*(op.params[n] for n in names)):
        p = dict(zip(names, values))
        if op.constraint is not None and not op.constraint(p):
          continue
        yield f"{f}:{op.name}", {f"0.{n}": v for n, v in p.items()}


TRIVIAL_COMPLETIONS = {
    "none": "    return None\n",
    "pass": "    pass\n",
    "zero": "    return 0\n",
    "empty_list": "    return []\n",
    "empty_str": "    return ''\n",
}


def trivial_completions(problem: Mapping[str, Any] | Problem) -> dict[str, str]:
  """Completions that must fail every problem: constants and the identity."""
  if isinstance(problem, Problem):
    problem = problem.to_dict()
  var = _VAR[problem["template"].split(":", 1)[0]]
  return dict(TRIVIAL_COMPLETIONS, identity=f"    return {var}\n")
