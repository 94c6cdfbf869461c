"""Flash-attention backward for causal GQA, written in Pallas and lowered through Triton.

Layout: q, o, dO ``[B, T, N, H]``, k/v ``[B, S, K, H]``, group size ``G = N // K``; the lse of
the forward ``float32[B, T, N]`` (natural log, ``-inf`` for rows with no visible key).

With ``P = exp(scale * Q K^T - lse)`` (masked entries 0) and ``delta = rowsum(dO * O) - d_lse``
(the lse's own cotangent folds in here: ``d lse_i / d s_ij = P_ij``):

    dV = P^T dO        dS = P * (dO V^T - delta)        dK = scale * dS^T Q        dQ = scale * dS K

Two kernels, neither with atomics, so gradients are bitwise deterministic:

* ``dk, dv``: one program per (block of ``block_n`` keys, kv head, batch row). It walks the
  flattened (position, group head) rows ``f = t * G + g`` of the whole group (see ``flash``), so
  the ``G`` query heads of a kv head accumulate into one float32 ``dK``/``dV`` tile in registers:
  no repeated K/V and no per-query-head gradient summed afterwards. Rows that cannot see the
  block (causally before it) are skipped; only row tiles that cross the diagonal or a block that
  crosses ``kv_lengths`` pay for the mask.
* ``dq``: one program per (row tile, kv head, batch row), the forward's loop over key blocks
  (the same block skipping), recomputing ``P`` from the lse.

``delta`` and the base-2 lse are one XLA pass over ``dO * O`` and the lse
(``vjp.backward_rows``; no ``[T, S]`` buffer anywhere). Keys at or past
``kv_lengths[b]`` are loaded as 0, so garbage (NaN) there never reaches a gradient, and their
``dK``/``dV`` come out 0; rows with no visible key (lse ``-inf``) give ``P = 0`` and zero
gradients.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gqa_pallas import vjp
from gqa_pallas.triton import compat as tc
from gqa_pallas.triton import flash

logger = logging.getLogger("gqa_pallas")


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
  """Static launch configuration of both backward kernels (hashable: a static argument).

  Attributes:
    block_m: rows (flattened (position, group head) pairs) per query tile.
    block_n: keys per key tile.
    num_warps, num_stages: Triton launch parameters.
  """
  block_m: int = 64
  block_n: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    flash.check_launch_config(self, ("block_m", "block_n"))


# Any device without a table of its own takes this one (a CPU in interpret mode or lowering for
# CUDA included). Both kernels keep two float32 accumulators of block x head dim in registers
# (dK and dV, or dQ) next to the recomputed block_m x block_n scores.
HEURISTIC_TABLE = flash.config_table(
    h64=BackwardConfig(64, 64, 4, 2),
    h128=BackwardConfig(64, 64, 4, 2),
    h256=BackwardConfig(32, 32, 4, 1),
    f32=BackwardConfig(32, 32, 4, 1),
    f32_h256=BackwardConfig(16, 16, 4, 1))
TUNING_TABLES: dict[str, dict[tuple[int, str], BackwardConfig]] = {}


def default_config(head_dim: int, dtype, device_kind: str) -> BackwardConfig:
  table = TUNING_TABLES.get(device_kind, HEURISTIC_TABLE)
  return table[(flash.padded_head_dim(head_dim), jnp.dtype(dtype).name)]


def _load_row_values(ref, t, g, valid, other):
  return tc.load(ref.at[t, g], mask=valid, other=other)


def _probabilities(q, k, lse2, *, qk_scale, soft_cap):
  """``P`` of a ``[M, Hp] x [N, Hp]`` tile from the base-2 lse (``+inf`` for empty rows), and
  the soft-cap's ``tanh`` (``None`` without a cap)."""
  s, th = flash.scores(q, k, qk_scale=qk_scale, soft_cap=soft_cap)
  return jnp.exp2(s - lse2[:, None]), th


def _logit_grad(p, dp, delta, th):
  """``dS``: the gradient of the (uncapped, scaled) logits; through the cap's ``tanh``."""
  ds = p * (dp - delta[:, None])
  return ds if th is None else ds * (1. - th * th)


def _dkdv_kernel(q_offset_ref, kv_lengths_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref,
                 dk_ref, dv_ref, *, scale, causal, block_m, block_n, head_dim, group_size,
                 q_len, window, soft_cap):
  """One (key block, kv head, batch row).

  Refs: q, do ``[T, G, Hp]``; k, v, dk, dv ``[S, Hp]``; lse2, delta ``[T, G]``
  (``vjp.backward_rows``).
  """
  j = pl.program_id(0)  # key block 0 is seen by the most rows: the heaviest programs first
  b = pl.program_id(2)
  q_offset = q_offset_ref[b]
  kv_len = kv_lengths_ref[b]
  num_rows = q_len * group_size
  num_tiles = pl.cdiv(num_rows, block_m)
  head_dim_p = k_ref.shape[-1]
  d = lax.broadcasted_iota(jnp.int32, (1, head_dim_p), 1)
  start = j * block_n
  key, k, v = flash.load_key_block(k_ref, v_ref, start, block_n, kv_len, head_dim, masked=True)

  # Row tiles [lo, hi) hold a row that sees a key of the block; in [full_lo, full_hi) every row
  # sees every key (positions grow with the row).
  clip_t = lambda x: jnp.clip(x, 0, q_len)
  if causal:
    first_t = clip_t(start - q_offset)                    # the first row that sees key `start`
    full_t = clip_t(start + block_n - 1 - q_offset)       # ... that sees the block's last key
  else:
    first_t = full_t = jnp.zeros((), jnp.int32)
  lo = (first_t * group_size) // block_m
  hi = full_hi = jnp.full((), num_tiles, jnp.int32)
  if window is not None:  # rows past these have the block's keys out of their window
    hi = pl.cdiv(clip_t(start + block_n - 1 + window - q_offset) * group_size, block_m)
    full_hi = (clip_t(start + window - q_offset) * group_size) // block_m
  lo = jnp.where(start < kv_len, lo, num_tiles)  # a block past the length: no row sees it
  hi = jnp.maximum(hi, lo)
  full_lo = jnp.clip(pl.cdiv(full_t * group_size, block_m), lo, hi)
  full_hi = jnp.clip(full_hi, full_lo, hi)
  full_hi = jnp.where(start + block_n > kv_len, full_lo, full_hi)  # the block crosses the length
  qk_scale = scale * flash.LOG2_E

  def step(i, carry, masked):
    dk, dv = carry
    t, g, valid = flash.tile_rows(i * block_m, block_m, group_size, num_rows)
    q = flash.load_rows(q_ref, t, g, valid, head_dim)
    do = flash.load_rows(do_ref, t, g, valid, head_dim)
    lse2 = _load_row_values(lse2_ref, t, g, valid, jnp.inf)
    delta = _load_row_values(delta_ref, t, g, valid, 0.)
    p, th = _probabilities(q, k, lse2, qk_scale=qk_scale, soft_cap=soft_cap)
    if masked:
      # The tile's rows past T (q = 0) must not count either: 0 * inf in their scores is NaN.
      visible = flash.visible(key, q_offset + t, kv_len, causal=causal,
                              window=window) & valid[:, None]
      p = jnp.where(visible, p, 0.)
    dv = dv + flash._dot(p.astype(do.dtype).T, do)  # pylint: disable=protected-access
    ds = _logit_grad(p, flash._dot(do, v.T), delta, th)  # pylint: disable=protected-access
    if masked:  # an invisible V slot may hold anything finite or not: keep it out of dS
      ds = jnp.where(visible, ds, 0.)
    dk = dk + flash._dot(ds.astype(q.dtype).T, q)  # pylint: disable=protected-access
    return dk, dv

  zeros = jnp.zeros((block_n, head_dim_p), jnp.float32)
  dk, dv = flash.run_blocks(step, (lo, full_lo, full_hi, hi), (zeros, zeros))
  store_mask = (key < k_ref.shape[0])[:, None] & (d < head_dim)
  tc.store(dk_ref.at[pl.ds(start, block_n), :], (dk * scale).astype(dk_ref.dtype),
           mask=store_mask)
  tc.store(dv_ref.at[pl.ds(start, block_n), :], dv.astype(dv_ref.dtype), mask=store_mask)


def _dq_kernel(q_offset_ref, kv_lengths_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref,
               dq_ref, *, scale, causal, block_m, block_n, head_dim, group_size, q_len, window,
               soft_cap):
  """One (row tile, kv head, batch row); refs as in ``_dkdv_kernel``, dq ``[T, G, Hp]``."""
  tile = pl.num_programs(0) - 1 - pl.program_id(0)  # heaviest causal tiles first
  b = pl.program_id(2)
  q_offset = q_offset_ref[b]
  kv_len = kv_lengths_ref[b]
  num_rows = q_len * group_size
  head_dim_p = k_ref.shape[-1]
  first_row = tile * block_m
  t, g, valid = flash.tile_rows(first_row, block_m, group_size, num_rows)
  q = flash.load_rows(q_ref, t, g, valid, head_dim)
  do = flash.load_rows(do_ref, t, g, valid, head_dim)
  lse2 = _load_row_values(lse2_ref, t, g, valid, jnp.inf)
  delta = _load_row_values(delta_ref, t, g, valid, 0.)
  row_pos = q_offset + t

  first_pos = q_offset + first_row // group_size
  last_pos = q_offset + (jnp.minimum(first_row + block_m, num_rows) - 1) // group_size
  blocks = flash.block_ranges(first_pos, last_pos, kv_len, block_n, causal=causal,
                              window=window)
  qk_scale = scale * flash.LOG2_E

  def step(i, dq, masked):
    key, k, v = flash.load_key_block(k_ref, v_ref, i * block_n, block_n, kv_len, head_dim,
                                     masked)
    p, th = _probabilities(q, k, lse2, qk_scale=qk_scale, soft_cap=soft_cap)
    if masked:
      visible = flash.visible(key, row_pos, kv_len, causal=causal, window=window)
      p = jnp.where(visible, p, 0.)
    ds = _logit_grad(p, flash._dot(do, v.T), delta, th)  # pylint: disable=protected-access
    if masked:
      ds = jnp.where(visible, ds, 0.)
    return dq + flash._dot(ds.astype(k.dtype), k)  # pylint: disable=protected-access

  dq = flash.run_blocks(step, blocks, jnp.zeros((block_m, head_dim_p), jnp.float32))
  flash.store_rows(dq_ref, dq * scale, t, g, valid, head_dim)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "interpret", "config",
                                             "sliding_window", "logits_soft_cap"))
def prefill_attention_bwd(q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse, *, causal,
                          scale, interpret, config, sliding_window=None, logits_soft_cap=None):
  """``(dq, dk, dv)`` of the prefill on validated inputs (lengths in ``[0, S]``, B, T, S > 0).

  ``lse`` is the forward's ``float32[B, T, N]``; ``d_lse`` its cotangent or ``None``.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  head_dim_p = flash.padded_head_dim(h)
  block_m = config.block_m
  block_n = min(config.block_n, max(16, pl.next_power_of_2(s)))
  lse2, delta = vjp.backward_rows(out, lse, d_out, d_lse)
  q5 = q.reshape(b, t, kh, g, h)  # free: the group's heads are adjacent in memory
  do5 = d_out.astype(q.dtype).reshape(b, t, kh, g, h)
  lse4, delta4 = lse2.reshape(b, t, kh, g), delta.reshape(b, t, kh, g)
  kw = dict(scale=scale, causal=causal, block_m=block_m, block_n=block_n, head_dim=h,
            group_size=g, q_len=t, window=sliding_window, soft_cap=logits_soft_cap)
  rows_spec = pl.BlockSpec((b,), lambda *_: (0,))  # per-row scalars: the whole [B] vector
  q_spec = pl.BlockSpec((None, t, None, g, head_dim_p), lambda i, kk, bb: (bb, 0, kk, 0, 0))
  kv_spec = pl.BlockSpec((None, s, None, head_dim_p), lambda i, kk, bb: (bb, 0, kk, 0))
  row_spec = pl.BlockSpec((None, t, None, g), lambda i, kk, bb: (bb, 0, kk, 0))
  in_specs = [rows_spec, rows_spec, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  args = (q_offset, kv_lengths, q5, k, v, do5, lse4, delta4)
  params = tc.compiler_params(config.num_warps, config.num_stages)
  kv_grid = (pl.cdiv(s, block_n), kh, b)
  q_grid = (pl.cdiv(t * g, block_m), kh, b)
  logger.debug("gqa prefill backward launch: B=%d T=%d S=%d N=%d K=%d H=%d dtype=%s "
               "dkdv grid=%s dq grid=%s block_m=%d block_n=%d num_warps=%d num_stages=%d", b, t,
               s, n, kh, h, q.dtype, kv_grid, q_grid, block_m, block_n, config.num_warps,
               config.num_stages)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, **kw), grid=kv_grid, in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret, name="gqa_prefill_dkdv",
  )(*args)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **kw), grid=q_grid, in_specs=in_specs, out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype), compiler_params=params,
      interpret=interpret, name="gqa_prefill_dq",
  )(*args)
  return dq.reshape(b, t, n, h), dk, dv
