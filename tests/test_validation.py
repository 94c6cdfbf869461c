"""Every bad input gives a ``ValueError`` / ``TypeError`` that says what was expected.

Each bad case is a one-field change of a good call, and the good call itself is asserted to
succeed, so a check that fired on everything would fail here too.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from gqa_pallas import KVCache, attention_reference, gqa_attention, gqa_decode

B, T, S, N, K, H = 2, 3, 8, 4, 2, 16


def _arr(shape, dtype=jnp.float32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) + 0.25, dtype)


def good_attention_args():
  return dict(q=_arr((B, T, N, H), seed=1), k=_arr((B, S, K, H), seed=2),
              v=_arr((B, S, K, H), seed=3))


ATTENTION_FNS = {
    "attention_reference": attention_reference,
    "gqa_attention_xla": lambda *a, **kw: gqa_attention(*a, implementation="xla", **kw),
    "gqa_attention_auto": gqa_attention,  # None -> "xla" on a machine without a GPU
}

# (id, changes to the good call, exception, message regex)
BAD_ATTENTION = [
    ("q_rank3", dict(q=_arr((B, T, N * H))), ValueError,
     r"q must be rank 4 with layout \[B, T, N, H\]; got shape \(2, 3, 64\)"),
    ("k_rank5", dict(k=_arr((B, S, K, H, 1))), ValueError,
     r"k must be rank 4 with layout \[B, S, K, H\]"),
    ("v_rank3", dict(v=_arr((B, S, K * H))), ValueError,
     r"v must be rank 4 with layout \[B, S, K, H\]"),
    ("q_not_array", dict(q=[[1.0]]), ValueError, r"q must be rank 4 .*got shape None"),
    ("q_int32", dict(q=jnp.ones((B, T, N, H), jnp.int32)), TypeError,
     r"q must have dtype bfloat16, float16, float32; got int32"),
    ("k_float64", dict(k=np.ones((B, S, K, H), np.float64)), TypeError,
     r"k must have dtype bfloat16, float16, float32; got float64"),
    ("v_int8", dict(v=jnp.ones((B, S, K, H), jnp.int8)), TypeError,
     r"v must have dtype bfloat16, float16, float32; got int8"),
    ("dtype_mismatch", dict(k=_arr((B, S, K, H), jnp.bfloat16)), TypeError,
     r"q, k and v must share one dtype; got float32, bfloat16, float32"),
    ("kv_shape_mismatch", dict(v=_arr((B, S + 1, K, H))), ValueError,
     r"k and v must have the same shape \[B, S, K, H\]; got \(2, 8, 2, 16\) and \(2, 9, 2, 16\)"),
    ("batch_mismatch", dict(k=_arr((B + 1, S, K, H)), v=_arr((B + 1, S, K, H))), ValueError,
     r"q and k/v must have the same batch size; got 2 and 3"),
    ("head_dim_mismatch", dict(k=_arr((B, S, K, 2 * H)), v=_arr((B, S, K, 2 * H))), ValueError,
     r"q and k/v must have the same head dim H; got 16 and 32"),
    ("n_not_multiple_of_k", dict(k=_arr((B, S, 3, H)), v=_arr((B, S, 3, H))), ValueError,
     r"number of query heads N=4 must be a multiple of the number of kv heads K=3"),
    ("k_more_heads_than_q", dict(k=_arr((B, S, 8, H)), v=_arr((B, S, 8, H))), ValueError,
     r"N=4 must be a multiple of .* K=8"),
    ("zero_kv_heads", dict(k=_arr((B, S, 0, H)), v=_arr((B, S, 0, H))), ValueError,
     r"k and v must have at least one kv head \(K >= 1\); got k/v \(2, 8, 0, 16\)"),
    ("zero_head_dim", dict(q=_arr((B, T, N, 0)), k=_arr((B, S, K, 0)), v=_arr((B, S, K, 0))),
     ValueError, r"the head dim H must be positive; got q \(2, 3, 4, 0\)"),
    ("kv_lengths_float", dict(kv_lengths=jnp.array([3.0, 4.0])), TypeError,
     r"kv_lengths must be an integer array int32\[2\]; got dtype float32"),
    ("kv_lengths_bool", dict(kv_lengths=np.array([True, False])), TypeError,
     r"kv_lengths must be an integer array int32\[2\]; got dtype bool"),
    ("kv_lengths_wrong_len", dict(kv_lengths=jnp.array([3, 4, 5])), ValueError,
     r"kv_lengths must have shape \[B\] = \(2,\); got \(3,\)"),
    ("kv_lengths_2d", dict(kv_lengths=jnp.ones((2, 1), jnp.int32)), ValueError,
     r"kv_lengths must have shape \[B\] = \(2,\); got \(2, 1\)"),
    ("q_offset_float", dict(q_offset=np.array([0.5, 1.0])), TypeError,
     r"q_offset must be an integer array int32\[2\]; got dtype float64"),
    ("q_offset_wrong_len", dict(q_offset=jnp.array([1])), ValueError,
     r"q_offset must have shape \[B\] = \(2,\); got \(1,\)"),
    ("causal_string", dict(causal="False"), TypeError,
     r"causal must be a bool \(True or False\); got str 'False'"),
    ("return_lse_int", dict(return_lse=1), TypeError, r"return_lse must be a bool"),
    ("scale_string", dict(scale="0.5"), TypeError, r"scale must be a Python float or None; got str"),
    ("scale_array", dict(scale=jnp.array([0.5, 0.5])), TypeError,
     r"scale must be a Python float or None"),
]


@pytest.mark.parametrize("fn_name", list(ATTENTION_FNS))
def test_good_attention_call_passes(fn_name):
  out = ATTENTION_FNS[fn_name](**good_attention_args(), kv_lengths=jnp.array([8, 5]),
                               q_offset=jnp.array([5, 2]), scale=0.3)
  assert out.shape == (B, T, N, H) and out.dtype == jnp.float32


@pytest.mark.parametrize("fn_name", list(ATTENTION_FNS))
@pytest.mark.parametrize("case", BAD_ATTENTION, ids=[c[0] for c in BAD_ATTENTION])
def test_bad_attention_inputs(fn_name, case):
  _, change, exc, match = case
  args = good_attention_args()
  args.update(change)
  with pytest.raises(exc, match=match):
    ATTENTION_FNS[fn_name](**args)


# --------------------------------------------------------------------------------------------------
# gqa_decode
# --------------------------------------------------------------------------------------------------
def _cache(dtype=jnp.float32, **kw):
  args = dict(batch=B, max_length=S, num_kv_heads=K, head_dim=H)
  args.update(kw)
  cache = KVCache.init(args["batch"], args["max_length"], args["num_kv_heads"], args["head_dim"],
                       dtype)
  t_new = 3
  k_new = _arr((args["batch"], t_new, args["num_kv_heads"], args["head_dim"]), dtype, seed=5)
  return cache.append(k_new, -k_new)


@pytest.mark.parametrize("q_shape", [(B, N, H), (B, 1, N, H), (B, 3, N, H), (B, 16, N, H)])
def test_good_decode_call_passes(q_shape):
  out = gqa_decode(_arr(q_shape), _cache(), implementation="xla")
  assert out.shape == q_shape


BAD_DECODE = [
    ("t17", dict(q=_arr((B, 17, N, H))), ValueError,
     r"gqa_decode handles T <= 16 new tokens per row; got T=17.*gqa_attention"),
    ("q_rank2", dict(q=_arr((B, N * H))), ValueError,
     r"q must be rank 4 with layout \[B, N, H\] or \[B, T, N, H\]; got shape \(2, 64\)"),
    ("q_rank5", dict(q=_arr((B, 1, 1, N, H))), ValueError,
     r"q must be rank 4 with layout \[B, N, H\] or \[B, T, N, H\]"),
    ("cache_tuple", dict(cache=(jnp.zeros((B, S, K, H)),) * 2), TypeError,
     r"cache must be a gqa_pallas.KVCache; got tuple"),
    ("cache_array", dict(cache=jnp.zeros((B, S, K, H))), TypeError,
     r"cache must be a gqa_pallas.KVCache; got .*Array"),
    ("cache_stacked", dict(cache=KVCache.init(B, S, K, H, jnp.float32, num_layers=2)), ValueError,
     r"gqa_decode takes one layer's cache; index a stacked cache with cache.layer\(i\)"),
    ("dtype_mismatch", dict(q=_arr((B, N, H), jnp.bfloat16)), TypeError,
     r"q, k and v must share one dtype; got bfloat16, float32, float32"),
    ("q_int32", dict(q=jnp.ones((B, N, H), jnp.int32)), TypeError,
     r"q must have dtype bfloat16, float16, float32; got int32"),
    ("q_float64", dict(q=np.ones((B, N, H), np.float64)), TypeError,
     r"q must have dtype bfloat16, float16, float32; got float64"),
    ("batch_mismatch", dict(q=_arr((B + 1, N, H))), ValueError,
     r"q and k/v must have the same batch size; got 3 and 2"),
    ("head_dim_mismatch", dict(q=_arr((B, N, H // 2))), ValueError,
     r"q and k/v must have the same head dim H; got 8 and 16"),
    ("n_not_multiple_of_k", dict(q=_arr((B, 3, H))), ValueError,
     r"number of query heads N=3 must be a multiple of the number of kv heads K=2"),
    ("q_offset_float", dict(q_offset=jnp.array([1.0, 2.0])), TypeError,
     r"q_offset must be an integer array int32\[2\]"),
    ("q_offset_shape", dict(q_offset=jnp.array([1, 2, 3])), ValueError,
     r"q_offset must have shape \[B\] = \(2,\); got \(3,\)"),
    ("scale_string", dict(scale="x"), TypeError, r"scale must be a Python float or None"),
    ("interpret_string", dict(interpret="false"), TypeError, r"interpret must be a bool"),
    ("return_lse_none", dict(return_lse=None), TypeError, r"return_lse must be a bool"),
]


@pytest.mark.parametrize("case", BAD_DECODE, ids=[c[0] for c in BAD_DECODE])
def test_bad_decode_inputs(case):
  _, change, exc, match = case
  args = dict(q=_arr((B, N, H)), cache=_cache(), implementation="xla")
  args.update(change)
  with pytest.raises(exc, match=match):
    gqa_decode(**args)


# --------------------------------------------------------------------------------------------------
# KVCache
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,exc,match", [
    ((0, S, K, H), ValueError, r"KVCache.init: batch must be a positive int; got 0"),
    ((B, 0, K, H), ValueError, r"KVCache.init: max_length must be a positive int; got 0"),
    ((B, S, -2, H), ValueError, r"KVCache.init: num_kv_heads must be a positive int; got -2"),
    ((B, S, K, "64"), ValueError, r"KVCache.init: head_dim must be a positive int; got '64'"),
    ((B, 8.5, K, H), ValueError, r"KVCache.init: max_length must be a positive int; got 8.5"),
    ((B, S, K, H, jnp.int32), TypeError,
     r"KVCache.init: dtype must be bfloat16, float16, float32; got int32"),
    ((B, S, K, H, np.float64), TypeError,
     r"KVCache.init: dtype must be bfloat16, float16, float32; got .*float64"),
])
def test_bad_cache_init(args, exc, match):
  with pytest.raises(exc, match=match):
    KVCache.init(*args)


def test_good_cache_append_passes():
  out = _cache().append(_arr((B, 2, K, H)), _arr((B, 2, K, H)), jnp.array([2, 0]))
  np.testing.assert_array_equal(np.asarray(out.lengths), [5, 3])


BAD_APPEND = [
    ("k_rank3", dict(k_new=_arr((B, K, H))), ValueError,
     r"k_new must be rank 4 with layout \[B, T_new, K, H\]"),
    ("v_rank5", dict(v_new=_arr((B, 2, K, H, 1))), ValueError,
     r"v_new must be rank 4 with layout \[B, T_new, K, H\]"),
    ("kv_shape_mismatch", dict(v_new=_arr((B, 3, K, H))), ValueError,
     r"k_new and v_new must have the same shape; got \(2, 2, 2, 16\) and \(2, 3, 2, 16\)"),
    ("wrong_batch", dict(k_new=_arr((B + 1, 2, K, H)), v_new=_arr((B + 1, 2, K, H))), ValueError,
     r"append expects \[B, T_new, K, H\] = \[2, T_new, 2, 16\]; got \(3, 2, 2, 16\)"),
    ("wrong_heads", dict(k_new=_arr((B, 2, K + 1, H)), v_new=_arr((B, 2, K + 1, H))), ValueError,
     r"append expects \[B, T_new, K, H\] = \[2, T_new, 2, 16\]"),
    ("wrong_head_dim", dict(k_new=_arr((B, 2, K, 8)), v_new=_arr((B, 2, K, 8))), ValueError,
     r"append expects \[B, T_new, K, H\] = \[2, T_new, 2, 16\]; got \(2, 2, 2, 8\)"),
    ("int_values", dict(k_new=jnp.ones((B, 2, K, H), jnp.int32)), TypeError,
     r"k_new must have dtype bfloat16, float16, float32; got int32"),
    ("num_new_float", dict(num_new=jnp.array([1.0, 1.0])), TypeError,
     r"num_new must be an integer array int32\[2\]; got dtype float32"),
    ("num_new_shape", dict(num_new=jnp.array([1, 1, 1])), ValueError,
     r"num_new must have shape \[B\] = \(2,\); got \(3,\)"),
    ("num_new_too_big", dict(num_new=jnp.array([1, 3])), ValueError,
     r"num_new\[1\] = 3 is outside \[0, T_new=2\]"),
    ("num_new_negative", dict(num_new=jnp.array([-1, 0])), ValueError,
     r"num_new\[0\] = -1 is outside \[0, T_new=2\]"),
    ("overflow", dict(k_new=_arr((B, 6, K, H)), v_new=_arr((B, 6, K, H)),
                      num_new=jnp.array([5, 6])), ValueError,
     r"KV cache overflow: row 1 holds 3 tokens and appends 6, more than max_length=8"),
]


@pytest.mark.parametrize("case", BAD_APPEND, ids=[c[0] for c in BAD_APPEND])
def test_bad_cache_append(case):
  _, change, exc, match = case
  args = dict(k_new=_arr((B, 2, K, H)), v_new=_arr((B, 2, K, H)), num_new=None)
  args.update(change)
  with pytest.raises(exc, match=match):
    _cache().append(**args)


@pytest.mark.parametrize("rows,exc,match", [
    (np.array([True, False, True]), ValueError, r"reset: a row mask must be bool\[2\]; got \(3,\)"),
    ([0, 2], ValueError, r"reset: row indices must be in \[0, 2\); got \[0 2\]"),
    ([-1], ValueError, r"reset: row indices must be in \[0, 2\)"),
    (np.array([0.0, 1.0]), TypeError, r"reset: rows must be a bool mask or integer indices; "
                                      r"got float"),
])
def test_bad_cache_reset(rows, exc, match):
  with pytest.raises(exc, match=match):
    _cache().reset(rows)


def test_layer_of_an_unstacked_cache():
  with pytest.raises(ValueError, match=r"layer\(i\) needs a stacked cache \(created with "
                                       r"num_layers=...\)"):
    _cache().layer(0)


@pytest.mark.parametrize("bad,error,match", [
    (True, TypeError, "got a bool"),
    (2 ** 31, ValueError, "must fit int32"),
    (-2 ** 31 - 1, ValueError, "must fit int32"),
    ([1, 2 ** 40], ValueError, "must fit int32"),
    (np.array([2 ** 33, 1], np.int64), ValueError, "must fit int32"),
])
def test_per_row_integers_never_wrap(bad, error, match):
  """Lengths and offsets outside int32 (or bools) are refused, not wrapped."""
  q = jnp.zeros((2, 3, 4, 16), jnp.float32)
  k = jnp.zeros((2, 5, 2, 16), jnp.float32)
  for name in ("kv_lengths", "q_offset"):
    with pytest.raises(error, match=f"{name} must" if error is ValueError else match):
      gqa_attention(q, k, k, **{name: bad})
