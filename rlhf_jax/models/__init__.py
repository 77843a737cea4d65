"""The decoder-only Transformer shared by policy, reference, reward and value models."""

from rlhf_jax.models.config import PRESETS, ModelConfig, get_model_config
from rlhf_jax.models.transformer import Transformer, apply_rope, attention_bias, init_cache, positions_from_mask
from rlhf_jax.models.params import (abstract_params, count_params, init_params, logical_axes, lm_to_scalar_params,
                                    make_apply_fn)

__all__ = [
    "PRESETS", "ModelConfig", "get_model_config", "Transformer", "apply_rope", "attention_bias", "init_cache",
    "positions_from_mask", "abstract_params", "count_params", "init_params", "logical_axes", "lm_to_scalar_params",
    "make_apply_fn",
]
