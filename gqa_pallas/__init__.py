"""gqa-pallas: Pallas GPU kernels for grouped-query attention, with a pure-jnp reference."""
from gqa_pallas.api import IMPLEMENTATIONS, gqa_attention, gqa_decode
from gqa_pallas.cache import KVCache
from gqa_pallas.reference import attention_reference
from gqa_pallas.validation import AttentionDims

__all__ = ["IMPLEMENTATIONS", "KVCache", "AttentionDims", "attention_reference", "gqa_attention",
           "gqa_decode"]
__version__ = "0.1.0"
