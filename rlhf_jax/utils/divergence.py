"""Stop a run whose updates keep coming out non-finite.

The jitted steps skip an update whose loss, gradient or update is NaN/Inf
(`state.apply_gradients_with_status`) and report `skipped` = 1.0. A few skipped
steps are survivable (one bad batch); a long run of them means the run has
diverged (learning rate too high, broken data), and continuing only burns
compute. `NonFiniteGuard` counts consecutive skipped steps on the host, from
the metrics the loop already syncs once per log interval, and raises
`TrainingDiverged` when there are more than `max_consecutive` in a row.

  guard = NonFiniteGuard(max_consecutive=10, stage="sft")
  ...
  host = [to_host(m) for m in pending]                   # one sync per log interval
  guard.update([m["train/skipped"] for m in host], step=step)
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

__all__ = ["NonFiniteGuard", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
  """More consecutive updates were non-finite than allowed; the run stops (exit status != 0 from the CLI)."""

  def __init__(self, message: str, *, stage: str, step: int, consecutive: int):
    super().__init__(message)
    self.stage, self.step, self.consecutive = stage, step, consecutive


class NonFiniteGuard:
  """Counts consecutive skipped (non-finite) updates and raises `TrainingDiverged` past a limit.

  Args:
    max_consecutive: the number of consecutive skipped steps tolerated (>= 0);
      one more raises. 0 = stop at the first skipped step.
    stage: name used in the message (e.g. "sft").
    kept: what the caller kept, for the message; the default describes what a
      guarded step and a `Checkpointer` guarantee.

  Attributes:
    consecutive: the current run of skipped steps.
    total: skipped steps seen so far.
  """

  DEFAULT_KEPT = ("the parameters are those of the last finite update (skipped updates change nothing) "
                  "and no checkpoint holds non-finite values")

  def __init__(self, max_consecutive: int, *, stage: str = "train", kept: str | None = None):
    if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, (int, np.integer)) \
        or max_consecutive < 0:
      raise ValueError(f"max_consecutive must be an int >= 0, got {max_consecutive!r}")
    self.max_consecutive = int(max_consecutive)
    self.stage = stage
    self.kept = kept or self.DEFAULT_KEPT
    self.consecutive = 0
    self.total = 0

  def update(self, skipped: float | Iterable[float], *, step: int) -> None:
    """Feeds the skipped flags of the steps up to `step`, oldest first.

    Args:
      skipped: one flag (a number; > 0 means skipped, a NaN flag counts as
        skipped) or a sequence of them, one per step, the last one for `step`.
      step: the step number of the last flag.

    Raises:
      TrainingDiverged: the run of consecutive skipped steps exceeds `max_consecutive`.
    """
    flags = np.atleast_1d(np.asarray(skipped, dtype=np.float64)).reshape(-1)
    for i, flag in enumerate(flags):
      if math.isnan(flag) or flag > 0:
        self.consecutive += 1
        self.total += 1
        if self.consecutive > self.max_consecutive:
          self._raise(int(step) - (len(flags) - 1 - i))
      else:
        self.consecutive = 0

  def _raise(self, step: int) -> None:
    first = step - self.consecutive + 1
    message = (f"[{self.stage}] training diverged: {self.consecutive} consecutive updates had a non-finite "
               f"loss or gradient (steps {first}-{step}; the limit is {self.max_consecutive}) and were skipped; "
               f"{self.kept}. Lower the learning rate or check the data.")
    raise TrainingDiverged(message, stage=self.stage, step=step, consecutive=self.consecutive)
