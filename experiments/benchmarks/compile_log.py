"""Where a test run's XLA compilation goes: seconds per jitted function and per test file.

As a pytest plugin, each process (every xdist worker) writes `compile_log.<worker>.json` into
$COMPILE_LOG_DIR (default: the current directory):

  COMPILE_LOG_DIR=/tmp/cl .venv/bin/python -m pytest -q -p experiments.benchmarks.compile_log

then the summary over all workers:

  .venv/bin/python -m experiments.benchmarks.compile_log /tmp/cl

It reads JAX's own compile log (`jax_log_compiles`: "Finished XLA compilation of NAME in S sec", which
also covers persistent-cache loads), so it counts what the run really compiled, nothing estimated.
Programs compiled in subprocesses (the command-line tests) are not seen.
"""
from __future__ import annotations

import collections
import glob
import json
import logging
import os
import re
import sys

import pytest

_PATTERN = re.compile(r"Finished XLA compilation of (\S+) in ([0-9.e+-]+) sec")
_seconds: collections.Counter = collections.Counter()   # "file::function" -> seconds
_counts: collections.Counter = collections.Counter()    # "file::function" -> compilations
_where = ["<collection>"]


class _Handler(logging.Handler):

  def emit(self, record: logging.LogRecord) -> None:
    m = _PATTERN.search(record.getMessage())
    if m:
      key = f"{_where[0]}::{m.group(1)}"
      _seconds[key] += float(m.group(2))
      _counts[key] += 1


def pytest_configure(config):
  del config
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_log_compiles", True)
  for name in ("jax._src.dispatch", "jax._src.interpreters.pxla", "jax._src.compiler"):
    logging.getLogger(name).propagate = False  # keep the log out of pytest's captured output
  logger = logging.getLogger("jax._src.dispatch")
  logger.setLevel(logging.DEBUG)
  logger.addHandler(_Handler())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  _where[0] = item.nodeid.split("::")[0]
  yield


def pytest_unconfigure(config):
  del config
  out = os.environ.get("COMPILE_LOG_DIR", ".")
  os.makedirs(out, exist_ok=True)
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  with open(os.path.join(out, f"compile_log.{worker}.json"), "w") as f:
    json.dump({"seconds": _seconds, "counts": _counts}, f, indent=1, sort_keys=True)


def summarize(directory: str, top: int = 20) -> str:
  seconds, counts = collections.Counter(), collections.Counter()
  for path in glob.glob(os.path.join(directory, "compile_log.*.json")):
    with open(path) as f:
      d = json.load(f)
    seconds.update(d["seconds"])
    counts.update(d["counts"])
  if not seconds:
    return f"no compile_log.*.json in {directory!r}"
  by_fn, n_fn, by_file = collections.Counter(), collections.Counter(), collections.Counter()
  for key, s in seconds.items():
    where, fn = key.split("::", 1)
    by_fn[fn] += s
    n_fn[fn] += counts[key]
    by_file[where] += s
  lines = [f"compilation: {sum(seconds.values()):.0f} s in {sum(counts.values())} programs", "",
           "| function | seconds | compilations |", "|---|---|---|"]
  lines += [f"| `{fn}` | {s:.1f} | {n_fn[fn]} |" for fn, s in by_fn.most_common(top)]
  lines += ["", "| test file | seconds |", "|---|---|"]
  lines += [f"| {where} | {s:.1f} |" for where, s in by_file.most_common(top)]
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    print("usage: python -m experiments.benchmarks.compile_log DIRECTORY", file=sys.stderr)
    sys.exit(2)
  print(summarize(sys.argv[1]))
