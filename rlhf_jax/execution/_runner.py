"""The in-sandbox runner: the first (and only) Python code that runs before the program.

Started by ``rlhf_jax.execution.sandbox`` as ``python -I -S _runner.py CONFIG``
(inside ``unshare`` when namespaces are available). It must only use the
standard library: it runs with ``-I -S`` and, after the privilege drop, cannot
read the repository.

Order of work (why each step is where it is, see the threat model in
``sandbox.py``):

1. read the per-run secret token from the inherited pipe ``token_fd`` and close
   it; read the program source from ``program_path`` (still privileged);
2. (namespace modes) hide the caller's directories behind empty tmpfs mounts,
   re-expose the interpreter's prefix read-only, mount a size-limited private
   tmpfs as ``/tmp`` (= the work directory) and cover ``/proc`` (so that the
   process cannot read its own memory through ``/proc/self/mem``);
3. set rlimits, drop to the dedicated unprivileged uid (root mode), mark the
   process non-dumpable (no ptrace / process_vm_readv from its own children)
   and re-arm the parent-death signal (a uid change clears it);
4. forget ``ctypes`` and install an audit hook that holds the token in its
   closure, refuses the introspection / raw-memory paths that could reach it,
   and writes it to ``done_fd`` only when the "end" event comes from this very
   frame of ``_main`` after ``exec`` of the program returned normally and every
   non-daemon thread it started has finished (as at interpreter shutdown).
"""
import os
import sys

# Exit codes the parent understands (a program can forge them with os._exit,
# which only ever makes its own result worse: none of them means "passed").
EXIT_EXCEPTION = 1
EXIT_MEMORY = 95
EXIT_EARLY = 96
EXIT_TAMPER = 97
EXIT_SETUP = 98

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_PR_SET_PDEATHSIG = 1
_TRACEBACK_LIMIT = 64
_PR_SET_DUMPABLE = 4

_BLOCKED_EVENTS = frozenset({
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "sys.settrace", "sys.setprofile", "code.__new__",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata",
    "ctypes.addressof", "ctypes.string_at", "ctypes.wstring_at",
    "ctypes.call_function", "ctypes.create_string_buffer",
    "sys.remote_exec", "cpython.remote_debugger_script",
})
_BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend"})


def _libc():
    import ctypes  # noqa: PLC0415 - only needed during set-up
    return ctypes.CDLL(None, use_errno=True), ctypes


def _mount(libc, ctypes, source, target, fstype, flags, data):
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source!r} on {target!r}: {os.strerror(err)}")


def _setup_mounts(cfg):
    libc, ctypes = _libc()
    # unshare(1) already makes propagation private; repeat it so that a
    # different launcher cannot leak our mounts back to the host.
    _mount(libc, ctypes, None, "/", None, _MS_REC | _MS_PRIVATE, None)
    keep_fds = []
    for path in cfg["keep_paths"]:
        if os.path.isdir(path):
            keep_fds.append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))
    hidden = []
    for path in cfg["hide_paths"]:
        if any(path == h or path.startswith(h + "/") for h in hidden):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            _mount(libc, ctypes, "tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV,
                   "mode=755,size=64k")
            hidden.append(path)
    for path in cfg.get("hide_files", ()):
        if os.path.isfile(path) and not os.path.islink(path):
            _mount(libc, ctypes, "/dev/null", path, None, _MS_BIND, None)
    for path, fd in keep_fds:
        os.makedirs(path, exist_ok=True)
        _mount(libc, ctypes, f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC, None)
        try:  # best effort: in a user namespace locked flags may refuse it
            _mount(libc, ctypes, None, path, None,
                   _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None)
        except OSError:
            pass
        os.close(fd)
    uid = cfg["uid"] if cfg["uid"] is not None else os.getuid()
    gid = cfg["uid"] if cfg["uid"] is not None else os.getgid()
    size_kb = max(64, int(cfg["workdir_mb"] * 1024))
    _mount(libc, ctypes, "tmpfs", cfg["workdir"], "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"mode=700,size={size_kb}k,uid={uid},gid={gid}")
    if os.path.isdir("/dev/shm"):
        _mount(libc, ctypes, "tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV,
               f"mode=1777,size={size_kb}k")
    # Last: /proc/self/fd was needed above. An empty /proc hides our own
    # memory (/proc/self/mem) and every host process.
    _mount(libc, ctypes, "tmpfs", "/proc", "tmpfs", _MS_NOSUID | _MS_NODEV,
           "mode=555,size=4k")


def _set_limits(cfg):
    try:
        import resource
    except ImportError:  # not POSIX: nothing to set
        return
    lim = cfg["limits"]
    table = [
        ("RLIMIT_AS", lim["memory_bytes"]),
        ("RLIMIT_CPU", lim["cpu_s"]),
        ("RLIMIT_FSIZE", lim["file_bytes"]),
        ("RLIMIT_NOFILE", lim["open_files"]),
        ("RLIMIT_CORE", 0),
    ]
    if lim["processes"] is not None:
        table.append(("RLIMIT_NPROC", lim["processes"]))
    for name, value in table:
        which = getattr(resource, name, None)
        if which is None or value is None:
            continue
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            try:  # a hard limit below ours: lower only the soft one
                resource.setrlimit(which, (value, resource.getrlimit(which)[1]))
            except (ValueError, OSError):
                pass


def _harden_process():
    """Non-dumpable (own memory unreadable to children) and die with the parent."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc, _ = _libc()
        import signal
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except Exception:  # noqa: BLE001 - hardening is best effort outside Linux
        pass


def _make_hook(token, done_fd, *, _getframe=sys._getframe, _write=os.write,
               _exit=os._exit, _fspath=os.fspath, _fsdecode=os.fsdecode,
               _normpath=os.path.normpath):
    """Audit hook: the token lives only in this closure.

    Nothing in Python can reach a closure except through the function object,
    and the function object is referenced only by the interpreter's hook list
    (not exposed) and by the garbage collector (``gc.get_*`` refused here).
    """
    state = [None, False]  # [frame of _main that said "begin", ended]

    def hook(event, args):
        if event == "rlhf_jax.sandbox.begin":
            if state[0] is not None:  # the runner being run a second time
                _exit(EXIT_TAMPER)
            state[0] = _getframe(1)
        elif event == "rlhf_jax.sandbox.end":
            if state[1] or state[0] is None or _getframe(1) is not state[0]:
                _exit(EXIT_TAMPER)
            state[1] = True
            _write(done_fd, token)
        elif event in _BLOCKED_EVENTS:
            raise RuntimeError(f"sandbox: {event} is not allowed")
        elif event == "import":
            if args[0].partition(".")[0] in _BLOCKED_MODULES:
                raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        elif event == "open":
            path = args[0]
            if isinstance(path, (str, bytes)):
                path = _normpath(_fsdecode(_fspath(path)))
                if path.startswith("/proc/") and (path.endswith("/mem") or "/map_files" in path):
                    raise PermissionError(f"sandbox: opening {path} is not allowed")
        elif event == "marshal.loads":
            # Hand-made bytecode reads arbitrary memory; only the import
            # system may unmarshal (cached .pyc files of the stdlib).
            if not _getframe(1).f_code.co_filename.startswith("<frozen importlib"):
                raise RuntimeError("sandbox: marshal.loads is not allowed")

    return hook


class _Quitter:
    """``exit``/``quit`` as ``site`` would define them (we run with -S)."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Use {self.name}() or Ctrl-D (i.e. EOF) to exit"

    def __call__(self, code=None):
        raise SystemExit(code)


def _main():
    import json
    cfg = json.loads(sys.argv[1])
    token = b""
    while True:
        chunk = os.read(cfg["token_fd"], 4096)
        if not chunk:
            break
        token += chunk
    os.close(cfg["token_fd"])
    del chunk
    done_fd = cfg["done_fd"]
    try:
        with open(cfg["program_path"], "rb") as f:
            source = f.read()
        if cfg["mounts"]:
            _setup_mounts(cfg)
        _set_limits(cfg)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        _harden_process()
        os.chdir(cfg["workdir"])
    except Exception as e:  # noqa: BLE001 - reported to the parent as a set-up failure
        sys.stderr.write(f"[sandbox] set-up failed: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        os._exit(EXIT_SETUP)
    for name in [m for m in sys.modules if m.partition(".")[0] in _BLOCKED_MODULES]:
        del sys.modules[name]
    os.set_inheritable(done_fd, False)  # exec'd children do not get the channel

    sys.addaudithook(_make_hook(token, done_fd))
    del token
    sys.audit("rlhf_jax.sandbox.begin")

    import builtins
    import types
    builtins.exit = _Quitter("exit")
    builtins.quit = _Quitter("quit")
    main = types.ModuleType("__main__")
    main.__file__ = os.path.join(cfg["workdir"], "program.py")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = [main.__file__]
    sys.path.insert(0, cfg["workdir"])
    text = source.decode("utf-8", errors="replace")
    del source
    exit_ = os._exit
    # The traceback printer uses builtins (type, isinstance, ...) that the
    # program may have patched: they are put back before reporting a failure.
    builtins_before = (builtins.__dict__, dict(builtins.__dict__))
    # Captured before the program runs (it may replace threading._shutdown).
    import threading
    join_threads = threading._shutdown
    try:
        code = compile(text, main.__file__, "exec")
        exec(code, main.__dict__)  # noqa: S102 - this is the sandbox
        # A program has not exited while a non-daemon thread still runs: wait
        # for them as interpreter shutdown does (one spinning forever ends in
        # the wall-clock or CPU limit, never in a pass).
        join_threads()
    except SystemExit as e:
        _report(f"program exited before its end (SystemExit({e.code!r}))", text, None, builtins_before)
        exit_(EXIT_EARLY)
    except MemoryError as e:
        _report("MemoryError", text, e, builtins_before)
        exit_(EXIT_MEMORY)
    except BaseException as e:  # noqa: BLE001 - every other failure is an error
        _report(None, text, e, builtins_before)
        exit_(EXIT_EXCEPTION)
    _flush()
    sys.audit("rlhf_jax.sandbox.end")
    exit_(0)


def _flush():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the program may have replaced them
            pass


def _report(note, text, exc, builtins_before=None):
    _flush()
    try:
        if builtins_before is not None:  # (the live dict, its copy): no import needed
            builtins_before[0].update(builtins_before[1])
        err = sys.__stderr__
        if exc is not None:
            import linecache
            import traceback
            linecache.cache[sys.modules["__main__"].__file__] = (
                len(text), None, text.splitlines(True), sys.modules["__main__"].__file__)
            # Skip the runner's own frame: the program's traceback starts below it.
            tb = exc.__traceback__
            # Bounded: formatting a 10**6-frame RecursionError would take longer
            # than any timeout; the outermost frames and the message suffice.
            traceback.print_exception(type(exc), exc, tb.tb_next if tb is not None else None,
                                      limit=_TRACEBACK_LIMIT, file=err)
        if note is not None:
            err.write(f"[sandbox] {note}\n")
        err.flush()
    except BaseException:  # noqa: BLE001 - best effort diagnostics
        pass


if __name__ == "__main__":
    _main()
