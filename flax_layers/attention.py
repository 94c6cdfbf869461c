"""``GQAAttention`` (linen) and ``GQAAttentionNNX``: grouped-query attention layers for Flax.

Both are supersets of Flax's multi-head attention (``nn.MultiHeadDotProductAttention`` and
``nnx.MultiHeadAttention``): same attribute names, defaults, parameter names and shapes
(``query (D, N, H)``, ``key``/``value (D, K, H)``, ``out (N, H, D)``), so a Flax checkpoint with
``K == N`` loads unchanged. They add ``num_kv_heads``, ``head_dim``, ``use_out_bias``,
``rope_theta``, ``is_causal``, ``scale``, ``implementation`` and ``interpret``, and three ways to run:

1. plain call: full-sequence attention, causal through the kernel without building a mask when
   ``is_causal=True``; an explicit ``mask`` (or active dropout, or ``sow_weights``) falls back to
   an XLA path with the same semantics;
2. ``decode=True``: Flax's ``'cache'`` collection (``cached_key``/``cached_value [B, S, K, H]``,
   ``cache_index int32[B]``, one position per row), one or several new tokens per call;
3. functional: ``layer(x, cache=KVCache) -> (y, new_cache)`` for explicit state in ``jax.jit``
   loops with buffer donation.

The projections live here; RoPE, the cache step and the attention routing are in ``core.py``.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.linen import initializers as linen_init
from flax.linen.linear import default_kernel_init
from flax.nnx.module import first_from

from flax_layers import core
from gqa_pallas.cache import KVCache

Array = jax.Array


def _warn_inputs_kv():
  warnings.warn("The inputs_kv arg will be deprecated soon. Use inputs_k and inputs_v instead. "
                "See https://github.com/google/flax/discussions/3389 for more information.",
                DeprecationWarning, stacklevel=3)


class GQAAttention(nn.Module):
  """Grouped-query attention; a drop-in superset of ``flax.linen.MultiHeadDotProductAttention``.

  Attributes shared with Flax's ``MultiHeadDotProductAttention`` (same names and defaults):
    num_heads: number of query heads ``N``.
    dtype: computation dtype (None: inferred from inputs and params).
    param_dtype: parameter dtype.
    qkv_features: ``N * head_dim`` (default: the input feature size), as in Flax.
    out_features: output features (default: the input feature size).
    broadcast_dropout, dropout_rate, deterministic: attention-weight dropout (XLA path).
    precision: for the projections and the XLA attention path.
    kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias: as Flax.
    attention_fn: None (default): the ``gqa_pallas`` kernel when possible, XLA otherwise. A Flax
      ``attention_fn`` (``nn.dot_product_attention`` or compatible) is called as Flax calls it.
    decode: use Flax's ``'cache'`` collection (see the class docstring of the module file).
    normalize_qk: LayerNorm on q and k (``query_ln``, ``key_ln``), as Flax.
    force_fp32_for_softmax: accepted for compatibility; softmax is always float32 here.
    qkv_dot_general, out_dot_general, qkv_dot_general_cls, out_dot_general_cls: as Flax.

  Additions:
    num_kv_heads: number of key/value heads ``K`` (``N % K == 0``); None: ``N`` (plain MHA).
    head_dim: per-head size ``H`` (HF ``config.head_dim``); None: ``qkv_features // N``.
    use_out_bias: bias on the output projection; None: ``use_bias`` (Qwen2: ``use_bias=True,
      use_out_bias=False``).
    rope_theta: rotary embedding base (HF Llama ``rotate_half`` convention); None: no RoPE.
    is_causal: causal self-attention for the plain call (bottom-right aligned when the key is
      longer than the query). With a cache, attention is always causal at absolute positions.
    scale: logit scale; None: ``1/sqrt(head_dim)``.
    implementation: ``"triton"``, ``"xla"`` or None (fastest available), passed to the kernels.
    interpret: run the Pallas kernels in interpret mode (CPU tests).
    sliding_window: each query sees itself and the ``sliding_window - 1`` keys before it (needs
      causal attention: ``is_causal`` or a cache); None: no window.
    logits_soft_cap: scaled logits become ``cap * tanh(logits / cap)`` (Gemma 2); None: off.

  ``__call__(inputs_q, inputs_k=None, inputs_v=None, *, inputs_kv=None, mask=None,
  deterministic=None, dropout_rng=None, sow_weights=False, positions=None, cache=None,
  num_new=None)`` returns ``y [batch..., T, out_features]``, or ``(y, new_cache)`` when
  ``cache`` (a one-layer ``gqa_pallas.KVCache``) is given.
  """

  num_heads: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  qkv_features: int | None = None
  out_features: int | None = None
  broadcast_dropout: bool = True
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  precision: Any = None
  kernel_init: Callable = default_kernel_init
  out_kernel_init: Callable | None = None
  bias_init: Callable = linen_init.zeros_init()
  out_bias_init: Callable | None = None
  use_bias: bool = True
  attention_fn: Callable[..., Array] | None = None
  decode: bool = False
  normalize_qk: bool = False
  force_fp32_for_softmax: bool = False
  qkv_dot_general: Any = None
  out_dot_general: Any = None
  qkv_dot_general_cls: Any = None
  out_dot_general_cls: Any = None
  # Additions.
  num_kv_heads: int | None = None
  head_dim: int | None = None
  use_out_bias: bool | None = None
  rope_theta: float | None = None
  is_causal: bool = False
  scale: float | None = None
  implementation: str | None = None
  interpret: bool = False
  sliding_window: int | None = None
  logits_soft_cap: float | None = None

  @nn.compact
  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, inputs_kv=None, mask=None,
               deterministic=None, dropout_rng=None, sow_weights=False, positions=None,
               cache: KVCache | None = None, num_new=None, cache_empty: bool = False):
    """Applies grouped-query attention.

    Args:
      inputs_q: ``[batch..., T, features]`` (exactly ``[B, T, features]`` with a cache).
      inputs_k, inputs_v, inputs_kv: as Flax (``inputs_k`` defaults to ``inputs_q``, ``inputs_v``
        to ``inputs_k``; ``inputs_kv`` is deprecated).
      mask: bool/{0,1} mask broadcastable to ``[batch..., N, T, S]`` (``S`` = the cache's
        ``max_length`` with a cache); False = masked. Forces the XLA path.
      deterministic: disables dropout (merged with the attribute, as Flax).
      dropout_rng: dropout key (default ``self.make_rng('dropout')``).
      sow_weights: sow the attention weights into ``'intermediates'`` (XLA path).
      positions: ``int32[B, T]`` absolute positions for RoPE. Default: the cache's lengths plus
        ``arange(T)`` with a cache (functional or ``decode=True``), ``arange(T)`` without.
      cache: a one-layer ``KVCache``: functional mode, returns ``(y, new_cache)``.
      num_new: ``int32[B]`` valid new tokens per row (right padding) with a cache; default ``T``.
      cache_empty: static: ``cache`` holds no token yet (a prefill; see ``core.attend``).

    Returns:
      ``y`` of shape ``[batch..., T, out_features]``, or ``(y, new_cache)`` with ``cache``.
    """
    if inputs_kv is not None:
      _warn_inputs_kv()
    inputs_q, inputs_k, inputs_v = core.resolve_inputs(inputs_q, inputs_k, inputs_v, inputs_kv)
    if cache is not None and self.decode:
      raise ValueError("pass either cache=... (functional mode) or use decode=True (the 'cache' "
                       "collection), not both.")
    use_collection = self.decode and cache is None
    batch_shape, xq, xk, xv, mask, positions = core.flatten_batch(
        inputs_q, inputs_k, inputs_v, mask, positions,
        need_single_batch=cache is not None or use_collection)
    features = self.out_features or inputs_q.shape[-1]
    num_kv_heads, head_dim = core.resolve_head_dims(
        self.num_heads, self.num_kv_heads, self.qkv_features, self.head_dim, inputs_q.shape[-1])

    dense = functools.partial(
        nn.DenseGeneral, axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, bias_init=self.bias_init, use_bias=self.use_bias,
        precision=self.precision, dot_general=self.qkv_dot_general,
        dot_general_cls=self.qkv_dot_general_cls)
    query = dense(features=(self.num_heads, head_dim), name="query")(xq)
    key = dense(features=(num_kv_heads, head_dim), name="key")(xk)
    value = dense(features=(num_kv_heads, head_dim), name="value")(xv)
    if self.normalize_qk:
      query = nn.LayerNorm(name="query_ln", use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype)(query)
      key = nn.LayerNorm(name="key_ln", use_bias=False, dtype=self.dtype,
                         param_dtype=self.param_dtype)(key)

    collection = None
    if use_collection:
      is_initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index",
                                  lambda: jnp.zeros((key.shape[0],), jnp.int32))
      if is_initialized:  # Otherwise (init): allocate, then run the plain path, as Flax does.
        collection = (cached_key, cached_value, cache_index)
        cache = core.cache_from_variables(cached_key.value, cached_value.value,
                                          cache_index.value)

    if self.dropout_rate > 0.0:
      m_deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
      if not m_deterministic and dropout_rng is None:
        dropout_rng = self.make_rng("dropout")
    else:
      m_deterministic = True

    custom, accepts_causal = None, False
    if self.attention_fn is not None:
      params = inspect.signature(self.attention_fn).parameters
      accepts_causal = "is_causal" in params

      def call_attention_fn(q, k, v, *, mask, is_causal):
        kwargs = dict(mask=mask, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
                      broadcast_dropout=self.broadcast_dropout, deterministic=m_deterministic,
                      dtype=self.dtype, precision=self.precision,
                      force_fp32_for_softmax=self.force_fp32_for_softmax, is_causal=is_causal)
        kwargs = {k_: v_ for k_, v_ in kwargs.items() if k_ in params}
        if sow_weights:
          kwargs["module"] = self
        return self.attention_fn(q, k, v, **kwargs)

      custom = call_attention_fn

    x, new_cache = core.attend(
        query, key, value, cache=cache, positions=positions, num_new=num_new, mask=mask,
        is_causal=self.is_causal, rope_theta=self.rope_theta, scale=self.scale,
        dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
        broadcast_dropout=self.broadcast_dropout, deterministic=m_deterministic,
        precision=self.precision, sow_fn=core.sow_fn_for(self) if sow_weights else None,
        custom_attention_fn=custom, custom_accepts_is_causal=accepts_causal,
        implementation=self.implementation, interpret=self.interpret,
        sliding_window=self.sliding_window, logits_soft_cap=self.logits_soft_cap,
        cache_empty=cache_empty)

    if collection is not None:
      cached_key, cached_value, cache_index = collection
      cached_key.value = new_cache.k
      cached_value.value = new_cache.v
      cache_index.value = new_cache.lengths

    out = nn.DenseGeneral(
        features=features, axis=(-2, -1), kernel_init=self.out_kernel_init or self.kernel_init,
        bias_init=self.out_bias_init or self.bias_init,
        use_bias=self.use_bias if self.use_out_bias is None else self.use_out_bias,
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        dot_general=self.out_dot_general, dot_general_cls=self.out_dot_general_cls,
        name="out")(x)
    out = core.unflatten_batch(out, batch_shape)
    if collection is None and cache is not None:
      return out, new_cache
    return out


class GQAAttentionNNX(nnx.Module):
  """The NNX twin of ``GQAAttention``; a superset of ``flax.nnx.MultiHeadAttention``.

  Constructor as ``nnx.MultiHeadAttention`` (``num_heads, in_features, qkv_features=None,
  out_features=None, num_kv_heads=None, in_kv_features=None, *, dtype, param_dtype, ...,
  decode=None, rngs``) plus ``head_dim``, ``use_out_bias``, ``rope_theta``, ``is_causal``,
  ``scale``, ``implementation``, ``interpret``, ``sliding_window``, ``logits_soft_cap``.
  ``attention_fn=None`` (default) routes to the
  ``gqa_pallas`` kernels; a Flax NNX ``attention_fn`` is called with every keyword NNX passes.

  Cache: ``init_cache(input_shape, dtype)`` allocates ``nnx.Cache`` variables ``cached_key``/
  ``cached_value [B, S, K, H]`` and ``cache_index int32[B]``; with ``decode=True`` each call
  appends one or several tokens per row. Or pass ``cache=KVCache`` for the functional mode, which
  returns ``(y, new_cache)`` and leaves the module untouched.
  """

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
               out_features: int | None = None, num_kv_heads: int | None = None,
               in_kv_features: int | None = None, *, head_dim: int | None = None,
               dtype=None, param_dtype=jnp.float32, broadcast_dropout: bool = True,
               dropout_rate: float = 0.0, deterministic: bool | None = None, precision=None,
               kernel_init=nnx.initializers.lecun_normal(), out_kernel_init=None,
               bias_init=nnx.initializers.zeros_init(), out_bias_init=None,
               use_bias: bool = True, use_out_bias: bool | None = None,
               attention_fn: Callable[..., Array] | None = None, decode: bool | None = None,
               normalize_qk: bool = False, rope_theta: float | None = None,
               is_causal: bool = False, scale: float | None = None,
               implementation: str | None = None, interpret: bool = False,
               sliding_window: int | None = None, logits_soft_cap: float | None = None,
               qkv_dot_general=None, out_dot_general=None, qkv_dot_general_cls=None,
               out_dot_general_cls=None, rngs: nnx.Rngs, keep_rngs: bool = True):
    self.num_heads = num_heads
    self.in_features = in_features
    self.qkv_features = qkv_features if qkv_features is not None else in_features
    self.out_features = out_features if out_features is not None else in_features
    self.in_kv_features = in_kv_features if in_kv_features is not None else in_features
    self.num_kv_heads, self.head_dim = core.resolve_head_dims(
        num_heads, num_kv_heads, qkv_features, head_dim, in_features)
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.broadcast_dropout = broadcast_dropout
    self.dropout_rate = dropout_rate
    self.deterministic = deterministic
    self.precision = precision
    self.use_bias = use_bias
    self.use_out_bias = use_bias if use_out_bias is None else use_out_bias
    self.attention_fn = attention_fn
    self.decode = decode
    self.normalize_qk = normalize_qk
    self.rope_theta = rope_theta
    self.is_causal = is_causal
    self.scale = scale
    self.implementation = implementation
    self.interpret = interpret
    self.sliding_window = sliding_window
    self.logits_soft_cap = logits_soft_cap

    linear = functools.partial(
        nnx.LinearGeneral, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
        bias_init=bias_init, use_bias=use_bias, precision=precision,
        dot_general=qkv_dot_general, dot_general_cls=qkv_dot_general_cls, rngs=rngs)
    self.query = linear(in_features, out_features=(num_heads, self.head_dim))
    self.key = linear(self.in_kv_features, out_features=(self.num_kv_heads, self.head_dim))
    self.value = linear(self.in_kv_features, out_features=(self.num_kv_heads, self.head_dim))
    if normalize_qk:
      self.query_ln = nnx.LayerNorm(self.head_dim, use_bias=False, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
      self.key_ln = nnx.LayerNorm(self.head_dim, use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    else:
      self.query_ln = nnx.data(None)
      self.key_ln = nnx.data(None)
    self.out = nnx.LinearGeneral(
        in_features=(num_heads, self.head_dim), out_features=self.out_features, axis=(-2, -1),
        kernel_init=out_kernel_init or kernel_init, bias_init=out_bias_init or bias_init,
        use_bias=self.use_out_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
        dot_general=out_dot_general, dot_general_cls=out_dot_general_cls, rngs=rngs)
    self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None
    self.cached_key = nnx.data(None)
    self.cached_value = nnx.data(None)
    self.cache_index = nnx.data(None)

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None, deterministic=None,
               rngs=None, sow_weights: bool = False, decode: bool | None = None,
               is_causal: bool | None = None, positions=None, cache: KVCache | None = None,
               num_new=None, cache_empty: bool = False):
    """As ``nnx.MultiHeadAttention.__call__`` plus ``positions``, ``cache``, ``num_new``,
    ``cache_empty`` (as in the linen layer).

    ``is_causal`` (None: the constructor's) applies to the plain call; with a cache (``decode``
    or ``cache=``) attention is always causal at absolute positions, so the top-left ``is_causal``
    of ``jax.nn`` never reaches a decode step (google/flax#5591). Returns ``y``, or
    ``(y, new_cache)`` when ``cache`` is given.
    """
    if rngs is None:
      rngs = self.rngs
    elif isinstance(rngs, nnx.Rngs):
      rngs = rngs.dropout
    inputs_q, inputs_k, inputs_v = core.resolve_inputs(inputs_q, inputs_k, inputs_v, None)
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"Incompatible input dimension, got {inputs_q.shape[-1]} but module "
                       f"expects {self.in_features}.")
    decode = first_from(decode, self.decode, False, error_msg="decode")
    if cache is not None and decode:
      raise ValueError("pass either cache=... (functional mode) or use decode=True (the "
                       "init_cache variables), not both.")
    use_collection = bool(decode) and cache is None
    if use_collection and (self.cached_key is None or self.cache_index is None):
      raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
    batch_shape, xq, xk, xv, mask, positions = core.flatten_batch(
        inputs_q, inputs_k, inputs_v, mask, positions,
        need_single_batch=cache is not None or use_collection)

    query, key, value = self.query(xq), self.key(xk), self.value(xv)
    if self.normalize_qk:
      query, key = self.query_ln(query), self.key_ln(key)

    if use_collection:
      cache = core.cache_from_variables(self.cached_key[...], self.cached_value[...],
                                        self.cache_index[...])

    if self.dropout_rate > 0.0:
      deterministic = first_from(deterministic, self.deterministic,
                                 error_msg="No `deterministic` argument was provided to "
                                 "GQAAttentionNNX as either a __call__ argument or attribute.")
      if not deterministic:
        if rngs is None:
          raise ValueError("'rngs' must be provided to __call__ method if GQAAttentionNNX "
                           "instance is defined with keep_rngs=False.")
        dropout_rng = rngs()
      else:
        dropout_rng = None
    else:
      deterministic, dropout_rng = True, None

    custom = None
    if self.attention_fn is not None:

      def call_attention_fn(q, k, v, *, mask, is_causal):
        return self.attention_fn(q, k, v, mask=mask, dropout_rng=dropout_rng,
                                 dropout_rate=self.dropout_rate,
                                 broadcast_dropout=self.broadcast_dropout,
                                 deterministic=deterministic, dtype=self.dtype,
                                 precision=self.precision,
                                 module=self if sow_weights else None, is_causal=is_causal)

      custom = call_attention_fn

    x, new_cache = core.attend(
        query, key, value, cache=cache, positions=positions, num_new=num_new, mask=mask,
        is_causal=self.is_causal if is_causal is None else is_causal,
        rope_theta=self.rope_theta, scale=self.scale, dropout_rng=dropout_rng,
        dropout_rate=self.dropout_rate, broadcast_dropout=self.broadcast_dropout,
        deterministic=deterministic, precision=self.precision,
        sow_fn=core.sow_fn_for(self) if sow_weights else None, custom_attention_fn=custom,
        custom_accepts_is_causal=True, implementation=self.implementation,
        interpret=self.interpret, sliding_window=self.sliding_window,
        logits_soft_cap=self.logits_soft_cap, cache_empty=cache_empty)

    if use_collection:
      self.cached_key[...] = new_cache.k
      self.cached_value[...] = new_cache.v
      self.cache_index[...] = new_cache.lengths
    out = core.unflatten_batch(self.out(x), batch_shape)
    if cache is not None and not use_collection:
      return out, new_cache
    return out

  def init_cache(self, input_shape, dtype=jnp.float32):
    """Allocates the decode cache for inputs of shape ``[B, max_length, features]``.

    ``cached_key``/``cached_value`` are ``nnx.Cache`` ``[B, max_length, K, H]`` in ``dtype``;
    ``cache_index`` is ``int32[B]`` (one position per row, unlike Flax's scalar).
    """
    if len(input_shape) != 3:
      raise ValueError(f"init_cache expects [B, max_length, features]; got {input_shape}.")
    shape = (*input_shape[:-1], self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.zeros((input_shape[0],), jnp.int32))

  def kv_cache(self) -> KVCache:
    """The decode cache as a ``KVCache`` (after ``init_cache``)."""
    if self.cached_key is None:
      raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
    return core.cache_from_variables(self.cached_key[...], self.cached_value[...],
                                     self.cache_index[...])

  def set_view(self, deterministic: bool | None = None, decode: bool | None = None,
               batch_size: int | None = None, max_length: int | None = None):
    """Used by ``nnx.view``, as ``nnx.MultiHeadAttention.set_view``."""
    if deterministic is not None:
      self.deterministic = deterministic
    if decode is not None:
      self.decode = decode
      if decode and self.cached_key is None:
        if batch_size is None or max_length is None:
          raise TypeError("'batch_size' and 'max_length' must be provided to initialize the "
                          "cache.")
        dtype = self.dtype if self.dtype is not None else self.param_dtype
        self.init_cache((batch_size, max_length, self.in_features), dtype)


NNXGQAAttention = GQAAttentionNNX
