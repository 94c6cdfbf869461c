"""A functional KV cache: a pytree that passes through ``jit``, ``scan``, ``while_loop`` and donation.

Layout ``k``/``v`` ``[B, S_max, K, H]`` (Flax's ``cached_key`` layout); the kernels read it in place.
``lengths int32[B]`` counts the tokens each row holds; rows advance independently.

Overflow policy: outside ``jit`` (concrete values) an append that does not fit raises a
``ValueError`` naming the row. Inside ``jit`` a row never writes into another row and never wraps:
tokens that do not fit are dropped, the row's length saturates at ``S_max`` and the row's sticky
``overflowed`` flag is set; ``cache.check()`` turns the flags into a ``checkify`` error.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from gqa_pallas import devices, partitioning, reference, registry, validation


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_fits(lengths, num_new, t_new, s_max) -> None:
  """Outside ``jit``: a ``ValueError`` naming the first row (and layer) that cannot take its tokens."""
  def where(idx):
    return f"row {idx[-1]}" if len(idx) == 1 else f"layer {idx[0]} row {idx[1]}"
  bad = (num_new < 0) | (num_new > t_new)
  if np.any(bad):
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"num_new[{', '.join(map(str, idx))}] = {num_new[idx]} is outside "
                     f"[0, T_new={t_new}] ({where(idx)}).")
  over = lengths + num_new > s_max
  if np.any(over):
    idx = tuple(int(i) for i in np.argwhere(over)[0])
    raise ValueError(
        f"KV cache overflow: {where(idx)} holds {int(lengths[idx])} tokens and appends "
        f"{int(num_new[idx])}, more than max_length={s_max}.")


def _run_append(backend, interpret, k, v, lengths, overflowed, k_new, v_new, num_new):
  def run(*operands):
    with registry.kernel_scope():
      return tuple(backend.append(*operands, interpret=interpret))

  operands = (k, v, lengths, overflowed, k_new, v_new, num_new)
  if backend.differentiable:  # jnp: XLA partitions it itself
    return run(*operands)
  rows, kv = partitioning.ROWS, partitioning.KV
  return partitioning.per_shard(run, operands,
                                (kv, kv, rows, rows, partitioning.NEW_KV, partitioning.NEW_KV,
                                 rows), (kv, kv, rows, rows), 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _differentiable_append(run, k, v, lengths, overflowed, k_new, v_new, num_new):
  """An append kernel, differentiable in the cache's and the new tokens' values through the
  reference's VJP (the write is a scatter: each slot's cotangent goes to what landed there)."""
  return run(k, v, lengths, overflowed, k_new, v_new, num_new)


def _append_fwd(run, k, v, lengths, overflowed, k_new, v_new, num_new):
  out = run(k, v, lengths, overflowed, k_new, v_new, num_new)
  return out, (k, v, lengths, overflowed, k_new, v_new, num_new)


def _append_bwd(run, residuals, cotangent):
  del run
  k, v, lengths, overflowed, k_new, v_new, num_new = residuals
  values = lambda k, v, k_new, v_new: reference.append_reference(
      k, v, lengths, overflowed, k_new, v_new, num_new)[:2]
  _, vjp = jax.vjp(values, k, v, k_new, v_new)
  dk, dv, dk_new, dv_new = vjp(tuple(cotangent[:2]))
  return dk, dv, None, None, dk_new, dv_new, None


_differentiable_append.defvjp(_append_fwd, _append_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer KV cache.

  ``KVCache(k, v, lengths)`` wraps existing arrays (e.g. Flax's ``cached_key`` /
  ``cached_value``); the overflow flags then start all ``False``.

  Attributes:
    k: ``[B, S_max, K, H]`` keys (a leading layer axis ``[L, B, S_max, K, H]`` when stacked).
    v: like ``k``.
    lengths: ``int32[B]`` (``[L, B]`` when stacked) tokens held per row.
    overflowed: ``bool[B]`` (``[L, B]``) set once a row was asked to hold more than ``S_max``;
      ``None`` (the default) means all ``False``.
  """
  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  overflowed: jax.Array | None = None

  def __post_init__(self):
    # Only a real lengths array gets default flags: JAX also rebuilds the class from other
    # leaves (None, sentinels, shardings) when it maps over the pytree.
    shape = getattr(self.lengths, "shape", None)
    if self.overflowed is None and shape is not None:
      object.__setattr__(self, "overflowed", jnp.zeros(shape, jnp.bool_))

  @classmethod
  def init(cls, batch: int, max_length: int, num_kv_heads: int, head_dim: int,
           dtype=jnp.bfloat16, *, num_layers: int | None = None) -> "KVCache":
    """An empty cache. ``num_layers`` adds a leading layer axis for ``lax.scan`` over layers."""
    for name, value in (("batch", batch), ("max_length", max_length),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"KVCache.init: {name} must be a positive int; got {value!r}.")
    if not validation.is_supported_dtype(dtype):
      raise TypeError(
          f"KVCache.init: dtype must be {validation.DTYPE_NAMES}; got {jnp.dtype(dtype)}.")
    lead = () if num_layers is None else (num_layers,)
    shape = lead + (batch, max_length, num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               lengths=jnp.zeros(lead + (batch,), jnp.int32),
               overflowed=jnp.zeros(lead + (batch,), jnp.bool_))

  # Shape accessors (valid for an unstacked cache and for a stacked one).
  @property
  def batch(self) -> int:
    return self.k.shape[-4]

  @property
  def max_length(self) -> int:
    return self.k.shape[-3]

  @property
  def num_kv_heads(self) -> int:
    return self.k.shape[-2]

  @property
  def head_dim(self) -> int:
    return self.k.shape[-1]

  @property
  def num_layers(self) -> int | None:
    return self.k.shape[0] if self.k.ndim == 5 else None

  def layer(self, i) -> "KVCache":
    """The cache of layer ``i`` of a stacked cache.

    A Python int must be in ``[-num_layers, num_layers)`` (negative counts from the end, as in
    Python); a traced index is clamped into range by JAX's indexing (it cannot be checked).
    """
    if self.num_layers is None:
      raise ValueError("layer(i) needs a stacked cache (created with num_layers=...).")
    if isinstance(i, (bool, np.bool_)):
      raise TypeError("layer(i) takes an int layer index; got a bool.")
    if isinstance(i, (int, np.integer)) and not -self.num_layers <= i < self.num_layers:
      raise ValueError(f"layer index {i} is out of range for a cache of {self.num_layers} "
                       f"layers (valid: {-self.num_layers}..{self.num_layers - 1}).")
    return jax.tree_util.tree_map(lambda x: x[i], self)

  def append(self, k_new, v_new, num_new=None, *, implementation=None,
             interpret: bool = False) -> "KVCache":
    """Writes ``k_new``/``v_new`` ``[B, T_new, K, H]`` at each row's own offset ``lengths[b]``.

    ``num_new int32[B]`` (default ``T_new``): only the first ``num_new[b]`` tokens of row ``b`` are
    valid and written. Returns the new cache; under ``jit`` with the cache donated the update is in
    place. A stacked cache takes ``[L, B, T_new, K, H]`` and ``num_new [B]`` or ``[L, B]``.

    ``implementation``: a backend name (``gqa_pallas.IMPLEMENTATIONS``; ``"triton"``: one Pallas
    kernel for the whole append, ``"xla"``: the reference's ``jnp`` scatters) or ``None`` (the
    device's preference, see ``gqa_pallas.registry``); every backend gives identical results.
    """
    append_kwargs = dict(implementation=implementation, interpret=interpret)
    if self.num_layers is not None:
      validation.check_rank("k_new", k_new, 5, "[L, B, T_new, K, H]")
      num_new_l = num_new
      if num_new is not None and jnp.ndim(num_new) <= 1:
        num_new_l = jnp.broadcast_to(jnp.asarray(num_new), self.lengths.shape)
      # vmap traces the per-layer appends, so check here what the eager path checks per row.
      if (num_new_l is not None and _is_concrete(num_new_l, self.lengths)
          and jnp.issubdtype(jnp.asarray(num_new_l).dtype, jnp.integer)):
        _check_fits(np.asarray(self.lengths), np.asarray(num_new_l), k_new.shape[2],
                    self.max_length)
      elif num_new_l is None and _is_concrete(self.lengths):
        _check_fits(np.asarray(self.lengths), np.full(self.lengths.shape, k_new.shape[2]),
                    k_new.shape[2], self.max_length)
      if num_new_l is None:
        return jax.vmap(lambda c, kn, vn: c.append(kn, vn, **append_kwargs))(self, k_new, v_new)
      return jax.vmap(lambda c, kn, vn, nn: c.append(kn, vn, nn, **append_kwargs))(
          self, k_new, v_new, num_new_l)
    validation.check_rank("k_new", k_new, 4, "[B, T_new, K, H]")
    validation.check_rank("v_new", v_new, 4, "[B, T_new, K, H]")
    b, s_max, kh, h = self.k.shape
    if k_new.shape != v_new.shape:
      raise ValueError(f"k_new and v_new must have the same shape; got {k_new.shape} and "
                       f"{v_new.shape}.")
    if k_new.shape[0] != b or k_new.shape[2:] != (kh, h):
      raise ValueError(f"append expects [B, T_new, K, H] = [{b}, T_new, {kh}, {h}]; got "
                       f"{k_new.shape}.")
    t_new = k_new.shape[1]
    validation.check_flags(interpret=interpret)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
      validation.check_float_dtype(name, x)
    num_new = validation.check_per_row("num_new", num_new, b)
    if num_new is None:
      num_new = jnp.full((b,), t_new, jnp.int32)
    if _is_concrete(num_new, self.lengths):
      _check_fits(np.asarray(self.lengths), np.asarray(num_new), t_new, s_max)
    problem = registry.Problem("append", validation.AttentionDims(b, t_new, s_max, kh, kh, h),
                               jnp.dtype(self.k.dtype).name, interpret=interpret,
                               device=devices.current())
    backend = registry.resolve(implementation, problem)
    lengths = self.lengths.astype(jnp.int32)  # int64 under x64 (a hand-built cache)
    run = functools.partial(_run_append, backend, bool(interpret))
    if not backend.differentiable:
      run = functools.partial(_differentiable_append, run)
    k, v, lengths, overflowed = run(self.k, self.v, lengths, self.overflowed,
                                    k_new.astype(self.k.dtype), v_new.astype(self.v.dtype),
                                    num_new)
    return KVCache(k=k, v=v, lengths=lengths, overflowed=overflowed)

  def reset(self, rows=None) -> "KVCache":
    """Empties ``rows`` (``bool[B]`` mask or integer indices; ``None``: every row).

    Indices outside ``[0, B)`` are a ``ValueError`` when known; traced ones (under ``jit``)
    clear nothing: an index never wraps onto another row.

    Data is left in place: slots past ``lengths`` are never read, so clearing them is not needed.
    """
    lengths_shape = self.lengths.shape
    if rows is None:
      clear = jnp.ones(lengths_shape, jnp.bool_)
    else:
      rows = jnp.asarray(rows)
      if rows.dtype == jnp.bool_:
        if rows.shape != (self.batch,):
          raise ValueError(f"reset: a row mask must be bool[{self.batch}]; got {rows.shape}.")
        clear = jnp.broadcast_to(rows, lengths_shape)
      elif jnp.issubdtype(rows.dtype, jnp.integer):
        if _is_concrete(rows) and np.any((np.asarray(rows) < 0) |
                                         (np.asarray(rows) >= self.batch)):
          raise ValueError(f"reset: row indices must be in [0, {self.batch}); got {rows}.")
        # Compared, not scattered: a traced index outside [0, B) clears nothing (a scatter
        # would wrap a negative one onto another row).
        clear = jnp.any(rows.reshape(-1, 1) == jnp.arange(self.batch), axis=0)
        clear = jnp.broadcast_to(clear, lengths_shape)
      else:
        raise TypeError(f"reset: rows must be a bool mask or integer indices; got {rows.dtype}.")
    return dataclasses.replace(self, lengths=jnp.where(clear, 0, self.lengths),
                               overflowed=jnp.where(clear, False, self.overflowed))

  def check(self) -> None:
    """A ``checkify`` check that no row overflowed (use inside ``checkify.checkify``)."""
    checkify.check(~jnp.any(self.overflowed), "KV cache overflow: a row was asked to hold more "
                   "than max_length tokens (overflowed = {f})", f=self.overflowed)
