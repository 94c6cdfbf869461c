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
