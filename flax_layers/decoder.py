"""A Llama / Qwen2 / Mistral-style decoder built on ``GQAAttention``.

Each block is ``RMSNorm -> GQAAttention (RoPE) -> residual -> RMSNorm -> SwiGLU MLP -> residual``;
then a final RMSNorm and the LM head (or the transposed embedding when tied). The layers are stacked
in one of two ways (``DecoderConfig.scan_layers``):

* ``False`` (default): an explicit Python loop over blocks ``layers_0``, ``layers_1``, ... and a
  tuple of per-layer ``KVCache``s. Each layer's cache is its own buffer, updated in place inside the
  ``while_loop`` and read in place by the decode kernel. A layer-stacked ``KVCache`` is accepted too
  (sliced per layer and re-stacked).
* ``True``: ``nn.scan`` over one block; parameters get a leading layer axis and the cache is one
  ``KVCache`` with a leading layer axis. Compiles in time independent of depth, but the scan
  copies the whole cache through its inputs/outputs at every step.

Measured on CPU (``docs/models.md``): a decode step of the loop is 1.4x (short cache) to 3.3x
(8k-slot cache) faster than the scan; the scan compiles faster for deep models. Generation is
dominated by decode steps, so the loop is the default.

``stack_layer_params`` / ``unstack_layer_params`` convert parameters between the two layouts.

Parameter tree (scan layout; the loop layout has ``layers_{i}`` without the leading ``L``; ``L``
layers, ``D`` hidden, ``N``/``K`` heads, ``H`` head dim)::

  embed/embedding                      [V, D]
  layers/input_norm/scale              [L, D]
  layers/attn/{query,key,value}/kernel [L, D, N|K, H]   (bias [L, N|K, H] when attention_bias)
  layers/attn/out/kernel               [L, N, H, D]     (bias [L, D] when attention_out_bias)
  layers/post_attention_norm/scale     [L, D]
  layers/mlp/{gate,up}/kernel          [L, D, I]
  layers/mlp/down/kernel               [L, I, D]
  final_norm/scale                     [D]
  lm_head/kernel                       [D, V]           (absent when tie_word_embeddings)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_layers.attention import GQAAttention
from gqa_pallas import reference, validation
from gqa_pallas.cache import KVCache

_DTYPES = ("float32", "bfloat16", "float16")


def _dtype_name(d) -> str:
  name = jnp.dtype(d).name
  if name not in _DTYPES:
    raise ValueError(f"dtype must be one of {_DTYPES}; got {d!r}.")
  return name


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a Llama / Qwen2 / Mistral decoder (hashable: usable as a static jit argument).

  Attributes:
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads: sizes.
    head_dim: per-head size; ``None`` means ``hidden_size // num_heads`` (it may differ from it).
    rope_theta: RoPE base (HF Llama half-split RoPE).
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: the LM head is the transposed token embedding.
    attention_bias: biases on the q/k/v projections (Qwen2; Llama with ``attention_bias=True``).
    attention_out_bias: bias on the output projection (Llama ``attention_bias=True``; not Qwen2).
    mlp_bias: biases on the MLP projections (Llama ``mlp_bias``).
    max_position_embeddings: longest sequence (prompt + generated) the model accepts.
    sliding_window: the attention window (a query sees itself and the ``sliding_window - 1``
      tokens before it; Mistral, Qwen2 ``use_sliding_window``) of every layer, or of the
      ``"sliding_attention"`` layers of ``layer_types``; None: none.
    layer_types: per layer ``"sliding_attention"`` or ``"full_attention"`` (Hugging Face's
      ``layer_types``); None: every layer slides when ``sliding_window`` is set. Layers of
      different types cannot be stacked under ``scan_layers``.
    logits_soft_cap: attention logit soft-cap (``cap * tanh(s / cap)``); None: off.
    family: ``"llama"`` (Llama, Qwen2, Mistral: SwiGLU, pre-norm blocks) or ``"gemma2"``
      (Gemma 2: embeddings times ``sqrt(hidden_size)``, RMSNorm scaled by ``1 + weight``, norms
      before and after both attention and MLP, GeGLU with tanh-approximate GELU).
    query_pre_attn_scalar: attention scale ``query_pre_attn_scalar ** -0.5`` (Gemma 2); None:
      ``head_dim ** -0.5``.
    final_logit_soft_cap: soft-cap of the output logits (Gemma 2); None: off.
    dtype: compute dtype name; param_dtype: parameter dtype name.
    scan_layers: stack the layers with ``nn.scan`` instead of the default explicit loop.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: Optional[int] = None
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  attention_out_bias: bool = False
  mlp_bias: bool = False
  max_position_embeddings: int = 2048
  sliding_window: Optional[int] = None
  layer_types: Optional[Tuple[str, ...]] = None
  logits_soft_cap: Optional[float] = None
  family: str = "llama"
  query_pre_attn_scalar: Optional[float] = None
  final_logit_soft_cap: Optional[float] = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"DecoderConfig.{name} must be a positive int; got {value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")
    head_dim = self.head_dim
    if head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads="
                         f"{self.num_heads}; give head_dim explicitly.")
      head_dim = self.hidden_size // self.num_heads
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
      raise ValueError(f"head_dim must be a positive even int (RoPE); got {head_dim!r}.")
    object.__setattr__(self, "head_dim", head_dim)
    if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or isinstance(
        self.sliding_window, bool) or self.sliding_window <= 0):
      raise ValueError(f"DecoderConfig.sliding_window must be a positive int or None; got "
                       f"{self.sliding_window!r}.")
    for name in ("logits_soft_cap", "query_pre_attn_scalar", "final_logit_soft_cap"):
      value = getattr(self, name)
      if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
          raise ValueError(f"DecoderConfig.{name} must be a positive float or None; got "
                           f"{value!r}.")
        object.__setattr__(self, name, float(value))
    if self.family not in ("llama", "gemma2"):
      raise ValueError(f"DecoderConfig.family must be 'llama' or 'gemma2'; got {self.family!r}.")
    if self.layer_types is not None:
      types = tuple(self.layer_types)
      if len(types) != self.num_layers or not set(types) <= {"sliding_attention",
                                                              "full_attention"}:
        raise ValueError(f"DecoderConfig.layer_types must give 'sliding_attention' or "
                         f"'full_attention' for each of the {self.num_layers} layers; got "
                         f"{self.layer_types!r}.")
      if "sliding_attention" in types and self.sliding_window is None:
        raise ValueError("DecoderConfig.layer_types has sliding_attention layers but "
                         "sliding_window is None.")
      if self.scan_layers and len(set(types)) > 1:
        raise ValueError("scan_layers=True stacks identical layers; layer_types mixes sliding "
                         "and full attention (use the default loop layout).")
      object.__setattr__(self, "layer_types", types)
    object.__setattr__(self, "rope_theta", float(self.rope_theta))
    object.__setattr__(self, "rms_norm_eps", float(self.rms_norm_eps))
    object.__setattr__(self, "dtype", _dtype_name(self.dtype))
    object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def max_sequence_length(self) -> int:
    """Longest sequence the model runs: ``max_position_embeddings`` (a window does not cap it)."""
    return self.max_position_embeddings

  @property
  def attention_scale(self) -> Optional[float]:
    return None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar ** -0.5

  def window_of(self, layer: int) -> Optional[int]:
    """The attention window of layer ``layer`` (None: full causal attention)."""
    if self.layer_types is not None and self.layer_types[layer] == "full_attention":
      return None
    return self.sliding_window

  def replace(self, **changes) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)

  def check_sequence_length(self, length: int, what: str = "sequence") -> None:
    """Refuses lengths the model cannot run exactly (a ``ValueError`` that says why)."""
    if length > self.max_position_embeddings:
      raise ValueError(f"{what} length {length} exceeds max_position_embeddings "
                       f"({self.max_position_embeddings}).")


_INIT = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
  """HF ``LlamaRMSNorm``: the variance in float32, then ``scale * x.astype(dtype)``; with
  ``offset`` HF ``Gemma2RMSNorm``: ``(1 + scale) * x`` all in float32, then cast."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  offset: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    if self.offset:
      return (y * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
    return scale.astype(self.dtype) * y.astype(self.dtype)


class MLP(nn.Module):
  """SwiGLU ``down(silu(gate(x)) * up(x))``; Gemma 2: GeGLU with tanh-approximate GELU."""
  config: DecoderConfig
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = functools.partial(nn.Dense, use_bias=cfg.mlp_bias, dtype=cfg.compute_dtype,
                              param_dtype=cfg.params_dtype, precision=self.precision,
                              kernel_init=_INIT)
    gate = dense(cfg.intermediate_size, name="gate")(x)
    up = dense(cfg.intermediate_size, name="up")(x)
    act = (functools.partial(nn.gelu, approximate=True) if cfg.family == "gemma2" else nn.silu)
    return dense(cfg.hidden_size, name="down")(act(gate) * up)


class DecoderBlock(nn.Module):
  """One pre-norm block. ``__call__(x, cache, positions, num_new) -> (x, new_cache)``.

  ``layer``: its index (it picks the layer's attention window, ``config.window_of``);
  ``cache_empty``: the cache holds no token yet (``Decoder.__call__``).
  """
  config: DecoderConfig
  implementation: Optional[str] = None
  interpret: bool = False
  precision: Any = None
  layer: int = 0
  cache_empty: bool = False

  @nn.compact
  def __call__(self, x, cache, positions, num_new):
    cfg = self.config
    gemma = cfg.family == "gemma2"
    norm = functools.partial(RMSNorm, epsilon=cfg.rms_norm_eps, dtype=cfg.compute_dtype,
                             param_dtype=cfg.params_dtype, offset=gemma)
    attn = GQAAttention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        qkv_features=cfg.num_heads * cfg.head_dim, out_features=cfg.hidden_size,
        use_bias=cfg.attention_bias, use_out_bias=cfg.attention_out_bias,
        rope_theta=cfg.rope_theta, is_causal=True, scale=cfg.attention_scale,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype, precision=self.precision, kernel_init=_INIT,
        implementation=self.implementation, interpret=self.interpret,
        sliding_window=cfg.window_of(self.layer), logits_soft_cap=cfg.logits_soft_cap,
        name="attn")
    h = norm(name="input_norm")(x)
    if cache is None:
      a, new_cache = attn(h, positions=positions), None
    else:
      a, new_cache = attn(h, positions=positions, cache=cache, num_new=num_new,
                          cache_empty=self.cache_empty)
    mlp = MLP(cfg, precision=self.precision, name="mlp")
    if gemma:  # norms after attention and after the MLP too
      x = x + norm(name="post_attention_norm")(a)
      x = x + norm(name="post_feedforward_norm")(mlp(norm(name="pre_feedforward_norm")(x)))
    else:
      x = x + a
      x = x + mlp(norm(name="post_attention_norm")(x))
    return x, new_cache


CacheLike = Union[KVCache, Sequence[KVCache], None]


class Decoder(nn.Module):
  """A causal LM: token embedding, ``config.num_layers`` blocks, final norm, LM head.

  ``Decoder(config).apply({"params": params}, tokens)`` with ``tokens int32[B, T]`` returns the
  logits ``[B, T, vocab]`` of a full causal forward (no cache).

  With a cache (``init_cache``): ``apply(..., tokens, cache=cache, num_new=num_new)`` returns
  ``(logits, new_cache)``; row ``b``'s first ``num_new[b]`` tokens (right-padded, default all ``T``)
  are appended to its cache at its own offset and attend to everything the row held before.

  Attributes:
    config: the architecture.
    implementation: attention backend (``None``: kernels on a GPU, XLA on CPU; ``"triton"``;
      ``"xla"``).
    interpret: run the Pallas kernels in interpret mode (CPU testing).
    precision: matmul precision for the projections (e.g. ``"highest"`` for float32 parity on GPU).
  """
  config: DecoderConfig
  implementation: Optional[str] = None
  interpret: bool = False
  precision: Any = None

  @nn.compact
  def __call__(self, tokens, positions=None, cache: CacheLike = None, num_new=None,
               logits_index=None, cache_empty: bool = False):
    """Runs the model.

    Args:
      tokens: ``int32[B, T]``.
      positions: ``int32[B, T]`` absolute positions (RoPE); default: each row's cache length plus
        ``arange(T)`` (``arange(T)`` without a cache).
      cache: ``None``, a layer-stacked ``KVCache`` (``scan_layers``) or a sequence of per-layer
        caches (loop layout; a stacked cache is accepted there too).
      num_new: ``int32[B]`` valid (right-padded) tokens per row, with a cache.
      logits_index: ``int32[B]``: return only the logits at this index of each row, ``[B, V]``
        (the prefill of a generation loop needs only the last prompt token's logits).
      cache_empty: static: the cache holds no token yet (``generate``'s prefill of a cache it
        made): the prompt attends to itself, in a form every backend runs (cuDNN's too).

    Returns:
      logits ``[B, T, V]`` (or ``[B, V]``), and the new cache when a cache was given.
    """
    cfg = self.config
    validation.check_flags(cache_empty=cache_empty)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be int32[B, T]; got shape {tokens.shape}.")
    b, t = tokens.shape
    if cache is None:
      cfg.check_sequence_length(t)
    if positions is None:
      base = jnp.zeros((b,), jnp.int32) if cache is None else _cache_lengths(cache)
      positions = base[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                     param_dtype=cfg.params_dtype, embedding_init=_INIT, name="embed")
    x = embed(tokens)
    if cfg.family == "gemma2":  # HF rounds the normaliser to the compute dtype first
      x = x * jnp.asarray(cfg.hidden_size ** 0.5, cfg.compute_dtype)
    block_kw = dict(config=cfg, implementation=self.implementation, interpret=self.interpret,
                    precision=self.precision, cache_empty=cache_empty and cache is not None)
    if cfg.scan_layers:
      if cache is not None and not (isinstance(cache, KVCache) and cache.num_layers is not None):
        raise ValueError("scan_layers=True needs a layer-stacked KVCache (init_cache or "
                         "KVCache.init(..., num_layers=L)).")
      if cache is not None and cache.num_layers != cfg.num_layers:
        raise ValueError(f"the cache has {cache.num_layers} layers; the model has "
                         f"{cfg.num_layers}.")
      stack = nn.scan(DecoderBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.num_layers)
      x, new_cache = stack(**block_kw, name="layers")(x, cache, positions, num_new)
    else:
      stacked = isinstance(cache, KVCache)
      if cache is not None:
        n = cache.num_layers if stacked else len(cache)
        if n != cfg.num_layers:
          raise ValueError(f"the cache has {n} layers; the model has {cfg.num_layers}.")
      new_layers = []
      for i in range(cfg.num_layers):
        layer_cache = None if cache is None else (cache.layer(i) if stacked else cache[i])
        x, c = DecoderBlock(**block_kw, layer=i, name=f"layers_{i}")(x, layer_cache, positions,
                                                                    num_new)
        new_layers.append(c)
      if cache is None:
        new_cache = None
      elif stacked:
        new_cache = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *new_layers)
      else:
        new_cache = tuple(new_layers)
    x = RMSNorm(cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                offset=cfg.family == "gemma2", name="final_norm")(x)
    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
    if cfg.tie_word_embeddings:
      logits = jnp.einsum("...d,vd->...v", x, embed.embedding.astype(cfg.compute_dtype),
                          precision=self.precision)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                        param_dtype=cfg.params_dtype, precision=self.precision,
                        kernel_init=_INIT, name="lm_head")(x)
    logits = reference.soft_cap(logits, cfg.final_logit_soft_cap)
    return logits if cache is None else (logits, new_cache)


def _cache_lengths(cache) -> jax.Array:
  if isinstance(cache, KVCache):
    return cache.lengths if cache.num_layers is None else cache.lengths[0]
  return cache[0].lengths


def init_cache(config: DecoderConfig, batch: int, max_length: int, dtype=None) -> CacheLike:
  """An empty KV cache for ``Decoder(config)``: layer-stacked for ``scan_layers``, else a tuple.

  ``dtype`` defaults to the compute dtype. ``max_length`` counts prompt and generated tokens.
  """
  dtype = config.compute_dtype if dtype is None else dtype
  if config.scan_layers:
    return KVCache.init(batch, max_length, config.num_kv_heads, config.head_dim, dtype,
                        num_layers=config.num_layers)
  return tuple(KVCache.init(batch, max_length, config.num_kv_heads, config.head_dim, dtype)
               for _ in range(config.num_layers))


def init_params(config: DecoderConfig, rng=None, batch: int = 1, seq_len: int = 1):
  """Random parameters (normal, std 0.02; norms at one) for ``Decoder(config)``."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  tokens = jnp.zeros((batch, seq_len), jnp.int32)
  variables = jax.jit(functools.partial(Decoder(config, implementation="xla").init))(rng, tokens)
  return variables["params"]


def stack_layer_params(params, num_layers: int):
  """Loop layout (``layers_{i}``) -> scan layout (``layers`` with a leading layer axis)."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  layers = [params[f"layers_{i}"] for i in range(num_layers)]
  out["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
  return out


def unstack_layer_params(params, num_layers: int):
  """Scan layout (``layers`` with a leading layer axis) -> loop layout (``layers_{i}``)."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"])
  return out
