"""The project's datasets: one ``build_*`` function each.

Every function builds (or reuses) an array_record TFDS dataset under
``data_dir`` atomically and returns the prepared builder; read it with
``rlhf_jax.data.load_split(builder, split)``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import tensorflow_datasets as tfds

from rlhf_jax.data import synthetic
from rlhf_jax.data.builders import (GeneratedConfig, RlhfInstructions, RlhfMinicode,
                                    RlhfPreferencePairs, RlhfSyntheticText, build_dataset,
                                    config_name_for)

__all__ = ["DEFAULT_MINICODE_SIZES", "build_minicode", "build_instructions",
           "build_preference_pairs", "build_synthetic_text", "minicode_records",
           "instruction_records"]

DEFAULT_MINICODE_SIZES: dict[str, dict[int, int]] = {
    "train": {1: 150, 2: 2000, 3: 2000},
    "validation": {1: 20, 2: 150, 3: 150},
    "test": {1: 20, 2: 150, 3: 150},
}


def minicode_records(split: str, sizes: Mapping[int, int], *, seed: int) -> list[dict]:
  """MiniCode problems of one split as flat records (parameters as JSON)."""
  from rlhf_jax.tasks import minicode
  out = []
  for p in minicode.generate_problems(split, dict(sizes), seed=seed):
    r = p.to_dict()
    r["parameters"] = json.dumps(r["parameters"], sort_keys=True)
    out.append(r)
  return out


def _sizes_spec(sizes: Mapping[str, Mapping[int, int]]) -> dict:
  return {s: {str(d): int(n) for d, n in v.items()} for s, v in sizes.items()}


def build_minicode(data_dir: str | os.PathLike, *, seed: int = 0,
                   sizes: Mapping[str, Mapping[int, int]] | None = None
                   ) -> tfds.core.DatasetBuilder:
  """MiniCode with splits train/validation/test.

  Args:
    data_dir: dataset root directory.
    seed: generation seed.
    sizes: split -> {difficulty: number of problems}; default
      ``DEFAULT_MINICODE_SIZES``.

  Returns:
    The prepared builder (config name = hash of seed and sizes).
  """
  sizes = dict(sizes if sizes is not None else DEFAULT_MINICODE_SIZES)
  bad = set(sizes) - {"train", "validation", "test"}
  if bad:
    raise ValueError(f"sizes has unknown splits {sorted(bad)}")
  spec = {"seed": seed, "sizes": _sizes_spec(sizes)}
  config = GeneratedConfig(
      name=config_name_for("minicode", spec), spec=json.dumps(spec, sort_keys=True),
      split_generators={s: (lambda s=s: minicode_records(s, sizes[s], seed=seed))
                        for s in sizes})
  return build_dataset(RlhfMinicode, data_dir, config)


def instruction_records(split: str, num_prompts: int, *, seed: int,
                        max_constraints: int) -> list[dict]:
  """Instruction prompts of one split as flat records (constraints as JSON)."""
  from rlhf_jax.tasks import instructions
  out = []
  for p in instructions.generate_prompts(split, num_prompts, seed=seed,
                                         max_constraints=max_constraints):
    out.append({**p, "constraints": json.dumps(p["constraints"], sort_keys=True)})
  return out


def build_instructions(data_dir: str | os.PathLike, *, seed: int = 0,
                       sizes: Mapping[str, int] | None = None,
                       max_constraints: int = 3) -> tfds.core.DatasetBuilder:
  """Instruction-following prompts with splits train/test.

  Args:
    data_dir: dataset root directory.
    seed: generation seed.
    sizes: split -> number of prompts; default ``{"train": 2000, "test": 200}``.
    max_constraints: most constraints per prompt.
  """
  sizes = dict(sizes if sizes is not None else {"train": 2000, "test": 200})
  bad = set(sizes) - {"train", "test"}
  if bad:
    raise ValueError(f"sizes has unknown splits {sorted(bad)}")
  spec = {"seed": seed, "sizes": sizes, "max_constraints": max_constraints}
  config = GeneratedConfig(
      name=config_name_for("instructions", spec), spec=json.dumps(spec, sort_keys=True),
      split_generators={s: (lambda s=s: instruction_records(
          s, sizes[s], seed=seed, max_constraints=max_constraints)) for s in sizes})
  return build_dataset(RlhfInstructions, data_dir, config)


def _pair_records(pairs: Iterable[Mapping[str, Any]]):
  for i, pair in enumerate(pairs):
    for key in ("prompt", "chosen", "rejected"):
      if not isinstance(pair.get(key), str):
        raise ValueError(f"pair {i} needs a str {key!r}, got {type(pair.get(key)).__name__}")
    metadata = pair.get("metadata", {})
    if not isinstance(metadata, str):
      metadata = json.dumps(metadata, sort_keys=True)
    yield {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"],
           "metadata": metadata}


def build_preference_pairs(data_dir: str | os.PathLike, pairs: Mapping[str, Iterable[Mapping[str, Any]]],
                           *, name: str) -> tfds.core.DatasetBuilder:
  """Preference pairs (prompt, chosen, rejected, metadata) for RM and DPO.

  Args:
    data_dir: dataset root directory.
    pairs: split -> iterable of dicts with str ``prompt``, ``chosen``,
      ``rejected`` and optional ``metadata`` (dict, stored as JSON, or a
      JSON string). Iterated once, only if the dataset is not built yet.
    name: identifies this set of pairs (e.g. "autoif_round1"); a dataset of
      that name already under ``data_dir`` is reused as is.
  """
  if not name or not all(c.isalnum() or c in "_-." for c in name):
    raise ValueError(f"name must be non-empty and use [A-Za-z0-9_.-], got {name!r}")
  if not pairs:
    raise ValueError("pairs must have at least one split")
  config = GeneratedConfig(
      name=name, spec=json.dumps({"name": name}),
      split_generators={s: (lambda it=it: _pair_records(it)) for s, it in pairs.items()})
  return build_dataset(RlhfPreferencePairs, data_dir, config)


def build_synthetic_text(data_dir: str | os.PathLike, *, seed: int = 0,
                         sizes: Mapping[str, int] | None = None,
                         tasks: tuple[str, ...] = ("reverse",), max_len: int = 8) -> tfds.core.DatasetBuilder:
  """The synthetic string-transform task (``rlhf_jax.data.synthetic``), train/test; words of 3..max_len letters."""
  sizes = dict(sizes if sizes is not None else {"train": 2000, "test": 200})
  spec = {"seed": seed, "sizes": sizes, "tasks": list(tasks)}
  if max_len != 8:  # the default keeps the names of datasets built before this option existed
    spec["max_len"] = int(max_len)
  config = GeneratedConfig(
      name=config_name_for("synthetic", spec), spec=json.dumps(spec, sort_keys=True),
      split_generators={s: (lambda s=s: synthetic.generate_synthetic(
          s, sizes[s], seed=seed, tasks=tuple(tasks), max_len=max_len)) for s in sizes})
  return build_dataset(RlhfSyntheticText, data_dir, config)
