"""Public entry points: validate once, fill the defaults, let the registry pick a backend, run it.

``implementation=`` names a backend (``gqa_pallas.IMPLEMENTATIONS``) or is ``None`` for the
device's preference (``gqa_pallas.registry``); ``config=`` is that backend's static config for the
op (``None``: its default for the shape and device).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gqa_pallas import devices, reference, registry, validation, vjp
from gqa_pallas.cache import KVCache


def _plan(op, q, k, v, q_offset, kv_lengths, scale, implementation, interpret, config, causal,
          return_lse, sliding_window=None, logits_soft_cap=None):
  """Validates once and fills the defaults: ``(backend, config, q_offset, kv_lengths, scale,
  problem)``."""
  # A Python int offset is static: every row starts there (a backend may rely on it).
  offset = ("default" if q_offset is None else
            int(q_offset) if isinstance(q_offset, (int, np.integer)) and not isinstance(
                q_offset, (bool, np.bool_)) else "array")
  kv_lengths_given = kv_lengths is not None
  dims, q_offset, kv_lengths = validation.validate_attention(q, k, v, q_offset, kv_lengths)
  validation.check_flags(causal=causal, interpret=interpret, return_lse=return_lse)
  validation.check_scale(scale)
  sliding_window, logits_soft_cap = validation.check_window_and_cap(sliding_window,
                                                                    logits_soft_cap, causal)
  problem = registry.Problem(op, dims, jnp.dtype(q.dtype).name, causal=bool(causal),
                             interpret=bool(interpret), device=devices.current(),
                             sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                             return_lse=bool(return_lse), offset=offset,
                             kv_lengths_given=kv_lengths_given)
  backend = registry.resolve(implementation, problem)
  config = registry.check_config(backend, op, config, problem)
  q_offset, kv_lengths = reference.resolve_positions(dims, q_offset, kv_lengths)
  scale = float(1.0 / math.sqrt(dims.head_dim) if scale is None else scale)
  return backend, config, q_offset, kv_lengths, scale, problem


def _empty(dims) -> bool:
  """No (row, query, head) sees a key: the result is 0 (lse ``-inf``) without a launch."""
  return 0 in (dims.batch, dims.q_len, dims.kv_len, dims.num_heads)


def gqa_attention(q, k, v, *, causal=True, q_offset=None, kv_lengths=None, scale=None,
                  implementation=None, interpret=False, return_lse=False, config=None,
                  sliding_window=None, logits_soft_cap=None):
  """Causal (or full) grouped-query attention with the reference's semantics.

  Args:
    q: ``[B, T, N, H]``; k, v: ``[B, S, K, H]``, ``N % K == 0``, one dtype (bf16/fp16/fp32).
    causal: mask keys after each query's absolute position ``q_offset[b] + t``.
    q_offset: ``int32[B]`` position of each row's first query; default ``kv_lengths - T``.
    kv_lengths: ``int32[B]`` valid keys per row; default ``S``. Slots past it are never read.
    scale: logit scale, default ``1/sqrt(H)``.
    implementation: a backend name (``gqa_pallas.IMPLEMENTATIONS``) or ``None`` (the device's
      preference: the Pallas kernels on a GPU, XLA elsewhere).
    interpret: run the Pallas kernel's code in interpret mode (CPU).
    return_lse: also return the log-sum-exp ``float32[B, T, N]`` (``-inf`` for empty rows).
    config: the backend's static prefill config (e.g. ``gqa_pallas.triton.prefill.
      PrefillConfig``); ``None`` for its default.
    sliding_window: static int: a query at position ``p`` sees only keys ``j > p -
      sliding_window`` (itself and the ``sliding_window - 1`` before it; causal only). ``None``:
      no window.
    logits_soft_cap: static float: scaled logits ``s`` become ``cap * tanh(s / cap)`` (Gemma 2);
      ``None``: off.

  Returns:
    ``[B, T, N, H]`` in q's dtype (and the lse). Differentiable in q, k, v.
  """
  backend, config, q_offset, kv_lengths, scale, problem = _plan(
      "prefill", q, k, v, q_offset, kv_lengths, scale, implementation, interpret, config, causal,
      return_lse, sliding_window, logits_soft_cap)
  if _empty(problem.dims):
    return reference.empty_result(q, return_lse)  # nothing to launch, whatever the backend
  # Lengths past S act as S, negative ones as 0 (design.md): the kernels get them in range.
  kv_lengths = jnp.clip(kv_lengths, 0, problem.dims.kv_len)
  backward = registry.resolve_backward(backend, problem)
  plan = vjp.Plan(forward=backend, backward=backward, causal=bool(causal), scale=scale,
                  return_lse=bool(return_lse), interpret=bool(interpret), config=config,
                  backward_config=backward.default_config(registry.backward_problem(problem)),
                  sliding_window=problem.sliding_window,
                  logits_soft_cap=problem.logits_soft_cap)
  return vjp.prefill(q, k, v, q_offset, kv_lengths, plan)


def gqa_decode(q, cache: KVCache, *, q_offset=None, scale=None, implementation=None,
               interpret=False, return_lse=False, config=None, sliding_window=None,
               logits_soft_cap=None):
  """Attention of a few new query tokens per row over a KV cache that already holds them.

  Args:
    q: ``[B, N, H]`` (one token per row) or ``[B, T, N, H]`` with
      ``T <= validation.MAX_DECODE_QUERIES`` (16).
    cache: a ``KVCache`` (unstacked) whose ``lengths`` include the new tokens.
    q_offset: ``int32[B]`` absolute position of each row's first query; default
      ``cache.lengths - T`` (the new tokens are the last ``T`` the cache holds).
    scale, implementation, interpret, return_lse: as in ``gqa_attention``.
    config: the backend's static decode config (e.g. ``gqa_pallas.triton.decode.
      DecodeConfig``); ``None`` for its default.
    sliding_window, logits_soft_cap: as in ``gqa_attention`` (with a window only the last
      ``sliding_window`` keys of each row are read).

  Returns:
    Output with q's shape and dtype (and the lse ``float32[B, (T,) N]``). Differentiable in q
    and the cache's k/v (through the reference's VJP: ``T`` is small).
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
  if q.shape[1] > validation.MAX_DECODE_QUERIES:
    raise ValueError(f"gqa_decode handles T <= {validation.MAX_DECODE_QUERIES} new tokens per "
                     f"row; got T={q.shape[1]}. Use gqa_attention with the cache's k/v for "
                     "longer chunks.")
  # The backend gets q_offset=None for the default (lengths - T): a kernel can derive it itself
  # instead of launching an elementwise op per step.
  offset_given = q_offset is not None
  backend, config, q_offset, kv_lengths, scale, problem = _plan(
      "decode", q, cache.k, cache.v, q_offset, cache.lengths, scale, implementation, interpret,
      config, True, return_lse, sliding_window, logits_soft_cap)
  if _empty(problem.dims):
    res = reference.empty_result(q, return_lse)
    return jax.tree_util.tree_map(lambda x: x[:, 0], res) if single else res
  plan = vjp.DecodePlan(backend=backend, scale=scale, return_lse=bool(return_lse),
                        interpret=bool(interpret), config=config,
                        sliding_window=problem.sliding_window,
                        logits_soft_cap=problem.logits_soft_cap)
  res = vjp.decode(q, cache.k, cache.v, q_offset if offset_given else None, kv_lengths, plan)
  if single:
    res = jax.tree_util.tree_map(lambda x: x[:, 0], res)
  return res
