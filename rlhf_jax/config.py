"""Config validation: unknown fields, wrong types, impossible combinations.

A run's config is an `ml_collections.ConfigDict` checked against a schema (the
base config, `experiments/configs/base.py`) before any compute:

  validate_config(config, schema)                       # no device needed
  validate_config(config, schema, device_count=jax.device_count())

Every failure raises `ConfigError` whose message starts with the full dotted
field name, e.g. `config.sampling.top_p: must be in (0, 1], got 1.5`.

Impossible combinations are a list of small check functions
`check(config, device_count) -> None` (`DEFAULT_CHECKS`); a check only looks at
the fields it knows and skips what the schema does not have, so adding a
section never breaks an existing check, and adding a rule is adding a function.

This module does not import jax (the command line validates before paying
for it).
"""
from __future__ import annotations

import difflib
import dataclasses
import importlib.util
import json
import math
import re
from typing import Any, Callable, Iterable, Sequence

import ml_collections

__all__ = [
    "ConfigError",
    "validate_config",
    "DEFAULT_CHECKS",
    "config_to_json",
    "resolve_mesh_shape",
    "data_parallel_size",
    "optimizer_kwargs",
    "stage_module",
]

_MISSING = object()
MESH_AXES = ("data", "fsdp", "tensor")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("seq_mean_token_mean", "token_mean")
STRATEGIES = ("none", "best_of_n", "best_random", "best_worst", "top",
              "top_random", "top_bottom", "pow_k")


class ConfigError(ValueError):
  """An invalid config; `field` is the full dotted name (`config.a.b`)."""

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f"{field}: {message}")


# --- structure and types ---------------------------------------------------------
def _type_name(t) -> str:
  return getattr(t, "__name__", str(t))


def _is_instance(value: Any, expected: type) -> bool:
  """isinstance with the config's conversions: int for float, list for tuple."""
  if expected is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if expected is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if expected in (tuple, list):
    return isinstance(value, (tuple, list))
  return isinstance(value, expected)


def _check_value(field: str, value: Any, schema_value: Any, expected: type) -> None:
  if value is None:
    if schema_value is None:
      return  # optional field (placeholder)
    raise ConfigError(field, f"None is not allowed here (expected {_type_name(expected)})")
  if expected is type(None):
    return  # an untyped optional field in the schema accepts any value
  if not _is_instance(value, expected):
    raise ConfigError(field, f"expected {_type_name(expected)}, got "
                      f"{_type_name(type(value))} {value!r}")
  if expected in (tuple, list) and schema_value:
    elem_type = type(schema_value[0])
    for i, item in enumerate(value):
      if not _is_instance(item, elem_type):
        raise ConfigError(f"{field}[{i}]", f"expected {_type_name(elem_type)}, "
                          f"got {_type_name(type(item))} {item!r}")


def _check_structure(config: Any, schema: ml_collections.ConfigDict,
                     prefix: str) -> None:
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    raise ConfigError(prefix, f"expected a section (ConfigDict), got "
                      f"{_type_name(type(config))} {config!r}")
  keys = list(config.keys())
  for key in keys:
    field = f"{prefix}.{key}"
    if key not in schema:
      close = difflib.get_close_matches(str(key), list(schema.keys()), n=1)
      hint = f"; did you mean {prefix}.{close[0]}?" if close else ""
      raise ConfigError(field, f"unknown field (not in the schema){hint}")
    schema_value = schema[key]
    value = config[key]
    if isinstance(schema_value, ml_collections.ConfigDict):
      _check_structure(value, schema_value, field)
    else:
      _check_value(field, value, schema_value, schema.get_type(key))
  for key in schema.keys():
    if key not in keys:
      raise ConfigError(f"{prefix}.{key}", "missing field (required by the schema)")


# --- helpers shared by checks and callers --------------------------------------
def _get(config: Any, path: str, default: Any = _MISSING) -> Any:
  node = config
  for part in path.split("."):
    if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
      node = node[part]
    else:
      return default
  return node


def resolve_mesh_shape(shape: Sequence[int], device_count: int) -> tuple[int, ...]:
  """Fills the single -1 entry of `shape` so that its product is `device_count`.

  Raises:
    ConfigError (field `config.mesh.shape`) if it cannot.
  """
  field = "config.mesh.shape"
  shape = tuple(int(s) for s in shape)
  if any(s == 0 or s < -1 for s in shape):
    raise ConfigError(field, f"entries must be positive or -1, got {shape}")
  if shape.count(-1) > 1:
    raise ConfigError(field, f"at most one entry may be -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if device_count % known:
      raise ConfigError(field, f"{shape}: the fixed entries (product {known}) "
                        f"do not divide the {device_count} devices")
    return tuple(device_count // known if s == -1 else s for s in shape)
  if known != device_count:
    raise ConfigError(field, f"{shape} has {known} devices but "
                      f"{device_count} are available")
  return shape


def data_parallel_size(config: Any, device_count: int) -> int:
  """Size of the batch-sharding axes ("data" × "fsdp") after filling -1."""
  shape = resolve_mesh_shape(_get(config, "mesh.shape"), device_count)
  return shape[0] * shape[1]


def stage_module(stage: str) -> tuple[str, str]:
  """`(module, function)` running a stage.

  `"sft"` → `("rlhf_jax.pipelines.sft", "run_sft")`; a custom stage is written
  `"package.module:function"`.
  """
  if ":" in stage:
    module, fn = stage.split(":", 1)
    return module, fn
  return f"rlhf_jax.pipelines.{stage}", f"run_{stage}"


def optimizer_kwargs(section: Any) -> dict[str, Any]:
  """`make_optimizer` keyword arguments from a stage section.

  Args:
    section: a stage section with an `optimizer` sub-section (and `steps`,
      used when `optimizer.total_steps` is None).

  Returns:
    A plain dict for `rlhf_jax.state.make_optimizer(**kwargs)`.
  """
  kwargs = dict(section.optimizer.to_dict())
  if kwargs.get("total_steps") is None:
    kwargs["total_steps"] = int(section.steps)
  return kwargs


# --- impossible combinations -----------------------------------------------------
def _require(config, path: str, ok: Callable[[Any], bool], what: str) -> None:
  value = _get(config, path)
  if value is _MISSING or value is None:
    return
  if not ok(value):
    raise ConfigError(f"config.{path}", f"{what}, got {value!r}")


def _sections(config, prefix="") -> Iterable[tuple[str, Any]]:
  """Every (dotted path, ConfigDict) below `config`, depth first."""
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      path = f"{prefix}{key}"
      yield path, value
      yield from _sections(value, path + ".")


def check_mesh(config, device_count: int | None) -> None:
  names = _get(config, "mesh.axis_names")
  if names is not _MISSING and tuple(names) != MESH_AXES:
    raise ConfigError("config.mesh.axis_names", f"must be {MESH_AXES}, got {names!r}")
  shape = _get(config, "mesh.shape")
  if shape is _MISSING:
    return
  if len(shape) != len(MESH_AXES):
    raise ConfigError("config.mesh.shape", f"needs {len(MESH_AXES)} entries "
                      f"{MESH_AXES}, got {tuple(shape)}")
  if device_count is None:
    resolve_mesh_shape(shape, math.prod(s for s in shape if s > 0) or 1)
  else:
    resolve_mesh_shape(shape, device_count)


def check_batch_sizes(config, device_count: int | None) -> None:
  dp = None
  if device_count is not None and _get(config, "mesh.shape") is not _MISSING:
    dp = data_parallel_size(config, device_count)
  for path, section in _sections(config):
    for key in section.keys():
      if not (key == "batch_size" or key.endswith("_batch_size")):
        continue
      value = section[key]
      if value is None:
        continue
      field = f"config.{path}.{key}"
      if value < 1:
        raise ConfigError(field, f"must be >= 1, got {value}")
      if dp is not None and value % dp:
        raise ConfigError(field, f"{value} is not divisible by the data-parallel "
                          f"size {dp} (mesh data × fsdp on {device_count} devices)")


def check_sampling(config, device_count: int | None) -> None:
  del device_count
  _require(config, "sampling.temperature", lambda v: v >= 0, "must be >= 0")
  _require(config, "sampling.top_k", lambda v: v >= 0, "must be >= 0 (0 = off)")
  _require(config, "sampling.top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
  _require(config, "sampling.max_new_tokens", lambda v: v >= 1, "must be >= 1")
  _require(config, "sampling.num_samples", lambda v: v >= 1, "must be >= 1")


def check_stages(config, device_count: int | None) -> None:
  del device_count
  stages = _get(config, "stages")
  if stages is _MISSING:
    return
  if not stages:
    raise ConfigError("config.stages", "must name at least one stage")
  for i, stage in enumerate(stages):
    module, _ = stage_module(stage)
    try:
      found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
      found = False
    if not found:
      raise ConfigError(f"config.stages[{i}]", f"unknown stage {stage!r} "
                        f"(no module {module})")


def check_model(config, device_count: int | None) -> None:
  del device_count
  for key in ("max_seq_len", "vocab_size", "dim", "n_layers", "n_heads",
              "n_kv_heads", "mlp_dim"):
    _require(config, f"model.{key}", lambda v: v >= 1, "must be >= 1")
  for key in ("dtype", "param_dtype"):
    _require(config, f"model.{key}", lambda v: v in DTYPES, f"must be one of {DTYPES}")
  _require(config, "model.scan_unroll", lambda v: v == -1 or v >= 1, "must be -1 (auto) or a number of layers >= 1")
  _require(config, "model.microbatch", lambda v: v >= -1, "must be -1 (auto), 0 (off) or a number of rows")
  preset = _get(config, "model.preset", _MISSING)
  if preset is _MISSING:
    return
  from rlhf_jax.models.config import ModelConfig, PRESETS  # pylint: disable=import-outside-toplevel
  if preset not in PRESETS:
    raise ConfigError("config.model.preset", f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
  overrides = {f.name: _get(config, f"model.{f.name}", None) for f in dataclasses.fields(ModelConfig)
               if f.name != "scan_unroll"}  # -1 = auto, resolved by pipelines.common.model_config
  overrides = {k: v for k, v in overrides.items() if v is not None}
  try:
    dataclasses.replace(PRESETS[preset], **overrides)
  except ValueError as e:
    named = re.search(r"ModelConfig\.(\w+)", str(e))
    field = named.group(1) if named else "preset"
    raise ConfigError(f"config.model.{field}", str(e)) from None


def _max_seq_len(config) -> int | None:
  max_len = _get(config, "model.max_seq_len", None)
  if max_len is not None:
    return max_len
  hf_config = _hf_config(config, "model.hf_path")
  if hf_config is not None:
    return hf_config.get("max_position_embeddings")
  preset = _get(config, "model.preset", None)
  from rlhf_jax.models.config import PRESETS  # pylint: disable=import-outside-toplevel
  return PRESETS[preset].max_seq_len if preset in PRESETS else None


def check_lengths(config, device_count: int | None) -> None:
  del device_count
  max_len = _max_seq_len(config)
  prompt = _get(config, "task.max_prompt_len", _MISSING)
  _require(config, "task.max_prompt_len", lambda v: v >= 1, "must be >= 1")
  _require(config, "task.max_response_len", lambda v: v >= 1, "must be >= 1")
  if max_len is None or prompt is _MISSING:
    return
  for path in ("sampling.max_new_tokens", "task.max_response_len"):
    extra = _get(config, path, _MISSING)
    if extra is not _MISSING and prompt + extra > max_len:
      raise ConfigError(f"config.{path}", f"task.max_prompt_len ({prompt}) + "
                        f"{path} ({extra}) exceeds model.max_seq_len ({max_len})")


def check_optimizers(config, device_count: int | None) -> None:
  del device_count
  for path, section in _sections(config):
    if not path.endswith("optimizer"):
      continue
    parent_path = path.rsplit(".", 1)[0] if "." in path else ""
    parent = _get(config, parent_path) if parent_path else config
    _require(config, f"{path}.learning_rate", lambda v: v > 0, "must be > 0")
    _require(config, f"{path}.schedule", lambda v: v in SCHEDULES,
             f"must be one of {SCHEDULES}")
    _require(config, f"{path}.name", lambda v: v in OPTIMIZERS,
             f"must be one of {OPTIMIZERS}")
    _require(config, f"{path}.warmup_steps", lambda v: v >= 0, "must be >= 0")
    _require(config, f"{path}.total_steps", lambda v: v >= 1, "must be >= 1")
    _require(config, f"{path}.end_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    _require(config, f"{path}.weight_decay", lambda v: v >= 0, "must be >= 0")
    _require(config, f"{path}.grad_clip", lambda v: v >= 0, "must be >= 0 (0 = off)")
    _require(config, f"{path}.b1", lambda v: 0 <= v < 1, "must be in [0, 1)")
    _require(config, f"{path}.b2", lambda v: 0 <= v < 1, "must be in [0, 1)")
    _require(config, f"{path}.eps", lambda v: v > 0, "must be > 0")
    warmup = section.get("warmup_steps")
    total = section.get("total_steps")
    total_from = f"config.{path}.total_steps"
    if total is None and isinstance(parent, ml_collections.ConfigDict):
      total = parent.get("steps")
      total_from = f"config.{parent_path}.steps"
    if warmup is not None and total is not None and warmup > total:
      raise ConfigError(f"config.{path}.warmup_steps", f"{warmup} exceeds the "
                        f"total steps ({total_from} = {total})")


def check_algo(config, device_count: int | None) -> None:
  del device_count
  _require(config, "algo.kl_coef", lambda v: v >= 0, "must be >= 0")
  _require(config, "algo.kl_target", lambda v: v > 0, "must be > 0 (or None = fixed)")
  _require(config, "algo.kl_horizon", lambda v: v >= 1, "must be >= 1")
  _require(config, "algo.kl_estimator", lambda v: v in KL_ESTIMATORS,
           f"must be one of {KL_ESTIMATORS}")
  _require(config, "algo.clip_eps", lambda v: v > 0, "must be > 0")
  _require(config, "algo.value_clip_eps", lambda v: v > 0, "must be > 0")
  _require(config, "algo.gamma", lambda v: 0 <= v <= 1, "must be in [0, 1]")
  _require(config, "algo.lam", lambda v: 0 <= v <= 1, "must be in [0, 1]")
  _require(config, "algo.epochs", lambda v: v >= 1, "must be >= 1")
  _require(config, "algo.minibatches", lambda v: v >= 1, "must be >= 1")
  _require(config, "algo.strategy", lambda v: v in STRATEGIES,
           f"must be one of {STRATEGIES}")
  _require(config, "algo.loss_agg", lambda v: v in LOSS_AGGS,
           f"must be one of {LOSS_AGGS}")
  _require(config, "algo.reward_clip", lambda v: v > 0, "must be > 0")


_KEEP_PER_PROMPT = {"best_of_n": 1, "best_random": 2, "best_worst": 2}
ADVANTAGE_KINDS = ("gae", "grpo", "rloo", "reinforce")
RL_STAGES = ("ppo", "grpo")
REWARD_SOURCES = ("rm", "task")
NOISE_SHAPES = ("constant", "midrange")


def check_ppo(config, device_count: int | None) -> None:
  """RL loop shapes that must divide, thresholds the strategy needs, a reward and sampler RL can use."""
  stages = tuple(_get(config, "stages", ()))
  p_count = _get(config, "ppo.prompts_per_iteration", None)
  n = _get(config, "ppo.samples_per_prompt", None)
  if p_count is None or n is None:
    return
  for key in ("prompts_per_iteration", "samples_per_prompt", "iterations", "eval_samples", "checkpoint_every",
              "rollout_batch"):
    _require(config, f"ppo.{key}", lambda v: v >= 1, "must be >= 1")
  _require(config, "ppo.eval_prompts", lambda v: v >= 0, "must be >= 0 (0 = no held-out evaluation)")
  advantage = _get(config, "algo.advantage", "gae")
  _require(config, "algo.advantage", lambda v: v in ADVANTAGE_KINDS, f"must be one of {ADVANTAGE_KINDS}")
  if advantage != "gae" and n < 2:
    raise ConfigError("config.ppo.samples_per_prompt", f"advantage {advantage!r} compares the samples of a prompt: "
                      f"needs at least 2, got {n}")
  if "grpo" in stages and advantage == "gae":
    raise ConfigError("config.algo.advantage", "the grpo stage is critic-free: set grpo, rloo or reinforce "
                      "(or run the ppo stage for GAE with a critic)")
  strategy = _get(config, "algo.strategy", "none")
  keep = min(_KEEP_PER_PROMPT.get(strategy, n), n)
  minibatches = _get(config, "algo.minibatches", 1)
  if (p_count * keep) % minibatches:
    raise ConfigError("config.algo.minibatches", f"{minibatches} minibatches do not divide the "
                      f"{p_count * keep} rows of a PPO update (ppo.prompts_per_iteration={p_count} × "
                      f"{keep} kept per prompt by strategy {strategy!r})")
  if strategy in ("best_random", "best_worst") and n < 2:
    raise ConfigError("config.ppo.samples_per_prompt", f"strategy {strategy!r} needs at least 2 samples per prompt")
  if strategy in ("top", "top_random", "top_bottom") and _get(config, "ppo.threshold", None) is None:
    raise ConfigError("config.ppo.threshold", f"strategy {strategy!r} needs a threshold")
  if strategy == "top_bottom" and _get(config, "ppo.lower_threshold", None) is None:
    raise ConfigError("config.ppo.lower_threshold", "strategy 'top_bottom' needs a lower threshold")
  _require(config, "ppo.reward_source", lambda v: v in REWARD_SOURCES + ("am",),
           "must be 'rm' (the learned reward model), 'am' (the advantage model of the am stage) or 'task' (the "
           "task's exact grader, optionally + noise)")
  _require(config, "ppo.reward_noise", lambda v: v >= 0, "must be >= 0")
  _require(config, "ppo.reward_noise_shape", lambda v: v in NOISE_SHAPES, f"must be one of {NOISE_SHAPES}")
  _require(config, "ppo.critic_init", lambda v: v in ("rm", "sft"), "must be 'rm' or 'sft'")
  _require(config, "ppo.logprob_chunk", lambda v: v >= 0, "must be >= 0 (0 = off)")
  if any(s in RL_STAGES for s in stages):
    if _get(config, "sampling.top_k", 0) or _get(config, "sampling.top_p", 1.0) < 1.0:
      raise ConfigError("config.sampling.top_k" if _get(config, "sampling.top_k", 0) else "config.sampling.top_p",
                        "RL stages sample at a temperature only: the training forward's log-probs, KL and "
                        "entropy refer to softmax(logits / T), which top-k / top-p would change")
    if not _get(config, "sampling.temperature", 1.0) > 0:
      raise ConfigError("config.sampling.temperature", "RL stages need a temperature > 0 (greedy has no log-probs)")
  if device_count is not None and _get(config, "mesh.shape") is not _MISSING:
    dp = data_parallel_size(config, device_count)
    for path, rows in (("ppo.rollout_batch", _get(config, "ppo.rollout_batch", 1)),
                       ("ppo.prompts_per_iteration", p_count)):
      if rows % dp:
        raise ConfigError(f"config.{path}", f"{rows} is not divisible by the data-parallel size {dp}")


def check_task(config, device_count: int | None) -> None:
  """The task exists (built-in or importable `module:function`) and its sizes are usable."""
  del device_count
  name = _get(config, "task.name", None)
  if name is not None:
    from rlhf_jax.tasks.registry import check_task_name  # pylint: disable=import-outside-toplevel
    problem = check_task_name(name)
    if problem:
      raise ConfigError("config.task.name", problem)
  for key in ("num_train", "num_eval", "synthetic_max_len"):
    _require(config, f"task.{key}", lambda v: v >= 1, "must be >= 1")
  eval_task = _get(config, "eval.task", None)
  if eval_task:
    from rlhf_jax.tasks.registry import check_task_name  # pylint: disable=import-outside-toplevel
    problem = check_task_name(eval_task)
    if problem:
      raise ConfigError("config.eval.task", problem)


def check_rm(config, device_count: int | None) -> None:
  del device_count
  _require(config, "rm.num_prompts", lambda v: v >= 2, "must be >= 2 (some are held out)")
  _require(config, "rm.samples_per_prompt", lambda v: v >= 2, "must be >= 2 (pairs compare samples of a prompt)")
  _require(config, "rm.max_pairs_per_prompt", lambda v: v >= 1, "must be >= 1")
  _require(config, "rm.eval_fraction", lambda v: 0 < v < 1, "must be in (0, 1)")
  _require(config, "rm.min_score_gap", lambda v: 0 <= v < 1, "must be in [0, 1)")
  _require(config, "rm.temperature", lambda v: v > 0, "must be > 0")


def check_eval(config, device_count: int | None) -> None:
  del device_count
  _require(config, "eval.num_problems", lambda v: v >= 0, "must be >= 0 (0 = all)")
  _require(config, "eval.num_samples", lambda v: v >= 1, "must be >= 1")
  n = _get(config, "eval.num_samples", None)
  ks = _get(config, "eval.ks", None)
  if n is not None and ks is not None:
    for i, k in enumerate(ks):
      if not 1 <= k <= n:
        raise ConfigError(f"config.eval.ks[{i}]", f"pass@{k} needs 1 <= k <= eval.num_samples ({n})")


def check_finite(config, device_count: int | None) -> None:
  """Every float setting is finite (an inf learning rate is never meant)."""
  del device_count
  for path, section in _sections(config):
    for key in section.keys():
      value = section[key]
      if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config.{path}.{key}", f"must be finite, got {value!r}")


def check_loop(config, device_count: int | None) -> None:
  del device_count
  for path, section in _sections(config):
    for key in ("steps", "eval_every", "every_steps", "max_to_keep", "iterations"):
      if key in section and section[key] is not None and section[key] < 1:
        raise ConfigError(f"config.{path}.{key}", f"must be >= 1, got {section[key]}")
    if "eval_batches" in section and section["eval_batches"] < 0:
      raise ConfigError(f"config.{path}.eval_batches",
                        f"must be >= 0, got {section['eval_batches']}")


RS_SELECTIONS = ("best_of_n", "threshold")
BOND_VARIANTS = ("jbond", "bond")
BOND_BASELINES = ("loo", "none")


def _check_rollout_rows(config, device_count: int | None, paths: Sequence[str]) -> None:
  if device_count is None or _get(config, "mesh.shape") is _MISSING:
    return
  dp = data_parallel_size(config, device_count)
  for path in paths:
    rows = _get(config, path, None)
    if rows is not None and rows % dp:
      raise ConfigError(f"config.{path}", f"{rows} is not divisible by the data-parallel size {dp}")


def _check_sampled_logprobs(config, stage: str) -> None:
  """Stages that train on log-probs of their samples need plain temperature-1 sampling."""
  if _get(config, "sampling.top_k", 0) or _get(config, "sampling.top_p", 1.0) < 1.0:
    raise ConfigError("config.sampling.top_k" if _get(config, "sampling.top_k", 0) else "config.sampling.top_p",
                      f"the {stage} stage trains on the log-probs of its samples: top-k / top-p must be off")


def check_bon(config, device_count: int | None) -> None:
  """Best-of-N inference: N values >= 1, a reward source, prompts."""
  ns = _get(config, "bon.ns", None)
  if ns is None:
    return
  if not ns:
    raise ConfigError("config.bon.ns", "must list at least one N")
  for i, n in enumerate(ns):
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
      raise ConfigError(f"config.bon.ns[{i}]", f"must be an int >= 1, got {n!r}")
  _require(config, "bon.num_prompts", lambda v: v >= 1, "must be >= 1")
  _require(config, "bon.rollout_batch", lambda v: v >= 1, "must be >= 1")
  _require(config, "bon.reward_source", lambda v: v in REWARD_SOURCES, f"must be one of {REWARD_SOURCES}")
  if "bon" in tuple(_get(config, "stages", ())):
    _check_rollout_rows(config, device_count, ("bon.rollout_batch",))


def check_rs(config, device_count: int | None) -> None:
  """Rejection sampling: a selection rule with what it needs, sizes >= 1."""
  if _get(config, "rs.rounds", None) is None:
    return
  for key in ("rounds", "prompts_per_round", "samples_per_prompt", "sft_steps", "eval_samples", "rollout_batch"):
    _require(config, f"rs.{key}", lambda v: v >= 1, "must be >= 1")
  _require(config, "rs.eval_prompts", lambda v: v >= 0, "must be >= 0 (0 = no held-out evaluation)")
  _require(config, "rs.selection", lambda v: v in RS_SELECTIONS, f"must be one of {RS_SELECTIONS}")
  _require(config, "rs.reward_source", lambda v: v in REWARD_SOURCES, f"must be one of {REWARD_SOURCES}")
  if _get(config, "rs.selection", None) == "threshold" and _get(config, "rs.threshold", None) is None:
    raise ConfigError("config.rs.threshold", "selection 'threshold' needs a threshold")
  if "rs" in tuple(_get(config, "stages", ())):
    if not _get(config, "sampling.temperature", 1.0) > 0:
      raise ConfigError("config.sampling.temperature", "rejection sampling needs a temperature > 0 "
                        "(greedy draws N copies of one completion)")
    _check_rollout_rows(config, device_count, ("rs.rollout_batch", "rs.prompts_per_round"))


def check_bond(config, device_count: int | None) -> None:
  """BOND / J-BOND: the variant's sample counts, β, η, γ ranges, temperature-1 sampling."""
  if _get(config, "bond.iterations", None) is None:
    return
  for key in ("prompts_per_iteration", "anchor_samples", "n", "reference_samples", "eval_samples",
              "checkpoint_every", "rollout_batch"):
    _require(config, f"bond.{key}", lambda v: v >= 1, "must be >= 1")
  _require(config, "bond.eval_prompts", lambda v: v >= 0, "must be >= 0 (0 = no held-out evaluation)")
  _require(config, "bond.variant", lambda v: v in BOND_VARIANTS, f"must be one of {BOND_VARIANTS}")
  _require(config, "bond.baseline", lambda v: v in BOND_BASELINES, f"must be one of {BOND_BASELINES}")
  _require(config, "bond.reward_source", lambda v: v in REWARD_SOURCES, f"must be one of {REWARD_SOURCES}")
  _require(config, "bond.beta", lambda v: 0 <= v <= 1, "must be in [0, 1]")
  _require(config, "bond.eta", lambda v: 0 <= v <= 1, "must be in [0, 1] (0 = frozen anchor)")
  _require(config, "bond.gamma", lambda v: v >= 0, "must be >= 0")
  _require(config, "bond.hard_anchor_every", lambda v: v >= 1, "must be >= 1 (or None = EMA anchor)")
  variant, k, n = _get(config, "bond.variant", "jbond"), _get(config, "bond.anchor_samples", 2), _get(
      config, "bond.n", 2)
  if variant == "jbond" and k != 2:
    raise ConfigError("config.bond.anchor_samples", f"J-BOND takes exactly 2 anchor samples per prompt, got {k}")
  if variant == "jbond" and n != 2:
    raise ConfigError("config.bond.n", f"J-BOND distils Best-of-2: must be 2, got {n}")
  if variant == "bond" and n > k:
    raise ConfigError("config.bond.n", f"BOND's forward term needs n <= bond.anchor_samples ({k}), got {n}")
  if "bond" in tuple(_get(config, "stages", ())):
    if _get(config, "sampling.temperature", 1.0) != 1.0:
      raise ConfigError("config.sampling.temperature", "the bond stage's step scores samples under softmax(logits) "
                        f"(temperature 1): sample at 1.0, got {_get(config, 'sampling.temperature')}")
    _check_sampled_logprobs(config, "bond")
    _check_rollout_rows(config, device_count, ("bond.rollout_batch", "bond.prompts_per_iteration"))


def check_am(config, device_count: int | None) -> None:
  """AM coefficients, the mixture's members and weights, Selective Rehearsal settings."""
  del device_count
  for key in ("mean_coef", "bound_coef", "regulation_coef"):
    _require(config, f"am.{key}", lambda v: v >= 0, "must be >= 0 (0 switches the term off)")
  for key in ("bound", "importance_clip", "target_var"):
    _require(config, f"am.{key}", lambda v: v > 0, "must be > 0")
  _require(config, "am.stats_momentum", lambda v: 0 <= v < 1, "must be in [0, 1)")
  _require(config, "am.hist_bins", lambda v: v >= 1, "must be >= 1")
  if _get(config, "task.name", None) == "mixture":
    members = tuple(_get(config, "task.mixture_tasks", ()))
    weights = tuple(_get(config, "task.mixture_weights", ()))
    if not members:
      raise ConfigError("config.task.mixture_tasks", "task 'mixture' needs at least one member")
    if len(set(members)) != len(members):
      raise ConfigError("config.task.mixture_tasks", f"members must be distinct, got {members}")
    from rlhf_jax.tasks.registry import check_mixture_member  # pylint: disable=import-outside-toplevel
    for i, m in enumerate(members):
      problem = check_mixture_member(m)
      if problem:
        raise ConfigError(f"config.task.mixture_tasks[{i}]", problem)
    if weights and len(weights) != len(members):
      raise ConfigError("config.task.mixture_weights", f"needs one weight per member ({len(members)}), got "
                        f"{len(weights)}")
    if weights and (any(w < 0 for w in weights) or sum(weights) <= 0):
      raise ConfigError("config.task.mixture_weights", f"must be >= 0 and not all 0, got {weights}")
  if _get(config, "sr.coef", None) is None:
    return
  _require(config, "sr.coef", lambda v: v >= 0, "must be >= 0 (0 = off)")
  _require(config, "sr.per_cluster", lambda v: v >= 1, "must be >= 1")
  p_count = _get(config, "ppo.prompts_per_iteration", None)
  _require(config, "sr.clusters", lambda v: v >= 1 and (p_count is None or v <= p_count),
           f"must be in [1, ppo.prompts_per_iteration={p_count}]")
  if _get(config, "sr.coef") > 0 and _get(config, "ppo.reward_source", None) != "am":
    raise ConfigError("config.sr.coef", "Selective Rehearsal chooses expert examples by AM score: it "
                      "needs ppo.reward_source='am' (and the am stage)")


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
AUTOIF_WRONG_KINDS = ("off_by_one", "always_true", "inverted", "raises", "hangs", "syntax_error")


def check_dpo(config, device_count: int | None) -> None:
  """Offline and online DPO and the AutoIF data stage: values, and the combinations they cannot run with."""
  for sec in ("dpo", "online_dpo"):
    if _get(config, sec, None) is None:
      continue
    _require(config, f"{sec}.beta", lambda v: v > 0, "must be > 0")
    _require(config, f"{sec}.loss_type", lambda v: v in DPO_LOSS_TYPES, f"must be one of {DPO_LOSS_TYPES}")
    _require(config, f"{sec}.label_smoothing", lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")
    if _get(config, f"{sec}.label_smoothing", 0.0) and _get(config, f"{sec}.loss_type", "sigmoid") != "sigmoid":
      raise ConfigError(f"config.{sec}.label_smoothing", "label smoothing (cDPO) only applies to loss_type 'sigmoid'")
  if _get(config, "online_dpo", None) is not None:
    for key in ("rounds", "prompts_per_round", "samples_per_prompt", "max_pos", "max_neg", "steps_per_round",
                "eval_every", "eval_samples", "rollout_batch"):
      _require(config, f"online_dpo.{key}", lambda v: v >= 1, "must be >= 1")
    _require(config, "online_dpo.samples_per_prompt", lambda v: v >= 2,
             "must be >= 2 (a pair needs a positive and a negative sample of the same prompt)")
    _require(config, "online_dpo.eval_prompts", lambda v: v >= 0, "must be >= 0 (0 = no held-out evaluation)")
    _require(config, "online_dpo.temperature", lambda v: v > 0, "must be > 0 (greedy samples are all alike)")
    _require(config, "online_dpo.reward_source", lambda v: v in ("task", "rm"), "must be 'task' or 'rm'")
    _require(config, "online_dpo.pos_threshold", lambda v: 0 < v <= 1, "must be in (0, 1]")
    _require(config, "online_dpo.reference_update", lambda v: v in ("sft", "previous"), "must be 'sft' or 'previous'")
    _require(config, "online_dpo.reference", lambda v: v in ("precomputed", "inline"),
             "must be 'precomputed' or 'inline'")
    if device_count is not None and _get(config, "mesh.shape") is not _MISSING:
      dp = data_parallel_size(config, device_count)
      rows = _get(config, "online_dpo.rollout_batch", 1)
      if rows % dp:
        raise ConfigError("config.online_dpo.rollout_batch", f"{rows} is not divisible by the data-parallel size {dp}")
  if _get(config, "autoif", None) is not None:
    _require(config, "autoif.supervisor", lambda v: v in ("scripted", "policy", "policy_responses"),
             "must be 'scripted', 'policy' or 'policy_responses'")
    _require(config, "autoif.cross_validation", lambda v: v in ("paper", "code", "none"),
             "must be 'paper', 'code' or 'none'")
    for key in ("verifiers_per_instruction", "queries_per_instruction", "responses_per_prompt", "num_eval",
                "eval_max_constraints"):
      _require(config, f"autoif.{key}", lambda v: v >= 1, "must be >= 1")
    _require(config, "autoif.augment_completions", lambda v: v >= 0, "must be >= 0 (0 = seeds only)")
    _require(config, "autoif.eval_fraction", lambda v: 0 <= v < 1, "must be in [0, 1)")
    _require(config, "autoif.temperature", lambda v: v > 0, "must be > 0")
    _require(config, "autoif.timeout_s", lambda v: v > 0, "must be > 0")
    _require(config, "autoif.response_threshold", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    _require(config, "autoif.min_quality_score", lambda v: 0 <= v <= 10, "must be in [0, 10]")
    chars = _get(config, "autoif.query_chars", None)
    if chars not in (None, _MISSING) and (len(chars) != 2 or chars[0] >= chars[1]):
      raise ConfigError("config.autoif.query_chars", f"must be (min, max) with min < max, got {tuple(chars)!r}")
    wrong = _get(config, "autoif.scripted_wrong_kinds", None)
    if wrong not in (None, _MISSING) and (not wrong or set(wrong) - set(AUTOIF_WRONG_KINDS)):
      raise ConfigError("config.autoif.scripted_wrong_kinds",
                        f"must be a non-empty subset of {AUTOIF_WRONG_KINDS}, got {wrong!r}")
    # Unknown constraint type names are refused by the autoif stage (the catalogue lives in the host layer).
    if "startend:repeat_prompt" in (_get(config, "autoif.train_types", ()) or ()):
      raise ConfigError("config.autoif.train_types", "'startend:repeat_prompt' takes its parameters from the query "
                        "and cannot be a seed instruction")


_SHAPE_FIELDS = ("max_seq_len", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim")


def _hf_config(config, path: str) -> dict | None:
  """config.json of the checkpoint directory named by the field `path` (None when unset); ConfigError if unusable."""
  import os  # pylint: disable=import-outside-toplevel
  directory = _get(config, path, None)
  if directory in (None, _MISSING, ""):
    return None
  file = os.path.join(directory, "config.json")
  if not os.path.isdir(directory):
    raise ConfigError(f"config.{path}", f"{directory!r} is not a directory")
  if not os.path.isfile(file):
    raise ConfigError(f"config.{path}", f"{directory!r} has no config.json (a Hugging Face checkpoint directory)")
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.{path}", f"cannot read {file}: {e}") from None


def check_hf(config, device_count: int | None) -> None:
  """Hugging Face checkpoints (model.hf_path, rm.hf_path), chat template and LoRA settings."""
  del device_count
  import os  # pylint: disable=import-outside-toplevel
  _require(config, "model.lora_rank", lambda v: v >= 0, "must be >= 0 (0 = no LoRA)")
  _require(config, "model.lora_alpha", lambda v: v > 0, "must be > 0")
  if (_get(config, "model.lora_rank", 0) or 0) > 0:
    full = [s for s in (_get(config, "stages", ()) or ()) if s in ("dpo", "online_dpo", "rs", "bond")]
    if full:
      raise ConfigError("config.model.lora_rank", f"LoRA is implemented in the sft, ppo and grpo stages (rm and am "
                        f"train their scalar models fully); stages {full} would train all weights: run them "
                        "with lora_rank=0")
  policy = _hf_config(config, "model.hf_path")
  if policy is not None:
    arch = (policy.get("architectures") or [""])[0]
    if not arch.endswith("ForCausalLM"):
      raise ConfigError("config.model.hf_path", f"needs a *ForCausalLM checkpoint, got architecture {arch!r}")
    if not os.path.isfile(os.path.join(_get(config, "model.hf_path"), "tokenizer.json")):
      raise ConfigError("config.model.hf_path", "the checkpoint has no tokenizer.json (its tokenizer is used)")
    for key in _SHAPE_FIELDS:
      if _get(config, f"model.{key}", None) not in (None, _MISSING):
        raise ConfigError(f"config.model.{key}", "must stay unset with model.hf_path: the checkpoint's config.json "
                          "fixes the model's shape (model.preset is ignored too)")
  elif _get(config, "model.chat_template", False) is True:
    raise ConfigError("config.model.chat_template", "needs model.hf_path (the byte tokenizer has no chat template)")
  reward = _hf_config(config, "rm.hf_path")
  if reward is None:
    return
  arch = (reward.get("architectures") or [""])[0]
  if not arch.endswith("ForSequenceClassification"):
    raise ConfigError("config.rm.hf_path", f"needs a *ForSequenceClassification checkpoint, got {arch!r}")
  if "rm" in tuple(_get(config, "stages", ()) or ()):
    raise ConfigError("config.rm.hf_path", "an external reward model replaces the rm stage: remove 'rm' from "
                      "config.stages (or unset rm.hf_path)")
  if policy is not None and reward.get("vocab_size") != policy.get("vocab_size"):
    raise ConfigError("config.rm.hf_path", f"vocab_size {reward.get('vocab_size')} differs from the policy's "
                      f"{policy.get('vocab_size')}: the reward model scores the policy's tokens, so it needs the "
                      "same tokenizer")


Check = Callable[[ml_collections.ConfigDict, "int | None"], None]
DEFAULT_CHECKS: tuple[Check, ...] = (
    check_stages, check_finite, check_mesh, check_batch_sizes, check_sampling, check_model,
    check_lengths, check_loop, check_optimizers, check_algo, check_task, check_rm, check_ppo, check_eval,
    check_bon, check_rs, check_bond, check_am, check_dpo, check_hf,
)


def validate_config(config: ml_collections.ConfigDict,
                    schema: ml_collections.ConfigDict, *,
                    device_count: int | None = None,
                    checks: Sequence[Check] = DEFAULT_CHECKS) -> None:
  """Raises `ConfigError` naming the first invalid field of `config`.

  Checks, in order: every field exists in `schema` (and every schema field in
  `config`); each value has the schema default's type (int is accepted for
  float, list for tuple, None only where the schema default is None, i.e. a
  `placeholder`); then each function in `checks` (impossible combinations).

  Args:
    config: the run's config.
    schema: the base config (`experiments/configs/base.get_base_config()`).
    device_count: `jax.device_count()`; when None, checks that need the device
      count (mesh product, batch divisibility) test only what they can.
    checks: the combination checks; `DEFAULT_CHECKS + (my_check,)` to add one.

  Raises:
    ConfigError: with `.field` the full dotted field name.
  """
  _check_structure(config, schema, "config")
  for check in checks:
    check(config, device_count)


def config_to_json(config: ml_collections.ConfigDict, *, indent: int = 2) -> str:
  """The config as sorted, indented JSON (tuples become lists)."""
  return json.dumps(config.to_dict(), indent=indent, sort_keys=True, default=repr)
