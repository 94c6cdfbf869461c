"""Pieces shared by the Triton kernels: head-dim rules, row packing and the online softmax.

Row packing: the ``G`` query heads of a kv head, times the query positions, are flattened into
one row axis ``f = t * G + g``; a tile takes ``block_m`` consecutive rows. Every row is a real
(position, head) pair, so no tile row is wasted on padding heads (e.g. ``G = 7``), and each K/V
tile loaded from HBM serves the whole group. Rows are gathered/scattered with per-row pointers.
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gqa_pallas.triton import compat as tc

# Head dims: multiples of 8 up to MAX_HEAD_DIM, padded inside the kernels to a power of two
# (at least 16, Triton's smallest dot dimension) and masked.
MAX_HEAD_DIM = 256

LOG2_E = math.log2(math.e)  # softmax runs in base 2: exp(x) = exp2(x * log2(e))
LN_2 = math.log(2.0)        # log2-domain lse -> natural-log lse


def check_launch_config(config, block_fields=("block_m", "block_k")):
  """Validates a Triton kernel config: block sizes powers of two >= 16, warps/stages positive."""
  name = type(config).__name__
  for field in block_fields:
    value = getattr(config, field)
    if not isinstance(value, int) or value < 16 or value & (value - 1):
      raise ValueError(f"{name}.{field} must be a power of two >= 16; got {value!r}.")
  for field in ("num_warps", "num_stages"):
    value = getattr(config, field)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}.{field} must be a positive int; got {value!r}.")


def config_table(h64, h128, h256, f32, f32_h256):
  """(padded head dim, dtype name) -> config: 16-bit dtypes share a row, float32 tiles are
  smaller (twice the bytes per element)."""
  table = {}
  for dtype in ("bfloat16", "float16"):
    table.update({(16, dtype): h64, (32, dtype): h64, (64, dtype): h64, (128, dtype): h128,
                  (256, dtype): h256})
  table.update({(hp, "float32"): f32 for hp in (16, 32, 64, 128)})
  table[(256, "float32")] = f32_h256
  return table


def padded_head_dim(head_dim: int) -> int:
  return max(16, pl.next_power_of_2(head_dim))


def head_dim_unsupported(head_dim: int) -> str | None:
  """Why the Triton kernels cannot take ``head_dim`` (``None`` if they can)."""
  if head_dim > MAX_HEAD_DIM or head_dim % 8 or head_dim <= 0:
    return (f"head_dim={head_dim} (the Triton kernels take head dims that are multiples of 8 "
            f"up to {MAX_HEAD_DIM}; 64 and 128 are tuned)")
  return None


def tile_rows(first_row, block_m: int, group_size: int, num_rows: int):
  """Position ``t``, head ``g`` and validity of the tile's rows (each ``int32[block_m]``)."""
  f = first_row + lax.broadcasted_iota(jnp.int32, (block_m,), 0)
  # Rows past the end keep their own (out-of-range) position: they are masked on GPU, and in
  # interpret mode no two rows may alias one element (a masked scatter would write it back).
  return f // group_size, f % group_size, f < num_rows


def load_rows(ref, t, g, valid, head_dim: int):
  """Gathers ``ref[t, g, :]`` (a ``[T, G, Hp]`` ref) into ``[block_m, Hp]``; invalid rows are 0."""
  head_dim_p = ref.shape[-1]
  d = lax.broadcasted_iota(jnp.int32, (1, head_dim_p), 1)
  mask = valid[:, None] & (d < head_dim)
  return tc.load(ref.at[t[:, None], g[:, None], d], mask=mask, other=0.)


def store_rows(ref, value, t, g, valid, head_dim: int):
  head_dim_p = ref.shape[-1]
  d = lax.broadcasted_iota(jnp.int32, (1, head_dim_p), 1)
  tc.store(ref.at[t[:, None], g[:, None], d], value.astype(ref.dtype),
           mask=valid[:, None] & (d < head_dim))


def store_row_values(ref, value, t, g, valid):
  """Scatters one float per row into a ``[T, G]`` ref."""
  tc.store(ref.at[t, g], value.astype(ref.dtype), mask=valid)


def store_tile(o_ref, lse_ref, o, lse, first_row, valid, head_dim: int):
  """Writes rows ``[first_row, first_row + block_m)`` of a ``[R, Hp]`` / ``[R]`` ref pair."""
  block_m = valid.shape[0]
  head_dim_p = o_ref.shape[-1]
  d = lax.broadcasted_iota(jnp.int32, (1, head_dim_p), 1)
  tc.store(o_ref.at[pl.ds(first_row, block_m), :], o.astype(o_ref.dtype),
           mask=valid[:, None] & (d < head_dim))
  tc.store(lse_ref.at[pl.ds(first_row, block_m)], lse.astype(lse_ref.dtype), mask=valid)


def _dot(a, b):
  # float32 inputs get ieee products (Triton would otherwise be free to pick tf32).
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return tc.dot(a, b, precision=precision)


def scores(q, k, *, qk_scale: float, soft_cap: float | None):
  """Base-2 logits ``[M, N]`` of ``q [M, Hp]`` and ``k [N, Hp]``: ``scale * log2(e) * q k^T``,
  soft-capped (the cap is in natural units, so in base 2 it is ``soft_cap * log2(e)``). Also
  returns ``tanh`` of the capped argument (``None`` without a cap) for the backward."""
  s = _dot(q, k.T) * qk_scale
  if soft_cap is None:
    return s, None
  cap2 = soft_cap * LOG2_E
  th = jnp.tanh(s / cap2)
  return cap2 * th, th


def load_key_block(k_ref, v_ref, start, block_k: int, kv_len, head_dim: int, masked: bool):
  """Keys ``[start, start + block_k)``: their indices and the K/V tiles ``[block_k, Hp]``. A
  masked block loads slots at or past ``kv_len`` as 0 (garbage, NaN included, never enters);
  an unmasked one lies below ``kv_len`` and only pays for the head-dim padding."""
  head_dim_p = k_ref.shape[-1]
  key = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
  mask = (key < kv_len)[:, None] if masked else None
  if head_dim != head_dim_p:
    head_mask = lax.broadcasted_iota(jnp.int32, (1, head_dim_p), 1) < head_dim
    mask = head_mask if mask is None else mask & head_mask
  other = None if mask is None else 0.
  k = tc.load(k_ref.at[pl.ds(start, block_k), :], mask=mask, other=other)
  v = tc.load(v_ref.at[pl.ds(start, block_k), :], mask=mask, other=other)
  return key, k, v


def run_blocks(step, blocks, carry):
  """``step(i, carry, masked)`` over ``blocks = (lo, full_lo, full_hi, hi)``: masked, unmasked
  (every row sees every key), masked."""
  lo, full_lo, full_hi, hi = blocks
  carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
  return lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)


def visible(key, row_pos, kv_len, *, causal: bool, window: int | None):
  """``[M, N]`` visibility of keys ``key [N]`` to rows at positions ``row_pos [M]``."""
  vis = key[None, :] < kv_len
  if causal:
    vis = vis & (key[None, :] <= row_pos[:, None])
  if window is not None:
    vis = vis & (key[None, :] > row_pos[:, None] - window)
  return vis


def block_ranges(first_pos, last_pos, kv_len, block_k: int, *, causal: bool,
                 window: int | None, lo_block=None, hi_block=None):
  """``(lo, full_lo, full_hi, hi)`` key blocks of rows at positions ``[first_pos, last_pos]``:
  blocks ``[lo, hi)`` hold a key some row sees, ``[full_lo, full_hi)`` keys every row sees
  (no mask). ``lo_block`` / ``hi_block`` clip the range (a split of it)."""
  if causal:
    end = jnp.clip(jnp.minimum(kv_len, last_pos + 1), 0, None)
    full_end = jnp.clip(jnp.minimum(kv_len, first_pos + 1), 0, None)
  else:
    end = full_end = jnp.clip(kv_len, 0, None)
  if window is not None:
    start = jnp.clip(first_pos - window + 1, 0, None)
    full_start = jnp.clip(last_pos - window + 1, 0, None)
  else:
    start = full_start = jnp.zeros_like(end)
  lo, hi = start // block_k, pl.cdiv(end, block_k)
  if lo_block is not None:
    lo, hi = jnp.maximum(lo, lo_block), jnp.minimum(hi, hi_block)
  hi = jnp.maximum(hi, lo)
  full_lo = jnp.clip(pl.cdiv(full_start, block_k), lo, hi)
  full_hi = jnp.clip(full_end // block_k, full_lo, hi)
  return lo, full_lo, full_hi, hi


def attend(q, k_ref, v_ref, row_pos, kv_len, *, blocks, block_k: int, qk_scale: float,
           head_dim: int, causal: bool = True, window: int | None = None,
           soft_cap: float | None = None, guard_values: bool = False):
  """Online softmax of ``q [M, Hp]`` over the key blocks ``blocks = (lo, full_lo, full_hi,
  hi)`` of ``block_ranges``.

  Blocks ``[full_lo, full_hi)`` must be visible to every row (no mask is applied); the others
  are masked by ``visible``. Masked slots are loaded as 0 past ``kv_len``. With
  ``guard_values``, a masked block's non-finite V values never reach a row that cannot see them
  (``finite_values``; the decode kernel). Without it the caller guarantees V is finite inside
  ``kv_len`` (the prefill clears it in XLA: ``gqa_pallas.finite``), because the check costs a
  compute-bound kernel a third of its speed (benchmarks/NOTES.md). Returns ``(acc, m, l)`` in
  float32, ``m`` in the log2 domain (``-inf`` for rows that saw no key).
  """
  block_m, head_dim_p = q.shape

  def step(i, carry, masked):
    acc, m_prev, l_prev, *poisoned = carry
    key, k, v = load_key_block(k_ref, v_ref, i * block_k, block_k, kv_len, head_dim, masked)
    s, _ = scores(q, k, qk_scale=qk_scale, soft_cap=soft_cap)
    if masked:
      vis = visible(key, row_pos, kv_len, causal=causal, window=window)
      s = jnp.where(vis, s, -jnp.inf)
      if guard_values:
        v, poisoned[0] = finite_values(v, vis, poisoned[0])
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # A row that has seen no visible key keeps m == -inf: shift by 0 there so that
    # exp2(-inf - -inf) never makes a NaN. Unmasked blocks always hold a visible key.
    m_safe = jnp.where(m_next == -jnp.inf, 0., m_next) if masked else m_next
    alpha = jnp.exp2(m_prev - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return (acc, m_next, l_next, *poisoned)

  carry = (jnp.zeros((block_m, head_dim_p), jnp.float32),
           jnp.full((block_m,), -jnp.inf, jnp.float32),
           jnp.zeros((block_m,), jnp.float32))
  if not guard_values:
    return run_blocks(step, blocks, carry)
  acc, m, l, poisoned = run_blocks(step, blocks, carry + (jnp.zeros((block_m,), jnp.float32),))
  return jnp.where(poisoned[:, None] > 0, jnp.nan, acc), m, l


def finite_values(x, vis, poisoned):
  """A masked block's V tile ``x [N, Hp]`` with non-finite values set to 0, and ``poisoned
  [M]`` set for the rows that see such a key.

  A key a row cannot see has weight 0 there, but ``0 * inf`` is NaN inside the shared product:
  the value is cleared for every row, and the rows that do see it are marked NaN instead
  (design.md: a visible non-finite value gives NaN). Unmasked blocks skip this: every row sees
  every key, and IEEE arithmetic propagates what they hold. Cheap where the kernel waits on
  memory (decode); see ``attend`` for the compute-bound prefill.
  """
  ok = jnp.isfinite(x)
  bad_key = jnp.max(jnp.where(ok, 0., 1.), axis=1)  # [N]
  seen = jnp.max(jnp.where(vis, bad_key[None, :], 0.), axis=1)
  return jnp.where(ok, x, jnp.zeros_like(x)), jnp.maximum(poisoned, seen)


def poison_rows(out, bad_counts_ref, row_pos, kv_len, valid, *, causal: bool,
                window: int | None):
  """``out [M, Hp]`` set to NaN for the rows that see a slot with a non-finite V value.

  ``bad_counts_ref`` ``[S + 1]`` holds, at ``j``, how many of the slots before ``j`` have one
  (``gqa_pallas.finite.bad_slot_counts``): a row sees one iff the count grows over its visible
  range ``[lo, hi]``."""
  num_slots = bad_counts_ref.shape[0] - 1
  hi = jnp.minimum(row_pos, kv_len - 1) if causal else jnp.full_like(row_pos, kv_len - 1)
  hi = jnp.minimum(hi, num_slots - 1)
  lo = jnp.zeros_like(row_pos) if window is None else jnp.maximum(row_pos - window + 1, 0)
  some = valid & (hi >= lo)
  top = tc.load(bad_counts_ref.at[jnp.clip(hi + 1, 0, num_slots)], mask=some, other=0)
  bottom = tc.load(bad_counts_ref.at[jnp.clip(lo, 0, num_slots)], mask=some, other=0)
  return jnp.where((top > bottom)[:, None], jnp.nan, out)


def finalize(acc, m, l):
  """Normalised output (0 for rows with no key) and the log2-domain lse (``-inf`` there)."""
  has_keys = l > 0
  l_safe = jnp.where(has_keys, l, 1.)
  return acc / l_safe[:, None], jnp.where(has_keys, m + jnp.log2(l_safe), -jnp.inf)
