"""Running generated verification functions on inputs, in the sandbox (ALGORITHMS §9.1, §9.4).

AutoIF's official code `exec`s LLM-written functions in its own process with a
SIGALRM. Here every function runs in `rlhf_jax.execution` (one isolated,
resource-limited process tree per program, never this process): one program per
function execs its source once and calls `evaluate(x)` on each of its inputs,
writing one verdict line per input as it goes, so the verdicts before a hang
survive the kill.

A verdict is True / False when `evaluate` returns a bool (or the ints 0 / 1),
and None — neither pass nor fail — when it raises or returns anything else.
A function whose program hits the wall-clock limit has status "timeout" and
None for every input it did not finish.

Limit: the verdict lines carry a marker derived from the program, which a
function written to forge verdicts could reproduce; the sandbox protects the
host, not the verdicts, from deliberately hostile verifiers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Optional, Sequence

import numpy as np

from rlhf_jax.execution import execute_many

# Statuses of one function run.
FUNCTION_STATUSES = ("ok", "compile_error", "no_evaluate", "timeout", "crash")

_PROGRAM = '''\
import json as _json
import sys as _sys

_MARK = {mark!r}
_SOURCE = {source!r}
_INPUTS = {inputs!r}
_out = _sys.stdout


def _emit(obj):
    _out.write(_MARK + _json.dumps(obj) + "\\n")
    _out.flush()


class _Sink:
    def write(self, s):
        return len(s)

    def flush(self):
        pass


_sys.stdout = _Sink()  # prints of the function never mix with the verdicts
_ns = {{"__name__": "verifier"}}
try:
    exec(compile(_SOURCE, "<verifier>", "exec"), _ns)
except BaseException as _e:
    _emit({{"status": "compile_error", "error": type(_e).__name__}})
    raise SystemExit(0)
_fn = _ns.get("evaluate")
if not callable(_fn):
    _emit({{"status": "no_evaluate"}})
    raise SystemExit(0)
for _i, _x in enumerate(_INPUTS):
    try:
        _r = _fn(_x)
        _v = bool(_r) if isinstance(_r, (bool, int)) and _r in (0, 1) else None
    except BaseException:
        _v = None
    _emit({{"i": _i, "v": _v}})
_emit({{"status": "ok"}})
'''


@dataclasses.dataclass(frozen=True)
class FunctionRun:
  """Verdicts of one verification function on its inputs.

  Attributes:
    status: one of FUNCTION_STATUSES: "ok" (every input evaluated),
      "compile_error" (the source does not run), "no_evaluate" (no callable
      `evaluate`), "timeout" (wall clock; verdicts after the hang are None),
      "crash" (the process died, e.g. memory or `os._exit`).
    verdicts: one of True / False / None per input.
    sandbox_status: the sandbox's status of the program.
  """
  status: str
  verdicts: tuple
  sandbox_status: str

  @property
  def usable(self) -> bool:
    """The function compiled, defined `evaluate` and finished every input."""
    return self.status == "ok"


def verification_program(source: str, inputs: Sequence[str]) -> tuple[str, str]:
  """(program, marker): the sandbox program that runs `source`'s `evaluate` on every input."""
  if not isinstance(source, str):
    raise ValueError(f"source must be a str, got {type(source).__name__}")
  inputs = list(inputs)
  for i, x in enumerate(inputs):
    if not isinstance(x, str):
      raise ValueError(f"inputs[{i}] must be a str, got {type(x).__name__}")
  digest = hashlib.sha256(json.dumps([source, inputs]).encode("utf-8", "surrogatepass")).hexdigest()[:16]
  mark = f"@@AUTOIF-{digest}@@"
  return _PROGRAM.format(mark=mark, source=source, inputs=inputs), mark


def parse_run(result, mark: str, num_inputs: int) -> FunctionRun:
  """Reads one sandbox result of `verification_program` into a FunctionRun."""
  verdicts: list = [None] * num_inputs
  status = None
  for line in result.stdout.splitlines():
    if not line.startswith(mark):
      continue
    try:
      msg = json.loads(line[len(mark):])
    except ValueError:
      continue
    if "status" in msg:
      status = msg["status"]
    elif isinstance(msg.get("i"), int) and 0 <= msg["i"] < num_inputs:
      verdicts[msg["i"]] = msg["v"] if msg["v"] in (True, False) else None
  if status in ("compile_error", "no_evaluate"):
    return FunctionRun(status, tuple([None] * num_inputs), result.status)
  if result.status == "timeout":
    status = "timeout"
  elif status != "ok" or result.status != "ok":
    status = "crash"
  return FunctionRun(status, tuple(verdicts), result.status)


def run_functions(sources: Sequence[str], inputs: Sequence[Sequence[str]], *, timeout_s: float = 5.0,
                  memory_mb: int = 512, max_workers: Optional[int] = None) -> list[FunctionRun]:
  """Runs `sources[f]`'s `evaluate` on every string of `inputs[f]`, one sandbox program per function.

  All programs go to `execution.execute_many` in one batch (a worker pool;
  identical programs run once).

  Args:
    sources: Python sources defining `evaluate(response) -> bool`.
    inputs: for each source, the strings to evaluate.
    timeout_s: wall-clock limit of one function's program (all its inputs).
    memory_mb: address-space limit of each program.
    max_workers: concurrent sandboxes (default: the CPU count).

  Returns:
    One FunctionRun per source.
  """
  if len(sources) != len(inputs):
    raise ValueError(f"sources and inputs must have the same length, got {len(sources)} and {len(inputs)}")
  if not timeout_s > 0 or not math.isfinite(timeout_s):
    raise ValueError(f"timeout_s must be a positive number, got {timeout_s}")
  built = [verification_program(s, x) for s, x in zip(sources, inputs)]
  if not built:
    return []
  results = execute_many([p for p, _ in built], timeout_s=timeout_s, memory_mb=memory_mb,
                         max_output_bytes=1 << 22, max_workers=max_workers)
  return [parse_run(r, mark, len(x)) for r, (_, mark), x in zip(results, built, inputs)]


def verdict_matrix(runs: Sequence[FunctionRun]) -> np.ndarray:
  """[F, N] float verdicts: 1.0 pass, 0.0 fail, NaN for None (all runs must have N inputs)."""
  if not runs:
    return np.zeros((0, 0), np.float64)
  n = {len(r.verdicts) for r in runs}
  if len(n) != 1:
    raise ValueError(f"runs have different numbers of inputs: {sorted(n)}")
  return np.array([[np.nan if v is None else float(v) for v in r.verdicts] for r in runs], np.float64).reshape(
      len(runs), n.pop())


def pass_rates(verdicts_FxN: np.ndarray) -> np.ndarray:
  """Per-input accuracy over functions: mean of the non-None verdicts; NaN when every verdict is None.

  A function that raises on an input (None) is neither a pass nor a fail for
  that input: [True, None, False] → 0.5 (ALGORITHMS §9.4).
  """
  v = np.asarray(verdicts_FxN, np.float64)
  if v.ndim != 2:
    raise ValueError(f"verdicts must be [F, N], got shape {v.shape}")
  counted = np.sum(~np.isnan(v), axis=0)
  total = np.nansum(v, axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(counted > 0, total / np.maximum(counted, 1), np.nan)
