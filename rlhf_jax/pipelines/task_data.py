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


class _Subset(Sequence):
  def __init__(self, source: Sequence, indices: Sequence[int]):
    self._source, self._indices = source, list(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[self._indices[i]]


def minicode_split(config, workdir: str, split: str) -> Sequence[Mapping[str, Any]]:
  """MiniCode problems (HumanEval format dicts) of `split` at `task.difficulties`.

  Problems whose BOS + prompt or canonical completion + EOS do not fit in
  `task.max_prompt_len` / `task.max_response_len` (byte tokens) are skipped,
  not truncated: a cut prompt loses its signature, a cut solution is wrong.
  """
  src = data.load_split(minicode_builder(config, workdir), split)
  levels = set(config.task.difficulties)
  keep = [i for i in range(len(src))
          if src[i]["difficulty"] in levels
          and len(src[i]["prompt"].encode()) + 1 <= config.task.max_prompt_len
          and len(src[i]["canonical_solution"].encode()) + 1 <= config.task.max_response_len]
  if not keep:
    raise ValueError(f"no MiniCode {split} problem fits task.difficulties={tuple(levels)}, "
                     f"max_prompt_len={config.task.max_prompt_len}, max_response_len={config.task.max_response_len}")
  return _Subset(src, keep)


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
