"""Checkpoints: a thin wrapper on Orbax's `CheckpointManager`.

A checkpoint at step `s` is the directory `<directory>/<s>/` holding
  state/  the training-state pytree (Orbax `StandardSave`, sharded arrays
          written by every host, restored straight into a target layout);
  meta/   a JSON object: data position, config, anything the loop needs.
Orbax writes into a temporary directory and renames it on commit, so a crash
mid-save leaves the previous checkpoints intact and the partial one invisible.

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
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointError", "abstract_like"]


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
    # Handlers are named up front so a fresh process can read metadata (and
    # restore) before it has saved anything itself.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  # -- queries -----------------------------------------------------------------
  def latest_step(self) -> int | None:
    """The newest committed step, or None when there is no checkpoint."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All committed steps, ascending."""
    return sorted(self._manager.all_steps())

  # -- save --------------------------------------------------------------------
  def save(self, step: int, state: Any, *, meta: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Saves `state` and the JSON `meta` as checkpoint `step`.

    Args:
      step: the step number (the directory name).
      state: a pytree of arrays (e.g. a `TrainState`).
      meta: JSON-serialisable mapping (numpy scalars/arrays are converted).
      force: save even if `step` is not on the save interval.

    Returns:
      True if a save was started, False if skipped by the interval (or because
      `step` is already saved).
    """
    step = int(step)
    meta = dict(meta or {})
    try:
      # Round-trip now so a bad meta fails here, on the caller's line.
      meta = json.loads(json.dumps(meta, default=_json_default))
    except TypeError as e:
      raise TypeError(f"checkpoint meta for step {step} is not JSON: {e}") from e
    if not force and step % self.save_interval_steps:
      return False
    if step in self._manager.all_steps():
      return False
    return bool(self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta)),
        force=True))

  def wait(self) -> None:
    """Blocks until any background save has been committed."""
    self._manager.wait_until_finished()

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

  def _check_target(self, step: int, abstract_state: Any) -> None:
    """Compares the saved tree with the target, to fail with every mismatch named."""
    try:
      saved = self._manager.item_metadata(step)["state"]
      saved = getattr(saved, "tree", saved)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory!r} is unreadable "
          f"(state metadata): {type(e).__name__}: {e}") from e
    if saved is None:
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory!r} has no state metadata "
          "(corrupt or written by another tool)")
    saved_leaves = {k: v for k, v in _leaf_table(saved).items() if v is not None}
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

  def restore(self, abstract_state: Any, *, step: int | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` (default: the latest) into `abstract_state`'s layout.

    Args:
      abstract_state: a pytree like the saved state whose leaves are
        `jax.ShapeDtypeStruct`s with shardings (see `abstract_like`); concrete
        arrays are accepted and converted with `abstract_like`.
      step: which step; None = the latest.

    Returns:
      `(state, meta)`: the state with the target's structure, shapes, dtypes
      and shardings, and the meta dict saved with it.

    Raises:
      CheckpointError: no checkpoint, unknown step, unreadable files, or a
        tree/shape/dtype mismatch (every mismatching path is named).
    """
    self.wait()
    step = self._resolve_step(step)
    abstract_state = abstract_like(abstract_state)
    self._check_target(step, abstract_state)
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"failed to restore checkpoint step {step} from {self.directory!r}: "
          f"{type(e).__name__}: {e}") from e
    return restored["state"], dict(restored["meta"] or {})

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
          f"{self.directory!r}: {type(e).__name__}: {e}") from e
    return dict(restored["meta"] or {})

  # -- lifetime ----------------------------------------------------------------
  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
