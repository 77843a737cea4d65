"""The task a config names, as random-access sources of prompt/response records.

Datasets are built once through the TFDS builders of `rlhf_jax.data` into
`config.task.data_dir` (default `<workdir>/data`) and reused afterwards.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from rlhf_jax import data
from rlhf_jax.pipelines import common

TASKS = ("synthetic", "minicode")

# SFT reads "train" and an evaluation split; MiniCode evaluates on validation.
_EVAL_SPLIT = {"synthetic": "test", "minicode": "validation"}


class _Mapped(Sequence):
  """A lazy view of a source with each record mapped to prompt/response fields."""

  def __init__(self, source: Sequence[Mapping[str, Any]], fn):
    self._source, self._fn = source, fn

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    return self._fn(self._source[i])


def minicode_builder(config, workdir: str):
  return data.build_minicode(common.data_dir(config, workdir), seed=config.task.seed)


def minicode_split(config, workdir: str, split: str) -> Sequence[Mapping[str, Any]]:
  """MiniCode problems (HumanEval format dicts) of `split`."""
  return data.load_split(minicode_builder(config, workdir), split)


def sft_split(config, workdir: str, split: str) -> Sequence[Mapping[str, Any]]:
  """Records with "prompt" and "response" for SFT; `split` is "train" or "eval"."""
  name = config.task.name
  if name not in TASKS:
    raise ValueError(f"config.task.name={name!r} has no SFT data; known: {TASKS}")
  real_split = _EVAL_SPLIT[name] if split == "eval" else split
  if name == "synthetic":
    builder = data.build_synthetic_text(common.data_dir(config, workdir), seed=config.task.seed,
                                        sizes={"train": config.task.num_train, "test": config.task.num_eval})
    return data.load_split(builder, real_split)
  src = minicode_split(config, workdir, real_split)
  return _Mapped(src, lambda r: {"prompt": r["prompt"], "response": r["canonical_solution"]})
