"""Model shapes: one frozen dataclass and the named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the decoder-only Transformer.

  `dtype` is the compute dtype of activations and matmuls; `param_dtype` the
  storage dtype of the weights. Softmaxes and log-softmaxes are always float32.
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

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "max_seq_len"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.dim % self.n_heads:
      raise ValueError(f"ModelConfig.n_heads={self.n_heads} does not divide dim={self.dim}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not one of {_DTYPES}")

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  def num_params(self, *, with_head: bool = True) -> int:
    """Parameter count from the shapes (matches the initialised pytree)."""
    d, hd = self.dim, self.head_dim
    attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
    mlp = 3 * d * self.mlp_dim
    per_layer = attn + mlp + 2 * d
    total = self.vocab_size * d + self.n_layers * per_layer + d
    if with_head and not self.tie_embeddings:
      total += d * self.vocab_size
    return total


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


def get_model_config(preset: str, **overrides: Any) -> ModelConfig:
  """The named preset with fields replaced by `overrides` (None values ignored)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
  overrides = {k: v for k, v in overrides.items() if v is not None}
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown:
    raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
  return dataclasses.replace(PRESETS[preset], **overrides)
