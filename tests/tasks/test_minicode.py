"""MiniCode: determinism, split disjointness, validity, budgets, and sandbox checks."""
import ast
import collections
import json
import statistics

import pytest

from rlhf_jax.execution import execute_many
from rlhf_jax.tasks import minicode
from sandbox_batch import batched_passes

SIZES = {1: 40, 2: 80, 3: 80}


@pytest.fixture(scope="module")
def splits():
  return {s: minicode.generate_problems(s, SIZES if s == "train" else {1: 15, 2: 40, 3: 40},
                                        seed=0)
          for s in minicode.SPLITS}


def test_deterministic_by_seed():
  a = minicode.generate_problems("train", {1: 10, 2: 10, 3: 10}, seed=3)
  b = minicode.generate_problems("train", {1: 10, 2: 10, 3: 10}, seed=3)
  c = minicode.generate_problems("train", {1: 10, 2: 10, 3: 10}, seed=4)
  assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
  assert [p.task_id for p in a] != [p.task_id for p in c]


def test_problem_is_a_function_of_its_combination():
  # The same combination drawn under another seed is the identical problem.
  a = {p.task_id: p for p in minicode.generate_problems("train", {1: 60}, seed=0)}
  b = {p.task_id: p for p in minicode.generate_problems("train", {1: 60}, seed=1)}
  common = set(a) & set(b)
  assert common
  for t in common:
    assert a[t] == b[t]
    assert minicode.make_problem(a[t].template, a[t].parameters) == a[t]


def test_splits_share_no_combination(splits):
  keys = {s: {minicode.combination_key(p.template, p.parameters) for p in ps}
          for s, ps in splits.items()}
  assert not keys["train"] & keys["validation"]
  assert not keys["train"] & keys["test"]
  assert not keys["validation"] & keys["test"]
  for s, ps in splits.items():
    assert all(p.split == s == minicode.split_of(p.template, p.parameters) for p in ps)
    assert len({p.task_id for p in ps}) == len(ps)  # distinct within a split
  # Across seeds too: split membership is seed-independent.
  other = minicode.generate_problems("test", {2: 40}, seed=7)
  assert not {minicode.combination_key(p.template, p.parameters) for p in other} & keys["train"]


def test_split_fractions_roughly_as_configured():
  combos = list(minicode.iter_all_combinations())
  counts = collections.Counter(minicode.split_of(t, p) for t, p in combos)
  assert len(combos) > 200
  assert 0.7 < counts["train"] / len(combos) < 0.9


def test_sizes_and_difficulties(splits):
  ps = splits["train"]
  counts = collections.Counter(p.difficulty for p in ps)
  assert counts == SIZES
  for p in ps:
    assert p.difficulty == len(p.template.split(":")[1].split("+"))
    assert p.canonical_solution.count("\n") == p.difficulty  # one line per operation


def test_prompts_tests_and_solutions_parse(splits):
  for ps in splits.values():
    for p in ps:
      tree = ast.parse(p.prompt + p.canonical_solution)
      assert [n.name for n in tree.body if isinstance(n, ast.FunctionDef)] == [p.entry_point]
      test = ast.parse(p.test)
      (check,) = test.body
      assert check.name == "check"
      asserts = [n for n in check.body if isinstance(n, ast.Assert)]
      assert 5 <= len(asserts) <= 8
      ast.parse(minicode.program_for(p, p.canonical_solution))
      json.dumps(p.to_dict())  # serialisable


def test_byte_budget(splits):
  ps = [p for s in splits.values() for p in s]
  prompt_bytes = [len(p.prompt.encode()) for p in ps]
  completion_bytes = [len(p.canonical_solution.encode()) for p in ps]
  assert max(prompt_bytes) <= minicode.MAX_PROMPT_BYTES
  assert max(completion_bytes) <= minicode.MAX_COMPLETION_BYTES
  assert statistics.mean(prompt_bytes) < 220
  assert statistics.mean(completion_bytes) < 80


def test_docstring_example_is_first_hidden_case(splits):
  p = splits["train"][0]
  example_call = p.prompt.split(">>> ")[1].split("\n")[0]
  assert f"assert {example_call.replace(p.entry_point, 'candidate', 1)} ==" in p.test


def test_program_for_matches_humaneval_convention():
  p = {"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 1\n",
       "entry_point": "f"}
  prog = minicode.program_for(p, "    return x\n")
  # prompt + completion + test, then check(entry_point); the grader guards what the candidate returns
  assert prog.startswith("def f(x):\n    return x\n\ndef check(c):\n    assert c(1) == 1\n")
  assert prog.endswith("\ncheck(f)\n")
  with pytest.raises(ValueError, match="entry_point"):
    minicode.program_for({"prompt": "", "test": ""}, "")


def test_bad_arguments():
  with pytest.raises(ValueError, match="split"):
    minicode.generate_problems("dev", 1)
  with pytest.raises(ValueError, match="difficulty 4"):
    minicode.generate_problems("train", {4: 1})
  with pytest.raises(ValueError, match="found only"):
    minicode.generate_problems("test", {1: 500}, max_attempts_per_problem=5)


def _programs(problems):
  programs, expect = [], []
  for p in problems:
    programs.append(minicode.program_for(p, p.canonical_solution))
    expect.append((p.task_id, "canonical", True))
    for name, completion in minicode.trivial_completions(p).items():
      programs.append(minicode.program_for(p, completion))
      expect.append((p.task_id, name, False))
  return programs, expect


def _individual_check(problems):
  programs, expect = _programs(problems)
  results = execute_many(programs, timeout_s=10.0, cache=False)
  wrong = [(e, r.status, r.stderr[-300:]) for e, r in zip(expect, results) if r.passed != e[2]]
  assert not wrong, wrong[:5]
  # Failing trivial completions fail on an assert, not on a sandbox limit.
  assert all(r.status in ("ok", "error") for r in results)
  assert all("AssertionError" in r.stderr for r, e in zip(results, expect) if not e[2])


def test_canonical_pass_trivial_fail_one_program_each(splits):
  # The real path: one sandbox process per program, on a few problems of
  # every difficulty and family.
  ps = [splits["validation"][i] for i in (0, 1, 20, 21, 60, 61)]
  assert {p.difficulty for p in ps} == {1, 2, 3}
  _individual_check(ps)


def test_canonical_pass_trivial_fail_200_problems(splits):
  ps = (splits["train"] + splits["validation"][:20] + splits["test"][:20])[:200]
  programs, expect = _programs(ps)
  flags = batched_passes(programs)
  wrong = [e for e, f in zip(expect, flags) if f != e[2]]
  assert not wrong, wrong[:5]


@pytest.mark.slow
def test_all_default_problems_in_sandbox():
  from rlhf_jax.data.datasets import DEFAULT_MINICODE_SIZES
  ps = [p for s, sizes in DEFAULT_MINICODE_SIZES.items()
        for p in minicode.generate_problems(s, sizes, seed=0)]
  programs, expect = _programs(ps)
  flags = batched_passes(programs, chunk=200)
  wrong = [e for e, f in zip(expect, flags) if f != e[2]]
  assert not wrong, wrong[:5]
  _individual_check(ps[::40])
