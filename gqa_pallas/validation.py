"""Input validation shared by every public entry point.

Each check raises a ``ValueError`` (wrong shape/value) or ``TypeError`` (wrong dtype) whose message
says what was expected, so callers learn what is supported instead of getting a lowering error.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
try:  # public through jax 0.11; the private home otherwise
  from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover
  from jax._src.core import Tracer as _Tracer

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
DTYPE_NAMES = ", ".join(jnp.dtype(d).name for d in SUPPORTED_DTYPES)

# gqa_decode takes at most this many new query tokens per row (speculative / chunked decoding);
# longer chunks go through gqa_attention over the cache's k/v.
MAX_DECODE_QUERIES = 16


@dataclasses.dataclass(frozen=True)
class AttentionDims:
  """Static sizes of one attention call: q ``[B, T, N, H]``, k/v ``[B, S, K, H]``."""
  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int

  @property
  def group_size(self) -> int:
    return self.num_heads // self.num_kv_heads


def is_supported_dtype(dtype) -> bool:
  return jnp.dtype(dtype) in [jnp.dtype(d) for d in SUPPORTED_DTYPES]


def check_float_dtype(name: str, x) -> None:
  if not is_supported_dtype(x.dtype):
    raise TypeError(f"{name} must have dtype {DTYPE_NAMES}; got {x.dtype}.")


def check_rank(name: str, x, rank: int, layout: str) -> None:
  if getattr(x, "ndim", None) != rank:
    raise ValueError(
        f"{name} must be rank {rank} with layout {layout}; got shape {getattr(x, 'shape', None)}.")


INT32_RANGE = (-2 ** 31, 2 ** 31 - 1)


def _check_int32_range(name: str, values) -> None:
  values = np.asarray(values)
  if values.size and (values.min() < INT32_RANGE[0] or values.max() > INT32_RANGE[1]):
    raise ValueError(f"{name} must fit int32 ({INT32_RANGE[0]}..{INT32_RANGE[1]}); got values "
                     f"from {values.min()} to {values.max()}.")


def check_per_row(name: str, x, batch: int):
  """Per-row integer vector ``int32[B]``; a Python int or scalar is broadcast to every row.

  Bools are refused (``TypeError``); values outside int32 are a ``ValueError`` wherever they are
  known (Python ints, NumPy arrays, concrete arrays of a wider integer dtype), never wrapped.
  """
  if x is None:
    return None
  if isinstance(x, (bool, np.bool_)):
    raise TypeError(f"{name} must be an int or an integer array int32[{batch}]; got a bool.")
  if isinstance(x, (int, np.integer)):
    _check_int32_range(name, x)
    return jnp.full((batch,), x, jnp.int32)
  if not hasattr(x, "dtype"):  # a list or tuple: NumPy sees its values
    x = np.asarray(x)
    if x.dtype == object:  # Python ints beyond int64
      _check_int32_range(name, x)
      x = x.astype(np.int64)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array int32[{batch}]; got dtype {x.dtype}.")
  # Only dtypes wider than int32 can hold values outside it; they are known unless traced.
  wide = jnp.dtype(x.dtype).itemsize > 4 or jnp.dtype(x.dtype) == jnp.uint32
  if wide and not isinstance(x, _Tracer):
    _check_int32_range(name, x)
  x = jnp.asarray(x)
  if x.ndim == 0:
    return jnp.broadcast_to(x.astype(jnp.int32), (batch,))
  if x.shape != (batch,):
    raise ValueError(f"{name} must have shape [B] = ({batch},); got {x.shape}.")
  return x.astype(jnp.int32)


def validate_attention(q, k, v, q_offset=None, kv_lengths=None):
  """Checks q ``[B,T,N,H]``, k/v ``[B,S,K,H]`` and the per-row vectors.

  Returns ``(dims, q_offset, kv_lengths)`` with the vectors as ``int32[B]`` or ``None``.
  """
  check_rank("q", q, 4, "[B, T, N, H]")
  check_rank("k", k, 4, "[B, S, K, H]")
  check_rank("v", v, 4, "[B, S, K, H]")
  for name, x in (("q", q), ("k", k), ("v", v)):
    check_float_dtype(name, x)
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape [B, S, K, H]; got {k.shape} and {v.shape}.")
  b, t, n, h = q.shape
  bk, s, kh, hk = k.shape
  if bk != b:
    raise ValueError(f"q and k/v must have the same batch size; got {b} and {bk}.")
  if hk != h:
    raise ValueError(f"q and k/v must have the same head dim H; got {h} and {hk}.")
  if h == 0:
    raise ValueError(f"the head dim H must be positive; got q {q.shape} and k/v {k.shape}.")
  if kh == 0:
    raise ValueError(f"k and v must have at least one kv head (K >= 1); got k/v {k.shape}.")
  if n % kh:
    raise ValueError(
        f"the number of query heads N={n} must be a multiple of the number of kv heads K={kh}.")
  q_offset = check_per_row("q_offset", q_offset, b)
  kv_lengths = check_per_row("kv_lengths", kv_lengths, b)
  return AttentionDims(b, t, s, n, kh, h), q_offset, kv_lengths


def check_window_and_cap(sliding_window, logits_soft_cap, causal=True):
  """``(sliding_window, logits_soft_cap)`` as a Python ``int`` / ``float`` or ``None``.

  Both are static (they pick kernels and block ranges); a value <= 0 is a ``ValueError``, and
  a window needs causal attention (Hugging Face's convention: a query at ``p`` sees keys
  ``p - sliding_window < j <= p``).
  """
  if sliding_window is not None:
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, (int, np.integer)):
      raise TypeError(f"sliding_window must be a Python int or None; got "
                      f"{type(sliding_window).__name__}.")
    if sliding_window <= 0:
      raise ValueError(f"sliding_window must be a positive int (the keys a query sees, itself "
                       f"included) or None; got {sliding_window}.")
    if not causal:
      raise ValueError("sliding_window needs causal=True (a query sees itself and the "
                       "sliding_window - 1 keys before it).")
    sliding_window = int(sliding_window)
  if logits_soft_cap is not None:
    if isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap,
                                                           (int, float, np.floating,
                                                            np.integer)):
      raise TypeError(f"logits_soft_cap must be a Python float or None; got "
                      f"{type(logits_soft_cap).__name__}.")
    if not logits_soft_cap > 0:
      raise ValueError(f"logits_soft_cap must be > 0 (logits become cap * tanh(logits / cap)) "
                       f"or None; got {logits_soft_cap}.")
    logits_soft_cap = float(logits_soft_cap)
  return sliding_window, logits_soft_cap


def check_flags(**flags) -> None:
  """Static switches (``causal``, ``return_lse``, ``interpret``) must be bools: a truthy string
  such as ``"false"`` would silently mean ``True``."""
  for name, value in flags.items():
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(f"{name} must be a bool (True or False); got {type(value).__name__} "
                      f"{value!r}.")


def check_scale(scale):
  if scale is not None and not isinstance(scale, (int, float, np.floating)):
    raise TypeError(f"scale must be a Python float or None; got {type(scale).__name__}.")
