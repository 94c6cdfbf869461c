"""Flash-attention forward for causal GQA on Hopper, in Pallas Mosaic GPU (wgmma + TMA).

Layout: q ``[B, T, N, H]``, k/v ``[B, S, K, H]``, group size ``G = N // K``.

One CTA owns one kv head of one batch row and a tile of 128 query rows taken from the ``G``
query heads of the group, so each K/V tile in shared memory serves the whole group. The group's
``G x T`` rows are cut into chunks of ``C`` positions of one head (``chunk_rows``: 64 for
``G <= 2``, 32 for ``G <= 4``, 16 for ``G <= 8``, else 8, so that a tile holds every head of its
positions), ordered position-major (chunk ``j``: head ``j % G``, positions from
``C * (j // G)``), and a tile is ``128 / C`` consecutive chunks, each loaded and stored with one
TMA copy. No head is padded, whatever ``G`` is, and a tile's positions stay contiguous, which
keeps its causal extent tight. The grid runs the kv heads of one (tile, row) next to each other
and the heaviest causal tiles first. Three warpgroups:

* a producer streams K/V blocks by TMA into a ``stages``-deep ring, each slot completed on a
  barrier and released by the consumers on another;
* two consumers own 64 rows each: S = Q K^T and O += P V with ``wgmma`` (float32
  accumulators), the online softmax in base 2 with the scale folded into the exponent (one FMA
  per score). A schedule barrier makes one consumer's softmax overlap the other's matrix
  products, and the wait for the next K block is issued while P V runs.

Per row of the batch, keys at or past ``kv_lengths[b]`` and (causal) past each query's
position ``q_offset[b] + t`` are masked; blocks entirely past them are never loaded, and only
the blocks that cross them pay for the mask. The one block that holds a row's last valid key
has its V rows past the length zeroed in shared memory before P V, so garbage (NaN) there never
reaches the output. Non-finite V values inside the length (design.md, "Invisible slots"): a
read-only XLA pass finds each (row, kv head)'s first such slot; masked blocks at or after it
clear them in shared memory, and the epilogue sets the rows that see it to NaN. Callers never
pad: tiles that run past T or S are masked in the kernel (TMA fills loads past the array with
zeros and clips stores).

Interpreter forms (``interpret=True``, Mosaic GPU's interpreter on the CPU, which lacks a few
idioms in jax 0.10): K arrives pre-transposed so S = Q K^T needs no transposed shared-memory
operand; P goes through shared memory instead of registers; O accumulates in a fresh
accumulator added to the carry instead of ``run_state``; layout casts are dropped; and K/V are
padded to whole blocks and q to whole chunks (the interpreter refuses out-of-bounds TMA), with
NaN, so the masking of tails is still exercised. In both modes T and S that are not multiples of
8 are padded to the next multiple of 8 (with NaN, masked the same way): Mosaic GPU's TMA into
tiled shared memory needs whole 8-row tiles of the array. Everything else (TMA, barriers, the ring, warpgroups,
both ``wgmma``s, the masks and the clearing) is the same code.
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

from gqa_pallas import finite
from gqa_pallas.mosaic import compat

plgpu = compat.plgpu
logger = logging.getLogger("gqa_pallas")

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
ROWS_PER_WG = 64        # one wgmma M tile per consumer warpgroup
CONSUMERS = 2
TILE_ROWS = ROWS_PER_WG * CONSUMERS
MIN_CHUNK_ROWS = 8      # one shared-memory tile row group: TMA's smallest copy into it
HEAD_DIMS = (64, 128)
DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class MosaicPrefillConfig:
  """Static launch configuration (hashable: passed as a static argument).

  Attributes:
    block_kv: keys per K/V tile (64 or 128).
    stages: K/V tiles in flight in the shared-memory ring (at least 2).
    kv_splits: CTAs that share one query tile's keys, each a contiguous range of K/V blocks,
      their partial outputs merged by their lse afterwards (1: no split). The default config
      picks it from the launch: a few query tiles over a long cache (chunked prefill) would
      otherwise leave most of the GPU idle.
  """
  block_kv: int = 128
  stages: int = 2
  kv_splits: int = 1

  def __post_init__(self):
    if self.block_kv not in (64, 128):
      raise ValueError(f"MosaicPrefillConfig.block_kv must be 64 or 128; got {self.block_kv!r}.")
    if not isinstance(self.stages, int) or self.stages < 2:
      raise ValueError(f"MosaicPrefillConfig.stages must be an int >= 2; got {self.stages!r}.")
    if not isinstance(self.kv_splits, int) or self.kv_splits < 1:
      raise ValueError(
          f"MosaicPrefillConfig.kv_splits must be an int >= 1; got {self.kv_splits!r}.")


# (head dim, dtype name) -> config; any device without a table of its own takes this one.
HEURISTIC_TABLE = {(h, dt): MosaicPrefillConfig(block_kv=128, stages=2)
                   for h in HEAD_DIMS for dt in DTYPES}
TUNING_TABLES: dict[str, dict[tuple[int, str], MosaicPrefillConfig]] = {}


MIN_BLOCKS_PER_SPLIT = 8  # below this a split's prologue and merge outweigh its keys


def default_config(dims, dtype, device_kind: str, num_sms: int | None) -> MosaicPrefillConfig:
  """The tuning table's blocks and stages; ``kv_splits`` so that the launch fills the GPU."""
  table = TUNING_TABLES.get(device_kind, HEURISTIC_TABLE)
  config = table[(dims.head_dim, jnp.dtype(dtype).name)]
  return dataclasses.replace(config, kv_splits=kv_splits_for(dims, config.block_kv, num_sms))


def kv_splits_for(dims, block_kv: int, num_sms: int | None) -> int:
  """Splits of the keys when the query tiles alone give fewer CTAs than the GPU has SMs."""
  if not num_sms:
    return 1
  ctas = tiling(dims.group_size, dims.q_len)[1] * dims.num_kv_heads * dims.batch
  by_keys = pl.cdiv(dims.kv_len, block_kv) // MIN_BLOCKS_PER_SPLIT
  return max(1, min(num_sms // ctas, by_keys))


def shared_memory_bytes(head_dim: int, config: MosaicPrefillConfig, itemsize: int = 2) -> int:
  """Q/O tiles, the K/V ring, the lse rows: what one CTA allocates."""
  return (TILE_ROWS * head_dim + 2 * config.stages * config.block_kv * head_dim) * itemsize + (
      TILE_ROWS * 4)


def unsupported(head_dim: int, dtype: str) -> str | None:
  """Why the kernel cannot take these inputs (``None`` if it can)."""
  if compat.MISSING:
    return compat.MISSING
  if dtype not in DTYPES:
    return f"dtype={dtype} (the Mosaic GPU prefill takes bfloat16 and float16)"
  if head_dim not in HEAD_DIMS:
    return (f"head_dim={head_dim} (the Mosaic GPU prefill takes head dims {HEAD_DIMS}; 256 "
            "does not fit its shared-memory ring and registers)")
  return None


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _swizzled(shape, dtype):
  """Shared memory in the tiled, 128-byte-swizzled layout TMA and wgmma expect."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                              plgpu.SwizzleTransform(128)))


def chunk_rows(group_size: int) -> int:
  """Positions of one head per chunk (one TMA copy): the most (8, 16, 32 or 64) that still puts
  all ``G`` heads of a position in one 128-row tile. Fewer, larger copies are cheaper (8-row
  copies cost 3-7% against one copy per warpgroup, benchmarks/NOTES.md)."""
  rows = ROWS_PER_WG
  while rows > MIN_CHUNK_ROWS and rows * group_size > TILE_ROWS:
    rows //= 2
  return rows


def chunk_origin(chunk, group_size: int):
  """(head within the group, first position) of chunk ``chunk``: chunks are position-major, so
  the ``G`` heads of one block of positions are consecutive and a tile's positions are
  contiguous."""
  return lax.rem(chunk, group_size), lax.div(chunk, group_size) * chunk_rows(group_size)


def tiling(group_size: int, q_len: int) -> tuple[int, int]:
  """``(chunks, tiles)``: the chunks of one kv head's ``G x T`` query rows, 128-row tiles."""
  rows = chunk_rows(group_size)
  chunks = group_size * pl.cdiv(q_len, rows)
  return chunks, pl.cdiv(chunks, TILE_ROWS // rows)


def warpgroup_key_blocks(first_chunk, *, num_chunks, group_size, q_len, q_offset, kv_len,
                         block_kv, causal):
  """``(full, blocks)`` of a warpgroup whose 64 rows start at chunk ``first_chunk``: key blocks
  below ``full`` are visible to every row, keys in blocks below ``blocks`` to some row (0 for a
  warpgroup past the last chunk). Positions grow with the chunk, so its first and last chunks
  bound them; chunks past the end repeat the last one."""
  rows_per_chunk = chunk_rows(group_size)
  last_chunk = jnp.minimum(first_chunk + ROWS_PER_WG // rows_per_chunk - 1, num_chunks - 1)
  first_t = chunk_origin(jnp.minimum(first_chunk, num_chunks - 1), group_size)[1]
  last_t = jnp.minimum(chunk_origin(last_chunk, group_size)[1] + rows_per_chunk, q_len) - 1
  if causal:
    end = jnp.clip(jnp.minimum(kv_len, q_offset + last_t + 1), 0, None)
    full = jnp.clip(jnp.minimum(kv_len, q_offset + first_t + 1), 0, None) // block_kv
  else:
    end = jnp.clip(kv_len, 0, None)
    full = end // block_kv
  blocks = jnp.where(first_chunk < num_chunks, pl.cdiv(end, block_kv), 0)
  return full, blocks


def _kernel(q_offset_ref, kv_lengths_ref, first_bad_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
            scratch, *, causal, qk_scale, q_len, group_size, num_tiles, block_kv, stages,
            kv_splits, blocks_per_split, interpret):
  """One (query tile, kv head, batch row); see the module docstring for the plan.

  Refs: q ``[B, T, N, H]``; k/v ``[B, S, K, H]`` (interpret: k ``[B, K, H, S]``); o
  ``[P, B, T, N, H]`` and lse ``[P, B, N, T]`` (or None), ``P = kv_splits``; q_offset /
  kv_lengths ``int32[B]``; first_bad ``int32[B, K]`` (``finite.first_bad_slots``). Split ``p`` sees
  key blocks ``[p, p + 1) * blocks_per_split``.
  """
  (q_smem, k_smem, v_smem, p_smem, lse_smem, q_bar, k_bar, v_bar, k_free, v_free,
   sched) = scratch
  head_dim = q_smem.shape[-1]
  num_chunks = tiling(group_size, q_len)[0]
  rows_per_chunk = chunk_rows(group_size)
  chunks_per_wg = ROWS_PER_WG // rows_per_chunk
  b = lax.axis_index("b")
  kv_head = lax.axis_index("kv_head")
  tile_split = lax.axis_index("tile")
  tile = num_tiles - 1 - lax.div(tile_split, kv_splits)  # the heaviest causal tiles first
  split = lax.rem(tile_split, kv_splits)
  first_block = split * blocks_per_split
  q_offset = q_offset_ref[b]
  kv_len = kv_lengths_ref[b]
  first_bad = first_bad_ref[b, kv_head]
  wg = lax.axis_index("wg")

  def first_chunk(w):
    return (tile * CONSUMERS + w) * chunks_per_wg

  def chunk(w, c):
    """Chunk ``c`` of warpgroup ``w``; chunks past the end repeat the last one (never stored)."""
    return jnp.minimum(first_chunk(w) + c, num_chunks - 1)

  def key_extent(w):
    """``warpgroup_key_blocks`` of warpgroup ``w``, within this split's blocks."""
    full, blocks = warpgroup_key_blocks(
        first_chunk(w), num_chunks=num_chunks, group_size=group_size, q_len=q_len,
        q_offset=q_offset, kv_len=kv_len, block_kv=block_kv, causal=causal)
    blocks = jnp.clip(blocks, first_block, first_block + blocks_per_split)
    return jnp.clip(full, first_block, blocks), blocks

  # Blocks the producer loads, from first_block: what either warpgroup needs.
  num_blocks = jnp.maximum(key_extent(0)[1], key_extent(1)[1]) - first_block

  def layout(x, lay):
    return x if interpret else plgpu.layout_cast(x, lay)

  def schedule():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  def ring_slot(i):
    return lax.rem(i - first_block, stages)

  def wait_keys(i):
    """Every step starts with its K block landed: step ``i`` waits for block ``i + 1``."""
    @pl.when(i - first_block < num_blocks)
    def _():
      plgpu.barrier_wait(k_bar.at[ring_slot(i)])

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    q_tile = q_smem.at[wg]
    for c in range(chunks_per_wg):
      g, t = chunk_origin(chunk(wg, c), group_size)
      rows = pl.ds(c * rows_per_chunk, rows_per_chunk)
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(t, rows_per_chunk), kv_head * group_size + g],
                              q_tile.at[rows], q_bar.at[wg])
    plgpu.barrier_wait(q_bar.at[wg])
    full, blocks = key_extent(wg)

    def visible_end():
      """``[64]`` (causal): each row sees keys ``[0, end)``: kv_len and its own position."""
      row = layout(lax.broadcasted_iota(jnp.int32, (ROWS_PER_WG,), 0),
                   plgpu.Layout.WGMMA.reduce(1))
      rows_chunk = jnp.minimum(first_chunk(wg) + lax.div(row, rows_per_chunk), num_chunks - 1)
      position = (q_offset + lax.div(rows_chunk, group_size) * rows_per_chunk
                  + lax.rem(row, rows_per_chunk))
      return jnp.minimum(position + 1, kv_len)

    def visible_keys(i):
      """[64, block_kv] mask of block ``i``: keys before kv_len and (causal) each row's position.
      The bound is worked out per row (two rows per thread), so each score pays one compare."""
      key = layout(lax.broadcasted_iota(jnp.int32, (ROWS_PER_WG, block_kv), 1),
                   plgpu.Layout.WGMMA)
      if not causal:
        return key < kv_len - i * block_kv
      bound = visible_end() - i * block_kv  # keys [0, bound) of the block
      return key < lax.broadcast_in_dim(bound, key.shape, [0])

    def qk(slot):
      def body(acc_ref):
        k_operand = k_smem.at[slot] if interpret else k_smem.at[slot].T
        plgpu.wgmma(acc_ref, q_tile, k_operand)
        schedule()
        return acc_ref[...]
      return pl.run_scoped(body, plgpu.ACC((ROWS_PER_WG, block_kv), jnp.float32))

    def pv(acc, p, slot, i):
      if interpret:
        p_smem.at[wg][...] = p
        plgpu.commit_smem()

        def body(acc_ref):
          plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem.at[slot])
          wait_keys(i + 1)
          return acc_ref[...]
        return acc + pl.run_scoped(body, plgpu.ACC((ROWS_PER_WG, head_dim), jnp.float32))

      def body(acc_ref):
        plgpu.wgmma(acc_ref, p, v_smem.at[slot])
        wait_keys(i + 1)  # while the tensor cores work on P V
      return pl.run_state(body)(plgpu.ACC.init(acc))

    def clear_v(i, slot):
      """Zeroes, in the V tile of masked block ``i``, the rows at or past kv_len (the block that
      holds the row's last key) and, in blocks at or past the first slot with a non-finite
      value, every non-finite value (never in the common case: ``first_bad`` is then S).

      Both consumers may clear one tile while the other reads it: what they write is the same,
      and a row that could read a cleared non-finite value sees that slot's first bad slot, so
      its output is NaN anyway (the epilogue)."""
      start = i * block_kv
      past_length = (kv_len < start + block_kv) & (kv_len < v_ref.shape[1])
      needs = (start < kv_len) & (past_length | (first_bad < start + block_kv))

      @pl.when(needs)
      def _():
        tile_ref = v_smem.at[slot]
        rows = layout(lax.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0),
                      plgpu.Layout.WGMMA)
        vals = tile_ref[...] if interpret else plgpu.load(tile_ref, (),
                                                          layout=plgpu.Layout.WGMMA)
        zeros = jnp.zeros_like(vals)
        finite = jnp.where((vals - vals) == zeros, vals, zeros)  # inf - inf, NaN - NaN: NaN
        tile_ref[...] = jnp.where(start + rows < kv_len, finite, zeros)
        plgpu.commit_smem()

    def step(i, carry, masked):
      acc, m_prev, l_prev = carry
      slot = ring_slot(i)
      s = qk(slot)
      plgpu.barrier_arrive(k_free.at[slot])
      if qk_scale <= 0:  # scaling after the max would flip it: scale first, then mask
        s = s * qk_scale
      if masked:
        s = jnp.where(visible_keys(i), s, -jnp.inf)
      # m is kept in the base-2 exponent's units, so that each p costs one FMA and an exp2.
      scaled = (lambda x: x * qk_scale) if qk_scale > 0 else (lambda x: x)
      m_next = jnp.maximum(m_prev, scaled(jnp.max(s, axis=1)))
      # A row that has seen no visible key keeps m == -inf: shift by 0 there, so that
      # exp2(-inf - -inf) never makes a NaN. Unmasked blocks always hold a visible key.
      m_safe = jnp.where(m_next == -jnp.inf, 0., m_next) if masked else m_next
      alpha = jnp.exp2(m_prev - m_safe)
      m_rows = lax.broadcast_in_dim(m_safe, s.shape, [0])
      p = jnp.exp2(scaled(s) - m_rows)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l_next = l_prev * alpha + jnp.sum(p, axis=1)
      p = p.astype(q_smem.dtype)
      if head_dim <= 128:  # keep the softmax ahead of the barriers (measured faster)
        acc, l_next, m_next, p = lax.optimization_barrier((acc, l_next, m_next, p))
      plgpu.barrier_arrive(sched)  # softmax done: the other warpgroup may use the tensor cores
      plgpu.barrier_wait(v_bar.at[slot])
      if masked:
        clear_v(i, slot)
      plgpu.barrier_wait(sched)
      acc = pv(acc, p, slot, i)
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_next, l_next

    def drain(i, _):
      """A block the producer loaded for the other warpgroup: release it, keep in step."""
      slot = ring_slot(i)
      plgpu.barrier_arrive(k_free.at[slot])
      schedule()
      schedule()
      plgpu.barrier_wait(v_bar.at[slot])
      wait_keys(i + 1)
      plgpu.barrier_arrive(v_free.at[slot])

    carry = (layout(jnp.zeros((ROWS_PER_WG, head_dim), jnp.float32), plgpu.Layout.WGMMA),
             layout(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32),
                    plgpu.Layout.WGMMA.reduce(1)),
             layout(jnp.zeros((ROWS_PER_WG,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
    wait_keys(first_block)
    pl.when(wg == 1)(schedule)  # start half a step behind warpgroup 0
    carry = lax.fori_loop(first_block, full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full, blocks, functools.partial(step, masked=True), carry)
    lax.fori_loop(blocks, first_block + num_blocks, drain, None)
    pl.when(wg == 0)(schedule)
    acc, m, l = carry

    has_keys = l > 0
    l_safe = jnp.where(has_keys, l, 1.)
    out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    # Rows that see the first slot with a non-finite V value, if this split holds it, are NaN
    # (design.md; the other splits merge into NaN by the lse).
    split_holds = (first_bad >= first_block * block_kv) & (
        first_bad < (first_block + blocks_per_split) * block_kv)
    # Added as NaN or 0 (row vectors broadcast as floats, as l is above).
    if causal:
      poison = jnp.where((first_bad < visible_end()) & split_holds, jnp.nan, 0.)
      out = out + lax.broadcast_in_dim(poison, out.shape, [0])
    else:  # every row sees [0, kv_len)
      out = out + jnp.where((first_bad < kv_len) & split_holds, jnp.nan, 0.)
    q_tile[...] = out.astype(q_smem.dtype)
    if lse_ref is not None:
      lse_smem.at[wg][...] = jnp.where(has_keys, (m + jnp.log2(l_safe)) * LN_2, -jnp.inf)
    plgpu.commit_smem()
    for c in range(chunks_per_wg):
      rows = pl.ds(c * rows_per_chunk, rows_per_chunk)

      @pl.when(first_chunk(wg) + c < num_chunks)
      def _():
        g, t = chunk_origin(first_chunk(wg) + c, group_size)
        head = kv_head * group_size + g
        plgpu.copy_smem_to_gmem(q_tile.at[rows],
                                o_ref.at[split, b, pl.ds(t, rows_per_chunk), head])
        if lse_ref is not None:
          plgpu.copy_smem_to_gmem(lse_smem.at[wg, rows],
                                  lse_ref.at[split, b, head, pl.ds(t, rows_per_chunk)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def k_source(i):
      keys = pl.ds((first_block + i) * block_kv, block_kv)
      return k_ref.at[b, kv_head, :, keys] if interpret else k_ref.at[b, keys, kv_head]

    def load(i, _):  # block first_block + i
      slot = lax.rem(i, stages)

      @pl.when(i >= stages)  # wait until both consumers released what the slot held
      def _():
        plgpu.barrier_wait(k_free.at[slot])
      plgpu.copy_gmem_to_smem(k_source(i), k_smem.at[slot], k_bar.at[slot])

      @pl.when(i >= stages)
      def _():
        plgpu.barrier_wait(v_free.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds((first_block + i) * block_kv, block_kv), kv_head],
                              v_smem.at[slot], v_bar.at[slot])

    lax.fori_loop(0, num_blocks, load, None)

    def release(i, _):  # observe the last releases, so that no barrier phase goes unseen
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
    lax.fori_loop(jnp.maximum(num_blocks - stages, 0), num_blocks, release, None)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "return_lse", "interpret",
                                             "config"))
def prefill_attention(q, k, v, q_offset, kv_lengths, *, causal, scale, return_lse, interpret,
                      config):
  """Runs the kernel on validated inputs (see ``gqa_pallas.gqa_attention`` for semantics).

  ``q_offset``/``kv_lengths`` are ``int32[B]``, defaults resolved and lengths in ``[0, S]``;
  ``scale`` a float; B, T and S are non-zero (``gqa_attention`` answers empty inputs itself).
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  block_kv, stages = config.block_kv, config.stages
  num_chunks, num_tiles = tiling(g, t)
  kv_blocks = pl.cdiv(s, block_kv)
  blocks_per_split = pl.cdiv(kv_blocks, min(config.kv_splits, kv_blocks))
  kv_splits = pl.cdiv(kv_blocks, blocks_per_split)  # none left empty
  t_len = t
  first_bad = finite.first_bad_slots(v, kv_lengths)
  # TMA into tiled shared memory needs the sequence dims of q and k/v in whole 8-row tiles; the
  # hardware zero-fills the rest of a chunk or block that runs past the array (and clips its
  # stores), but the interpreter refuses out-of-bounds TMA, so there T is padded to whole
  # chunks and S to whole blocks. Padding rows hold NaN: they sit past T and past kv_lengths,
  # so the kernel's masks must keep them out, exactly as for the tails the hardware zero-fills.
  t_pad = _round_up(t, chunk_rows(g) if interpret else MIN_CHUNK_ROWS)
  s_pad = _round_up(max(s, 1), block_kv if interpret else 8)
  if t_pad != t:
    q = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)), constant_values=jnp.nan)
  if s_pad != s:
    k = jnp.pad(k, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)), constant_values=jnp.nan)
    v = jnp.pad(v, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)), constant_values=jnp.nan)
  if interpret:
    k = jnp.transpose(k, (0, 2, 3, 1))  # [B, K, H, S]: S = Q K^T without a transposed operand
  t = t_pad
  logger.debug("gqa prefill launch (mosaic): B=%d T=%d S=%d N=%d K=%d H=%d dtype=%s grid=%s "
               "chunks=%d block_kv=%d stages=%d kv_splits=%d", b, t_len, s, n, kh, h, q.dtype,
               (kh, num_tiles * kv_splits, b), num_chunks, block_kv, stages, kv_splits)
  with_lse = return_lse or kv_splits > 1  # the merge weighs the splits by their lse
  k_shape = (stages, h, block_kv) if interpret else (stages, block_kv, h)
  scratch = [
      _swizzled((CONSUMERS, ROWS_PER_WG, h), q.dtype),
      _swizzled(k_shape, k.dtype),
      _swizzled((stages, block_kv, h), v.dtype),
      _swizzled((CONSUMERS, ROWS_PER_WG, block_kv), q.dtype) if interpret else None,
      plgpu.SMEM((CONSUMERS, ROWS_PER_WG), jnp.float32) if with_lse else None,
      plgpu.Barrier(num_arrivals=ROWS_PER_WG // chunk_rows(g), num_barriers=CONSUMERS),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=CONSUMERS),
  ]
  kernel = functools.partial(
      _kernel, causal=causal, qk_scale=scale * LOG2_E, q_len=t_len, group_size=g,
      num_tiles=num_tiles, block_kv=block_kv, stages=stages, kv_splits=kv_splits,
      blocks_per_split=blocks_per_split, interpret=interpret)

  def body(q_offset_ref, kv_lengths_ref, first_bad_ref, q_ref, k_ref, v_ref, o_ref, *lse_refs):
    lse_ref = lse_refs[0] if lse_refs else None
    pl.run_scoped(lambda *refs: kernel(q_offset_ref, kv_lengths_ref, first_bad_ref, q_ref,
                                       k_ref, v_ref, o_ref, lse_ref, refs),
                  *scratch, collective_axes="wg")

  out_type = [jax.ShapeDtypeStruct((kv_splits, b, t, n, h), q.dtype)]
  if with_lse:
    # Whole chunks: a chunk's lse row is one contiguous bulk copy, which Mosaic GPU bounds by
    # the array's end only, not by T (a row past T would land in the next head's row).
    out_type.append(jax.ShapeDtypeStruct((kv_splits, b, n, _round_up(t, chunk_rows(g))),
                                         jnp.float32))
  outs = plgpu.kernel(
      body, out_type=out_type, grid=(kh, num_tiles * kv_splits, b),
      grid_names=("kv_head", "tile", "b"),
      num_threads=CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=compat.interpret_params() if interpret else None,
  )(q_offset, kv_lengths, first_bad, q, k, v)
  if kv_splits == 1:
    out, lse = outs[0][0], outs[1][0] if with_lse else None
  else:
    out, lse = merge_splits(outs[0], outs[1][..., :t])
  out = out[:, :t_len]
  if return_lse:
    return out, jnp.transpose(lse[:, :, :t_len], (0, 2, 1))
  return out


def merge_splits(outs, lses):
  """One output from ``P`` partial ones over disjoint key ranges.

  ``outs`` ``[P, B, T, N, H]`` (each normalised over its own keys), ``lses`` ``float32[P, B, N,
  T]`` (``-inf`` where a split saw no key) -> ``([B, T, N, H], float32[B, N, T])``; rows no split
  saw come out 0 with lse ``-inf``, as from the unsplit kernel.
  """
  top = jnp.max(lses, axis=0)
  top = jnp.where(jnp.isfinite(top), top, 0.)
  weights = jnp.exp(lses - top)                      # [P, B, N, T]; 0 for empty splits
  total = jnp.sum(weights, axis=0)
  lse = jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.)), -jnp.inf)
  weights = weights / jnp.where(total > 0, total, 1.)
  # An elementwise sum, not a dot: no TF32 on the way.
  out = jnp.sum(jnp.transpose(weights, (0, 1, 3, 2))[..., None] * outs.astype(jnp.float32),
                axis=0)
  return out.astype(outs.dtype), lse

