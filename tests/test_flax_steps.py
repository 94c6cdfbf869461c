"""``jax.jit``-compiled decoding steps through ``GQAAttention`` / ``GQAAttentionNNX``.

Decoding a sequence through the KV cache one token (or k tokens) per step equals the full causal
forward; the jitted step traces once for 64 steps; ``lax.scan`` over steps works; a donated cache
is updated in place; every implementation (``xla``, the Pallas kernels in interpret mode) agrees.

Tolerances (design.md): float32 on CPU ``max|o - r| <= 1e-5 * max|r|``; bfloat16 the parity rule
with factor 3 (decode): ``max|o - r32| <= 3 * max|r_bf16 - r32| + 1e-5``.
"""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_layers import GQAAttention, GQAAttentionNNX
from gqa_pallas import KVCache, devices
from numerics import assert_parity

HIGHEST = jax.lax.Precision.HIGHEST
B, D, N, K = 2, 64, 4, 2  # head_dim 16
H = D // N



IMPLS = [
    pytest.param(("xla", False), id="xla"),
    pytest.param(("triton", True), id="triton-interpret"),
]


def assert_f32_close(out, ref, rel=1e-5):
  ref = np.asarray(ref, np.float64)
  chex.assert_shape(out, ref.shape)
  assert np.all(np.isfinite(np.asarray(out))), "non-finite values"
  chex.assert_trees_all_close(np.asarray(out, np.float64), ref,
                              atol=rel * max(np.abs(ref).max(), 1e-30) + 1e-7, rtol=0)


def make_layer(implementation="xla", interpret=False, dtype=None, seed=0, seq=8):
  layer = GQAAttention(num_heads=N, num_kv_heads=K, rope_theta=10000.0, is_causal=True,
                       precision=HIGHEST, dtype=dtype, implementation=implementation,
                       interpret=interpret)
  x = jax.random.normal(jax.random.key(np.random.default_rng().integers(1 << 30)), (B, seq, D))
  params = layer.init(jax.random.key(seed), x)
  return layer, params, x


def full_forward(layer, params, x):
  """The reference: one causal full-sequence call through the XLA path."""
  return jax.jit(layer.clone(implementation="xla", interpret=False).apply)(params, x)


def make_step(layer, max_traces=None):
  fn = lambda params, x, cache, num_new: layer.apply(params, x, cache=cache, num_new=num_new)
  if max_traces is not None:
    fn = chex.assert_max_traces(fn, n=max_traces)
  return jax.jit(fn, donate_argnames="cache")


def decode_in_chunks(step, params, x, cache, chunk):
  """Feeds ``x`` ``chunk`` tokens per call (the last chunk right-padded, with ``num_new``)."""
  t = x.shape[1]
  ys = []
  for lo in range(0, t, chunk):
    xc = x[:, lo:lo + chunk]
    valid = xc.shape[1]
    if valid < chunk:
      xc = jnp.pad(xc, ((0, 0), (0, chunk - valid), (0, 0)), constant_values=jnp.nan)
    y, cache = step(params, xc, cache, jnp.full((B,), valid, jnp.int32))
    ys.append(y[:, :valid])
  return jnp.concatenate(ys, 1), cache


# --------------------------------------------------------------------------------------------
# Functional mode: explicit KVCache through jax.jit.
# --------------------------------------------------------------------------------------------


def test_decode_step_traces_once_for_64_steps():
  t = 64
  layer, params, x = make_layer(seq=t)
  ref = full_forward(layer, params, x)
  chex.clear_trace_counter()
  step = make_step(layer, max_traces=1)
  cache = KVCache.init(B, t, K, H, jnp.float32)
  ys = []
  for i in range(t):
    prev = cache
    y, cache = step(params, x[:, i:i + 1], cache, None)
    chex.assert_trees_all_equal_shapes_and_dtypes(cache, KVCache.init(B, t, K, H, jnp.float32))
    assert prev.k.is_deleted()  # donated
    ys.append(y)
  np.testing.assert_array_equal(cache.lengths, [t, t])
  assert not np.any(cache.overflowed)
  assert_f32_close(jnp.concatenate(ys, 1), ref)


@pytest.mark.parametrize("chunk", [2, 5, 20])
def test_decode_k_tokens_at_a_time(chunk):
  """k > 16 goes through gqa_attention over the cache instead of gqa_decode."""
  t = 40
  layer, params, x = make_layer(seq=t)
  ref = full_forward(layer, params, x)
  chex.clear_trace_counter()
  step = make_step(layer, max_traces=1)
  y, cache = decode_in_chunks(step, params, x, KVCache.init(B, t + 3, K, H, jnp.float32), chunk)
  np.testing.assert_array_equal(cache.lengths, [t, t])
  assert_f32_close(y, ref)


def test_prefill_then_decode_rows_of_different_lengths():
  """A right-padded prompt (num_new per row), then single-token steps: each row equals its own
  full forward."""
  t, s = 12, 16
  layer, params, x = make_layer(seq=t)
  step = make_step(layer)
  prompt = jnp.array([7, 4], jnp.int32)
  cache = KVCache.init(B, s, K, H, jnp.float32)
  y_prompt, cache = step(params, x[:, :7], cache, prompt)
  outs = [[y_prompt[0, :7]], [y_prompt[1, :4]]]
  pos = np.asarray(prompt)
  for _ in range(4):  # row 0 feeds x[0, 7:11], row 1 feeds x[1, 4:8]
    xt = jnp.stack([x[0, pos[0]], x[1, pos[1]]])[:, None]
    y, cache = step(params, xt, cache, None)
    outs[0].append(y[0])
    outs[1].append(y[1])
    pos = pos + 1
  np.testing.assert_array_equal(cache.lengths, [11, 8])
  for row, n in ((0, 11), (1, 8)):
    ref = full_forward(layer, params, x[row:row + 1, :n])[0]
    assert_f32_close(jnp.concatenate(outs[row], 0), ref)


def test_scan_over_steps():
  t = 24
  layer, params, x = make_layer(seq=t)
  ref = full_forward(layer, params, x)

  @functools.partial(jax.jit, donate_argnames="cache")
  def generate(params, xs, cache):
    def body(cache, x_t):
      y, cache = layer.apply(params, x_t[:, None], cache=cache)
      return cache, y[:, 0]
    cache, ys = jax.lax.scan(body, cache, jnp.swapaxes(xs, 0, 1))
    return jnp.swapaxes(ys, 0, 1), cache

  y, cache = generate(params, x, KVCache.init(B, t, K, H, jnp.float32))
  np.testing.assert_array_equal(cache.lengths, [t, t])
  assert_f32_close(y, ref)


def test_donated_cache_is_updated_in_place():
  layer, params, x = make_layer(seq=4)
  step = make_step(layer)
  cache = KVCache.init(B, 32, K, H, jnp.float32)
  _, cache = step(params, x[:, :1], cache, None)  # warm up / compile
  ptr_k, ptr_v = cache.k.unsafe_buffer_pointer(), cache.v.unsafe_buffer_pointer()
  old = cache
  _, cache = step(params, x[:, 1:2], cache, None)
  assert old.k.is_deleted() and old.v.is_deleted()
  assert cache.k.unsafe_buffer_pointer() == ptr_k
  assert cache.v.unsafe_buffer_pointer() == ptr_v
  np.testing.assert_array_equal(cache.lengths, [2, 2])


def test_overflow_inside_jit_is_flagged_not_spilled():
  layer, params, x = make_layer(seq=6)
  step = make_step(layer)
  cache = KVCache.init(B, 4, K, H, jnp.float32)
  _, cache = step(params, x[:, :3], cache, jnp.array([3, 1], jnp.int32))
  y, cache = step(params, x[:, 3:6], cache, None)  # row 0 would need 6 > 4 slots
  np.testing.assert_array_equal(cache.lengths, [4, 4])
  np.testing.assert_array_equal(cache.overflowed, [True, False])
  chex.assert_tree_all_finite(y)


@pytest.mark.parametrize("impl", IMPLS + [
    pytest.param(("triton", False), id="triton-gpu", marks=pytest.mark.gpu)])
def test_bfloat16_decode_parity(impl):
  implementation, interpret = impl
  t = 10
  layer32, params, x = make_layer(seq=t)
  layer16 = layer32.clone(dtype=jnp.bfloat16, implementation=implementation, interpret=interpret)
  r32 = full_forward(layer32, params, x)
  r16 = full_forward(layer16, params, x)
  step = make_step(layer16)
  y, cache = decode_in_chunks(step, params, x, KVCache.init(B, t, K, H, jnp.bfloat16), 1)
  assert y.dtype == jnp.bfloat16 and cache.k.dtype == jnp.bfloat16
  assert_parity(y, r32, r16, factor=3.0, name="bf16 decode")


# --------------------------------------------------------------------------------------------
# Every implementation, every route: plain call, gqa_decode steps, gqa_attention chunks.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_every_implementation_agrees_with_reference(impl, monkeypatch):
  implementation, interpret = impl
  kernel_calls = []
  if implementation == "triton":  # check that the kernels themselves run, not a fallback
    import gqa_pallas.triton.decode as dec  # pylint: disable=g-import-not-at-top
    import gqa_pallas.triton.prefill as pre  # pylint: disable=g-import-not-at-top
    for mod, name in ((pre, "prefill_attention"), (dec, "decode_attention")):
      real = getattr(mod, name)
      monkeypatch.setattr(mod, name, functools.partial(
          lambda real, name, *a, **kw: (kernel_calls.append(name), real(*a, **kw))[1], real,
          name))
  t = 24
  layer, params, x = make_layer(implementation, interpret, seq=t)
  ref = full_forward(layer, params, x)
  kernel_calls.clear()
  # Plain call (prefill kernel, causal without a mask).
  assert_f32_close(jax.jit(layer.apply)(params, x), ref)
  # A 17-token chunk (> 16: gqa_attention over the cache), then 3 + 4 tokens (gqa_decode).
  step = make_step(layer)
  cache = KVCache.init(B, t, K, H, jnp.float32)
  ys = []
  for lo, hi in ((0, 17), (17, 20), (20, 24)):
    y, cache = step(params, x[:, lo:hi], cache, None)
    ys.append(y)
  assert_f32_close(jnp.concatenate(ys, 1), ref)
  if implementation == "triton":
    assert kernel_calls == ["prefill_attention", "prefill_attention", "decode_attention",
                            "decode_attention"], kernel_calls


@pytest.mark.parametrize("impl", IMPLS)
def test_poisoned_cache_slots_never_leak(impl):
  """NaN in every slot a row does not hold (unwritten slots, other rows' tails) never reaches the
  output, through gqa_decode, the mask fallback and a > 16-token chunk."""
  implementation, interpret = impl
  t, s = 20, 24
  layer, params, x = make_layer(implementation, interpret, seq=t)
  ref = full_forward(layer, params, x)
  poisoned = lambda: dataclasses.replace(KVCache.init(B, s, K, H, jnp.float32),
                                         k=jnp.full((B, s, K, H), jnp.nan),
                                         v=jnp.full((B, s, K, H), jnp.nan))
  step = make_step(layer)
  y, cache = step(params, x[:, :3], poisoned(), None)  # gqa_decode
  assert_f32_close(y, ref[:, :3])
  y, _ = jax.jit(lambda p, x, c: layer.apply(p, x, cache=c, mask=jnp.ones((1, 1, 1, s), bool)))(
      params, x[:, 3:5], cache)  # XLA fallback over a NaN tail
  assert_f32_close(y, ref[:, 3:5])
  y, _ = step(params, x[:, :t - 3], poisoned(), None)  # 17 tokens: gqa_attention over the cache
  assert_f32_close(y, ref[:, :t - 3])


# --------------------------------------------------------------------------------------------
# decode=True: the Flax 'cache' collection (linen) and nnx.Cache variables (NNX) under jit.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_linen_cache_collection_under_jit(impl):
  implementation, interpret = impl
  t = 12 if interpret else 32
  layer, params, x = make_layer(implementation, interpret, seq=t)
  ref = full_forward(layer, params, x)
  decoder = layer.clone(decode=True)
  cache = decoder.init(jax.random.key(0), jnp.ones((B, t, D)))["cache"]
  chex.clear_trace_counter()

  @functools.partial(jax.jit, donate_argnames="cache")
  @chex.assert_max_traces(n=1)
  def step(params, cache, x_t):
    y, upd = decoder.apply({"params": params["params"], "cache": cache}, x_t, mutable=["cache"])
    return y, upd["cache"]

  ys = []
  for i in range(t):
    y, cache = step(params, cache, x[:, i:i + 1])
    ys.append(y)
  np.testing.assert_array_equal(cache["cache_index"], [t, t])
  assert_f32_close(jnp.concatenate(ys, 1), ref)


def test_nnx_decode_under_jit_and_functional_scan():
  t = 16
  model = GQAAttentionNNX(N, D, num_kv_heads=K, rope_theta=10000.0, is_causal=True,
                          precision=HIGHEST, implementation="xla", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(np.random.default_rng().integers(1 << 30)), (B, t, D))
  ref = model(x)
  # (a) decode=True with nnx.Cache variables, through nnx.jit.
  model.init_cache((B, t, D))
  chex.clear_trace_counter()

  @nnx.jit
  @chex.assert_max_traces(n=1)
  def step(model, x_t):
    return model(x_t, decode=True)

  y = jnp.concatenate([step(model, x[:, i:i + 1]) for i in range(t)], 1)
  assert_f32_close(y, ref)
  np.testing.assert_array_equal(model.cache_index[...], [t, t])
  # (b) functional: split once, scan a pure step over the tokens.
  graphdef, state = nnx.split(model)

  @jax.jit
  def generate(state, xs, cache):
    def body(cache, x_t):
      y, cache = nnx.merge(graphdef, state)(x_t[:, None], cache=cache)
      return cache, y[:, 0]
    cache, ys = jax.lax.scan(body, cache, jnp.swapaxes(xs, 0, 1))
    return jnp.swapaxes(ys, 0, 1), cache

  y, cache = generate(state, x, KVCache.init(B, t, K, H, jnp.float32))
  assert_f32_close(y, ref)
  np.testing.assert_array_equal(cache.lengths, [t, t])


# --------------------------------------------------------------------------------------------
# The real CUDA lowering of the layer's steps, on the CPU (design.md: interpret mode skips it).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_layer_steps_lower_for_cuda(dtype):
  """Plain call, its gradient, and cached steps (1, 4 and 20 new tokens) lower to Triton kernels
  for CUDA, with the cache donated."""
  b, d, s = 2, 256, 64  # head_dim 64
  layer = GQAAttention(num_heads=4, num_kv_heads=2, rope_theta=1e4, is_causal=True, dtype=dtype,
                       implementation="triton")
  x = jax.ShapeDtypeStruct((b, 8, d), jnp.float32)
  params = jax.eval_shape(layer.clone(implementation="xla").init, jax.random.key(0), x)

  def lower(jitted, *args):
    try:
      return jitted.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:  # jax >= 0.11 lowers Triton for CUDA only with a GPU present
      if "No supported GPU devices" in str(e):
        pytest.skip("this jax lowers Triton kernels for CUDA only with a GPU present")
      raise

  n_kernels = lambda text: text.count("xla.gpu.triton")
  with devices.target(devices.H200):  # plan for a GPU: this CPU only lowers
    assert n_kernels(lower(jax.jit(layer.apply), params, x)) == 1
    loss = lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32))
    assert n_kernels(lower(jax.jit(jax.grad(loss)), params, x)) >= 1  # forward kernel + backward
    cache = jax.eval_shape(lambda: KVCache.init(b, s, 2, 64, dtype))
    step = jax.jit(lambda p, x, c: layer.apply(p, x, cache=c), donate_argnames="c")
    texts = {t: lower(step, params, jax.ShapeDtypeStruct((b, t, d), jnp.float32), cache)
             for t in (1, 4, 20)}
  for t, text in texts.items():
    assert n_kernels(text) >= 1, t
    assert "tf.aliasing_output" in text or "jax.buffer_donor" in text, t
