"""Metrics files, plots, progress bar, timers."""
import glob
import io
import json
import math
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import utils
from rlhf_jax.utils import metrics as metrics_lib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(workdir, steps=20):
  with utils.MetricsWriter(workdir) as w:
    for s in range(steps):
      w.write(s, {"train/loss": 3.0 / (s + 1), "train/lr": jnp.float32(1e-3),
                  "eval/loss": np.float64(2.0 - 0.01 * s), "count": s})
  return os.path.join(workdir, "metrics.jsonl")


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
  path = _write_run(tmp_path, steps=5)
  lines = open(path).read().splitlines()
  assert len(lines) == 5
  first = json.loads(lines[0])
  assert first == {"step": 0, "train/loss": 3.0, "train/lr": pytest.approx(1e-3),
                   "eval/loss": 2.0, "count": 0.0}
  assert [json.loads(l)["step"] for l in lines] == list(range(5))
  events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 0
  # The scalars are in the event file (the tag strings are stored verbatim).
  blob = open(events[0], "rb").read()
  assert b"train/loss" in blob and b"eval/loss" in blob


def test_metrics_writer_flushes_each_write_and_appends(tmp_path):
  w = utils.MetricsWriter(tmp_path, tensorboard=False)
  w.write(1, {"a": 1.0})
  # Visible before close: a crashed run keeps its metrics.
  assert utils.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "a": 1.0}]
  w.close()
  with utils.MetricsWriter(tmp_path, tensorboard=False) as w2:  # resumed run
    w2.write(2, {"a": float("nan")})
  rows = utils.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2] and math.isnan(rows[1]["a"])
  assert not os.path.exists(tmp_path / "tb")


def test_metrics_writer_rejects_non_scalars_and_disabled_is_noop(tmp_path):
  with utils.MetricsWriter(tmp_path, tensorboard=False) as w:
    with pytest.raises(ValueError, match="'x' must be a real scalar"):
      w.write(0, {"x": np.ones(3)})
    with pytest.raises(ValueError, match="reserved"):
      w.write(0, {"step": 1})
  with utils.MetricsWriter(tmp_path / "off", enabled=False) as w:
    w.write(0, {"a": 1.0})
  assert not os.path.exists(tmp_path / "off")


def test_read_metrics_skips_torn_last_line(tmp_path):
  p = tmp_path / "m.jsonl"
  p.write_text('{"step": 0, "a": 1}\n{"step": 1, "a"')
  assert utils.read_metrics(p) == [{"step": 0, "a": 1}]


def test_plot_metrics_makes_png_and_skips_missing_keys(tmp_path):
  path = _write_run(tmp_path)
  out = tmp_path / "plots" / "train.png"
  plotted = utils.plot_metrics(
      path, {"loss": ["train/loss", "eval/loss"], "lr": ["train/lr"],
             "missing": ["nope"]}, out, title="run")
  assert plotted == ["train/loss", "eval/loss", "train/lr"]
  data = out.read_bytes()
  assert data.startswith(PNG_MAGIC) and len(data) > 5000
  # List forms and a file with none of the keys.
  assert utils.plot_metrics(path, ["train/loss", ["eval/loss", "count"]],
                            tmp_path / "b.png") == ["train/loss", "eval/loss", "count"]
  assert utils.plot_metrics(path, ["absent"], tmp_path / "c.png") == []
  assert (tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)
  assert not glob.glob(str(tmp_path / "**" / "*.tmp*"), recursive=True)


def test_plot_bars(tmp_path):
  out = utils.plot_bars({"none": 0.31, "best_of_n": 0.35, "best_random": 0.38},
                        tmp_path / "bars.png", title="pass@1", ylabel="pass@1",
                        errors={"none": 0.02})
  assert open(out, "rb").read().startswith(PNG_MAGIC)
  with pytest.raises(ValueError, match="empty"):
    utils.plot_bars({}, tmp_path / "x.png", ylabel="pass@1")
  with pytest.raises(TypeError, match="ylabel"):
    utils.plot_bars({"a": 1.0}, tmp_path / "x.png")  # pylint: disable=missing-kwoa
  with pytest.raises(ValueError, match="ylabel"):
    utils.plot_bars({"a": 1.0}, tmp_path / "x.png", ylabel=" ")


@pytest.fixture
def saved_figures(monkeypatch):
  """The Figure objects the plotting functions save (they return only paths)."""
  from rlhf_jax.utils import plotting
  figures = []
  real_save = plotting._save

  def save(fig, out_png):
    figures.append(fig)
    return real_save(fig, out_png)

  monkeypatch.setattr(plotting, "_save", save)
  return figures


def _texts_inside(fig):
  """Every non-empty title / axis label of `fig` lies inside the figure (after layout)."""
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  texts = [fig.get_suptitle() and fig._suptitle]  # pylint: disable=protected-access
  for ax in fig.axes:
    if ax.axison:
      texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
  outside = []
  for t in texts:
    if t and t.get_text():
      box = t.get_window_extent(renderer)
      if box.x0 < -1 or box.y0 < -1 or box.x1 > fig.bbox.width + 1 or box.y1 > fig.bbox.height + 1:
        outside.append((t.get_text(), tuple(round(v) for v in box.extents)))
  return outside


def test_plots_label_every_y_axis_and_keep_titles_inside(tmp_path, saved_figures):
  path = _write_run(tmp_path)
  utils.plot_metrics(path, {"loss (nats per token, lower is better)": ["train/loss", "eval/loss"],
                            "learning rate": ["train/lr"]}, tmp_path / "a.png",
                     title="a run title long enough to overflow a two-panel figure: " * 3)
  utils.plot_metrics(path, ["train/loss", ["eval/loss", "count"]], tmp_path / "b.png", ncols=1)
  # The title of the PF-PPO stage's r2.png, which used to be cut off.
  utils.plot_bars({"best_of_n": 0.1, "none": 0.05},
                  tmp_path / "r2.png", ylabel="R²",
                  title="binned R² of reward vs grade, per strategy (first rollout)")
  a, b, bars = saved_figures
  assert [ax.get_ylabel() for ax in a.axes if ax.axison] == [
      "loss (nats per token, lower is better)", "learning rate"]
  assert [ax.get_ylabel() for ax in b.axes if ax.axison] == ["train/loss", "eval/loss, count"]
  assert bars.axes[0].get_ylabel() == "R²"
  for fig in (a, b, bars):
    assert _texts_inside(fig) == []
  # Wrapping keeps every word of a long title.
  assert a.get_suptitle().split() == ("a run title long enough to overflow a two-panel figure: " * 3).split()


def test_progress_shows_step_loss_rate():
  stream = io.StringIO()
  with utils.Progress(total=10, desc="sft", file=stream, mininterval=0,
                      enabled=True) as bar:
    for s in range(1, 11):
      time.sleep(0.002)
      bar.update(s, loss=jnp.float32(2.5 - 0.1 * s), tokens=1000, kl=0.01)
    assert bar.tokens == 10_000 and bar.tokens_per_second > 0
  text = stream.getvalue()
  assert "sft" in text and "10/10" in text
  assert "loss=1.5000" in text and "tok/s=" in text and "kl=0.0100" in text


def test_progress_resumed_and_quiet():
  stream = io.StringIO()
  with utils.Progress(total=10, initial=4, file=stream, mininterval=0,
                      enabled=True) as bar:
    bar.update(6, loss=1.0)
  assert "6/10" in stream.getvalue()
  quiet = io.StringIO()
  with utils.Progress(total=10, file=quiet, quiet=True) as bar:
    bar.update(5, loss=1.0)
    bar.write("hidden")
  assert quiet.getvalue() == ""


def test_timers_split_time_between_phases():
  timers = utils.Timers()
  for _ in range(2):
    with timers("rollout"):
      time.sleep(0.03)
    with timers("update"):
      time.sleep(0.01)
  timers.add("sandbox", 0.0)
  s = timers.summary()
  assert s["time/rollout"] >= 0.06 and s["time/update"] >= 0.02
  assert s["time/rollout"] > s["time/update"]
  np.testing.assert_allclose(
      s["time/rollout_frac"] + s["time/update_frac"] + s["time/sandbox_frac"], 1.0)
  assert timers.counts == {"rollout": 2, "update": 2, "sandbox": 1}
  assert "rollout" in str(timers)
  assert timers.summary(reset=True) and timers.summary() == {}
  with pytest.raises(ValueError):
    timers.add("x", -1.0)
  # An exception inside the phase still records the time.
  with pytest.raises(RuntimeError):
    with timers("boom"):
      raise RuntimeError
  assert "time/boom" in timers.summary()


def test_is_main_process_single_host():
  assert metrics_lib.is_main_process()


def test_dataset_build_prints_no_download_message(tmp_path, capfd):
  # Datasets are generated locally: tfds's "Downloading and preparing dataset"
  # banner (printed on stdout) would say otherwise.
  from rlhf_jax.data import builders
  config = builders.GeneratedConfig(
      name="generated_locally",
      split_generators={"train": lambda: ({"prompt": str(i), "response": "r", "task": "t"} for i in range(3))})
  builder = builders.build_dataset(builders.RlhfSyntheticText, tmp_path, config)
  assert len(builder.as_data_source("train")) == 3
  out, err = capfd.readouterr()
  assert "ownload" not in out + err, out + err
