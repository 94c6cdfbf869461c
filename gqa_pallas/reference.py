"""Pure-``jnp`` reference: the single definition of the package's semantics.

Attention: query row ``t`` of batch row ``b`` sits at absolute position ``q_offset[b] + t``; key
``j`` is visible iff ``j < kv_lengths[b]`` and, when causal, ``j <= q_offset[b] + t`` (and, with
a ``sliding_window`` W, ``j > q_offset[b] + t - W``). With ``logits_soft_cap`` c the scaled logits
``s`` become ``c * tanh(s / c)`` before masking. Defaults:
``kv_lengths = S``, ``q_offset = kv_lengths - T`` (bottom-right alignment). Rows with no visible
key give 0 and lse ``-inf``; anything stored at or past ``kv_lengths[b]`` (NaN included) never
reaches the output. A non-finite value (NaN, +-inf) in a slot a query cannot see (past the
length, causally in its future, outside its window) never reaches that query either; a query
that sees one gets NaN (``finite_keys``, ``poison``).

Cache append: row ``b`` writes its first ``num_new[b]`` new tokens at slots ``lengths[b] + t``
(a length outside ``[0, S_max]`` acts as the nearest end);
a token that would land at or past ``S_max`` is dropped (no wrap, no spill into another row), the
length saturates at ``S_max`` and the row's sticky ``overflowed`` flag is set.

This is also the ``"xla"`` backend (``gqa_pallas/xla.py``), and the Flax layers' mask/bias path
builds on ``visibility_mask``, ``finite_keys``, ``poison`` and ``softmax_parts``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gqa_pallas import finite, validation


def resolve_positions(dims, q_offset, kv_lengths):
  """Fills in the defaults of design.md: ``kv_lengths = S`` and ``q_offset = kv_lengths - T``."""
  if kv_lengths is None:
    kv_lengths = jnp.full((dims.batch,), dims.kv_len, jnp.int32)
  if q_offset is None:
    q_offset = kv_lengths - dims.q_len
  return q_offset, kv_lengths


def visibility_mask(q_len, kv_len, q_offset, kv_lengths, causal, sliding_window=None):
  """bool ``[B, T, S]``: whether key ``j`` is visible to query row ``t``."""
  t = jnp.arange(q_len, dtype=jnp.int32)[None, :, None]
  j = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
  mask = j < kv_lengths[:, None, None]
  if causal:
    mask = mask & (j <= q_offset[:, None, None] + t)
  if sliding_window is not None:
    mask = mask & (j > q_offset[:, None, None] + t - sliding_window)
  return mask


def soft_cap(logits, cap):
  """Gemma 2's logit soft-cap ``cap * tanh(logits / cap)`` (``None``: unchanged)."""
  if cap is None:
    return logits
  cap = jnp.asarray(cap, logits.dtype)
  return cap * jnp.tanh(logits / cap)


def finite_keys(k, v):
  """k, v ``[B, S, K, H]`` with every non-finite value set to 0, and which slots held one.

  A slot a query cannot see has softmax weight 0, but ``0 * inf`` and ``0 * NaN`` are NaN: what
  it holds must not enter a product. Returns ``(k, v, bad_k, bad_v)``, ``bad_*`` bool ``[B, S,
  K]`` (the slot has a non-finite value in some feature); ``poison`` turns them into the rows
  that see one.
  """
  return finite.clear(k), finite.clear(v), finite.bad_slots(k), finite.bad_slots(v)


def poison(x, visible, bad, group_size: int):
  """``x [B, T, N, ...]`` set to NaN for the (row, query head) pairs that see a bad slot.

  ``visible`` is bool ``[B, T, S]`` or ``[B, N, T, S]`` (broadcastable), ``bad`` bool ``[B, S,
  K]``; query head ``n`` reads kv head ``n // group_size``.
  """
  b, t, n = x.shape[:3]
  if visible.ndim == 3:  # one mask for every head: count per kv head, then expand
    seen = jnp.einsum("bts,bsk->btk", visible.astype(jnp.float32), bad.astype(jnp.float32))
    seen = jnp.repeat(seen, group_size, axis=2) > 0
  else:
    visible = jnp.broadcast_to(visible, (b, n) + visible.shape[-2:]).astype(jnp.float32)
    bad = jnp.repeat(bad.astype(jnp.float32), group_size, axis=2)  # [B, S, N]
    seen = jnp.einsum("bnts,bsn->btn", visible, bad) > 0
  return jnp.where(seen.reshape(seen.shape + (1,) * (x.ndim - 3)), jnp.nan, x)


def softmax_parts(logits, visible):
  """The masked softmax over the last axis, unnormalised: ``(p, denom, row_max)``.

  ``p = exp(logits - row_max)`` where ``visible``, else 0; ``denom`` its sum (keepdims); ``row_max``
  the max over visible entries, 0 for a row with none (so no ``inf - inf``). A row with no visible
  entry has ``denom == 0``: its weights and output are 0 (``normalize``) and its lse ``-inf``.
  """
  logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)  # initial: S == 0
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0)
  p = jnp.where(visible, jnp.exp(logits - row_max), 0)
  return p, jnp.sum(p, axis=-1, keepdims=True), row_max


def normalize(x, denom):
  """``x / denom``, and exactly 0 where ``denom == 0`` (rows that saw no key)."""
  return jnp.where(denom > 0, x / jnp.where(denom > 0, denom, 1), 0)


def empty_result(q, return_lse: bool):
  """The result when no row has a key to see (``B``, ``T`` or ``S`` is 0): 0, lse ``-inf``."""
  out = jnp.zeros(q.shape, q.dtype)
  return (out, jnp.full(q.shape[:3], -jnp.inf, jnp.float32)) if return_lse else out


def attention_reference(q, k, v, *, causal=True, q_offset=None, kv_lengths=None, scale=None,
                        return_lse=False, compute_dtype=jnp.float32, sliding_window=None,
                        logits_soft_cap=None):
  """Grouped-query attention, computed directly.

  Args:
    q: ``[B, T, N, H]``.
    k, v: ``[B, S, K, H]`` with ``N % K == 0``; query head ``n`` reads kv head ``n // (N // K)``.
    causal: apply the causal mask at the positions above.
    q_offset: ``int32[B]`` absolute position of each row's first query (default ``kv_lengths - T``).
    kv_lengths: ``int32[B]`` number of valid keys per row (default ``S``).
    scale: logit scale (default ``1 / sqrt(H)``).
    return_lse: also return the natural-log log-sum-exp ``float32[B, T, N]``.
    compute_dtype: softmax/accumulation dtype (float32; tests pass float64 or the input dtype).
    sliding_window: causal only: a query at position ``p`` also needs ``j > p - sliding_window``
      (itself and the ``sliding_window - 1`` keys before it). ``None``: no window.
    logits_soft_cap: scaled logits ``s`` become ``cap * tanh(s / cap)`` before masking and the
      softmax (the lse is of the capped logits). ``None``: off.

  Returns:
    ``[B, T, N, H]`` in q's dtype, and the lse when ``return_lse``.
  """
  dims, q_offset, kv_lengths = validation.validate_attention(q, k, v, q_offset, kv_lengths)
  validation.check_flags(causal=causal, return_lse=return_lse)
  validation.check_scale(scale)
  sliding_window, logits_soft_cap = validation.check_window_and_cap(sliding_window,
                                                                    logits_soft_cap, causal)
  q_offset, kv_lengths = resolve_positions(dims, q_offset, kv_lengths)
  b, t, n, h = q.shape
  kh, g = dims.num_kv_heads, dims.group_size
  if scale is None:
    scale = 1.0 / math.sqrt(h)
  mask = visibility_mask(t, dims.kv_len, q_offset, kv_lengths, causal,
                         sliding_window)  # [B, T, S]
  k, v, bad_k, bad_v = finite_keys(k, v)
  k, v = k.astype(compute_dtype), v.astype(compute_dtype)
  qg = q.astype(compute_dtype).reshape(b, t, kh, g, h)
  precision = jax.lax.Precision.HIGHEST
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, precision=precision) * jnp.asarray(
      scale, compute_dtype)
  logits = soft_cap(logits, logits_soft_cap)
  p, denom, row_max = softmax_parts(logits, mask[:, None, None, :, :])
  out = jnp.einsum("bkgts,bskh->btkgh", p, v, precision=precision)
  denom_t = jnp.moveaxis(denom[..., 0], -1, 1)[..., None]  # [B, T, K, G, 1]
  out = normalize(out, denom_t).reshape(b, t, n, h)
  out = poison(out, mask, bad_k | bad_v, g).astype(q.dtype)
  if not return_lse:
    return out
  lse = jnp.where(denom > 0, row_max + jnp.log(jnp.where(denom > 0, denom, 1)), -jnp.inf)
  lse = jnp.moveaxis(lse[..., 0], -1, 1).reshape(b, t, n).astype(jnp.float32)
  return out, poison(lse, mask, bad_k, g)


def attention_vjp(q, k, v, cotangent, **kwargs):
  """``(dq, dk, dv)`` of ``attention_reference(q, k, v, **kwargs)`` for ``cotangent`` (the
  output's, or ``(d_out, d_lse)`` with ``return_lse=True``): JAX's own VJP of the reference,
  exact but with the ``[B, N, T, S]`` weights in memory."""
  _, vjp = jax.vjp(functools.partial(attention_reference, **kwargs), q, k, v)
  return vjp(cotangent)


def append_reference(k, v, lengths, overflowed, k_new, v_new, num_new):
  """One layer's cache append in ``jnp`` (two scatters): the semantics every append kernel
  matches bit for bit.

  Args:
    k, v: the cache ``[B, S_max, K, H]``; lengths ``int32[B]``; overflowed ``bool[B]``.
    k_new, v_new: ``[B, T_new, K, H]`` (cast to the cache's dtype); num_new ``int32[B]``.

  Returns:
    The new ``(k, v, lengths, overflowed)``.
  """
  b, s_max = k.shape[:2]
  t_new = k_new.shape[1]
  lengths = jnp.clip(lengths, 0, s_max)  # a hand-built cache's negative length acts as 0
  num_new = jnp.clip(num_new, 0, t_new)
  t = jnp.arange(t_new, dtype=jnp.int32)[None, :]
  pos = lengths[:, None] + t  # [B, T_new]
  # Invalid tokens and tokens past S_max go to index S_max, which the scatter drops: a row never
  # wraps around and never spills into the next row.
  pos = jnp.where((t < num_new[:, None]) & (pos < s_max), pos, s_max)
  rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], pos.shape)
  k = k.at[rows, pos].set(k_new.astype(k.dtype), mode="drop")
  v = v.at[rows, pos].set(v_new.astype(v.dtype), mode="drop")
  wanted = lengths + num_new
  return k, v, jnp.minimum(wanted, s_max), overflowed | (wanted > s_max)
