"""Cross-validation of functions and cases: the §9.4 toy at the paper's and the code's thresholds."""

import numpy as np
import pytest

from rlhf_jax.autoif import CrossValidationConfig, Instruction, VerifierCandidate, cross_validate, \
    cross_validate_instructions

PAPER, CODE = CrossValidationConfig.paper(), CrossValidationConfig.code()

# "Answer in at most 20 characters": three correct functions written differently, and a buggy one that
# counts words instead of characters.
CORRECT = [
    "def evaluate(response):\n    return len(response) <= 20\n",
    "def evaluate(response):\n    count = 0\n    for _ in response:\n        count += 1\n    return count < 21\n",
    "def evaluate(response: str) -> bool:\n    return not len(response) > 20\n",
]
BUGGY = "def evaluate(response):\n    return len(response.split()) <= 20\n"
CASES = [
    ("Short.", True), ("x" * 20, True), ("A bit longer reply.", True), ("", True),
    ("x" * 21, False), ("This sentence is clearly longer than twenty.", False),
    ("Another fairly long response here.", False), ("y" * 50, False),
    ("Tiny.", False),                                                # mislabelled for every function
    ("This response has far more than twenty characters.", True),   # mislabelled; only BUGGY agrees
]
INSTRUCTION = Instruction("Answer in at most 20 characters.")


def _toy_matrix():
  """Verdicts written out by hand: correct functions say len ≤ 20; the buggy one says True throughout."""
  truth = np.array([len(x) <= 20 for x, _ in CASES], np.float64)
  return np.stack([truth, truth, truth, np.ones(len(CASES))]), np.array([y for _, y in CASES])


def test_paper_thresholds_on_the_toy():
  keep_F, keep_C = cross_validate(*_toy_matrix(), config=PAPER)
  np.testing.assert_array_equal(keep_F, [True, True, True, False])  # buggy: 4/8 = 0.5, not > 0.5
  np.testing.assert_array_equal(keep_C, [True] * 8 + [False, False])


def test_code_thresholds_on_the_toy():
  keep_F, keep_C = cross_validate(*_toy_matrix(), config=CODE)
  np.testing.assert_array_equal(keep_F, [True, True, True, False])  # buggy: 5/9 < 0.8; correct 8/9
  # "Any function agrees": the case only the buggy function agrees with is kept; "Tiny." is not.
  np.testing.assert_array_equal(keep_C, [True] * 8 + [False, True])


def test_code_needs_three_functions_and_ten_cases():
  v, y = _toy_matrix()
  assert not cross_validate(v[:, :9], y[:9], config=CODE)[0].any()
  assert not cross_validate(v[[0, 1]], y, config=CODE)[0].any()
  assert cross_validate(v[:, :9], y[:9], config=PAPER)[0].any()


def test_none_verdicts_and_unusable_functions():
  v, y = _toy_matrix()
  # A function that raised on half the cases is judged on the others (paper) ...
  v = np.vstack([v, np.where(np.arange(len(y)) % 2 == 0, v[0], np.nan)])
  keep_F, _ = cross_validate(v, y, config=PAPER)
  assert keep_F[4]
  # ... but the code counts a raise as a disagreement: 4 of 9 kept cases right < 0.8.
  assert not cross_validate(v, y, config=CODE)[0][4]
  # A function that timed out is never kept, whatever its verdicts.
  keep_F, _ = cross_validate(v, y, config=PAPER, usable_F=[True, True, False, True, True])
  np.testing.assert_array_equal(keep_F, [True, True, False, False, True])


def test_nothing_survives_means_the_instruction_fails():
  # Every function returns True and every label is False: no case, so no function, survives.
  for config in (PAPER, CODE):
    keep_F, keep_C = cross_validate(np.ones((4, 10)), np.zeros(10, bool), config=config)
    assert not keep_F.any() and not keep_C.any()


@pytest.mark.parametrize("config", [PAPER, CODE], ids=["paper", "code"])
def test_toy_through_the_sandbox(config):
  cands = [VerifierCandidate(s, tuple(CASES[3 * i:3 * i + 3])) for i, s in enumerate(CORRECT)]
  cands.append(VerifierCandidate(BUGGY, tuple(CASES[9:])))
  cands.append(VerifierCandidate(CORRECT[0], ()))  # a duplicate function counts once
  hang = VerifierCandidate("def evaluate(response):\n    while True:\n        pass\n", (("a", True),))
  verified, report = cross_validate_instructions([INSTRUCTION, Instruction("Loop forever.")],
                                                 [cands, [hang]], config=config, timeout_s=1.0)
  assert len(verified) == 1
  v = verified[0]
  assert v.functions == tuple(CORRECT)
  dropped = {"Tiny."} | ({"This response has far more than twenty characters."} if config is PAPER else set())
  assert {x for x, _ in v.cases} == {x for x, _ in CASES} - dropped
  # Pass rates of the kept cases over the kept (correct) functions: 1 for short inputs, 0 for long ones.
  assert v.case_pass_rates == tuple(float(len(x) <= 20) for x, _ in v.cases)
  assert report["in"] == 2 and report["out"] == 1 and report["removed"] == 1
  assert report["functions_in"] == 5 and report["functions_out"] == 3 and report["timeouts"] == 1
  assert report["cases_in"] == 11 and report["cases_out"] == len(v.cases)


def test_ablation_without_cross_validation_keeps_every_usable_function():
  cands = [VerifierCandidate(s, tuple(CASES)) for s in CORRECT + [BUGGY]]
  verified, report = cross_validate_instructions([INSTRUCTION], [cands], config=None, timeout_s=5.0)
  assert verified[0].functions == tuple(CORRECT + [BUGGY]) and len(verified[0].cases) == len(CASES)
  assert report["rule"] is None


def test_config_validation():
  with pytest.raises(ValueError, match="case_rule"):
    CrossValidationConfig(case_rule="all")
  with pytest.raises(ValueError, match="function_threshold"):
    CrossValidationConfig(function_threshold=1.5)
  with pytest.raises(ValueError, match="verdicts"):
    cross_validate(np.zeros((2, 3)), [True, False])
