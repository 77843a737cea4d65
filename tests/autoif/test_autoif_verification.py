"""Running verification functions in the sandbox: verdicts, None for raises, timeouts (ALGORITHMS §9.4)."""

import numpy as np
import pytest

from rlhf_jax.autoif import FunctionRun, pass_rates, run_functions, verdict_matrix

LE20 = "def evaluate(response):\n    return len(response) <= 20\n"
RAISES_ON_EVEN = ("def evaluate(response):\n    if len(response) % 2 == 0:\n        raise ValueError('even')\n"
                  "    return len(response) <= 20\n")
HANGS = "def evaluate(response):\n    while True:\n        pass\n"
HANGS_ON_LONG = "def evaluate(response):\n    while len(response) > 40:\n        pass\n    return True\n"
INPUTS = ["abc", "abcd", "x" * 31, "x" * 50]


@pytest.fixture(scope="module")
def runs():
  sources = [LE20, RAISES_ON_EVEN, HANGS, HANGS_ON_LONG,
             "def evaluate(response)\n    return True\n",            # does not compile
             "x = 1\n",                                               # no evaluate
             "def evaluate(response):\n    print('noise ' * 100)\n    return 'yes'\n",  # not a bool
             "def evaluate(response):\n    return 1 if 'a' in response else 0\n",       # 0/1 ints count
             "import os\ndef evaluate(response):\n    os._exit(0)\n"]   # kills its interpreter
  return dict(zip(["le20", "raises", "hangs", "hangs_on_long", "syntax", "no_eval", "not_bool", "ints", "exit"],
                  run_functions(sources, [INPUTS] * len(sources), timeout_s=1.0)))


def test_verdicts_of_a_correct_function(runs):
  assert runs["le20"] == FunctionRun("ok", (True, True, False, False), "ok")
  assert runs["le20"].usable
  assert runs["ints"].verdicts == (True, True, False, False)


def test_a_raise_is_none_neither_pass_nor_fail(runs):
  r = runs["raises"]
  assert r.status == "ok" and r.verdicts == (True, None, False, None)
  # Over [le20, raises]: where `raises` raised only le20 counts, so the rate is 1.0 or 0.0, never 0.5.
  np.testing.assert_array_equal(pass_rates(verdict_matrix([runs["le20"], r])), [1.0, 1.0, 0.0, 0.0])
  # A None beside a pass and a fail: 1 / 2.
  np.testing.assert_array_equal(pass_rates(np.array([[1.0], [np.nan], [0.0]])), [0.5])
  # Nothing but None: no accuracy at all (NaN), not 0.
  assert np.isnan(pass_rates(np.array([[np.nan], [np.nan]]))[0])


def test_a_hanging_function_times_out(runs):
  r = runs["hangs"]
  assert r.status == "timeout" and r.sandbox_status == "timeout"
  assert r.verdicts == (None,) * 4 and not r.usable
  # Verdicts written before the hang survive the kill.
  r = runs["hangs_on_long"]
  assert r.status == "timeout" and r.verdicts == (True, True, True, None)


def test_broken_functions(runs):
  assert runs["syntax"].status == "compile_error" and runs["syntax"].verdicts == (None,) * 4
  assert runs["no_eval"].status == "no_evaluate"
  # Printing cannot corrupt the verdicts; a non-bool return is no verdict.
  assert runs["not_bool"].status == "ok" and runs["not_bool"].verdicts == (None,) * 4
  assert runs["exit"].status == "crash" and not runs["exit"].usable


def test_bad_arguments():
  with pytest.raises(ValueError, match="same length"):
    run_functions([LE20], [])
  with pytest.raises(ValueError, match="inputs"):
    run_functions([LE20], [[1]])
  with pytest.raises(ValueError, match="timeout_s"):
    run_functions([LE20], [["a"]], timeout_s=0)
