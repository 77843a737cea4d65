"""Named phase timers: where does a training iteration spend its time?

  timers = Timers()
  with timers("rollout"):
    out = generate(...)
    jax.block_until_ready(out)   # JAX is asynchronous: block inside the phase
  with timers("update"):
    ...
  writer.write(step, timers.summary())   # {"time/rollout": 1.2, "time/rollout_frac": 0.6, ...}
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

__all__ = ["Timers"]


class Timers:
  """Accumulates wall-clock seconds per named phase.

  Args:
    prefix: key prefix used by `summary`.
  """

  def __init__(self, *, prefix: str = "time/"):
    self.prefix = prefix
    self.totals: dict[str, float] = {}
    self.counts: dict[str, int] = {}

  @contextlib.contextmanager
  def __call__(self, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - start)

  def add(self, name: str, seconds: float) -> None:
    """Adds `seconds` to phase `name` (for times measured elsewhere)."""
    if seconds < 0:
      raise ValueError(f"seconds must be >= 0, got {seconds}")
    self.totals[name] = self.totals.get(name, 0.0) + seconds
    self.counts[name] = self.counts.get(name, 0) + 1

  def summary(self, *, reset: bool = False) -> dict[str, float]:
    """`{prefix+name: seconds, prefix+name+"_frac": share of the total}`.

    Args:
      reset: clear the totals afterwards (per-interval reporting).
    """
    total = sum(self.totals.values())
    out = {}
    for name, seconds in self.totals.items():
      out[f"{self.prefix}{name}"] = seconds
      out[f"{self.prefix}{name}_frac"] = seconds / total if total > 0 else 0.0
    if reset:
      self.reset()
    return out

  def reset(self) -> None:
    self.totals.clear()
    self.counts.clear()

  def __str__(self) -> str:
    total = sum(self.totals.values()) or 1.0
    return ", ".join(f"{n} {s:.2f}s ({100 * s / total:.0f}%)"
                     for n, s in sorted(self.totals.items(), key=lambda kv: -kv[1]))
