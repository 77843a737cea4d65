"""FilterReport: what each AutoIF step took in and let out (the shape of the paper's Table 5)."""

from __future__ import annotations

from typing import Any, Sequence

# A FilterReport is a plain, JSON-serialisable dict:
#   {"name": str, "unit": str, "in": int, "out": int, "removed": int, **details}
FilterReport = dict


def filter_report(name: str, n_in: int, n_out: int, *, unit: str, **details: Any) -> FilterReport:
  """Counts of one filter; `details` adds step-specific counts (e.g. functions in/out)."""
  if n_out > n_in or n_out < 0:
    raise ValueError(f"filter {name!r}: out ({n_out}) must be in [0, in={n_in}]")
  return {"name": name, "unit": unit, "in": int(n_in), "out": int(n_out), "removed": int(n_in - n_out), **details}


def format_reports(reports: Sequence[FilterReport]) -> str:
  """A fixed-width table: one line per filter (name, unit, in, out, removed, kept %)."""
  lines = [f"{'step':<22} {'unit':<14} {'in':>7} {'out':>7} {'removed':>8} {'kept':>6}"]
  for r in reports:
    kept = f"{100.0 * r['out'] / r['in']:.0f}%" if r["in"] else "-"
    lines.append(f"{r['name']:<22} {r['unit']:<14} {r['in']:>7} {r['out']:>7} {r['removed']:>8} {kept:>6}")
  return "\n".join(lines)
