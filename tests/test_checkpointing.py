"""Checkpointing: bitwise resume in a fresh process, resharding, bad input."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax import checkpointing
from rlhf_jax import state as state_lib

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)

# --- a toy MLP trained with adamw, dropout and a position-indexed data stream --
D_IN, D_HID, D_OUT, BATCH = 8, 16, 4, 8
K_STEPS = 6


def _init_params(key):
  k1, k2 = jax.random.split(key)
  return {
      "dense1": {"kernel": jax.random.normal(k1, (D_IN, D_HID)) * 0.3,
                 "bias": jnp.zeros((D_HID,))},
      "norm": {"scale": jnp.ones((D_HID,))},
      "dense2": {"kernel": jax.random.normal(k2, (D_HID, D_OUT)) * 0.3,
                 "bias": jnp.zeros((D_OUT,))},
  }


def _batch_at(position):
  """The data stream: batch `position` is a pure function of the position."""
  key = jax.random.fold_in(jax.random.PRNGKey(1234), position)
  kx, ky = jax.random.split(key)
  return (jax.random.normal(kx, (BATCH, D_IN)),
          jax.random.normal(ky, (BATCH, D_OUT)))


def _optimizer():
  return state_lib.make_optimizer(learning_rate=3e-2, warmup_steps=2,
                                  total_steps=K_STEPS, weight_decay=0.1)


def _loss(params, x, y, key):
  h = x @ params["dense1"]["kernel"] + params["dense1"]["bias"]
  h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
  h = jax.nn.relu(h * params["norm"]["scale"])
  keep = jax.random.bernoulli(key, 0.8, h.shape)  # dropout
  h = jnp.where(keep, h / 0.8, 0.0)
  out = h @ params["dense2"]["kernel"] + params["dense2"]["bias"]
  return jnp.mean((out - y) ** 2)


@jax.jit
def _train_step(state, x, y):
  key = jax.random.fold_in(state.rng, state.step)
  grads = jax.grad(_loss)(state.params, x, y, key)
  return state_lib.apply_gradients(state, grads, _optimizer())


def _initial_state():
  return state_lib.create_train_state(
      _init_params(jax.random.PRNGKey(0)), _optimizer(), jax.random.PRNGKey(7))


def _run(state, start, num):
  for pos in range(start, start + num):
    state = _train_step(state, *_batch_at(pos))
  return state


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(_leaves(a), _leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x, y), (x, y)


def resume_in_this_process(ckpt_dir, out_path):
  """Run in a fresh process: restore, finish the run, dump the leaves."""
  abstract = jax.eval_shape(_initial_state)
  abstract = checkpointing.abstract_like(
      abstract, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  with checkpointing.Checkpointer(ckpt_dir) as ckpt:
    state, meta = ckpt.restore(abstract)
  position = meta["data_position"]
  state = _run(state, position, K_STEPS - position)
  np.savez(out_path, *_leaves(state))


# --- tests --------------------------------------------------------------------
def test_resume_is_bitwise_identical_in_fresh_process(tmp_path):
  straight = _run(_initial_state(), 0, K_STEPS)

  half = _run(_initial_state(), 0, K_STEPS // 2)
  ckpt_dir = tmp_path / "ckpt"
  with checkpointing.Checkpointer(ckpt_dir, save_interval_steps=1) as ckpt:
    assert ckpt.save(int(half.step), half, meta={"data_position": K_STEPS // 2})
  out = tmp_path / "resumed.npz"
  code = ("import sys; sys.path.insert(0, %r); import test_checkpointing as t; "
          "t.resume_in_this_process(%r, %r)" % (TESTS_DIR, str(ckpt_dir), str(out)))
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = np.load(out)
  resumed = [resumed[f"arr_{i}"] for i in range(len(resumed.files))]
  expected = _leaves(straight)
  assert len(resumed) == len(expected)
  for x, y in zip(resumed, expected):
    assert x.dtype == y.dtype and np.array_equal(x, y)
  # step and rng are leaves too, but check them by name as the spec requires.
  assert int(straight.step) == K_STEPS
  names = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(straight)[0]]
  assert np.array_equal(resumed[names.index(".step")], np.int32(K_STEPS))
  assert np.array_equal(resumed[names.index(".rng")], np.asarray(straight.rng))


def test_roundtrip_keeps_types_meta_and_learning_rate(tmp_path):
  state = _run(_initial_state(), 0, 3)
  meta = {"data_position": 3, "config": {"a": [1, 2]}, "np": np.float32(0.5)}
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(3, state, meta=meta)
    ckpt.wait()
    assert ckpt.latest_step() == 3
    restored, got_meta = ckpt.restore(checkpointing.abstract_like(state))
    assert ckpt.restore_meta() == got_meta
  assert isinstance(restored, state_lib.TrainState)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  _assert_bitwise_equal(restored, state)
  assert got_meta == {"data_position": 3, "config": {"a": [1, 2]}, "np": 0.5}
  assert float(state_lib.current_learning_rate(restored.opt_state)) == float(
      state_lib.current_learning_rate(state.opt_state))


@pytest.mark.parametrize("mesh_shape", [(2,), (8,)])
def test_restore_into_sharded_layout(tmp_path, mesh_shape):
  state = _run(_initial_state(), 0, 2)
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(2, state, meta={})
  n = mesh_shape[0]
  mesh = Mesh(np.array(jax.devices()[:n]), ("data",))

  def spec(path, x):
    # Shard every array whose leading dim divides the mesh; replicate the rest.
    if x.ndim >= 1 and x.shape[0] % n == 0:
      return NamedSharding(mesh, P("data"))
    return NamedSharding(mesh, P())

  shardings = jax.tree_util.tree_map_with_path(spec, state)
  target = checkpointing.abstract_like(state, sharding=shardings)
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    restored, _ = ckpt.restore(target)
  _assert_bitwise_equal(restored, state)
  kernel = restored.params["dense2"]["kernel"]
  assert kernel.sharding == NamedSharding(mesh, P("data"))
  assert len(kernel.addressable_shards) == n
  assert kernel.addressable_shards[0].data.shape == (D_HID // n, D_OUT)
  # A sharded step continues from the restored state and matches the unsharded
  # step to float tolerance (reductions may be reordered across devices).
  step_sharded = _train_step(restored, *_batch_at(2))
  step_plain = _train_step(state, *_batch_at(2))
  for x, y in zip(_leaves(step_sharded), _leaves(step_plain)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_max_to_keep_and_interval(tmp_path):
  state = _initial_state()
  with checkpointing.Checkpointer(tmp_path / "c", max_to_keep=2,
                                  save_interval_steps=2) as ckpt:
    saved = [ckpt.save(s, state, meta={"s": s}) for s in range(1, 7)]
    assert ckpt.save(7, state, meta={}, force=True)
    assert not ckpt.save(7, state, meta={}, force=True)  # already there
    ckpt.wait()
    assert saved == [False, True, False, True, False, True]
    assert ckpt.all_steps() == [6, 7]
    assert ckpt.restore_meta(step=6) == {"s": 6}


def test_restore_from_empty_or_missing_dir_raises(tmp_path):
  target = checkpointing.abstract_like(_initial_state())
  for d in (tmp_path / "empty", tmp_path / "does" / "not" / "exist"):
    with checkpointing.Checkpointer(d) as ckpt:
      assert ckpt.latest_step() is None
      with pytest.raises(checkpointing.CheckpointError,
                         match="no checkpoint found in .*" + d.name):
        ckpt.restore(target)


def test_restore_unknown_step_raises(tmp_path):
  state = _initial_state()
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(1, state, meta={})
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"no checkpoint for step 5 .*available steps: \[1\]"):
      ckpt.restore(checkpointing.abstract_like(state), step=5)


def test_restore_with_mismatched_shapes_names_the_leaf(tmp_path):
  state = _initial_state()
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(0, state, meta={})
  other = state.replace(params={**state.params,
                                "dense2": {"kernel": jnp.zeros((D_HID, 5)),
                                           "bias": jnp.zeros((5,))}})
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    with pytest.raises(checkpointing.CheckpointError) as e:
      ckpt.restore(checkpointing.abstract_like(other))
  msg = str(e.value)
  assert "step 0" in msg and str(tmp_path / "c") in msg
  assert "params.dense2.kernel: shape (16, 4) saved, (16, 5) requested" in msg


def test_restore_with_mismatched_tree_names_the_leaf(tmp_path):
  state = _initial_state()
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(0, state, meta={})
  extra = dict(state.params, head={"kernel": jnp.zeros((2, 2))})
  other = state_lib.create_train_state(extra, _optimizer(), jax.random.PRNGKey(7))
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    with pytest.raises(checkpointing.CheckpointError,
                       match="params.head.kernel: in the target, not in the checkpoint"):
      ckpt.restore(checkpointing.abstract_like(other))


def test_corrupt_checkpoint_raises_clear_error(tmp_path):
  state = _initial_state()
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(0, state, meta={})
  state_dir = tmp_path / "c" / "0" / "state"
  # Damage the array store but keep the directory: a truncated upload.
  for root, _, files in os.walk(state_dir):
    for f in files:
      if f != "_METADATA":
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    with pytest.raises(checkpointing.CheckpointError, match="step 0"):
      ckpt.restore(checkpointing.abstract_like(state))


def test_meta_must_be_json(tmp_path):
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    with pytest.raises(TypeError, match="not JSON"):
      ckpt.save(0, _initial_state(), meta={"f": object()})


def test_interrupted_save_is_invisible(tmp_path):
  state = _initial_state()
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(1, state, meta={"ok": True})
  # A crashed save leaves a temporary directory behind; it must be ignored.
  (tmp_path / "c" / "2.orbax-checkpoint-tmp-123").mkdir()
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    assert ckpt.all_steps() == [1]
    _, meta = ckpt.restore(checkpointing.abstract_like(state))
  assert meta == {"ok": True}


# --- integrity: checksums, non-finite states, corruption, fallback ------------------
def _array_files(step_dir):
  """The array data files of a saved step (ocdbt data blobs), largest first."""
  found = []
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.sep + "d" in root[len(str(step_dir)):]:
      found += [os.path.join(root, f) for f in files]
  return sorted(found, key=os.path.getsize, reverse=True)


def _scribble(step_dir, seed=0):
  """Writes random bytes into the middle of the largest array file of each data directory (sizes kept).

  Orbax keeps the arrays (zstd-compressed) in an OCDBT store, per-process and
  merged; both are hit. Depending on where the bytes land, the restore fails
  or (without checksums) returns wrong values silently.
  """
  by_dir = {}
  for path in _array_files(step_dir):
    by_dir.setdefault(os.path.dirname(path), path)  # largest first
  for path in by_dir.values():
    data = bytearray(open(path, "rb").read())
    start = len(data) // 2
    data[start:start + 64] = np.random.default_rng(seed).bytes(64)
    with open(path, "wb") as f:
      f.write(bytes(data))


def _swap_state(step_dir, other_step_dir):
  """Puts another step's (intact, readable) array store under this step's meta: silently wrong values."""
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(os.path.join(step_dir, "state"))
  shutil.copytree(os.path.join(other_step_dir, "state"), os.path.join(step_dir, "state"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "uint8", "bool", "float16"])
def test_device_and_host_checksums_agree_and_see_one_element(dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 4)) * 10
  x = (x > 0) if dtype == "bool" else x.astype(dtype)
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
  sharded = jax.device_put(x, NamedSharding(mesh, P("a", "b")))
  finite, on_device = checkpointing._fingerprint({"x": x, "s": sharded}, host_max_bytes=-1)  # every leaf on device
  host_finite, on_host = checkpointing._fingerprint({"x": x, "s": sharded})  # small: every leaf on the host
  assert on_device["x"] == on_device["s"] == checkpointing._host_checksum(np.asarray(x)) == on_host["x"] == on_host["s"]
  assert finite == host_finite == {"x": True, "s": True}
  scalars = {"i": 3, "f": 0.5, "n": np.int64(7)}  # host leaves: the dtypes a device would give them (int32, float32)
  assert checkpointing._fingerprint(scalars) == checkpointing._fingerprint(
      {k: jnp.asarray(v) for k, v in scalars.items()}, host_max_bytes=-1)
  y = np.asarray(x).copy()
  y[3, 5, 1] = ~y[3, 5, 1] if dtype == "bool" else y[3, 5, 1] + 1
  assert checkpointing._host_checksum(y) != on_device["x"]
  # A permutation of the same values is another checksum too.
  assert checkpointing._host_checksum(np.asarray(x)[::-1]) != on_device["x"]


def test_save_refuses_a_non_finite_state_and_writes_nothing(tmp_path):
  state = _run(_initial_state(), 0, 1)
  bad = state.replace(params={**state.params, "norm": {"scale": state.params["norm"]["scale"].at[3].set(jnp.nan)}})
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    assert ckpt.save(1, state, meta={})
    ckpt.wait()
    with pytest.raises(checkpointing.CheckpointError, match=r"refusing to save checkpoint step 2 .*NaN or Inf "
                                                           r"\(in params.norm.scale\).*step\(s\) \[1\]"):
      ckpt.save(2, bad, meta={})
    assert ckpt.all_steps() == [1]
  assert sorted(os.listdir(tmp_path / "c")) == ["1"]
  assert checkpointing.all_finite(state) and not checkpointing.all_finite(bad)
  assert not checkpointing._fingerprint(bad, host_max_bytes=-1)[0]["params.norm.scale"]  # the device path sees it too


def test_corrupt_newest_checkpoint_falls_back_with_one_warning(tmp_path, caplog):
  states = {s: _run(_initial_state(), 0, s) for s in (2, 4)}
  with checkpointing.Checkpointer(tmp_path / "c", save_interval_steps=2) as ckpt:
    for s, st in states.items():
      ckpt.save(s, st, meta={"data_position": s})
  _scribble(tmp_path / "c" / "4")
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    with caplog.at_level("WARNING", logger="rlhf_jax.checkpointing"):
      restored, meta = ckpt.restore(checkpointing.abstract_like(states[4]))
    assert meta == {"data_position": 2} and ckpt.restored_step == 2
    _assert_bitwise_equal(restored, states[2])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "step 4: " in warnings[0] and "restored step 2 instead" in warnings[0]
    # The bad step is moved aside, so the resumed run can save step 4 again.
    assert ckpt.all_steps() == [2] and os.path.isdir(tmp_path / "c" / "4.corrupt")
    assert ckpt.save(4, states[4], meta={"data_position": 4})
    ckpt.wait()
    _, meta = ckpt.restore(checkpointing.abstract_like(states[4]))
  assert meta == {"data_position": 4}


def test_no_usable_checkpoint_gives_one_short_paragraph(tmp_path):
  states = {s: _run(_initial_state(), 0, s) for s in (1, 2, 3)}
  state = states[3]
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    for s in (1, 2, 3):
      ckpt.save(s, states[s], meta={})
  # Steps 3 and 1: another step's intact arrays (silently wrong values); step 2: unreadable garbage.
  _swap_state(tmp_path / "c" / "3", tmp_path / "c" / "2")
  _swap_state(tmp_path / "c" / "1", tmp_path / "c" / "2")
  for f in _array_files(tmp_path / "c" / "2"):
    with open(f, "wb") as fh:
      fh.write(b"garbage")
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    with pytest.raises(checkpointing.CheckpointError) as e:
      ckpt.restore(checkpointing.abstract_like(state))
    # An explicit step does not fall back.
    with pytest.raises(checkpointing.CheckpointError, match="step 1 .* is unusable: checksum mismatch"):
      ckpt.restore(checkpointing.abstract_like(state), step=1)
  msg = str(e.value)
  assert len(msg.encode()) < 2048, msg
  assert str(tmp_path / "c") in msg and "Traceback" not in msg
  lines = msg.splitlines()
  assert [l.split(":")[0].strip() for l in lines[1:4]] == ["step 3", "step 2", "step 1"]
  assert "checksum mismatch" in lines[1] and "unreadable" in lines[2] and "checksum mismatch" in lines[3]
  assert "params.dense1.kernel" in lines[1]  # names the leaves that differ
  assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)  # no chain
  assert sorted(os.listdir(tmp_path / "c")) == ["1", "2", "3"]  # left in place


def test_verify_reads_back_on_the_host(tmp_path):
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    for s in (1, 2):
      ckpt.save(s, _run(_initial_state(), 0, s), meta={})
    ckpt.wait()
    assert ckpt.verify() is None and ckpt.verify(step=1) is None
  _swap_state(tmp_path / "c" / "2", tmp_path / "c" / "1")
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    assert ckpt.verify().startswith("checksum mismatch in ")
  _scribble(tmp_path / "c" / "1")
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    assert ckpt.verify(step=1) is not None


# --- storage errors: one line with the cause and what was kept ------------------------
@pytest.mark.parametrize("async_save", [False, True])
def test_unwritable_directory_gives_one_clear_error(tmp_path, async_save):
  state = _initial_state()
  d = tmp_path / "c"
  ckpt = checkpointing.Checkpointer(d, async_save=async_save)
  ckpt.save(1, state, meta={})
  ckpt.wait()
  if os.geteuid() == 0:  # root ignores permission bits: make the directory unusable another way
    os.rename(d, tmp_path / "moved")
    d.write_text("not a directory")
  else:
    os.chmod(d, 0o500)
  try:
    with pytest.raises(checkpointing.CheckpointError) as e:
      ckpt.save(2, state, meta={})
      ckpt.wait()
  finally:
    if os.geteuid() != 0:
      os.chmod(d, 0o700)
  msg = str(e.value)
  assert msg.startswith(f"could not save checkpoint step 2 in {str(d)!r}: ")
  assert ("PermissionError" in msg or "Error: [Errno" in msg) and "\n" not in msg and len(msg) < 600
  ckpt.close()


def test_disk_full_is_reported_before_orbax_starts(tmp_path, monkeypatch):
  state = _initial_state()
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(1, state, meta={})
    ckpt.wait()
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p: type("U", (), {"free": 100})())
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"not enough disk space .*MiB needed, 0.0 MiB free\); the committed checkpoint\(s\) "
                             r"at step\(s\) \[1\] .* are intact"):
      ckpt.save(2, state, meta={})
    assert ckpt.all_steps() == [1]


def test_storage_error_inside_orbax_is_wrapped(tmp_path, monkeypatch):
  import errno  # pylint: disable=import-outside-toplevel
  state = _initial_state()
  with checkpointing.Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(1, state, meta={})
    ckpt.wait()

    def full(*a, **k):
      raise OSError(errno.ENOSPC, "No space left on device\n<a long storage-library dump>")

    monkeypatch.setattr(ckpt._manager, "save", full)
    with pytest.raises(checkpointing.CheckpointError) as e:
      ckpt.save(2, state, meta={})
    monkeypatch.setattr(ckpt._manager, "wait_until_finished", full)  # an async save failing in the background
    with pytest.raises(checkpointing.CheckpointError) as e2:
      ckpt.wait()
    monkeypatch.undo()
  for err in (e.value, e2.value):
    assert "OSError: [Errno 28] No space left on device" in str(err) and "dump" not in str(err)
    assert "step(s) [1]" in str(err) and err.__cause__ is None
