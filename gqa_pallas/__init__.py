"""gqa-pallas: Pallas GPU kernels for grouped-query attention, with a pure-jnp reference."""
from gqa_pallas import registry
from gqa_pallas.api import gqa_attention, gqa_decode
from gqa_pallas.cache import KVCache
from gqa_pallas.reference import attention_reference
from gqa_pallas.validation import AttentionDims

# The registered backend names. Computing it imports every backend (and with the Triton one,
# Pallas' fuser) up front: on jax 0.11 a lazy import inside the first interpret-mode pallas_call
# would register a trace-context flag and make a user's jit step retrace once.
IMPLEMENTATIONS = registry.names()

__all__ = ["IMPLEMENTATIONS", "KVCache", "AttentionDims", "attention_reference", "gqa_attention",
           "gqa_decode"]
__version__ = "0.1.0"
