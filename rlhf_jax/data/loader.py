"""Reading built datasets: decoded random-access sources and grain loaders.

``load_split`` wraps ``tfds`` ``as_data_source`` (random access over the
array_record files, no TensorFlow) so records come back as dicts of Python
``str``/``int``/``float``. ``make_grain_loader`` puts a grain ``MapDataset``
on top: optional host sharding, a seeded shuffle that changes every epoch,
repetition and batching. Because a ``MapDataset`` is random access, the loader
position (number of batches already produced) is the whole data state: save
``loader.position`` with a checkpoint and pass it back as ``start_index`` to
resume exactly where the run stopped.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

__all__ = ["DecodedSource", "load_split", "GrainLoader", "make_grain_loader", "collate"]


def _decode(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value[()]
  if isinstance(value, np.generic):
    return value.item()
  return value


class DecodedSource(Sequence):
  """Random-access view of a tfds data source with str fields decoded."""

  def __init__(self, source: Sequence[Mapping[str, Any]]):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    return {k: _decode(v) for k, v in self._source[int(index) % len(self)].items()}

  def __repr__(self) -> str:
    return f"DecodedSource({len(self)} records)"


def load_split(builder_or_dir: tfds.core.DatasetBuilder | str | os.PathLike,
               split: str) -> DecodedSource:
  """A random-access source of dict records of one split.

  Args:
    builder_or_dir: a prepared builder (as returned by the ``build_*``
      functions) or the dataset's version directory
      (``data_dir/<name>/<config>/<version>``).
    split: split name, e.g. "train".

  Returns:
    ``DecodedSource``: ``len(src)``, ``src[i] -> dict`` with text fields as
    ``str`` and scalars as Python numbers.
  """
  if isinstance(builder_or_dir, (str, os.PathLike)):
    path = os.fspath(builder_or_dir)
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
      raise ValueError(f"builder_or_dir {path!r} is not a built dataset version directory "
                       "(no dataset_info.json)")
    builder = tfds.builder_from_directory(path)
  elif isinstance(builder_or_dir, tfds.core.DatasetBuilder):
    builder = builder_or_dir
  else:
    raise ValueError(f"builder_or_dir must be a DatasetBuilder or a path, got "
                     f"{type(builder_or_dir).__name__}")
  splits = list(builder.info.splits.keys())
  if split not in splits:
    raise ValueError(f"split {split!r} not in dataset {builder.name}; available: {splits}")
  return DecodedSource(builder.as_data_source(split=split))


def collate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Batch of dict records -> dict of columns.

  Text columns stay Python lists of ``str`` (tokenisation happens later, on
  the host); numeric columns become numpy arrays.
  """
  out: dict[str, Any] = {}
  for key in records[0]:
    column = [r[key] for r in records]
    if all(isinstance(v, (bool, int, float, np.number)) for v in column):
      out[key] = np.asarray(column)
    else:
      out[key] = column
  return out


class GrainLoader:
  """Iterable over batches of a grain ``MapDataset`` with a resumable position.

  Attributes:
    position: index of the next batch to produce; checkpoint it and pass it
      as ``start_index`` to resume.
    dataset: the underlying batched ``grain.MapDataset`` (random access).
  """

  def __init__(self, dataset: grain.MapDataset, *, start_index: int = 0,
               num_batches: int | None = None):
    self.dataset = dataset
    self.position = int(start_index)
    self._num_batches = num_batches

  def __len__(self) -> int:
    if self._num_batches is None:
      raise TypeError("an infinitely repeating loader has no length")
    return self._num_batches

  def __iter__(self) -> Iterator[dict[str, Any]]:
    end = self._num_batches if self._num_batches is not None else sys.maxsize
    while self.position < end:
      batch = self.dataset[self.position]
      self.position += 1
      yield batch

  def state(self) -> dict[str, int]:
    """The checkpointable data state."""
    return {"position": self.position}


def make_grain_loader(source: Sequence[Mapping[str, Any]], *, batch_size: int,
                      seed: int = 0, shuffle: bool = True, num_epochs: int | None = 1,
                      start_index: int = 0, drop_remainder: bool = True,
                      shard_index: int = 0, shard_count: int = 1,
                      batch_fn: Callable[[Sequence[Any]], Any] = collate) -> GrainLoader:
  """A deterministic, resumable batch loader over a random-access source.

  Pipeline: ``source[shard_index::shard_count]`` -> shuffle(seed) (a new
  permutation each epoch) -> repeat(num_epochs) -> batch(batch_size). Batch
  ``i`` is a pure function of (source, arguments, i), which is what makes
  ``start_index`` resumption exact.

  Args:
    source: any ``Sequence`` of records, e.g. ``load_split(...)``.
    batch_size: records per batch (> 0).
    seed: shuffle seed (the same on every host, so shards stay disjoint).
    shuffle: whether to shuffle.
    num_epochs: passes over the data; None repeats forever.
    start_index: first batch to produce (a saved ``loader.position``).
    drop_remainder: drop a final partial batch (keeps shapes static).
    shard_index, shard_count: this host's shard (multi-host data loading).
    batch_fn: combines a list of records into a batch (default ``collate``).

  Returns:
    A ``GrainLoader``.
  """
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs <= 0):
    raise ValueError(f"num_epochs must be a positive int or None, got {num_epochs!r}")
  if not isinstance(shard_count, int) or shard_count <= 0 or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  if len(source) == 0:
    raise ValueError("source is empty")
  ds = grain.MapDataset.source(source)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
  num_batches = len(ds) if num_epochs is not None else None
  if not isinstance(start_index, int) or start_index < 0 or (
      num_batches is not None and start_index > num_batches):
    raise ValueError(f"start_index must be in [0, {num_batches}], got {start_index!r}")
  return GrainLoader(ds, start_index=start_index, num_batches=num_batches)
