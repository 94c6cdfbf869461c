"""Non-finite K/V values and the kernels: what is cleared in XLA before a kernel reads them.

design.md: a slot a query cannot see never affects it, whatever it holds, and a query that sees a
non-finite value gets NaN. Inside a kernel the weight of an invisible slot is 0, but ``0 * inf``
is NaN in the shared ``P V`` product, so such values must not reach it. Where a kernel is bound
by its tensor cores, inspecting each K/V tile costs far more (benchmarks/NOTES.md) than one pass
of XLA over V before the call: ``clear`` sets every non-finite value to 0 and
``bad_slot_counts`` gives the kernel what it needs to mark, in its epilogue, the rows that see
one. The memory-bound decode kernel checks its tiles itself instead (``flash.finite_values``).
"""
from __future__ import annotations

import jax.numpy as jnp


def clear(x):
  """``x`` with every non-finite value set to 0."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def bad_slot_counts(v):
  """``int32[B, K, S + 1]``: at ``j``, how many of the slots ``< j`` of ``v [B, S, K, H]`` hold a
  non-finite value (in any feature). A query sees one iff the count grows over its visible
  range."""
  bad = ~jnp.all(jnp.isfinite(v), axis=-1)  # [B, S, K]
  counts = jnp.cumsum(jnp.moveaxis(bad, 1, 2).astype(jnp.int32), axis=-1)
  return jnp.pad(counts, ((0, 0), (0, 0), (1, 0)))
