"""Flash-attention backward for GQA on Hopper, in Pallas Mosaic GPU (wgmma + TMA).

The ``"mosaic"`` backend's ``prefill_bwd`` (sm90; bf16/fp16, head dims 64 and 128, no window or
soft-cap: the Triton backward takes those). Layouts and semantics are those of
``gqa_pallas.triton.backward``: with ``P = exp2(scale * log2(e) * Q K^T - lse2)`` (``lse2`` the
forward's lse in base 2, ``+inf`` for rows with no key, so their ``P`` is 0) and
``delta = rowsum(dO * O) - d_lse``:

    dV = P^T dO        dS = P * (dO V^T - delta)        dK = scale * dS^T Q        dQ = scale * dS K

Two kernels, three warpgroups each (a TMA producer, two consumers), no atomics:

* ``dq``: one CTA per (128-row query tile, kv head, batch row), the forward's tiling of the
  group's rows into chunks (``prefill.chunk_rows``). The producer streams K/V blocks of 64 keys
  into a ring; each consumer owns 64 rows: S = Q K^T and dP = dO V^T by ``wgmma``, dQ += dS K
  with dS in registers. Blocks past a consumer's last visible key are never loaded for it; the
  block that holds a row's last valid key has its K rows past the length zeroed in shared memory
  (dS is 0 there, but 0 * NaN is not).
* ``dk, dv``: one CTA per (128 keys, kv head, batch row); each consumer owns 64 keys, their K/V
  tiles resident in shared memory and float32 dK/dV accumulators in registers. The producer
  streams 64-row tiles of the whole group's (position, head) rows (Q, dO, lse, delta), so the
  ``G`` query heads of the kv head accumulate into one dK/dV in the kernel. S^T = K Q^T, P^T,
  dV += P^T dO, dP^T = V dO^T, dK += dS^T Q. Row tiles causally before a consumer's keys are
  skipped (the other consumer's are released unread); only tiles crossing the diagonal, the
  length or T pay for the mask.

Interpreter forms (jax 0.10's interpreter has no transposed or register operands): K and V also
arrive pre-transposed, so every product with a transposed operand is computed as the
untransposed one (S = Q K^T, dP = dO V^T) and, in the ``dk, dv`` kernel, transposed in
registers; register operands (dS, P^T, dS^T) go through shared memory; accumulators are fresh
ones added to the carry. T and S are padded to whole chunks and blocks with zeros there.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gqa_pallas import vjp
from gqa_pallas.mosaic import compat
from gqa_pallas.mosaic import prefill as fwd

plgpu = compat.plgpu

ROWS = fwd.ROWS_PER_WG  # rows (dq) or keys (dk, dv) per consumer warpgroup; also the key block
CONSUMERS = fwd.CONSUMERS


@dataclasses.dataclass(frozen=True)
class MosaicBackwardConfig:
  """Static launch configuration (hashable).

  Attributes:
    stages: K/V blocks (dq) or row tiles (dk, dv) in flight in the shared-memory ring (>= 2).
  """
  stages: int = 2

  def __post_init__(self):
    if not isinstance(self.stages, int) or self.stages < 2:
      raise ValueError(f"MosaicBackwardConfig.stages must be an int >= 2; got {self.stages!r}.")


# (head dim, dtype name) -> config; any device without a table of its own takes this one. Two
# stages: three were no faster on the H200 at H128 and slower at H64 (benchmarks/NOTES.md).
HEURISTIC_TABLE = {(h, dt): MosaicBackwardConfig(stages=2)
                   for h in fwd.HEAD_DIMS for dt in fwd.DTYPES}
TUNING_TABLES: dict[str, dict[tuple[int, str], MosaicBackwardConfig]] = {}


def default_config(head_dim: int, dtype: str, device_kind: str) -> MosaicBackwardConfig:
  return TUNING_TABLES.get(device_kind, HEURISTIC_TABLE)[(head_dim, jnp.dtype(dtype).name)]


def _layout(x, lay, interpret):
  return x if interpret else plgpu.layout_cast(x, lay)


def _load_vector(ref, lay, interpret):
  return ref[...] if interpret else plgpu.load(ref, (), layout=lay)


def _matmul(a, b, shape, interpret, scratch=None):
  """``a @ b`` into a fresh float32 accumulator; ``a`` a shared-memory ref or, on the GPU, a
  register array (the interpreter stages it through ``scratch``)."""
  if interpret and scratch is not None:
    scratch[...] = a
    plgpu.commit_smem()
    a = scratch

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _accumulate(acc, a, b, interpret, scratch):
  """``acc + a @ b`` with ``a`` in registers (``run_state`` on the GPU)."""
  if interpret:
    return acc + _matmul(a, b, acc.shape, interpret, scratch)

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(body)(plgpu.ACC.init(acc))


def _dq_kernel(q_offset_ref, kv_lengths_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref,
               kt_ref, vt_ref, dq_ref, scratch, *, causal, qk_scale, scale, q_len, group_size,
               num_tiles, stages, interpret):
  """One (query tile, kv head, batch row). q/do/dq ``[B, T, N, H]``; lse (base 2, safe)/delta
  ``float32[B, K, R]`` in the chunks' row order (``_rows_in_chunk_order``); k/v
  ``[B, S, K, H]``; kt/vt ``[B, K, H, S]`` (interpreter only)."""
  (q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, kt_smem, vt_smem, ds_smem, row_bar,
   kv_bar, kv_free) = scratch
  block = ROWS
  head_dim = q_smem.shape[-1]
  num_chunks = fwd.tiling(group_size, q_len)[0]
  rows_per_chunk = fwd.chunk_rows(group_size)
  chunks_per_wg = ROWS // rows_per_chunk
  b = lax.axis_index("b")
  kv_head = lax.axis_index("kv_head")
  tile = num_tiles - 1 - lax.axis_index("tile")  # the heaviest causal tiles first
  q_offset = q_offset_ref[b]
  kv_len = kv_lengths_ref[b]
  wg = lax.axis_index("wg")

  def first_chunk(w):
    return (tile * CONSUMERS + w) * chunks_per_wg

  def chunk(w, c):
    return jnp.minimum(first_chunk(w) + c, num_chunks - 1)

  def key_extent(w):
    full, blocks = fwd.warpgroup_key_blocks(
        first_chunk(w), num_chunks=num_chunks, group_size=group_size, q_len=q_len,
        q_offset=q_offset, kv_len=kv_len, block_kv=block, causal=causal)
    return jnp.minimum(full, blocks), blocks

  num_blocks = jnp.maximum(key_extent(0)[1], key_extent(1)[1])

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    rows_of = lambda c: pl.ds(c * rows_per_chunk, rows_per_chunk)
    for c in range(chunks_per_wg):
      g, t = fwd.chunk_origin(chunk(wg, c), group_size)
      head = kv_head * group_size + g
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(t, rows_per_chunk), head],
                              q_smem.at[wg, rows_of(c)], row_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(t, rows_per_chunk), head],
                              do_smem.at[wg, rows_of(c)], row_bar.at[wg])
    wg_rows = pl.ds(first_chunk(wg) * rows_per_chunk, ROWS)
    plgpu.copy_gmem_to_smem(lse_ref.at[b, kv_head, wg_rows], lse_smem.at[wg], row_bar.at[wg])
    plgpu.copy_gmem_to_smem(delta_ref.at[b, kv_head, wg_rows], delta_smem.at[wg], row_bar.at[wg])
    plgpu.barrier_wait(row_bar.at[wg])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    lse = _load_vector(lse_smem.at[wg], row_layout, interpret)
    delta = _load_vector(delta_smem.at[wg], row_layout, interpret)
    full, blocks = key_extent(wg)

    def visible(i):
      key = _layout(lax.broadcasted_iota(jnp.int32, (ROWS, block), 1), plgpu.Layout.WGMMA,
                    interpret)
      if not causal:
        return key < kv_len - i * block
      row = _layout(lax.broadcasted_iota(jnp.int32, (ROWS,), 0), row_layout, interpret)
      rows_chunk = jnp.minimum(first_chunk(wg) + lax.div(row, rows_per_chunk), num_chunks - 1)
      position = (q_offset + lax.div(rows_chunk, group_size) * rows_per_chunk
                  + lax.rem(row, rows_per_chunk))
      bound = jnp.minimum(position + 1, kv_len) - i * block
      return key < lax.broadcast_in_dim(bound, key.shape, [0])

    def zero_k_past_length(i, slot):
      start = i * block
      needs = (start < kv_len) & (kv_len < start + block)

      @pl.when(needs)
      def _():
        tile_ref = k_smem.at[slot]
        rows = _layout(lax.broadcasted_iota(jnp.int32, (block, head_dim), 0),
                       plgpu.Layout.WGMMA, interpret)
        vals = tile_ref[...] if interpret else plgpu.load(tile_ref, (), layout=plgpu.Layout.WGMMA)
        tile_ref[...] = jnp.where(start + rows < kv_len, vals, jnp.zeros_like(vals))
        plgpu.commit_smem()

    def step(i, dq, masked):
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(kv_bar.at[slot])
      kt = kt_smem.at[slot] if interpret else k_smem.at[slot].T
      vt = vt_smem.at[slot] if interpret else v_smem.at[slot].T
      s = _matmul(q_smem.at[wg], kt, (ROWS, block), interpret)
      p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(lse, s.shape, [0]))
      dp = _matmul(do_smem.at[wg], vt, (ROWS, block), interpret)
      if masked:
        mask = visible(i)
        p = jnp.where(mask, p, 0.)
      ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
      if masked:
        ds = jnp.where(mask, ds, 0.)
        zero_k_past_length(i, slot)
      dq = _accumulate(dq, ds.astype(q_smem.dtype), k_smem.at[slot], interpret,
                       ds_smem.at[wg] if interpret else None)
      plgpu.barrier_arrive(kv_free.at[slot])
      return dq

    def drain(i, _):
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(kv_bar.at[slot])
      plgpu.barrier_arrive(kv_free.at[slot])

    dq = _layout(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA, interpret)
    dq = lax.fori_loop(0, full, functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(full, blocks, functools.partial(step, masked=True), dq)
    lax.fori_loop(blocks, num_blocks, drain, None)
    q_smem.at[wg][...] = (dq * scale).astype(q_smem.dtype)
    plgpu.commit_smem()
    for c in range(chunks_per_wg):
      @pl.when(first_chunk(wg) + c < num_chunks)
      def _():
        g, t = fwd.chunk_origin(first_chunk(wg) + c, group_size)
        plgpu.copy_smem_to_gmem(q_smem.at[wg, rows_of(c)],
                                dq_ref.at[b, pl.ds(t, rows_per_chunk), kv_head * group_size + g])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def load(i, _):
      slot = lax.rem(i, stages)

      @pl.when(i >= stages)
      def _():
        plgpu.barrier_wait(kv_free.at[slot])
      keys = pl.ds(i * block, block)
      plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[slot], kv_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[slot], kv_bar.at[slot])
      if interpret:
        plgpu.copy_gmem_to_smem(kt_ref.at[b, kv_head, :, keys], kt_smem.at[slot],
                                kv_bar.at[slot])
        plgpu.copy_gmem_to_smem(vt_ref.at[b, kv_head, :, keys], vt_smem.at[slot],
                                kv_bar.at[slot])

    lax.fori_loop(0, num_blocks, load, None)

    def release(i, _):
      plgpu.barrier_wait(kv_free.at[lax.rem(i, stages)])
    lax.fori_loop(jnp.maximum(num_blocks - stages, 0), num_blocks, release, None)


def _dkdv_kernel(q_offset_ref, kv_lengths_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref,
                 kt_ref, vt_ref, dk_ref, dv_ref, scratch, *, causal, qk_scale, scale, q_len,
                 group_size, stages, interpret):
  """One (128 keys, kv head, batch row); refs as in ``_dq_kernel``, dk/dv ``[B, S, K, H]``."""
  (q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, kt_smem, vt_smem, p_smem, kv_bar,
   row_bar, row_free) = scratch
  head_dim = q_smem.shape[-1]
  num_chunks = fwd.tiling(group_size, q_len)[0]
  rows_per_chunk = fwd.chunk_rows(group_size)
  chunks_per_tile = ROWS // rows_per_chunk
  num_row_tiles = pl.cdiv(num_chunks, chunks_per_tile)
  # The last row tile may hold clamped copies of the last chunk, which must not count twice
  # (rows past T need no mask: their Q, dO and delta are 0 and their lse +inf, so P = 0).
  end_unmasked = num_row_tiles if num_chunks % chunks_per_tile == 0 else num_row_tiles - 1
  b = lax.axis_index("b")
  kv_head = lax.axis_index("kv_head")
  key_block = lax.axis_index("keys")
  q_offset = q_offset_ref[b]
  kv_len = kv_lengths_ref[b]
  wg = lax.axis_index("wg")

  def first_key(w):
    return (key_block * CONSUMERS + w) * ROWS

  def row_extent(w):
    """(first row tile that sees a key of warpgroup ``w``, first from which every row of every
    tile sees all its keys)."""
    k0 = first_key(w)
    if causal:
      t0 = jnp.clip(k0 - q_offset, 0, q_len)
      lo = lax.div(lax.div(t0, rows_per_chunk) * group_size, chunks_per_tile)
      need = k0 + ROWS - 1 - q_offset  # rows at positions >= k0 + 63 see the whole block
      blocks_needed = pl.cdiv(jnp.maximum(need, 0), rows_per_chunk)
      full = pl.cdiv(blocks_needed * group_size, chunks_per_tile)
    else:
      lo = full = jnp.zeros((), jnp.int32)
    lo = jnp.where((k0 < kv_len) & (lo < num_row_tiles), lo, num_row_tiles)
    full = jnp.where(k0 + ROWS <= kv_len, full, num_row_tiles)
    return lo, jnp.minimum(jnp.maximum(full, lo), jnp.maximum(end_unmasked, lo))

  first_tile = row_extent(0)[0]  # warpgroup 0's keys come first: it sees the most rows

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    keys = pl.ds(first_key(wg), ROWS)
    plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[wg], kv_bar.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[wg], kv_bar.at[wg])
    if interpret:
      plgpu.copy_gmem_to_smem(kt_ref.at[b, kv_head, :, keys], kt_smem.at[wg], kv_bar.at[wg])
      plgpu.copy_gmem_to_smem(vt_ref.at[b, kv_head, :, keys], vt_smem.at[wg], kv_bar.at[wg])
    plgpu.barrier_wait(kv_bar.at[wg])
    lo, full = row_extent(wg)
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    k0 = first_key(wg)

    def visible(i):
      """[64 keys, 64 rows] of row tile ``i``: the row is real and sees the key."""
      key = _layout(lax.broadcasted_iota(jnp.int32, (ROWS, ROWS), 0), plgpu.Layout.WGMMA,
                    interpret)
      row = _layout(lax.broadcasted_iota(jnp.int32, (ROWS,), 0), col_layout, interpret)
      raw_chunk = i * chunks_per_tile + lax.div(row, rows_per_chunk)
      t = lax.div(raw_chunk, group_size) * rows_per_chunk + lax.rem(row, rows_per_chunk)
      real = (raw_chunk < num_chunks) & (t < q_len)
      last = jnp.minimum(q_offset + t + 1, kv_len) if causal else kv_len
      bound = jnp.where(real, last, 0) - k0  # keys [k0, k0 + bound) of the block
      return key < lax.broadcast_in_dim(bound, key.shape, [1])

    def transposed(x):
      return x.T  # interpreter only: there the products come untransposed

    def step(i, carry, masked):
      dk, dv = carry
      slot = lax.rem(i - first_tile, stages)
      plgpu.barrier_wait(row_bar.at[slot])
      if interpret:
        s_t = transposed(_matmul(q_smem.at[slot], kt_smem.at[wg], (ROWS, ROWS), interpret))
      else:
        s_t = _matmul(k_smem.at[wg], q_smem.at[slot].T, (ROWS, ROWS), interpret)
      lse = _load_vector(lse_smem.at[slot], col_layout, interpret)
      p_t = jnp.exp2(s_t * qk_scale - lax.broadcast_in_dim(lse, s_t.shape, [1]))
      if masked:
        mask = visible(i)
        p_t = jnp.where(mask, p_t, 0.)
      scratch_p = p_smem.at[wg] if interpret else None
      dv = _accumulate(dv, p_t.astype(q_smem.dtype), do_smem.at[slot], interpret, scratch_p)
      if interpret:
        dp_t = transposed(_matmul(do_smem.at[slot], vt_smem.at[wg], (ROWS, ROWS), interpret))
      else:
        dp_t = _matmul(v_smem.at[wg], do_smem.at[slot].T, (ROWS, ROWS), interpret)
      delta = _load_vector(delta_smem.at[slot], col_layout, interpret)
      ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
      if masked:
        ds_t = jnp.where(mask, ds_t, 0.)
      dk = _accumulate(dk, ds_t.astype(q_smem.dtype), q_smem.at[slot], interpret, scratch_p)
      plgpu.barrier_arrive(row_free.at[slot])
      return dk, dv

    def drain(i, _):  # a tile loaded for the other warpgroup only
      slot = lax.rem(i - first_tile, stages)
      plgpu.barrier_wait(row_bar.at[slot])
      plgpu.barrier_arrive(row_free.at[slot])

    zeros = _layout(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA, interpret)
    lax.fori_loop(first_tile, lo, drain, None)
    carry = lax.fori_loop(lo, full, functools.partial(step, masked=True), (zeros, zeros))
    tail = jnp.maximum(full, end_unmasked)
    carry = lax.fori_loop(full, tail, functools.partial(step, masked=False), carry)
    dk, dv = lax.fori_loop(tail, num_row_tiles, functools.partial(step, masked=True), carry)
    k_smem.at[wg][...] = (dk * scale).astype(k_smem.dtype)
    v_smem.at[wg][...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[b, keys, kv_head])
    plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[b, keys, kv_head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def load(i, _):  # row tile first_tile + i
      slot = lax.rem(i, stages)

      @pl.when(i >= stages)
      def _():
        plgpu.barrier_wait(row_free.at[slot])
      for c in range(chunks_per_tile):
        ch = jnp.minimum((first_tile + i) * chunks_per_tile + c, num_chunks - 1)
        g, t = fwd.chunk_origin(ch, group_size)
        head = kv_head * group_size + g
        rows = pl.ds(c * rows_per_chunk, rows_per_chunk)
        positions = pl.ds(t, rows_per_chunk)
        plgpu.copy_gmem_to_smem(q_ref.at[b, positions, head], q_smem.at[slot, rows],
                                row_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, positions, head], do_smem.at[slot, rows],
                                row_bar.at[slot])
      tile_rows = pl.ds((first_tile + i) * ROWS, ROWS)
      plgpu.copy_gmem_to_smem(lse_ref.at[b, kv_head, tile_rows], lse_smem.at[slot],
                              row_bar.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, kv_head, tile_rows], delta_smem.at[slot],
                              row_bar.at[slot])

    count = num_row_tiles - first_tile
    lax.fori_loop(0, count, load, None)

    def release(i, _):
      plgpu.barrier_wait(row_free.at[lax.rem(i, stages)])
    lax.fori_loop(jnp.maximum(count - stages, 0), count, release, None)


def _rows_in_chunk_order(x, group_size: int, num_kv_heads: int, value):
  """``float32[B, T, N]`` -> ``[B, K, R]``: row ``r`` of kv head ``k`` is row ``r % C`` of chunk
  ``r // C`` (``prefill.chunk_origin``), padded with ``value`` to whole 128-row tiles, so a
  warpgroup's or a tile's rows are one contiguous copy (per-chunk copies of a few floats are
  below TMA's minimum from a warpgroup)."""
  b, t, _ = x.shape
  rows = fwd.chunk_rows(group_size)
  blocks = pl.cdiv(t, rows)
  x = jnp.pad(x, ((0, 0), (0, blocks * rows - t), (0, 0)), constant_values=value)
  x = x.reshape(b, blocks, rows, num_kv_heads, group_size)
  x = jnp.transpose(x, (0, 3, 1, 4, 2)).reshape(b, num_kv_heads, blocks * group_size * rows)
  total = fwd._round_up(x.shape[-1], fwd.TILE_ROWS)  # pylint: disable=protected-access
  return jnp.pad(x, ((0, 0), (0, 0), (0, total - x.shape[-1])), constant_values=value)


def _swizzled(shape, dtype):
  return fwd._swizzled(shape, dtype)  # pylint: disable=protected-access


@functools.partial(jax.jit, static_argnames=("causal", "scale", "interpret", "config"))
def prefill_attention_bwd(q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse, *, causal,
                          scale, interpret, config):
  """``(dq, dk, dv)`` on validated inputs (lengths in ``[0, S]``; B, T, S > 0), bf16/fp16,
  head dim 64 or 128; ``lse`` the forward's ``float32[B, T, N]``, ``d_lse`` its cotangent or
  ``None``."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  stages = config.stages
  rows_per_chunk = fwd.chunk_rows(g)
  num_tiles = fwd.tiling(g, t)[1]
  lse2, delta = vjp.backward_rows(out, lse, d_out, d_lse)
  # Rows: whole chunks in the interpreter (it refuses out-of-bounds copies), 8-row tiles on the
  # GPU (TMA zero-fills the rest); padding rows hold zeros (they enter dK/dV's sums with P = 0,
  # and 0 * NaN would not vanish). Keys: whole 128-key CTAs in the interpreter, 8-row tiles
  # on the GPU.
  t_pad = fwd._round_up(t, rows_per_chunk if interpret else fwd.MIN_CHUNK_ROWS)  # pylint: disable=protected-access
  s_pad = fwd._round_up(s, CONSUMERS * ROWS if interpret else fwd.MIN_CHUNK_ROWS)  # pylint: disable=protected-access
  pad_t = lambda x: jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
  pad_s = lambda x: jnp.pad(x, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
  q_p, do_p = pad_t(q), pad_t(d_out.astype(q.dtype))
  lse2 = _rows_in_chunk_order(lse2, g, kh, jnp.inf)
  delta = _rows_in_chunk_order(delta, g, kh, 0.)
  k_p, v_p = pad_s(k), pad_s(v)
  if interpret:
    kt, vt = jnp.transpose(k_p, (0, 2, 3, 1)), jnp.transpose(v_p, (0, 2, 3, 1))
  else:
    kt = vt = jnp.zeros((1, 1, 1, 1), k.dtype)  # unused on the GPU
  kw = dict(causal=causal, qk_scale=scale * fwd.LOG2_E, scale=scale, q_len=t, group_size=g,
            stages=stages, interpret=interpret)
  params = dict(num_threads=CONSUMERS + 1, thread_name="wg",
                compiler_params=plgpu.CompilerParams(approx_math=True),
                interpret=compat.interpret_params() if interpret else None)
  chunks_per_wg = ROWS // rows_per_chunk
  dtype = q.dtype

  dq_scratch = [
      _swizzled((CONSUMERS, ROWS, h), dtype), _swizzled((CONSUMERS, ROWS, h), dtype),
      plgpu.SMEM((CONSUMERS, ROWS), jnp.float32), plgpu.SMEM((CONSUMERS, ROWS), jnp.float32),
      _swizzled((stages, ROWS, h), dtype), _swizzled((stages, ROWS, h), dtype),
      _swizzled((stages, h, ROWS), dtype) if interpret else None,
      _swizzled((stages, h, ROWS), dtype) if interpret else None,
      _swizzled((CONSUMERS, ROWS, ROWS), dtype) if interpret else None,
      plgpu.Barrier(num_arrivals=2 * chunks_per_wg + 2, num_barriers=CONSUMERS),
      plgpu.Barrier(num_arrivals=4 if interpret else 2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
  ]

  def gqa_prefill_dq(qo_ref, kvl_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, kt_ref, vt_ref,
              dq_ref):
    pl.run_scoped(lambda *refs: _dq_kernel(
        qo_ref, kvl_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, kt_ref, vt_ref, dq_ref,
        refs, num_tiles=num_tiles, **kw), *dq_scratch, collective_axes="wg")

  dq = plgpu.kernel(
      gqa_prefill_dq, out_type=jax.ShapeDtypeStruct((b, t_pad, n, h), dtype),
      grid=(kh, num_tiles, b), grid_names=("kv_head", "tile", "b"), **params,
  )(q_offset, kv_lengths, q_p, do_p, lse2, delta, k_p, v_p, kt, vt)

  dkdv_scratch = [
      _swizzled((stages, ROWS, h), dtype), _swizzled((stages, ROWS, h), dtype),
      plgpu.SMEM((stages, ROWS), jnp.float32), plgpu.SMEM((stages, ROWS), jnp.float32),
      _swizzled((CONSUMERS, ROWS, h), dtype), _swizzled((CONSUMERS, ROWS, h), dtype),
      _swizzled((CONSUMERS, h, ROWS), dtype) if interpret else None,
      _swizzled((CONSUMERS, h, ROWS), dtype) if interpret else None,
      _swizzled((CONSUMERS, ROWS, ROWS), dtype) if interpret else None,
      plgpu.Barrier(num_arrivals=4 if interpret else 2, num_barriers=CONSUMERS),
      plgpu.Barrier(num_arrivals=2 * chunks_per_wg + 2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
  ]

  def gqa_prefill_dkdv(qo_ref, kvl_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, kt_ref,
                vt_ref, dk_ref, dv_ref):
    pl.run_scoped(lambda *refs: _dkdv_kernel(
        qo_ref, kvl_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, kt_ref, vt_ref, dk_ref,
        dv_ref, refs, **kw), *dkdv_scratch, collective_axes="wg")

  kv_type = jax.ShapeDtypeStruct((b, s_pad, kh, h), k.dtype)
  dk, dv = plgpu.kernel(
      gqa_prefill_dkdv, out_type=[kv_type, kv_type],
      grid=(kh, pl.cdiv(s, CONSUMERS * ROWS), b), grid_names=("kv_head", "keys", "b"), **params,
  )(q_offset, kv_lengths, q_p, do_p, lse2, delta, k_p, v_p, kt, vt)
  return dq[:, :t], dk[:, :s], dv[:, :s]
