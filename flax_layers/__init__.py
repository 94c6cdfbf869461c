"""Flax layers on top of gqa_pallas: grouped-query attention for linen and NNX."""
from flax_layers.attention import GQAAttention, GQAAttentionNNX, NNXGQAAttention
from flax_layers.core import (apply_rotary_embedding, gqa_dot_product_attention, masked_attention,
                              rope, rope_inv_freq, rotate_half)

__all__ = [
    "GQAAttention",
    "GQAAttentionNNX",
    "NNXGQAAttention",
    "apply_rotary_embedding",
    "gqa_dot_product_attention",
    "masked_attention",
    "rope",
    "rope_inv_freq",
    "rotate_half",
]

# Llama/Qwen2/Mistral/Gemma 2 decoder, HF checkpoint loading and the jit generation loop.
from flax_layers.checkpoint import UnsupportedCheckpointError, load_hf_checkpoint
from flax_layers.decoder import (MLP, Decoder, DecoderBlock, DecoderConfig, RMSNorm, init_cache,
                                 init_params, stack_layer_params, unstack_layer_params)
from flax_layers.generation import generate, generate_with_cache, sample_logits
from flax_layers.partitioning import (LOGICAL_RULES, cache_logical_axes, param_logical_axes,
                                      shard_cache, shard_params)

__all__ += [
    "MLP",
    "Decoder",
    "DecoderBlock",
    "DecoderConfig",
    "LOGICAL_RULES",
    "RMSNorm",
    "UnsupportedCheckpointError",
    "cache_logical_axes",
    "generate",
    "generate_with_cache",
    "init_cache",
    "init_params",
    "load_hf_checkpoint",
    "param_logical_axes",
    "sample_logits",
    "shard_cache",
    "shard_params",
    "stack_layer_params",
    "unstack_layer_params",
]
