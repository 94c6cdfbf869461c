"""Non-finite values in slots a query cannot see (design.md, "Invisible slots"), on every backend.

NaN, +inf and -inf are written into K/V slots that are inside ``kv_lengths`` but causally in some
queries' future, outside their window, or in every query's future, and past the lengths. Rows
that cannot see a bad slot must equal the reference on the same inputs with those slots cleared
(outputs and lse); rows that see a bad V value must be non-finite in that feature (the reference
makes them NaN). Gradients: a bad slot no query sees never reaches a gradient.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_pallas as gp
from gqa_pallas import devices, registry
from gqa_pallas.validation import AttentionDims
from tests import backend_cases, numerics

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
BAD_VALUES = (jnp.nan, jnp.inf, -jnp.inf)

# name, (B, T, S, N, K, H), kv_lengths, q_offset, window, bad slots: (kind, row, slot, kv head,
# feature, value index). The feature is None for a whole slot.
CASES = [
    # Square causal: a V value causally in the future of the early rows of the diagonal block
    # (and of whole earlier blocks); a K value likewise; NaN past the length of row 1.
    ("causal", (2, 40, 40, 8, 2, 64), [40, 31], None, None,
     [("v", 0, 21, 0, 5, 1), ("k", 0, 30, 1, 3, 0), ("v", 1, 9, 1, None, 2)]),
    # A chunk of T < S queries whose keys run past every query's position inside kv_lengths.
    ("future", (2, 6, 50, 4, 4, 64), [50, 40], [20, 3], None,
     [("v", 0, 33, 2, None, 1), ("k", 0, 27, 1, 7, 2), ("v", 1, 9, 3, 0, 0),
      ("k", 1, 39, 0, None, 1)]),
    # A window of 7: a bad V slot seen by positions 5..11 and not by the later ones.
    ("window", (1, 40, 40, 4, 2, 64), None, None, 7,
     [("v", 0, 5, 0, 2, 1), ("v", 0, 16, 1, None, 0)]),
]


# The same kinds at realistic sizes, compiled on the GPU.
GPU_CASES = [
    ("causal", (2, 1000, 1000, 32, 8, 128), [1000, 700], None, None,
     [("v", 0, 517, 3, 5, 1), ("k", 0, 900, 1, 3, 0), ("v", 1, 130, 6, None, 2)]),
    ("future", (1, 256, 4096, 32, 8, 128), [4000], [1000], None,
     [("v", 0, 1300, 2, None, 1), ("k", 0, 3999, 1, 7, 2), ("v", 0, 1256, 7, 0, 0)]),
    ("window", (1, 2048, 2048, 16, 4, 128), None, None, 512,
     [("v", 0, 300, 0, 2, 1), ("v", 0, 1500, 3, None, 0)]),
]
GPU_DECODE_CASE = ("decode", (4, 4, 8192, 32, 8, 128), [8192, 5000, 4, 7001], None, None,
                   [("v", 0, 8191, 0, 4, 1), ("k", 1, 4999, 1, None, 0),
                    ("v", 3, 7000, 5, None, 2), ("v", 2, 3, 7, None, 1)])


def _dims(case):
  _, (b, t, s, n, k, h), *_ = case
  return AttentionDims(b, t, s, n, k, h)


def _inputs(case, dtype):
  """``(q, k, v, k_clean, v_clean, kv_lengths, q_offset, bad_v_rows, bad_any_rows)``; the masks
  are bool ``[B, T, N]`` (rows that see a bad V slot / any bad slot)."""
  name, (b, t, s, n, kh, h), kvl, qo, window, bad = case
  kv_lengths = None if kvl is None else jnp.array(kvl, jnp.int32)
  q_offset = None if qo is None else jnp.array(qo, jnp.int32)
  q, k, v = numerics.random_qkv(len(name), b, t, s, n, kh, h, dtype, kv_lengths)
  k_clean = jnp.where(jnp.isnan(k), 0, k)  # past the lengths (random_qkv's NaN)
  v_clean = jnp.where(jnp.isnan(v), 0, v)
  lengths = kv_lengths if kv_lengths is not None else jnp.full((b,), s, jnp.int32)
  offsets = q_offset if q_offset is not None else lengths - t
  visible = np.asarray(gp.reference.visibility_mask(t, s, offsets, lengths, True, window))
  g = n // kh
  sees_v = np.zeros((b, t, n), bool)
  sees_any = np.zeros((b, t, n), bool)
  for kind, row, slot, head, feature, value in bad:
    idx = (row, slot, head) if feature is None else (row, slot, head, feature)
    if kind == "k":
      k = k.at[idx].set(BAD_VALUES[value])
    else:
      v = v.at[idx].set(BAD_VALUES[value])
    seen = visible[row, :, slot]  # [T]
    heads = slice(head * g, (head + 1) * g)
    sees_any[row, seen, heads] = True
    if kind == "v":
      sees_v[row, seen, heads] = True
  return q, k, v, k_clean, v_clean, kv_lengths, q_offset, window, sees_v, sees_any


def _check(out, lse, case, dtype, factor=2.0):
  q, k, v, k_clean, v_clean, kv_lengths, q_offset, window, sees_v, sees_any = _inputs(case, dtype)
  kw = dict(kv_lengths=kv_lengths, q_offset=q_offset, sliding_window=window)
  r32, lse32 = gp.attention_reference(q, k_clean, v_clean, return_lse=True, **kw)
  r_d = gp.attention_reference(q, k_clean, v_clean, compute_dtype=dtype, **kw)
  clean = ~sees_any[..., None]
  numerics.assert_parity(jnp.where(clean, out, 0), jnp.where(clean, r32, 0),
                         jnp.where(clean, r_d, 0), factor=factor)
  lse = np.asarray(lse)
  np.testing.assert_allclose(lse[~sees_any], np.asarray(lse32)[~sees_any], rtol=1e-5, atol=2e-5)
  # Rows that see a bad V value: non-finite where it is (the whole row for a bad slot).
  name, _, _, _, _, bad = case
  o = np.asarray(jnp.asarray(out, jnp.float32))
  for kind, row, slot, head, feature, _ in bad:
    if kind != "v":
      continue
    g = q.shape[2] // k.shape[2]
    rows = sees_v[row, :, head * g]
    cols = o[row, rows, head * g:(head + 1) * g]
    cols = cols if feature is None else cols[..., feature]
    assert not np.isfinite(cols).any(), f"{name}: a row that sees a non-finite V stayed finite"


def _problem(name, case, dtype, op="prefill", tier="cpu"):
  return registry.Problem(op, _dims(case), jnp.dtype(dtype).name, causal=True,
                          interpret=backend_cases.interpret_for(name, tier),
                          device=backend_cases.device_for(tier), sliding_window=case[4])


def _params(cases, tier, op="prefill", dtypes=(BF16, F16, F32)):
  out = []
  names = registry.implementing(op) if tier == "cpu" else backend_cases.implementing(op)
  marks = [pytest.mark.gpu] if tier == "gpu" else []
  for name in names:
    backend = registry.get(name)
    for case in cases:
      dtype = next((d for d in dtypes
                    if backend.unsupported(_problem(name, case, d, op, tier)) is None), None)
      if dtype is not None:
        out.append(pytest.param(name, case, dtype, tier, id=f"{name}-{case[0]}",
                                marks=marks))
  return out


@pytest.mark.parametrize("name,case,dtype,tier", _params(CASES, "cpu") + _params(
    GPU_CASES, "gpu", dtypes=(BF16,)))
def test_prefill_invisible_slots(name, case, dtype, tier):
  q, k, v, _, _, kv_lengths, q_offset, window, _, _ = _inputs(case, dtype)
  out, lse = gp.gqa_attention(q, k, v, kv_lengths=kv_lengths, q_offset=q_offset,
                              sliding_window=window, implementation=name,
                              interpret=backend_cases.interpret_for(name, tier),
                              return_lse=True)
  _check(out, lse, case, dtype)


def test_reference_rows_that_see_a_bad_slot_are_nan():
  """The reference's own answer for the rows that see a bad value: NaN (output; the lse too
  for a bad K), and for the others exactly the answer with the slots cleared."""
  case = CASES[0]
  q, k, v, k_clean, v_clean, kv_lengths, q_offset, window, sees_v, sees_any = _inputs(case, F32)
  kw = dict(kv_lengths=kv_lengths, q_offset=q_offset, sliding_window=window, return_lse=True)
  out, lse = gp.attention_reference(q, k, v, **kw)
  clean_out, clean_lse = gp.attention_reference(q, k_clean, v_clean, **kw)
  out, lse = np.asarray(out), np.asarray(lse)
  assert np.isnan(out[sees_any]).all()
  np.testing.assert_array_equal(out[~sees_any], np.asarray(clean_out)[~sees_any])
  sees_k = sees_any & ~sees_v
  assert sees_k.any() and np.isnan(lse[sees_k]).all()
  np.testing.assert_array_equal(lse[~sees_any], np.asarray(clean_lse)[~sees_any])


DECODE_CASE = ("decode", (2, 3, 48, 8, 2, 64), [30, 44], None, None,
               [("v", 0, 29, 0, 4, 1), ("k", 1, 43, 1, None, 0), ("v", 1, 43, 0, None, 2)])


@pytest.mark.parametrize("name,case,dtype,tier", _params([DECODE_CASE], "cpu", "decode") + _params(
    [GPU_DECODE_CASE], "gpu", "decode", dtypes=(BF16,)))
def test_decode_invisible_slots(name, case, dtype, tier):
  """T new tokens: the last slots of a row are in the future of its first queries."""
  q, k, v, _, _, kv_lengths, _, _, _, _ = _inputs(case, dtype)
  cache = gp.KVCache(k=k, v=v, lengths=kv_lengths,
                     overflowed=jnp.zeros(kv_lengths.shape, bool))
  out, lse = gp.gqa_decode(q, cache, implementation=name,
                           interpret=backend_cases.interpret_for(name, tier), return_lse=True)
  _check(out, lse, case, dtype, factor=3.0)


def _grad_params():
  case = CASES[1]  # bad slots no query sees: the gradients must equal the clean ones
  out = []
  for name in registry.implementing("prefill"):
    backend = registry.get(name)
    dtype = next((d for d in (F32, BF16, F16)
                  if backend.unsupported(_problem(name, case, d)) is None), None)
    if dtype is not None:
      out.append(pytest.param(name, dtype, id=name))
  return out


@pytest.mark.parametrize("name,dtype", _grad_params())
def test_gradients_ignore_slots_no_query_sees(name, dtype):
  case = CASES[1]
  q, k, v, k_clean, v_clean, kv_lengths, q_offset, _, _, sees_any = _inputs(case, dtype)
  assert not sees_any.any()
  ct = jax.random.normal(jax.random.key(7), q.shape, F32)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v).astype(F32) * ct)

  def kernel(q, k, v):
    return gp.gqa_attention(q, k, v, kv_lengths=kv_lengths, q_offset=q_offset,
                            implementation=name,
                            interpret=backend_cases.interpret_for(name, "cpu"))

  def ref(q, k, v, compute_dtype=F32):
    return gp.attention_reference(q, k, v, kv_lengths=kv_lengths, q_offset=q_offset,
                                  compute_dtype=compute_dtype)

  grads = jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2))(q, k, v)
  r32 = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k_clean, v_clean)
  r_d = jax.grad(lambda *a: loss(lambda *b: ref(*b, compute_dtype=dtype), *a),
                 argnums=(0, 1, 2))(q, k_clean, v_clean)
  for what, g, g32, gd in zip("qkv", grads, r32, r_d):
    numerics.assert_parity(g, g32, gd, factor=3.0, name=f"d{what}")


@pytest.mark.skipif("mosaic" not in registry.names(), reason="no Mosaic GPU backend")
def test_mosaic_split_keys():
  """The Mosaic prefill with its keys split over CTAs (chunked prefill): a bad V slot in the
  last split poisons only the rows that see it; one in the first split poisons every row, and a
  later one in another split is cleared there (the splits merge into NaN)."""
  from gqa_pallas.mosaic.prefill import MosaicPrefillConfig  # pylint: disable=g-import-not-at-top
  q, k, v = numerics.random_qkv(5, 1, 20, 300, 4, 2, 64, BF16)
  q_offset = jnp.array([280], jnp.int32)
  for bad_slots in ([290], [150, 295]):
    bad_v = v
    for slot in bad_slots:
      bad_v = bad_v.at[0, slot, 1, 3].set(jnp.inf)
    out = gp.gqa_attention(q, k, bad_v, q_offset=q_offset, implementation="mosaic",
                           interpret=True, config=MosaicPrefillConfig(kv_splits=2))
    ref = gp.attention_reference(q, k, bad_v, q_offset=q_offset)
    np.testing.assert_array_equal(~np.isfinite(np.asarray(out, np.float32)),
                                  np.isnan(np.asarray(ref, np.float32)))
    clean = jnp.isfinite(ref)
    assert 0 < int(clean.sum()) < ref.size
    r_d = gp.attention_reference(q, k, bad_v, q_offset=q_offset, compute_dtype=BF16)
    numerics.assert_parity(jnp.where(clean, out, 0), jnp.where(clean, ref, 0),
                           jnp.where(clean, r_d, 0))
