"""grain loader over built datasets: batching, per-epoch shuffles, exact resumption, shards."""
import numpy as np
import pytest

from rlhf_jax import data


class _Source:
  """A plain random-access source (the loader needs only len and getitem)."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"index": int(i), "text": f"record {i}"}


def _indices(loader):
  return [list(b["index"]) for b in loader]


def test_batches_cover_each_epoch_once():
  loader = data.make_grain_loader(_Source(10), batch_size=3, seed=0, num_epochs=2,
                                  drop_remainder=False)
  batches = list(loader)
  assert len(loader) == len(batches) == 7  # 20 records in batches of 3
  assert isinstance(batches[0]["index"], np.ndarray) and batches[0]["text"][0].startswith("record")
  flat = [i for b in batches for i in b["index"]]
  first, second = flat[:10], flat[10:]
  assert sorted(first) == sorted(second) == list(range(10))
  assert first != second  # a new permutation each epoch
  assert first != list(range(10))


def test_drop_remainder_and_no_shuffle():
  loader = data.make_grain_loader(_Source(10), batch_size=4, shuffle=False, num_epochs=1)
  assert _indices(loader) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_seeded_and_resumable():
  def run(**kw):
    return _indices(data.make_grain_loader(_Source(50), batch_size=4, num_epochs=3, **kw))

  full = run(seed=7)
  assert full == run(seed=7)
  assert full != run(seed=8)
  # Stop after 5 batches, checkpoint the position, resume in a fresh loader.
  loader = data.make_grain_loader(_Source(50), batch_size=4, seed=7, num_epochs=3)
  it = iter(loader)
  head = [list(next(it)["index"]) for _ in range(5)]
  state = loader.state()
  assert state == {"position": 5}
  resumed = data.make_grain_loader(_Source(50), batch_size=4, seed=7, num_epochs=3,
                                   start_index=state["position"])
  assert head + _indices(resumed) == full


def test_infinite_repeat():
  loader = data.make_grain_loader(_Source(5), batch_size=2, seed=0, num_epochs=None)
  it = iter(loader)
  batches = [next(it) for _ in range(12)]
  assert loader.position == 12
  with pytest.raises(TypeError):
    len(loader)
  flat = [i for b in batches for i in b["index"]]
  assert sorted(flat[:20]) == sorted(list(range(5)) * 4)
  far = data.make_grain_loader(_Source(5), batch_size=2, seed=0, num_epochs=None,
                               start_index=10**9)
  assert len(next(iter(far))["index"]) == 2


def test_shards_are_disjoint_and_complete():
  shards = [[i for b in data.make_grain_loader(_Source(12), batch_size=2, seed=3,
                                                 shard_index=k, shard_count=3) for i in b["index"]]
            for k in range(3)]
  assert sorted(sum(shards, [])) == list(range(12))


def test_argument_checks():
  with pytest.raises(ValueError, match="batch_size"):
    data.make_grain_loader(_Source(4), batch_size=0)
  with pytest.raises(ValueError, match="num_epochs"):
    data.make_grain_loader(_Source(4), batch_size=1, num_epochs=0)
  with pytest.raises(ValueError, match="start_index"):
    data.make_grain_loader(_Source(4), batch_size=2, start_index=3)
  with pytest.raises(ValueError, match="shard_index"):
    data.make_grain_loader(_Source(4), batch_size=2, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="empty"):
    data.make_grain_loader(_Source(0), batch_size=2)


def test_loader_over_built_dataset(tmp_path):
  b = data.build_synthetic_text(tmp_path, seed=0, sizes={"train": 40, "test": 4})
  src = data.load_split(b, "train")
  loader = data.make_grain_loader(src, batch_size=8, seed=1, num_epochs=1)
  batches = list(loader)
  assert len(batches) == 5
  prompts = [p for batch in batches for p in batch["prompt"]]
  assert sorted(prompts) == sorted(src[i]["prompt"] for i in range(40))
  assert all(isinstance(p, str) for p in prompts)
  resumed = data.make_grain_loader(src, batch_size=8, seed=1, num_epochs=1, start_index=3)
  assert [b["prompt"] for b in resumed] == [b["prompt"] for b in batches[3:]]
