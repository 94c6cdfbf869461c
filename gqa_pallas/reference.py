"""Pure-``jnp`` reference: the single definition of the package's attention semantics.

Query row ``t`` of batch row ``b`` sits at absolute position ``q_offset[b] + t``; key ``j`` is visible
iff ``j < kv_lengths[b]`` and, when causal, ``j <= q_offset[b] + t``. Defaults: ``kv_lengths = S``,
``q_offset = kv_lengths - T`` (bottom-right alignment). Rows with no visible key give 0 and lse
``-inf``; anything stored at or past ``kv_lengths[b]`` (NaN included) never reaches the output.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gqa_pallas import validation


def resolve_positions(dims, q_offset, kv_lengths):
  """Fills in the defaults of design.md: ``kv_lengths = S`` and ``q_offset = kv_lengths - T``."""
  if kv_lengths is None:
    kv_lengths = jnp.full((dims.batch,), dims.kv_len, jnp.int32)
  if q_offset is None:
    q_offset = kv_lengths - dims.q_len
  return q_offset, kv_lengths


def visibility_mask(q_len, kv_len, q_offset, kv_lengths, causal):
  """bool ``[B, T, S]``: whether key ``j`` is visible to query row ``t``."""
  t = jnp.arange(q_len, dtype=jnp.int32)[None, :, None]
  j = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
  mask = j < kv_lengths[:, None, None]
  if causal:
    mask = mask & (j <= q_offset[:, None, None] + t)
  return mask


def attention_reference(q, k, v, *, causal=True, q_offset=None, kv_lengths=None, scale=None,
                        return_lse=False, compute_dtype=jnp.float32):
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

  Returns:
    ``[B, T, N, H]`` in q's dtype, and the lse when ``return_lse``.
  """
  dims, q_offset, kv_lengths = validation.validate_attention(q, k, v, q_offset, kv_lengths)
  validation.check_scale(scale)
  q_offset, kv_lengths = resolve_positions(dims, q_offset, kv_lengths)
  b, t, n, h = q.shape
  kh, g = dims.num_kv_heads, dims.group_size
  if scale is None:
    scale = 1.0 / math.sqrt(h)
  mask = visibility_mask(t, dims.kv_len, q_offset, kv_lengths, causal)  # [B, T, S]
  key_valid = (jnp.arange(dims.kv_len) < kv_lengths[:, None])[:, :, None, None]
  # Zero the slots past kv_lengths: p == 0 there, but 0 * NaN would still be NaN.
  k = jnp.where(key_valid, k, 0).astype(compute_dtype)
  v = jnp.where(key_valid, v, 0).astype(compute_dtype)
  qg = q.astype(compute_dtype).reshape(b, t, kh, g, h)
  precision = jax.lax.Precision.HIGHEST
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, precision=precision) * jnp.asarray(
      scale, compute_dtype)
  mask = mask[:, None, None, :, :]
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)  # initial: S == 0
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0)
  p = jnp.where(mask, jnp.exp(logits - row_max), 0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bkgts,bskh->btkgh", p, v, precision=precision)
  denom_t = jnp.moveaxis(denom[..., 0], -1, 1)[..., None]  # [B, T, K, G, 1]
  out = jnp.where(denom_t > 0, out / jnp.where(denom_t > 0, denom_t, 1), 0)
  out = out.reshape(b, t, n, h).astype(q.dtype)
  if not return_lse:
    return out
  lse = jnp.where(denom > 0, row_max + jnp.log(jnp.where(denom > 0, denom, 1)), -jnp.inf)
  lse = jnp.moveaxis(lse[..., 0], -1, 1).reshape(b, t, n).astype(jnp.float32)
  return out, lse
