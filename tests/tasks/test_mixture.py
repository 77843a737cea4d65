"""MixtureTask: weighted, seeded interleaving of member tasks; tags; per-task grading in the original order."""

import numpy as np
import pytest

from rlhf_jax.tasks.base import FunctionTask, Task
from rlhf_jax.tasks.mixture import MixtureTask


def upper_grade(records, completions):
  return [float(c == r["answer"].upper()) for r, c in zip(records, completions)]


def length_grade(records, completions):
  return [min(len(c) / r["target_len"], 1.0) for r, c in zip(records, completions)]


def make_members(n_a=300, n_b=200, calls=None):
  def logged(name, fn):
    def grade(records, completions):
      if calls is not None:
        calls.append((name, len(records)))
      return fn(records, completions)
    return grade

  a = FunctionTask("upper", {"train": [{"prompt": f"a{i}", "answer": f"w{i}"} for i in range(n_a)],
                             "test": [{"prompt": f"ta{i}", "answer": f"t{i}"} for i in range(10)]},
                   grade_fn=logged("upper", upper_grade))
  b = FunctionTask("length", {"train": [{"prompt": f"b{i}", "target_len": 4} for i in range(n_b)],
                              "held": [{"prompt": f"hb{i}", "target_len": 2} for i in range(6)]},
                   grade_fn=logged("length", length_grade), eval_split="held")
  return a, b


def test_is_a_task_with_tags_and_deterministic_loads():
  a, b = make_members()
  mix = MixtureTask([a, b], [3.0, 1.0], seed=0)
  assert isinstance(mix, Task) and mix.name == "mixture" and mix.num_tasks == 2
  recs = mix.load("train")
  assert all(r["task_name"] == ("upper", "length")[r["task_id"]] for r in recs)
  assert all(r["prompt"][0] == "ab"[r["task_id"]] for r in recs)  # tags match the record's origin
  assert "task_id" not in a.load("train")[0]  # members' records are not modified
  again = MixtureTask([a, b], [3.0, 1.0], seed=0).load("train")  # a new instance: no shared cache
  assert [r["prompt"] for r in again] == [r["prompt"] for r in recs]
  other = MixtureTask([a, b], [3.0, 1.0], seed=1).load("train")
  assert [r["prompt"] for r in other] != [r["prompt"] for r in recs]
  np.testing.assert_array_equal(mix.task_ids(recs[:5]), [r["task_id"] for r in recs[:5]])


def test_weights_are_respected_and_members_keep_their_order():
  a, b = make_members(n_a=3000, n_b=3000)
  for w in ([3.0, 1.0], [1.0, 4.0]):
    p = np.asarray(w) / sum(w)
    fractions = []
    for seed in range(5):
      recs = MixtureTask([a, b], w, seed=seed, size=2000).load("train")
      ids = np.array([r["task_id"] for r in recs])
      fractions.append(ids.mean())
      # Each member hands out its records in order.
      for i, t in enumerate((a, b)):
        got = [r["prompt"] for r in recs if r["task_id"] == i]
        assert got == [r["prompt"] for r in t.load("train")[:len(got)]]
    # Binomial(2000, p1): 5 standard errors of the mean of 5 seeds is ~0.0225 at p1 = 0.25.
    assert abs(np.mean(fractions) - p[1]) < 5 * np.sqrt(p[1] * p[0] / 2000 / 5)


def test_default_size_fits_the_smallest_share_and_cycling_when_forced():
  a, b = make_members(n_a=300, n_b=200)
  recs = MixtureTask([a, b], [1.0, 1.0], seed=0).load("train")
  assert len(recs) == min(300 / 0.5, 200 / 0.5) == 400
  small = MixtureTask([a, b], [1.0, 1.0], seed=0, size=1000).load("train")
  assert len(small) == 1000
  got_b = [r["prompt"] for r in small if r["task_id"] == 1]
  assert len(got_b) > 200 and got_b[200] == got_b[0]  # starts over after its 200 records


def test_eval_split_maps_to_each_members_own_eval_split():
  a, b = make_members()
  mix = MixtureTask([a, b], [1.0, 1.0], seed=0)
  assert mix.eval_split == "eval"
  recs = mix.load(mix.eval_split)
  assert sorted(r["prompt"] for r in recs) == sorted([r["prompt"] for r in a.load("test")] +
                                                      [r["prompt"] for r in b.load("held")])
  assert {r["task_id"] for r in recs[:6]} == {0, 1}  # interleaved, not concatenated
  # A weight-0 member takes no part, and unknown splits name the member.
  only_a = MixtureTask([a, b], [1.0, 0.0], seed=0)
  assert {r["task_id"] for r in only_a.load("eval")} == {0} and len(only_a.load("eval")) == 10
  with pytest.raises(ValueError, match="no split 'nope'"):
    mix.load("nope")


def test_grade_dispatches_per_task_and_keeps_the_order():
  calls = []
  a, b = make_members(calls=calls)
  mix = MixtureTask([a, b], [1.0, 1.0], seed=3)
  recs = mix.load("train")[:40]
  completions, want = [], []
  rng = np.random.default_rng(0)
  for r in recs:
    if r["task_id"] == 0:
      right = rng.random() < 0.5
      completions.append(r["answer"].upper() if right else r["answer"])
      want.append(float(right))
    else:
      n = int(rng.integers(0, 6))
      completions.append("x" * n)
      want.append(min(n / 4, 1.0))
  scores = mix.grade(recs, completions)
  assert scores.dtype == np.float32
  np.testing.assert_allclose(scores, want, rtol=1e-6)
  ids = np.array([r["task_id"] for r in recs])
  assert sorted(calls) == sorted([("upper", int((ids == 0).sum())), ("length", int((ids == 1).sum()))])
  # Order preserved under any permutation of the input.
  perm = rng.permutation(len(recs))
  np.testing.assert_array_equal(mix.grade([recs[i] for i in perm], [completions[i] for i in perm]), scores[perm])


def test_bad_input_names_the_argument():
  a, b = make_members()
  with pytest.raises(ValueError, match="weights"):
    MixtureTask([a, b], [1.0], seed=0)
  with pytest.raises(ValueError, match="weights"):
    MixtureTask([a, b], [0.0, 0.0], seed=0)
  with pytest.raises(ValueError, match="weights"):
    MixtureTask([a, b], [1.0, -1.0], seed=0)
  with pytest.raises(ValueError, match="distinct names"):
    MixtureTask([a, a], [1.0, 1.0], seed=0)
  with pytest.raises(ValueError, match=r"tasks\[1\]"):
    MixtureTask([a, object()], [1.0, 1.0], seed=0)
  mix = MixtureTask([a, b], [1.0, 1.0], seed=0)
  with pytest.raises(ValueError, match="task_id"):
    mix.grade([{"prompt": "x"}], ["y"])
  with pytest.raises(ValueError, match="completions"):
    mix.grade(mix.load("train")[:2], ["y"])
  nested = MixtureTask([mix, FunctionTask("c", {"train": [{"prompt": "c"}]}, grade_fn=upper_grade)], [1, 1], seed=0)
  with pytest.raises(ValueError, match="flatten"):
    nested.load("train")
