"""Numerical edges on every backend (docs/numerics.md): very large and very negative logits,
the smallest shapes, queries past the end of the keys, batched = row by row, x64 mode, and
bitwise-repeatable GPU runs. Kernels run in their interpreters on the CPU, compiled with
``-m gpu``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_pallas as gp
from gqa_pallas import registry
from gqa_pallas.validation import AttentionDims
from tests import backend_cases, numerics

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def _dtype(name, dims, dtypes=(F32, BF16), op="prefill"):
  return backend_cases.first_dtype(name, op, dims, dtypes)


def _run(name, q, k, v, **kw):
  # Blocks: eager ops dispatched while Mosaic GPU's interpreter runs can deadlock with its
  # callback threads (tests/numerics.py, check_against_reference).
  return jax.block_until_ready(gp.gqa_attention(
      q, k, v, implementation=name, interpret=backend_cases.interpret_for(name, "cpu"),
      return_lse=True, **kw))


def _scaled_to(q, k, target):
  """q rescaled so that ``max |q . k| / sqrt(H)`` is ``target``."""
  return (q.astype(F32) * (target / numerics.max_logit(q, k))).astype(q.dtype)


PREFILL = backend_cases.implementing("prefill", pallas_only=False)


@pytest.mark.parametrize("name", PREFILL)
@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_large_logits(name, magnitude):
  """bf16 inputs scaled so ``|q.k| * scale`` reaches 1e4 (and 1e2), ragged lengths, NaN past
  them: the design rule against the float32 reference (the float32 rule scales with the logit
  magnitude, design.md)."""
  dims = AttentionDims(2, 24, 40, 8, 2, 64)
  dtype = _dtype(name, dims, (BF16, F16, F32))
  lengths = jnp.array([40, 23], jnp.int32)
  q, k, v = numerics.random_qkv(21, 2, 24, 40, 8, 2, 64, dtype, lengths)
  q = _scaled_to(q, k, magnitude)
  out, lse = _run(name, q, k, v, kv_lengths=lengths)
  numerics.check_against_reference(out, lse, q, k, v, factor=2.0, kv_lengths=lengths)


@pytest.mark.parametrize("name", [n for n in PREFILL if not registry.get(n).slow_interpreter])
def test_large_logits_float32(name):
  dims = AttentionDims(1, 30, 30, 4, 2, 64)
  if _dtype(name, dims, (F32,)) is None:
    pytest.skip(f"{name} takes no float32")
  q, k, v = numerics.random_qkv(22, 1, 30, 30, 4, 2, 64, F32)
  q = _scaled_to(q, k, 500.)
  out, lse = _run(name, q, k, v)
  numerics.check_against_reference(out, lse, q, k, v, factor=2.0)


@pytest.mark.parametrize("name", PREFILL)
def test_very_negative_logits_next_to_masked_ones(name):
  """Every visible logit near -3000 (keys pointing away from the queries), masked neighbours:
  the softmax is shift-invariant, so the output is an ordinary weighted mean, never 0 or NaN."""
  dims = AttentionDims(1, 20, 33, 4, 1, 64)
  dtype = _dtype(name, dims, (BF16, F16, F32))
  q, k, v = numerics.random_qkv(23, 1, 20, 33, 4, 1, 64, dtype, jnp.array([29]))
  direction = jnp.ones((64,), F32) / 8.
  q = (jnp.abs(q.astype(F32)) * 0.05 + direction * 40.).astype(dtype)
  k = jnp.where(jnp.isnan(k), k, (k.astype(F32) * 0.05 - direction * 600.).astype(dtype))
  out, lse = _run(name, q, k, v, kv_lengths=jnp.array([29]))
  lse = np.asarray(lse)
  assert np.all(np.isfinite(lse)) and np.all(lse < -2000), lse.max()
  numerics.check_against_reference(out, lse, q, k, v, factor=2.0, kv_lengths=jnp.array([29]))


# (B, T, S, q_offset, kv_lengths): one query and one key; one key seen by many queries; queries
# past the end of the keys (causal: they see every key); queries before position 0.
TINY = [
    (1, 1, 1, None, None),
    (1, 7, 1, None, None),
    (2, 5, 9, [40, 12], [9, 3]),
    (2, 6, 9, [-3, -10], None),
]


@pytest.mark.parametrize("name", PREFILL)
@pytest.mark.parametrize("case", TINY, ids=lambda c: f"B{c[0]}T{c[1]}S{c[2]}")
def test_tiny_shapes_and_queries_past_the_keys(name, case):
  b, t, s, qo, kvl = case
  dims = AttentionDims(b, t, s, 4, 2, 64)
  dtype = _dtype(name, dims)
  q_offset = None if qo is None else jnp.array(qo, jnp.int32)
  kv_lengths = None if kvl is None else jnp.array(kvl, jnp.int32)
  q, k, v = numerics.random_qkv(24, b, t, s, 4, 2, 64, dtype, kv_lengths)
  out, lse = _run(name, q, k, v, q_offset=q_offset, kv_lengths=kv_lengths)
  numerics.check_against_reference(out, lse, q, k, v, factor=2.0, q_offset=q_offset,
                                   kv_lengths=kv_lengths)


@pytest.mark.parametrize("name", [n for n in PREFILL if not registry.get(n).slow_interpreter])
def test_batched_prefill_equals_row_by_row(name):
  lengths = jnp.array([30, 0, 11], jnp.int32)
  offsets = jnp.array([5, 2, -4], jnp.int32)
  dims = AttentionDims(3, 9, 30, 8, 2, 32)
  q, k, v = numerics.random_qkv(25, 3, 9, 30, 8, 2, 32, _dtype(name, dims), lengths)
  batched = _run(name, q, k, v, kv_lengths=lengths, q_offset=offsets)
  for row in range(3):
    rows = slice(row, row + 1)
    single = _run(name, q[rows], k[rows], v[rows], kv_lengths=lengths[rows],
                  q_offset=offsets[rows])
    for a, b in zip(batched, single):
      np.testing.assert_allclose(np.asarray(a[rows], np.float32), np.asarray(b, np.float32),
                                 rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in PREFILL if not registry.get(n).slow_interpreter])
def test_x64_mode(name):
  """With ``jax_enable_x64`` on, every op still runs (the kernels are traced with 32-bit
  integers) and gives what it gives without it."""
  lengths = jnp.array([20, 7], jnp.int32)
  q, k, v = numerics.random_qkv(26, 2, 9, 20, 4, 2, 32, F32, lengths)
  kw = dict(implementation=name, interpret=backend_cases.interpret_for(name, "cpu"))
  cache = gp.KVCache(k, v, lengths)
  ct = jax.random.normal(jax.random.key(3), q.shape, F32)

  def everything():
    out = gp.gqa_attention(q, k, v, kv_lengths=lengths, sliding_window=6, **kw)
    grad = jax.grad(lambda q: jnp.sum(gp.gqa_attention(q, k, v, kv_lengths=lengths, **kw) * ct))(q)
    dec = gp.gqa_decode(q[:, :2], cache, **kw)
    app = jax.jit(lambda c: c.append(k[:, :2], v[:, :2], **kw))(
        gp.KVCache(k, v, jnp.array([3, 19])))
    return out, grad, dec, app

  plain = everything()
  with jax.enable_x64(True):
    wide = everything()
  for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(wide)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("name", backend_cases.PALLAS_BACKENDS)
def test_ten_gpu_runs_are_bitwise_identical(name):
  """Prefill (with lse), its gradients, and decode: 10 runs, one answer, bit for bit."""
  lengths = jnp.array([2048, 1500], jnp.int32)
  q, k, v = numerics.random_qkv(27, 2, 2048, 2048, 32, 8, 128, BF16, lengths)
  kw = dict(implementation=name)
  fwd = jax.jit(lambda q, k, v: gp.gqa_attention(q, k, v, kv_lengths=lengths, return_lse=True,
                                                 **kw))
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      gp.gqa_attention(q, k, v, kv_lengths=lengths, **kw).astype(F32)), argnums=(0, 1, 2)))
  runs = [fwd, grad]
  if "decode" in registry.get(name).ops:
    cache = gp.KVCache(k, v, lengths)
    runs.append(jax.jit(lambda q: gp.gqa_decode(q, cache, return_lse=True, **kw)))
  for i, f in enumerate(runs):
    args = (q[:, :1, :, :],) if i == 2 else (q, k, v)
    first = jax.tree_util.tree_map(np.asarray, f(*args))
    for _ in range(9):
      again = jax.tree_util.tree_map(np.asarray, f(*args))
      for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)
