"""AutoIF DPO pairs and SFT records (ALGORITHMS §9.2, §9.4)."""

import itertools

import numpy as np
import pytest

from rlhf_jax.autoif import Instruction, QueryPrompt, VerifiedInstruction, instruction_level_pairs, pair_indices, \
    query_level_pairs, sft_records

TOY = [1.0, 0.6, 0.0, 0.0, 0.3]


@pytest.mark.parametrize("strict", [False, True], ids=["code>=0.5", "paper>0.5"])
def test_toy_pass_rates_give_four_pairs(strict):
  (pairs,) = pair_indices(np.array([TOY]), seed=0, strict=strict)
  assert len(pairs) == 4
  assert set(pairs) == set(itertools.product([0, 1], [2, 3]))
  for c, r in pairs:
    assert TOY[c] >= 0.5 and TOY[r] == 0.0
  assert all(4 not in p for p in pairs)  # 0.3 is neither positive nor negative


def test_threshold_caps_and_empty_sides():
  rows = np.array([[0.5, 0.0, 0.2, 0.2, 0.2, 0.2],     # 0.5 is positive only with >=
                   [1.0, 1.0, 1.0, 0.0, 0.0, 0.0],     # 3 × 3 candidates: capped at 2 × 2
                   [1.0, 0.7, 0.6, 0.4, 0.3, 0.2],     # no negative: no pair
                   [np.nan, 0.0, 1.0, np.nan, 0.2, 0.2]])  # NaN (no verdict) is neither
  ge = pair_indices(rows, seed=3, strict=False)
  gt = pair_indices(rows, seed=3, strict=True)
  assert ge[0] == [(0, 1)] and gt[0] == []
  assert len(ge[1]) == 4 and len({c for c, _ in ge[1]}) == 2 and len({r for _, r in ge[1]}) == 2
  assert {c for c, _ in ge[1]} <= {0, 1, 2} and {r for _, r in ge[1]} <= {3, 4, 5}
  assert ge[2] == [] and ge[3] == [(2, 1)]
  # Which 2 of the 3 positives are sampled depends on the seed.
  assert len({frozenset(c for c, _ in pair_indices(rows[1:2], seed=s)[0]) for s in range(20)}) > 1


def _verified(rates, functions=("def evaluate(r):\n    return True\n",)):
  cases = tuple((f"case {i}", True) for i in range(len(rates)))
  return VerifiedInstruction(Instruction("Answer briefly."), tuple(functions), cases, tuple(rates))


def test_query_level_pairs_records():
  verified = [_verified([1.0])]
  prompts = [QueryPrompt(0, "Answer briefly.", "Describe the moon.", "Describe the moon. Answer briefly.")]
  responses = [[f"r{i}" for i in range(5)]]
  pairs, report = query_level_pairs(verified, prompts, responses, np.array([TOY]), seed=0)
  assert len(pairs) == 4 and report["pairs"] == 4 and report["out"] == 1
  for p in pairs:
    assert p["prompt"] == "Describe the moon. Answer briefly."
    assert p["chosen"] in ("r0", "r1") and p["rejected"] in ("r2", "r3")
    m = p["metadata"]
    assert m["level"] == "query" and m["chosen_accuracy"] >= 0.5 and m["rejected_accuracy"] == 0.0
    assert m["functions"] == list(verified[0].functions)


def test_identical_responses_make_one_pair():
  verified = [_verified([1.0])]
  prompts = [QueryPrompt(0, "Answer briefly.", "Q?", "Q? Answer briefly.")]
  pairs, _ = query_level_pairs(verified, prompts, [["same", "same", "bad", "bad"]], np.array([[1, 1, 0, 0.0]]))
  assert [(p["chosen"], p["rejected"]) for p in pairs] == [("same", "bad")]


def test_instruction_level_pairs_use_case_pass_rates():
  # Positives need a pass rate > 0.5 (paper): 0.5 is neither; NaN (no verdict) is neither.
  verified = [_verified([1.0, 0.6, 0.0, 0.5, float("nan")]), _verified([1.0, 1.0])]
  pairs, report = instruction_level_pairs(verified, seed=0)
  assert {(p["chosen"], p["rejected"]) for p in pairs} == {("case 0", "case 2"), ("case 1", "case 2")}
  assert all(p["prompt"] == "Answer briefly." and p["metadata"]["level"] == "instruction" for p in pairs)
  assert report["in"] == 2 and report["out"] == 1 and report["pairs"] == 2


def test_sft_records():
  verified = [_verified([1.0])]
  prompts = [QueryPrompt(0, "Answer briefly.", "Q?", "Q? Answer briefly.")]
  recs = sft_records(verified, prompts, [{"prompt_index": 0, "response": "Ok.", "accuracy": 1.0, "quality": 9.0}])
  assert recs == [{"prompt": "Q? Answer briefly.", "response": "Ok.", "task": "autoif",
                   "metadata": {"instruction": "Answer briefly.", "query": "Q?", "accuracy": 1.0,
                                "functions": list(verified[0].functions), "quality": 9.0}}]
