"""``KVCache.append`` as one Pallas kernel (lowered to Triton): K, V, lengths and overflow flags.

A decode step appends one token per row to every layer's cache. Expressed in ``jnp`` that is two
XLA scatters plus two or three small elementwise kernels for the lengths and flags: measured on an
H100, 7-12 us of launches per step, as much as the decode kernel itself for a small cache. This
kernel does all of it in one launch and writes the cache in place (``input_output_aliases``;
under ``jit`` with the cache donated no buffer is copied).

Semantics are exactly ``reference.append_reference`` (the ``"xla"`` path), bit for bit: row ``b``
writes its first ``num_new[b]`` tokens at positions ``lengths[b] + t``; a token that would land
at or past ``S_max`` is dropped (a row never wraps and never spills into another row);
``lengths`` saturates at ``S_max`` and ``overflowed`` is set (sticky) when a row was asked to hold
more.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gqa_pallas.triton import compat as tc
from gqa_pallas.triton import flash

_TILE_ELEMENTS = 4096  # tokens x padded head dim per program


def _append_kernel(lengths_ref, num_new_ref, overflowed_ref, k_new_ref, v_new_ref, k_in_ref,
                   v_in_ref, k_ref, v_ref, lengths_out_ref, overflowed_out_ref, *, t_new,
                   block_t, head_dim):
  """One (token tile, kv head, batch row): ``block_t`` new tokens of one kv head of one row.

  Refs: k_new/v_new ``[T_new, Hp]``; k/v ``[S_max, Hp]`` (aliased to k_in/v_in: the cache
  itself); lengths/num_new/overflowed and their outputs ``[B]``.
  """
  del k_in_ref, v_in_ref  # the same buffers as k_ref / v_ref
  tile, head, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  s_max = k_ref.shape[0]
  length = jnp.clip(lengths_ref[b], 0, s_max)  # as the reference: negative acts as 0
  num_new = jnp.clip(num_new_ref[b], 0, t_new)
  t = tile * block_t + lax.broadcasted_iota(jnp.int32, (block_t,), 0)
  pos = length + t
  write = (t < num_new) & (pos < s_max)
  d = lax.broadcasted_iota(jnp.int32, (1, k_ref.shape[-1]), 1)
  in_head = d < head_dim
  read_mask = (t < t_new)[:, None] & in_head
  write_mask = write[:, None] & in_head
  # Tokens that are not written keep distinct (possibly out-of-range) positions: masked on the
  # GPU; in interpret mode two rows of one scatter must never alias an element.
  for new_ref, cache_ref in ((k_new_ref, k_ref), (v_new_ref, v_ref)):
    x = tc.load(new_ref.at[t[:, None], d], mask=read_mask, other=0.)
    tc.store(cache_ref.at[pos[:, None], d], x.astype(cache_ref.dtype), mask=write_mask)

  @pl.when((tile == 0) & (head == 0))
  def _():
    wanted = length + num_new
    lengths_out_ref[b] = jnp.minimum(wanted, s_max)
    overflowed_out_ref[b] = overflowed_ref[b] | (wanted > s_max)


@functools.partial(jax.jit, static_argnames=("interpret",))
def append(k, v, lengths, overflowed, k_new, v_new, num_new, *, interpret=False):
  """Validated inputs of one layer: k/v ``[B, S_max, K, H]``, k_new/v_new ``[B, T_new, K, H]``
  (already in the cache's dtype, ``B, T_new >= 1``), lengths/num_new ``int32[B]``, overflowed
  ``bool[B]``. Returns the new ``(k, v, lengths, overflowed)``.
  """
  b, s_max, kh, h = k.shape
  t_new = k_new.shape[1]
  head_dim_p = flash.padded_head_dim(h)
  block_t = max(1, min(pl.next_power_of_2(t_new), _TILE_ELEMENTS // head_dim_p))
  grid = (pl.cdiv(t_new, block_t), kh, b)
  rows_spec = pl.BlockSpec((b,), lambda *_: (0,))
  new_spec = pl.BlockSpec((None, t_new, None, head_dim_p), lambda j, kk, bb: (bb, 0, kk, 0))
  cache_spec = pl.BlockSpec((None, s_max, None, head_dim_p), lambda j, kk, bb: (bb, 0, kk, 0))
  return pl.pallas_call(
      functools.partial(_append_kernel, t_new=t_new, block_t=block_t, head_dim=h),
      grid=grid,
      in_specs=[rows_spec, rows_spec, rows_spec, new_spec, new_spec, cache_spec, cache_spec],
      out_specs=[cache_spec, cache_spec, rows_spec, rows_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.bool_)],
      input_output_aliases={5: 0, 6: 1},
      compiler_params=tc.compiler_params(num_warps=1 if block_t * head_dim_p <= 1024 else 4,
                                         num_stages=1),
      interpret=interpret, name="gqa_kv_append",
  )(lengths, num_new, overflowed, k_new, v_new, k, v)

