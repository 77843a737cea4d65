"""Host-side pieces shared by the pipeline stages: model, mesh, data, state, checkpoints."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from rlhf_jax import models, sharding as shd
from rlhf_jax.checkpointing import Checkpointer, CheckpointError, abstract_like
from rlhf_jax.config import optimizer_kwargs
from rlhf_jax.models import ModelConfig
from rlhf_jax.state import TrainState, create_train_state, make_optimizer
from rlhf_jax.tokenizer import ByteTokenizer, Tokenizer

# Fields of the config's `model` section that override the preset's ModelConfig.
_MODEL_OVERRIDES = ("max_seq_len", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim")


def model_config(config) -> ModelConfig:
  over = {k: config.model.get(k) for k in _MODEL_OVERRIDES if config.model.get(k) is not None}
  return models.get_model_config(config.model.preset, dtype=config.model.dtype,
                                 param_dtype=config.model.param_dtype, **over)


def make_mesh(config) -> Mesh:
  return shd.make_mesh(tuple(config.mesh.shape))


def tokenizer(config) -> Tokenizer:
  del config
  return ByteTokenizer()


def data_dir(config, workdir: str) -> str:
  return config.task.data_dir or os.path.join(workdir, "data")


def stage_dir(workdir: str, stage: str) -> str:
  path = os.path.join(workdir, stage)
  os.makedirs(path, exist_ok=True)
  return path


def optimizer(section, *, optimizer_section=None, total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """The optimizer of a stage section (its `optimizer` and `steps`), or of an explicit optimizer section."""
  if optimizer_section is None:
    return make_optimizer(**optimizer_kwargs(section))
  kwargs = dict(optimizer_section.to_dict())
  if kwargs.get("total_steps") is None:
    kwargs["total_steps"] = int(total_steps)
  return make_optimizer(**kwargs)


# --- state --------------------------------------------------------------------------
def state_shardings(abstract_state: TrainState, param_shardings: Any, tx, mesh: Mesh) -> TrainState:
  rep = shd.replicated(mesh)
  return TrainState(step=rep, params=param_shardings,
                    opt_state=shd.opt_state_shardings(tx, abstract_state.opt_state, param_shardings, mesh), rng=rep)


def create_state(init_params_fn: Callable[..., Any], logical_specs: Any, tx, mesh: Mesh, rng: jax.Array,
                 *init_args: Any) -> tuple[TrainState, TrainState]:
  """A TrainState born sharded: eval_shape → specs → jit(init, out_shardings).

  `init_params_fn(rng, *init_args)` builds the parameters: fresh, or from an
  earlier stage's params passed in `init_args` (arguments, not closed-over
  constants, so they are not baked into the program). Returns (state,
  state_shardings).
  """
  param_sh = shd.logical_to_sharding(logical_specs, mesh)

  def init(rng, *args):
    return create_train_state(init_params_fn(rng, *args), tx, rng)

  abstract = jax.eval_shape(init, rng, *init_args)
  sh = state_shardings(abstract, param_sh, tx, mesh)
  return jax.jit(init, out_shardings=sh)(rng, *init_args), sh


def param_shardings(cfg: ModelConfig, mesh: Mesh, *, head: str = "lm"):
  return shd.logical_to_sharding(models.logical_axes(cfg, head=head), mesh)


def save_params(directory: str, params: Any, meta: dict) -> None:
  """Final parameters of a stage (what later stages load), written atomically by orbax."""
  with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
    ckpt.save(int(meta.get("step", 0)), {"params": params}, meta=meta, force=True)


def load_params(directory: str, abstract_params: Any, shardings: Any) -> tuple[Any, dict]:
  """Parameters saved by `save_params`, restored straight into `shardings`."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"no saved parameters at {directory}: run the stage that produces them first")
  target = {"params": abstract_like(abstract_params, sharding=shardings)}
  with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
    restored, meta = ckpt.restore(target)
  return restored["params"], meta


def has_params(directory: str) -> bool:
  if not os.path.isdir(directory):
    return False
  with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
    return ckpt.latest_step() is not None


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (tmp + rename): an interrupted run never leaves half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def to_host(tree: Any) -> Any:
  """One device_get for a tree of metrics, converted to Python floats."""
  return jax.tree.map(lambda x: float(np.asarray(x)), jax.device_get(tree))


def mean_metrics(items: list[dict]) -> dict:
  return {k: float(np.mean([m[k] for m in items])) for k in items[0]} if items else {}


def fold(rng: jax.Array, *ints: int) -> jax.Array:
  for i in ints:
    rng = jax.random.fold_in(rng, i)
  return rng

