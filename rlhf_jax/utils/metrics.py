"""Metrics to disk: one JSON line per logged step, plus TensorBoard events.

`workdir/metrics.jsonl` holds lines `{"step": 10, "train/loss": 2.3, ...}`,
flushed at every write so a crashed run keeps what it logged and `tail -f`
shows progress; `workdir/tb/` holds the same scalars for TensorBoard. On a
multi-host run only process 0 writes; the other processes' writers are no-ops.
"""
from __future__ import annotations

import json
import numbers
import os
from typing import Any, Mapping

import numpy as np

__all__ = ["MetricsWriter", "read_metrics", "is_main_process", "truncate_metrics"]


def is_main_process() -> bool:
  """True on process 0 (and in any process that has not imported jax)."""
  import sys  # pylint: disable=import-outside-toplevel
  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


def _to_float(key: str, value: Any) -> float:
  if isinstance(value, numbers.Number) and not isinstance(value, complex):
    return float(value)
  arr = np.asarray(value)  # jax arrays, numpy scalars (a device_get happens here)
  if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
    raise ValueError(f"metric {key!r} must be a real scalar, got shape "
                     f"{arr.shape} dtype {arr.dtype}")
  return float(arr.reshape(()))


class MetricsWriter:
  """Appends scalar metrics to `workdir/metrics.jsonl` and TensorBoard.

  Args:
    workdir: run directory (created if missing).
    tensorboard: also write event files under `workdir/tb`.
    enabled: None = only on process 0 (multi-host); True/False forces it.

  Example:
    with MetricsWriter(workdir) as writer:
      writer.write(step, {"train/loss": loss, "train/lr": lr})
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
               enabled: bool | None = None):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, "metrics.jsonl")
    self.enabled = is_main_process() if enabled is None else enabled
    self._file = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tb"))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs `scalars` (name → real scalar: float, int, numpy or jax) at `step`.

    Non-finite values are kept (written as NaN/Infinity, as Python's json does)
    so divergence is visible in the log.
    """
    if not self.enabled:
      return
    row = {"step": int(step)}
    for key, value in scalars.items():
      if key == "step":
        raise ValueError("'step' is reserved; pass it as the step argument")
      row[str(key)] = _to_float(key, value)
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != "step":
          self._tb.add_scalar(key, value, global_step=row["step"])
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
  """Reads a metrics.jsonl file into a list of dicts (a torn last line is skipped)."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a line cut by a crash mid-write
  return rows


def truncate_metrics(path: str | os.PathLike, after_step: int) -> int:
  """Drops the rows of a metrics.jsonl logged after `after_step` (call on resume, before writing).

  A run resumed from the checkpoint of step s repeats steps s+1, s+2, ...; the
  rows the interrupted run logged for them would otherwise appear twice.
  Rows with `step <= after_step` are kept byte for byte, in order; a torn last
  line (a crash mid-write) is dropped too. The file is rewritten atomically
  (temporary file + rename), and only by the main process. A missing file is
  not an error.

  Args:
    path: the metrics.jsonl file.
    after_step: the last step whose rows are kept (the restored step).

  Returns:
    The number of rows removed (0 on the other processes of a multi-host run).
  """
  path = os.fspath(path)
  if not is_main_process() or not os.path.exists(path):
    return 0
  kept, removed = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        step = json.loads(line)["step"]
      except (json.JSONDecodeError, KeyError, TypeError):
        removed += 1  # a line cut by a crash mid-write
        continue
      if step <= after_step:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        removed += 1
  if removed:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return removed
