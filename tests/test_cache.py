"""``KVCache``: shapes, per-row appends against a NumPy model, overflow policy, reset, and the
pytree contract (jit, scan, while_loop, stacked layers, tuples of layers, buffer donation)."""
import dataclasses
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from gqa_pallas import KVCache, attention_reference, gqa_decode


# --------------------------------------------------------------------------------------------------
# Helpers: a NumPy model of append, and caches filled with recognisable garbage.
# --------------------------------------------------------------------------------------------------
def np_append(k, v, lengths, k_new, v_new, num_new):
  """Row ``b`` gets ``k_new[b, :num_new[b]]`` at slots ``lengths[b]...``; slots past S_max drop."""
  k, v, lengths = np.array(k), np.array(v), np.array(lengths)
  s_max = k.shape[1]
  for b in range(k.shape[0]):
    for t in range(int(num_new[b])):
      slot = lengths[b] + t
      if slot < s_max:
        k[b, slot] = k_new[b, t]
        v[b, slot] = v_new[b, t]
    lengths[b] = min(lengths[b] + int(num_new[b]), s_max)
  return k, v, lengths


def poisoned(cache, lengths=None):
  """Every slot holds a distinct value that names its row and slot (k: ``1000 b + s``, v: its
  negative), so a stray write, a wrap-around or a spill into another row is visible."""
  b, s = np.meshgrid(np.arange(cache.batch), np.arange(cache.max_length), indexing="ij")
  tag = (1000.0 * b + s)[:, :, None, None] + np.zeros(cache.k.shape[-2:])
  lengths = cache.lengths if lengths is None else jnp.asarray(lengths, jnp.int32)
  return dataclasses.replace(cache, k=jnp.asarray(tag, cache.k.dtype),
                             v=jnp.asarray(-tag, cache.v.dtype), lengths=lengths)


def rand(rng, shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape, np.float32) + 0.5, dtype)


def assert_cache_equals(cache, k, v, lengths, overflowed=None):
  chex.assert_trees_all_equal(np.asarray(cache.k), np.asarray(k))
  chex.assert_trees_all_equal(np.asarray(cache.v), np.asarray(v))
  np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lengths))
  if overflowed is not None:
    np.testing.assert_array_equal(np.asarray(cache.overflowed), np.asarray(overflowed))


# --------------------------------------------------------------------------------------------------
# init
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_init_shapes_and_dtypes(dtype):
  cache = KVCache.init(3, 17, 2, 64, dtype)
  chex.assert_shape([cache.k, cache.v], (3, 17, 2, 64))
  chex.assert_shape([cache.lengths, cache.overflowed], (3,))
  assert cache.k.dtype == cache.v.dtype == jnp.dtype(dtype)
  assert cache.lengths.dtype == jnp.int32 and cache.overflowed.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(cache.lengths), 0)
  assert not np.any(np.asarray(cache.overflowed))
  assert (cache.batch, cache.max_length, cache.num_kv_heads, cache.head_dim) == (3, 17, 2, 64)
  assert cache.num_layers is None
  assert len(jax.tree_util.tree_leaves(cache)) == 4
  with pytest.raises(dataclasses.FrozenInstanceError):
    cache.lengths = jnp.ones((3,), jnp.int32)


def test_init_stacked_and_default_dtype():
  cache = KVCache.init(2, 8, 4, 16, num_layers=5)
  chex.assert_shape([cache.k, cache.v], (5, 2, 8, 4, 16))
  chex.assert_shape([cache.lengths, cache.overflowed], (5, 2))
  assert cache.k.dtype == jnp.bfloat16
  assert (cache.num_layers, cache.batch, cache.max_length, cache.num_kv_heads, cache.head_dim) == (
      5, 2, 8, 4, 16)
  one = cache.layer(3)
  chex.assert_shape(one.k, (2, 8, 4, 16))
  assert one.num_layers is None


def test_wrapping_existing_arrays_defaults_the_flags_to_false():
  """``KVCache(k, v, lengths)`` (e.g. Flax's cached_key / cached_value) starts unflagged, and
  stays a 4-leaf pytree through jit, tree_map and vmap."""
  k = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 1, 8)), jnp.float32)
  cache = KVCache(k, -k, jnp.array([2, 6], jnp.int32))
  np.testing.assert_array_equal(cache.overflowed, [False, False])
  assert len(jax.tree_util.tree_leaves(cache)) == 4
  out = jax.jit(lambda c: c.append(k[:, :1], k[:, :1]))(cache)
  np.testing.assert_array_equal(out.lengths, [3, 6])
  np.testing.assert_array_equal(out.overflowed, [False, True])
  stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), cache)
  assert stacked.num_layers == 2 and stacked.overflowed.shape == (2, 2)
  lengths = jax.vmap(lambda c: c.lengths + 1)(stacked)
  np.testing.assert_array_equal(lengths, [[3, 7], [3, 7]])
  given = KVCache(k, k, jnp.array([1, 1], jnp.int32), jnp.array([True, False]))
  np.testing.assert_array_equal(given.overflowed, [True, False])


@pytest.mark.parametrize("args,match", [
    ((0, 8, 2, 16), "batch must be a positive int; got 0"),
    ((2, -1, 2, 16), "max_length must be a positive int; got -1"),
    ((2, 8, 0, 16), "num_kv_heads must be a positive int; got 0"),
    ((2, 8, 2, 16.0), "head_dim must be a positive int; got 16.0"),
])
def test_init_rejects_bad_sizes(args, match):
  with pytest.raises(ValueError, match=match):
    KVCache.init(*args, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float64, jnp.int8])
def test_init_rejects_bad_dtypes(dtype):
  with pytest.raises(TypeError, match="dtype must be bfloat16, float16, float32"):
    KVCache.init(2, 8, 2, 16, dtype)


# --------------------------------------------------------------------------------------------------
# append
# --------------------------------------------------------------------------------------------------
def test_append_writes_each_row_at_its_own_offset():
  rng = np.random.default_rng(11)
  b, s_max, kh, h = 4, 24, 2, 8
  cache = poisoned(KVCache.init(b, s_max, kh, h, jnp.float32))
  k_np, v_np, len_np = np.asarray(cache.k), np.asarray(cache.v), np.zeros(b, np.int64)
  append = jax.jit(KVCache.append)  # one compilation per T_new (eager: one per primitive)
  for step, t_new in enumerate([3, 1, 5, 2, 4]):
    room = s_max - len_np
    num_new = np.minimum(rng.integers(0, t_new + 1, size=b), room)
    num_new[step % b] = 0  # a row that appends nothing this step
    k_new, v_new = rand(rng, (b, t_new, kh, h)), rand(rng, (b, t_new, kh, h))
    cache = append(cache, k_new, v_new, jnp.asarray(num_new, jnp.int32))
    k_np, v_np, len_np = np_append(k_np, v_np, len_np, k_new, v_new, num_new)
    assert_cache_equals(cache, k_np, v_np, len_np, overflowed=np.zeros(b, bool))
  assert len(set(len_np.tolist())) > 1, "rows should have advanced independently"


def test_append_default_num_new_and_dtype_cast():
  rng = np.random.default_rng(12)
  cache = KVCache.init(2, 6, 1, 4, jnp.bfloat16)
  k_new, v_new = rand(rng, (2, 4, 1, 4)), rand(rng, (2, 4, 1, 4))  # float32 into a bf16 cache
  out = cache.append(k_new, v_new)
  np.testing.assert_array_equal(np.asarray(out.lengths), [4, 4])
  assert out.k.dtype == jnp.bfloat16
  chex.assert_trees_all_equal(out.k[:, :4], k_new.astype(jnp.bfloat16))
  chex.assert_trees_all_equal(out.v[:, :4], v_new.astype(jnp.bfloat16))
  # num_new as a Python int applies to every row.
  out2 = out.append(k_new[:, :2], v_new[:, :2], 1)
  np.testing.assert_array_equal(np.asarray(out2.lengths), [5, 5])
  chex.assert_trees_all_equal(out2.k[:, 4], k_new[:, 0].astype(jnp.bfloat16))


def test_append_overflow_outside_jit_names_the_row():
  rng = np.random.default_rng(13)
  cache = poisoned(KVCache.init(3, 8, 2, 4, jnp.float32), lengths=[2, 6, 0])
  k_new = rand(rng, (3, 4, 2, 4))
  with pytest.raises(ValueError, match=r"overflow: row 1 holds 6 tokens and appends 3.*"
                                       r"max_length=8"):
    cache.append(k_new, k_new, jnp.array([4, 3, 4]))
  # Exactly filling a row is fine.
  full = cache.append(k_new, k_new, jnp.array([4, 2, 4]))
  np.testing.assert_array_equal(np.asarray(full.lengths), [6, 8, 4])
  with pytest.raises(ValueError, match=r"row 1 holds 8 tokens and appends 1"):
    full.append(k_new, k_new, jnp.array([0, 1, 0]))
  with pytest.raises(ValueError, match=r"num_new\[2\] = 5 is outside \[0, T_new=4\]"):
    cache.append(k_new, k_new, jnp.array([0, 0, 5]))
  with pytest.raises(ValueError, match=r"num_new\[0\] = -1 is outside \[0, T_new=4\]"):
    cache.append(k_new, k_new, jnp.array([-1, 0, 0]))


def test_overflow_inside_jit_stays_in_its_row_and_is_reported():
  rng = np.random.default_rng(14)
  b, s_max, kh, h = 4, 8, 2, 4
  start = [2, 6, 8, 5]  # row 1 overflows by 2, row 2 is already full, rows 0 and 3 fit
  cache = poisoned(KVCache.init(b, s_max, kh, h, jnp.float32), lengths=start)
  k_new, v_new = rand(rng, (b, 4, kh, h)), rand(rng, (b, 4, kh, h))
  num_new = np.array([4, 4, 1, 3])
  out = jax.jit(lambda c, k, v, n: c.append(k, v, n))(cache, k_new, v_new, jnp.asarray(num_new))
  k_np, v_np, len_np = np_append(cache.k, cache.v, start, k_new, v_new, num_new)
  assert_cache_equals(out, k_np, v_np, len_np, overflowed=[False, True, True, False])
  np.testing.assert_array_equal(np.asarray(out.lengths), [6, 8, 8, 8])  # saturates at S_max
  # Spelled out: the overflowing row wrote its first 2 tokens and nothing else; no wrap-around into
  # its own slot 0, no spill into row 2; rows without overflow are exact.
  chex.assert_trees_all_equal(out.k[1, 6:], k_new[1, :2])
  chex.assert_trees_all_equal(out.k[1, :6], cache.k[1, :6])
  chex.assert_trees_all_equal(out.k[2], cache.k[2])
  chex.assert_trees_all_equal(out.v[2], cache.v[2])
  chex.assert_trees_all_equal(out.k[0, 6:], cache.k[0, 6:])
  # The flag is sticky: a later append that fits does not clear it; reset does.
  out2 = jax.jit(lambda c, k, v, n: c.append(k, v, n))(out, k_new, v_new, jnp.array([1, 0, 0, 0]))
  np.testing.assert_array_equal(np.asarray(out2.overflowed), [False, True, True, False])
  np.testing.assert_array_equal(np.asarray(out2.reset([1]).overflowed), [False, False, True, False])


def test_num_new_is_clipped_inside_jit():
  rng = np.random.default_rng(15)
  cache = poisoned(KVCache.init(2, 10, 1, 4, jnp.float32))
  k_new = rand(rng, (2, 3, 1, 4))
  out = jax.jit(lambda c, k, n: c.append(k, k, n))(cache, k_new, jnp.array([-2, 7]))
  np.testing.assert_array_equal(np.asarray(out.lengths), [0, 3])
  chex.assert_trees_all_equal(out.k[0], cache.k[0])
  chex.assert_trees_all_equal(out.k[1, :3], k_new[1])


def test_check_under_checkify_reports_overflow():
  rng = np.random.default_rng(16)
  cache = KVCache.init(2, 4, 1, 4, jnp.float32)
  k_new = rand(rng, (2, 3, 1, 4))

  def step(c, k, n):
    c = c.append(k, k, n)
    c.check()
    return c

  checked = jax.jit(checkify.checkify(step))
  err, out = checked(cache, k_new, jnp.array([3, 3]))
  assert err.get() is None
  err, out = checked(out, k_new, jnp.array([0, 2]))
  assert err.get() is not None and "KV cache overflow" in err.get()
  with pytest.raises(checkify.JaxRuntimeError, match="KV cache overflow"):
    err.throw()
  np.testing.assert_array_equal(np.asarray(out.overflowed), [False, True])
  # Outside jit the same append raises before anything is written.
  with pytest.raises(ValueError, match="row 1"):
    step(cache.append(k_new, k_new), k_new, jnp.array([0, 2]))


# --------------------------------------------------------------------------------------------------
# reset
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cleared", [
    (np.array([True, False, True, False]), [0, 2]),
    ([1, 3], [1, 3]),
    (jnp.array([2], jnp.int32), [2]),
    (3, [3]),
    (None, [0, 1, 2, 3]),
])
def test_reset(rows, cleared):
  cache = poisoned(KVCache.init(4, 8, 1, 2, jnp.float32), lengths=[3, 8, 5, 1])
  cache = dataclasses.replace(cache, overflowed=jnp.array([True, True, False, True]))
  for out in (cache.reset(rows), jax.jit(lambda c, r: c.reset(r))(cache, rows)
              if rows is not None else jax.jit(lambda c: c.reset())(cache)):
    want_len = np.array([3, 8, 5, 1])
    want_len[cleared] = 0
    want_ovf = np.array([True, True, False, True])
    want_ovf[cleared] = False
    assert_cache_equals(out, cache.k, cache.v, want_len, want_ovf)  # data left in place


def test_reset_under_jit_never_wraps_an_index():
  """Traced indices outside [0, B) clear nothing (eagerly they are a ValueError): -1 is not the
  last row and 4 is not dropped onto another."""
  cache = poisoned(KVCache.init(4, 8, 1, 2, jnp.float32), lengths=[3, 8, 5, 1])
  out = jax.jit(lambda c, r: c.reset(r))(cache, jnp.array([-1, 4, 1], jnp.int32))
  np.testing.assert_array_equal(np.asarray(out.lengths), [3, 0, 5, 1])
  with pytest.raises(ValueError, match=r"row indices must be in \[0, 4\)"):
    cache.reset(jnp.array([-1]))


def test_reset_then_append_starts_at_zero():
  rng = np.random.default_rng(17)
  cache = poisoned(KVCache.init(2, 6, 1, 2, jnp.float32), lengths=[4, 6])
  k_new = rand(rng, (2, 2, 1, 2))
  out = cache.reset(np.array([False, True])).append(k_new, k_new)
  np.testing.assert_array_equal(np.asarray(out.lengths), [6, 2])
  chex.assert_trees_all_equal(out.k[1, :2], k_new[1])
  chex.assert_trees_all_equal(out.k[1, 2:], cache.k[1, 2:])


# --------------------------------------------------------------------------------------------------
# Control flow: jit, scan, while_loop.
# --------------------------------------------------------------------------------------------------
def test_jit_append_matches_eager_and_does_not_retrace():
  rng = np.random.default_rng(18)
  traces = []

  @jax.jit
  def step(c, k, v, n):
    traces.append(1)
    return c.append(k, v, n)

  cache = poisoned(KVCache.init(3, 12, 2, 4, jnp.float32))
  eager = cache
  for _ in range(3):
    k_new, v_new = rand(rng, (3, 2, 2, 4)), rand(rng, (3, 2, 2, 4))
    n = jnp.asarray(rng.integers(0, 3, size=3), jnp.int32)
    cache, eager = step(cache, k_new, v_new, n), eager.append(k_new, v_new, n)
    assert_cache_equals(cache, eager.k, eager.v, eager.lengths, eager.overflowed)
  assert len(traces) == 1


def test_scan_one_token_per_step():
  rng = np.random.default_rng(19)
  b, s_max, kh, h, steps = 2, 10, 2, 4, 7
  cache = poisoned(KVCache.init(b, s_max, kh, h, jnp.float32))
  ks, vs = rand(rng, (steps, b, 1, kh, h)), rand(rng, (steps, b, 1, kh, h))
  # Row 0 appends every step, row 1 every other step: rows advance independently.
  nums = jnp.stack([jnp.ones(steps, jnp.int32), jnp.arange(steps, dtype=jnp.int32) % 2], axis=1)

  def body(c, x):
    k, v, n = x
    c = c.append(k, v, n)
    return c, c.lengths

  out, lengths_seen = jax.jit(lambda c: jax.lax.scan(body, c, (ks, vs, nums)))(cache)
  k_np, v_np, len_np = np.asarray(cache.k), np.asarray(cache.v), np.zeros(b, np.int64)
  want_seen = []
  for i in range(steps):
    k_np, v_np, len_np = np_append(k_np, v_np, len_np, ks[i], vs[i], np.asarray(nums[i]))
    want_seen.append(len_np)
  assert_cache_equals(out, k_np, v_np, len_np, overflowed=[False, False])
  np.testing.assert_array_equal(np.asarray(lengths_seen), np.stack(want_seen))
  np.testing.assert_array_equal(np.asarray(out.lengths), [7, 3])


def test_while_loop_until_a_row_is_long_enough():
  rng = np.random.default_rng(20)
  cache = poisoned(KVCache.init(2, 12, 1, 4, jnp.float32))
  k_tok = rand(rng, (2, 2, 1, 4))

  def cond(c):
    return c.lengths[0] < 5

  def body(c):
    return c.append(k_tok, -k_tok, jnp.array([1, 2], jnp.int32))

  out = jax.jit(lambda c: jax.lax.while_loop(cond, body, c))(cache)
  np.testing.assert_array_equal(np.asarray(out.lengths), [5, 10])
  chex.assert_trees_all_equal(out.k[0, :5], jnp.broadcast_to(k_tok[0, 0], (5, 1, 4)))
  chex.assert_trees_all_equal(out.v[1, :10:2], jnp.broadcast_to(-k_tok[1, 0], (5, 1, 4)))
  chex.assert_trees_all_equal(out.v[1, 1:10:2], jnp.broadcast_to(-k_tok[1, 1], (5, 1, 4)))
  chex.assert_trees_all_equal(out.k[1, 10:], cache.k[1, 10:])


# --------------------------------------------------------------------------------------------------
# Layers: a stacked cache (leading layer axis) and a tuple of per-layer caches.
# --------------------------------------------------------------------------------------------------
def test_stacked_cache_scan_over_layers():
  rng = np.random.default_rng(21)
  layers, b, s_max, kh, h, t_new = 3, 2, 8, 2, 4, 3
  stacked = KVCache.init(b, s_max, kh, h, jnp.float32, num_layers=layers)
  stacked = jax.vmap(poisoned)(stacked)
  k_new, v_new = rand(rng, (layers, b, t_new, kh, h)), rand(rng, (layers, b, t_new, kh, h))
  num_new = jnp.array([3, 1], jnp.int32)

  def body(carry, xs):
    c, k, v = xs
    return carry + 1, c.append(k, v, num_new)

  count, scanned = jax.jit(lambda c: jax.lax.scan(body, 0, (c, k_new, v_new)))(stacked)
  assert int(count) == layers and isinstance(scanned, KVCache)
  assert scanned.num_layers == layers
  direct = stacked.append(k_new, v_new, num_new)  # vmapped append over the layer axis
  for i in range(layers):
    k_np, v_np, len_np = np_append(stacked.layer(i).k, stacked.layer(i).v, [0, 0], k_new[i],
                                   v_new[i], np.asarray(num_new))
    assert_cache_equals(scanned.layer(i), k_np, v_np, len_np, [False, False])
    assert_cache_equals(direct.layer(i), k_np, v_np, len_np, [False, False])
  # layer(i) also takes a traced index.
  chex.assert_trees_all_equal(jax.jit(lambda c, i: c.layer(i))(scanned, 2), scanned.layer(2))


def test_stacked_cache_decode_in_scan_over_layers():
  rng = np.random.default_rng(22)
  layers, b, s_max, n, kh, h = 2, 2, 16, 4, 2, 8
  cache = KVCache.init(b, s_max, kh, h, jnp.float32, num_layers=layers)
  cache = jax.jit(lambda c, k, v: c.append(k, v, jnp.array([6, 4], jnp.int32)))(
      cache, rand(rng, (layers, b, 6, kh, h)), rand(rng, (layers, b, 6, kh, h)))
  q = rand(rng, (b, n, h))

  def body(x, c):
    return x, gqa_decode(q, c, implementation="xla")

  _, outs = jax.jit(lambda c: jax.lax.scan(body, 0, c))(cache)
  # The same with a plain Python loop over the layers, and the reference itself, both jitted.
  want = jax.jit(lambda c: jnp.stack([attention_reference(
      q[:, None], c.layer(i).k, c.layer(i).v, kv_lengths=c.layer(i).lengths)[:, 0]
                                      for i in range(layers)]))(cache)
  chex.assert_trees_all_close(outs, want, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(np.asarray(outs[0]) - np.asarray(outs[1]))) > 1e-2  # layers differ


def test_stacked_append_overflow_outside_jit_names_layer_and_row():
  cache = KVCache.init(2, 4, 1, 2, jnp.float32, num_layers=3)
  k_new = jnp.ones((3, 2, 3, 1, 2))
  cache = cache.append(k_new, k_new, jnp.array([3, 1]))
  with pytest.raises(ValueError, match="overflow: layer 0 row 0 holds 3 tokens and appends 2"):
    cache.append(k_new, k_new, jnp.array([2, 2]))
  with pytest.raises(ValueError, match="overflow: layer 0 row 0"):
    cache.append(k_new, k_new)
  with pytest.raises(ValueError, match=r"num_new\[0, 1\] = 4 is outside \[0, T_new=3\]"):
    cache.append(k_new, k_new, jnp.array([0, 4]))
  with pytest.raises(ValueError, match=r"k_new must be rank 5"):
    cache.append(k_new[0], k_new[0])
  # Inside jit the stacked cache follows the same saturate-and-flag policy as a single layer.
  out = jax.jit(lambda c: c.append(k_new, k_new, jnp.array([2, 2])))(cache)
  np.testing.assert_array_equal(np.asarray(out.lengths), [[4, 3]] * 3)
  np.testing.assert_array_equal(np.asarray(out.overflowed), [[True, False]] * 3)


def test_layer_needs_a_stacked_cache():
  with pytest.raises(ValueError, match="stacked cache"):
    KVCache.init(2, 4, 1, 2, jnp.float32).layer(0)


def test_tuple_of_layer_caches_through_jit():
  rng = np.random.default_rng(23)
  caches = tuple(poisoned(KVCache.init(2, 8, 1, 4, jnp.float32)) for _ in range(3))
  traces = []

  @jax.jit
  def step(cs, k, v):
    traces.append(1)
    return tuple(c.append(k * (i + 1), v * (i + 1)) for i, c in enumerate(cs))

  k_new, v_new = rand(rng, (2, 2, 1, 4)), rand(rng, (2, 2, 1, 4))
  out = step(caches, k_new, v_new)
  out = step(out, v_new, k_new)
  assert len(traces) == 1
  assert isinstance(out, tuple) and len(out) == 3 and all(isinstance(c, KVCache) for c in out)
  for i, c in enumerate(out):
    np.testing.assert_array_equal(np.asarray(c.lengths), [4, 4])
    chex.assert_trees_all_equal(c.k[:, :2], k_new * (i + 1))
    chex.assert_trees_all_equal(c.k[:, 2:4], v_new * (i + 1))
    chex.assert_trees_all_equal(c.k[:, 4:], caches[i].k[:, 4:])


# --------------------------------------------------------------------------------------------------
# Buffer donation.
# --------------------------------------------------------------------------------------------------
def test_donated_cache_is_updated_in_place():
  # CPU donation is supported by jax 0.10.2 (checked): the donated k/v buffers are deleted and the
  # new cache aliases them. Were donation unusable, JAX would warn "Some donated buffers were not
  # usable" and leave the inputs alive, so both are asserted.
  rng = np.random.default_rng(24)
  cache = poisoned(KVCache.init(2, 16, 2, 8, jnp.float32))
  k_new, v_new = rand(rng, (2, 3, 2, 8)), rand(rng, (2, 3, 2, 8))
  # np.array copies. A live zero-copy view (np.asarray of a CPU array) pins the buffer: jax 0.10.2
  # then silently copies instead of donating and the input is not deleted (checked).
  k_before, v_before = np.array(cache.k), np.array(cache.v)
  k_ptr = cache.k.unsafe_buffer_pointer()
  append = jax.jit(lambda c, k, v: c.append(k, v), donate_argnums=0)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = append(cache, k_new, v_new)
    out.k.block_until_ready()
  assert not [w for w in caught if "donated buffers were not usable" in str(w.message)]
  assert cache.k.is_deleted() and cache.v.is_deleted()
  assert not out.k.is_deleted()
  assert out.k.unsafe_buffer_pointer() == k_ptr  # the same memory, updated in place
  k_np, v_np, len_np = np_append(k_before, v_before, [0, 0], k_new, v_new, [3, 3])
  assert_cache_equals(out, k_np, v_np, len_np)
  # The donated cache can no longer be used; the new one can be donated again.
  with pytest.raises(RuntimeError, match="deleted"):
    np.asarray(cache.k)
  out2 = append(out, k_new, v_new)
  assert out.k.is_deleted()
  np.testing.assert_array_equal(np.asarray(out2.lengths), [6, 6])


def test_layer_index_out_of_range_is_refused():
  cache = KVCache.init(2, 8, 2, 16, num_layers=3)
  assert cache.layer(-1).k.shape == cache.layer(2).k.shape
  for bad in (3, -4, 10):
    with pytest.raises(ValueError, match=f"layer index {bad} is out of range for a cache of 3"):
      cache.layer(bad)
  with pytest.raises(TypeError, match="got a bool"):
    cache.layer(True)
