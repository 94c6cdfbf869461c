"""A ``jax.jit``-compiled generation loop over ``Decoder`` with a functional KV cache.

One prefill pass runs the right-padded prompts through the prefill kernel and writes every row's
keys/values into the cache at the row's own offset; then a ``lax.while_loop`` runs one decode step
per new token through the decode kernel, until every row has met an EOS token or
``max_new_tokens``. Sampling: greedy (``temperature=0``), or temperature / top-k / top-p with an
explicit PRNG key. The cache is donated, so the loop updates it in place; a second call with the
same shapes and static options reuses the compiled program (no retrace).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from flax_layers import partitioning
from flax_layers.decoder import Decoder, DecoderConfig, init_cache, _cache_lengths

# Number of times the generation program was traced (tests use it to check for retracing).
_TRACE_COUNT = [0]


def trace_count() -> int:
  """How many times the jitted generation loop has been traced in this process."""
  return _TRACE_COUNT[0]


# ---------------------------------------------------------------------------------------------
# sampling


def _filter_top_k(logits, top_k: int):
  kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def _filter_top_p(logits, top_p):
  """Keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (HF's
  ``TopPLogitsWarper``; the most likely token is always kept)."""
  sorted_desc = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
  keep = before < top_p
  keep = keep.at[..., 0].set(True)
  count = jnp.sum(keep, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(sorted_desc, count - 1, axis=-1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def _sample(logits, key, *, greedy: bool, temperature, top_k: Optional[int], use_top_p: bool,
            top_p):
  logits = logits.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    logits = _filter_top_k(logits, top_k)
  if use_top_p:
    logits = _filter_top_p(logits, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(rng, temperature, top_k, top_p):
  if not isinstance(temperature, (int, float, np.floating, np.integer)) or temperature < 0:
    raise ValueError(f"temperature must be a float >= 0 (0 is greedy); got {temperature!r}.")
  greedy = float(temperature) == 0.0
  if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 0):
    raise ValueError(f"top_k must be a positive int or None; got {top_k!r}.")
  top_k = None if not top_k else int(top_k)
  if top_p is not None and not (0.0 < float(top_p) <= 1.0):
    raise ValueError(f"top_p must be in (0, 1] or None; got {top_p!r}.")
  use_top_p = top_p is not None and float(top_p) < 1.0
  if greedy:
    top_k, use_top_p = None, False
  elif rng is None:
    raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: pass "
                     "rng=jax.random.key(seed).")
  return greedy, top_k, use_top_p


def sample_logits(logits, rng=None, *, temperature: float = 0.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None):
  """Samples one token per row from ``logits [B, V]``, as the generation loop does.

  ``temperature=0`` is greedy (argmax); otherwise temperature, then top-k, then top-p filtering
  (the order of HF's logits warpers), then a categorical draw with ``rng``.
  """
  greedy, top_k, use_top_p = _check_sampling(rng, temperature, top_k, top_p)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return _sample(logits, rng, greedy=greedy, temperature=jnp.float32(temperature or 1.0),
                 top_k=top_k, use_top_p=use_top_p, top_p=jnp.float32(top_p or 1.0))


# ---------------------------------------------------------------------------------------------
# the jitted loop


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new_tokens", "greedy", "top_k", "use_top_p",
                     "implementation", "interpret", "precision", "fresh_cache", "mesh",
                     "logical_rules"),
    donate_argnames=("cache",))
def _generate_jit(params, cache, prompt_tokens, prompt_lengths, rng, temperature, top_p, eos_ids,
                  steps, *, config, max_new_tokens, greedy, top_k, use_top_p, implementation,
                  interpret, precision, fresh_cache=None, mesh=None, logical_rules=None):
  """The whole generation, one program. ``fresh_cache = (max_length, dtype name)`` builds an
  empty cache inside it (``cache`` is then ``None`` and none is returned): ``generate`` then
  launches no eager allocation per layer and reads nothing back before the call. ``steps``
  (traced int32) stops the loop after that many tokens (at most ``max_new_tokens``): the
  end-to-end benchmark times one compiled program for 1 and for N tokens. ``mesh``: keep the
  cache (and the rows) sharded on it by ``logical_rules`` through the whole loop."""
  _TRACE_COUNT[0] += 1
  model = Decoder(config, implementation=implementation, interpret=interpret, precision=precision)
  b, t = prompt_tokens.shape
  if fresh_cache is not None:
    cache = init_cache(config, b, fresh_cache[0], jnp.dtype(fresh_cache[1]))
  if mesh is not None:
    rows = partitioning.batch_sharding(prompt_tokens.shape, mesh, logical_rules)
    prompt_tokens = jax.lax.with_sharding_constraint(prompt_tokens, rows)
    cache = partitioning.constrain_cache(cache, mesh, logical_rules)
  start = _cache_lengths(cache)
  positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  # A cache made here holds nothing: its prefill is the prompt over itself (every backend).
  logits, cache = model.apply({"params": params}, prompt_tokens, positions=positions, cache=cache,
                              num_new=prompt_lengths, logits_index=prompt_lengths - 1,
                              cache_empty=fresh_cache is not None)

  # eos_ids: int32[E], -1 entries are unused (no EOS at all: [-1]), so that calls with and without
  # an EOS share one compiled program.
  fill = jnp.maximum(eos_ids[0], 0)

  def pick(logits, step):
    key = jax.random.fold_in(rng, step)
    return _sample(logits, key, greedy=greedy, temperature=temperature, top_k=top_k,
                   use_top_p=use_top_p, top_p=top_p)

  def is_eos(tok):
    return jnp.any((tok[:, None] == eos_ids[None, :]) & (eos_ids[None, :] >= 0), axis=-1)

  tok = pick(logits, 0)
  out = jnp.full((b, max_new_tokens), fill, jnp.int32).at[:, 0].set(tok)
  done = is_eos(tok)
  num = jnp.ones((b,), jnp.int32)
  pos = start + prompt_lengths  # absolute position of `tok`
  one = jnp.ones((b,), jnp.int32)

  def cond(state):
    step, _, _, _, _, done, _ = state
    return (step < jnp.minimum(steps, max_new_tokens)) & ~jnp.all(done)

  def body(state):
    step, tok, pos, cache, out, done, num = state
    logits, cache = model.apply({"params": params}, tok[:, None], positions=pos[:, None],
                                cache=cache, num_new=one)
    if mesh is not None:
      cache = partitioning.constrain_cache(cache, mesh, logical_rules)
    new = pick(logits[:, 0], step)
    new = jnp.where(done, fill, new)
    out = jax.lax.dynamic_update_slice(out, new[:, None], (jnp.int32(0), step))
    num = num + (~done).astype(jnp.int32)
    done = done | is_eos(new)
    return step + 1, new, pos + 1, cache, out, done, num

  state = (jnp.int32(1), tok, pos, cache, out, done, num)
  _, _, _, cache, out, _, num = jax.lax.while_loop(cond, body, state)
  return out, num, (None if fresh_cache is not None else cache)


def _as_eos_array(eos_token_id):
  if eos_token_id is None:
    return np.full((1,), -1, np.int32)
  ids = np.atleast_1d(np.asarray(eos_token_id))
  if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer) or np.any(ids < 0):
    raise ValueError(f"eos_token_id must be a non-negative int, a non-empty sequence of them or "
                     f"None; got {eos_token_id!r}.")
  return ids.astype(np.int32)


def _host_or_device(x):
  """A JAX array (or tracer) as it is; anything else as a NumPy array, kept on the host."""
  return x if isinstance(x, jax.Array) else np.asarray(x)


def _as_int32(x):
  if x.dtype == np.int32:
    return x
  return x.astype(jnp.int32) if isinstance(x, jax.Array) else x.astype(np.int32)


def _check_prompts(config: DecoderConfig, prompt_tokens, prompt_lengths, max_new_tokens):
  """Checks the prompts; returns ``(tokens, lengths)`` as int32. Host inputs (NumPy arrays,
  lists) are checked on the host and stay there: the compiled call moves them with its other
  arguments, so no transfer or read-back happens before it. A JAX array's values are read back
  for the check (one device sync: pass NumPy prompts to avoid it); a tracer's are not checked."""
  prompt_tokens = _host_or_device(prompt_tokens)
  if prompt_tokens.ndim != 2 or not np.issubdtype(prompt_tokens.dtype, np.integer):
    raise ValueError(f"prompt_tokens must be int32[B, T]; got {prompt_tokens.dtype}"
                     f"{list(prompt_tokens.shape)}.")
  b, t = prompt_tokens.shape
  if prompt_lengths is None:
    prompt_lengths = np.full((b,), t, np.int32)
  prompt_lengths = _host_or_device(prompt_lengths)
  if prompt_lengths.shape != (b,) or not np.issubdtype(prompt_lengths.dtype, np.integer):
    raise ValueError(f"prompt_lengths must be int32[{b}]; got {prompt_lengths.dtype}"
                     f"{list(prompt_lengths.shape)}.")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}.")
  if not isinstance(prompt_lengths, jax.core.Tracer):
    lengths = np.asarray(prompt_lengths)
    if np.any(lengths < 1) or np.any(lengths > t):
      row = int(np.argmax((lengths < 1) | (lengths > t)))
      raise ValueError(f"prompt_lengths[{row}] = {lengths[row]} is outside [1, T={t}].")
  if not isinstance(prompt_tokens, jax.core.Tracer):
    toks = np.asarray(prompt_tokens)
    # Only the tokens inside each row's prompt_lengths count: the padding may hold anything.
    valid = np.ones(toks.shape, bool)
    if not isinstance(prompt_lengths, jax.core.Tracer):
      valid = np.arange(t)[None, :] < np.asarray(prompt_lengths)[:, None]
    bad = valid & ((toks < 0) | (toks >= config.vocab_size))
    if bad.any():
      row, pos = (int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"prompt_tokens[{row}, {pos}] = {toks[row, pos]} is outside [0, "
                       f"vocab_size={config.vocab_size}) ({int(bad.sum())} such tokens inside "
                       "prompt_lengths; padding past them is not checked).")
  return _as_int32(prompt_tokens), _as_int32(prompt_lengths)


def generate_with_cache(config: DecoderConfig, params, cache, prompt_tokens, prompt_lengths,
                        max_new_tokens: int, *, rng=None, temperature: float = 0.0,
                        top_k: Optional[int] = None, top_p: Optional[float] = None,
                        eos_token_id: Union[int, Sequence[int], None] = None,
                        implementation: Optional[str] = None, interpret: bool = False,
                        precision: Any = None, mesh=None, logical_rules=None):
  """``generate`` over a caller-owned cache, which is **donated** and returned updated.

  The prompts are appended after whatever each row of ``cache`` already holds (positions continue
  from ``cache.lengths``), so a multi-turn conversation can keep its cache; ``cache.reset()``
  empties it for reuse without reallocating. Returns ``(new_tokens, num_generated, cache)``.
  With ``mesh``, place the cache with ``partitioning.shard_cache`` first (the loop keeps it so).
  """
  prompt_tokens, prompt_lengths = _check_prompts(config, prompt_tokens, prompt_lengths,
                                                 max_new_tokens)
  greedy, top_k, use_top_p = _check_sampling(rng, temperature, top_k, top_p)
  lengths = _cache_lengths(cache)
  if not isinstance(lengths, jax.core.Tracer):
    cache_len = (cache.max_length if hasattr(cache, "max_length") else cache[0].max_length)
    need = np.asarray(lengths) + np.asarray(prompt_lengths) + max_new_tokens - 1
    if np.any(need > cache_len):
      row = int(np.argmax(need > cache_len))
      raise ValueError(f"row {row} needs {int(need[row])} cache slots (held + prompt + "
                       f"max_new_tokens - 1); the cache holds {cache_len}.")
    config.check_sequence_length(int(need.max()))
  return _run(config, params, cache, prompt_tokens, prompt_lengths, max_new_tokens, rng=rng,
              temperature=temperature, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
              top_p=top_p, eos_token_id=eos_token_id, implementation=implementation,
              interpret=interpret, precision=precision, mesh=mesh, logical_rules=logical_rules)


def _check_mesh(mesh, logical_rules):
  """``(mesh, rules)`` in the hashable form ``_generate_jit`` takes as static arguments."""
  if mesh is None:
    if logical_rules is not None:
      raise ValueError("logical_rules needs a mesh: pass mesh=jax.sharding.Mesh(...).")
    return None, None
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh or None; got {type(mesh).__name__}.")
  rules = partitioning.LOGICAL_RULES if logical_rules is None else logical_rules
  try:
    rules = tuple((str(name), tuple(axis) if isinstance(axis, list) else axis)
                  for name, axis in rules)
    hash(rules)
  except (TypeError, ValueError):
    raise TypeError(f"logical_rules must be a sequence of (logical name, mesh axis or None) "
                    f"pairs; got {logical_rules!r}.") from None
  return mesh, rules


@functools.lru_cache(maxsize=None)
def _default_key_for(impl: str) -> np.ndarray:
  return np.asarray(jax.random.PRNGKey(0))


def _default_key() -> np.ndarray:
  """``PRNGKey(0)``'s raw data on the host, made once per PRNG implementation."""
  return _default_key_for(str(jax.config.jax_default_prng_impl))


def _jit_arguments(config, params, cache, prompt_tokens, prompt_lengths, max_new_tokens, *, rng,
                   temperature, greedy, top_k, use_top_p, top_p, eos_token_id, implementation,
                   interpret, precision, fresh_cache=None, steps=None, mesh=None,
                   logical_rules=None):
  """``(args, static)`` of ``_generate_jit`` for checked inputs: traced scalars and the EOS ids
  in their fixed form, so that calls differing only in their values share one program
  (``steps``: stop after that many tokens, default ``max_new_tokens``). Every scalar is a NumPy
  value, moved with the call's other arguments rather than by an eager transfer of its own."""
  if rng is None:  # greedy: the key is never used
    rng = _default_key()
  args = (params, cache, prompt_tokens, prompt_lengths, rng,
          np.float32(temperature if not greedy else 1.0), np.float32(top_p or 1.0),
          _as_eos_array(eos_token_id), np.int32(max_new_tokens if steps is None else steps))
  static = dict(config=config, max_new_tokens=int(max_new_tokens), greedy=greedy, top_k=top_k,
                use_top_p=use_top_p, implementation=implementation, interpret=bool(interpret),
                precision=precision, fresh_cache=fresh_cache)
  static["mesh"], static["logical_rules"] = _check_mesh(mesh, logical_rules)
  return args, static


def _run(*args, **kwargs):
  """The compiled loop on checked inputs (``_jit_arguments``' arguments)."""
  jit_args, static = _jit_arguments(*args, **kwargs)
  return _generate_jit(*jit_args, **static)


def generate(config: DecoderConfig, params, prompt_tokens, prompt_lengths, max_new_tokens: int,
             *, rng=None, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Union[int, Sequence[int], None] = None,
             implementation: Optional[str] = None, interpret: bool = False,
             precision: Any = None, max_length: Optional[int] = None,
             cache_dtype=None, mesh=None, logical_rules=None) -> Tuple[jax.Array, jax.Array]:
  """Generates up to ``max_new_tokens`` tokens per row after right-padded prompts.

  Args:
    config, params: the model (``load_hf_checkpoint`` or ``init_params``).
    prompt_tokens: ``int32[B, T]``, right-padded (row ``b``'s prompt is its first
      ``prompt_lengths[b]`` tokens; the padding is ignored).
    prompt_lengths: ``int32[B]``, each in ``[1, T]`` (``None``: all ``T``).
    max_new_tokens: tokens to generate per row (static).
    rng: a PRNG key, required when sampling.
    temperature: 0 is greedy; otherwise logits are divided by it and sampled.
    top_k: keep the ``top_k`` most likely tokens (static; None/0: off).
    top_p: nucleus sampling threshold in ``(0, 1]`` (None/1: off).
    eos_token_id: an id or a list of ids; a row stops after generating one.
    implementation: attention backend (``None``: kernels on GPU, XLA on CPU; ``"triton"``; ``"xla"``).
    interpret: run the Pallas kernels in interpret mode (CPU testing).
    precision: matmul precision of the projections (``"highest"`` for float32 parity on GPU).
    max_length: KV cache length (default ``T + max_new_tokens - 1``, what the loop needs).
    cache_dtype: KV cache dtype (default: the compute dtype).
    mesh: a ``jax.sharding.Mesh`` to run on: the cache is built sharded on it (rows over
      ``"data"``, kv heads over ``"model"``) and stays so through the loop; place ``params`` with
      ``partitioning.shard_params`` (and the prompts over ``"data"``) first. docs/sharding.md.
    logical_rules: logical axis name -> mesh axis pairs (default
      ``partitioning.LOGICAL_RULES``), as given to ``shard_params``.

  Returns:
    ``(new_tokens int32[B, max_new_tokens], num_generated int32[B])``: positions past a row's stop
    hold ``eos_token_id`` (its first id; 0 without one). ``num_generated`` counts the EOS token.
  """
  return _generate_new_cache(config, params, prompt_tokens, prompt_lengths, max_new_tokens,
                             rng=rng, temperature=temperature, top_k=top_k, top_p=top_p,
                             eos_token_id=eos_token_id, implementation=implementation,
                             interpret=interpret, precision=precision, max_length=max_length,
                             cache_dtype=cache_dtype, mesh=mesh, logical_rules=logical_rules)


def _generate_new_cache(config, params, prompt_tokens, prompt_lengths, max_new_tokens, *, rng,
                        temperature, top_k, top_p, eos_token_id, implementation, interpret,
                        precision, max_length, cache_dtype, steps=None, mesh=None,
                        logical_rules=None):
  """``generate``'s body; ``steps`` stops the compiled loop after that many tokens (the
  end-to-end benchmark)."""
  prompt_tokens, prompt_lengths = _check_prompts(config, prompt_tokens, prompt_lengths,
                                                 max_new_tokens)
  b, t = prompt_tokens.shape
  needed = t + int(max_new_tokens) - 1
  max_length = needed if max_length is None else int(max_length)
  if max_length < needed:
    raise ValueError(f"max_length={max_length} is shorter than T + max_new_tokens - 1 = {needed}.")
  config.check_sequence_length(needed)
  greedy, top_k, use_top_p = _check_sampling(rng, temperature, top_k, top_p)
  # The cache is built inside the compiled program (host overhead: no eager zeros per layer).
  cache_dtype = jnp.dtype(config.compute_dtype if cache_dtype is None else cache_dtype).name
  tokens, num, _ = _run(config, params, None, prompt_tokens, prompt_lengths, max_new_tokens,
                        rng=rng, temperature=temperature, greedy=greedy, top_k=top_k,
                        use_top_p=use_top_p, top_p=top_p, eos_token_id=eos_token_id,
                        implementation=implementation, interpret=interpret,
                        precision=precision, fresh_cache=(max_length, cache_dtype),
                        steps=steps, mesh=mesh, logical_rules=logical_rules)
  return tokens, num
