"""The task registry: every built-in task's grade (partial credit, success = 1) and user task factories."""

import numpy as np
import pytest

from experiments.configs.base import get_base_config
from rlhf_jax.tasks import base, registry
from rlhf_jax.tasks import minicode


def test_char_match_score_is_one_only_for_the_exact_target():
  assert registry.char_match_score("cba", "cba") == 1.0
  assert registry.char_match_score("cbx", "cba") == pytest.approx(2 / 3)
  assert registry.char_match_score("cbaa", "cba") == pytest.approx(3 / 4)  # extra characters cost
  assert registry.char_match_score("", "cba") == 0.0 and registry.char_match_score("", "") == 1.0


def test_minicode_partial_credit_counts_hidden_tests_in_the_sandbox(tmp_path):
  problem = minicode.make_problem("int:add", {"0.k": 3})
  assert problem is not None
  task = registry.MiniCodeTask(str(tmp_path))
  rec = problem.to_dict()
  n_tests = problem.test.count("assert ")
  # correct; right only for n == 0 and n == -7? no: a wrong constant passes no test; a constant 3 passes n == 0
  scores = task.grade([rec] * 4, [problem.canonical_solution, "    return n + 4\n", "    return 3\n",
                                  "    print('@@TESTS_PASSED@@ 7/7')\n    return 0\n"])
  assert scores[0] == 1.0
  assert scores[1] == 0.0
  assert 0.0 < scores[2] < 1.0 and scores[2] == pytest.approx(1 / n_tests)  # only the input 0 maps to 3
  assert scores[3] == 0.0  # a forged count without the run's nonce is not read
  assert base.success(scores).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_counting_test_needs_assert_lines():
  with pytest.raises(ValueError, match="assert"):
    registry.counting_test("def check(candidate):\n    pass\n", "abc")


def test_instruction_grade_is_the_fraction_of_constraints_followed(tmp_path):
  from rlhf_jax.tasks import instructions  # pylint: disable=import-outside-toplevel
  rec = instructions.make_prompt("Describe the moon.", [("length:max_words", {"n": 5}),
                                                        ("length:min_chars", {"n": 20})])
  task = registry.InstructionsTask(str(tmp_path))
  scores = task.grade([rec] * 3, ["Pale round moon tonight.", "Pale.", "The moon is a pale round rock."])
  np.testing.assert_allclose(scores, [1.0, 0.5, 0.5])


def test_make_task_resolves_user_factories_and_names_bad_ones(tmp_path, monkeypatch):
  (tmp_path / "user_task_mod.py").write_text(
      "from rlhf_jax.tasks import FunctionTask\n"
      "def make(config):\n"
      "  return FunctionTask('mine', {'train': [{'prompt': 'p'}], 'test': []}, lambda r, c: [0.5] * len(c))\n"
      "def not_a_task(config):\n"
      "  return 3\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  c = get_base_config()
  c.task.name = "user_task_mod:make"
  task = registry.make_task(c, str(tmp_path))
  assert task.name == "mine" and task.grade(task.load("train"), ["x"]).tolist() == [0.5]
  with pytest.raises(ValueError, match="split"):
    task.load("validation")
  c.task.name = "user_task_mod:not_a_task"
  with pytest.raises(ValueError, match="lacks"):
    registry.make_task(c, str(tmp_path))
  assert "did you mean 'minicode'" in registry.check_task_name("minicod")
  assert registry.check_task_name("user_task_mod:make") is None


def test_function_task_rejects_wrong_score_counts_and_clips():
  task = base.FunctionTask("t", {"train": []}, lambda r, c: [2.0, -1.0])
  np.testing.assert_array_equal(task.grade([{}, {}], ["a", "b"]), [1.0, 0.0])
  with pytest.raises(ValueError, match="2 scores for 3"):
    task.grade([{}] * 3, ["a", "b", "c"])
  with pytest.raises(ValueError, match="non-finite"):
    base.FunctionTask("t", {}, lambda r, c: [float("nan")]).grade([{}], ["a"])
