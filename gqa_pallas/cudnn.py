"""The ``"cudnn"`` backend: cuDNN's fused attention through ``jax.nn.dot_product_attention``.

It is here so that one argument (``implementation="cudnn"``) switches a whole model to cuDNN's
attention, and so that the benchmarks compare our kernels with cuDNN through the same call. It
runs only what ``jax.nn`` can express with this package's semantics (design.md) and refuses the
rest with a ``ValueError`` that says what it takes; ``implementation=None`` never picks it.

What ``jax.nn`` can express: a causal diagonal aligned top-left (query ``t`` sees keys
``j <= t``), per-row key counts (``key_value_seq_lengths``), a left window. So:

* prefill, causal: ``T == S`` with the default positions (no ``kv_lengths``, no ``q_offset``:
  the bottom-right default is then top-left), or ``q_offset=0`` given as a Python int (static:
  every row starts at position 0; ``kv_lengths`` may then be any per-row array, e.g. right-padded
  prompts). Either with a ``sliding_window`` (cuDNN's left window, the same keys);
* prefill, ``causal=False``: any ``kv_lengths``;
* decode with one query per row (``T == 1``) and the default ``q_offset`` (the last key the row
  holds): a non-causal call over ``key_value_seq_lengths = lengths``.

Refused: per-row ``q_offset`` arrays, ``T > 1`` decode, ``logits_soft_cap``, ``return_lse``
(``jax.nn`` returns cuDNN's log-sum-exp in the input dtype, not float32), float32, a CPU. Rows
with no visible key output exactly 0, as everywhere (cuDNN's own value there is not relied on).
Gradients are cuDNN's backward (JAX differentiates ``jax.nn.dot_product_attention``). The cache
append is the reference's (``jnp``; cuDNN has none).

Invisible slots (design.md): cuDNN's prefill lets a NaN in V reach the queries before its
position (measured on the H200: the ``0 * NaN`` of a partly visible block), so the prefill
clears non-finite K/V values in XLA before the call and sets to NaN, after it, the rows whose
visible range holds such a slot (per-kv-head prefix counts, one gather per row). Its decode
(one query over ``key_value_seq_lengths``) never reads past the lengths: nothing to do there.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gqa_pallas import finite, reference, registry

# cuDNN's fused attention (sm80 and newer) takes these head dims.
_HEAD_DIMS = "a multiple of 8 up to 128"
_MIN_CAPABILITY = (8, 0)


def _head_dim_ok(h: int) -> bool:
  return h % 8 == 0 and 0 < h <= 128


def _call(sdpa, q, k, v, kv_lengths, *, causal, scale, window, with_lengths):
  out = sdpa(q, k, v, scale=scale, is_causal=causal,
             key_value_seq_lengths=kv_lengths if with_lengths else None,
             local_window_size=None if window is None else (window - 1, 0),
             implementation="cudnn")
  if with_lengths:
    # A row with no visible key is 0 by definition (cuDNN's value there is not ours to rely on).
    out = jnp.where((kv_lengths > 0)[:, None, None, None], out, jnp.zeros((), out.dtype))
  return out


def prefill_with_finite_guard(sdpa, q, k, v, kv_lengths, *, causal, scale, window,
                              with_lengths):
  """``sdpa`` (``jax.nn.dot_product_attention``'s signature) on K/V cleared of non-finite values,
  with NaN for the rows that see one: the invisible-slot rule of design.md around a kernel that
  does not keep it. Rows sit at positions ``0..T-1`` (the top-left forms this backend runs)."""
  b, t, n, _ = q.shape
  s, kh = k.shape[1], k.shape[2]
  counts = finite.bad_slot_counts(k, v)  # [B, K, S + 1]
  out = _call(sdpa, q, finite.clear(k), finite.clear(v), kv_lengths, causal=causal, scale=scale,
              window=window, with_lengths=with_lengths)
  pos = jnp.arange(t, dtype=jnp.int32)[None, :]
  hi = jnp.broadcast_to(kv_lengths[:, None], (b, t))
  if causal:
    hi = jnp.minimum(hi, pos + 1)
  lo = jnp.zeros_like(hi) if window is None else jnp.maximum(pos - window + 1, 0)
  hi = jnp.clip(hi, 0, s)
  lo = jnp.minimum(lo, hi)
  at = lambda i: jnp.take_along_axis(counts, jnp.broadcast_to(i[:, None, :], (b, kh, t)), axis=2)
  seen = jnp.repeat(jnp.moveaxis(at(hi) - at(lo) > 0, 1, 2), n // kh, axis=2)  # [B, T, N]
  return jnp.where(seen[..., None], jnp.asarray(jnp.nan, out.dtype), out)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "window", "with_lengths"))
def _prefill(q, k, v, kv_lengths, *, causal, scale, window, with_lengths):
  return prefill_with_finite_guard(jax.nn.dot_product_attention, q, k, v, kv_lengths,
                                   causal=causal, scale=scale, window=window,
                                   with_lengths=with_lengths)


@functools.partial(jax.jit, static_argnames=("scale",))
def _decode(q, k, v, lengths, *, scale):
  return _call(jax.nn.dot_product_attention, q, k, v, lengths, causal=False, scale=scale,
               window=None, with_lengths=True)


@dataclasses.dataclass(frozen=True)
class _Call:
  """What the backend derives from the problem (not a user config: ``config=`` is refused).

  Attributes:
    with_lengths: pass ``key_value_seq_lengths`` (the caller gave ``kv_lengths``, or decode);
      full rows take cuDNN's plain mask, its faster kernel.
  """
  with_lengths: bool


class CudnnBackend(registry.Backend):
  name = "cudnn"
  ops = frozenset({"prefill", "decode", "append"})
  differentiable = True

  def unsupported(self, problem):
    dims = problem.dims
    if problem.interpret:
      return "interpret=True (cuDNN runs on a CUDA GPU only)"
    if not problem.device.is_gpu:
      return f"a {problem.device.kind} device (cuDNN runs on a CUDA GPU only)"
    cap = problem.device.compute_capability
    if cap is not None and cap < _MIN_CAPABILITY:
      return f"compute capability {cap} (cuDNN's fused attention needs sm80 or newer)"
    if problem.dtype not in ("bfloat16", "float16"):
      return f"dtype {problem.dtype} (it takes bfloat16 and float16)"
    if not _head_dim_ok(dims.head_dim):
      return f"head_dim={dims.head_dim} (it takes {_HEAD_DIMS})"
    if problem.logits_soft_cap is not None:
      return "logits_soft_cap (jax.nn.dot_product_attention has no soft-cap)"
    if problem.return_lse:
      return ("return_lse=True (jax.nn returns cuDNN's log-sum-exp in the input dtype, not "
              "float32)")
    if problem.op == "append":
      return None
    if problem.op == "decode":
      if dims.q_len != 1:
        return (f"T={dims.q_len} decode (it takes one query per row: jax.nn aligns the causal "
                "diagonal top-left)")
      if problem.offset != "default":
        return "a q_offset (it takes the default, the row's last key)"
      if problem.sliding_window is not None:
        return "sliding_window in decode (jax.nn's window is aligned top-left)"
      return None
    if not problem.causal:
      return None
    if problem.offset == 0:
      return None
    if problem.offset != "default":
      return ("a q_offset other than the Python int 0 (jax.nn aligns the causal diagonal "
              "top-left and takes no per-row offset)")
    if problem.kv_lengths_given or dims.q_len != dims.kv_len:
      return ("causal attention with the default bottom-right q_offset and "
              + (f"T={dims.q_len} != S={dims.kv_len}" if dims.q_len != dims.kv_len
                 else "kv_lengths") + " (jax.nn aligns the causal diagonal top-left; pass "
              "q_offset=0 for top-left rows)")
    return None

  def default_config(self, problem):
    return _Call(with_lengths=problem.op == "decode" or problem.kv_lengths_given)

  def prefill(self, q, k, v, q_offset, kv_lengths, *, causal, scale, return_lse, interpret,
              config, sliding_window=None, logits_soft_cap=None):
    del q_offset, return_lse, interpret, logits_soft_cap  # implied by the problem, or refused
    return _prefill(q, k, v, kv_lengths, causal=causal, scale=scale, window=sliding_window,
                    with_lengths=config.with_lengths)

  def decode(self, q, k, v, q_offset, lengths, *, scale, return_lse, interpret, config,
             sliding_window=None, logits_soft_cap=None):
    del q_offset, return_lse, interpret, config, sliding_window, logits_soft_cap
    return _decode(q, k, v, lengths, scale=scale)

  def append(self, k, v, lengths, overflowed, k_new, v_new, num_new, *, interpret):
    del interpret
    return reference.append_reference(k, v, lengths, overflowed, k_new, v_new, num_new)


BACKEND = CudnnBackend()
