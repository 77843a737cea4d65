"""Model shapes: one frozen dataclass and the named presets."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

_DTYPES = ("float32", "bfloat16", "float16")
# RoPE frequency scalings we implement, with the fields each needs (as Hugging Face names them).
ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the decoder-only Transformer.

  `dtype` is the compute dtype of activations and matmuls; `param_dtype` the
  storage dtype of the weights. Softmaxes and log-softmaxes are always float32.

  Fields the Hugging Face families need (defaults leave the presets unchanged):
  `qkv_bias` adds biases to the q/k/v projections (Qwen2); `qk_norm` applies a
  per-head RMSNorm to q and k before RoPE (Qwen3); `head_dim_override` sets
  head_dim independently of dim / n_heads (Qwen3); `rope_scaling` is a sorted
  tuple of (name, value) items such as `(("factor", 8.0), ..., ("rope_type",
  "llama3"))` (a dict is accepted and converted, so the config stays hashable).

  `scan_layers` stacks the layers' weights and runs them as one `nn.scan` (small
  programs, fast compiles at depth); `scan_unroll` layers per loop iteration of
  that scan (`n_layers` = straight-line code: same weights and layout, longer
  compiles, and on XLA:CPU a 10–35% faster backward, see
  experiments/benchmarks/README.md).
  """

  vocab_size: int = 260
  dim: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  mlp_dim: int = 384
  max_seq_len: int = 512
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  scan_unroll: int = 1
  qkv_bias: bool = False
  qk_norm: bool = False
  head_dim_override: Optional[int] = None
  rope_scaling: Optional[tuple] = None

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "max_seq_len", "scan_unroll"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.head_dim_override is not None:
      if int(self.head_dim_override) <= 0 or int(self.head_dim_override) % 2:
        raise ValueError(f"ModelConfig.head_dim_override must be a positive even number, got {self.head_dim_override}")
    elif self.dim % self.n_heads:
      raise ValueError(f"ModelConfig.n_heads={self.n_heads} does not divide dim={self.dim}")
    object.__setattr__(self, "rope_scaling", _canonical_rope_scaling(self.rope_scaling))
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not one of {_DTYPES}")

  @property
  def head_dim(self) -> int:
    return int(self.head_dim_override) if self.head_dim_override is not None else self.dim // self.n_heads

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def num_params(self, *, with_head: bool = True) -> int:
    """Parameter count from the shapes (matches the initialised pytree; the scalar head counted as its weight)."""
    d, hd = self.dim, self.head_dim
    attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
    if self.qkv_bias:
      attn += (self.n_heads + 2 * self.n_kv_heads) * hd
    if self.qk_norm:
      attn += 2 * hd
    mlp = 3 * d * self.mlp_dim
    per_layer = attn + mlp + 2 * d
    total = self.vocab_size * d + self.n_layers * per_layer + d
    if with_head and not self.tie_embeddings:
      total += d * self.vocab_size
    return total


def _canonical_rope_scaling(scaling) -> tuple | None:
  """None, or the sorted (name, value) items of a supported RoPE scaling; raises naming the field."""
  if scaling is None:
    return None
  try:
    items = dict(scaling)
  except (TypeError, ValueError):
    raise ValueError(f"ModelConfig.rope_scaling must be a dict or (name, value) items, got {scaling!r}") from None
  kind = items.get("rope_type", items.get("type"))
  items.pop("type", None)
  if kind in (None, "default"):
    return None
  if kind not in ROPE_SCALINGS:
    raise ValueError(f"ModelConfig.rope_scaling: rope_type {kind!r} is not supported; "
                     f"supported: {sorted(ROPE_SCALINGS)}")
  missing = [k for k in ROPE_SCALINGS[kind] if k not in items]
  if missing:
    raise ValueError(f"ModelConfig.rope_scaling of type {kind!r} lacks {missing}")
  items["rope_type"] = kind
  for k, v in items.items():
    if isinstance(v, (list, dict)):
      raise ValueError(f"ModelConfig.rope_scaling[{k!r}] must be a scalar, got {v!r}")
  return tuple(sorted(items.items()))


PRESETS: dict[str, ModelConfig] = {
    # ~0.8M parameters: unit tests and the CPU smoke runs.
    "tiny": ModelConfig(),
    # ~19M parameters: the CPU experiments.
    "small": ModelConfig(dim=384, n_layers=12, n_heads=6, n_kv_heads=2, mlp_dim=1024, max_seq_len=1024),
    # Llama-3.2-1B and Llama-3.1-8B shapes (128k vocabulary); only built abstractly on CPU.
    "llama_1b": ModelConfig(vocab_size=128_256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                            mlp_dim=8192, max_seq_len=8192, rope_theta=500_000.0, norm_eps=1e-5,
                            tie_embeddings=True, dtype="bfloat16", param_dtype="bfloat16"),
    "llama_8b": ModelConfig(vocab_size=128_256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                            mlp_dim=14_336, max_seq_len=8192, rope_theta=500_000.0, norm_eps=1e-5,
                            tie_embeddings=False, dtype="bfloat16", param_dtype="bfloat16"),
}


def resolve_scan_unroll(value: Optional[int], n_layers: int) -> int:
  """A run config's `model.scan_unroll`: -1 or None (auto) = every layer on the CPU backend (the straight-line
  backward is 10–35% faster there), 1 elsewhere (short compiles at depth); k >= 1 = min(k, n_layers)."""
  if value is None or int(value) == -1:
    import jax  # pylint: disable=import-outside-toplevel
    return n_layers if jax.default_backend() == "cpu" else 1
  return min(int(value), n_layers)


def get_model_config(preset: str, **overrides: Any) -> ModelConfig:
  """The named preset with fields replaced by `overrides` (None values ignored)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
  overrides = {k: v for k, v in overrides.items() if v is not None}
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown:
    raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
  return dataclasses.replace(PRESETS[preset], **overrides)
