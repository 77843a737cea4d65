"""A weighted mixture of tasks, itself a task (so every stage accepts it).

  task = MixtureTask([minicode, instructions, synthetic], weights=[2, 1, 1], seed=0)
  recs = task.load("train")       # interleaved, each record tagged with task_id / task_name
  task.grade(recs, completions)   # each record graded by its own task, scores in the original order

Splits:
- `load(split)` for any split but the mixture's `eval_split` draws `size` records (default: the most for which no
  member is expected to repeat a record, min_i ⌊n_i / p_i⌋ over members with p_i > 0): each position's member is
  drawn i.i.d. with probabilities p = weights / Σ weights, and each member hands out its records in its own order,
  starting over if it is drawn more often than it has records.
- `load(eval_split)` (the mixture's `eval_split`, "eval" by default) loads each member's *own* `eval_split` and
  returns every held-out record exactly once, interleaved by drawing the next member with probability ∝ weight
  among the members that still have records. Any prefix is a weighted mix until a member runs out, and per-task
  evaluation sees every held-out record.
- Members with weight 0 take no part: none of their splits is loaded.
Both are deterministic functions of (seed, split) and are cached.

Records are copied with two extra columns: `task_id` (int index into `tasks`) and `task_name` (the member's name).
A member's own records must not already carry them (a mixture of mixtures: flatten it instead).
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np

from rlhf_jax.tasks.base import Record, Task, check_scores

TAG_KEYS = ("task_id", "task_name")


class MixtureTask:
  """Tasks sampled with fixed weights; records tagged with their task (see the module docstring).

  Args:
    tasks: the member tasks (distinct names).
    weights: one non-negative weight per task, not all 0 (normalised internally).
    seed: seed of the interleavings.
    name: the mixture's name.
    eval_split: the mixture split that maps to every member's own `eval_split`.
    size: number of records of a non-eval split (default: see the module docstring).
  """

  def __init__(self, tasks: Sequence[Task], weights: Sequence[float], *, seed: int, name: str = "mixture",
               eval_split: str = "eval", size: int | None = None):
    tasks = list(tasks)
    if not tasks:
      raise ValueError("`tasks` must name at least one task")
    for i, t in enumerate(tasks):
      if not isinstance(t, Task):
        raise ValueError(f"`tasks[{i}]` ({type(t).__name__}) is not a Task: it needs name, eval_split, load, grade")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
      raise ValueError(f"`tasks` must have distinct names, got {names}")
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.shape[0] != len(tasks):
      raise ValueError(f"`weights` must have one entry per task ({len(tasks)}), got {w.shape[0]}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"`weights` must be finite, >= 0 and not all 0, got {list(weights)}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
      raise ValueError(f"`seed` must be an int, got {seed!r}")
    if size is not None and (not isinstance(size, (int, np.integer)) or size < 1):
      raise ValueError(f"`size` must be an int >= 1 or None, got {size!r}")
    self.tasks = tasks
    self.weights = w / w.sum()
    self.seed = int(seed)
    self.name = name
    self.eval_split = eval_split
    self.size = size
    self._cache: dict[str, list[dict]] = {}

  @property
  def task_names(self) -> list[str]:
    return [t.name for t in self.tasks]

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  def _rng(self, split: str) -> np.random.Generator:
    return np.random.default_rng([self.seed, zlib.crc32(split.encode())])

  def _member_records(self, i: int, split: str) -> list[dict]:
    task = self.tasks[i]
    out = []
    for rec in task.load(split):
      clash = [k for k in TAG_KEYS if k in rec]
      if clash:
        raise ValueError(f"task {task.name!r}: its records already carry {clash}; a mixture's members must not be "
                         "mixtures (flatten them into one MixtureTask)")
      out.append({**rec, "task_id": i, "task_name": task.name})
    return out

  def load(self, split: str) -> list[dict]:
    if split in self._cache:
      return self._cache[split]
    rng = self._rng(split)
    # Members with weight 0 are not part of the mixture: none of their splits is loaded.
    if split == self.eval_split:
      per = [self._member_records(i, t.eval_split) if p > 0 else []
             for i, (t, p) in enumerate(zip(self.tasks, self.weights))]
      out = _interleave_without_replacement(per, self.weights, rng)
    else:
      per = [self._member_records(i, split) if p > 0 else [] for i, p in enumerate(self.weights)]
      empty = [self.tasks[i].name for i in range(len(per)) if self.weights[i] > 0 and not per[i]]
      if empty:
        raise ValueError(f"mixture {self.name!r}: split {split!r} of {empty} is empty but has weight > 0")
      size = self.size or min(math.floor(len(r) / p) for r, p in zip(per, self.weights) if p > 0)
      members = rng.choice(len(per), size=size, p=self.weights)
      taken = np.zeros(len(per), np.int64)
      out = []
      for i in members:
        out.append(per[i][taken[i] % len(per[i])])
        taken[i] += 1
    self._cache[split] = out
    return out

  def grade(self, records: Sequence[Record], completions: Sequence[str]) -> np.ndarray:
    """Scores in [0, 1], each record graded by its member (one `grade` call per member), in the input order."""
    if len(records) != len(completions):
      raise ValueError(f"mixture {self.name!r}: {len(records)} records but {len(completions)} completions")
    ids = np.empty(len(records), np.int64)
    for j, rec in enumerate(records):
      tid = rec.get("task_id") if hasattr(rec, "get") else None
      if isinstance(tid, (bool, np.bool_)) or not isinstance(tid, (int, np.integer)) or not 0 <= tid < len(self.tasks):
        raise ValueError(f"mixture {self.name!r}: `records[{j}]['task_id']` must be an int in [0, {len(self.tasks)}), "
                         f"got {tid!r} (grade records from this mixture's load)")
      ids[j] = tid
    scores = np.zeros(len(records), np.float32)
    for i, task in enumerate(self.tasks):
      idx = np.flatnonzero(ids == i)
      if idx.size:
        got = task.grade([records[j] for j in idx], [completions[j] for j in idx])
        scores[idx] = check_scores(task.name, got, idx.size)
    return scores

  def task_ids(self, records: Sequence[Record]) -> np.ndarray:
    """int32 [n] `task_id` column of tagged records (the AM step's `task_ids`)."""
    return np.asarray([rec["task_id"] for rec in records], np.int32)


def _interleave_without_replacement(per: list[list[dict]], p: np.ndarray, rng: np.random.Generator) -> list[dict]:
  """Every record of `per` once; the next member drawn ∝ p among those with records left (p > 0 where per[i])."""
  pos = [0] * len(per)
  out = []
  for _ in range(sum(len(r) for r in per)):
    q = np.array([p[i] if pos[i] < len(per[i]) else 0.0 for i in range(len(per))])
    i = int(rng.choice(len(per), p=q / q.sum()))
    out.append(per[i][pos[i]])
    pos[i] += 1
  return out
