"""The decoder on a device mesh: logical axis names for its parameters and cache, Flax's rules.

Every parameter of ``Decoder`` (and every array of its ``KVCache``) has one logical name per
dimension (``param_logical_axes`` / ``cache_logical_axes``); ``LOGICAL_RULES`` map those names to
mesh axes the way MaxText and Megatron do: attention heads, kv heads, the MLP's hidden features
and the vocabulary over ``"model"`` (tensor parallelism), batch rows over ``"data"``; hidden size,
head dim and sequence positions stay whole. Flax's ``nn.logical_to_mesh_sharding`` turns them
into ``NamedSharding``s; ``shard_params`` / ``shard_cache`` place the arrays.

A rule whose mesh axis is not in the mesh, or whose mesh axis size does not divide the
dimension, leaves that dimension whole (replicated): the same rules then serve a data-only mesh,
a model-only mesh, and a model axis wider than the kv heads (query heads still split; the
attention kernel then gathers its heads, ``gqa_pallas/partitioning.py``).

Parameter names are resolved from their path (``decoder.py``'s parameter tree): a parameter
this table does not know is refused with its path rather than silently replicated.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gqa_pallas.cache import KVCache

Rules = Sequence[Tuple[str, Any]]

# Logical name -> mesh axis (None: never split).
LOGICAL_RULES: Tuple[Tuple[str, Optional[str]], ...] = (
    ("batch", "data"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("head_dim", None),
    ("length", None),
    ("layers", None),
)

# (module, parameter) -> logical names of its dimensions (loop layout; the scan layout adds a
# leading "layers"). Norm scales and output biases are over the hidden size.
_PARAM_AXES = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("query", "kernel"): ("embed", "heads", "head_dim"),
    ("query", "bias"): ("heads", "head_dim"),
    ("key", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("key", "bias"): ("kv_heads", "head_dim"),
    ("value", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("value", "bias"): ("kv_heads", "head_dim"),
    ("out", "kernel"): ("heads", "head_dim", "embed"),
    ("out", "bias"): ("embed",),
    ("gate", "kernel"): ("embed", "mlp"),
    ("gate", "bias"): ("mlp",),
    ("up", "kernel"): ("embed", "mlp"),
    ("up", "bias"): ("mlp",),
    ("down", "kernel"): ("mlp", "embed"),
    ("down", "bias"): ("embed",),
    ("lm_head", "kernel"): ("embed", "vocab"),
}
_NORMS = ("input_norm", "post_attention_norm", "pre_feedforward_norm", "post_feedforward_norm",
          "final_norm")
_CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")


def _key_name(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _param_axes(path, leaf) -> P:
  names = tuple(_key_name(e) for e in path)
  where = "/".join(names)
  if len(names) < 2:
    raise ValueError(f"param_logical_axes: no logical axes known for parameter {where!r}.")
  module, param = names[-2], names[-1]
  if module in _NORMS and param == "scale":
    axes = ("embed",)
  elif (module, param) in _PARAM_AXES:
    axes = _PARAM_AXES[(module, param)]
  else:
    raise ValueError(f"param_logical_axes: no logical axes known for parameter {where!r} "
                     "(a Decoder parameter tree is expected: decoder.py lists it).")
  if names[0] == "layers":  # scan layout: a leading layer axis
    axes = ("layers",) + axes
  if len(axes) != leaf.ndim:
    raise ValueError(f"param_logical_axes: parameter {where!r} has shape {tuple(leaf.shape)}; "
                     f"expected {len(axes)} dimensions {axes}.")
  return P(*axes)


def param_logical_axes(params):
  """The logical names of every parameter of a ``Decoder`` tree (loop or scan layout): a tree
  of ``PartitionSpec``s of names (``("embed", "heads", "head_dim")`` for a query kernel)."""
  return jax.tree_util.tree_map_with_path(_param_axes, params)


def cache_logical_axes(cache):
  """The logical names of a ``KVCache`` (or a tuple of per-layer caches): ``k``/``v``
  ``("batch", "length", "kv_heads", "head_dim")``, ``lengths``/``overflowed`` ``("batch",)``;
  a leading ``"layers"`` on a layer-stacked cache."""
  def one(c):
    if not isinstance(c, KVCache):
      raise TypeError(f"cache_logical_axes: expected a KVCache or a sequence of them; got "
                      f"{type(c).__name__}.")
    lead = ("layers",) if c.num_layers is not None else ()
    kv = P(*lead, *_CACHE_AXES)
    rows = P(*lead, "batch")
    return KVCache(kv, kv, rows, rows)
  if isinstance(cache, KVCache):
    return one(cache)
  return tuple(one(c) for c in cache)


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Drops mesh axes the mesh lacks or whose size does not divide the dimension."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    kept, size = [], 1
    for name in names:
      if name in mesh.shape and dim % (size * mesh.shape[name]) == 0:
        kept.append(name)
        size *= mesh.shape[name]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def logical_sharding(tree, logical_axes, mesh: Mesh, rules: Rules = LOGICAL_RULES):
  """``NamedSharding``s for the arrays of ``tree`` from their logical names (Flax's
  ``logical_to_mesh_sharding`` with ``rules``), each fitted to its array's shape."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
  def one(spec, x):
    return NamedSharding(mesh, _fit(nn.logical_to_mesh_axes(tuple(spec), rules), x.shape, mesh))
  return jax.tree_util.tree_map(one, logical_axes, tree, is_leaf=lambda x: isinstance(x, P))


def param_sharding(params, mesh: Mesh, rules: Rules = LOGICAL_RULES):
  """The ``NamedSharding`` of every parameter of a ``Decoder`` tree on ``mesh``."""
  return logical_sharding(params, param_logical_axes(params), mesh, rules)


def cache_sharding(cache, mesh: Mesh, rules: Rules = LOGICAL_RULES):
  """The ``NamedSharding`` of every array of a ``KVCache`` (or per-layer tuple) on ``mesh``."""
  return logical_sharding(cache, cache_logical_axes(cache), mesh, rules)


def shard_params(params, mesh: Mesh, rules: Rules = LOGICAL_RULES):
  """``params`` (e.g. from ``load_hf_checkpoint``) placed on ``mesh`` by their logical axes."""
  return jax.device_put(params, param_sharding(params, mesh, rules))


def shard_cache(cache, mesh: Mesh, rules: Rules = LOGICAL_RULES):
  """``cache`` placed on ``mesh``: rows over ``"data"``, kv heads over ``"model"``."""
  return jax.device_put(cache, cache_sharding(cache, mesh, rules))


def constrain_cache(cache, mesh: Mesh, rules: Rules = LOGICAL_RULES):
  """Inside ``jit``: ``with_sharding_constraint`` of a cache to ``cache_sharding``."""
  return jax.lax.with_sharding_constraint(cache, cache_sharding(cache, mesh, rules))


def batch_sharding(shape, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> NamedSharding:
  """Rows (the leading axis) over ``"data"`` for a per-row array of ``shape``."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (len(shape) - 1), rules)
  return NamedSharding(mesh, _fit(spec, shape, mesh))
