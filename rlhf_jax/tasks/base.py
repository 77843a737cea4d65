"""The task seam: one small interface every stage uses.

A task is anything with

  name: str
  eval_split: str                                # the held-out split RL stages track
  load(split) -> Sequence[record]               # records carry "prompt", optional "response"
  grade(records, completions) -> float32 [n]    # in [0, 1]; 1 = success (partial credit allowed)

`grade` sees the whole record (every task column), never the trainer: a reward
is a plain function of text (tunix's `RewardFn(prompts, completions, **columns)`
shape). Success is `score >= 1`; anything below is partial credit.

Tasks are named in the config (`task.name`): a built-in name from `TASKS`, or a
user's own as `package.module:make_task`, where `make_task(config) -> Task`
receives the run's config (its `task` section holds the common settings).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

Record = Mapping[str, Any]

SUCCESS_THRESHOLD = 1.0 - 1e-6


@runtime_checkable
class Task(Protocol):
  """What a stage needs of a task (see the module docstring)."""

  name: str
  eval_split: str

  def load(self, split: str) -> Sequence[Record]:
    ...

  def grade(self, records: Sequence[Record], completions: Sequence[str]) -> np.ndarray:
    ...


def success(scores: np.ndarray) -> np.ndarray:
  """1.0 where a graded score is full credit."""
  return (np.asarray(scores, np.float32) >= SUCCESS_THRESHOLD).astype(np.float32)


@dataclasses.dataclass
class FunctionTask:
  """A task from plain Python: records per split and a grading function.

  Users who only have prompts and a reward function build one directly:

    task = FunctionTask("mine", {"train": recs, "test": held_out}, grade_fn=my_reward)

  `grade_fn(records, completions)` returns scores in [0, 1] (they are clipped).
  """

  name: str
  splits: Mapping[str, Sequence[Record]]
  grade_fn: Callable[[Sequence[Record], Sequence[str]], Any]
  eval_split: str = "test"

  def load(self, split: str) -> Sequence[Record]:
    if split not in self.splits:
      raise ValueError(f"task {self.name!r} has no split {split!r}; it has {sorted(self.splits)}")
    return self.splits[split]

  def grade(self, records: Sequence[Record], completions: Sequence[str]) -> np.ndarray:
    return check_scores(self.name, self.grade_fn(records, completions), len(completions))


def check_scores(name: str, scores: Any, n: int) -> np.ndarray:
  """Validates a grader's output: n finite float32 values, clipped to [0, 1]."""
  out = np.asarray(scores, np.float32).reshape(-1)
  if out.shape[0] != n:
    raise ValueError(f"task {name!r}: grade returned {out.shape[0]} scores for {n} completions")
  if not np.all(np.isfinite(out)):
    raise ValueError(f"task {name!r}: grade returned non-finite scores")
  return np.clip(out, 0.0, 1.0)


def resolve_factory(name: str) -> Callable[[Any], Task]:
  """`package.module:function` → the function (raises ValueError naming the problem)."""
  module_name, _, fn_name = name.partition(":")
  if not module_name or not fn_name:
    raise ValueError(f"task {name!r}: a custom task is written 'package.module:make_task'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"task {name!r}: cannot import {module_name!r} ({e})") from e
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise ValueError(f"task {name!r}: {module_name} has no function {fn_name}(config) -> Task")
  return fn
