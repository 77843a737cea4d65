"""TFDS datasets built from Python generators, without TensorFlow.

Every dataset here is a ``tfds.core.GeneratorBasedBuilder`` written as
``array_record`` files (random access; ``tfds.data_source`` reads them) with
shuffling on write disabled, so record ``i`` is the ``i``-th generated example.
(Parquet silently drops rows in tfds 4.9.10 and tfrecord needs TensorFlow;
see ENVIRONMENT.md.)

Builds are atomic: a dataset is prepared under a temporary directory inside
``data_dir`` and its version directory is renamed into place only when
complete. An interrupted build leaves nothing at the final path (and is simply
redone); a finished one is reused without calling the generator again.

The config of a builder identifies the dataset: generated datasets (MiniCode,
instructions, synthetic text) get a config name that is a hash of their
generating parameters; datasets built from arbitrary iterables (preference
pairs) are named by the caller.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

__all__ = [
    "GeneratedConfig", "GeneratedDatasetBuilder", "RlhfMinicode", "RlhfInstructions",
    "RlhfPreferencePairs", "RlhfSyntheticText", "build_dataset", "config_name_for",
]

_VERSION = "1.0.0"
# Feature kinds: "text" (str, stored UTF-8), "int64", "float32".
_FEATURE = {"text": tfds.features.Text, "int64": lambda: tfds.features.Scalar(np.int64),
            "float32": lambda: tfds.features.Scalar(np.float32)}


@dataclasses.dataclass(eq=False)
class GeneratedConfig(tfds.core.BuilderConfig):
  """Builder config carrying the generators of each split.

  Attributes:
    split_generators: split name -> zero-argument callable returning an
      iterable of example dicts (one key per feature). Only called when the
      dataset is (re)built.
    spec: JSON string of the generating parameters (kept in the description).
  """
  split_generators: Mapping[str, Callable[[], Iterable[Mapping[str, Any]]]] | None = dataclasses.field(
      default=None, repr=False)
  spec: str = "{}"


class GeneratedDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: subclasses only set ``FEATURES`` (name -> kind)."""

  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "First release."}
  FEATURES: Mapping[str, str] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict(
        {name: _FEATURE[kind]() for name, kind in self.FEATURES.items()})
    spec = getattr(self.builder_config, "spec", "{}") if self.builder_config else "{}"
    return tfds.core.DatasetInfo(
        builder=self, description=f"{type(self).__doc__}\nspec: {spec}",
        features=features, disable_shuffling=True)

  # tfds prints "Downloading and preparing dataset ..." and "... downloaded and
  # prepared" on stdout; nothing is downloaded here (examples are generated), so
  # the build is only logged, saying what it does.
  def _log_download_bytes(self) -> None:
    logging.info("generating dataset %s/%s locally (nothing is downloaded)", self.name,
                 self.builder_config.name if self.builder_config else "")

  def _log_download_done(self) -> None:
    logging.info("generated dataset %s in %s", self.name, self.data_dir)

  def _split_generators(self, dl_manager):
    del dl_manager
    gens = self.builder_config.split_generators
    if not gens:
      raise ValueError(f"{self.name}/{self.builder_config.name} is not built yet and its "
                       "config has no split_generators to build it from")
    return {split: self._generate_examples(split) for split in gens}

  def _generate_examples(self, split: str):
    for i, example in enumerate(self.builder_config.split_generators[split]()):
      missing = set(self.FEATURES) - set(example)
      if missing:
        raise ValueError(f"{self.name} split {split!r} example {i} is missing {sorted(missing)}")
      yield i, {name: example[name] for name in self.FEATURES}


class RlhfMinicode(GeneratedDatasetBuilder):
  """MiniCode problems (rlhf_jax.tasks.minicode), HumanEval format."""
  FEATURES = {"task_id": "text", "prompt": "text", "entry_point": "text",
              "canonical_solution": "text", "test": "text", "template": "text",
              "parameters": "text", "difficulty": "int64", "split": "text"}


class RlhfInstructions(GeneratedDatasetBuilder):
  """Instruction-following prompts with verifiable constraints (rlhf_jax.tasks.instructions)."""
  FEATURES = {"key": "text", "prompt": "text", "query": "text", "constraints": "text",
              "split": "text"}


class RlhfPreferencePairs(GeneratedDatasetBuilder):
  """Preference pairs (prompt, chosen, rejected, metadata JSON) for reward modelling and DPO."""
  FEATURES = {"prompt": "text", "chosen": "text", "rejected": "text", "metadata": "text"}


class RlhfSyntheticText(GeneratedDatasetBuilder):
  """Synthetic string-transformation prompt/response pairs for SFT smoke tests."""
  FEATURES = {"prompt": "text", "response": "text", "task": "text"}


def config_name_for(prefix: str, spec: Mapping[str, Any]) -> str:
  """A config name that identifies the generating parameters: ``prefix_<hash>``."""
  digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
  return f"{prefix}_{digest}"


def build_dataset(builder_cls: type[GeneratedDatasetBuilder], data_dir: str | os.PathLike,
                  config: GeneratedConfig) -> tfds.core.DatasetBuilder:
  """Builds (or reuses) a dataset atomically and returns its builder.

  Args:
    builder_cls: a ``GeneratedDatasetBuilder`` subclass.
    data_dir: root directory; the dataset lands in
      ``data_dir/<name>/<config.name>/<version>``.
    config: its ``split_generators`` are called only if the dataset is not
      there yet.

  Returns:
    A builder whose data is prepared (``builder.as_data_source(split)``).
  """
  if not (isinstance(builder_cls, type) and issubclass(builder_cls, GeneratedDatasetBuilder)):
    raise ValueError(f"builder_cls must subclass GeneratedDatasetBuilder, got {builder_cls!r}")
  if not isinstance(config, GeneratedConfig):
    raise ValueError(f"config must be a GeneratedConfig, got {type(config).__name__}")
  data_dir = os.fspath(data_dir)
  rel = os.path.join(builder_cls.name, config.name, _VERSION)
  final = os.path.join(data_dir, rel)
  if not os.path.exists(os.path.join(final, "dataset_info.json")):
    os.makedirs(data_dir, exist_ok=True)
    tmp_root = os.path.join(data_dir, f".building-{builder_cls.name}-{config.name}-{uuid.uuid4().hex[:8]}")
    try:
      tmp_builder = builder_cls(data_dir=tmp_root, config=config, file_format="array_record")
      tmp_builder.download_and_prepare()  # nothing is downloaded: generators only
      os.makedirs(os.path.dirname(final), exist_ok=True)
      try:
        os.rename(os.path.join(tmp_root, rel), final)
      except OSError:
        # Another process finished the same dataset first: keep theirs.
        if not os.path.exists(os.path.join(final, "dataset_info.json")):
          raise
    finally:
      shutil.rmtree(tmp_root, ignore_errors=True)
  return builder_cls(data_dir=data_dir, config=config, file_format="array_record")
