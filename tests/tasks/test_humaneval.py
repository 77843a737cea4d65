"""HumanEval from the installed package: canonical solutions pass, trivial ones fail."""
import pytest

from rlhf_jax.execution import execute_many
from rlhf_jax.tasks import humaneval
from sandbox_batch import batched_passes

TRIVIAL = ("    return None\n", "    pass\n")


@pytest.fixture(scope="module")
def problems():
  return humaneval.load_problems()


def test_load_problems(problems):
  assert len(problems) == humaneval.NUM_PROBLEMS == 164
  assert [p["task_id"] for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
  assert problems[163]["task_id"] == "HumanEval/163"
  for p in problems:
    assert f"def {p['entry_point']}" in p["prompt"]
    assert "def check(candidate)" in p["test"]
  assert len(humaneval.load_problems(limit=5)) == 5
  with pytest.raises(ValueError, match="limit"):
    humaneval.load_problems(limit=-1)


def test_program_construction(problems):
  p = problems[0]
  program = humaneval.program_for(p, p["canonical_solution"])
  assert program.startswith(p["prompt"] + p["canonical_solution"])
  assert program.endswith(f"\ncheck({p['entry_point']})\n")
  compile(program, "<he>", "exec")


def test_first_20_one_program_each(problems):
  # The real path: one sandbox process per program.
  subset = problems[:20]
  programs = [humaneval.program_for(p, p["canonical_solution"]) for p in subset]
  programs += [humaneval.program_for(p, t) for p in subset for t in TRIVIAL]
  results = execute_many(programs, timeout_s=10.0, cache=False)
  canonical, trivial = results[:20], results[20:]
  assert [r.passed for r in canonical] == [True] * 20, [
      (p["task_id"], r.status, r.stderr[-200:]) for p, r in zip(subset, canonical) if not r.passed]
  assert not any(r.passed for r in trivial)


def test_all_164_canonical_pass_trivial_fail(problems):
  programs = [humaneval.program_for(p, p["canonical_solution"]) for p in problems]
  flags = batched_passes(programs, chunk=41)
  assert sum(flags) == 164, [p["task_id"] for p, f in zip(problems, flags) if not f]
  trivial = [humaneval.program_for(p, t) for p in problems for t in TRIVIAL]
  flags = batched_passes(trivial, chunk=82)
  passed = [problems[i // 2]["task_id"] for i, f in enumerate(flags) if f]
  assert not passed, passed


@pytest.mark.slow
def test_all_164_one_program_each(problems):
  programs = [humaneval.program_for(p, p["canonical_solution"]) for p in problems]
  programs += [humaneval.program_for(p, t) for p in problems for t in TRIVIAL]
  results = execute_many(programs, timeout_s=20.0, cache=False)
  assert sum(r.passed for r in results[:164]) == 164
  assert not any(r.passed for r in results[164:])
