"""PreemptionGuard (SIGTERM -> a flag, handlers restored), Preempted, and NonFiniteGuard."""
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from rlhf_jax.utils.divergence import NonFiniteGuard, TrainingDiverged
from rlhf_jax.utils.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionGuard

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- PreemptionGuard -----------------------------------------------------------------
def test_sigterm_sets_the_flag_and_the_previous_handler_comes_back():
  seen = []
  previous = lambda signum, frame: seen.append(signum)
  original = signal.signal(signal.SIGTERM, previous)
  try:
    with PreemptionGuard() as guard:
      assert not guard.requested and not guard.should_stop(1)
      os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before kill() returns here
      assert guard.requested and guard.should_stop(2) and guard.signal_name == "SIGTERM"
      assert seen == []  # the first signal only sets the flag
      os.kill(os.getpid(), signal.SIGTERM)  # a second one: what would have happened without the guard
      assert seen == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is previous
  finally:
    signal.signal(signal.SIGTERM, original)


def test_sigint_is_opt_in():
  before = signal.getsignal(signal.SIGINT)  # whatever an earlier test or the runner installed
  with PreemptionGuard(signals=(signal.SIGTERM, signal.SIGINT)) as guard:
    os.kill(os.getpid(), signal.SIGINT)
    assert guard.requested and guard.signal_name == "SIGINT"
  assert signal.getsignal(signal.SIGINT) is before
  with pytest.raises(ValueError, match="signals"):
    PreemptionGuard(signals=())


def test_outside_the_main_thread_it_installs_nothing():
  before = signal.getsignal(signal.SIGTERM)
  out = {}

  def body():
    with PreemptionGuard() as guard:
      out["handler"] = signal.getsignal(signal.SIGTERM)
      out["requested"] = guard.requested

  t = threading.Thread(target=body)
  t.start()
  t.join()
  assert out == {"handler": before, "requested": False}


def test_preempted_is_a_system_exit_with_status_75(capsys):
  guard = PreemptionGuard()
  with pytest.raises(Preempted) as e:
    guard.exit(stage="sft", step=17, checkpoint="/w/sft/ckpt/17")
  assert isinstance(e.value, SystemExit) and e.value.code == PREEMPTED_EXIT_CODE == 75
  assert e.value.step == 17 and "step 17" in str(e.value) and "/w/sft/ckpt/17" in str(e.value)
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "preempted" in err and "run the same command again" in err


def test_a_process_stops_at_a_step_boundary_and_exits_75():
  """A real SIGTERM from outside: the loop finishes its step, 'saves', and exits 75 with one line."""
  code = textwrap.dedent("""
      import sys, time
      from rlhf_jax.utils.preemption import PreemptionGuard
      with PreemptionGuard() as guard:
        for step in range(1, 10_000):
          time.sleep(0.01)  # the step
          if step == 3:
            print("ready", flush=True)
          if guard.should_stop(step):
            print(f"saved {step}", flush=True)
            guard.exit(stage="toy", step=step)
  """)
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_DIR, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "ready"
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == PREEMPTED_EXIT_CODE, err
  assert out.startswith("saved ") and "Traceback" not in err
  assert err.strip().startswith("[toy] preempted (termination signal) at step ")


# --- NonFiniteGuard ------------------------------------------------------------------
def test_nonfinite_guard_counts_consecutive_skips_only():
  guard = NonFiniteGuard(3, stage="sft")
  guard.update([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0], step=7)  # runs of 2 and 3: tolerated
  assert guard.consecutive == 3 and guard.total == 5
  guard.update(0.0, step=8)
  assert guard.consecutive == 0
  with pytest.raises(TrainingDiverged) as e:
    guard.update([1.0, 1.0, 1.0, 1.0, 1.0], step=13)  # the 4th in a row is step 12
  err = e.value
  assert isinstance(err, RuntimeError) and (err.stage, err.step, err.consecutive) == ("sft", 12, 4)
  msg = str(err)
  assert msg.startswith("[sft] training diverged: 4 consecutive updates") and "steps 9-12" in msg
  assert "limit is 3" in msg and "no checkpoint holds non-finite values" in msg and "\n" not in msg


def test_nonfinite_guard_zero_tolerance_nan_flags_and_bad_arguments():
  with pytest.raises(TrainingDiverged, match="1 consecutive"):
    NonFiniteGuard(0).update(float("nan"), step=1)  # a NaN flag is a skipped step too
  NonFiniteGuard(0).update([0.0, 0.0], step=2)
  for bad in (-1, 1.5, True, "3"):
    with pytest.raises(ValueError, match="max_consecutive"):
      NonFiniteGuard(bad)
  with pytest.raises(TrainingDiverged, match="kept: the state of step 4"):
    NonFiniteGuard(1, kept="kept: the state of step 4").update([1, 1], step=6)
