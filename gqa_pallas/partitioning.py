"""The kernels on sharded arrays: batch and kv-head axes split, each device runs its own shard.

A ``pallas_call`` is opaque to XLA's partitioner: called under ``jit`` on sharded arrays, its
operands would be gathered onto every device. ``per_shard`` wraps a kernel call in
``jax.experimental.custom_partitioning`` with the rule every op of this package obeys: rows of
the batch (factor ``b``) and kv heads (``k``; a query head follows its kv head, ``(k g)``) are
independent, so those two may be sharded and each device runs the kernel on its shard; every
other axis (sequences, head dim) must be whole on a device (an operand sharded along one is
gathered there: split a long cache with ``sharding.sequence_parallel_decode`` instead). A kv-head
axis that does not divide ``K`` stays whole. On one device, and inside a caller's own
``shard_map``, the wrapper is inlined: nothing changes.

The per-shard call reuses the call's plan (backend and config chosen for the global shapes);
configs are valid for any batch and head count, only the split heuristics saw the global sizes.
"""
from __future__ import annotations

import math

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# The dimensions of each operand kind: b batch, t queries, s keys, u new tokens, k kv heads,
# (k g) query heads, h head dim.
Q = "b t (k g) h"
KV = "b s k h"
NEW_KV = "b u k h"
ROWS = "b"
ROW_HEADS = "b t (k g)"
_SHARDABLE = ("b", "k")


def _dims(layout):
  """``["b", "t", ("k", "g"), "h"]`` for ``"b t (k g) h"``."""
  out, group = [], None
  for word in layout.replace("(", " ( ").replace(")", " ) ").split():
    if word == "(":
      group = []
    elif word == ")":
      out.append(tuple(group))
      group = None
    elif group is not None:
      group.append(word)
    else:
      out.append(word)
  return out


def _lead(dim):
  return dim[0] if isinstance(dim, tuple) else dim


def _axis_size(mesh, entry):
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[name] for name in names)


def _choose_axes(mesh, shapes, layouts):
  """The mesh axes the ``b`` and ``k`` factors are split over: the first operand sharded on
  one decides; an axis that does not divide the factor's size is dropped."""
  chosen, sizes = {}, {}
  for shape, layout in zip(shapes, layouts):
    spec = tuple(getattr(shape.sharding, "spec", ())) if shape.sharding is not None else ()
    for i, dim in enumerate(_dims(layout)):
      factor = _lead(dim)
      if factor in _SHARDABLE:
        size = shape.shape[i] if not isinstance(dim, tuple) else None
        if size is not None:
          sizes.setdefault(factor, size)
        if factor not in chosen and i < len(spec) and spec[i] is not None:
          chosen[factor] = spec[i]
  return {f: a for f, a in chosen.items()
          if f in sizes and sizes[f] % _axis_size(mesh, a) == 0}


def _sharding(mesh, layout, axes):
  return NamedSharding(mesh, P(*(axes.get(_lead(d)) if _lead(d) in _SHARDABLE else None
                                 for d in _dims(layout))))


def per_shard(fn, operands, layouts, result_layouts, group_size: int):
  """``fn(*operands)`` (a tuple of arrays) run shard by shard along batch and kv heads.

  ``layouts`` / ``result_layouts``: one of the layout strings above per operand / result.
  With one device there is nothing to partition: ``fn`` runs as it is. Under ``vmap`` (which
  ``custom_partitioning`` has no rule for) ``fn`` runs as it is too: XLA then gathers a sharded
  operand, as for any opaque call.
  """
  if jax.device_count() == 1:
    return fn(*operands)
  call = custom_partitioning(fn)

  def partition(mesh, arg_shapes, result_shapes):
    axes = _choose_axes(mesh, arg_shapes, layouts)
    args = tuple(_sharding(mesh, layout, axes) for layout in layouts)
    results = tuple(_sharding(mesh, layout, axes) for layout in result_layouts)
    return mesh, fn, results, args

  def infer(mesh, arg_shapes, result_shapes):
    del result_shapes
    axes = _choose_axes(mesh, arg_shapes, layouts)
    return tuple(_sharding(mesh, layout, axes) for layout in result_layouts)

  # In order of appearance (Shardy wants the special factors sorted by their index).
  factors = list(dict.fromkeys(f for layout in layouts + result_layouts for d in _dims(layout)
                               for f in (d if isinstance(d, tuple) else (d,))))
  sizes = {"g": group_size} if "g" in factors else {}
  call.def_partition(
      partition, infer_sharding_from_operands=infer,
      sharding_rule=", ".join(layouts) + " -> " + ", ".join(result_layouts),
      need_replication_factors=tuple(f for f in factors if f not in _SHARDABLE), **sizes)
  try:
    return call(*operands)
  except NotImplementedError:  # a transformation custom_partitioning has no rule for (vmap)
    return fn(*operands)
