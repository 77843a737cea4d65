"""Evaluation harness: hand-made completions with known correct counts -> pass@k reports."""
import json
from math import comb

import pytest

from rlhf_jax.evaluation import (evaluate_code_completions, evaluate_instruction_completions,
                                 pass_at_k)
from rlhf_jax.tasks import instructions

ADD = {"task_id": "t/add", "prompt": "def add1(x: int) -> int:\n    \"\"\"x + 1\"\"\"\n",
       "entry_point": "add1", "test": "def check(c):\n    assert c(1) == 2\n    assert c(-3) == -2\n",
       "split": "train", "difficulty": 1}
REV = {"task_id": "t/rev", "prompt": "def rev(s: str) -> str:\n",
       "entry_point": "rev", "test": "def check(c):\n    assert c('ab') == 'ba'\n",
       "split": "test", "difficulty": 2}

GOOD_ADD, BAD_ADD = "    return x + 1\n", "    return x\n"


def _reference(n, c, k):
  return 1.0 - comb(n - c, k) / comb(n, k)


def test_two_of_four_correct():
  report = evaluate_code_completions(
      [ADD], [[GOOD_ADD, BAD_ADD, "    return 1 + x\n", "    return 2 * x\n"]], ks=(1, 2, 5))
  assert report["pass@1"] == pytest.approx(0.5)
  assert report["pass@2"] == pytest.approx(_reference(4, 2, 2)) == pytest.approx(5 / 6)
  assert "pass@5" not in report  # n = 4 < 5
  assert report["per_problem"] == [{"task_id": "t/add", "n": 4, "correct": 2,
                                    "statuses": ["ok", "error", "ok", "error"]}]
  assert report["status_counts"] == {"ok": 2, "error": 2}
  assert report["num_samples"] == 4
  assert report["isolation"]
  json.dumps(report)


def test_splits_difficulties_statuses_and_mixed_n():
  completions = [
      [GOOD_ADD, BAD_ADD, "    while True:\n        pass\n", "    raise ValueError\n",
       GOOD_ADD, GOOD_ADD],
      ["    return s[::-1]\n"],
  ]
  report = evaluate_code_completions([ADD, REV], completions, ks=(1, 5), timeout_s=1.0)
  # ADD: n=6, c=3; REV: n=1, c=1
  assert report["pass@1"] == pytest.approx((3 / 6 + 1.0) / 2)
  assert report["pass@5"] == pytest.approx(_reference(6, 3, 5)) == 1.0
  assert report["pass@5/num_items"] == 1
  assert report["per_split"]["train"]["pass@1"] == pytest.approx(0.5)
  assert report["per_split"]["test"] == {"num_items": 1, "pass@1": 1.0, "pass@1/num_items": 1}
  assert set(report["per_difficulty"]) == {"1", "2"}
  assert report["status_counts"] == {"ok": 4, "error": 2, "timeout": 1}
  # The harness's numbers equal the metric applied to its own per-problem counts.
  assert [(r["n"], r["correct"]) for r in report["per_problem"]] == [(6, 3), (1, 1)]
  assert pass_at_k(6, 3, 1) == pytest.approx(0.5)


def test_pass_at_k_matches_binomial_formula():
  # c = 0 and c = n ends, and a middle value, against the binomial formula.
  completions = [[BAD_ADD] * 10, [GOOD_ADD] * 10, [GOOD_ADD] * 3 + [BAD_ADD] * 7]
  report = evaluate_code_completions([ADD, dict(ADD, task_id="b"), dict(ADD, task_id="c")],
                                     completions, ks=(1, 5, 10), include_per_problem=False)
  for k in (1, 5, 10):
    expected = (_reference(10, 0, k) + _reference(10, 10, k) + _reference(10, 3, k)) / 3
    assert report[f"pass@{k}"] == pytest.approx(expected)
  assert "per_problem" not in report


def test_input_errors():
  with pytest.raises(ValueError, match="same length"):
    evaluate_code_completions([ADD], [[GOOD_ADD], [GOOD_ADD]])
  with pytest.raises(ValueError, match=r"completions_per_problem\[0\] must be a list of str"):
    evaluate_code_completions([ADD], [GOOD_ADD])
  with pytest.raises(ValueError, match="empty"):
    evaluate_code_completions([ADD], [[]])
  with pytest.raises(ValueError, match="ks"):
    evaluate_code_completions([ADD], [[GOOD_ADD]], ks=(0,))
  with pytest.raises(ValueError, match="must not be empty"):
    evaluate_code_completions([], [])


def test_instruction_completions_report():
  p_words = instructions.make_prompt("Describe the moon.", [("length:max_words", {"n": 5}),
                                                             ("case:lowercase", {})])
  p_start = instructions.make_prompt("Name a color.", [("startend:start_phrase",
                                                        {"phrase": "Well,"})])
  p_words["split"], p_start["split"] = "train", "test"
  report = evaluate_instruction_completions(
      [p_words, p_start],
      [["pale and round", "The Moon is a big pale rock", "grey"],
       ["Sure.\nWell, blue.", "Well, red."]], ks=(1, 2))
  # strict: p_words 2 of 3 responses follow both; p_start 1 of 2 (preamble fails strict)
  assert report["strict"]["pass@1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
  assert report["loose"]["pass@1"] == pytest.approx((2 / 3 + 1.0) / 2)
  assert report["strict"]["pass@2"] == pytest.approx((_reference(3, 2, 2) + 1.0) / 2)
  assert report["prompt_level_strict_acc"] == pytest.approx(3 / 5)
  # instructions: p_words 2 + 0 + 2 of 6, p_start 0 + 1 of 2
  assert report["inst_level_strict_acc"] == pytest.approx(5 / 8)
  assert report["inst_level_loose_acc"] == pytest.approx(6 / 8)
  assert report["per_split"]["test"]["loose"]["pass@1"] == 1.0
  assert report["per_prompt"][1] == {"key": p_start["key"], "n": 2, "strict_correct": 1,
                                     "loose_correct": 2}
  json.dumps(report)


def test_minicode_problems_canonical_and_trivial():
  from rlhf_jax.tasks import minicode
  problems = minicode.generate_problems("test", {1: 2, 2: 2}, seed=0)
  completions = [[p.canonical_solution, "    return None\n"] for p in problems]
  report = evaluate_code_completions(problems, completions, ks=(1, 2))
  assert report["pass@1"] == 0.5 and report["pass@2"] == 1.0
  assert report["per_difficulty"]["1"]["pass@1"] == 0.5
  assert report["per_split"] == {"test": {"num_items": 4, "pass@1": 0.5, "pass@1/num_items": 4,
                                          "pass@2": 1.0, "pass@2/num_items": 4}}
