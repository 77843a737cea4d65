"""Hugging Face checkpoints in and out: Llama, Qwen2 and Qwen3.

`load_pretrained(dir)` reads a local directory as `transformers` writes it
(config.json plus one `model.safetensors` or several shards with
`model.safetensors.index.json`; 4.x configs with `rope_theta`/`rope_scaling`
and 5.x configs with `rope_parameters`) and returns `(ModelConfig, params)`.
`save_pretrained(cfg, params, dir)` writes the same format back, which
`transformers` loads with equal logits. Nothing is downloaded.

Supported: `LlamaForCausalLM` (tied or untied embeddings, llama3/linear RoPE
scaling), `Qwen2ForCausalLM` (QKV bias), `Qwen3ForCausalLM` (QK-norm,
explicit head_dim), and with `head="scalar"` their `*ForSequenceClassification`
with one label, the usual reward-model format (score read at the last token;
HF's `score` has no bias, so our `score_bias` loads as 0).

The families differ only in ModelConfig fields (`_FAMILIES`); every tensor is
moved by one table, `_PARAM_MAP`: our parameter path -> HF tensor name and a
transform. HF `nn.Linear` weights are [out, in]; ours are [in..., out...]
(`wq: [D, H, Dh]`, `wo: [H, Dh, D]`), so a "linear" entry is `W.T.reshape`.
Layers are scanned in our model: a layer entry is read for every layer i and
stacked on a leading "layers" axis (or placed under `layer_{i}` when
`scan_layers=False`).

With a `mesh`, every parameter is born sharded: the tensors of one leaf are
read into host memory (numpy), and each device receives its own slice of it
through `jax.make_array_from_callback` with the leaf's NamedSharding (from the
model's logical axes). At most one leaf is held on the host at a time, and no
device ever holds the whole model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Optional

import jax
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.params import abstract_params, logical_axes

# model_type -> (class-name prefix, the ModelConfig fields the family fixes).
_FAMILIES: dict[str, tuple[str, dict[str, bool]]] = {
    "llama": ("Llama", {"qkv_bias": False, "qk_norm": False}),
    "qwen2": ("Qwen2", {"qkv_bias": True, "qk_norm": False}),
    "qwen3": ("Qwen3", {"qkv_bias": False, "qk_norm": True}),
}
_HEADS = {"lm": "ForCausalLM", "scalar": "ForSequenceClassification"}
ARCHITECTURES = tuple(prefix + suffix for prefix, _ in _FAMILIES.values() for suffix in _HEADS.values())

_L = "model.layers.{i}."
# our path (inside one layer for the layer entries) -> (HF tensor name, transform, number of input axes of ours).
# Transforms: "same" (identical layout), "vector" (HF 1-D -> our shape), "linear" (HF [out, in] -> ours
# [*in, *out] = W.T.reshape, the first `n_in` of our axes being the input).
_PARAM_MAP: dict[str, tuple[str, str, int]] = {
    "embedding": ("model.embed_tokens.weight", "same", 0),
    "final_norm/scale": ("model.norm.weight", "vector", 0),
    "lm_head": ("lm_head.weight", "linear", 1),
    "score_head": ("score.weight", "linear", 1),
    "attn_norm/scale": (_L + "input_layernorm.weight", "vector", 0),
    "mlp_norm/scale": (_L + "post_attention_layernorm.weight", "vector", 0),
    "attn/wq": (_L + "self_attn.q_proj.weight", "linear", 1),
    "attn/wk": (_L + "self_attn.k_proj.weight", "linear", 1),
    "attn/wv": (_L + "self_attn.v_proj.weight", "linear", 1),
    "attn/wo": (_L + "self_attn.o_proj.weight", "linear", 2),
    "attn/bq": (_L + "self_attn.q_proj.bias", "vector", 0),
    "attn/bk": (_L + "self_attn.k_proj.bias", "vector", 0),
    "attn/bv": (_L + "self_attn.v_proj.bias", "vector", 0),
    "attn/q_norm/scale": (_L + "self_attn.q_norm.weight", "vector", 0),
    "attn/k_norm/scale": (_L + "self_attn.k_norm.weight", "vector", 0),
    "mlp/w_gate": (_L + "mlp.gate_proj.weight", "linear", 1),
    "mlp/w_up": (_L + "mlp.up_proj.weight", "linear", 1),
    "mlp/w_down": (_L + "mlp.down_proj.weight", "linear", 1),
}
# Tensors a checkpoint may hold that the model does not use (old rotary caches).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# Files of a source checkpoint that an export carries over unchanged.
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


# ----------------------------------------------------------------------------- config


def read_hf_config(path: str) -> dict:
  """config.json of a checkpoint directory as a dict."""
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint path {path!r} is not a directory")
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise ValueError(f"checkpoint {path!r} has no config.json")
  with open(file) as f:
    return json.load(f)


def _architecture(hf: dict, where: str) -> tuple[str, str]:
  """(model_type, head) of the checkpoint's architecture; ValueError when unsupported."""
  archs = hf.get("architectures") or []
  if not archs and hf.get("model_type") in _FAMILIES:
    archs = [_FAMILIES[hf["model_type"]][0] + _HEADS["lm"]]
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(f"{where}: architecture {archs or hf.get('model_type')!r} is not supported; "
                     f"supported: {list(ARCHITECTURES)}")
  for model_type, (prefix, _) in _FAMILIES.items():
    for head, suffix in _HEADS.items():
      if archs[0] == prefix + suffix:
        return model_type, head
  raise AssertionError(archs)


def config_from_hf(hf: dict, *, dtype: Optional[str] = None, where: str = "config.json") -> ModelConfig:
  """ModelConfig of a Hugging Face config dict (transformers 4.x or 5.x layout).

  `dtype` sets both compute and storage dtype; by default the checkpoint's
  (`dtype` / `torch_dtype`, float32 when absent).
  """
  model_type, _ = _architecture(hf, where)
  family = _FAMILIES[model_type][1]

  def need(key):
    if hf.get(key) is None:
      raise ValueError(f"{where}: field {key!r} is missing")
    return hf[key]

  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
  for key in ("attention_bias", "mlp_bias"):  # Llama/Qwen3 options that add o_proj or MLP biases
    if hf.get(key):
      raise ValueError(f"{where}: {key}=true is not supported")
  if hf.get("use_sliding_window"):
    raise ValueError(f"{where}: use_sliding_window=true is not supported")
  rope = hf.get("rope_parameters")
  if isinstance(rope, dict) and rope:
    if "rope_theta" not in rope and all(isinstance(v, dict) for v in rope.values()):
      raise ValueError(f"{where}: per-layer-type rope_parameters are not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
  else:
    theta, scaling = hf.get("rope_theta", 10_000.0), hf.get("rope_scaling")
  if scaling and float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
  if scaling:
    scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
  dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
  head_dim = hf.get("head_dim")
  override = int(head_dim) if head_dim and (dim % n_heads or int(head_dim) != dim // n_heads) else None
  dt = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
  if dt not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"{where}: dtype {dt!r} is not one of float32, bfloat16, float16")
  try:
    return ModelConfig(
        vocab_size=int(need("vocab_size")), dim=dim, n_layers=int(need("num_hidden_layers")), n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), mlp_dim=int(need("intermediate_size")),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)), rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dt, param_dtype=dt, head_dim_override=override, rope_scaling=scaling or None, **family)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def config_to_hf(cfg: ModelConfig, *, head: str = "lm", token_ids: Optional[dict] = None) -> dict:
  """The config.json of our model (4.x keys, which transformers 4.x and 5.x both read)."""
  if cfg.qkv_bias and cfg.qk_norm:
    raise ValueError("ModelConfig with both qkv_bias and qk_norm matches no supported Hugging Face family")
  model_type = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
  hf = {
      "architectures": [_FAMILIES[model_type][0] + _HEADS[head]],
      "model_type": model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": cfg.rope_scaling_dict,
      "tie_word_embeddings": cfg.tie_embeddings,
      "hidden_act": "silu",
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "torch_dtype": cfg.param_dtype,
  }
  if model_type != "qwen2":
    hf["attention_bias"] = False
  if model_type == "llama":
    hf["mlp_bias"] = False
  else:
    hf.update(use_sliding_window=False, sliding_window=None)
  if head == "scalar":
    hf.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
    hf[key] = (token_ids or {}).get(key)
  return hf


# ----------------------------------------------------------------------------- tensors


class _Checkpoint:
  """Read-only access to the tensors of one or many safetensors files, one tensor at a time (numpy)."""

  def __init__(self, path: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      weight_map = None
    if not files:
      raise ValueError(f"checkpoint {path!r} has no *.safetensors file")
    self._handles = {}
    self.where = {}
    for name in files:
      file = os.path.join(path, name)
      if not os.path.isfile(file):
        raise ValueError(f"checkpoint {path!r}: shard {name!r} named in the index is missing")
      self._handles[name] = safe_open(file, framework="np")
      for key in self._handles[name].keys():
        if weight_map is None or weight_map.get(key) == name:
          self.where[key] = name
    self.path = path
    # Checkpoints saved from a bare *Model have no "model." prefix.
    self._prefix = "" if ("model.embed_tokens.weight" not in self.where
                          and "embed_tokens.weight" in self.where) else "model."
    self.used: set[str] = set()

  def close(self):
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles = {}

  def name(self, hf_name: str) -> str:
    return hf_name[len("model."):] if hf_name.startswith("model.") and not self._prefix else hf_name

  def __contains__(self, hf_name: str) -> bool:
    return self.name(hf_name) in self.where

  def get(self, hf_name: str, needed_for: str) -> np.ndarray:
    name = self.name(hf_name)
    if name not in self.where:
      raise ValueError(f"checkpoint {self.path!r}: tensor {name!r} is missing (needed for {needed_for})")
    self.used.add(name)
    return self._handles[self.where[name]].get_tensor(name)

  def unused(self) -> list[str]:
    return sorted(k for k in self.where if k not in self.used and not _IGNORED.match(k))


def _hf_shape(kind: str, n_in: int, ours: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "same":
    return tuple(ours)
  if kind == "vector":
    return (math.prod(ours),)
  return (math.prod(ours[n_in:]), math.prod(ours[:n_in]))


def _to_ours(x: np.ndarray, kind: str, n_in: int, ours: tuple[int, ...], name: str) -> np.ndarray:
  expected = _hf_shape(kind, n_in, ours)
  if tuple(x.shape) != expected:
    raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)}, but the config implies {expected}")
  return x.T.reshape(ours) if kind == "linear" else x.reshape(ours)


def _to_hf(x: np.ndarray, kind: str, n_in: int) -> np.ndarray:
  if kind == "same":
    return np.ascontiguousarray(x)
  if kind == "vector":
    return np.ascontiguousarray(x.reshape(-1))
  return np.ascontiguousarray(x.reshape(math.prod(x.shape[:n_in]), -1).T)


def _split_path(path: str) -> tuple[str, Optional[int], bool]:
  """(path inside a layer or at the top, layer index for unscanned layers, stacked?)."""
  if path.startswith("layers/block/"):
    return path[len("layers/block/"):], None, True
  m = re.match(r"layer_(\d+)/(.*)", path)
  if m:
    return m.group(2), int(m.group(1)), False
  return path, None, False


def _key_str(keypath) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in keypath)


def _read_leaf(ckpt: _Checkpoint, path: str, shape, dtype, lm_checkpoint: bool) -> np.ndarray:
  """Our parameter `path` as a host array of `shape`/`dtype`, read from the checkpoint tensor by tensor."""
  if path == "score_bias":
    return np.zeros(shape, dtype)
  if path == "score_head" and lm_checkpoint:
    return np.zeros(shape, dtype)  # a causal-LM checkpoint as a reward/value backbone: fresh zero head
  inner, layer, stacked = _split_path(path)
  if inner not in _PARAM_MAP:
    raise ValueError(f"parameter {path!r} has no entry in the Hugging Face key map")
  hf_name, kind, n_in = _PARAM_MAP[inner]
  if stacked:
    out = np.empty(shape, dtype)
    for i in range(shape[0]):
      name = hf_name.format(i=i)
      out[i] = _to_ours(ckpt.get(name, path), kind, n_in, tuple(shape[1:]), name)
    return out
  name = hf_name.format(i=layer)
  return _to_ours(ckpt.get(name, path), kind, n_in, tuple(shape), name).astype(dtype)


def load_pretrained(path: str, *, head: str = "lm", dtype: Optional[str] = None, mesh=None,
                    scan_layers: bool = True) -> tuple[ModelConfig, Any]:
  """Load a local Hugging Face checkpoint directory.

  Args:
    path: directory with config.json and *.safetensors (optionally sharded with an index).
    head: "lm" (next-token logits, needs a *ForCausalLM checkpoint) or "scalar" (one value per token: a
      *ForSequenceClassification checkpoint with num_labels=1; a *ForCausalLM checkpoint gives its backbone
      with a zero-initialised score head, the usual reward-model / critic start).
    dtype: compute and storage dtype; default the checkpoint's.
    mesh: when given, each parameter is created directly with its NamedSharding on this mesh.
    scan_layers: the ModelConfig.scan_layers of the result (stacked layers, the default, or `layer_{i}`).

  Returns:
    (cfg, params): the ModelConfig and the parameter pytree of `Transformer(cfg, head=head)`.
  """
  if head not in _HEADS:
    raise ValueError(f"head must be one of {sorted(_HEADS)}, got {head!r}")
  hf = read_hf_config(path)
  where = os.path.join(path, "config.json")
  _, ckpt_head = _architecture(hf, where)
  if head == "lm" and ckpt_head != "lm":
    raise ValueError(f"{where}: head='lm' needs a *ForCausalLM checkpoint, got {hf['architectures'][0]}")
  if ckpt_head == "scalar":
    labels = hf.get("id2label") or {}
    n_labels = len(labels) if labels else hf.get("num_labels", 2)
    if n_labels != 1:
      raise ValueError(f"{where}: a reward model needs num_labels=1, got {n_labels}")
  cfg = config_from_hf(hf, dtype=dtype, where=where)
  if not scan_layers:
    cfg = dataclasses.replace(cfg, scan_layers=False)
  abstract = abstract_params(cfg, head=head)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  if mesh is not None:
    from rlhf_jax import sharding as shd  # pylint: disable=import-outside-toplevel
    shardings = treedef.flatten_up_to(shd.logical_to_sharding(logical_axes(cfg, head=head), mesh))
  else:
    shardings = [None] * len(leaves)
  ckpt = _Checkpoint(path)
  if cfg.tie_embeddings or head == "scalar":
    ckpt.used.add(ckpt.name("lm_head.weight"))  # tied copy, or the LM head of a backbone
  out = []
  for (keypath, leaf), sharding in zip(leaves, shardings):
    host = _read_leaf(ckpt, _key_str(keypath), leaf.shape, leaf.dtype, ckpt_head == "lm")
    if sharding is None:
      out.append(jax.device_put(host))
    else:
      out.append(jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx]))
    del host
  ckpt.close()
  unused = ckpt.unused()
  if unused:
    raise ValueError(f"checkpoint {path!r}: tensors {unused[:8]}{'...' if len(unused) > 8 else ''} "
                     f"have no place in the model (config.json and the weights disagree)")
  return cfg, jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- export


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _hf_tensors(cfg: ModelConfig, params, head: str, drop_score_bias: bool):
  """Yield (HF name, host array) for every parameter, one leaf in host memory at a time."""
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = _key_str(keypath)
    if path == "score_bias":
      bias = _host(leaf)
      if np.any(bias != 0) and not drop_score_bias:
        raise ValueError(f"score_bias={bias.tolist()} is nonzero but Hugging Face's score layer has no bias; "
                         "pass drop_score_bias=True to export without it (Bradley-Terry preferences and "
                         "advantages do not depend on it)")
      continue
    if head == "lm" and path.startswith("score_"):
      raise ValueError(f"parameter {path!r} belongs to a scalar head; export with head='scalar'")
    inner, layer, stacked = _split_path(path)
    if inner not in _PARAM_MAP:
      raise ValueError(f"parameter {path!r} has no entry in the Hugging Face key map")
    hf_name, kind, n_in = _PARAM_MAP[inner]
    x = _host(leaf)
    if stacked:
      for i in range(x.shape[0]):
        yield hf_name.format(i=i), _to_hf(x[i], kind, n_in)
    else:
      yield hf_name.format(i=layer), _to_hf(x, kind, n_in)


def save_pretrained(cfg: ModelConfig, params, path: str, *, head: str = "lm", source_dir: Optional[str] = None,
                    token_ids: Optional[dict] = None, drop_score_bias: bool = False,
                    max_shard_bytes: int = 4 << 30) -> str:
  """Write `params` as a Hugging Face checkpoint directory that `transformers` loads.

  Writes config.json (architectures, model_type, shapes, RoPE) and
  model.safetensors, or `model-0000k-of-0000n.safetensors` shards of at most
  `max_shard_bytes` plus model.safetensors.index.json. With `source_dir` the
  tokenizer and generation files of the original checkpoint are copied and
  its bos/eos/pad token ids kept (`token_ids` overrides them). The directory
  is written next to `path` and renamed into place, so a crash leaves no
  half-written export. Only process 0 writes; every process must call it.

  Returns the path.
  """
  if head not in _HEADS:
    raise ValueError(f"head must be one of {sorted(_HEADS)}, got {head!r}")
  ids = {}
  if source_dir:
    src = read_hf_config(source_dir)
    ids = {k: src.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  ids.update(token_ids or {})
  hf = config_to_hf(cfg, head=head, token_ids=ids)
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  writer = jax.process_index() == 0
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp_hf_", dir=parent) if writer else None
  shards, current, size, weight_map = [], {}, 0, {}

  def flush():
    nonlocal current, size
    if current and writer:
      name = f"part-{len(shards):05d}.safetensors"
      save_file(current, os.path.join(tmp, name), metadata={"format": "pt"})
      shards.append((name, list(current)))
    current, size = {}, 0

  total = 0
  for name, x in _hf_tensors(cfg, params, head, drop_score_bias):
    if current and size + x.nbytes > max_shard_bytes:
      flush()
    current[name] = x
    size += x.nbytes
    total += x.nbytes
  flush()
  if not writer:
    return path
  if len(shards) == 1:
    os.rename(os.path.join(tmp, shards[0][0]), os.path.join(tmp, "model.safetensors"))
  else:
    for k, (name, keys) in enumerate(shards):
      final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      os.rename(os.path.join(tmp, name), os.path.join(tmp, final))
      weight_map.update({key: final for key in keys})
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  if source_dir:
    for name in _SIDE_FILES:
      if os.path.isfile(os.path.join(source_dir, name)):
        shutil.copy2(os.path.join(source_dir, name), os.path.join(tmp, name))
  if os.path.isdir(path):
    old = tempfile.mkdtemp(prefix=".old_hf_", dir=parent)
    os.rename(path, os.path.join(old, "x"))
    os.rename(tmp, path)
    shutil.rmtree(old)
  else:
    os.rename(tmp, path)
  return path
