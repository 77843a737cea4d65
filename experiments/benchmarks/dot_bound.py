"""The matmuls of a compiled XLA program, each timed on its own: what the program's dots cost at XLA's rate.

The 2048² matmul peak bounds large matmuls; a training step of a small model is hundreds of small dots
(e.g. [512, 128] x [128, 64] per chunk and layer) that run far below it. This module reads the dots out
of the optimized HLO of a compiled program (`compiled.as_text()`), with how often each runs (the known
trip counts of the while loops around it), and times each distinct dot alone: jitted `lax.dot_general` on
the same shapes and dimension numbers (XLA:CPU's own kernels), and, when torch is given, `torch.matmul`
on the same contraction (MKL / oneDNN, the eager peer's kernels). The sums are the step's matmul time at
each library's per-shape rate: not a strict bound (inside a step a dot may run with a warmer or a
busier cache than alone) but the measured cost of the kernels the step cannot avoid.

    from experiments.benchmarks.dot_bound import compiled_dots, program_callables, time_dots
    dots = compiled_dots(jax.jit(step).lower(state, batch).compile().as_text())
    fns = program_callables(dots, torch=torch)   # every dot `count` times: time in turns with the step
    print(time_dots(dots, torch=torch))           # per distinct dot: {"count", "gflop", "xla_s", "torch_s", "rows"}
"""
from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time

_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(.*)$")  # name, type, op, operands, attrs
_ARRAY = re.compile(r"^(\w+)\[([\d,]*)\]")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_DIMS = re.compile(r"(lhs_batch_dims|rhs_batch_dims|lhs_contracting_dims|rhs_contracting_dims)=\{([\d,]*)\}")


@dataclasses.dataclass(frozen=True)
class Dot:
  """One distinct dot of a program: operand shapes, `lax.dot_general` dimension numbers, dtype, executions."""
  lhs: tuple
  rhs: tuple
  dimension_numbers: tuple  # ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))
  dtype: str
  count: int

  @property
  def flops(self) -> int:
    (lc, _), (lb, _) = self.dimension_numbers
    k = 1
    for i in lc:
      k *= self.lhs[i]
    out = 1
    for i, n in enumerate(self.lhs):
      if i not in lc:
        out *= n
    (_, rc), (_, rb) = self.dimension_numbers
    for i, n in enumerate(self.rhs):
      if i not in rc and i not in rb:
        out *= n
    return 2 * out * k


def compiled_dots(hlo_text: str) -> list[Dot]:
  """Every `dot` of an optimized HLO module, grouped by shape and dimensions, counted per program run.

  A dot inside a while loop's body counts the loop's `known_trip_count` times (nested loops multiply; a loop
  without one counts once); a computation called from several places counts once per caller, and both
  branches of a conditional count. Raises ValueError when the text has no
  dot (e.g. HLO printed in a format this parser does not know), so a benchmark never reports zero cost.
  """
  comps: dict[str, list] = {}  # computation -> [(op, operand names, attrs)]
  shapes: dict[tuple, tuple] = {}
  entry, cur = None, None
  for line in hlo_text.splitlines():
    m = _COMP.match(line)
    if m and not line.startswith(" "):
      cur = m.group(1)
      comps[cur] = []
      if line.startswith("ENTRY"):
        entry = cur
      continue
    m = _INSTR.match(line)
    if m and cur is not None:
      name, type_, op, args, attrs = m.groups()
      array = _ARRAY.match(type_)  # None for a tuple (a while loop's state)
      dtype, shape = (array.group(1), tuple(int(x) for x in array.group(2).split(",") if x)) if array else (None, ())
      shapes[(cur, name)] = (dtype, shape)
      comps[cur].append((op, [a.strip().lstrip("%") for a in args.split(",")], attrs))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  counts: dict[tuple, int] = {}

  def visit(comp: str, mult: int) -> None:
    for op, args, attrs in comps.get(comp, []):
      if op == "dot":
        dims = {k: tuple(int(x) for x in v.split(",") if x) for k, v in _DIMS.findall(attrs)}
        lhs, rhs = shapes[(comp, args[0])], shapes[(comp, args[1])]
        dn = ((dims.get("lhs_contracting_dims", ()), dims.get("rhs_contracting_dims", ())),
              (dims.get("lhs_batch_dims", ()), dims.get("rhs_batch_dims", ())))
        key = (lhs[1], rhs[1], dn, lhs[0])
        counts[key] = counts.get(key, 0) + mult
      called = _CALLS.findall(attrs)
      if called:
        trip = _TRIP.search(attrs)
        for c in called:
          visit(c, mult * (int(trip.group(1)) if op == "while" and trip else 1))

  visit(entry, 1)
  if not counts:
    raise ValueError("no dot found in the HLO text")
  return [Dot(lhs, rhs, dn, dtype, n) for (lhs, rhs, dn, dtype), n in counts.items()]


def _median_seconds(fn, sync, repeats: int, inner: int) -> float:
  sync(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn()
    sync(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def _torch_operands(dot: Dot, a, b):
  """(lhs, rhs) as torch views [batch..., M, K] and [batch..., K, N] (strided, as eager autograd hands them)."""
  (lc, rc), (lb, rb) = dot.dimension_numbers
  lfree = [i for i in range(len(dot.lhs)) if i not in lc and i not in lb]
  rfree = [i for i in range(len(dot.rhs)) if i not in rc and i not in rb]
  a = a.permute(*lb, *lfree, *lc)
  b = b.permute(*rb, *rc, *rfree)
  nb = len(lb)
  size = lambda t, dims: math.prod(t.shape[d] for d in dims)
  m, k, n = size(a, range(nb, nb + len(lfree))), size(b, range(nb, nb + len(rc))), size(
      b, range(nb + len(rc), b.dim()))
  return a.reshape(*a.shape[:nb], m, k), b.reshape(*b.shape[:nb], k, n)


def _operands(dot: Dot, rng, torch):
  """(XLA lhs, XLA rhs, torch lhs view, torch rhs view) of random values; the torch pair is None without torch."""
  import jax
  import numpy as np
  dtype = {"f32": np.float32, "bf16": jax.numpy.bfloat16, "f16": np.float16}.get(dot.dtype, np.float32)
  a_np = rng.standard_normal(dot.lhs).astype(np.float32)
  b_np = rng.standard_normal(dot.rhs).astype(np.float32)
  a, b = jax.numpy.asarray(a_np, dtype), jax.numpy.asarray(b_np, dtype)
  if torch is None:
    return a, b, None, None
  ta, tb = _torch_operands(dot, torch.from_numpy(a_np), torch.from_numpy(b_np))
  if dot.dtype == "bf16":
    ta, tb = ta.bfloat16(), tb.bfloat16()
  return a, b, ta, tb


def program_callables(dots: list[Dot], *, torch=None, seed: int = 0) -> dict:
  """Blocking callables that run every dot of the program `count` times, one dot after another, as a program
  run executes them: {"dots alone, XLA": ..., "dots alone, torch.matmul": ... (with torch)}.

  For timing in turns with the program itself (`_common.time_interleaved`), so that the VM's drift hits all
  sides alike. The XLA side dispatches each dot asynchronously and blocks once at the end.
  """
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)
  xla, tch = [], []
  for dot in dots:
    a, b, ta, tb = _operands(dot, rng, torch)
    xla.append((jax.jit(lambda x, y, dn=dot.dimension_numbers: jax.lax.dot_general(x, y, dn)), a, b, dot.count))
    tch.append((ta, tb, dot.count))

  def run_xla():
    out = None
    for fn, a, b, n in xla:
      for _ in range(n):
        out = fn(a, b)
    out.block_until_ready()

  def run_torch():
    with torch.no_grad():
      for ta, tb, n in tch:
        for _ in range(n):
          torch.matmul(ta, tb)

  return {"dots alone, XLA": run_xla, **({"dots alone, torch.matmul": run_torch} if torch is not None else {})}


def time_dots(dots: list[Dot], *, torch=None, repeats: int = 5, inner: int = 10, seed: int = 0) -> dict:
  """Each distinct dot timed alone (median of `repeats` batches of `inner` calls), scaled by its count.

  Returns {"count": dot executions, "gflop", "xla_s", "torch_s" (None without torch), "rows": per distinct
  dot (lhs, rhs, (lhs, rhs contracting dims), count, xla GFLOP/s, torch GFLOP/s)}.
  """
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)
  rows, xla_s, torch_s, flops = [], 0.0, 0.0 if torch is not None else None, 0
  for dot in sorted(dots, key=lambda d: -d.flops * d.count):
    a, b, ta, tb = _operands(dot, rng, torch)
    fn = jax.jit(lambda x, y, dn=dot.dimension_numbers: jax.lax.dot_general(x, y, dn))
    t_x = _median_seconds(lambda: fn(a, b), lambda o: o.block_until_ready(), repeats, inner)
    xla_s += t_x * dot.count
    flops += dot.flops * dot.count
    t_t = None
    if torch is not None:
      with torch.no_grad():
        t_t = _median_seconds(lambda: torch.matmul(ta, tb), lambda o: None, repeats, inner)
      torch_s += t_t * dot.count
    rows.append((dot.lhs, dot.rhs, dot.dimension_numbers[0], dot.count, dot.flops / t_x / 1e9,
                 dot.flops / t_t / 1e9 if t_t else None))
  return {"count": sum(d.count for d in dots), "gflop": flops / 1e9, "xla_s": xla_s, "torch_s": torch_s,
          "rows": rows}


def per_dot_table(result: dict) -> str:
  lines = ["#     lhs x rhs, contracting dims (executions a run): XLA GFLOP/s, torch.matmul GFLOP/s"]
  for lhs, rhs, (lc, rc), count, gx, gt in result["rows"]:
    lines.append(f"#     {list(lhs)} x {list(rhs)}, {list(lc)}x{list(rc)} (x{count}): {gx:.1f}"
                 + (f", {gt:.1f}" if gt else ""))
  return "\n".join(lines)

