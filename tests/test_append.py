"""``KVCache.append`` through every backend that implements it, against the reference's ``jnp``
path (``"xla"``), bit for bit: the kernel code on this CPU (interpreters), lowered for CUDA on
this CPU, and compiled on a GPU (``-m gpu``)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_pallas as gp
from gqa_pallas import devices, registry
from tests import backend_cases, numerics

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def _random_cache(rng, b, s, kh, h, dtype, lengths, overflowed=None, layers=None):
  lead = () if layers is None else (layers,)
  shape = lead + (b, s, kh, h)
  if overflowed is None:
    overflowed = rng.integers(0, 2, size=lead + (b,)).astype(bool)
  return gp.KVCache(k=jnp.asarray(rng.normal(size=shape), dtype),
                    v=jnp.asarray(rng.normal(size=shape), dtype),
                    lengths=jnp.asarray(lengths, jnp.int32),
                    overflowed=jnp.asarray(overflowed, jnp.bool_))


def _assert_same(a, b):
  for name in ("k", "v", "lengths", "overflowed"):
    np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)),
                                  err_msg=name)


# Backends with an append of their own (the reference, "xla", is what they are compared with).
APPEND_BACKENDS = backend_cases.implementing("append")


def _both(name, cache, k_new, v_new, num_new, interpret=True):
  """(backend, jnp) results of one append, both under jit (where overflow saturates)."""
  run = lambda impl, interp: jax.jit(lambda c, kn, vn, nn: c.append(
      kn, vn, nn, implementation=impl, interpret=interp))(cache, k_new, v_new, num_new)
  return run(name, interpret), run("xla", False)


# (B, S_max, K, H, T_new, dtype, lengths, num_new): rows that fit, rows one short of S_max, full
# rows, empty appends (num_new = 0), T_new over several token tiles (100 x H128 -> 4 tiles),
# an odd head dim (24, padded), new tokens in another dtype than the cache.
CASES = [
    (3, 10, 2, 32, 1, F32, [0, 5, 9], [1, 1, 1]),
    (4, 9, 1, 24, 3, BF16, [8, 6, 9, 0], [2, 3, 1, 0]),  # 8+2 and 9+1 overflow
    (2, 130, 2, 128, 100, F16, [29, 0], [100, 57]),
    (3, 40, 4, 64, 37, BF16, [3, 39, 40], [37, 2, 0]),
]


def _case_id(c):
  b, s, kh, h, t, dtype, *_ = c
  return f"B{b}S{s}K{kh}H{h}T{t}-{jnp.dtype(dtype).name}"


@pytest.mark.parametrize("name", APPEND_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_jnp_append(name, case):
  b, s, kh, h, t, dtype, lengths, num_new = case
  rng = np.random.default_rng(len(_case_id(case)))
  cache = _random_cache(rng, b, s, kh, h, dtype, lengths)
  new_dtype = F32 if dtype != F32 else BF16  # cast to the cache's dtype on the way in
  k_new = jnp.asarray(rng.normal(size=(b, t, kh, h)), new_dtype)
  v_new = jnp.asarray(rng.normal(size=(b, t, kh, h)), new_dtype)
  kernel, ref = _both(name, cache, k_new, v_new, jnp.asarray(num_new, jnp.int32))
  _assert_same(kernel, ref)
  # The written tokens are where they belong, and nothing else moved.
  for row in range(b):
    n = min(num_new[row], max(s - lengths[row], 0))
    got = np.asarray(kernel.k[row], np.float32)
    want = np.asarray(cache.k[row], np.float32).copy()
    want[lengths[row]:lengths[row] + n] = np.asarray(k_new[row, :n].astype(dtype), np.float32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", APPEND_BACKENDS)
def test_default_num_new_and_stacked_cache(name):
  rng = np.random.default_rng(3)
  cache = _random_cache(rng, 2, 12, 2, 16, F32, [[3, 11], [0, 12]], layers=2)
  k_new = jnp.asarray(rng.normal(size=(2, 2, 2, 2, 16)), F32)
  kernel, ref = _both(name, cache, k_new, -k_new, None)
  _assert_same(kernel, ref)
  np.testing.assert_array_equal(kernel.lengths, [[5, 12], [2, 12]])
  np.testing.assert_array_equal(kernel.overflowed, np.asarray(cache.overflowed) |
                                np.array([[False, True], [False, True]]))


@pytest.mark.parametrize("name", APPEND_BACKENDS)
def test_lengths_outside_the_cache_act_as_its_ends(name):
  """A hand-built cache whose lengths are negative or past S_max: both paths agree, a negative
  length acts as 0 (the tokens go to slots 0..) and one past S_max as S_max (overflow)."""
  rng = np.random.default_rng(5)
  cache = _random_cache(rng, 3, 8, 2, 16, F32, [-3, 10, 2], overflowed=[False] * 3)
  k_new = jnp.asarray(rng.normal(size=(3, 2, 2, 16)), F32)
  out, ref = _both(name, cache, k_new, -k_new, jnp.array([2, 1, 2], jnp.int32))
  _assert_same(out, ref)
  np.testing.assert_array_equal(np.asarray(ref.lengths), [2, 8, 4])
  np.testing.assert_array_equal(np.asarray(ref.overflowed), [False, True, False])
  np.testing.assert_array_equal(np.asarray(ref.k[0, :2]), np.asarray(k_new[0]))
  np.testing.assert_array_equal(np.asarray(ref.k[0, 2:]), np.asarray(cache.k[0, 2:]))
  np.testing.assert_array_equal(np.asarray(ref.k[1]), np.asarray(cache.k[1]))


@pytest.mark.parametrize("name", APPEND_BACKENDS)
def test_gradients_through_the_append(name):
  """jax.grad through an append kernel: each slot's cotangent goes to what landed there (the
  reference's VJP), as through the jnp path."""
  rng = np.random.default_rng(6)
  cache = _random_cache(rng, 2, 8, 2, 16, F32, [3, 7], overflowed=[False, False])
  k_new = jnp.asarray(rng.normal(size=(2, 2, 2, 16)), F32)
  weights = jnp.asarray(rng.normal(size=(2, 8, 2, 16)), F32)

  def loss(impl, interpret, k, k_new):
    c = dataclasses.replace(cache, k=k)
    out = c.append(k_new, 2 * k_new, jnp.array([2, 1]), implementation=impl, interpret=interpret)
    return jnp.sum(out.k * weights) + jnp.sum(out.v * weights ** 2)

  grads = jax.grad(functools.partial(loss, name, True), argnums=(0, 1))(cache.k, k_new)
  want = jax.grad(functools.partial(loss, "xla", False), argnums=(0, 1))(cache.k, k_new)
  for g, w in zip(grads, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  assert np.any(np.asarray(want[1]))


@pytest.mark.parametrize("name", APPEND_BACKENDS)
def test_empty_append(name):
  """T_new == 0 launches no kernel and still saturates lengths / sets flags like the jnp path."""
  rng = np.random.default_rng(6)
  cache = _random_cache(rng, 3, 8, 1, 16, F32, [0, 8, 5], overflowed=[False, True, False])
  empty = jnp.zeros((3, 0, 1, 16), F32)
  kernel, ref = _both(name, cache, empty, empty, None)
  _assert_same(kernel, ref)


@pytest.mark.parametrize("name", APPEND_BACKENDS)
def test_eager_overflow_still_raises(name):
  cache = gp.KVCache.init(2, 4, 1, 8, F32)
  with pytest.raises(ValueError, match="overflow"):
    cache.append(jnp.ones((2, 5, 1, 8)), jnp.ones((2, 5, 1, 8)), implementation=name,
                  interpret=True)


@pytest.mark.parametrize("name", APPEND_BACKENDS)
def test_jit_step_donated_in_place_one_trace(name):
  b, s, kh, h = 2, 16, 2, 32
  cache = gp.KVCache.init(b, s, kh, h, F32)
  traces = []

  @functools.partial(jax.jit, donate_argnums=0)
  def step(cache, k_new, v_new):
    traces.append(1)
    return cache.append(k_new, v_new, implementation=name, interpret=True)

  rng = np.random.default_rng(4)
  written = []
  for _ in range(4):
    k_new = jnp.asarray(rng.normal(size=(b, 1, kh, h)), F32)
    old_k = cache.k
    cache = step(cache, k_new, 2 * k_new)
    assert old_k.is_deleted()
    written.append(k_new)
  np.testing.assert_array_equal(cache.lengths, [4, 4])
  np.testing.assert_array_equal(cache.k[:, :4], jnp.concatenate(written, 1))
  np.testing.assert_array_equal(cache.v[:, :4], 2 * jnp.concatenate(written, 1))
  assert len(traces) == 1


@pytest.mark.parametrize("name", APPEND_BACKENDS)
@pytest.mark.parametrize("t_new,h,dtype", [(1, 128, BF16), (100, 128, F16), (3, 96, F32),
                                           (1, 64, BF16)])
def test_lowers_for_cuda(name, t_new, h, dtype):
  k = jax.ShapeDtypeStruct((2, 50, 2, h), dtype)
  k_new = jax.ShapeDtypeStruct((2, t_new, 2, h), dtype)
  rows = jax.ShapeDtypeStruct((2,), jnp.int32)
  flags = jax.ShapeDtypeStruct((2,), jnp.bool_)
  append = lambda k, v, n, f, kn, vn, nn: gp.KVCache(k, v, n, f).append(
      kn, vn, nn, implementation=name)
  with devices.target(backend_cases.CUDA_TARGET):
    text = numerics.lower_for_cuda(append, k, k, rows, flags, k_new, k_new, rows)
  assert registry.get(name).custom_call in text


@pytest.mark.gpu
@pytest.mark.parametrize("name", APPEND_BACKENDS)
def test_gpu_matches_jnp_append_at_size(name):
  rng = np.random.default_rng(5)
  b, s, kh, h = 16, 4096, 8, 128
  lengths = rng.integers(0, s + 1, size=b)
  lengths[:3] = [s - 1, s, 0]
  cache = _random_cache(rng, b, s, kh, h, BF16, lengths)
  for t in (1, 4, 300):
    k_new = jnp.asarray(rng.normal(size=(b, t, kh, h)), BF16)
    num_new = jnp.asarray(rng.integers(0, t + 1, size=b), jnp.int32)
    kernel, ref = _both(name, cache, k_new, k_new * 2, num_new, interpret=False)
    _assert_same(kernel, ref)
