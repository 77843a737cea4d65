"""TFDS builders (array_record, no TensorFlow): round trips, atomic builds, reuse."""
import json
import os
import sys

import pytest

from rlhf_jax import data
from rlhf_jax.data import builders
from rlhf_jax.data.datasets import instruction_records, minicode_records
from rlhf_jax.tasks import instructions, minicode

MC_SIZES = {"train": {1: 5, 2: 10, 3: 10}, "validation": {2: 4}, "test": {3: 4}}


@pytest.fixture(scope="module")
def mc_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def mc_builder(mc_dir):
  return data.build_minicode(mc_dir, seed=0, sizes=MC_SIZES)


def test_no_tensorflow_imported(mc_builder):
  assert "tensorflow" not in sys.modules


def test_minicode_round_trip(mc_builder):
  for split, sizes in MC_SIZES.items():
    src = data.load_split(mc_builder, split)
    expected = minicode_records(split, sizes, seed=0)
    assert len(src) == len(expected) == sum(sizes.values())
    got = [src[i] for i in range(len(src))]
    assert got == expected  # same order (no shuffling on write), str fields decoded
    assert all(isinstance(r["prompt"], str) and isinstance(r["difficulty"], int) for r in got)
    params = json.loads(got[0]["parameters"])
    problem = minicode.make_problem(got[0]["template"], params)
    assert problem.prompt == got[0]["prompt"]


def test_load_split_from_directory_and_errors(mc_builder):
  src = data.load_split(mc_builder.data_dir, "test")
  assert src[0] == data.load_split(mc_builder, "test")[0]
  assert src[-1] == src[len(src) - 1]
  with pytest.raises(IndexError):
    src[len(src)]
  with pytest.raises(ValueError, match="split 'dev'"):
    data.load_split(mc_builder, "dev")
  with pytest.raises(ValueError, match="dataset_info.json"):
    data.load_split(os.path.dirname(mc_builder.data_dir), "train")


def test_rebuild_is_reused(mc_dir, mc_builder, monkeypatch):
  info = os.path.join(mc_builder.data_dir, "dataset_info.json")
  mtime = os.path.getmtime(info)

  def boom(*a, **k):
    raise AssertionError("generator called on a finished dataset")

  monkeypatch.setattr(data.datasets, "minicode_records", boom)
  again = data.build_minicode(mc_dir, seed=0, sizes=MC_SIZES)
  assert again.data_dir == mc_builder.data_dir
  assert os.path.getmtime(info) == mtime
  # Other parameters are another dataset (another config directory).
  monkeypatch.undo()
  # Other parameters are another dataset (another config directory).
  other = data.build_minicode(mc_dir, seed=1, sizes={"test": {2: 3}})
  assert other.data_dir != mc_builder.data_dir
  assert len(data.load_split(other, "test")) == 3
  assert not [d for d in os.listdir(mc_dir) if d.startswith(".building")]


def test_interrupted_build_leaves_nothing(tmp_path):
  def gen():
    yield {"prompt": "p", "chosen": "a", "rejected": "b", "metadata": "{}"}
    raise KeyboardInterrupt  # the build is killed half-way

  with pytest.raises(KeyboardInterrupt):
    data.build_preference_pairs(tmp_path, {"train": gen()}, name="pairs_v1")
  assert not os.path.exists(tmp_path / "rlhf_preference_pairs" / "pairs_v1" / "1.0.0")
  assert not [d for d in os.listdir(tmp_path) if d.startswith(".building")]
  # A later complete build of the same name succeeds.
  pairs = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad",
            "metadata": {"margin": i}} for i in range(7)]
  b = data.build_preference_pairs(tmp_path, {"train": pairs, "test": pairs[:2]}, name="pairs_v1")
  src = data.load_split(b, "train")
  assert [src[i] for i in range(7)] == [
      {**p, "metadata": json.dumps(p["metadata"], sort_keys=True)} for p in pairs]
  assert len(data.load_split(b, "test")) == 2


def test_preference_pairs_validation(tmp_path):
  with pytest.raises(ValueError, match="name"):
    data.build_preference_pairs(tmp_path, {"train": []}, name="bad name")
  with pytest.raises(ValueError, match="'chosen'"):
    data.build_preference_pairs(tmp_path, {"train": [{"prompt": "p", "rejected": "r"}]},
                                name="broken")


def test_instructions_and_synthetic_round_trip(tmp_path):
  b = data.build_instructions(tmp_path, seed=0, sizes={"train": 20, "test": 5})
  src = data.load_split(b, "train")
  assert [src[i] for i in range(20)] == instruction_records("train", 20, seed=0, max_constraints=3)
  row = src[3]
  assert instructions.prompt_sources(row)  # constraints JSON decodes back to sources
  s = data.build_synthetic_text(tmp_path, seed=0, sizes={"train": 30, "test": 6},
                                tasks=("reverse", "upper"))
  train = data.load_split(s, "train")
  assert [train[i] for i in range(30)] == data.generate_synthetic(
      "train", 30, seed=0, tasks=("reverse", "upper"))
  for i in range(30):
    word = train[i]["prompt"].split(": ", 1)[1].rstrip("\n")
    assert train[i]["response"] == data.SYNTHETIC_TASKS[train[i]["task"]](word)


def test_synthetic_splits_disjoint_and_deterministic():
  tr = data.generate_synthetic("train", 200, seed=0)
  te = data.generate_synthetic("test", 50, seed=0)
  assert tr == data.generate_synthetic("train", 200, seed=0)
  assert not {r["prompt"] for r in tr} & {r["prompt"] for r in te}
  assert tr[0] == {"prompt": tr[0]["prompt"], "response": tr[0]["prompt"][9:-1][::-1],
                   "task": "reverse"}
  with pytest.raises(ValueError, match="tasks"):
    data.generate_synthetic("train", 1, tasks=("nope",))


def test_build_dataset_argument_checks(tmp_path):
  with pytest.raises(ValueError, match="builder_cls"):
    builders.build_dataset(dict, tmp_path, builders.GeneratedConfig(name="x"))
  with pytest.raises(ValueError, match="unknown splits"):
    data.build_minicode(tmp_path, sizes={"dev": {1: 1}})
