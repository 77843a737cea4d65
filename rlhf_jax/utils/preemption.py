"""Preemption: turn SIGTERM into "checkpoint at the next step boundary, then exit".

Cloud TPU (and most schedulers) announce a preemption with SIGTERM and kill the
process some seconds later. `PreemptionGuard` installs a handler that only sets
a flag; the training loop checks it between steps, saves a checkpoint
(`force=True`), waits for the save to commit and raises `Preempted`. Rerunning
the same command resumes from that checkpoint.

  with PreemptionGuard() as guard:
    for batch in loader:
      state, metrics = step(state, batch)
      ...
      if guard.should_stop(step_number):
        ckpt.save(step_number, state, meta=..., force=True)
        ckpt.wait()
        guard.exit(stage="sft", step=step_number, checkpoint=ckpt.directory)

Exit status: `Preempted` is a `SystemExit` with code `PREEMPTED_EXIT_CODE` = 75
(EX_TEMPFAIL, "temporary failure, run again"), so a clean preemption exit is
distinguishable from a kill (143 = SIGTERM without the guard, 137 = SIGKILL)
and from an error (1, or 2 for a bad command line).

Multi-process runs (`jax.distributed`): every host must stop at the same step,
so `should_stop(step)` defers to JAX's preemption sync point
(`multihost_utils.reached_preemption_sync_point`), which agrees on the step
across hosts, and the guard installs no Python handler there (JAX's own
notifier receives the signal).
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Iterable, NoReturn

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "PreemptionGuard"]

PREEMPTED_EXIT_CODE = 75


class Preempted(SystemExit):
  """Raised after a preemption checkpoint has committed; exits the process with status 75.

  Attributes:
    code: `PREEMPTED_EXIT_CODE` (what the interpreter exits with).
    stage, step, checkpoint: where the run stopped and where its state is.
    message: a one-line description (also `str(exc)`).
  """

  def __init__(self, *, stage: str, step: int, checkpoint: str | None = None):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.stage, self.step, self.checkpoint = stage, int(step), checkpoint
    where = f"; checkpoint saved in {checkpoint}" if checkpoint else ""
    self.message = (f"[{stage}] preempted (termination signal) at step {self.step}{where}; "
                    f"run the same command again to resume (exit status {PREEMPTED_EXIT_CODE})")

  def __str__(self) -> str:
    return self.message


def _multiprocess_sync_available() -> bool:
  jax = sys.modules.get("jax")
  if jax is None or jax.process_count() <= 1:
    return False
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.preemption_sync_manager is not None


class PreemptionGuard:
  """Context manager: a termination signal sets `requested` instead of killing the process.

  Args:
    signals: the signals to intercept; default SIGTERM only. Pass
      `(signal.SIGTERM, signal.SIGINT)` to treat Ctrl-C the same way.

  While active, the first signal only sets the flag. A second one of the same
  kind runs the handler that was installed before (for SIGTERM the default:
  terminate now; for SIGINT: KeyboardInterrupt), so an impatient operator can
  still stop the process. On exit the previous handlers are restored. Outside
  the main thread (where Python cannot install handlers) the guard installs
  nothing and `requested` stays False.
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
    self.signals = tuple(signals)
    if not self.signals:
      raise ValueError("signals must name at least one signal")
    self._previous: dict[int, object] = {}
    self._received: list[int] = []
    self._multiprocess = False

  # -- state -----------------------------------------------------------------------
  @property
  def requested(self) -> bool:
    """True once a termination signal has arrived (this process only)."""
    return bool(self._received)

  @property
  def signal_name(self) -> str | None:
    return signal.Signals(self._received[0]).name if self._received else None

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step` (call at every step boundary).

    One process: `requested`. Several processes: JAX's preemption sync point,
    True on every host at the same step (call it at every step on every host).
    """
    if self._multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return self.requested

  def exit(self, *, stage: str, step: int, checkpoint: str | None = None) -> NoReturn:
    """Prints one line to stderr and raises `Preempted` (call after the checkpoint has committed)."""
    exc = Preempted(stage=stage, step=step, checkpoint=checkpoint)
    print(exc.message, file=sys.stderr, flush=True)
    raise exc

  # -- handlers --------------------------------------------------------------------
  def _handle(self, signum, frame) -> None:
    if signum in self._received:  # the second time: what would have happened without the guard
      previous = self._previous.get(signum)
      if callable(previous):
        previous(signum, frame)
        return
      if previous == signal.SIG_IGN:
        return
      signal.signal(signum, signal.SIG_DFL)
      signal.raise_signal(signum)
      return
    self._received.append(signum)

  def __enter__(self) -> "PreemptionGuard":
    self._received = []
    self._multiprocess = _multiprocess_sync_available()
    if self._multiprocess or threading.current_thread() is not threading.main_thread():
      return self
    for sig in self.signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}
