"""Checkpoints: a thin wrapper on Orbax's `CheckpointManager`.

A checkpoint at step `s` is the directory `<directory>/<s>/` holding
  state/  the training-state pytree (Orbax `StandardSave`, sharded arrays
          written by every host, restored straight into a target layout);
  meta/   a JSON object: data position, config, anything the loop needs.
Orbax writes into a temporary directory and renames it on commit, so a crash
mid-save leaves the previous checkpoints intact and the partial one invisible.

Integrity. `save` refuses a state with NaN/Inf in a floating leaf (nothing is
written) and records a checksum of every leaf in `meta` (two 32-bit lanes of a
position-keyed hash of the leaf's bits that does not depend on the sharding,
computed from the very arrays being saved: large leaves on their devices, with no
host copy; small ones on the host, where compiling a program would cost more).
`restore` recomputes it on the restored arrays: a checkpoint whose bytes changed
on disk, or that cannot be read, is *unusable*. Without an
explicit `step`, `restore` then falls back to the newest usable checkpoint
with a one-line warning and moves the unusable newer ones aside
(`<step>.corrupt`); when none is usable it raises `CheckpointError` with one
line per step tried. A checkpoint that does not match the restore target
(another model, another optimizer) is not corruption: that raises at once.

Errors from the storage layer (disk full, permission denied, corrupt files)
are raised as `CheckpointError` with one cause line
(`type: first line of the message`) and what was kept, never as a chain of
storage-library tracebacks.

Restoring always takes an abstract target (`jax.ShapeDtypeStruct` with
shardings, see `abstract_like`): without one Orbax returns NamedTuples as lists,
and with one each array lands directly in the requested layout, whatever the
layout it was saved from.

Example:
  with Checkpointer(workdir / "ckpt", save_interval_steps=100) as ckpt:
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(abstract_like(state))
    ...
    ckpt.save(step, state, meta={"data_position": pos})
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointError", "abstract_like", "all_finite"]

_log = logging.getLogger(__name__)

# Reserved key of `meta` holding the per-leaf checksums (stripped on restore).
_CHECKSUM_KEY = "__checksums__"
_CHECKSUM_ALGORITHM = "mix32x2-v1"  # change the name when the hash changes
# (multiplier, offset) of each lane's position key; odd multipliers, so i -> key is a bijection.
_LANES = ((0x9E3779B1, 0x632BE5AB), (0x85EBCA77, 0xC2B2AE3D))
_MAX_CAUSE_CHARS = 200


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not match the target."""


def abstract_like(tree: Any, *, sharding: Any = None) -> Any:
  """The abstract version of a pytree of arrays, for `Checkpointer.restore`.

  Args:
    tree: a pytree of `jax.Array`s (possibly sharded), numpy arrays, scalars
      or `jax.ShapeDtypeStruct`s.
    sharding: optional. A single `jax.sharding.Sharding` applied to every leaf,
      or a pytree of shardings matching `tree`; overrides the leaves' own
      shardings (to restore into another mesh). Leaves without a sharding
      (numpy arrays) get a single-device sharding on the first local device.

  Returns:
    The same pytree with `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` leaves.
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def one(x, s=None):
    if s is None:
      s = getattr(x, "sharding", None) or default
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    x_shape, x_dtype = np.shape(x), getattr(x, "dtype", None)
    if x_dtype is None:
      x_dtype = np.asarray(x).dtype
    return jax.ShapeDtypeStruct(x_shape, x_dtype, sharding=s)

  if sharding is None:
    return jax.tree.map(one, tree)
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, sharding), tree)
  return jax.tree.map(one, tree, sharding)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_table(tree: Any) -> dict[str, Any]:
  """`{"params.dense.kernel": leaf}` with Orbax's naming of pytree paths."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def _json_default(x):
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _cause(e: BaseException) -> str:
  """`Type: first line of the message`, bounded: the one line a person needs from a storage error."""
  text = str(e).strip().splitlines()
  line = f"{type(e).__name__}: {text[0].strip()}" if text else type(e).__name__
  return line if len(line) <= _MAX_CAUSE_CHARS else line[:_MAX_CAUSE_CHARS - 3] + "..."


class _StorageTracebackFilter(logging.Filter):
  """Drops the tracebacks Orbax's background threads log on a storage failure (one line each remains).

  The same failure is raised to the caller as a `CheckpointError` with its
  cause; dozens of identical thread tracebacks only bury it.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
      record.exc_info, record.exc_text = None, None
    return True


def _install_log_filter() -> None:
  absl_logger = logging.getLogger("absl")  # Orbax logs through absl.logging, i.e. this logger
  if not any(isinstance(f, _StorageTracebackFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_StorageTracebackFilter())


class _Unusable(Exception):
  """A checkpoint step that cannot be used (unreadable or corrupt); the message is one line."""


# --- checksums ---------------------------------------------------------------------------
# checksum_lane(x) = Σ_i mix(bits(x_i) ^ (a·i + b))  (mod 2^32), i the row-major element index, (a, b)
# the lane's constants, mix the "lowbias32" integer finaliser (a bijection of uint32). For a fixed i each term is a
# bijection of the element's bits, so changing any single element always changes the sum; random
# changes to several elements go unnoticed with probability ~2^-64 (two independent lanes). Integer sums are exact and
# order-free, so the value is the same whatever the sharding (or on the host, see _host_checksum).
def _mix(x, xp):
  x = x ^ (x >> 16)
  x = x * xp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * xp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _device_words(x: jax.Array) -> jax.Array:
  """The element bits of `x` as uint32, same shape (plus a trailing 2 for 8-byte dtypes)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  raise ValueError(f"cannot checksum dtype {x.dtype}")


def _device_checksum(x: jax.Array) -> jax.Array:
  w = _device_words(x)
  # Row-major index from broadcasted iotas (no reshape, so a sharded array is never regathered).
  idx = jnp.zeros(w.shape, jnp.uint32)
  for d in range(w.ndim):
    stride = int(np.prod(w.shape[d + 1:], dtype=np.int64)) & 0xFFFFFFFF
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride)
  lanes = [jnp.sum(_mix(w ^ (idx * jnp.uint32(a) + jnp.uint32(b)), jnp), dtype=jnp.uint32) for a, b in _LANES]
  return jnp.stack(lanes)


# A leaf that this process holds whole and that is at most this big is fingerprinted on the host, after one
# device-to-host copy of all such leaves: compiling a device program costs ~0.1-0.2 s per distinct leaf shape and
# sharding on the CPU backend, far more than hashing a small leaf in numpy (~1.6 ms per MiB); a small model's state is
# all such leaves. Larger leaves, and leaves spread over several processes, are fingerprinted where they live.
_HOST_FINGERPRINT_MAX_BYTES = 1 << 20


@jax.jit
def _device_leaf_fingerprint(x: jax.Array) -> jax.Array:
  """uint32[3]: 1 when every element is finite (0 otherwise), then the two checksum lanes.

  One program per (shape, dtype, sharding), shared by every tree holding such a leaf (a model's
  parameters, its optimizer moments, the next stage's copy).
  """
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
  return jnp.concatenate([finite.astype(jnp.uint32)[None], _device_checksum(x)])


def _on_host(x: Any, max_bytes: int) -> bool:
  """Whether leaf `x` is fingerprinted on the host (see `_HOST_FINGERPRINT_MAX_BYTES`)."""
  if not isinstance(x, jax.Array):
    return True  # numpy arrays and scalars are there already
  return (x.is_fully_addressable and x.nbytes <= max_bytes
          and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key))


def _fingerprint(tree: Any, *, host_max_bytes: int = _HOST_FINGERPRINT_MAX_BYTES
                 ) -> tuple[dict[str, bool], dict[str, str]]:
  """`({leaf: all finite}, {leaf: checksum hex})` of a pytree of arrays.

  Large leaves are hashed on their devices (no host copy; the same value whatever the sharding),
  small ones on the host after one transfer for all of them; both give the same checksum.
  """
  table = _leaf_table(tree)
  device = {n: _device_leaf_fingerprint(v) for n, v in table.items() if not _on_host(v, host_max_bytes)}
  host_names = [n for n in table if n not in device]
  host_values = jax.device_get([table[n] for n in host_names])  # one transfer; the device programs run meanwhile
  finite, sums = {}, {}
  for n, x in zip(host_names, host_values):
    x = np.asarray(x)
    x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)  # a Python int is int32, as on a device
    finite[n] = bool(np.all(np.isfinite(x))) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    sums[n] = _host_checksum(x)
  # The outputs are replicated: any addressable copy is the value (also on a multi-host run).
  for n, out in zip(device, jax.device_get([out.addressable_data(0) for out in device.values()])):
    f, a, b = (int(v) for v in out)
    finite[n], sums[n] = bool(f), f"{a:08x}{b:08x}"
  return {n: finite[n] for n in table}, {n: sums[n] for n in table}


def _host_checksum(x: np.ndarray) -> str:
  """The same checksum as `_device_checksum`, computed with numpy."""
  x = np.ascontiguousarray(np.asarray(x))
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  size = x.dtype.itemsize
  view = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}.get(size)
  if view is None:
    raise ValueError(f"cannot checksum dtype {x.dtype}")
  w = x.reshape(-1).view(view).astype(np.uint32)
  idx = np.arange(w.size, dtype=np.uint64).astype(np.uint32)  # the index mod 2^32, as on the device
  lanes = [int(np.sum(_mix(w ^ (idx * np.uint32(a) + np.uint32(b)), np), dtype=np.uint32)) for a, b in _LANES]
  return f"{lanes[0]:08x}{lanes[1]:08x}"


def all_finite(tree: Any) -> bool:
  """True when no floating leaf of `tree` holds NaN or Inf: the check `Checkpointer.save` makes (large leaves
  on their devices, small ones after one device-to-host transfer)."""
  finite, _ = _fingerprint(tree)
  return all(finite.values())


class Checkpointer:
  """Saves and restores (`state`, `meta`) pairs under one directory.

  Args:
    directory: where step directories live (created if missing; a local path or
      any path Orbax/etils understands, e.g. `gs://...`).
    max_to_keep: number of most recent checkpoints kept (None = all).
    save_interval_steps: `save` writes only when `step % save_interval_steps == 0`
      (or `force=True`).
    async_save: write in a background thread; `save` returns once the arrays
      are copied off the device. Call `wait()` before reading the files.

  Every storage failure (here, in `save`, `wait`, `restore`, `close`) is raised
  as `CheckpointError` with a one-line cause.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    if save_interval_steps < 1:
      raise ValueError(
          f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.save_interval_steps = save_interval_steps
    self.directory = os.fspath(directory)
    if "://" not in self.directory:
      self.directory = os.path.abspath(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        # The interval is applied in `save` (Orbax would also save the first
        # step it sees, wherever it falls).
        save_interval_steps=1,
        enable_async_checkpointing=async_save,
        create=True,
    )
    _install_log_filter()
    # Handlers are named up front so a fresh process can read metadata (and
    # restore) before it has saved anything itself.
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"cannot open the checkpoint directory {self.directory!r}: {_cause(e)}") from None
    self._pending_step: int | None = None
    self.restored_step: int | None = None

  # -- queries -----------------------------------------------------------------
  def latest_step(self) -> int | None:
    """The newest committed step, or None when there is no checkpoint."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All committed steps, ascending."""
    return sorted(self._manager.all_steps())

  def _kept(self) -> str:
    """What is on disk, for error messages."""
    try:
      self._manager.reload()
      steps = self.all_steps()
    except Exception:  # pylint: disable=broad-except
      return f"could not list {self.directory!r}"
    if not steps:
      return f"no earlier checkpoint exists in {self.directory!r}"
    return f"the committed checkpoint(s) at step(s) {steps} in {self.directory!r} are intact"

  def _save_error(self, step: int | None, e: BaseException) -> CheckpointError:
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    return CheckpointError(f"could not save {what} in {self.directory!r}: {_cause(e)}; {self._kept()}")

  # -- save --------------------------------------------------------------------
  def _preflight(self, step: int, state: Any) -> None:
    """Fails before Orbax starts when the directory is not writable or the disk cannot hold the state.

    A failure inside Orbax's background threads is reported late and can
    leave its other threads waiting minutes for a signal; the common causes
    (permissions, a full disk, a path that is a file) are cheap to test first.
    """
    if "://" in self.directory:
      return
    need = sum(int(getattr(x, "nbytes", None) or np.asarray(x).nbytes) for x in jax.tree.leaves(state))
    try:
      os.makedirs(self.directory, exist_ok=True)
      probe = os.path.join(self.directory, f".write-test-{jax.process_index()}-{os.getpid()}")
      with open(probe, "wb") as f:
        f.write(b"\0" * 4096)
      os.remove(probe)
      free = shutil.disk_usage(self.directory).free
    except OSError as e:
      raise self._save_error(step, e) from None
    if free < need:
      raise CheckpointError(
          f"could not save checkpoint step {step} in {self.directory!r}: not enough disk space "
          f"({need / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free); {self._kept()}")

  def save(self, step: int, state: Any, *, meta: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Saves `state` and the JSON `meta` as checkpoint `step`.

    Args:
      step: the step number (the directory name).
      state: a pytree of arrays (e.g. a `TrainState`).
      meta: JSON-serialisable mapping (numpy scalars/arrays are converted);
        the key "__checksums__" is reserved.
      force: save even if `step` is not on the save interval.

    Returns:
      True if a save was started, False if skipped by the interval (or because
      `step` is already saved).

    Raises:
      CheckpointError: the state holds NaN/Inf in a floating leaf (nothing is
        written), or the storage failed (disk full, permission denied; this
        save's error or, with async saves, the previous one's).
    """
    step = int(step)
    meta = dict(meta or {})
    if _CHECKSUM_KEY in meta:
      raise ValueError(f"meta key {_CHECKSUM_KEY!r} is reserved for the checkpoint's checksums")
    try:
      # Round-trip now so a bad meta fails here, on the caller's line.
      meta = json.loads(json.dumps(meta, default=_json_default))
    except (TypeError, ValueError) as e:
      raise TypeError(f"checkpoint meta for step {step} is not JSON: {e}") from e
    if not force and step % self.save_interval_steps:
      return False
    if step in self._manager.all_steps():
      return False
    finite, checksums = _fingerprint(state)
    bad = [name for name, ok in finite.items() if not ok]
    if bad:
      shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
      raise CheckpointError(
          f"refusing to save checkpoint step {step} in {self.directory!r}: the state holds NaN or Inf "
          f"(in {shown}); nothing was written and {self._kept()}")
    meta[_CHECKSUM_KEY] = {"algorithm": _CHECKSUM_ALGORITHM, "leaves": checksums}
    self._preflight(step, state)
    try:
      started = bool(self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              meta=ocp.args.JsonSave(meta)),
          force=True))
    except Exception as e:  # pylint: disable=broad-except
      # With async saves the cause may be the previous save's failure, reported now.
      raise self._save_error(step, e) from None
    self._pending_step = step if started else self._pending_step
    return started

  def wait(self) -> None:
    """Blocks until any background save has been committed.

    Raises:
      CheckpointError: the background save failed.
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, self._pending_step = self._pending_step, None
      raise self._save_error(step, e) from None
    self._pending_step = None

  # -- restore -----------------------------------------------------------------
  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(
            f"no checkpoint found in {self.directory!r} (the directory is "
            "empty, missing, or holds only uncommitted saves)")
      return steps[-1]
    if int(step) not in steps:
      raise CheckpointError(
          f"no checkpoint for step {step} in {self.directory!r}; available "
          f"steps: {steps or 'none'}")
    return int(step)

  def _saved_tree(self, step: int) -> Any:
    """The saved state's metadata tree; `_Unusable` when it cannot be read."""
    try:
      saved = self._manager.item_metadata(step)["state"]
      saved = getattr(saved, "tree", saved)
    except Exception as e:  # pylint: disable=broad-except
      raise _Unusable(f"unreadable state metadata ({_cause(e)})") from None
    if saved is None:
      raise _Unusable("no state metadata (corrupt or written by another tool)")
    return saved

  def _check_target(self, step: int, abstract_state: Any) -> None:
    """Compares the saved tree with the target, to fail with every mismatch named."""
    saved_leaves = {k: v for k, v in _leaf_table(self._saved_tree(step)).items() if v is not None}
    target_leaves = _leaf_table(abstract_state)
    problems = []
    for name in sorted(set(target_leaves) - set(saved_leaves)):
      problems.append(f"{name}: in the target, not in the checkpoint")
    for name in sorted(set(saved_leaves) - set(target_leaves)):
      problems.append(f"{name}: in the checkpoint, not in the target")
    for name in sorted(set(saved_leaves) & set(target_leaves)):
      s, t = saved_leaves[name], target_leaves[name]
      s_shape, t_shape = tuple(getattr(s, "shape", ())), tuple(np.shape(t))
      if s_shape != t_shape:
        problems.append(f"{name}: shape {s_shape} saved, {t_shape} requested")
      s_dtype, t_dtype = getattr(s, "dtype", None), getattr(t, "dtype", None)
      if s_dtype is not None and t_dtype is not None and (
          np.dtype(s_dtype) != np.dtype(t_dtype)):
        problems.append(f"{name}: dtype {np.dtype(s_dtype)} saved, "
                        f"{np.dtype(t_dtype)} requested")
    if problems:
      shown = problems[:20] + ([f"... and {len(problems) - 20} more"]
                               if len(problems) > 20 else [])
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory!r} does not match the "
          "restore target:\n  " + "\n  ".join(shown))

  @staticmethod
  def _split_meta(meta: Any) -> tuple[dict[str, Any], dict[str, str] | None]:
    meta = dict(meta or {})
    record = meta.pop(_CHECKSUM_KEY, None)
    if isinstance(record, dict) and record.get("algorithm") == _CHECKSUM_ALGORITHM:
      return meta, dict(record.get("leaves") or {})
    return meta, None

  @staticmethod
  def _verify(expected: dict[str, str] | None, finite: dict[str, bool], actual: dict[str, str]) -> None:
    """`_Unusable` unless the restored leaves match their checksums (or, unrecorded, are finite)."""
    if expected is None:  # written before checksums existed: finiteness is all that can be checked
      bad = [n for n, ok in finite.items() if not ok]
      if bad:
        raise _Unusable(f"NaN/Inf in {len(bad)} leaf(s) ({', '.join(bad[:3])}) and no checksums recorded")
      return
    bad = [n for n in expected if actual.get(n) != expected[n]]  # in tree order: step, params, ...
    if bad:
      more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
      raise _Unusable(f"checksum mismatch in {len(bad)} leaf(s): {', '.join(bad[:3])}{more} "
                      "(the files changed after they were written)")

  def _restore_one(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    self._check_target(step, abstract_state)
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise _Unusable(f"unreadable ({_cause(e)})") from None
    meta, expected = self._split_meta(restored["meta"])
    finite, actual = _fingerprint(restored["state"])
    self._verify(expected, finite, actual)
    return restored["state"], meta

  def _quarantine(self, steps: list[int]) -> str:
    """Renames unusable step directories to `<step>.corrupt[-N]` so new saves can reuse the step numbers."""
    moved = []
    if jax.process_index() == 0 and "://" not in self.directory:
      for step in steps:
        src = os.path.join(self.directory, str(step))
        dst, n = f"{src}.corrupt", 1
        while os.path.exists(dst):
          n += 1
          dst = f"{src}.corrupt-{n}"
        try:
          os.rename(src, dst)
          moved.append(os.path.basename(dst))
        except OSError:
          pass
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"checkpoint-quarantine-{self.directory}")
    self._manager.reload()
    return f"; moved aside as {', '.join(moved)}" if moved else ""

  def restore(self, abstract_state: Any, *, step: int | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` (default: the newest usable one) into `abstract_state`'s layout.

    Every restored leaf is checked against the checksum recorded at save time.
    With `step=None`, an unusable newest checkpoint (unreadable, or checksum
    mismatch) is skipped with a one-line warning (logged on the
    `rlhf_jax.checkpointing` logger) and the next older one is tried; the
    skipped ones are renamed `<step>.corrupt` so the run can save those steps
    again.

    Args:
      abstract_state: a pytree like the saved state whose leaves are
        `jax.ShapeDtypeStruct`s with shardings (see `abstract_like`); concrete
        arrays are accepted and converted with `abstract_like`.
      step: which step; None = the newest usable one.

    Returns:
      `(state, meta)`: the state with the target's structure, shapes, dtypes
      and shardings, and the meta dict saved with it. `self.restored_step` is
      the step that was restored.

    Raises:
      CheckpointError: no checkpoint; unknown step; the requested step (or,
        with step=None, every step) is unusable, with one line per step tried;
        or a tree/shape/dtype mismatch with the target (every mismatching path
        is named; no fallback, since older steps have the same layout).
    """
    self.wait()
    abstract_state = abstract_like(abstract_state)
    if step is not None:
      step = self._resolve_step(step)
      try:
        result = self._restore_one(step, abstract_state)
      except _Unusable as e:
        raise CheckpointError(f"checkpoint step {step} in {self.directory!r} is unusable: {e}") from None
      self.restored_step = step
      return result
    self._resolve_step(None)  # raises when there is none
    steps = self.all_steps()
    failures: list[tuple[int, str]] = []
    for s in reversed(steps):
      try:
        result = self._restore_one(s, abstract_state)
      except _Unusable as e:
        failures.append((s, str(e)))
        continue
      if failures:
        moved = self._quarantine([f for f, _ in failures])
        _log.warning("checkpoint(s) in %s unusable: %s; restored step %d instead%s",
                     self.directory, "; ".join(f"step {f}: {why}" for f, why in failures), s, moved)
      self.restored_step = s
      return result
    shown = failures[:10]
    lines = [f"  step {f}: {why}" for f, why in shown]
    if len(failures) > len(shown):
      lines.append(f"  ... and {len(failures) - len(shown)} older step(s), also unusable")
    raise CheckpointError(
        f"no usable checkpoint in {self.directory!r}; tried every committed step, newest first:\n"
        + "\n".join(lines)
        + "\nThe files were left in place. Delete the directory to start from scratch, "
          "or put back a good copy.")

  def verify(self, *, step: int | None = None) -> str | None:
    """Checks checkpoint `step` (default: the latest) without a restore target.

    Reads every array onto the host (numpy), so it needs host memory for the
    whole state; meant for final parameters before a later stage reuses them.

    Returns:
      None when the checkpoint reads back and matches its checksums, else a
      one-line reason.

    Raises:
      CheckpointError: no checkpoint, or an unknown step.
    """
    self.wait()
    step = self._resolve_step(step)
    try:
      saved = self._saved_tree(step)
      target = jax.tree.map(lambda m: np.empty(tuple(m.shape), np.dtype(m.dtype)), saved)
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                          meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        raise _Unusable(f"unreadable ({_cause(e)})") from None
      _, expected = self._split_meta(restored["meta"])
      finite, actual = _fingerprint(restored["state"])  # numpy leaves: hashed on the host
      self._verify(expected, finite, actual)
    except _Unusable as e:
      return str(e)
    return None

  def restore_meta(self, *, step: int | None = None) -> dict[str, Any]:
    """Only the meta dict of checkpoint `step` (default: the latest)."""
    self.wait()
    step = self._resolve_step(step)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"failed to read meta of checkpoint step {step} in "
          f"{self.directory!r}: {_cause(e)}") from None
    return self._split_meta(restored["meta"])[0]

  # -- lifetime ----------------------------------------------------------------
  def close(self) -> None:
    """Waits for pending saves and releases the manager.

    Raises:
      CheckpointError: a pending background save failed.
    """
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # the wait above has reported the failure that matters

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type, *exc) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # already failing: release quietly, keep the original error
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass
