"""Split-K flash-decoding for GQA over a ``[B, S_max, K, H]`` KV cache, in Pallas lowered to Triton.

Decode is memory bound: the whole job is to stream each row's K/V once at the card's bandwidth.

* The cache is read in place in its ``[B, S_max, K, H]`` layout (no transpose, copy or repeat).
* One program owns one kv head of one row and one split of the sequence; its Q tile packs the
  ``T`` new tokens times the ``G`` query heads of the group (flattened rows, see ``_flash``), so
  every K/V byte is read once.
* The sequence is split across programs (flash-decoding) so small batches still fill the GPU; the
  number of splits follows ``B * K``, ``S_max`` and the SM count.
* Each program stops at ``lengths[b]``: time follows the real lengths, not ``S_max``; splits past
  the end do no work and contribute ``lse = -inf``, weight 0, in the float32 combine.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gqa_pallas import devices, reference
from gqa_pallas.triton import compat as tc
from gqa_pallas.triton import flash

logger = logging.getLogger("gqa_pallas")

_MIN_TILE_ROWS = 16  # Triton's smallest dot M
_MAX_TILE_ROWS = 128


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Static launch configuration.

  Attributes:
    block_k: keys per K/V tile when the sequence is split.
    num_warps, num_stages: Triton launch parameters.
    num_splits: sequence splits per (row, kv head); ``None`` picks from the shape and SM count.
    programs_per_sm: programs per SM that the split heuristic aims for.
    min_split_keys: a split is never shorter than this (keeps per-program overhead small).
    single_split_max_length: with at least ~one program per SM unsplit, caches up to this long
      are not split (no combine pass); longer ones still are, so ragged batches stay balanced.
    single_split_block_k, single_split_num_warps: tile and warps for unsplit launches (long
      loops favour wider tiles).
    wide_block_m, rows_per_warp: a Q tile of more than 16 rows (``T * G > 16``) is padded to
      at least ``wide_block_m`` rows and gets one warp per ``rows_per_warp`` rows (up to 8).
      Measured on an H100 (T=4, G=7, H=64): 28 rows in a 64-row tile with 4 warps run 7-10%
      faster than in a 32-row tile with 1 or 2 warps, though the tile does twice the work
      (presumably the per-block chain of a short split is latency-bound).
    max_block_m: most rows in one Q tile (a power of two, 16 to 128); more are spread over
      several row tiles (each reads the K/V blocks again, mostly from L2). Measured (T=16,
      G=7, H=128): two 64-row tiles with 4 warps each beat one 128-row tile with 8 warps by 20%.
    max_partial_fraction: caps the splits (at a power of two) so that the float32 partial
      results, written and then read by the combine, stay under this fraction of the K/V
      bytes; it binds when ``T * G`` is large next to the cache (T=8, G=7 over 4k keys: 8
      splits instead of 16 measured 13.5 vs 16.6 us).
    combine_tile_floats, combine_num_warps: the combine pass loads all splits of a block of
      rows at once; the block holds at most this many floats (splits x rows x head dim).
  """
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3
  num_splits: int | None = None
  programs_per_sm: int = 2
  min_split_keys: int = 256
  single_split_max_length: int = 4096
  single_split_block_k: int = 128
  single_split_num_warps: int = 4
  wide_block_m: int = 64
  rows_per_warp: int = 16
  max_block_m: int = 64
  max_partial_fraction: float = 0.25
  combine_tile_floats: int = 8192
  combine_num_warps: int = 4


def _table(h64, h128, h256, f32_h64, f32_h128, f32_h256):
  """(padded head dim, dtype name) -> config; heads of 16 and 32 take the H64 entry."""
  table = {}
  for dtype in ("bfloat16", "float16"):
    table.update({(16, dtype): h64, (32, dtype): h64, (64, dtype): h64, (128, dtype): h128,
                  (256, dtype): h256})
  table.update({(16, "float32"): f32_h64, (32, "float32"): f32_h64, (64, "float32"): f32_h64,
                (128, "float32"): f32_h128, (256, "float32"): f32_h256})
  return table


# Tuning tables by device kind, from `python -m benchmarks.run --only decode --sweep` on that
# card (see docs/benchmarks.md). Any other device takes HEURISTIC_TABLE, the H100's entries:
# small heads stream best with two warps and more programs per SM; the split count itself
# follows the device's SM count (``choose_splits``), so the table carries over between GPUs.
HEURISTIC_TABLE = _table(
    h64=DecodeConfig(num_warps=2, programs_per_sm=4), h128=DecodeConfig(),
    h256=DecodeConfig(block_k=32, single_split_block_k=64),
    f32_h64=DecodeConfig(block_k=64, num_stages=2, single_split_block_k=64),
    f32_h128=DecodeConfig(block_k=32, num_stages=2, single_split_block_k=32),
    f32_h256=DecodeConfig(block_k=16, num_stages=2, single_split_block_k=16))
TUNING_TABLES: dict[str, dict[tuple[int, str], DecodeConfig]] = {
    "NVIDIA H100 80GB HBM3": HEURISTIC_TABLE,
    # H200 sweep (nvidia-h200-decode-sweep.json, split path, bf16): the H100 entries were the
    # fastest of 14 configs for H128 on every shape and within 2% of the fastest for H64.
    "NVIDIA H200": HEURISTIC_TABLE,
}


def default_config(head_dim: int, dtype, device_kind: str) -> DecodeConfig:
  table = TUNING_TABLES.get(device_kind, HEURISTIC_TABLE)
  return table[(flash.padded_head_dim(head_dim), jnp.dtype(dtype).name)]


def _sm_count() -> int:
  # Only shapes the split count, never correctness: a CPU (interpret mode, lowering for CUDA)
  # plans for the 132 SMs of an H100 / H200 unless devices.target says otherwise.
  return devices.current().num_sms or 132


def tile_rows_for(q_len: int, group_size: int, config: DecodeConfig) -> int:
  """Rows of the Q tile: the ``T * G`` (token, group head) pairs, padded to a power of two."""
  clamp = lambda x: pl.next_power_of_2(max(min(x, _MAX_TILE_ROWS), _MIN_TILE_ROWS))
  rows = clamp(q_len * group_size)
  if rows > _MIN_TILE_ROWS:
    rows = max(rows, clamp(config.wide_block_m))
  return min(rows, clamp(config.max_block_m))


def choose_splits(programs: int, max_length: int, config: DecodeConfig,
                  sm_count: int | None = None, tile_rows: int = 1, itemsize: int = 2) -> int:
  """The number of sequence splits per (row, kv head, row tile).

  ``programs`` = B * K * row tiles; ``tile_rows`` = query rows per program (at most the tile
  height); ``itemsize`` of the cache. Each row divides its own visible keys evenly over the
  splits (in the kernel), so a short row's programs finish early and the block scheduler
  refills the SMs: ragged batches stay balanced.
  """
  if config.num_splits is not None:
    splits = config.num_splits
  else:
    sm_count = _sm_count() if sm_count is None else sm_count
    if programs >= 0.9 * sm_count and max_length <= config.single_split_max_length:
      splits = 1
    else:
      splits = max(1, round(sm_count * config.programs_per_sm / programs))
      splits = min(splits, max(pl.cdiv(max_length, config.min_split_keys), 1))
      # Per split, the partials cost 2 * tile_rows * H * 4 bytes; the K/V, 2 * S * H * itemsize.
      partial_cap = int(config.max_partial_fraction * max_length * itemsize / (4 * tile_rows))
      if splits > partial_cap:  # the largest power of two within the cap
        splits = 1 << (max(partial_cap, 1).bit_length() - 1)
  return max(1, min(splits, pl.cdiv(max_length, config.block_k)))


def warps_for(block_m: int, num_warps: int, config: DecodeConfig) -> int:
  return max(num_warps, min(pl.next_power_of_2(pl.cdiv(block_m, config.rows_per_warp)), 8))


def _decode_kernel(q_offset_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale,
                   block_m, block_k, num_splits, head_dim, group_size, q_len, direct,
                   offset_from_lengths, window, soft_cap):
  """One (split, row tile, kv head, batch row).

  Refs: q ``[T, G, Hp]``; k/v ``[S_max, Hp]`` of this (b, kv head). With ``direct`` (one split)
  o ``[T, G, Hp]`` and lse ``[T, G]`` are the final outputs; otherwise this split's partial o
  ``[T*G, Hp]`` (normalised) and lse ``[T*G]`` (log2 domain) for ``_combine_kernel``.
  ``offset_from_lengths``: q_offset is ``lengths - T`` (computed here, so the default call
  launches no extra XLA kernel); lengths are clamped to ``[0, S_max]`` here for the same reason.
  """
  split = pl.program_id(0)
  tile = pl.program_id(1)
  b = pl.program_id(3)
  raw_len = lengths_ref[b]
  q_offset = raw_len - q_len if offset_from_lengths else q_offset_ref[b]
  kv_len = jnp.clip(raw_len, 0, k_ref.shape[0])
  first_row = tile * block_m
  t, g, valid = flash.tile_rows(first_row, block_m, group_size, q_len * group_size)
  q = flash.load_rows(q_ref, t, g, valid, head_dim)

  # The tile's visible key blocks [lo, hi) (the window's start, if any, to the last query's
  # diagonal or the length) are divided over the splits in whole blocks, as evenly as blocks
  # allow (split i takes blocks lo + [i*n/splits, (i+1)*n/splits)). Keys every query sees need
  # no mask; only the window's first and the last T keys do.
  first_pos = q_offset + first_row // group_size
  last_pos = q_offset + (jnp.minimum(first_row + block_m, q_len * group_size) - 1) // group_size
  ranges = functools.partial(flash.block_ranges, first_pos, last_pos, kv_len, block_k,
                             causal=True, window=window)
  lo, _, _, hi = ranges()
  n_blocks = hi - lo
  blocks = ranges(lo_block=lo + split * n_blocks // num_splits,
                  hi_block=lo + (split + 1) * n_blocks // num_splits)
  acc, m, l = flash.attend(
      q, k_ref, v_ref, q_offset + t, kv_len, blocks=blocks, block_k=block_k,
      qk_scale=scale * flash.LOG2_E, head_dim=head_dim, window=window, soft_cap=soft_cap,
      guard_values=True)
  out, lse2 = flash.finalize(acc, m, l)
  if direct:
    flash.store_rows(o_ref, out, t, g, valid, head_dim)
    flash.store_row_values(lse_ref, lse2 * flash.LN_2, t, g, valid)
  else:
    flash.store_tile(o_ref, lse_ref, out, lse2, first_row, valid, head_dim)


def _combine_kernel(o_part_ref, lse_part_ref, o_ref, lse_ref, *, num_splits, block_rows,
                    head_dim, group_size, q_len):
  """Merges the splits of ``block_rows`` rows of one (kv head, batch row) in float32.

  Refs: o_part ``[splits, T*G, Hp]``, lse_part ``[splits, T*G]`` (log2); o ``[T, G, Hp]``,
  lse ``[T, G]``. All splits are loaded at once (one round trip, no serial loop). Empty splits
  carry lse ``-inf`` and weigh nothing; a row whose splits are all empty gives 0 and ``-inf``.
  """
  first_row = pl.program_id(0) * block_rows
  splits_p = pl.next_power_of_2(num_splits)
  head_dim_p = o_part_ref.shape[-1]
  t, g, valid = flash.tile_rows(first_row, block_rows, group_size, q_len * group_size)
  split = lax.broadcasted_iota(jnp.int32, (splits_p, block_rows), 0)
  mask2 = (split < num_splits) & valid[None, :]
  lse = tc.load(lse_part_ref.at[pl.ds(0, splits_p), pl.ds(first_row, block_rows)], mask=mask2,
                other=-jnp.inf)
  d = lax.broadcasted_iota(jnp.int32, (1, 1, head_dim_p), 2)
  o = tc.load(o_part_ref.at[pl.ds(0, splits_p), pl.ds(first_row, block_rows), :],
              mask=mask2[:, :, None] & (d < head_dim), other=0.)
  m = jnp.max(lse, axis=0)
  m_safe = jnp.where(m == -jnp.inf, 0., m)
  w = jnp.exp2(lse - m_safe[None, :])  # [splits_p, rows]; exp2(-inf) = 0 for empty splits
  w_sum = jnp.sum(w, axis=0)
  acc = jnp.sum(o * w[:, :, None], axis=0)
  out, lse2 = flash.finalize(acc, m_safe, w_sum)
  flash.store_rows(o_ref, out, t, g, valid, head_dim)
  flash.store_row_values(lse_ref, lse2 * flash.LN_2, t, g, valid)


@functools.partial(jax.jit, static_argnames=("scale", "return_lse", "interpret", "config",
                                             "offset_from_lengths", "sliding_window",
                                             "logits_soft_cap"))
def _decode_call(q, k, v, q_offset, lengths, *, scale, return_lse, interpret, config,
                 offset_from_lengths, sliding_window, logits_soft_cap):
  b, t, n, h = q.shape
  s_max, kh = k.shape[1], k.shape[2]
  g = n // kh
  rows = t * g
  head_dim_p = flash.padded_head_dim(h)
  block_m = tile_rows_for(t, g, config)
  row_tiles = pl.cdiv(rows, block_m)
  # A window bounds the keys a row reads: the splits are planned for what is read.
  visible_max = s_max if sliding_window is None else min(s_max, sliding_window + t - 1)
  splits = choose_splits(b * kh * row_tiles, visible_max, config, tile_rows=min(rows, block_m),
                         itemsize=jnp.dtype(k.dtype).itemsize)
  direct = splits == 1
  block_k = config.single_split_block_k if direct else config.block_k
  block_k = min(block_k, max(16, pl.next_power_of_2(s_max)))
  num_warps = warps_for(block_m, config.single_split_num_warps if direct else config.num_warps,
                        config)
  grid = (splits, row_tiles, kh, b)
  logger.debug("gqa decode launch: B=%d T=%d S_max=%d N=%d K=%d H=%d dtype=%s grid=%s "
               "block_m=%d block_k=%d num_warps=%d num_stages=%d", b, t, s_max, n,
               kh, h, q.dtype, grid, block_m, block_k, num_warps,
               config.num_stages)
  q5 = q.reshape(b, t, kh, g, h)  # free reshape, no copy
  params = dict(block_m=block_m, head_dim=h, group_size=g, q_len=t)
  rows_spec = pl.BlockSpec((b,), lambda *_: (0,))
  q_spec = pl.BlockSpec((None, t, None, g, head_dim_p), lambda sp, j, kk, bb: (bb, 0, kk, 0, 0))
  kv_spec = pl.BlockSpec((None, s_max, None, head_dim_p), lambda sp, j, kk, bb: (bb, 0, kk, 0))
  final_shape = [jax.ShapeDtypeStruct((b, t, kh, g, h), q.dtype),
                 jax.ShapeDtypeStruct((b, t, kh, g), jnp.float32)]
  if direct:
    out_shape = final_shape
    out_specs = [q_spec, pl.BlockSpec((None, t, None, g), lambda sp, j, kk, bb: (bb, 0, kk, 0))]
  else:
    out_shape = [jax.ShapeDtypeStruct((b, kh, splits, rows, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, splits, rows), jnp.float32)]
    out_specs = [
        pl.BlockSpec((None, None, None, rows, head_dim_p),
                     lambda sp, j, kk, bb: (bb, kk, sp, 0, 0)),
        pl.BlockSpec((None, None, None, rows), lambda sp, j, kk, bb: (bb, kk, sp, 0)),
    ]
  outs = pl.pallas_call(
      functools.partial(_decode_kernel, scale=scale, block_k=block_k, num_splits=splits,
                        direct=direct, offset_from_lengths=offset_from_lengths,
                        window=sliding_window, soft_cap=logits_soft_cap, **params),
      grid=grid, in_specs=[rows_spec, rows_spec, q_spec, kv_spec, kv_spec],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=tc.compiler_params(num_warps, config.num_stages),
      interpret=interpret, name="gqa_decode",
  )(q_offset, lengths, q5, k, v)
  if not direct:
    # A second small kernel merges the splits (one launch, float32).
    # Rows per combine program: all splits of a row tile are loaded at once, so the tile is
    # kept to combine_tile_floats.
    combine_rows = max(1, min(pl.next_power_of_2(rows), config.combine_tile_floats // (
        pl.next_power_of_2(splits) * head_dim_p)))
    outs = pl.pallas_call(
        functools.partial(_combine_kernel, num_splits=splits, block_rows=combine_rows,
                          head_dim=h, group_size=g, q_len=t),
        grid=(pl.cdiv(rows, combine_rows), kh, b),
        in_specs=[pl.BlockSpec((None, None, splits, rows, head_dim_p),
                               lambda j, kk, bb: (bb, kk, 0, 0, 0)),
                  pl.BlockSpec((None, None, splits, rows), lambda j, kk, bb: (bb, kk, 0, 0))],
        out_specs=[pl.BlockSpec((None, t, None, g, head_dim_p), lambda j, kk, bb: (bb, 0, kk, 0, 0)),
                   pl.BlockSpec((None, t, None, g), lambda j, kk, bb: (bb, 0, kk, 0))],
        out_shape=final_shape,
        compiler_params=tc.compiler_params(config.combine_num_warps, 1),
        interpret=interpret, name="gqa_decode_combine",
    )(*outs)
  out = outs[0].reshape(b, t, n, h)
  if return_lse:
    return out, outs[1].reshape(b, t, n)
  return out


def decode_attention(q, k, v, q_offset, lengths, *, scale, return_lse, interpret,
                     config: DecodeConfig, sliding_window=None, logits_soft_cap=None):
  """Runs the kernel on validated inputs (see ``gqa_pallas.gqa_decode`` for semantics).

  q ``[B, T, N, H]``; k/v the cache ``[B, S_max, K, H]``; lengths ``int32[B]``; q_offset
  ``int32[B]`` or ``None`` for ``lengths - T`` (derived inside the kernel).
  """
  if q.shape[0] == 0 or q.shape[1] == 0:
    return reference.empty_result(q, return_lse)
  offset_from_lengths = q_offset is None
  return _decode_call(q, k, v, lengths if offset_from_lengths else q_offset, lengths,
                      scale=float(scale), return_lse=return_lse, interpret=interpret,
                      config=config, offset_from_lengths=offset_from_lengths,
                      sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
