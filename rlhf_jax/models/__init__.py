"""The decoder-only Transformer shared by policy, reference, reward and value models.

Built from a preset or from a local Hugging Face checkpoint (`load_pretrained`),
optionally with LoRA adapters (`rlhf_jax.models.lora`).
"""

from rlhf_jax.models.config import PRESETS, ModelConfig, get_model_config, resolve_scan_unroll
from rlhf_jax.models.transformer import (Transformer, apply_rope, attention_bias, init_cache, positions_from_mask,
                                         rescan_params, rope_inv_freq, unscan_params)
from rlhf_jax.models.params import (abstract_params, count_params, init_params, logical_axes, lm_to_scalar_params,
                                    make_apply_fn)
from rlhf_jax.models.hf import load_pretrained, save_pretrained
from rlhf_jax.models.lora import (LORA_TARGETS, apply_lora, init_lora, lora_logical_axes, lora_optimizer,
                                  make_lora_apply_fn, merge_lora)
from rlhf_jax.models.logprobs import chunked_completion_logprobs, head_logits, unembedding

__all__ = [
    "PRESETS", "ModelConfig", "get_model_config", "resolve_scan_unroll", "Transformer", "apply_rope",
    "attention_bias", "init_cache",
    "positions_from_mask", "rescan_params", "rope_inv_freq", "unscan_params", "abstract_params", "count_params", "init_params", "logical_axes",
    "lm_to_scalar_params", "make_apply_fn", "load_pretrained", "save_pretrained", "LORA_TARGETS", "apply_lora",
    "init_lora", "lora_logical_axes", "lora_optimizer", "make_lora_apply_fn", "merge_lora",
    "chunked_completion_logprobs", "head_logits", "unembedding",
]
