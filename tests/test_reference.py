"""``attention_reference`` against an independent float64 NumPy loop and ``jax.nn``.

The loop below is written straight from the semantics in docs/design.md, one ``(b, t, n)`` at a
time, and shares no code with the package: key ``j`` is visible to query row ``t`` of batch row
``b`` iff ``j < kv_lengths[b]`` and (when causal) ``j <= q_offset[b] + t``; defaults ``kv_lengths
= S`` and ``q_offset = kv_lengths - T``; a row with no visible key gives 0 and lse ``-inf``.
"""
import math
import zlib

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_pallas import attention_reference

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Under jit: one compilation per shape instead of one per primitive (eager dispatch on CPU is slow
# the first time a shape is seen). test_jit_and_vmap_agree_with_eager covers the eager path.
ref = jax.jit(attention_reference,
              static_argnames=("causal", "scale", "return_lse", "compute_dtype"))
nn_attention = jax.jit(jax.nn.dot_product_attention, static_argnames=("is_causal", "implementation"))


# --------------------------------------------------------------------------------------------------
# The independent definition.
# --------------------------------------------------------------------------------------------------
def loop_attention(q, k, v, *, causal=True, q_offset=None, kv_lengths=None, scale=None):
  """float64, one query row and head at a time. Returns ``(out [B,T,N,H], lse [B,T,N])``."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_size, t_size, n_size, h_size = q.shape
  s_size, k_size = k.shape[1], k.shape[2]
  group = n_size // k_size
  if kv_lengths is None:
    kv_lengths = np.full((b_size,), s_size, np.int64)
  kv_lengths = np.broadcast_to(np.asarray(kv_lengths, np.int64), (b_size,))
  if q_offset is None:
    q_offset = kv_lengths - t_size
  q_offset = np.broadcast_to(np.asarray(q_offset, np.int64), (b_size,))
  if scale is None:
    scale = 1.0 / math.sqrt(h_size)
  out = np.zeros((b_size, t_size, n_size, h_size), np.float64)
  lse = np.full((b_size, t_size, n_size), -np.inf, np.float64)
  for b in range(b_size):
    for t in range(t_size):
      for n in range(n_size):
        kv_head = n // group
        visible = [j for j in range(s_size)
                   if j < kv_lengths[b] and (not causal or j <= q_offset[b] + t)]
        if not visible:
          continue  # out stays exactly 0, lse stays -inf
        logits = np.array([scale * np.dot(q[b, t, n], k[b, j, kv_head]) for j in visible])
        m = logits.max()
        w = np.exp(logits - m)
        z = w.sum()
        acc = np.zeros((h_size,), np.float64)
        for w_j, j in zip(w, visible):
          acc += w_j * v[b, j, kv_head]
        out[b, t, n] = acc / z
        lse[b, t, n] = m + np.log(z)
  return out, lse


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------
def _seed(*parts) -> int:
  return zlib.crc32(repr(parts).encode())


def make_qkv(seed, b, t, s, n, k, h, dtype):
  """Random q/k/v in ``dtype`` and the exact same values as float64 (what the loop sees)."""
  rng = np.random.default_rng(seed)
  arrays = [jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
            for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h))]
  exact = [np.asarray(x.astype(jnp.float32), np.float64) for x in arrays]
  return arrays, exact


def to64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def assert_matches_loop(out, lse, want_out, want_lse, dtype):
  """Output in q's dtype, within one rounding of the float64 loop; lse float32; empty rows exact."""
  chex.assert_shape(out, want_out.shape)
  chex.assert_shape(lse, want_lse.shape)
  assert out.dtype == jnp.dtype(dtype), (out.dtype, dtype)
  assert lse.dtype == jnp.float32, lse.dtype
  out64, lse64 = to64(out), to64(lse)
  assert np.all(np.isfinite(out64)), "non-finite output"
  # float32 compute: ~1e-6 relative; low precision: one rounding of the output (<= eps * |x|).
  rtol = 2e-6 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
  chex.assert_trees_all_close(out64, want_out, rtol=rtol, atol=2e-6)
  empty = np.isneginf(want_lse)
  np.testing.assert_array_equal(np.isneginf(lse64), empty, err_msg="lse -inf pattern")
  assert not np.any(np.isnan(lse64)), "NaN in lse"
  # Rows with no visible key: exactly zero, not merely small.
  assert np.all(out64[empty] == 0.0), "a row with no visible key is not exactly 0"
  chex.assert_trees_all_close(np.where(empty, 0.0, lse64), np.where(empty, 0.0, want_lse),
                              rtol=2e-6, atol=2e-6)


# --------------------------------------------------------------------------------------------------
# Random cases against the loop.
# --------------------------------------------------------------------------------------------------
# (name, B, T, S, N, K, H, causal, kv_lengths, q_offset, scale)
CASES = [
    ("square_odd_mha", 2, 7, 7, 4, 4, 8, True, None, None, None),
    ("t_lt_s_gqa2", 2, 5, 13, 4, 2, 8, True, None, None, None),
    ("t_gt_s_gqa4", 2, 11, 5, 8, 2, 8, True, None, None, None),  # rows t < 6 see no key
    ("gqa7", 1, 3, 9, 7, 1, 16, True, None, None, None),
    ("gqa7_k2", 2, 3, 10, 14, 2, 8, True, [10, 4], None, None),
    ("gqa8_decode", 2, 1, 17, 16, 2, 8, True, [17, 9], None, None),
    ("mqa_noncausal", 2, 9, 9, 6, 1, 8, False, None, None, None),
    ("ragged_with_zero", 4, 4, 13, 8, 2, 8, True, [0, 3, 13, 7], None, None),
    ("ragged_noncausal", 3, 6, 11, 4, 2, 8, False, [0, 11, 5], None, None),
    ("q_offset_neg", 3, 5, 9, 4, 1, 8, True, [9, 0, 8], [-3, 0, 20], None),
    ("q_offset_only", 3, 4, 12, 6, 2, 8, True, None, [-10, 2, 5], None),
    ("q_offset_noncausal", 2, 4, 12, 6, 2, 8, False, [7, 12], [-10, 100], None),  # ignored
    ("custom_scale_small", 2, 6, 10, 8, 4, 8, True, [10, 3], None, 0.37),
    ("custom_scale_large", 2, 6, 10, 4, 2, 8, True, None, None, 2.5),
    ("t_gt_s_ragged", 2, 8, 3, 4, 2, 8, True, [3, 1], None, None),
]


# Every case in float32; a representative subset (one per feature) in bf16 and fp16 as well.
LOW_PRECISION_CASES = ("square_odd_mha", "t_gt_s_gqa4", "gqa7_k2", "ragged_with_zero",
                       "q_offset_neg", "custom_scale_large")
CASE_PARAMS = [pytest.param(c, d, id=f"{c[0]}-{d}") for c in CASES for d in DTYPES
               if d == "float32" or c[0] in LOW_PRECISION_CASES]


@pytest.mark.parametrize("case,dtype_name", CASE_PARAMS)
def test_matches_float64_loop(case, dtype_name):
  name, b, t, s, n, k, h, causal, kv_lengths, q_offset, scale = case
  dtype = DTYPES[dtype_name]
  (q, kk, vv), exact = make_qkv(_seed(name, dtype_name), b, t, s, n, k, h, dtype)
  kv_arr = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
  qo_arr = None if q_offset is None else jnp.asarray(q_offset, jnp.int32)
  out, lse = ref(q, kk, vv, causal=causal, q_offset=qo_arr, kv_lengths=kv_arr,
                                 scale=scale, return_lse=True)
  want_out, want_lse = loop_attention(*exact, causal=causal, q_offset=q_offset,
                                      kv_lengths=kv_lengths, scale=scale)
  assert_matches_loop(out, lse, want_out, want_lse, dtype)
  if dtype_name != "float32" or name not in LOW_PRECISION_CASES:
    return
  # Without return_lse: the same output alone.
  out_only = ref(q, kk, vv, causal=causal, q_offset=qo_arr, kv_lengths=kv_arr,
                                 scale=scale)
  chex.assert_trees_all_equal(out_only, out)


def test_t_greater_than_s_rows_without_keys_are_exactly_zero():
  b, t, s, n, k, h = 2, 9, 4, 4, 2, 8
  (q, kk, vv), _ = make_qkv(_seed("t>s"), b, t, s, n, k, h, jnp.float32)
  out, lse = ref(q, kk, vv, return_lse=True)
  # Default q_offset = S - T = -5: rows 0..4 sit before position 0, rows 5..8 see keys 0..t-5.
  np.testing.assert_array_equal(np.asarray(out[:, : t - s]), 0.0)
  assert np.all(np.isneginf(np.asarray(lse[:, : t - s])))
  assert np.all(np.abs(np.asarray(out[:, t - s:])) > 0)
  assert np.all(np.isfinite(np.asarray(lse[:, t - s:])))
  # The last row sees every key; the first non-empty row sees exactly key 0, i.e. out == v[:, 0].
  g = n // k
  chex.assert_trees_all_close(out[:, t - s], jnp.repeat(vv[:, 0], g, axis=1), rtol=1e-6)


def test_kv_length_zero_and_empty_key_axis():
  (q, kk, vv), _ = make_qkv(_seed("empty"), 2, 3, 5, 4, 2, 8, jnp.bfloat16)
  out, lse = ref(q, kk, vv, kv_lengths=jnp.array([0, 0], jnp.int32),
                                 return_lse=True)
  np.testing.assert_array_equal(to64(out), 0.0)
  assert np.all(np.isneginf(np.asarray(lse)))
  # S == 0: every row is empty (no reduction over an empty axis may fail).
  out0, lse0 = ref(q, kk[:, :0], vv[:, :0], return_lse=True)
  chex.assert_shape(out0, q.shape)
  np.testing.assert_array_equal(to64(out0), 0.0)
  assert np.all(np.isneginf(np.asarray(lse0)))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("causal", [True, False])
def test_garbage_past_kv_lengths_never_reaches_the_output(dtype_name, causal):
  dtype = DTYPES[dtype_name]
  b, t, s, n, k, h = 4, 3, 12, 8, 2, 8
  (q, kk, vv), exact = make_qkv(_seed("nan", dtype_name, causal), b, t, s, n, k, h, dtype)
  lengths = np.array([12, 5, 0, 1])
  past = np.arange(s)[None, :, None, None] >= lengths[:, None, None, None]
  k_bad = jnp.where(past, jnp.nan, kk)
  v_bad = jnp.where(past, jnp.asarray(jnp.inf, dtype), vv)
  # The NaN/inf really are there (the test would be vacuous otherwise).
  assert np.isnan(to64(k_bad)).sum() == past.sum() * k * h
  kw = dict(causal=causal, kv_lengths=jnp.asarray(lengths, jnp.int32), return_lse=True)
  out_bad, lse_bad = ref(q, k_bad, v_bad, **kw)
  out_ok, lse_ok = ref(q, kk, vv, **kw)
  assert np.all(np.isfinite(to64(out_bad)))
  assert not np.any(np.isnan(np.asarray(lse_bad)))
  chex.assert_trees_all_equal((out_bad, lse_bad), (out_ok, lse_ok))
  want_out, want_lse = loop_attention(*exact, causal=causal, kv_lengths=lengths)
  assert_matches_loop(out_bad, lse_bad, want_out, want_lse, dtype)


def test_defaults_are_bottom_right_and_differ_from_top_left():
  """A wrong alignment must be caught: top-left (q_offset = 0) differs from the default for T < S."""
  b, t, s, n, k, h = 2, 4, 10, 4, 2, 8
  (q, kk, vv), exact = make_qkv(_seed("align"), b, t, s, n, k, h, jnp.float32)
  default = ref(q, kk, vv)
  explicit = ref(q, kk, vv, q_offset=jnp.full((b,), s - t, jnp.int32),
                                 kv_lengths=jnp.full((b,), s, jnp.int32))
  chex.assert_trees_all_close(default, explicit, rtol=1e-6, atol=1e-6)
  top_left = ref(q, kk, vv, q_offset=jnp.zeros((b,), jnp.int32))
  assert np.max(np.abs(to64(top_left) - to64(default))) > 1e-2
  want_tl, _ = loop_attention(*exact, q_offset=[0, 0])
  chex.assert_trees_all_close(to64(top_left), want_tl, rtol=2e-6, atol=2e-6)


def test_query_head_n_reads_kv_head_n_div_g():
  """GQA == MHA over ``repeat(k, G)`` (HF ``repeat_kv`` order), and != the ``n % K`` order."""
  b, t, s, n, k, h = 2, 5, 9, 8, 2, 8
  g = n // k
  (q, kk, vv), _ = make_qkv(_seed("heads"), b, t, s, n, k, h, jnp.float32)
  out = ref(q, kk, vv)
  rep = ref(q, jnp.repeat(kk, g, axis=2), jnp.repeat(vv, g, axis=2))
  tile = ref(q, jnp.tile(kk, (1, 1, g, 1)), jnp.tile(vv, (1, 1, g, 1)))
  chex.assert_trees_all_close(out, rep, rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(np.asarray(out) - np.asarray(tile))) > 1e-2


def test_per_row_vectors_accept_ints_and_out_of_range_values():
  b, t, s, n, k, h = 2, 3, 8, 4, 2, 8
  (q, kk, vv), exact = make_qkv(_seed("ints"), b, t, s, n, k, h, jnp.float32)
  # A Python int is broadcast to every row.
  chex.assert_trees_all_close(ref(q, kk, vv, kv_lengths=5),
                              ref(q, kk, vv, kv_lengths=jnp.array([5, 5])), rtol=1e-6, atol=1e-6)
  # kv_lengths beyond S behaves like S, negative like 0 (only the mask uses it).
  out = ref(q, kk, vv, kv_lengths=jnp.array([s + 7, -3]), q_offset=jnp.array([4, 4]),
                            causal=True)
  want, _ = loop_attention(*exact, kv_lengths=[s + 7, -3], q_offset=[4, 4])
  chex.assert_trees_all_close(to64(out), want, rtol=2e-6, atol=2e-6)
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)


def test_jit_and_vmap_agree_with_eager():
  b, t, s, n, k, h = 3, 4, 9, 4, 2, 8
  (q, kk, vv), _ = make_qkv(_seed("jit"), b, t, s, n, k, h, jnp.float32)
  lengths = jnp.array([9, 2, 0], jnp.int32)
  eager = attention_reference(q, kk, vv, kv_lengths=lengths, return_lse=True)
  jitted = jax.jit(lambda *a: ref(*a[:3], kv_lengths=a[3], return_lse=True))(
      q, kk, vv, lengths)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-6)
  per_row = jax.vmap(lambda qb, kb, vb, lb: ref(
      qb[None], kb[None], vb[None], kv_lengths=lb[None], return_lse=True))(q, kk, vv, lengths)
  per_row = jax.tree_util.tree_map(lambda x: x[:, 0], per_row)
  chex.assert_trees_all_close(per_row, eager, rtol=1e-6, atol=1e-6)


def test_low_precision_compute_dtype_is_a_meaningful_yardstick():
  """``compute_dtype=bf16`` (``r_d`` of the parity rule) is finite and measurably worse than f32."""
  (q, kk, vv), exact = make_qkv(_seed("r_d"), 2, 16, 32, 4, 2, 64, jnp.bfloat16)
  want, _ = loop_attention(*exact)
  r32 = to64(ref(q, kk, vv))
  r_d = to64(ref(q, kk, vv, compute_dtype=jnp.bfloat16))
  assert np.all(np.isfinite(r_d))
  err32, err_d = np.abs(r32 - want).max(), np.abs(r_d - want).max()
  assert err_d > err32
  assert err_d < 0.25


@hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
@hypothesis.given(
    b=st.integers(1, 3), t=st.integers(1, 9), s=st.integers(1, 11),
    heads=st.sampled_from([(4, 4), (4, 2), (8, 2), (7, 1), (16, 2), (3, 1)]),
    causal=st.booleans(), data=st.data())
def test_random_shapes_against_loop(b, t, s, heads, causal, data):
  n, k = heads
  lengths = data.draw(st.lists(st.integers(0, s), min_size=b, max_size=b))
  offsets = data.draw(st.one_of(st.none(),
                                st.lists(st.integers(-t - 2, s + 2), min_size=b, max_size=b)))
  (q, kk, vv), exact = make_qkv(_seed(b, t, s, heads, causal, lengths, offsets), b, t, s, n, k, 8,
                                jnp.float32)
  out, lse = ref(
      q, kk, vv, causal=causal, kv_lengths=jnp.asarray(lengths, jnp.int32),
      q_offset=None if offsets is None else jnp.asarray(offsets, jnp.int32), return_lse=True)
  want_out, want_lse = loop_attention(*exact, causal=causal, kv_lengths=lengths, q_offset=offsets)
  assert_matches_loop(out, lse, want_out, want_lse, jnp.float32)


# --------------------------------------------------------------------------------------------------
# Against jax.nn.dot_product_attention, where both define the same thing.
# --------------------------------------------------------------------------------------------------
NN_HEADS = [(4, 4), (4, 2), (7, 1), (16, 2)]  # MHA, GQA 2, odd group, GQA 8


@pytest.mark.parametrize("heads", NN_HEADS, ids=[f"{n}:{k}" for n, k in NN_HEADS])
def test_square_causal_matches_jax_nn(heads):
  n, k = heads
  b, t, h = 2, 13, 16
  (q, kk, vv), _ = make_qkv(_seed("nn_causal", heads), b, t, t, n, k, h, jnp.float32)
  want = nn_attention(q, kk, vv, is_causal=True, implementation="xla")
  chex.assert_trees_all_close(ref(q, kk, vv), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", NN_HEADS, ids=[f"{n}:{k}" for n, k in NN_HEADS])
def test_noncausal_kv_lengths_match_jax_nn(heads):
  n, k = heads
  b, t, s, h = 3, 5, 11, 16
  (q, kk, vv), _ = make_qkv(_seed("nn_lengths", heads), b, t, s, n, k, h, jnp.float32)
  lengths = jnp.array([11, 1, 6], jnp.int32)  # jax.nn leaves empty rows undefined: keep >= 1
  want = nn_attention(q, kk, vv, key_value_seq_lengths=lengths,
                                      implementation="xla")
  got = ref(q, kk, vv, causal=False, kv_lengths=lengths)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,s", [(5, 11), (11, 5), (7, 7)])
def test_top_left_causal_with_lengths_matches_jax_nn_given_q_offset_zero(t, s):
  """``jax.nn`` is top-left aligned: the same mask is ours with ``q_offset = 0``."""
  b, n, k, h = 2, 8, 2, 16
  (q, kk, vv), _ = make_qkv(_seed("nn_tl", t, s), b, t, s, n, k, h, jnp.float32)
  lengths = jnp.array([s, max(1, s - 3)], jnp.int32)
  want = nn_attention(q, kk, vv, is_causal=True, key_value_seq_lengths=lengths,
                                      implementation="xla")
  got = ref(q, kk, vv, kv_lengths=lengths, q_offset=jnp.zeros((b,), jnp.int32))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
  if t != s:  # ... and is not the package's default alignment.
    default = ref(q, kk, vv, kv_lengths=lengths)
    assert np.max(np.abs(np.asarray(default) - np.asarray(want))) > 1e-2


# --------------------------------------------------------------------------------------------------
# Gradients (the reference is also the yardstick of the kernels' backward pass).
# --------------------------------------------------------------------------------------------------
def test_gradients_ignore_garbage_past_kv_lengths():
  """No ``0 * NaN`` in the backward pass either: dq stays finite, dk/dv past kv_lengths are 0."""
  b, t, s, n, k, h = 3, 4, 10, 4, 2, 8
  (q, kk, vv), _ = make_qkv(_seed("grad_nan"), b, t, s, n, k, h, jnp.float32)
  lengths = jnp.array([10, 3, 0], jnp.int32)
  past = np.arange(s)[None, :, None, None] >= np.asarray(lengths)[:, None, None, None]
  k_bad, v_bad = jnp.where(past, jnp.nan, kk), jnp.where(past, jnp.inf, vv)
  w = jnp.asarray(np.random.default_rng(_seed("grad_w")).standard_normal((b, t, n, h)),
                  jnp.float32)

  @jax.jit
  def grads(q, k, v):
    return jax.grad(lambda q, k, v: jnp.sum(attention_reference(q, k, v, kv_lengths=lengths) * w),
                    argnums=(0, 1, 2))(q, k, v)

  g_bad, g_ok = grads(q, k_bad, v_bad), grads(q, kk, vv)
  for g in g_bad:
    assert np.all(np.isfinite(np.asarray(g)))
  chex.assert_trees_all_close(g_bad, g_ok, rtol=1e-6, atol=1e-6)
  past_b = np.broadcast_to(past, kk.shape)
  assert np.all(np.asarray(g_bad[1])[past_b] == 0) and np.all(np.asarray(g_bad[2])[past_b] == 0)
  np.testing.assert_array_equal(np.asarray(g_bad[0][2]), 0.0)  # row with no keys


def test_gradients_match_jax_nn_square_causal():
  b, t, n, k, h = 2, 9, 8, 2, 16
  (q, kk, vv), _ = make_qkv(_seed("grad_nn"), b, t, t, n, k, h, jnp.float32)
  w = jnp.asarray(np.random.default_rng(_seed("grad_nn_w")).standard_normal((b, t, n, h)),
                  jnp.float32)
  loss_ref = lambda *a: jnp.sum(attention_reference(*a) * w)
  loss_nn = lambda *a: jnp.sum(jax.nn.dot_product_attention(*a, is_causal=True,
                                                             implementation="xla") * w)
  g_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2)))(q, kk, vv)
  g_nn = jax.jit(jax.grad(loss_nn, argnums=(0, 1, 2)))(q, kk, vv)
  chex.assert_trees_all_close(g_ref, g_nn, rtol=1e-4, atol=1e-5)
