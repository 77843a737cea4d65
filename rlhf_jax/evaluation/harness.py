"""Evaluation harness: completions in, a JSON-serialisable report out.

Code tasks (MiniCode, HumanEval): every completion becomes the program
``prompt + completion + "\\n" + test`` + ``check(entry_point)`` run by a grader
the completion cannot fool (``tasks.minicode.program_for``: return values are
rebuilt as plain builtin values, builtins are verified; see
``execution.grading``); all programs of a call run in one ``execute_many``
batch of the sandbox; a sample is correct iff its program ran cleanly to the
end (``passed``). Per problem with ``n`` samples of which ``c`` are correct,
pass@k is Chen et al.'s unbiased estimator ``1 - C(n - c, k) / C(n, k)``
(``pass_at_k``), averaged over the problems that have ``n >= k``; it is
reported overall, per split and per difficulty when the problems carry them.

Instruction following: each response is checked against its prompt's
verification functions in the sandbox (``tasks.instructions``); the report
has IFEval's four accuracies over all responses and pass@k where a sample is
correct iff it follows every instruction (strict, and separately loose).

Inputs are plain lists of dicts and strings, so a script calls::

    report = evaluate_code_completions(problems, [[c1, c2], ...], ks=(1, 5))
    json.dump(report, f)
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rlhf_jax.evaluation.metrics import pass_at_k

__all__ = ["evaluate_code_completions", "evaluate_instruction_completions",
           "pass_at_k_summary"]


def _check_inputs(items: Sequence[Any], completions: Sequence[Sequence[str]],
                  items_name: str, completions_name: str, ks: Sequence[int]) -> None:
  if len(items) == 0:
    raise ValueError(f"{items_name} must not be empty")
  if len(items) != len(completions):
    raise ValueError(f"{items_name} and {completions_name} must have the same length, got "
                     f"{len(items)} and {len(completions)}")
  for i, comps in enumerate(completions):
    if isinstance(comps, str) or not all(isinstance(c, str) for c in comps):
      raise ValueError(f"{completions_name}[{i}] must be a list of str")
    if len(comps) == 0:
      raise ValueError(f"{completions_name}[{i}] is empty; every item needs >= 1 sample")
  if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
    raise ValueError(f"ks must be positive ints, got {ks!r}")


def pass_at_k_summary(n: Sequence[int], c: Sequence[int], ks: Sequence[int]) -> dict[str, Any]:
  """Mean unbiased pass@k over items with ``n_i >= k``, for each k.

  Returns:
    ``{"pass@k": float, "pass@k/num_items": int}`` for every k that at least
    one item has enough samples for.
  """
  n_arr, c_arr = np.asarray(n, dtype=np.int64), np.asarray(c, dtype=np.int64)
  out: dict[str, Any] = {}
  for k in ks:
    valid = n_arr >= k
    if not valid.any():
      continue
    values = np.atleast_1d(pass_at_k(n_arr[valid], c_arr[valid], k))
    out[f"pass@{k}"] = float(np.mean(values))
    out[f"pass@{k}/num_items"] = int(valid.sum())
  return out


def _group_summaries(groups: Mapping[str, list[int]], n, c, ks) -> dict[str, Any]:
  return {name: {"num_items": len(idx), **pass_at_k_summary(
      [n[i] for i in idx], [c[i] for i in idx], ks)} for name, idx in sorted(groups.items())}


def _isolation(results) -> str | None:
  levels = {getattr(r, "isolation", None) for r in results} - {None}
  if levels:
    return ",".join(sorted(levels))
  try:
    from rlhf_jax.execution import isolation_level
    return isolation_level()
  except ImportError:
    return None


def evaluate_code_completions(problems: Sequence[Mapping[str, Any]],
                              completions_per_problem: Sequence[Sequence[str]], *,
                              ks: Sequence[int] = (1,), timeout_s: float = 10.0,
                              memory_mb: int = 1024, max_workers: int | None = None,
                              program_fn: Callable[[Mapping[str, Any], str], str] | None = None,
                              include_per_problem: bool = True) -> dict[str, Any]:
  """Runs code completions against their hidden tests and reports pass@k.

  Args:
    problems: HumanEval-format dicts or ``minicode.Problem``s (``task_id``,
      ``prompt``, ``test``, ``entry_point``; optional ``split`` and
      ``difficulty`` for breakdowns).
    completions_per_problem: ``completions_per_problem[i]`` is the list of
      n_i sampled completions (function bodies) of ``problems[i]``.
    ks: the k of pass@k; each is reported where some problem has n >= k.
    timeout_s, memory_mb, max_workers: sandbox limits (per program).
    program_fn: builds a program from (problem, completion); default
      ``tasks.minicode.program_for`` (the HumanEval convention).
    include_per_problem: add per-problem n / correct / statuses.

  Returns:
    A JSON-serialisable dict: ``num_problems``, ``num_samples``, ``pass@k``
    (+ ``pass@k/num_items``), ``per_split``, ``per_difficulty`` (when the
    problems carry them), ``status_counts``, ``isolation``, the limits, and
    ``per_problem``.
  """
  _check_inputs(problems, completions_per_problem, "problems", "completions_per_problem", ks)
  # Accept tasks.minicode.Problem objects as well as dicts.
  problems = [p.to_dict() if hasattr(p, "to_dict") else p for p in problems]
  from rlhf_jax.execution import execute_many  # host layer, imported lazily
  if program_fn is None:
    from rlhf_jax.tasks.minicode import program_for as program_fn

  programs, owner = [], []
  for i, (problem, comps) in enumerate(zip(problems, completions_per_problem)):
    for completion in comps:
      programs.append(program_fn(problem, completion))
      owner.append(i)
  results = execute_many(programs, timeout_s=timeout_s, memory_mb=memory_mb,
                         max_workers=max_workers)
  n = [len(comps) for comps in completions_per_problem]
  c = [0] * len(problems)
  statuses: list[list[str]] = [[] for _ in problems]
  for i, result in zip(owner, results):
    c[i] += int(bool(result.passed))
    statuses[i].append(result.status)

  report: dict[str, Any] = {
      "num_problems": len(problems), "num_samples": len(programs),
      **pass_at_k_summary(n, c, ks),
      "status_counts": dict(collections.Counter(s for ss in statuses for s in ss)),
      "isolation": _isolation(results), "timeout_s": timeout_s, "memory_mb": memory_mb,
  }
  for field, name in (("split", "per_split"), ("difficulty", "per_difficulty")):
    if all(field in p for p in problems):
      groups: dict[str, list[int]] = collections.defaultdict(list)
      for i, p in enumerate(problems):
        groups[str(p[field])].append(i)
      report[name] = _group_summaries(groups, n, c, ks)
  if include_per_problem:
    report["per_problem"] = [
        {"task_id": p.get("task_id", str(i)), "n": n[i], "correct": c[i],
         "statuses": statuses[i]} for i, p in enumerate(problems)]
  return report


def evaluate_instruction_completions(prompts: Sequence[Mapping[str, Any]],
                                     completions_per_prompt: Sequence[Sequence[str]], *,
                                     ks: Sequence[int] = (1,), timeout_s: float = 10.0,
                                     memory_mb: int = 512, max_workers: int | None = None,
                                     include_per_prompt: bool = True) -> dict[str, Any]:
  """Checks instruction-following completions and reports IFEval scores and pass@k.

  Args:
    prompts: prompt records from ``tasks.instructions`` (or dataset rows,
      whose ``constraints`` is a JSON string).
    completions_per_prompt: the n_i sampled responses of each prompt.
    ks: the k of pass@k (a sample passes iff it follows every instruction).
    timeout_s, memory_mb, max_workers: sandbox limits (per response).
    include_per_prompt: add per-prompt n / strict and loose correct counts.

  Returns:
    A JSON-serialisable dict: IFEval's ``prompt_level_strict_acc``,
    ``inst_level_strict_acc``, ``prompt_level_loose_acc``,
    ``inst_level_loose_acc`` over all responses, ``per_type``,
    ``strict``/``loose`` pass@k summaries, ``per_split``, ``status_counts``,
    ``isolation``.
  """
  from rlhf_jax.tasks import instructions

  _check_inputs(prompts, completions_per_prompt, "prompts", "completions_per_prompt", ks)
  flat_prompts, flat_responses, owner = [], [], []
  for i, (prompt, comps) in enumerate(zip(prompts, completions_per_prompt)):
    for response in comps:
      flat_prompts.append(prompt)
      flat_responses.append(response)
      owner.append(i)
  checked = instructions.check_responses(flat_prompts, flat_responses, timeout_s=timeout_s,
                                         memory_mb=memory_mb, max_workers=max_workers)
  report: dict[str, Any] = dict(instructions.aggregate_scores(checked))
  n = [len(comps) for comps in completions_per_prompt]
  c_strict, c_loose = [0] * len(prompts), [0] * len(prompts)
  for i, res in zip(owner, checked):
    c_strict[i] += int(all(res["strict"]))
    c_loose[i] += int(all(res["loose"]))
  report.update({
      "num_prompts": len(prompts),
      "strict": pass_at_k_summary(n, c_strict, ks),
      "loose": pass_at_k_summary(n, c_loose, ks),
      "isolation": _isolation([]), "timeout_s": timeout_s, "memory_mb": memory_mb,
  })
  if all("split" in p for p in prompts):
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, p in enumerate(prompts):
      groups[str(p["split"])].append(i)
    report["per_split"] = {
        name: {"num_items": len(idx),
               "strict": pass_at_k_summary([n[i] for i in idx], [c_strict[i] for i in idx], ks),
               "loose": pass_at_k_summary([n[i] for i in idx], [c_loose[i] for i in idx], ks)}
        for name, idx in sorted(groups.items())}
  if include_per_prompt:
    report["per_prompt"] = [
        {"key": p.get("key", str(i)), "n": n[i], "strict_correct": c_strict[i],
         "loose_correct": c_loose[i]} for i, p in enumerate(prompts)]
  return report
