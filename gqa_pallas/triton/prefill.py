"""Flash-attention forward for causal GQA, written in Pallas and lowered through Triton.

Layout: q ``[B, T, N, H]``, k/v ``[B, S, K, H]``, group size ``G = N // K``.

One program owns one kv head ``k`` of one batch row ``b`` and a tile of ``block_m`` rows of the
flattened (position, group head) axis ``f = t * G + g`` (see ``flash``): the ``G`` query heads of
the group share the tile, so every K/V tile streamed from HBM serves the whole group at once, and
no row is padding whatever ``G`` is. K/V are never repeated.

The KV loop visits only the key blocks some row of the tile sees (``flash.block_ranges``: from
the start of the first row's window, if any, to the last row's diagonal or ``kv_lengths[b]``);
blocks every row sees in full run without mask or NaN guard, the boundary blocks (the window's
start, the diagonal, the length) masked. Softmax runs in float32 in the base-2 domain, on the
soft-capped logits when ``logits_soft_cap`` is set.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gqa_pallas import finite
from gqa_pallas.triton import compat as tc
from gqa_pallas.triton import flash

logger = logging.getLogger("gqa_pallas")


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
  """Static launch configuration (hashable: passed as a static argument).

  Attributes:
    block_m: rows of the Q tile (flattened (position, group head) pairs).
    block_k: keys per K/V tile.
    num_warps, num_stages: Triton launch parameters.
  """
  block_m: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    flash.check_launch_config(self, ("block_m", "block_k"))


# Tuning tables by device kind, from `python -m benchmarks.run --only prefill --sweep` on that
# card (benchmarks/results/<device>-prefill-sweep.json). Any other device (another GPU, or a
# CPU in interpret mode / lowering for CUDA) takes HEURISTIC_TABLE: the H100's measured entries,
# whose pipelined K/V tiles (num_stages x block_k x head dim, K and V) take at most 64 KB of
# shared memory, so they suit sm80-sm89 GPUs too.
HEURISTIC_TABLE = flash.config_table(
    h64=PrefillConfig(64, 64, 4, 3),
    h128=PrefillConfig(128, 64, 4, 2),
    h256=PrefillConfig(64, 32, 4, 2),
    f32=PrefillConfig(64, 32, 4, 2),
    f32_h256=PrefillConfig(32, 32, 4, 1))
TUNING_TABLES: dict[str, dict[tuple[int, str], PrefillConfig]] = {
    "NVIDIA H100 80GB HBM3": HEURISTIC_TABLE,
    # H200 sweep (nvidia-h200-prefill-sweep.json, bf16, six anchor shapes): the H100 entries
    # stayed the fastest of the six configs per head dim on every shape, 5-21% ahead.
    "NVIDIA H200": HEURISTIC_TABLE,
}


def default_config(head_dim: int, dtype, device_kind: str) -> PrefillConfig:
  table = TUNING_TABLES.get(device_kind, HEURISTIC_TABLE)
  return table[(flash.padded_head_dim(head_dim), jnp.dtype(dtype).name)]


def _prefill_kernel(q_offset_ref, kv_lengths_ref, q_ref, k_ref, v_ref, bad_counts_ref, o_ref,
                    *lse_refs, scale, causal, block_m, block_k, head_dim, group_size, q_len,
                    window, soft_cap):
  """One (row tile, kv head, batch row).

  Refs: q and o ``[T, G, Hp]`` of this (b, kv head); k/v ``[S, Hp]`` (V with its non-finite
  values cleared, ``bad_counts [S + 1]`` saying where they were: ``gqa_pallas.finite``); lse
  ``[T, G]``. The tile covers flattened rows ``[tile * block_m, (tile + 1) * block_m)`` of
  ``f = t * G + g``.
  """
  tile = pl.num_programs(0) - 1 - pl.program_id(0)  # heaviest causal tiles first
  b = pl.program_id(2)
  q_offset = q_offset_ref[b]
  kv_len = kv_lengths_ref[b]
  num_rows = q_len * group_size
  first_row = tile * block_m
  t, g, valid = flash.tile_rows(first_row, block_m, group_size, num_rows)
  q = flash.load_rows(q_ref, t, g, valid, head_dim)

  # Positions grow with the row, so the first and last rows bound the tile's key blocks.
  first_pos = q_offset + first_row // group_size
  last_pos = q_offset + (jnp.minimum(first_row + block_m, num_rows) - 1) // group_size
  blocks = flash.block_ranges(first_pos, last_pos, kv_len, block_k, causal=causal, window=window)
  acc, m, l = flash.attend(
      q, k_ref, v_ref, q_offset + t, kv_len, blocks=blocks, block_k=block_k,
      qk_scale=scale * flash.LOG2_E, head_dim=head_dim, causal=causal, window=window,
      soft_cap=soft_cap)
  out, lse2 = flash.finalize(acc, m, l)
  out = flash.poison_rows(out, bad_counts_ref, q_offset + t, kv_len, valid, causal=causal,
                          window=window)
  flash.store_rows(o_ref, out, t, g, valid, head_dim)
  if lse_refs:
    flash.store_row_values(lse_refs[0], lse2 * flash.LN_2, t, g, valid)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "return_lse", "interpret",
                                             "config", "sliding_window", "logits_soft_cap"))
def prefill_attention(q, k, v, q_offset, kv_lengths, *, causal, scale, return_lse, interpret,
                      config, sliding_window=None, logits_soft_cap=None):
  """Runs the kernel on validated inputs (see ``gqa_pallas.gqa_attention`` for semantics).

  ``q_offset``/``kv_lengths`` are ``int32[B]``, defaults resolved and lengths in ``[0, S]``;
  ``scale`` a float; B, T and S are non-zero (``gqa_attention`` answers empty inputs itself).
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  head_dim_p = flash.padded_head_dim(h)
  block_m = config.block_m
  block_k = min(config.block_k, max(16, pl.next_power_of_2(s)))
  grid = (pl.cdiv(t * g, block_m), kh, b)
  logger.debug("gqa prefill launch: B=%d T=%d S=%d N=%d K=%d H=%d dtype=%s grid=%s block_m=%d "
               "block_k=%d num_warps=%d num_stages=%d", b, t, s, n, kh, h, q.dtype, grid,
               block_m, block_k, config.num_warps, config.num_stages)
  q5 = q.reshape(b, t, kh, g, h)  # free: the group's heads are adjacent in memory
  # The kernel's masked blocks do not inspect V (design.md, "Invisible slots"): its non-finite
  # values are cleared here and the rows that see one marked by the kernel.
  bad_counts = finite.bad_slot_counts(v)
  v = finite.clear(v)
  kernel = functools.partial(
      _prefill_kernel, scale=scale, causal=causal, block_m=block_m, block_k=block_k,
      head_dim=h, group_size=g, q_len=t, window=sliding_window, soft_cap=logits_soft_cap)
  qo_spec = pl.BlockSpec((None, t, None, g, head_dim_p), lambda i, kk, bb: (bb, 0, kk, 0, 0))
  kv_spec = pl.BlockSpec((None, s, None, head_dim_p), lambda i, kk, bb: (bb, 0, kk, 0))
  rows_spec = pl.BlockSpec((b,), lambda *_: (0,))  # per-row scalars: the whole [B] vector
  counts_spec = pl.BlockSpec((None, None, s + 1), lambda i, kk, bb: (bb, kk, 0))
  in_specs = [rows_spec, rows_spec, qo_spec, kv_spec, kv_spec, counts_spec]
  out_shape = [jax.ShapeDtypeStruct((b, t, kh, g, h), q.dtype)]
  out_specs = [qo_spec]
  if return_lse:
    out_shape.append(jax.ShapeDtypeStruct((b, t, kh, g), jnp.float32))
    out_specs.append(pl.BlockSpec((None, t, None, g), lambda i, kk, bb: (bb, 0, kk, 0)))
  outs = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=tc.compiler_params(config.num_warps, config.num_stages),
      interpret=interpret, name="gqa_prefill",
  )(q_offset, kv_lengths, q5, k, v, bad_counts)
  out = outs[0].reshape(b, t, n, h)
  if return_lse:
    return out, outs[1].reshape(b, t, n)
  return out

