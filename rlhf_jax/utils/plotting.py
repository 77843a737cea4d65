"""PNG plots of a run's metrics.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg
canvas, without pyplot: no display is needed and the process-wide backend
(a user's notebook) is left alone.

Every subplot has a y-axis label, and no title or label is cut off: figures
use matplotlib's constrained layout (which keeps the suptitle, titles and
labels inside the figure) and any text wider than the room it has is wrapped
at word boundaries to the room the layout gives it (measured with the
renderer) before the figure is saved.
"""
from __future__ import annotations

import math
import os
import textwrap
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
  fig = Figure(layout="constrained", **kwargs)
  FigureCanvasAgg(fig)
  return fig


def _narrow(text_artist, box, width_px: float, height_px: float) -> bool:
  """Re-wraps (or, when no narrower wrap exists, shrinks) a text that sticks out; False if it can't."""
  vertical = box.height > box.width and text_artist.get_rotation() % 180 == 90
  lo, hi, limit = (box.y0, box.y1, height_px) if vertical else (box.x0, box.x1, width_px)
  centre = (lo + hi) / 2
  room = 2 * max(min(centre, limit - centre), 1.0)  # text is centred where the layout put it
  lines = text_artist.get_text().split("\n")
  chars = int(max(len(line) for line in lines) * room / max(hi - lo, 1.0)) - 1
  words = " ".join(text_artist.get_text().split())
  wrapped = textwrap.fill(words, max(chars, 1), break_long_words=False)
  if chars >= 8 and len(wrapped.split("\n")) > len(lines):
    text_artist.set_text(wrapped)
    return True
  if text_artist.get_fontsize() > 6:
    text_artist.set_fontsize(text_artist.get_fontsize() - 1)
    return True
  return False


def _fit_texts(fig: Figure, suptitle=None, max_rounds: int = 12) -> None:
  """Keeps every title and axis label of `fig` inside the figure.

  Lays the figure out (constrained layout), finds texts that stick out, wraps
  them at word boundaries to the room they have (or shrinks their font when a
  single word is too long), and repeats until everything is inside.
  """
  texts = [suptitle] if suptitle is not None else []
  for ax in fig.axes:
    if ax.axison:
      texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
  texts = [t for t in texts if t.get_text()]
  for _ in range(max_rounds):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width_px, height_px = fig.bbox.width, fig.bbox.height
    changed = False
    for t in texts:
      box = t.get_window_extent(renderer)
      if box.x0 < 0 or box.y0 < 0 or box.x1 > width_px or box.y1 > height_px:
        changed |= _narrow(t, box, width_px, height_px)
    if not changed:
      return


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
    # The panel's title names the quantity (a `{title: keys}` mapping) or is its key(s).
    ax.set_ylabel(panel_title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
      ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  if not panels:
    axes.flat[0].text(0.5, 0.5, "no matching metrics", ha="center", va="center")
  suptitle = fig.suptitle(title) if title else None
  _fit_texts(fig, suptitle=suptitle)
  _save(fig, out_png)
  return plotted


def plot_bars(values: Mapping[str, float], out_png: str | os.PathLike, *,
              ylabel: str, title: str | None = None,
              errors: Mapping[str, float] | None = None) -> str:
  """A bar chart of `{label: value}` (e.g. pass@1 per strategy).

  Args:
    values: bar heights, in display order.
    out_png: output file (written atomically).
    ylabel: what the bars measure (required: a bar chart without it is unreadable).
    title: figure title (wrapped if longer than the figure is wide).
    errors: optional `{label: half-width}` error bars.

  Returns:
    `out_png`.
  """
  if not values:
    raise ValueError("values is empty: nothing to plot")
  if not isinstance(ylabel, str) or not ylabel.strip():
    raise ValueError(f"ylabel must be a non-empty str naming what the bars measure, got {ylabel!r}")
  labels = list(values)
  heights = [float(values[k]) for k in labels]
  yerr = [float(errors.get(k, 0.0)) for k in labels] if errors else None
  fig = _figure(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.5))
  ax = fig.subplots()
  bars = ax.bar(range(len(labels)), heights, yerr=yerr, capsize=3)
  ax.bar_label(bars, fmt="%.3g", fontsize=8)
  ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0,
                ha="right" if len(labels) > 4 else "center")
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  _fit_texts(fig)
  return _save(fig, out_png)
