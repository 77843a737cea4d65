"""Host-side pieces shared by the pipeline stages: model, mesh, data, state, checkpoints."""

from __future__ import annotations

import dataclasses
import functools
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
from rlhf_jax.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

# Fields of the config's `model` section that override the preset's ModelConfig.
_MODEL_OVERRIDES = ("max_seq_len", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim")


def hf_path(config) -> str:
  """The policy's Hugging Face checkpoint directory (`model.hf_path`), "" when the model is a preset."""
  return config.model.get("hf_path") or ""


def model_config(config) -> ModelConfig:
  """The policy's ModelConfig: the preset with the config's shape overrides, or with `model.hf_path` the
  checkpoint's config.json (the only file read) with the config's dtype (compute) and param_dtype (storage)."""
  if hf_path(config):
    from rlhf_jax.models import hf  # pylint: disable=import-outside-toplevel
    path = hf_path(config)
    cfg = hf.config_from_hf(hf.read_hf_config(path), dtype=config.model.param_dtype,
                            where=os.path.join(path, "config.json"))
    return dataclasses.replace(cfg, dtype=config.model.dtype,
                               scan_unroll=models.resolve_scan_unroll(config.model.get("scan_unroll"), cfg.n_layers))
  over = {k: config.model.get(k) for k in _MODEL_OVERRIDES if config.model.get(k) is not None}
  cfg = models.get_model_config(config.model.preset, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                                **over)
  return dataclasses.replace(cfg, scan_unroll=models.resolve_scan_unroll(config.model.get("scan_unroll"), cfg.n_layers))


def microbatch(config):
  """`model.microbatch` as the steps take it: -1 = "auto", 0 = None (off), k = at most k rows.

  Auto is off with LoRA: the chunk loop would carry a gradient accumulator for the frozen base as well (zeros,
  but a loop buffer of the base's size); an explicit k still chunks.
  """
  value = config.model.get("microbatch")
  if value is None or int(value) == -1:
    return None if lora_rank(config) else "auto"
  return int(value) or None


def make_mesh(config) -> Mesh:
  return shd.make_mesh(tuple(config.mesh.shape))


def tokenizer(config) -> Tokenizer:
  """The byte tokenizer, or the checkpoint's (`model.hf_path`), which puts every prompt in its chat template
  when `model.chat_template` (`tokenizer.format_prompt`, applied by `encode_prompts`)."""
  if not hf_path(config):
    return ByteTokenizer()
  return _hf_tokenizer(hf_path(config), bool(config.model.get("chat_template", False)))


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(path: str, chat_prompts: bool) -> HFTokenizer:
  try:
    return HFTokenizer.from_pretrained_dir(path, chat_prompts=chat_prompts)
  except ValueError as e:
    raise ValueError(f"config.model.hf_path / chat_template: {e}") from None


# --- the policy: checkpoint or random init, LoRA, export ------------------------------------
def lora_rank(config) -> int:
  return int(config.model.get("lora_rank", 0) or 0)


def init_policy_params(config, rng: jax.Array, mesh: Mesh) -> Any:
  """The policy's starting parameters, born sharded on `mesh`: the checkpoint's (`model.hf_path`, read leaf by
  leaf), else a random init of the preset from `rng`."""
  cfg = model_config(config)
  if hf_path(config):
    loaded, params = models.load_pretrained(hf_path(config), head="lm", dtype=config.model.param_dtype, mesh=mesh)
    assert dataclasses.replace(loaded, dtype=cfg.dtype, scan_unroll=cfg.scan_unroll) == cfg, (loaded, cfg)
    return params
  return jax.jit(lambda r: models.init_params(cfg, r), out_shardings=param_shardings(cfg, mesh))(rng)


def policy_optimizer(config, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` for full fine-tuning; with LoRA `lora_optimizer(tx)`: adapters only, no state for the base."""
  return models.lora_optimizer(tx) if lora_rank(config) else tx


def policy_apply_fn(config, cfg: ModelConfig) -> Callable:
  """The LM apply function of trained policy params: plain, or over {"base", "lora"} with LoRA."""
  apply_fn = models.make_apply_fn(cfg)
  return models.make_lora_apply_fn(apply_fn, alpha=float(config.model.lora_alpha)) if lora_rank(config) else apply_fn


def policy_state(config, cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rng: jax.Array,
                 params: Any) -> tuple[TrainState, TrainState]:
  """The TrainState of a policy that starts at `params` (`tx` from `policy_optimizer`).

  Full fine-tuning: the params. LoRA (`model.lora_rank` > 0): `{"base": params, "lora": fresh adapters}` (B = 0,
  so the model starts equal to `params`); the whole tree is checkpointed (the base is unchanged by every step).
  """
  if not lora_rank(config):
    return create_state(lambda r, p: p, models.logical_axes(cfg), tx, mesh, rng, params)
  specs = {"base": models.logical_axes(cfg), "lora": models.lora_logical_axes(cfg)}
  init = lambda r, p: {"base": p, "lora": models.init_lora(cfg, jax.random.fold_in(r, 1), rank=lora_rank(config))}
  return create_state(init, specs, tx, mesh, rng, params)


@functools.partial(jax.jit, static_argnames=("alpha",))
def _merge_lora(base, lora, *, alpha: float):
  merged = models.apply_lora(base, lora, alpha=alpha)
  return jax.tree.map(lambda m, p: m.astype(p.dtype), merged, base)


def plain_params(config, params: Any) -> Any:
  """Policy params as the plain model's (what samplers, later stages and exports take): LoRA merged in."""
  if lora_rank(config) and isinstance(params, dict) and "lora" in params:
    return _merge_lora(params["base"], params["lora"], alpha=float(config.model.lora_alpha))
  return params


def reference_of(config, params: Any, reference: Any) -> Any:
  """The reference policy for `policy_apply_fn`: with LoRA the trained state's base, `{"base": W}` (the same
  buffers, no copy; take it from the current state, as the state is donated), else `reference`."""
  return {"base": params["base"]} if lora_rank(config) else reference


def export_hf(config, params: Any, out_dir: str, *, head: str = "lm") -> Optional[str]:
  """`<out_dir>/hf/`: a stage's final params as a Hugging Face checkpoint, with the source checkpoint's tokenizer
  files; only with `model.hf_path` (returns None otherwise). LoRA params are merged first. A scalar head is
  written as *ForSequenceClassification without our score bias (HF's score layer has none; preferences and
  normalised rewards do not depend on it)."""
  if not hf_path(config):
    return None
  path = models.save_pretrained(model_config(config), plain_params(config, params), os.path.join(out_dir, "hf"),
                                head=head, source_dir=hf_path(config), drop_score_bias=head == "scalar")
  print(f"[export] Hugging Face checkpoint written to {path}", flush=True)
  return path


def load_external_reward_model(config, policy_cfg: ModelConfig, mesh: Mesh) -> tuple[ModelConfig, Any]:
  """(ModelConfig, params) of `rm.hf_path`, a *ForSequenceClassification checkpoint, born sharded; it scores the
  policy's token ids, so it must have the policy's vocabulary."""
  path = config.rm.hf_path
  rm_cfg, params = models.load_pretrained(path, head="scalar", dtype=config.model.param_dtype, mesh=mesh)
  if rm_cfg.vocab_size != policy_cfg.vocab_size:
    raise ValueError(f"config.rm.hf_path: vocab_size {rm_cfg.vocab_size} differs from the policy's "
                     f"{policy_cfg.vocab_size}; the reward model must share the policy's tokenizer")
  unroll = models.resolve_scan_unroll(config.model.get("scan_unroll"), rm_cfg.n_layers)
  return dataclasses.replace(rm_cfg, dtype=config.model.dtype, scan_unroll=unroll), params


def reward_statistics(config, rm_cfg: ModelConfig, rm_params: Any, sampler, policy_params: Any, tok: Tokenizer,
                      records: list, *, batch_size: int, rng: jax.Array, mesh: Mesh) -> tuple[float, float]:
  """(mean, std) of a reward model's scores of `sampler`'s samples from `policy_params` for `records`.

  What an external reward model (`rm.hf_path`) is normalised with, as the rm stage's own statistics are (there
  on its held-out SFT samples): here the SFT policy's samples of the stage's held-out prompts. Deterministic in
  `rng`, so a resumed run recomputes the same values.
  """
  from rlhf_jax import rollout  # pylint: disable=import-outside-toplevel
  from rlhf_jax.steps import make_score_fn  # pylint: disable=import-outside-toplevel
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len
  texts = rollout.generate_texts(sampler, policy_params, tok, records, batch_size=batch_size, max_prompt_len=plen,
                                 rng=rng, mesh=mesh)
  n = sampler.sampling.num_samples
  prompts = [r["prompt"] for r in records for _ in range(n)]
  score = jax.jit(make_score_fn(models.make_apply_fn(rm_cfg, head="scalar")))
  scores = rollout.score_texts(score, rm_params, tok, prompts, texts, batch_size=batch_size, max_prompt_len=plen,
                               max_response_len=rlen, mesh=mesh)
  return float(np.mean(scores)), float(max(np.std(scores), 1e-6))


def data_dir(config, workdir: str) -> str:
  return config.task.data_dir or os.path.join(workdir, "data")


def make_task(config, workdir: str):
  """The config's task (built-in or `package.module:make_task`), its datasets under the data dir."""
  from rlhf_jax.tasks.registry import make_task as _make_task  # pylint: disable=import-outside-toplevel
  return _make_task(config, data_dir(config, workdir))


# --- provenance: a finished stage is reused only with the settings that made it -----------------
# The config sections that decide each stage's result (its own and those of the stages it builds on).
_BASE_SECTIONS = ("seed", "model", "task")
STAGE_SECTIONS = {
    "sft": _BASE_SECTIONS + ("sft",),
    "rm": _BASE_SECTIONS + ("sft", "rm", "sampling"),
    "ppo": _BASE_SECTIONS + ("sft", "rm", "sampling", "algo", "ppo"),
    "autoif": _BASE_SECTIONS + ("autoif",),
    "dpo": _BASE_SECTIONS + ("sft", "autoif", "dpo"),
    "online_dpo": _BASE_SECTIONS + ("sft", "rm", "autoif", "sampling", "online_dpo"),
    "bon": _BASE_SECTIONS + ("sft", "rm", "sampling", "bon"),
    "rs": _BASE_SECTIONS + ("sft", "rm", "sampling", "rs"),
    "bond": _BASE_SECTIONS + ("sft", "rm", "sampling", "bond"),
    "am": _BASE_SECTIONS + ("sft", "rm", "sampling", "am"),
    "ppo_am": _BASE_SECTIONS + ("sft", "rm", "sampling", "am", "algo", "ppo", "sr"),
}


def stage_settings(config, stage: str) -> dict:
  """The flattened settings that decide a stage's result, `{"algo.strategy": "best_random", ...}`."""
  sections = STAGE_SECTIONS.get(stage, STAGE_SECTIONS["ppo"])
  flat: dict[str, Any] = {}

  def walk(prefix, node):
    if hasattr(node, "items"):
      for k, v in node.items():
        walk(f"{prefix}.{k}" if prefix else k, v)
    else:
      flat[prefix] = list(node) if isinstance(node, tuple) else node

  for name in sections:
    if name in config:
      walk(name, config[name])
  # Where results are written and how often they are shown does not change them.
  return {k: v for k, v in flat.items() if not k.startswith("task.data_dir")}


def _commit() -> str:
  import subprocess  # pylint: disable=import-outside-toplevel
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
  except Exception:  # pylint: disable=broad-except
    return "unknown"


def _schema_defaults(stage: str) -> dict:
  try:
    from experiments.configs.base import get_base_config  # pylint: disable=import-outside-toplevel
  except ImportError:  # the library used without the experiments package: compare the fields both runs have
    return {}
  return stage_settings(get_base_config(), stage)


class SettingsChanged(ValueError):
  """A stage's saved work was made with other settings than this run's (a usage error: exit 2)."""


def check_provenance(out_dir: str, config, stage: str, *, ignore: tuple = ()) -> None:
  """Records the stage's settings, or refuses when its saved work came from different ones.

  A finished or partly trained stage is reused only with the settings that
  produced it; otherwise the run stops here, naming every changed field,
  instead of reporting new settings next to old parameters.
  """
  path = os.path.join(out_dir, "provenance.json")
  # `ignore`: fields a resumed run may change (e.g. SFT's step count: training longer continues the same run)
  settings = {k: v for k, v in stage_settings(config, stage).items() if k not in ignore}
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f).get("settings", {})
    # A field added to the schema after the stage ran counts as unchanged while it keeps its default.
    defaults = _schema_defaults(stage)
    saved = {k: v for k, v in saved.items() if k not in ignore}
    changed = sorted(k for k in set(saved) | set(settings)
                     if saved.get(k, defaults.get(k, "<absent>")) != settings.get(k, defaults.get(k, "<absent>")))
    if changed:
      shown = "; ".join(f"{k}: {saved.get(k, '<absent>')!r} -> {settings.get(k, '<absent>')!r}" for k in changed[:8])
      more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
      raise SettingsChanged(
          f"stage {stage!r} in {out_dir} was run with other settings: {shown}{more}. Its results are kept as they "
          f"are. Run the new settings in a new --workdir (to reuse finished earlier stages, copy or symlink their "
          f"directories into it), or delete {out_dir} to redo this stage.")
    return
  os.makedirs(out_dir, exist_ok=True)
  write_json(path, {"stage": stage, "settings": settings, "commit": _commit(), "seed": int(config.seed)})


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
  if isinstance(abstract_state.opt_state, optax.MultiTransformState):  # LoRA's lora_optimizer
    opt = _multi_transform_shardings(abstract_state.opt_state, param_shardings, mesh)
  else:
    opt = shd.opt_state_shardings(tx, abstract_state.opt_state, param_shardings, mesh)
  return TrainState(step=rep, params=param_shardings, opt_state=opt, rng=rep)


def _multi_transform_shardings(abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of an `optax.multi_transform` state, which `optax.tree_map_params` cannot map: each inner state's
  moments are parameter-shaped trees (MaskedNode where another transform owns the parameter), so a leaf whose
  path ends with a parameter's path takes that parameter's sharding; counts and the rest are replicated."""
  rep = shd.replicated(mesh)
  by_path = {tuple(path): s for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

  def pick(path, leaf):
    for i in range(len(path)):
      if tuple(path[i:]) in by_path:
        return by_path[tuple(path[i:])]
    return rep

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


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
  """Final parameters of a stage (what later stages load), with checksums; replaces what `directory` held.

  Written by orbax into `<directory>.tmp`, then swapped in by renames, so a
  crash leaves the old or the new parameters complete, never a mix; an earlier
  (or corrupt) copy is replaced even when it has the same step. Raises
  `CheckpointError` (params with NaN/Inf, disk full, ...) with nothing replaced.
  """
  import shutil  # pylint: disable=import-outside-toplevel

  def sync_processes(name: str) -> None:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(name)

  step = int(meta.get("step", 0))
  if "://" in directory:  # object stores cannot rename directories: orbax's own atomic commit
    with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
      ckpt.save(step, {"params": params}, meta=meta, force=True)
    return
  directory = os.path.abspath(directory)
  tmp, old = f"{directory}.tmp", f"{directory}.old"
  main = jax.process_index() == 0
  if main:
    shutil.rmtree(tmp, ignore_errors=True)
  sync_processes(f"save_params-clear-{directory}")
  with Checkpointer(tmp, max_to_keep=1, async_save=False) as ckpt:
    ckpt.save(step, {"params": params}, meta=meta, force=True)
  if main:
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(directory):
      os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
  sync_processes(f"save_params-swap-{directory}")


def load_params(directory: str, abstract_params: Any, shardings: Any) -> tuple[Any, dict]:
  """Parameters saved by `save_params`, restored straight into `shardings` and checked against their checksums.

  Raises:
    CheckpointError: nothing saved there, or the saved parameters are
      unreadable or corrupt (the message says which and how to redo them).
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"no saved parameters at {directory}: run the stage that produces them first")
  target = {"params": abstract_like(abstract_params, sharding=shardings)}
  try:
    with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
      restored, meta = ckpt.restore(target)
  except CheckpointError as e:
    raise CheckpointError(f"the saved parameters at {directory} cannot be used; rerun the stage that produces "
                          f"them (it rebuilds them from its training checkpoints). {e}") from None
  return restored["params"], meta


def has_params(directory: str) -> bool:
  """True when `directory` holds final parameters that read back intact (checksums verified).

  Corrupt or unreadable parameters count as absent, with a one-line notice on
  stdout naming the problem, so a stage rebuilds them instead of reporting
  that it reuses them. Reads the whole parameter tree onto the host.
  """
  if not os.path.isdir(directory):
    return False
  try:
    with Checkpointer(directory, max_to_keep=1, async_save=False) as ckpt:
      if ckpt.latest_step() is None:
        return False
      problem = ckpt.verify()
  except CheckpointError as e:
    problem = str(e).splitlines()[0]
  if problem is not None:
    print(f"[params] the saved parameters at {directory} are corrupt and will not be reused: {problem}", flush=True)
    return False
  return True


def _json_safe(obj: Any) -> Any:
  """Non-finite floats become null (valid JSON); numpy scalars become Python numbers."""
  if isinstance(obj, dict):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  if isinstance(obj, (np.generic, np.ndarray)) and np.ndim(obj) == 0:
    obj = obj.item()
  if isinstance(obj, float) and not np.isfinite(obj):
    return None
  return obj


def write_json(path: str, obj: Any) -> None:
  """Atomic, strictly valid JSON write (tmp + rename; NaN/inf written as null); multi-host: process 0 only."""
  if jax.process_index() != 0:
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(_json_safe(obj), f, indent=2, sort_keys=True, default=float, allow_nan=False)
  os.replace(tmp, path)


def to_host(tree: Any) -> Any:
  """One device_get for a tree of metrics, converted to Python floats.

  Multi-host: a replicated array is read from this process's copy; a sharded
  one (not a metric) raises ValueError.
  """
  def local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(f"to_host: a metric of shape {x.shape} is sharded across processes; reduce or replicate "
                         "it in the jitted step (out_shardings=replicated)")
      return x.addressable_data(0)
    return x

  return jax.tree.map(lambda x: float(np.asarray(x)), jax.device_get(jax.tree.map(local, tree)))


def mean_metrics(items: list[dict]) -> dict:
  return {k: float(np.mean([m[k] for m in items])) for k in items[0]} if items else {}


def fold(rng: jax.Array, *ints: int) -> jax.Array:
  for i in ints:
    rng = jax.random.fold_in(rng, i)
  return rng


def drop_rows_after(path: str, step: int) -> None:
  """A resumed run rewrites the steps after its checkpoint: drop their old metrics rows (never duplicated)."""
  from rlhf_jax.utils import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  if os.path.exists(path):
    metrics_lib.truncate_metrics(path, step)


def first_eval_row(path: str) -> dict:
  """The held-out evaluation logged before the first iteration (step 0), for a resumed run's summary."""
  from rlhf_jax.utils import read_metrics  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    return {}
  rows = [r for r in read_metrics(path) if "eval/success_rate" in r]
  return {k: v for k, v in rows[0].items() if k.startswith("eval/")} if rows and rows[0]["step"] == 0 else {}
