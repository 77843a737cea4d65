"""Throughput of the sandbox against bare subprocesses on the same programs.

Runs N small HumanEval-like programs (a function plus asserts) through
(a) bare ``subprocess.run([sys.executable, file])``, sequentially and on a
thread pool of ``--workers``, and (b) ``rlhf_jax.execution.execute_many`` with
isolation on and the cache off, and prints programs/s, ms/program and the ratio
to the bare pool (the like-for-like peer).

    python experiments/benchmarks/sandbox_throughput.py --n 64 --workers 2
"""
import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time

from rlhf_jax import execution


def make_programs(n: int) -> list:
    progs = []
    for i in range(n):
        k = i % 8
        progs.append(
            f"def solve(xs):\n"
            f"    return sorted(x * {k + 1} for x in xs if x % 2 == {k % 2})\n\n"
            f"def check(candidate):\n"
            f"    assert candidate([1, 2, 3, 4]) == sorted(x * {k + 1} for x in [1, 2, 3, 4] if x % 2 == {k % 2})\n"
            f"    assert candidate([]) == []\n"
            f"    assert candidate(list(range({i}))) == [x * {k + 1} for x in range({i}) if x % 2 == {k % 2}]\n\n"
            f"check(solve)\n")
    return progs


def bare(paths, workers):
    def one(p):
        return subprocess.run([sys.executable, p], capture_output=True, timeout=30).returncode
    if workers == 1:
        return [one(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, paths))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="number of programs")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = ap.parse_args()
    progs = make_programs(args.n)
    level = execution.isolation_level()
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, p in enumerate(progs):
            path = os.path.join(d, f"p{i}.py")
            with open(path, "w") as f:
                f.write(p)
            paths.append(path)
        runs = {
            "bare subprocess, sequential": lambda: bare(paths, 1),
            f"bare subprocess, {args.workers} threads": lambda: bare(paths, args.workers),
            f"execute_many, {args.workers} workers": lambda: execution.execute_many(
                progs, max_workers=args.workers, cache=False, timeout_s=30),
        }
        times = {}
        for name, fn in runs.items():
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = fn()
                best = min(best, time.perf_counter() - t0)
            if name.startswith("execute_many"):
                assert all(r.passed for r in out), [r for r in out if not r.passed][:1]
            else:
                assert all(rc == 0 for rc in out)
            times[name] = best
    peer = times[f"bare subprocess, {args.workers} threads"]
    print(f"\n{args.n} programs, {args.workers} workers, best of {args.repeats}; "
          f"isolation: {level}; python: {sys.executable}\n")
    print(f"| {'method':<34} | {'programs/s':>10} | {'ms/program':>10} | {'time / bare pool':>16} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 12}|{'-' * 18}|")
    for name, t in times.items():
        print(f"| {name:<34} | {args.n / t:>10.1f} | {1000 * t / args.n:>10.2f} | {t / peer:>16.2f} |")


if __name__ == "__main__":
    main()
