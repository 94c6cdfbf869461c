"""Non-finite K/V values and the kernels: what is cleared in XLA before a kernel reads them.

design.md: a slot a query cannot see never affects it, whatever it holds, and a query that sees a
non-finite value gets NaN. Inside a kernel the weight of an invisible slot is 0, but ``0 * inf``
is NaN in the shared ``P V`` product, so such values must not reach it. Where a kernel is bound
by its tensor cores, inspecting each K/V tile costs far more (benchmarks/NOTES.md) than one pass
of XLA over V before the call: ``clear`` sets every non-finite value to 0, and
``bad_slot_counts`` (Triton) or ``first_bad_slots`` (Mosaic GPU) give the kernel what it needs to
mark, in its epilogue, the rows that see one. The memory-bound decode kernel checks its tiles
itself instead (``flash.finite_values``). The reference uses ``clear`` and ``bad_slots`` too.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp


def clear(x):
  """``x`` with every non-finite value set to 0."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def bad_slots(x):
  """bool ``[B, S, K]``: which slots of ``x [B, S, K, H]`` hold a non-finite value (in any
  feature)."""
  return ~jnp.all(jnp.isfinite(x), axis=-1)


def bad_slot_counts(*xs):
  """``int32[B, K, S + 1]``: at ``j``, how many of the slots ``< j`` hold a non-finite value in
  any of ``xs [B, S, K, H]`` (V for the Triton prefill, K and V around cuDNN). A query sees one
  iff the count grows over its visible range."""
  bad = functools.reduce(jnp.logical_or, [bad_slots(x) for x in xs])
  counts = jnp.cumsum(jnp.moveaxis(bad, 1, 2).astype(jnp.int32), axis=-1)
  return jnp.pad(counts, ((0, 0), (0, 0), (1, 0)))


def first_bad_slots(v, kv_lengths):
  """``int32[B, K]``: the first slot below ``kv_lengths[b]`` whose V holds a non-finite value
  (``S`` if none). One read-only pass over V: the Mosaic GPU prefill clears non-finite values
  only in blocks at or after it, and marks the rows that see it."""
  s = v.shape[1]
  slot = jnp.arange(s, dtype=jnp.int32)[None, :, None]
  bad = bad_slots(v) & (slot < kv_lengths[:, None, None])
  return jnp.min(jnp.where(bad, slot, s), axis=1).astype(jnp.int32)
