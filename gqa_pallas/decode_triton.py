"""Split-K flash-decoding for GQA over a ``[B, S_max, K, H]`` KV cache, in Pallas lowered to Triton.

Decode is memory bound: the whole job is to stream each row's K/V once at the card's bandwidth.

* The cache is read in place in its ``[B, S_max, K, H]`` layout (no transpose, copy or repeat).
* One program owns one kv head of one row and one split of the sequence; its Q tile packs the
  ``T`` new tokens times the ``G`` query heads of the group, so every K/V byte is read once.
* The sequence is split across programs (flash-decoding) so small batches still fill the GPU; the
  number of splits follows ``B * K``, ``S_max`` and the SM count.
* Each program stops at ``lengths[b]``: time follows the real lengths, not ``S_max``; splits past
  the end do no work and contribute ``lse = -inf``, weight 0, in the float32 combine.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gqa_pallas import _triton_compat as tc
from gqa_pallas.prefill_triton import check_head_dim, padded_head_dim

logger = logging.getLogger("gqa_pallas")

_LOG2_E = math.log2(math.e)
_LN_2 = math.log(2.0)
_MIN_TILE_ROWS = 16  # Triton's smallest dot M
_MAX_TILE_ROWS = 128


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Static launch configuration.

  Attributes:
    block_k: keys per K/V tile.
    num_warps, num_stages: Triton launch parameters.
    num_splits: sequence splits per (row, kv head); ``None`` picks from the shape and SM count.
    programs_per_sm: target number of resident programs per SM for the split heuristic.
    min_split_keys: a split is never shorter than this (keeps per-program overhead small).
  """
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3
  num_splits: int | None = None
  programs_per_sm: int = 4
  min_split_keys: int = 256


TUNING_TABLE: dict[tuple[int, str], DecodeConfig] = {
    (16, "bfloat16"): DecodeConfig(128, 4, 3),
    (32, "bfloat16"): DecodeConfig(128, 4, 3),
    (64, "bfloat16"): DecodeConfig(128, 4, 3),
    (128, "bfloat16"): DecodeConfig(64, 4, 3),
    (256, "bfloat16"): DecodeConfig(32, 4, 3),
    (16, "float16"): DecodeConfig(128, 4, 3),
    (32, "float16"): DecodeConfig(128, 4, 3),
    (64, "float16"): DecodeConfig(128, 4, 3),
    (128, "float16"): DecodeConfig(64, 4, 3),
    (256, "float16"): DecodeConfig(32, 4, 3),
    (16, "float32"): DecodeConfig(64, 4, 2),
    (32, "float32"): DecodeConfig(64, 4, 2),
    (64, "float32"): DecodeConfig(64, 4, 2),
    (128, "float32"): DecodeConfig(32, 4, 2),
    (256, "float32"): DecodeConfig(16, 4, 2),
}


def default_config(head_dim: int, dtype) -> DecodeConfig:
  return TUNING_TABLE[(padded_head_dim(head_dim), jnp.dtype(dtype).name)]


def _sm_count() -> int:
  try:
    dev = jax.devices()[0]
    if dev.platform == "gpu":
      return int(getattr(dev, "core_count", 132) or 132)
  except RuntimeError:
    pass
  return 132  # an H100; only shapes the split count, never correctness


def tile_shape(q_len: int, group_size: int) -> tuple[int, int]:
  """``(block_t, heads_per_tile)``: padded new tokens times padded group heads per tile."""
  block_t = pl.next_power_of_2(q_len)
  heads_per_tile = min(pl.next_power_of_2(group_size), max(_MAX_TILE_ROWS // block_t, 1))
  block_t = max(block_t, _MIN_TILE_ROWS // heads_per_tile)
  return block_t, heads_per_tile


def choose_splits(batch: int, programs: int, max_length: int, config: DecodeConfig,
                  sm_count: int | None = None) -> tuple[int, int]:
  """``(num_splits, split_len)`` with ``split_len`` a multiple of ``block_k``."""
  block_k = config.block_k
  if config.num_splits is not None:
    splits = config.num_splits
  else:
    sm_count = _sm_count() if sm_count is None else sm_count
    target = sm_count * config.programs_per_sm
    splits = pl.cdiv(target, programs)
    splits = min(splits, max(pl.cdiv(max_length, config.min_split_keys), 1))
  splits = max(1, min(splits, pl.cdiv(max_length, block_k)))
  split_len = pl.cdiv(pl.cdiv(max_length, splits), block_k) * block_k
  splits = pl.cdiv(max_length, split_len)
  del batch
  return splits, split_len


def _decode_kernel(q_offset_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale,
                   block_t, heads_per_tile, block_k, split_len, head_dim, group_size, q_len):
  """One (split, head chunk, kv head, row).

  Refs: q ``[T, G, Hp]``; k/v ``[S_max, Hp]`` of this (b, kv head); o ``[T, G, Hp]`` and lse
  ``[T, G]`` of this split (o normalised, lse in the log2 domain).
  """
  split = pl.program_id(0)
  head_chunk = pl.program_id(1)
  b = pl.program_id(3)
  block_m = block_t * heads_per_tile
  head_dim_p = q_ref.shape[-1]
  q_offset = q_offset_ref[b]
  kv_len = lengths_ref[b]

  h0 = head_chunk * heads_per_tile
  t_idx = lax.broadcasted_iota(jnp.int32, (block_t, heads_per_tile, 1), 0)
  h_idx = h0 + lax.broadcasted_iota(jnp.int32, (block_t, heads_per_tile, 1), 1)
  d_idx = lax.broadcasted_iota(jnp.int32, (1, 1, head_dim_p), 2)
  q_mask = (t_idx < q_len) & (h_idx < group_size) & (d_idx < head_dim)
  q = tc.load(q_ref.at[pl.ds(0, block_t), pl.ds(h0, heads_per_tile), :], mask=q_mask, other=0.)
  q = q.reshape(block_m, head_dim_p)
  row_pos = q_offset + lax.broadcasted_iota(jnp.int32, (block_m,), 0) // heads_per_tile
  qk_scale = scale * _LOG2_E
  pad_head = head_dim_p != head_dim
  head_mask = (jnp.arange(head_dim_p) < head_dim)[None, :]

  def step(i, carry, masked):
    acc, m_prev, l_prev = carry
    start = i * block_k
    key_idx = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    mask = (key_idx < kv_len)[:, None] if masked else None
    if pad_head:
      mask = head_mask if mask is None else mask & head_mask
    other = None if mask is None else 0.
    k = tc.load(k_ref.at[pl.ds(start, block_k), :], mask=mask, other=other)
    v = tc.load(v_ref.at[pl.ds(start, block_k), :], mask=mask, other=other)
    s = tc.dot(q, k.T) * qk_scale
    if masked:
      visible = (key_idx[None, :] < kv_len) & (key_idx[None, :] <= row_pos[:, None])
      s = jnp.where(visible, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_safe = jnp.where(m_next == -jnp.inf, 0., m_next) if masked else m_next
    alpha = jnp.exp2(m_prev - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + tc.dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

  # This split's keys: [lo, hi) clipped to the row's length. Keys below min(kv_len, q_offset + 1)
  # are visible to every query row; the rest (the last T keys at most) need the causal mask.
  lo = split * split_len
  hi = jnp.minimum(lo + split_len, jnp.minimum(kv_len, q_offset + q_len))
  full_hi = jnp.minimum(hi, jnp.minimum(kv_len, q_offset + 1))
  block_lo = lo // block_k
  n_full = jnp.maximum(full_hi - lo, 0) // block_k
  n_end = pl.cdiv(jnp.maximum(hi - lo, 0), block_k)

  carry = (jnp.zeros((block_m, head_dim_p), jnp.float32),
           jnp.full((block_m,), -jnp.inf, jnp.float32),
           jnp.zeros((block_m,), jnp.float32))
  carry = lax.fori_loop(block_lo, block_lo + n_full, functools.partial(step, masked=False), carry)
  acc, m, l = lax.fori_loop(block_lo + n_full, block_lo + n_end,
                            functools.partial(step, masked=True), carry)

  has_keys = l > 0
  out = (acc / jnp.where(has_keys, l, 1.)[:, None]).reshape(block_t, heads_per_tile, head_dim_p)
  tc.store(o_ref.at[pl.ds(0, block_t), pl.ds(h0, heads_per_tile), :], out.astype(o_ref.dtype),
           mask=q_mask)
  lse = jnp.where(has_keys, m + jnp.log2(jnp.where(has_keys, l, 1.)), -jnp.inf)
  t2 = lax.broadcasted_iota(jnp.int32, (block_t, heads_per_tile), 0)
  h2 = h0 + lax.broadcasted_iota(jnp.int32, (block_t, heads_per_tile), 1)
  tc.store(lse_ref.at[pl.ds(0, block_t), pl.ds(h0, heads_per_tile)],
           lse.reshape(block_t, heads_per_tile), mask=(t2 < q_len) & (h2 < group_size))


@functools.partial(jax.jit, static_argnames=("scale", "return_lse", "interpret", "config"))
def _decode_call(q, k, v, q_offset, lengths, *, scale, return_lse, interpret, config):
  b, t, n, h = q.shape
  s_max, kh = k.shape[1], k.shape[2]
  g = n // kh
  head_dim_p = padded_head_dim(h)
  block_t, heads_per_tile = tile_shape(t, g)
  head_chunks = pl.cdiv(g, heads_per_tile)
  block_k = min(config.block_k, max(16, pl.next_power_of_2(s_max)))
  config = dataclasses.replace(config, block_k=block_k)
  splits, split_len = choose_splits(b, b * kh * head_chunks, s_max, config)
  grid = (splits, head_chunks, kh, b)
  logger.debug("gqa decode launch: B=%d T=%d S_max=%d N=%d K=%d H=%d dtype=%s grid=%s "
               "split_len=%d block_t=%d heads_per_tile=%d block_k=%d num_warps=%d "
               "num_stages=%d", b, t, s_max, n, kh, h, q.dtype, grid, split_len, block_t,
               heads_per_tile, block_k, config.num_warps, config.num_stages)
  q5 = q.reshape(b, t, kh, g, h)  # free reshape, no copy
  kernel = functools.partial(
      _decode_kernel, scale=scale, block_t=block_t, heads_per_tile=heads_per_tile,
      block_k=block_k, split_len=split_len, head_dim=h, group_size=g, q_len=t)
  rows_spec = pl.BlockSpec((b,), lambda *_: (0,))
  q_spec = pl.BlockSpec((None, t, None, g, head_dim_p), lambda sp, j, kk, bb: (bb, 0, kk, 0, 0))
  kv_spec = pl.BlockSpec((None, s_max, None, head_dim_p), lambda sp, j, kk, bb: (bb, 0, kk, 0))
  # One split's output goes straight into the final dtype; several are combined in float32.
  part_dtype = q.dtype if splits == 1 else jnp.float32
  out_shape = [jax.ShapeDtypeStruct((b, splits, t, kh, g, h), part_dtype),
               jax.ShapeDtypeStruct((b, splits, t, kh, g), jnp.float32)]
  out_specs = [
      pl.BlockSpec((None, None, t, None, g, head_dim_p),
                   lambda sp, j, kk, bb: (bb, sp, 0, kk, 0, 0)),
      pl.BlockSpec((None, None, t, None, g), lambda sp, j, kk, bb: (bb, sp, 0, kk, 0)),
  ]
  o_part, lse_part = pl.pallas_call(
      kernel, grid=grid, in_specs=[rows_spec, rows_spec, q_spec, kv_spec, kv_spec],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=tc.compiler_params(config.num_warps, config.num_stages),
      interpret=interpret, name="gqa_decode",
  )(q_offset, lengths, q5, k, v)
  if splits == 1:
    out, lse2 = o_part[:, 0], lse_part[:, 0]
  else:
    lse_max = jnp.max(lse_part, axis=1, keepdims=True)
    lse_max_safe = jnp.where(jnp.isfinite(lse_max), lse_max, 0.)
    w = jnp.exp2(lse_part - lse_max_safe)  # empty splits: exp2(-inf) = 0
    w_sum = jnp.sum(w, axis=1)
    out = jnp.sum(o_part * w[..., None], axis=1)
    out = jnp.where(w_sum[..., None] > 0, out / jnp.where(w_sum > 0, w_sum, 1.)[..., None], 0.)
    lse2 = jnp.where(w_sum > 0, lse_max[:, 0] + jnp.log2(jnp.where(w_sum > 0, w_sum, 1.)),
                     -jnp.inf)
  out = out.astype(q.dtype).reshape(b, t, n, h)
  if return_lse:
    return out, (lse2 * _LN_2).reshape(b, t, n)
  return out


def decode_attention(q, k, v, q_offset, lengths, *, scale, return_lse=False, interpret=False,
                     config: DecodeConfig | None = None):
  """Runs the kernel on validated inputs (see ``gqa_pallas.gqa_decode`` for semantics).

  q ``[B, T, N, H]``; k/v the cache ``[B, S_max, K, H]``; q_offset/lengths ``int32[B]``.
  """
  check_head_dim(q.shape[-1])
  if config is None:
    config = default_config(q.shape[-1], q.dtype)
  if q.shape[0] == 0 or q.shape[1] == 0:
    out = jnp.zeros(q.shape, q.dtype)
    lse = jnp.full(q.shape[:3], -jnp.inf, jnp.float32)
    return (out, lse) if return_lse else out
  lengths = jnp.clip(lengths, 0, k.shape[1])
  return _decode_call(q, k, v, q_offset, lengths, scale=float(scale), return_lse=return_lse,
                      interpret=interpret, config=config)
