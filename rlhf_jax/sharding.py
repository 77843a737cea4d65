"""Mesh, logical-axis rules and sharded creation of state.

One mesh with axes ("data", "fsdp", "tensor"). Parameters carry logical axis
names; `LOGICAL_RULES` maps them to mesh axes in one place. Batches are
sharded over ("data", "fsdp") on their leading axis. State is created sharded:
`eval_shape` → logical specs → `NamedSharding` → `jit(init, out_shardings=…)`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (None = replicated). The one table of the project.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fill one `-1` entry so the product equals `num_devices`; validate the rest."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape} may contain at most one -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape} entries must be positive or -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices but {num_devices} are available")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
  """A ("data","fsdp","tensor") mesh in the classic automatic-sharding mode."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  try:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except  # odd device counts on CPU
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), mesh_specs,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over ("data","fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Put a host batch (tree of numpy arrays, leading axis = batch) on the mesh.

  Single-process: a device_put with the batch sharding. Multi-process: each
  host passes its own slice and the global array is assembled from them.
  """
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim) if x.ndim else replicated(mesh)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)


def init_sharded(init_fn: Callable[..., Any], logical_specs: Any, mesh: Mesh, *args) -> tuple[Any, Any]:
  """Run `init_fn(*args)` under jit so every output leaf is born sharded.

  `logical_specs` is a tree of logical PartitionSpecs matching init_fn's
  output (None leaves or P() are replicated). Returns (tree, shardings).
  """
  shardings = logical_to_sharding(logical_specs, mesh)
  return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


def opt_state_shardings(optimizer, abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for an optax state: moments follow their parameter, the rest is replicated."""
  import optax  # pylint: disable=import-outside-toplevel
  return optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_opt_state, param_shardings,
      transform_non_params=lambda _: replicated(mesh),
      is_leaf=lambda x: isinstance(x, NamedSharding))
