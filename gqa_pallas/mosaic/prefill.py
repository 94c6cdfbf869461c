"""Flash-attention forward for causal GQA on Hopper, in Pallas Mosaic GPU (wgmma + TMA).

Layout: q ``[B, T, N, H]``, k/v ``[B, S, K, H]``, group size ``G = N // K``.

One CTA owns one kv head of one batch row and a tile of 128 query rows: the ``G`` query heads
of the group times ``bt = 128 / G_pad`` positions (``G_pad``: ``G`` rounded up to a power of
two), so each K/V tile in shared memory serves the whole group. Rows are ordered (head,
position): head ``g`` holds rows ``[g * bt, (g + 1) * bt)``, loaded and stored with one TMA
copy per head. Three warpgroups:

* a producer streams K/V blocks by TMA into a ``stages``-deep ring, each slot completed on a
  barrier and released by the consumers on another;
* two consumers own 64 rows each: S = Q K^T and O += P V with ``wgmma`` (float32
  accumulators), the online softmax in base 2 with the scale folded into the exponent. A
  schedule barrier makes one consumer's softmax overlap the other's matrix products.

Per row of the batch, keys at or past ``kv_lengths[b]`` and (causal) past each query's
position ``q_offset[b] + t`` are masked; blocks entirely past them are never loaded, and only
the blocks that cross them pay for the mask. The one block that holds a row's last valid key
has its V rows past the length zeroed in shared memory before P V, so garbage (NaN) there never
reaches the output. Callers never pad: tiles that run past T or S are masked in the kernel
(TMA fills loads past the array with zeros and clips stores).

Interpreter forms (``interpret=True``, Mosaic GPU's interpreter on the CPU, which lacks a few
idioms in jax 0.10): K arrives pre-transposed so S = Q K^T needs no transposed shared-memory
operand; P goes through shared memory instead of registers; O accumulates in a fresh
accumulator added to the carry instead of ``run_state``; layout casts are dropped; and the
inputs are padded to whole tiles (the interpreter refuses out-of-bounds TMA), with NaN, so the
masking of tails is still exercised. On the GPU, T and S that are not multiples of 8 are padded
to the next multiple of 8 (with NaN, masked the same way): Mosaic GPU's TMA into tiled shared
memory needs whole 8-row tiles of the array. Everything else (TMA, barriers, the ring, warpgroups,
both ``wgmma``s, the masks and the zeroing) is the same code.
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

from gqa_pallas.mosaic import compat

plgpu = compat.plgpu
logger = logging.getLogger("gqa_pallas")

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
ROWS_PER_WG = 64        # one wgmma M tile per consumer warpgroup
CONSUMERS = 2
TILE_ROWS = ROWS_PER_WG * CONSUMERS
HEAD_DIMS = (64, 128)
MAX_GROUP = 16          # bt = 128 / G_pad >= 8 rows (one shared-memory tile row group)
DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class MosaicPrefillConfig:
  """Static launch configuration (hashable: passed as a static argument).

  Attributes:
    block_kv: keys per K/V tile (64 or 128).
    stages: K/V tiles in flight in the shared-memory ring (at least 2).
  """
  block_kv: int = 128
  stages: int = 2

  def __post_init__(self):
    if self.block_kv not in (64, 128):
      raise ValueError(f"MosaicPrefillConfig.block_kv must be 64 or 128; got {self.block_kv!r}.")
    if not isinstance(self.stages, int) or self.stages < 2:
      raise ValueError(f"MosaicPrefillConfig.stages must be an int >= 2; got {self.stages!r}.")


# (head dim, dtype name) -> config; any device without a table of its own takes this one.
HEURISTIC_TABLE = {(h, dt): MosaicPrefillConfig(block_kv=128, stages=2)
                   for h in HEAD_DIMS for dt in DTYPES}
TUNING_TABLES: dict[str, dict[tuple[int, str], MosaicPrefillConfig]] = {}


def default_config(head_dim: int, dtype, device_kind: str) -> MosaicPrefillConfig:
  table = TUNING_TABLES.get(device_kind, HEURISTIC_TABLE)
  return table[(head_dim, jnp.dtype(dtype).name)]


def shared_memory_bytes(head_dim: int, config: MosaicPrefillConfig, itemsize: int = 2) -> int:
  """Q/O tiles, the K/V ring, the lse rows: what one CTA allocates."""
  return (TILE_ROWS * head_dim + 2 * config.stages * config.block_kv * head_dim) * itemsize + (
      TILE_ROWS * 4)


def group_rows(group_size: int) -> tuple[int, int]:
  """``(G_pad, bt)``: heads per tile (a power of two) and positions per head."""
  g_pad = 1 << max(group_size - 1, 0).bit_length()
  return g_pad, TILE_ROWS // g_pad


def unsupported(head_dim: int, dtype: str, group_size: int) -> str | None:
  """Why the kernel cannot take these inputs (``None`` if it can)."""
  if compat.MISSING:
    return compat.MISSING
  if dtype not in DTYPES:
    return f"dtype={dtype} (the Mosaic GPU prefill takes bfloat16 and float16)"
  if head_dim not in HEAD_DIMS:
    return (f"head_dim={head_dim} (the Mosaic GPU prefill takes head dims {HEAD_DIMS}; 256 "
            "does not fit its shared-memory ring and registers)")
  if group_size > MAX_GROUP:
    return (f"group size N // K = {group_size} (the Mosaic GPU prefill packs at most "
            f"{MAX_GROUP} query heads per kv head into a 128-row tile)")
  return None


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _swizzled(shape, dtype):
  """Shared memory in the tiled, 128-byte-swizzled layout TMA and wgmma expect."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                              plgpu.SwizzleTransform(128)))


def _kernel(q_offset_ref, kv_lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scratch, *,
            causal, qk_scale, q_len, group_size, num_tiles, block_kv, stages, interpret):
  """One (query tile, kv head, batch row); see the module docstring for the plan.

  Refs: q/o ``[B, T, N, H]``; k/v ``[B, S, K, H]`` (interpret: k ``[B, K, H, S]``); lse
  ``[B, N, T]`` or None; q_offset / kv_lengths ``int32[B]``.
  """
  (q_smem, k_smem, v_smem, p_smem, lse_smem, q_bar, k_bar, v_bar, k_free, v_free,
   sched) = scratch
  g_pad, bt = group_rows(group_size)
  rows_per_copy = min(bt, ROWS_PER_WG)       # rows of one head inside one warpgroup's tile
  copies = ROWS_PER_WG // rows_per_copy      # TMA copies per warpgroup tile
  head_dim = q_smem.shape[-1]
  b = lax.axis_index("b")
  kv_head = lax.axis_index("kv_head")
  tile = num_tiles - 1 - lax.axis_index("tile")  # the heaviest causal tiles first
  t0 = tile * bt
  q_offset = q_offset_ref[b]
  kv_len = kv_lengths_ref[b]
  wg = lax.axis_index("wg")

  def copy_origin(w, c):
    """(head within the group, first position) of TMA copy ``c`` of warpgroup ``w``."""
    first = w * ROWS_PER_WG + c * rows_per_copy
    return first // bt, t0 + first % bt

  def key_extent(w):
    """(unmasked blocks, blocks) of warpgroup ``w``: keys ``[0, end)`` are visible to some row,
    blocks below ``full`` to every row."""
    _, first_t = copy_origin(w, 0)
    last_t = jnp.minimum(first_t + min(bt, ROWS_PER_WG), q_len) - 1
    if causal:
      end = jnp.clip(jnp.minimum(kv_len, q_offset + last_t + 1), 0, None)
      full = jnp.clip(jnp.minimum(kv_len, q_offset + first_t + 1), 0, None) // block_kv
    else:
      end = jnp.clip(kv_len, 0, None)
      full = end // block_kv
    blocks = jnp.where(first_t < q_len, pl.cdiv(end, block_kv), 0)
    return jnp.minimum(full, blocks), blocks

  num_blocks = jnp.maximum(key_extent(0)[1], key_extent(1)[1])

  def layout(x, lay):
    return x if interpret else plgpu.layout_cast(x, lay)

  def schedule():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    q_tile = q_smem.at[wg]
    for c in range(copies):
      g, t = copy_origin(wg, c)
      head = kv_head * group_size + jnp.minimum(g, group_size - 1)  # padding heads: a real one
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(t, rows_per_copy), head],
                              q_tile.at[pl.ds(c * rows_per_copy, rows_per_copy)], q_bar.at[wg])
    plgpu.barrier_wait(q_bar.at[wg])
    full, blocks = key_extent(wg)

    iota = lambda dim: layout(lax.broadcasted_iota(jnp.int32, (ROWS_PER_WG, block_kv), dim),
                              plgpu.Layout.WGMMA)
    row, col = iota(0), iota(1)
    row_pos = q_offset + t0 + (wg * ROWS_PER_WG + row) % bt  # each row's absolute position

    def qk(slot):
      def body(acc_ref):
        k_operand = k_smem.at[slot] if interpret else k_smem.at[slot].T
        plgpu.wgmma(acc_ref, q_tile, k_operand)
        schedule()
        return acc_ref[...]
      return pl.run_scoped(body, plgpu.ACC((ROWS_PER_WG, block_kv), jnp.float32))

    def pv(acc, p, slot):
      if interpret:
        p_smem.at[wg][...] = p
        plgpu.commit_smem()

        def body(acc_ref):
          plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem.at[slot])
          return acc_ref[...]
        return acc + pl.run_scoped(body, plgpu.ACC((ROWS_PER_WG, head_dim), jnp.float32))
      return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p, v_smem.at[slot]))(
          plgpu.ACC.init(acc))

    def zero_v_past_length(i, slot):
      """Zeroes the V rows at or past kv_len in the block that holds the row's last key."""
      start = i * block_kv
      needs = (start < kv_len) & (kv_len < start + block_kv) & (kv_len < v_ref.shape[1])

      @pl.when(needs)
      def _():
        tile_ref = v_smem.at[slot]
        rows = layout(lax.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0),
                      plgpu.Layout.WGMMA)
        vals = tile_ref[...] if interpret else plgpu.load(tile_ref, (),
                                                          layout=plgpu.Layout.WGMMA)
        tile_ref[...] = jnp.where(start + rows < kv_len, vals, jnp.zeros_like(vals))
        plgpu.commit_smem()

    def step(i, carry, masked):
      acc, m_prev, l_prev = carry
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(k_bar.at[slot])
      s = qk(slot) * qk_scale
      plgpu.barrier_arrive(k_free.at[slot])
      if masked:
        key = i * block_kv + col
        visible = key < kv_len
        if causal:
          visible = visible & (key <= row_pos)
        s = jnp.where(visible, s, -jnp.inf)
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
      # A row that has seen no visible key keeps m == -inf: shift by 0 there, so that
      # exp2(-inf - -inf) never makes a NaN. Unmasked blocks always hold a visible key.
      m_safe = jnp.where(m_next == -jnp.inf, 0., m_next) if masked else m_next
      alpha = jnp.exp2(m_prev - m_safe)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
      l_next = l_prev * alpha + jnp.sum(p, axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      p = p.astype(q_smem.dtype)
      plgpu.barrier_arrive(sched)  # softmax done: the other warpgroup may use the tensor cores
      plgpu.barrier_wait(v_bar.at[slot])
      if masked:
        zero_v_past_length(i, slot)
      plgpu.barrier_wait(sched)
      acc = pv(acc, p, slot)
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_next, l_next

    def drain(i, _):
      """A block the producer loaded for the other warpgroup: release it, keep in step."""
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(k_bar.at[slot])
      plgpu.barrier_arrive(k_free.at[slot])
      schedule()
      schedule()
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_arrive(v_free.at[slot])

    carry = (layout(jnp.zeros((ROWS_PER_WG, head_dim), jnp.float32), plgpu.Layout.WGMMA),
             layout(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32),
                    plgpu.Layout.WGMMA.reduce(1)),
             layout(jnp.zeros((ROWS_PER_WG,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
    pl.when(wg == 1)(schedule)  # start half a step behind warpgroup 0
    carry = lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full, blocks, functools.partial(step, masked=True), carry)
    lax.fori_loop(blocks, num_blocks, drain, None)
    pl.when(wg == 0)(schedule)
    acc, m, l = carry

    has_keys = l > 0
    l_safe = jnp.where(has_keys, l, 1.)
    q_tile[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(q_smem.dtype)
    if lse_ref is not None:
      lse_smem.at[wg][...] = jnp.where(has_keys, (m + jnp.log2(l_safe)) * LN_2, -jnp.inf)
    plgpu.commit_smem()
    for c in range(copies):
      g, t = copy_origin(wg, c)
      rows = pl.ds(c * rows_per_copy, rows_per_copy)

      @pl.when(g < group_size)
      def _():
        head = kv_head * group_size + g
        plgpu.copy_smem_to_gmem(q_tile.at[rows], o_ref.at[b, pl.ds(t, rows_per_copy), head])
        if lse_ref is not None:
          plgpu.copy_smem_to_gmem(lse_smem.at[wg, rows],
                                  lse_ref.at[b, head, pl.ds(t, rows_per_copy)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def k_source(i):
      keys = pl.ds(i * block_kv, block_kv)
      return k_ref.at[b, kv_head, :, keys] if interpret else k_ref.at[b, keys, kv_head]

    def load(i, _):
      slot = lax.rem(i, stages)

      @pl.when(i >= stages)  # wait until both consumers released what the slot held
      def _():
        plgpu.barrier_wait(k_free.at[slot])
      plgpu.copy_gmem_to_smem(k_source(i), k_smem.at[slot], k_bar.at[slot])

      @pl.when(i >= stages)
      def _():
        plgpu.barrier_wait(v_free.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(i * block_kv, block_kv), kv_head],
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
  g_pad, bt = group_rows(g)
  block_kv, stages = config.block_kv, config.stages
  num_tiles = pl.cdiv(t, bt)
  t_len = t
  # TMA into tiled shared memory needs the sequence dims of q and k/v in whole 8-row tiles;
  # the interpreter refuses out-of-bounds TMA altogether, so it gets whole query tiles and
  # K/V blocks. Padding rows hold NaN: they sit past T and past kv_lengths, so the kernel's
  # masks must keep them out, exactly as for the tails the hardware zero-fills.
  t_pad = _round_up(t, bt if interpret else 8)
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
               "rows=%dx%d block_kv=%d stages=%d", b, t_len, s, n, kh, h, q.dtype,
               (num_tiles, kh, b), g_pad, bt, block_kv, stages)
  k_shape = (stages, h, block_kv) if interpret else (stages, block_kv, h)
  scratch = [
      _swizzled((CONSUMERS, ROWS_PER_WG, h), q.dtype),
      _swizzled(k_shape, k.dtype),
      _swizzled((stages, block_kv, h), v.dtype),
      _swizzled((CONSUMERS, ROWS_PER_WG, block_kv), q.dtype) if interpret else None,
      plgpu.SMEM((CONSUMERS, ROWS_PER_WG), jnp.float32) if return_lse else None,
      plgpu.Barrier(num_arrivals=ROWS_PER_WG // min(bt, ROWS_PER_WG), num_barriers=CONSUMERS),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=CONSUMERS),
  ]
  kernel = functools.partial(
      _kernel, causal=causal, qk_scale=scale * LOG2_E, q_len=t_len, group_size=g,
      num_tiles=num_tiles, block_kv=block_kv, stages=stages, interpret=interpret)

  def body(q_offset_ref, kv_lengths_ref, q_ref, k_ref, v_ref, o_ref, *lse_refs):
    lse_ref = lse_refs[0] if lse_refs else None
    pl.run_scoped(lambda *refs: kernel(q_offset_ref, kv_lengths_ref, q_ref, k_ref, v_ref, o_ref,
                                       lse_ref, refs),
                  *scratch, collective_axes="wg")

  out_type = [jax.ShapeDtypeStruct((b, t, n, h), q.dtype)]
  if return_lse:
    out_type.append(jax.ShapeDtypeStruct((b, n, t), jnp.float32))
  outs = plgpu.kernel(
      body, out_type=out_type, grid=(num_tiles, kh, b), grid_names=("tile", "kv_head", "b"),
      num_threads=CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=compat.interpret_params() if interpret else None,
  )(q_offset, kv_lengths, q, k, v)
  out = outs[0][:, :t_len]
  if return_lse:
    return out, jnp.transpose(outs[1][:, :, :t_len], (0, 2, 1))
  return out

