"""The functional core shared by the linen and NNX attention layers.

Everything here works on already-projected heads: ``q [B, T, N, H]``, ``k``/``v [B, T_kv, K, H]``.
The modules own the parameters (``query``/``key``/``value``/``out``); this file owns

* rotary position embeddings as Hugging Face Llama/Qwen2 apply them (``rope``,
  ``apply_rotary_embedding``),
* the attention call and its routing: the package's kernels (``gqa_attention`` / ``gqa_decode``)
  when the attention is plain (no explicit mask or bias, no active dropout, no sown weights), and
  an XLA path (``masked_attention``) otherwise,
* the KV-cache step: append the new tokens' k/v at each row's own offset, then attend over the
  cache at absolute positions.

Semantics are those of ``gqa_pallas`` (design.md): query row ``t`` of batch row ``b`` sits at
``q_offset[b] + t``; key ``j`` is visible iff ``j < kv_lengths[b]`` and (when causal)
``j <= q_offset[b] + t``. Softmax and accumulation run in float32; a query row with no visible key
gives exactly 0.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gqa_pallas import api as gqa_api
from gqa_pallas import reference
from gqa_pallas import validation
from gqa_pallas.cache import KVCache

Array = jax.Array

# At most this many new tokens per row go through ``gqa_decode``; longer chunks through
# ``gqa_attention`` over the cache.
DECODE_MAX_NEW_TOKENS = validation.MAX_DECODE_QUERIES


# --------------------------------------------------------------------------------------------
# Rotary position embeddings (Hugging Face Llama convention).
# --------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> Array:
  """``float32[head_dim // 2]``: ``1 / theta ** (arange(0, H, 2) / H)`` (HF ``inv_freq``)."""
  if not isinstance(head_dim, (int, np.integer)) or head_dim <= 0 or head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim; got {head_dim!r}.")
  if theta is None or not theta > 0:
    raise ValueError(f"rope theta must be a positive number; got {theta!r}.")
  exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  return jnp.asarray(1.0 / (np.float32(theta) ** exponent), jnp.float32)


def rope(positions, head_dim: int, theta: float = 10000.0, *, inv_freq=None,
         attention_scaling: float = 1.0):
  """``(cos, sin)``, float32 ``[..., head_dim]`` for integer ``positions [...]``.

  As HF ``LlamaRotaryEmbedding``: ``freqs = positions * inv_freq``, ``emb = concat(freqs, freqs)``,
  ``cos = cos(emb) * attention_scaling``. Pass ``inv_freq`` (``float32[head_dim // 2]``) to use a
  scaled variant (e.g. Llama 3 "rope_type=llama3"), computed by the caller.
  """
  if inv_freq is None:
    inv_freq = rope_inv_freq(head_dim, theta)
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  if inv_freq.shape != (head_dim // 2,):
    raise ValueError(f"inv_freq must have shape ({head_dim // 2},); got {inv_freq.shape}.")
  freqs = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * attention_scaling, jnp.sin(emb) * attention_scaling


def rotate_half(x: Array) -> Array:
  """HF ``rotate_half``: ``concat(-x2, x1)`` of the two halves of the last axis."""
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary_embedding(x: Array, positions=None, *, theta: float = 10000.0, cos=None,
                           sin=None, inv_freq=None) -> Array:
  """Rotates ``x [B, T, heads, H]`` (any leading dims before ``T``) at ``positions [B, T]``.

  ``x * cos + rotate_half(x) * sin`` with HF Llama's half-split ("rotate_half") pairing of
  dimensions ``i`` and ``i + H/2``. Either give ``positions`` (int; ``[T]`` or ``[B, T]``) and
  ``theta``/``inv_freq``, or precomputed ``cos``/``sin`` ``[B, T, H]`` (or ``[T, H]``) from ``rope``.
  The product is computed in float32 and cast back to ``x.dtype`` (HF casts cos/sin to the input
  dtype first; the two agree exactly in float32).
  """
  h = x.shape[-1]
  if cos is None or sin is None:
    if positions is None:
      raise ValueError("apply_rotary_embedding needs positions or (cos, sin).")
    cos, sin = rope(positions, h, theta, inv_freq=inv_freq)
  cos = jnp.asarray(cos, jnp.float32)[..., None, :]  # broadcast over the heads axis
  sin = jnp.asarray(sin, jnp.float32)[..., None, :]
  xf = x.astype(jnp.float32)
  return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Shapes.
# --------------------------------------------------------------------------------------------


def resolve_head_dims(num_heads: int, num_kv_heads: int | None, qkv_features: int | None,
                      head_dim: int | None, in_features: int):
  """``(num_kv_heads, head_dim)`` from the layer's settings, with Flax's / HF's defaults.

  ``head_dim`` wins when given (HF ``config.head_dim``); otherwise it is ``qkv_features //
  num_heads`` (Flax), ``qkv_features`` defaulting to ``in_features``.
  """
  if not isinstance(num_heads, (int, np.integer)) or num_heads <= 0:
    raise ValueError(f"num_heads must be a positive int; got {num_heads!r}.")
  kv = num_heads if num_kv_heads is None else num_kv_heads
  if not isinstance(kv, (int, np.integer)) or kv <= 0 or num_heads % kv:
    raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({kv}).")
  if head_dim is not None:
    if qkv_features is not None and qkv_features != num_heads * head_dim:
      raise ValueError(f"qkv_features ({qkv_features}) must equal num_heads * head_dim "
                       f"({num_heads} * {head_dim}) when both are given.")
    if head_dim <= 0:
      raise ValueError(f"head_dim must be positive; got {head_dim}.")
    return int(kv), int(head_dim)
  qkv = in_features if qkv_features is None else qkv_features
  if qkv % num_heads:
    raise ValueError(f"Memory dimension ({qkv}) must be divisible by number of heads "
                     f"({num_heads}).")
  return int(kv), int(qkv // num_heads)


def resolve_inputs(inputs_q, inputs_k, inputs_v, inputs_kv):
  """Flax's rules: ``inputs_k`` defaults to ``inputs_q``, ``inputs_v`` to ``inputs_k``."""
  if inputs_kv is not None:
    if inputs_k is not None or inputs_v is not None:
      raise ValueError("If either `inputs_k` or `inputs_v` is not None, `inputs_kv` must be None.")
    return inputs_q, inputs_kv, inputs_kv
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError("`inputs_k` cannot be None if `inputs_v` is not None. To have both "
                       "`inputs_k` and `inputs_v` be the same value, pass in the value to "
                       "`inputs_k` and leave `inputs_v` as None.")
    inputs_k = inputs_q
  if inputs_v is None:
    inputs_v = inputs_k
  return inputs_q, inputs_k, inputs_v


def _flatten_bcast(m, batch_shape, trailing: int):
  """A mask/bias broadcastable to ``[*batch, A, T, S]`` -> ``[prod(batch), A, T, S]``."""
  if m is None:
    return None
  m = jnp.asarray(m)
  while m.ndim < len(batch_shape) + trailing:
    m = m[None]
  m = jnp.broadcast_to(m, tuple(batch_shape) + m.shape[m.ndim - trailing:])
  return m.reshape((math.prod(batch_shape),) + m.shape[len(batch_shape):])


# --------------------------------------------------------------------------------------------
# XLA attention with explicit masks, bias, dropout, sown weights.
# --------------------------------------------------------------------------------------------


def masked_attention(q, k, v, *, mask=None, bias=None, scale=None, kv_lengths=None,
                     dropout_rng=None, dropout_rate: float = 0.0, broadcast_dropout: bool = True,
                     deterministic: bool = True, precision=None,
                     sow_fn: Callable[[Array], Any] | None = None, logits_soft_cap=None):
  """GQA attention in plain XLA, for everything the kernels do not take.

  Args:
    q: ``[B, T, N, H]``; k, v: ``[B, S, K, H]``, ``N % K == 0`` (head ``n`` reads kv head
      ``n // (N // K)``).
    mask: bool (or {0, 1} float, Flax style) broadcastable to ``[B, N, T, S]``; True = attend.
    bias: float, broadcastable to ``[B, N, T, S]``, added to the logits.
    scale: logit scale, default ``1/sqrt(H)``.
    kv_lengths: ``int32[B]``: keys at or past it are masked. A non-finite K/V value in a slot a
      query does not see never reaches it; a query that sees one gets NaN.
    dropout_rng, dropout_rate, broadcast_dropout, deterministic: Flax's attention dropout; the
      keep mask is drawn exactly as Flax draws it (shape ``[1, 1, T, S]`` when broadcast, else
      ``[B, N, T, S]``), so the same key gives the same mask as ``nn.dot_product_attention``.
    precision: einsum precision.
    sow_fn: called with the attention weights ``[B, N, T, S]`` (in q's dtype) before dropout.
    logits_soft_cap: scaled logits become ``cap * tanh(logits / cap)`` (before the bias).

  Returns:
    ``[B, T, N, H]`` in q's dtype. Softmax and accumulation in float32 (or float64 for float64
    inputs); rows with no visible key give 0.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  if n % kh:
    raise ValueError(f"Query heads ({n}) must be a multiple of key heads ({kh}).")
  g = n // kh
  cdt = jnp.promote_types(q.dtype, jnp.float32)
  if scale is None:
    scale = 1.0 / math.sqrt(h)
  visible = jnp.ones((1, 1, 1, s), jnp.bool_)
  if kv_lengths is not None:
    no_offset = jnp.zeros_like(kv_lengths)
    visible = reference.visibility_mask(1, s, no_offset, kv_lengths, False)[:, None]
  k, v, bad_k, bad_v = reference.finite_keys(k, v)
  if mask is not None:
    mask = jnp.asarray(mask)
    visible = visible & (mask if mask.dtype == jnp.bool_ else mask != 0)
  visible = jnp.broadcast_to(visible, (b, n, t, s))
  qg = q.astype(cdt).reshape(b, t, kh, g, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(cdt), precision=precision)
  logits = logits.reshape(b, n, t, s) * jnp.asarray(scale, cdt)
  logits = reference.soft_cap(logits, logits_soft_cap)
  if bias is not None:
    logits = logits + jnp.asarray(bias).astype(cdt)
  p, denom, _ = reference.softmax_parts(logits, visible)
  weights = reference.normalize(p, denom)
  if sow_fn is not None:
    sow_fn(weights.astype(q.dtype))
  if not deterministic and dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("dropout needs a dropout_rng (or deterministic=True).")
    keep_prob = 1.0 - dropout_rate
    shape = (1, 1, t, s) if broadcast_dropout else weights.shape
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = weights * (keep.astype(cdt) / jnp.asarray(keep_prob, cdt))
  out = jnp.einsum("bkgts,bskh->btkgh", weights.reshape(b, kh, g, t, s), v.astype(cdt),
                   precision=precision)
  return reference.poison(out.reshape(b, t, n, h), visible, bad_k | bad_v, g).astype(q.dtype)


def sow_fn_for(module) -> Callable[[Array], Any] | None:
  """A callable that sows attention weights into ``module`` the way its Flax API does.

  linen: ``module.sow("intermediates", "attention_weights", w)``. NNX: see ``sow_nnx``.
  """
  if module is None:
    return None
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if isinstance(module, nnx.Module):
    return lambda w: sow_nnx(module, "attention_weights", w)
  return lambda w: module.sow("intermediates", "attention_weights", w)


def sow_nnx(module, name: str, value) -> None:
  """Records ``value`` under ``name`` in an NNX module, without ``Module.sow``'s deprecation.

  Inside ``nnx.capture(..., nnx.Intermediate)`` this is ``module.sow(nnx.Intermediate, name,
  value)``: the value comes back in the captured state (and, as with ``sow``, is dropped when
  ``nnx.Intermediate`` is not among the captured types). Outside a capture, where flax >= 0.12.8
  deprecates ``sow``, it does what ``sow`` does there, without the call: the module attribute
  ``name`` is an ``nnx.Intermediate`` holding a tuple, one entry per call.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if hasattr(module, "__captures__"):  # set by nnx.capture for the duration of the call
    module.sow(nnx.Intermediate, name, value)
    return
  current = getattr(module, name, None)
  if current is None:
    setattr(module, name, nnx.Intermediate((value,)))
  elif type(current) is nnx.Intermediate:  # pylint: disable=unidiomatic-typecheck  (as sow)
    current.set_value(current.get_value() + (value,))
  else:
    raise ValueError(f"Expected '{name}' to be an nnx.Intermediate, got "
                     f"{type(current).__name__}.")


def kernel_dtype_ok(*xs) -> bool:
  return all(validation.is_supported_dtype(x.dtype) for x in xs) and len(
      {jnp.dtype(x.dtype) for x in xs}) == 1


def cache_from_variables(cached_key, cached_value, cache_index) -> KVCache:
  """The ``KVCache`` view of Flax's decode variables (``cached_key``/``cached_value``
  ``[B, S, K, H]``, ``cache_index`` int32 ``[B]`` or a scalar shared by every row)."""
  lengths = jnp.broadcast_to(cache_index, cached_key.shape[:1]).astype(jnp.int32)
  return KVCache(cached_key, cached_value, lengths)


# --------------------------------------------------------------------------------------------
# The layer's attention step: RoPE, cache, routing.
# --------------------------------------------------------------------------------------------


def default_positions(batch: int, length: int, start=None) -> Array:
  """``int32[B, T]``: ``start[:, None] + arange(T)`` (``start`` defaults to 0)."""
  pos = jnp.arange(length, dtype=jnp.int32)[None, :]
  if start is None:
    return jnp.broadcast_to(pos, (batch, length))
  return jnp.asarray(start, jnp.int32)[:, None] + pos


def _check_positions(positions, batch, length):
  positions = jnp.asarray(positions)
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise TypeError(f"positions must be integers int32[B, T]; got dtype {positions.dtype}.")
  if positions.ndim == 1:
    positions = positions[None, :]
  if positions.ndim != 2 or positions.shape[1] != length or positions.shape[0] not in (1, batch):
    raise ValueError(f"positions must have shape [B, T] = ({batch}, {length}) (or [T]); got "
                     f"{positions.shape}.")
  return jnp.broadcast_to(positions.astype(jnp.int32), (batch, length))


def attend(query, key, value, *, cache: KVCache | None = None, positions=None, num_new=None,
           mask=None, is_causal: bool = False, rope_theta: float | None = None,
           scale: float | None = None, dropout_rng=None, dropout_rate: float = 0.0,
           broadcast_dropout: bool = True, deterministic: bool = True, precision=None,
           sow_fn=None, custom_attention_fn=None, custom_accepts_is_causal: bool = False,
           implementation=None, interpret: bool = False, sliding_window=None,
           logits_soft_cap=None, cache_empty: bool = False):
  """One attention step on projected heads.

  Args:
    query: ``[B, T, N, H]``; key, value: ``[B, S, K, H]`` (``S == T`` with a cache).
    cache: a one-layer ``KVCache``. Given, the new k/v (after RoPE) are appended with
      ``cache.append(k, v, num_new)`` and the queries attend over the whole cache at absolute
      positions (``q_offset = old lengths``, ``kv_lengths = new lengths``, always causal).
    positions: ``int32[B, T]`` absolute positions for RoPE; default ``old_lengths[:, None] +
      arange(T)`` with a cache, ``arange(T)`` without (keys then use ``arange(S)`` unless
      ``S == T``, when they share the queries' positions).
    num_new: ``int32[B]`` valid new tokens per row (right padding), default ``T``.
    mask: explicit bool/{0,1} mask broadcastable to ``[B, N, T, S]`` (``S`` = the cache's
      ``max_length`` with a cache); AND-ed with the causal / cache-length visibility. Forces the
      XLA path.
    is_causal: causal masking without a cache (bottom-right aligned: ``q_offset = S - T``).
    rope_theta: rotary base, or None for no rotary embedding.
    scale: logit scale (default ``1/sqrt(H)``).
    dropout_rng, dropout_rate, broadcast_dropout, deterministic: attention dropout (XLA path).
    precision: einsum precision of the XLA path.
    sow_fn: if given, the attention weights are computed (XLA path) and passed to it.
    custom_attention_fn: ``fn(q, k, v, mask=bool[B, 1|N, T, S] | None, is_causal=bool) ->
      [B, T, N, H]``: a user-supplied ``attention_fn`` (bound to the module's dropout settings
      by the caller). It gets ``is_causal=True, mask=None`` for plain square causal attention
      when ``custom_accepts_is_causal``, else the full visibility mask and ``is_causal=False``.
    custom_accepts_is_causal: whether ``custom_attention_fn`` honours ``is_causal``.
    implementation, interpret: passed to ``gqa_attention`` / ``gqa_decode``.
    sliding_window, logits_soft_cap: as in ``gqa_attention`` (a window needs causal attention:
      ``is_causal`` or a cache).
    cache_empty: static: the cache holds no token yet (one fresh from ``KVCache.init``, as in
      ``generate``'s prefill). The new tokens then attend to themselves alone, top-left
      (``q_offset=0``): the same keys as over the cache, in a form every backend runs (cuDNN's
      too). Checked where the lengths are known; under ``jit`` a row that does hold tokens
      outputs NaN instead of a wrong value.

  Returns:
    ``(out [B, T, N, H] in query's dtype, new_cache or None)``.
  """
  b, t = query.shape[:2]
  s_in = key.shape[1]
  if cache is not None:
    if not isinstance(cache, KVCache):
      raise TypeError(f"cache must be a gqa_pallas.KVCache; got {type(cache).__name__}.")
    if cache.num_layers is not None:
      raise ValueError("an attention layer takes one layer's KVCache; index a stacked cache "
                       "with cache.layer(i) or scan over its leading axis.")
    if s_in != t:
      raise ValueError(f"with a KV cache the new keys must be the new tokens: inputs_k length "
                       f"{s_in} != inputs_q length {t}.")
    if (cache.batch, cache.num_kv_heads, cache.head_dim) != (b, key.shape[2], key.shape[3]):
      raise ValueError(
          "Autoregressive cache shape error: the cache holds [B, S, K, H] = "
          f"{tuple(cache.k.shape)}, the new keys are {tuple(key.shape)}.")
    validation.check_flags(cache_empty=cache_empty)
    if cache_empty and not isinstance(cache.lengths, jax.core.Tracer) and np.any(
        np.asarray(cache.lengths) != 0):
      raise ValueError(f"cache_empty=True, but the cache holds tokens: lengths "
                       f"{np.asarray(cache.lengths).tolist()}.")
  elif num_new is not None:
    raise ValueError("num_new only applies with a KV cache.")

  if rope_theta is not None:
    start = cache.lengths if cache is not None else None
    q_pos = (default_positions(b, t, start) if positions is None else
             _check_positions(positions, b, t))
    k_pos = q_pos if s_in == t else default_positions(b, s_in)
    query = apply_rotary_embedding(query, q_pos, theta=rope_theta)
    key = apply_rotary_embedding(key, k_pos, theta=rope_theta)
  elif positions is not None:
    _check_positions(positions, b, t)

  dropping = dropout_rate > 0.0 and not deterministic
  out_dtype = query.dtype
  sliding_window, logits_soft_cap = validation.check_window_and_cap(
      sliding_window, logits_soft_cap, causal=is_causal or cache is not None)
  features = dict(sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
  if cache is not None:
    old_lengths = cache.lengths
    new_cache = cache.append(key, value, num_new, implementation=implementation,
                             interpret=interpret)
    keys, values = new_cache.k, new_cache.v
    # Attention runs in the cache's dtype (the cache is the stored state).
    query = query.astype(keys.dtype)
    q_offset, kv_lengths, causal = old_lengths, new_cache.lengths, True
  else:
    new_cache = None
    keys, values = key, value
    q_offset, kv_lengths, causal = None, None, is_causal

  s = keys.shape[1]
  if custom_attention_fn is not None and cache is None and mask is None and (
      not causal or (t == s and custom_accepts_is_causal)) and sliding_window is None and (
          logits_soft_cap is None):
    out = custom_attention_fn(query, keys, values, mask=None, is_causal=causal)
    return out.astype(out_dtype), new_cache

  fast = (custom_attention_fn is None and mask is None and not dropping and sow_fn is None and
          kernel_dtype_ok(query, keys, values))
  if fast:
    common = dict(scale=scale, implementation=implementation, interpret=interpret, **features)
    if cache is None:
      out = gqa_api.gqa_attention(query, keys, values, causal=causal, **common)
    elif cache_empty:
      # The prompt over itself: the new tokens are all the cache holds, from position 0.
      out = gqa_api.gqa_attention(query, key.astype(keys.dtype), value.astype(values.dtype),
                                  causal=True, q_offset=0, kv_lengths=kv_lengths, **common)
      out = jnp.where((old_lengths == 0)[:, None, None, None], out, jnp.nan)
    elif t == 1 and sliding_window is None:
      # One token per row: q_offset = old lengths sees the same keys (j < new lengths) as the
      # default new lengths - 1, which a kernel derives itself (and cuDNN can express).
      out = gqa_api.gqa_decode(query, new_cache, **common)
    elif t <= DECODE_MAX_NEW_TOKENS:
      out = gqa_api.gqa_decode(query, new_cache, q_offset=q_offset, **common)
    else:
      out = gqa_api.gqa_attention(query, keys, values, causal=True, q_offset=q_offset,
                                  kv_lengths=kv_lengths, **common)
    return out.astype(out_dtype), new_cache

  if cache is None and not causal:
    visible = None
  else:
    if q_offset is None:
      q_offset = jnp.full((b,), s - t, jnp.int32)
    if kv_lengths is None:
      kv_lengths = jnp.full((b,), s, jnp.int32)
    visible = reference.visibility_mask(t, s, q_offset, kv_lengths, causal,
                                        sliding_window)[:, None]
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask if mask.dtype == jnp.bool_ else mask != 0
    visible = mask if visible is None else (visible & mask)
  if custom_attention_fn is not None:
    if logits_soft_cap is not None:
      raise ValueError("logits_soft_cap cannot be applied around a custom attention_fn (it sees "
                       "q, k, v, not the logits); apply the cap inside that function.")
    if visible is not None:
      visible = jnp.broadcast_to(visible, (b,) + visible.shape[1:])
    out = custom_attention_fn(query, keys, values, mask=visible, is_causal=False)
  else:
    out = masked_attention(query, keys, values, mask=visible, scale=scale,
                           kv_lengths=None if cache is None else kv_lengths,
                           dropout_rng=dropout_rng, dropout_rate=dropout_rate,
                           broadcast_dropout=broadcast_dropout, deterministic=not dropping,
                           precision=precision, sow_fn=sow_fn, logits_soft_cap=logits_soft_cap)
  return out.astype(out_dtype), new_cache


# --------------------------------------------------------------------------------------------
# attention_fn for Flax's own attention modules.
# --------------------------------------------------------------------------------------------


def gqa_dot_product_attention(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                              dropout_rng=None, dropout_rate=0.0, deterministic=False,
                              dtype=None, precision=None, module=None,
                              force_fp32_for_softmax=False, is_causal=False, promote_dtype=None,
                              qk_attn_weights_einsum=None, attn_weights_value_einsum=None, *,
                              scale=None, implementation=None, interpret=False):
  """An ``attention_fn`` for ``nn.MultiHeadDotProductAttention`` and ``nnx.MultiHeadAttention``.

  Same arguments and result as ``flax.linen.dot_product_attention`` /
  ``flax.nnx.dot_product_attention`` (every keyword either Flax API passes is named here: linen
  filters keywords by name, NNX passes them all). Runs the ``gqa_pallas`` kernel when it can:
  no ``bias``, no ``mask`` (``is_causal`` is fine), no active dropout, no sown weights
  (``module``), no custom einsums, a bfloat16/float16/float32 dtype. Otherwise an XLA path with
  the same semantics (mask, bias, dropout and sown weights as Flax's).

  Differences from Flax's functions, all documented in docs/flax.md:
    * K/V may have fewer heads than Q (``N % K == 0``, grouped-query attention) also under linen.
    * Softmax and accumulation are always float32 (``force_fp32_for_softmax`` is implied).
    * A query row whose mask hides every key outputs 0 (Flax averages all values there).
    * ``is_causal`` is top-left aligned as in ``jax.nn.dot_product_attention`` / NNX: query ``t``
      sees keys ``j <= t`` (equal to the ordinary causal mask when ``T == S``).

  Bind ``implementation``/``interpret``/``scale`` with ``functools.partial``, e.g.
  ``attention_fn=functools.partial(gqa_dot_product_attention, implementation="xla")``.

  Returns:
    ``[batch..., q_length, num_heads, v_depth_per_head]``.
  """
  del force_fp32_for_softmax  # always float32
  if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
    if query.shape[-2] != key.shape[-2]:
      raise NotImplementedError("custom attention einsums (AQT) need num_kv_heads == num_heads.")
    from flax import linen as nn  # pylint: disable=g-import-not-at-top
    return nn.dot_product_attention(
        query, key, value, bias=bias, mask=mask, broadcast_dropout=broadcast_dropout,
        dropout_rng=dropout_rng, dropout_rate=dropout_rate, deterministic=deterministic,
        dtype=dtype, precision=precision, module=module,
        qk_attn_weights_einsum=qk_attn_weights_einsum,
        attn_weights_value_einsum=attn_weights_value_einsum)
  if promote_dtype is not None:
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
  elif dtype is not None:
    query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
  else:
    dt = jnp.result_type(query, key, value)
    query, key, value = (jnp.asarray(x, dt) for x in (query, key, value))
  if query.ndim != key.ndim or key.shape != value.shape:
    raise ValueError(f"q, k, v must have the same rank and k, v the same shape; got "
                     f"{query.shape}, {key.shape}, {value.shape}.")
  if query.ndim < 3:
    raise ValueError(f"query must be [batch..., length, heads, depth]; got {query.shape}.")
  batch_shape = query.shape[:-3]
  if key.shape[:-3] != batch_shape:
    raise ValueError(f"q, k, v batch dims must match, but got shapes {query.shape}, {key.shape}.")
  q4 = query.reshape((math.prod(batch_shape),) + query.shape[-3:])
  k4 = key.reshape((math.prod(batch_shape),) + key.shape[-3:])
  v4 = value.reshape((math.prod(batch_shape),) + value.shape[-3:])
  b, t = q4.shape[:2]
  s = k4.shape[1]
  dropping = dropout_rate > 0.0 and not deterministic
  if (bias is None and mask is None and not dropping and module is None and
      kernel_dtype_ok(q4, k4, v4)):
    q_offset = jnp.zeros((b,), jnp.int32) if is_causal else None
    out = gqa_api.gqa_attention(q4, k4, v4, causal=is_causal, q_offset=q_offset, scale=scale,
                                implementation=implementation, interpret=interpret)
  else:
    mask4 = _flatten_bcast(mask, batch_shape, 3)
    bias4 = _flatten_bcast(bias, batch_shape, 3)
    if is_causal:
      causal = reference.visibility_mask(t, s, jnp.zeros((b,), jnp.int32),
                                         jnp.full((b,), s, jnp.int32), True)[:, None]
      mask4 = causal if mask4 is None else (causal & (mask4.astype(jnp.bool_)))
    out = masked_attention(q4, k4, v4, mask=mask4, bias=bias4, scale=scale,
                           dropout_rng=dropout_rng, dropout_rate=dropout_rate,
                           broadcast_dropout=broadcast_dropout, deterministic=not dropping,
                           precision=precision, sow_fn=sow_fn_for(module))
  return out.reshape(query.shape[:-1] + (value.shape[-1],))


# --------------------------------------------------------------------------------------------
# Helpers shared by the two modules.
# --------------------------------------------------------------------------------------------


def flatten_batch(inputs_q, inputs_k, inputs_v, mask, positions, *, need_single_batch: bool):
  """Folds Flax's ``[batch..., length, features]`` into one batch axis.

  Returns ``(batch_shape, q, k, v, mask, positions)`` with ``q/k/v [B, L, D]``, ``mask [B, A, T,
  S]`` or None and ``positions [B, T]`` or None. ``need_single_batch`` (cache modes): exactly one
  batch axis is required, since the cache is ``[B, S, K, H]``.
  """
  if inputs_q.ndim < 2:
    raise ValueError(f"inputs_q must be [batch..., length, features]; got {inputs_q.shape}.")
  batch_shape = tuple(inputs_q.shape[:-2])
  for name, x in (("inputs_k", inputs_k), ("inputs_v", inputs_v)):
    if tuple(x.shape[:-2]) != batch_shape:
      raise ValueError(f"{name} batch dims {x.shape[:-2]} differ from inputs_q's {batch_shape}.")
  if need_single_batch and len(batch_shape) != 1:
    raise ValueError("with a KV cache (decode=True or cache=...) inputs must be [B, T, features];"
                     f" got inputs_q of shape {inputs_q.shape}.")
  if len(batch_shape) == 1:
    return batch_shape, inputs_q, inputs_k, inputs_v, mask, positions
  bflat = math.prod(batch_shape)
  fold = lambda x: x.reshape((bflat,) + x.shape[-2:])
  mask = _flatten_bcast(mask, batch_shape, 3)
  if positions is not None:
    positions = jnp.asarray(positions)
    if positions.ndim > 1:
      positions = jnp.broadcast_to(positions, batch_shape + positions.shape[-1:]).reshape(
          (bflat, positions.shape[-1]))
  return batch_shape, fold(inputs_q), fold(inputs_k), fold(inputs_v), mask, positions


def unflatten_batch(y, batch_shape):
  return y.reshape(batch_shape + y.shape[1:])
