"""Batches of sandboxed programs: a worker pool, de-duplication and a result cache.

Each worker is a thread that spawns and supervises one sandboxed process at a
time (the work happens in the child processes, so threads are enough and cost
nothing to start). Results are cached under a SHA-256 of (program, limits,
isolation level, harness version): in memory (LRU, bounded by entries and
bytes of output) and optionally on disk (one JSON file per key, written
atomically). Timeouts are never cached: under load a correct program can time
out, and a later run should get another chance.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import os
import tempfile
import threading
from typing import Optional, Sequence

from rlhf_jax.execution import sandbox
from rlhf_jax.execution.sandbox import ExecutionResult, Limits

__all__ = ["execute_many", "clear_cache", "cache_key"]

# Bumped whenever the runner's verdicts change (2: non-daemon threads are joined,
# CPU-limit kills are "killed"), so no older cached verdict is reused.
_HARNESS_VERSION = 2
_CACHE_MAX_ENTRIES = 65536
_CACHE_MAX_BYTES = 256 * 2**20

_cache_lock = threading.Lock()
_cache: "collections.OrderedDict[str, ExecutionResult]" = collections.OrderedDict()
_cache_bytes = 0


def cache_key(program: str, limits: Limits, level: str) -> str:
    """SHA-256 hex digest identifying a (program, limits, isolation) run."""
    blob = json.dumps({"v": _HARNESS_VERSION, "program": program, "limits": limits.key(),
                       "isolation": level}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8", errors="surrogateescape")).hexdigest()


def clear_cache() -> None:
    """Empties the in-memory result cache."""
    global _cache_bytes
    with _cache_lock:
        _cache.clear()
        _cache_bytes = 0


def _size(r: ExecutionResult) -> int:
    return len(r.stdout) + len(r.stderr) + 256


def _cache_get(key: str) -> Optional[ExecutionResult]:
    with _cache_lock:
        r = _cache.get(key)
        if r is not None:
            _cache.move_to_end(key)
        return r


def _cache_put(key: str, r: ExecutionResult) -> None:
    global _cache_bytes
    with _cache_lock:
        if key in _cache:
            _cache_bytes -= _size(_cache.pop(key))
        _cache[key] = r
        _cache_bytes += _size(r)
        while len(_cache) > _CACHE_MAX_ENTRIES or _cache_bytes > _CACHE_MAX_BYTES:
            _, old = _cache.popitem(last=False)
            _cache_bytes -= _size(old)


def _disk_get(cache_dir: str, key: str) -> Optional[ExecutionResult]:
    try:
        with open(os.path.join(cache_dir, key[:2], key + ".json"), encoding="utf-8") as f:
            return ExecutionResult.from_dict(json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _disk_put(cache_dir: str, key: str, r: ExecutionResult) -> None:
    d = os.path.join(cache_dir, key[:2])
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(r.to_dict(), f)
        os.replace(tmp, os.path.join(d, key + ".json"))  # atomic: readers never see half a file
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def execute_many(
    programs: Sequence[str],
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 16,
    cpu_time_s: Optional[float] = None,
    max_processes: int = 64,
    max_file_mb: float = 64.0,
    max_workers: Optional[int] = None,
    cache: bool = True,
    cache_dir: Optional[str] = None,
    progress: bool = False,
    isolation: str = "auto",
) -> list:
    """Runs a batch of programs in the sandbox on a worker pool.

    Identical programs in the batch run once; with ``cache=True`` results of
    earlier calls (same program, limits and isolation level) are reused from
    memory and, if ``cache_dir`` is given, from disk. Each program runs as in
    :func:`rlhf_jax.execution.execute`.

    Args:
      programs: Python sources.
      timeout_s, memory_mb, max_output_bytes, cpu_time_s, max_processes,
        max_file_mb, isolation: as in :func:`rlhf_jax.execution.execute`.
      max_workers: concurrent sandboxes; default ``os.cpu_count()``.
      cache: use and fill the result cache.
      cache_dir: directory of an on-disk cache shared across processes/runs.
      progress: show a tqdm progress bar.

    Returns:
      A list of :class:`ExecutionResult`, in the order of ``programs``
      (``cached=True`` on results that did not run in this call).

    Raises:
      ValueError: ``programs`` is not a sequence of str, or a limit or
        ``max_workers`` is not positive.
    """
    if isinstance(programs, (str, bytes)) or not isinstance(programs, Sequence):
        raise ValueError(f"programs must be a sequence of str, got {type(programs).__name__}")
    for i, p in enumerate(programs):
        sandbox._check_program(p, name=f"programs[{i}]")
    if max_workers is None:
        max_workers = os.cpu_count() or 1
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                    cpu_time_s=cpu_time_s, max_processes=max_processes,
                    max_file_mb=max_file_mb).validate()
    level = sandbox._resolve_level(isolation)

    keys = [cache_key(p, limits, level) for p in programs]
    results: dict = {}
    todo: dict = {}  # key -> program, first occurrence only
    for key, program in zip(keys, programs):
        if key in results or key in todo:
            continue
        hit = None
        if cache:
            hit = _cache_get(key)
            if hit is None and cache_dir is not None:
                hit = _disk_get(cache_dir, key)
                if hit is not None:
                    _cache_put(key, hit)
        if hit is not None:
            results[key] = _as_cached(hit)
        else:
            todo[key] = program

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm  # noqa: PLC0415 - optional dependency of the progress bar
        bar = tqdm(total=len(todo), desc="sandbox", unit="prog")
    try:
        workers = min(max_workers, max(1, len(todo)), sandbox.MAX_SLOTS - 1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
            futures = {ex.submit(sandbox.run_with_limits, prog, limits, level): key
                       for key, prog in todo.items()}
            for fut in concurrent.futures.as_completed(futures):
                key = futures[fut]
                r = fut.result()
                results[key] = r
                if cache and r.status != "timeout":
                    _cache_put(key, r)
                    if cache_dir is not None:
                        _disk_put(cache_dir, key, r)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    out = []
    seen = set()
    for key in keys:
        r = results[key]
        # Duplicates within the batch ran once: later copies are marked cached.
        out.append(_as_cached(r) if key in seen and not r.cached else r)
        seen.add(key)
    return out


def _as_cached(r: ExecutionResult) -> ExecutionResult:
    return r if r.cached else ExecutionResult(**{**r.to_dict(), "cached": True})
