"""A progress bar for training loops: step, loss, tokens/s, ETA (tqdm).

It is shown whether or not stderr is a terminal (a batch job's log still gets
a line every `mininterval` seconds), only on process 0 of a multi-host run, and
never with `quiet=True`.

  with Progress(total=config.sft.steps, desc="sft", initial=start_step) as bar:
    for step in range(start_step, total):
      ...
      bar.update(step + 1, loss=loss, tokens=batch_tokens)
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import numpy as np
import tqdm

from rlhf_jax.utils.metrics import is_main_process

__all__ = ["Progress"]


def _fmt(value: Any) -> str:
  value = float(np.asarray(value))
  if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
    return f"{value:.3e}"
  return f"{value:.4f}"


class Progress:
  """tqdm bar over training steps.

  Args:
    total: the step the loop ends at.
    desc: label shown on the left.
    initial: the step the loop starts at (a resumed run).
    quiet: hide the bar.
    mininterval: seconds between redraws; default 0.5 on a terminal and 10 in
      a log file.
    file: stream (default stderr).
    enabled: None = process 0 only; True/False forces it.
  """

  def __init__(self, total: int, *, desc: str = "train", initial: int = 0,
               quiet: bool = False, mininterval: float | None = None,
               file: TextIO | None = None, enabled: bool | None = None):
    file = file or sys.stderr
    if mininterval is None:
      isatty = getattr(file, "isatty", lambda: False)()
      mininterval = 0.5 if isatty else 10.0
    enabled = is_main_process() if enabled is None else enabled
    self.step = int(initial)
    self.tokens = 0
    self._t0: float | None = None  # set at the first update: skips compile time
    self._tokens_at_t0 = 0
    self._bar = tqdm.tqdm(
        total=int(total), initial=int(initial), desc=desc, unit="step",
        file=file, mininterval=mininterval, dynamic_ncols=True,
        disable=quiet or not enabled, smoothing=0.1)

  @property
  def tokens_per_second(self) -> float:
    if self._t0 is None:
      return 0.0
    elapsed = time.perf_counter() - self._t0
    return (self.tokens - self._tokens_at_t0) / elapsed if elapsed > 0 else 0.0

  def update(self, step: int, *, loss: Any = None, tokens: int = 0,
             **metrics: Any) -> None:
    """Moves the bar to `step` (absolute) and shows the given numbers.

    Args:
      step: steps completed so far.
      loss: optional scalar shown as `loss`.
      tokens: tokens processed since the previous update (for tokens/s).
      **metrics: more scalars to show (e.g. `kl=0.01`).
    """
    step = int(step)
    self.tokens += int(tokens)
    if self._t0 is None:
      self._t0 = time.perf_counter()
      self._tokens_at_t0 = self.tokens
    postfix = {}
    if loss is not None:
      postfix["loss"] = _fmt(loss)
    for key, value in metrics.items():
      postfix[key] = _fmt(value)
    if self.tokens:
      postfix["tok/s"] = f"{self.tokens_per_second:,.0f}"
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(step - self.step)
    self.step = step

  def write(self, message: str) -> None:
    """Prints a line without breaking the bar."""
    if not self._bar.disable:
      self._bar.write(message, file=self._bar.fp)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
