"""Flash-attention forward for causal GQA, written in Pallas and lowered through Triton.

Layout: q ``[B, T, N, H]``, k/v ``[B, S, K, H]``, group size ``G = N // K``.

One program owns one kv head ``k`` of one batch row ``b`` and a tile of ``block_m`` rows of the
flattened (position, group head) axis ``f = t * G + g`` (see ``_flash``): the ``G`` query heads of
the group share the tile, so every K/V tile streamed from HBM serves the whole group at once, and
no row is padding whatever ``G`` is. K/V are never repeated.

The KV loop runs in two phases: blocks that every row of the tile sees in full (no mask, no NaN
guard) and then the boundary blocks that cross the causal diagonal or ``kv_lengths[b]`` (masked).
Blocks past the last visible key are never visited. Softmax runs in float32 in the base-2 domain.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gqa_pallas import _flash
from gqa_pallas import _triton_compat as tc
from gqa_pallas import reference

logger = logging.getLogger("gqa_pallas")

MAX_HEAD_DIM = 256


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


# Tuning table: (padded head dim, dtype name) -> config, from `python -m benchmarks.run --sweep`
# on an H100 (benchmarks/results/*sweep*.json); fp32 tiles are halved to fit shared memory.
TUNING_TABLE: dict[tuple[int, str], PrefillConfig] = {}
for _dtype in ("bfloat16", "float16"):
  TUNING_TABLE.update({
      (16, _dtype): PrefillConfig(64, 64, 4, 3),
      (32, _dtype): PrefillConfig(64, 64, 4, 3),
      (64, _dtype): PrefillConfig(64, 64, 4, 3),     # H100 sweep: best on both 14:2 H64 shapes
      (128, _dtype): PrefillConfig(128, 64, 4, 2),   # H100 sweep: best on all four H128 shapes
      (256, _dtype): PrefillConfig(64, 32, 4, 2),
  })
TUNING_TABLE.update({
    (16, "float32"): PrefillConfig(64, 32, 4, 2),
    (32, "float32"): PrefillConfig(64, 32, 4, 2),
    (64, "float32"): PrefillConfig(64, 32, 4, 2),
    (128, "float32"): PrefillConfig(64, 32, 4, 2),
    (256, "float32"): PrefillConfig(32, 32, 4, 1),
})


def padded_head_dim(head_dim: int) -> int:
  return max(16, pl.next_power_of_2(head_dim))


def check_head_dim(head_dim: int) -> None:
  if head_dim > MAX_HEAD_DIM or head_dim % 8:
    raise ValueError(f"the Triton kernels support head dims that are multiples of 8 up to "
                     f"{MAX_HEAD_DIM} (64 and 128 are tuned); got H={head_dim}.")


def default_config(head_dim: int, dtype) -> PrefillConfig:
  return TUNING_TABLE[(padded_head_dim(head_dim), jnp.dtype(dtype).name)]


def _prefill_kernel(q_offset_ref, kv_lengths_ref, q_ref, k_ref, v_ref, o_ref, *lse_refs,
                    scale, causal, block_m, block_k, head_dim, group_size, q_len):
  """One (row tile, kv head, batch row).

  Refs: q and o ``[T, G, Hp]`` of this (b, kv head); k/v ``[S, Hp]``; lse ``[T, G]``. The tile
  covers flattened rows ``[tile * block_m, (tile + 1) * block_m)`` of ``f = t * G + g``.
  """
  tile = pl.num_programs(0) - 1 - pl.program_id(0)  # heaviest causal tiles first
  b = pl.program_id(2)
  q_offset = q_offset_ref[b]
  kv_len = kv_lengths_ref[b]
  num_rows = q_len * group_size
  first_row = tile * block_m
  t, g, valid = _flash.tile_rows(first_row, block_m, group_size, num_rows)
  q = _flash.load_rows(q_ref, t, g, valid, head_dim)

  # Keys [0, full_keys) are visible to every row of the tile; [full_keys, end_keys) need the mask.
  first_pos = q_offset + first_row // group_size
  last_pos = q_offset + (jnp.minimum(first_row + block_m, num_rows) - 1) // group_size
  if causal:
    full_keys = jnp.clip(jnp.minimum(kv_len, first_pos + 1), 0, None)
    end_keys = jnp.clip(jnp.minimum(kv_len, last_pos + 1), 0, None)
  else:
    full_keys = end_keys = kv_len
  acc, m, l = _flash.attend(
      q, k_ref, v_ref, q_offset + t, kv_len, block_lo=0, n_full=full_keys // block_k,
      n_end=pl.cdiv(end_keys, block_k), block_k=block_k, qk_scale=scale * _flash.LOG2_E,
      head_dim=head_dim, causal=causal)
  out, lse2 = _flash.finalize(acc, m, l)
  _flash.store_rows(o_ref, out, t, g, valid, head_dim)
  if lse_refs:
    _flash.store_row_values(lse_refs[0], lse2 * _flash.LN_2, t, g, valid)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "return_lse", "interpret",
                                             "config"))
def _prefill_call(q, k, v, q_offset, kv_lengths, *, causal, scale, return_lse, interpret, config):
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  head_dim_p = padded_head_dim(h)
  block_m = config.block_m
  block_k = min(config.block_k, max(16, pl.next_power_of_2(s)))
  grid = (pl.cdiv(t * g, block_m), kh, b)
  logger.debug("gqa prefill launch: B=%d T=%d S=%d N=%d K=%d H=%d dtype=%s grid=%s block_m=%d "
               "block_k=%d num_warps=%d num_stages=%d", b, t, s, n, kh, h, q.dtype, grid,
               block_m, block_k, config.num_warps, config.num_stages)
  q5 = q.reshape(b, t, kh, g, h)  # free: the group's heads are adjacent in memory
  kernel = functools.partial(
      _prefill_kernel, scale=scale, causal=causal, block_m=block_m, block_k=block_k,
      head_dim=h, group_size=g, q_len=t)
  qo_spec = pl.BlockSpec((None, t, None, g, head_dim_p), lambda i, kk, bb: (bb, 0, kk, 0, 0))
  kv_spec = pl.BlockSpec((None, s, None, head_dim_p), lambda i, kk, bb: (bb, 0, kk, 0))
  rows_spec = pl.BlockSpec((b,), lambda *_: (0,))  # per-row scalars: the whole [B] vector
  in_specs = [rows_spec, rows_spec, qo_spec, kv_spec, kv_spec]
  out_shape = [jax.ShapeDtypeStruct((b, t, kh, g, h), q.dtype)]
  out_specs = [qo_spec]
  if return_lse:
    out_shape.append(jax.ShapeDtypeStruct((b, t, kh, g), jnp.float32))
    out_specs.append(pl.BlockSpec((None, t, None, g), lambda i, kk, bb: (bb, 0, kk, 0)))
  outs = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=tc.compiler_params(config.num_warps, config.num_stages),
      interpret=interpret, name="gqa_prefill",
  )(q_offset, kv_lengths, q5, k, v)
  out = outs[0].reshape(b, t, n, h)
  if return_lse:
    return out, outs[1].reshape(b, t, n)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _prefill_diff(q, k, v, q_offset, kv_lengths, causal, scale, return_lse, interpret, config):
  return _prefill_call(q, k, v, q_offset, kv_lengths, causal=causal, scale=scale,
                       return_lse=return_lse, interpret=interpret, config=config)


def _prefill_fwd(q, k, v, q_offset, kv_lengths, causal, scale, return_lse, interpret, config):
  res = _prefill_call(q, k, v, q_offset, kv_lengths, causal=causal, scale=scale,
                      return_lse=return_lse, interpret=interpret, config=config)
  return res, (q, k, v, q_offset, kv_lengths)


def _prefill_bwd(causal, scale, return_lse, interpret, config, residuals, cotangent):
  # Backward through the reference (XLA): exact gradients of the same function. A Pallas
  # backward kernel is future work; see docs/design.md.
  del interpret, config
  q, k, v, q_offset, kv_lengths = residuals
  fn = functools.partial(reference.attention_reference, causal=causal, q_offset=q_offset,
                         kv_lengths=kv_lengths, scale=scale, return_lse=return_lse)
  _, vjp = jax.vjp(fn, q, k, v)
  dq, dk, dv = vjp(cotangent)
  return dq, dk, dv, None, None


_prefill_diff.defvjp(_prefill_fwd, _prefill_bwd)


def prefill_attention(q, k, v, q_offset, kv_lengths, *, causal, scale, return_lse=False,
                      interpret=False, config: PrefillConfig | None = None):
  """Runs the kernel on validated inputs (see ``gqa_pallas.gqa_attention`` for semantics).

  ``q_offset``/``kv_lengths`` are ``int32[B]`` (defaults already resolved); ``scale`` a float.
  """
  check_head_dim(q.shape[-1])
  if config is None:
    config = default_config(q.shape[-1], q.dtype)
  if q.shape[1] == 0 or q.shape[0] == 0:
    return _flash.empty_result(q, return_lse)
  kv_lengths = jnp.clip(kv_lengths, 0, k.shape[1])
  return _prefill_diff(q, k, v, q_offset, kv_lengths, causal, float(scale), return_lse,
                       interpret, config)
