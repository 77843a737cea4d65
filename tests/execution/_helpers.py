"""Shared helpers of the sandbox tests: find processes a sandbox left behind."""
import os
import time

from rlhf_jax.execution import sandbox


def _uid(pid: str):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def sandbox_processes():
    """Pids of live processes that belong to a sandbox of this test process.

    A sandboxed process either runs as one of our dedicated uids or still has
    the runner's command line (fork children keep it). Zombies count as gone.
    """
    if not os.path.isdir("/proc"):
        return []
    lo, hi = sandbox.SANDBOX_UID_BASE, sandbox.SANDBOX_UID_BASE + sandbox.MAX_SLOTS
    runner = sandbox._RUNNER.encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("Z", "X"):
            continue
        uid = _uid(pid)
        if (uid is not None and lo <= uid < hi) or runner in _cmdline(pid):
            found.append(int(pid))
    return found


def assert_no_sandbox_processes(grace_s: float = 30.0):
    """Waits up to ``grace_s`` (the kernel tears namespaces down asynchronously).

    Returns as soon as nothing is left, so the generous bound costs nothing
    unless the machine is busy (or a process really was left behind).
    """
    deadline = time.monotonic() + grace_s
    while True:
        left = sandbox_processes()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"sandbox processes left running: {left}"
