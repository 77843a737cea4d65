"""PNG plots of a run's metrics.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg
canvas, without pyplot: no display is needed and the process-wide backend
(a user's notebook) is left alone.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_jax.utils.metrics import read_metrics

__all__ = ["plot_metrics", "plot_bars"]

Groups = Sequence[str] | Sequence[Sequence[str]] | Mapping[str, Sequence[str]]


def _normalise_groups(groups: Groups) -> list[tuple[str, list[str]]]:
  if isinstance(groups, str):
    groups = [groups]
  if isinstance(groups, Mapping):
    return [(str(title), list(keys)) for title, keys in groups.items()]
  out = []
  for g in groups:
    keys = [g] if isinstance(g, str) else list(g)
    out.append((", ".join(keys), keys))
  return out


def _figure(**kwargs) -> Figure:
  fig = Figure(**kwargs)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, out_png: str | os.PathLike) -> str:
  out_png = os.fspath(out_png)
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  tmp = f"{out_png}.tmp-{os.getpid()}"
  fig.savefig(tmp, dpi=100, format="png")
  os.replace(tmp, out_png)  # a reader never sees half a PNG
  return out_png


def plot_metrics(jsonl_path: str | os.PathLike, groups: Groups,
                 out_png: str | os.PathLike, *, title: str | None = None,
                 ncols: int = 2) -> list[str]:
  """Plots metric curves against `step`, one subplot per group.

  Args:
    jsonl_path: a `metrics.jsonl` written by `MetricsWriter`.
    groups: the curves: a list of keys (one subplot each), a list of lists
      (keys sharing a subplot), or `{subplot title: [keys]}`. Keys absent from
      the file are skipped, and so are subplots left empty.
    out_png: output file (written atomically).
    title: figure title.
    ncols: subplots per row.

  Returns:
    The keys that were plotted (empty if none were found; a PNG saying so is
    still written, so a run always has its plot file).
  """
  rows = read_metrics(jsonl_path)
  panels = []
  for panel_title, keys in _normalise_groups(groups):
    curves = []
    for key in keys:
      points = [(r["step"], r[key]) for r in rows
                if key in r and isinstance(r[key], (int, float))]
      if points:
        curves.append((key, points))
    if curves:
      panels.append((panel_title, curves))

  n = max(len(panels), 1)
  ncols = max(1, min(ncols, n))
  nrows = math.ceil(n / ncols)
  fig = _figure(figsize=(5 * ncols, 3.2 * nrows))
  axes = fig.subplots(nrows, ncols, squeeze=False)
  plotted = []
  for ax, (panel_title, curves) in zip(axes.flat, panels):
    for key, points in curves:
      xs, ys = zip(*sorted(points))
      ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
      plotted.append(key)
    ax.set_title(panel_title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
      ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  if not panels:
    axes.flat[0].text(0.5, 0.5, "no matching metrics", ha="center", va="center")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  _save(fig, out_png)
  return plotted


def plot_bars(values: Mapping[str, float], out_png: str | os.PathLike, *,
              title: str | None = None, ylabel: str | None = None,
              errors: Mapping[str, float] | None = None) -> str:
  """A bar chart of `{label: value}` (e.g. pass@1 per strategy).

  Args:
    values: bar heights, in display order.
    out_png: output file (written atomically).
    title, ylabel: labels.
    errors: optional `{label: half-width}` error bars.

  Returns:
    `out_png`.
  """
  if not values:
    raise ValueError("values is empty: nothing to plot")
  labels = list(values)
  heights = [float(values[k]) for k in labels]
  yerr = [float(errors.get(k, 0.0)) for k in labels] if errors else None
  fig = _figure(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.5))
  ax = fig.subplots()
  bars = ax.bar(range(len(labels)), heights, yerr=yerr, capsize=3)
  ax.bar_label(bars, fmt="%.3g", fontsize=8)
  ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0,
                ha="right" if len(labels) > 4 else "center")
  if ylabel:
    ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return _save(fig, out_png)
