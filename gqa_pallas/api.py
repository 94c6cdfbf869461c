"""Public entry points and dispatch: validate once, then run one backend.

Backends (``implementation=``):
  * ``"triton"``: the Pallas kernels lowered through Triton (any sm80+ GPU; ``interpret=True`` runs
    the same kernel code on the CPU).
  * ``"xla"``: the ``jit``-compiled reference.
  * ``None``: the fastest available: ``"triton"`` on a CUDA GPU (or whenever ``interpret=True``),
    ``"xla"`` elsewhere.
"""
from __future__ import annotations

import functools
import math

import jax

from gqa_pallas import decode_triton, prefill_triton, reference, validation
from gqa_pallas.cache import KVCache

IMPLEMENTATIONS = ("triton", "xla")


def _on_gpu() -> bool:
  """Whether the default backend is a GPU (the Triton kernels need sm80+ CUDA GPUs)."""
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:
    return False


def resolve_implementation(implementation, interpret: bool) -> str:
  if implementation is None:
    return "triton" if (interpret or _on_gpu()) else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None; got "
                     f"{implementation!r}.")
  if implementation == "xla" and interpret:
    raise ValueError("interpret=True runs a Pallas kernel; it needs implementation='triton' or None.")
  return implementation


@functools.partial(jax.jit, static_argnames=("causal", "scale", "return_lse"))
def _xla_attention(q, k, v, q_offset, kv_lengths, *, causal, scale, return_lse):
  return reference.attention_reference(q, k, v, causal=causal, q_offset=q_offset,
                                       kv_lengths=kv_lengths, scale=scale, return_lse=return_lse)


def _prepare(q, k, v, q_offset, kv_lengths, scale, implementation, interpret):
  """Validates once and fills the defaults: ``(impl, q_offset, kv_lengths, scale)``."""
  dims, q_offset, kv_lengths = validation.validate_attention(q, k, v, q_offset, kv_lengths)
  validation.check_scale(scale)
  impl = resolve_implementation(implementation, interpret)
  q_offset, kv_lengths = reference.resolve_positions(dims, q_offset, kv_lengths)
  scale = float(1.0 / math.sqrt(dims.head_dim) if scale is None else scale)
  return impl, q_offset, kv_lengths, scale


def gqa_attention(q, k, v, *, causal=True, q_offset=None, kv_lengths=None, scale=None,
                  implementation=None, interpret=False, return_lse=False):
  """Causal (or full) grouped-query attention with the reference's semantics.

  Args:
    q: ``[B, T, N, H]``; k, v: ``[B, S, K, H]``, ``N % K == 0``, one dtype (bf16/fp16/fp32).
    causal: mask keys after each query's absolute position ``q_offset[b] + t``.
    q_offset: ``int32[B]`` position of each row's first query; default ``kv_lengths - T``.
    kv_lengths: ``int32[B]`` valid keys per row; default ``S``. Slots past it are never read.
    scale: logit scale, default ``1/sqrt(H)``.
    implementation: ``"triton"``, ``"xla"`` or ``None`` (fastest available).
    interpret: run the Pallas kernel in interpret mode (CPU).
    return_lse: also return the log-sum-exp ``float32[B, T, N]`` (``-inf`` for empty rows).

  Returns:
    ``[B, T, N, H]`` in q's dtype (and the lse).
  """
  impl, q_offset, kv_lengths, scale = _prepare(q, k, v, q_offset, kv_lengths, scale,
                                               implementation, interpret)
  if impl == "xla":
    return _xla_attention(q, k, v, q_offset, kv_lengths, causal=causal, scale=scale,
                          return_lse=return_lse)
  return prefill_triton.prefill_attention(q, k, v, q_offset, kv_lengths, causal=causal,
                                          scale=scale, return_lse=return_lse, interpret=interpret)


def gqa_decode(q, cache: KVCache, *, q_offset=None, scale=None, implementation=None,
               interpret=False, return_lse=False):
  """Attention of a few new query tokens per row over a KV cache that already holds them.

  Args:
    q: ``[B, N, H]`` (one token per row) or ``[B, T, N, H]`` with ``T <= 16``.
    cache: a ``KVCache`` (unstacked) whose ``lengths`` include the new tokens.
    q_offset: ``int32[B]`` absolute position of each row's first query; default
      ``cache.lengths - T`` (the new tokens are the last ``T`` the cache holds).
    scale, implementation, interpret, return_lse: as in ``gqa_attention``.

  Returns:
    Output with q's shape and dtype (and the lse ``float32[B, (T,) N]``).
  """
  if not isinstance(cache, KVCache):
    raise TypeError(f"cache must be a gqa_pallas.KVCache; got {type(cache).__name__}.")
  if cache.num_layers is not None:
    raise ValueError("gqa_decode takes one layer's cache; index a stacked cache with "
                     "cache.layer(i) or scan over its leading axis.")
  single = getattr(q, "ndim", None) == 3
  if single:
    q = q[:, None]
  validation.check_rank("q", q, 4, "[B, N, H] or [B, T, N, H]")
  if q.shape[1] > 16:
    raise ValueError(f"gqa_decode handles T <= 16 new tokens per row; got T={q.shape[1]}. "
                     "Use gqa_attention with the cache's k/v for longer chunks.")
  offset_given = q_offset is not None
  impl, q_offset, kv_lengths, scale = _prepare(q, cache.k, cache.v, q_offset, cache.lengths,
                                               scale, implementation, interpret)
  if impl == "xla":
    res = _xla_attention(q, cache.k, cache.v, q_offset, kv_lengths, causal=True, scale=scale,
                         return_lse=return_lse)
  else:
    # The kernel derives the default q_offset itself (no extra elementwise launch per step).
    res = decode_triton.decode_attention(q, cache.k, cache.v, q_offset if offset_given else None,
                                         kv_lengths, scale=scale, return_lse=return_lse,
                                         interpret=interpret)
  if single:
    res = jax.tree_util.tree_map(lambda x: x[:, 0], res)
  return res
