"""Attention over a KV cache sharded along its sequence axis (sequence-parallel decode).

A cache too long for one device is split along ``S`` over a mesh axis: each device holds the
slots ``[i * S_local, (i + 1) * S_local)`` of every row. Each device runs the ordinary decode over
its own slice (its keys' positions shifted by the slice's start, its per-row length clipped to
the slice), returning its partial output and log-sum-exp, and ``merge_partials`` combines the
partials across the axis by their lse: with ``m = max_i lse_i`` and ``w_i = exp(lse_i - m)``,

    out = sum_i w_i * out_i / sum_i w_i,    lse = m + log(sum_i w_i),

which is the softmax over the union of the slices (design.md's rule: float32 weights; a row
with no visible key on any device is 0 with lse ``-inf``; a row that sees a non-finite value on
some device stays non-finite). Only the ``[B, T, N, H]`` partials cross devices, never the cache.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from gqa_pallas import api
from gqa_pallas.cache import KVCache


def merge_partials(out, lse, axis_name):
  """Inside ``shard_map``: this device's ``out [B, T, N, H]`` and float32 ``lse [B, T, N]`` over
  its keys -> ``(out, lse)`` over every device's keys along ``axis_name`` (the same on each)."""
  top = lax.pmax(lse, axis_name)
  top = jnp.where(jnp.isfinite(top), top, 0.0)  # every slice empty: weights 0, no inf - inf
  weight = jnp.exp(lse - top)
  num = lax.psum(weight[..., None] * out.astype(jnp.float32), axis_name)
  den = lax.psum(weight, axis_name)
  merged = jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
  # A non-finite partial (a slice that saw a bad value) stays visible through the sum.
  merged = jnp.where(jnp.isnan(num), jnp.nan, merged)
  total = jnp.where(den > 0, top + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
  return merged.astype(out.dtype), total


def sequence_parallel_decode(q, cache: KVCache, *, mesh, axis_name: str, q_offset=None,
                             scale=None, implementation=None, interpret=False, return_lse=False,
                             config=None, sliding_window=None, logits_soft_cap=None):
  """``gqa_decode`` over a cache whose ``k`` / ``v`` are split along ``S`` over ``axis_name``.

  Args:
    q: ``[B, N, H]`` or ``[B, T, N, H]``, replicated over ``axis_name``.
    cache: a one-layer ``KVCache``; ``S_max`` must divide evenly by the axis size (device ``i``
      holds slots ``[i * S_max / n, (i + 1) * S_max / n)``); ``lengths`` (global, replicated).
    mesh: the ``jax.sharding.Mesh`` that holds ``axis_name``.
    axis_name: the mesh axis the cache's sequence is split over.
    q_offset, scale, implementation, interpret, return_lse, config, sliding_window,
    logits_soft_cap: as in ``gqa_decode`` (positions are global).

  Returns:
    As ``gqa_decode``, replicated over ``axis_name``. Exact: the same softmax as the unsharded
    call (its float32 merge by lse adds one rounding per device).
  """
  if not isinstance(cache, KVCache) or cache.num_layers is not None:
    raise TypeError("cache must be a one-layer gqa_pallas.KVCache.")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}.")
  devices = mesh.shape[axis_name]
  s_max = cache.max_length
  if s_max % devices:
    raise ValueError(f"the cache's S_max={s_max} must divide evenly over the {devices} devices "
                     f"of mesh axis {axis_name!r}.")
  single = q.ndim == 3
  q4 = q[:, None] if single else q
  t = q4.shape[1]
  offset = cache.lengths - t if q_offset is None else jnp.broadcast_to(
      jnp.asarray(q_offset, jnp.int32), cache.lengths.shape)
  decode = functools.partial(api.gqa_decode, scale=scale, implementation=implementation,
                             interpret=interpret, return_lse=True, config=config,
                             sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
  seq = P(None, axis_name)

  def local(q4, k, v, lengths, offset):
    start = lax.axis_index(axis_name) * k.shape[1]
    held = jnp.clip(lengths - start, 0, k.shape[1])
    out, lse = decode(q4, KVCache(k, v, held), q_offset=offset - start)
    return merge_partials(out, lse, axis_name)

  out, lse = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), seq, seq, P(), P()), out_specs=(P(), P()),
      check_vma=False)(q4, cache.k, cache.v, cache.lengths.astype(jnp.int32),
                       offset.astype(jnp.int32))
  if single:
    out, lse = out[:, 0], lse[:, 0]
  return (out, lse) if return_lse else out
