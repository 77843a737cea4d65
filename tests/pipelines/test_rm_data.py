"""Preference-pair construction of the RM stage (host side, no model)."""

import json
import random

from rlhf_jax.pipelines.rm import make_pairs, mutants


def test_pairs_are_passing_over_failing_of_the_same_prompt():
  groups = [{"task_id": "a", "prompt": "P", "completions": ["ok1", "bad1", "ok1", "bad2"],
             "passed": [True, False, True, False]},
            {"task_id": "b", "prompt": "Q", "completions": ["bad"], "passed": [False]}]
  pairs = make_pairs(groups, max_pairs=4, seed=0)
  assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("ok1", "bad1"), ("ok1", "bad2")]
  assert all(p["prompt"] == "P" and json.loads(p["metadata"])["task_id"] == "a" for p in pairs)
  assert len(make_pairs(groups, max_pairs=1, seed=0)) == 1


def test_mutants_are_distinct_single_edits_and_deterministic():
  code = "    xs = xs[::-1]\n    return [x for x in xs if x < 3]\n"
  out = mutants(code, k=4, rng=random.Random(0))
  assert len(out) == 4 and len(set(out)) == 4 and code not in out
  for m in out:
    assert len(m.splitlines()) == 2  # an edit, not a rewrite
    assert sum(a != b for a, b in zip(m, code)) <= 2 or len(m) != len(code)
  assert out == mutants(code, k=4, rng=random.Random(0))
  assert mutants("    return s\n", k=3, rng=random.Random(0)) == []  # nothing to mutate
