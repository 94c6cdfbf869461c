"""Sliding windows and logit soft-caps: the reference against an independent loop, every kernel
that takes them against the reference (prefill, decode, gradients; in the interpreter on this
CPU, lowered for CUDA, and compiled with ``-m gpu``), and the refusals."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_pallas as gp
from gqa_pallas import devices, registry
from gqa_pallas.validation import AttentionDims
from tests import backend_cases, numerics

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

# (B, T, S, N, K, H, dtype, kv_lengths, q_offset, window, cap, logit gain): windows shorter
# than, equal to and longer than the sequence, windows that cut a key block in the middle,
# caps of 5, 30 and 50 on large logits (q scaled by the gain), ragged lengths with NaN past them,
# offsets, T != S.
CASES = [
    (1, 40, 40, 4, 2, 64, F32, None, None, 7, None, 1.),
    (2, 70, 130, 8, 2, 64, BF16, [130, 90], None, 33, None, 1.),
    (1, 50, 50, 4, 4, 64, F32, None, None, 50, 5.0, 8.),
    (1, 30, 30, 4, 1, 64, F16, None, None, 100, None, 1.),
    (2, 33, 80, 8, 1, 32, F16, [80, 40], [47, 3], 16, 30.0, 6.),
    (1, 130, 130, 2, 1, 64, BF16, None, None, 64, 50.0, 10.),
    (2, 17, 113, 14, 2, 128, BF16, [113, 0], None, 97, 30.0, 4.),
]
GPU_CASES = [
    (2, 1000, 1000, 32, 8, 128, BF16, [1000, 517], None, 256, None, 1.),
    (1, 2048, 4096, 8, 2, 64, F16, None, None, 4096, 50.0, 8.),
    (2, 777, 3000, 14, 2, 64, BF16, [3000, 1500], None, 1000, 30.0, 6.),
]


def _id(c):
  b, t, s, n, k, h, dt, kvl, qo, win, cap, _ = c
  return (f"B{b}T{t}S{s}-{n}:{k}-H{h}-{jnp.dtype(dt).name}-w{win}-cap{cap}"
          f"{'-ragged' if kvl else ''}{'-qoff' if qo else ''}")


def _inputs(case):
  b, t, s, n, k, h, dtype, kvl, qo, win, cap, gain = case
  kv_lengths = None if kvl is None else jnp.array(kvl, jnp.int32)
  q, kk, v = numerics.random_qkv(len(_id(case)), b, t, s, n, k, h, dtype, kv_lengths)
  q = (q.astype(F32) * gain).astype(dtype)
  kw = dict(kv_lengths=kv_lengths, q_offset=None if qo is None else jnp.array(qo, jnp.int32),
            sliding_window=win, logits_soft_cap=cap)
  return (q, kk, v), kw


def _loop_reference(q, k, v, kv_lengths, q_offset, window, cap):
  """Per query, per head, in float64 numpy: the semantics written out directly."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  kv_lengths = np.full(b, s) if kv_lengths is None else np.asarray(kv_lengths)
  q_offset = kv_lengths - t if q_offset is None else np.asarray(q_offset)
  out = np.zeros(q.shape)
  lse = np.full((b, t, n), -np.inf)
  for bi in range(b):
    for ti in range(t):
      pos = q_offset[bi] + ti
      keys = [j for j in range(s) if j < kv_lengths[bi] and j <= pos
              and (window is None or j > pos - window)]
      if not keys:
        continue
      for ni in range(n):
        logits = np.array([q[bi, ti, ni] @ k[bi, j, ni // g] / np.sqrt(h) for j in keys])
        if cap is not None:
          logits = cap * np.tanh(logits / cap)
        top = logits.max()
        w = np.exp(logits - top)
        out[bi, ti, ni] = (w[:, None] * v[bi, keys, ni // g]).sum(0) / w.sum()
        lse[bi, ti, ni] = top + np.log(w.sum())
  return out, lse


@pytest.mark.parametrize("case", [c for c in CASES if c[6] == F32] + [CASES[4]], ids=_id)
def test_reference_matches_an_independent_loop(case):
  (q, k, v), kw = _inputs(case)
  q, k, v = (x.astype(F32) for x in (q, k, v))
  out, lse = gp.attention_reference(q, k, v, return_lse=True, **kw)
  want, want_lse = _loop_reference(q, k, v, kw["kv_lengths"], kw["q_offset"],
                                   kw["sliding_window"], kw["logits_soft_cap"])
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=2e-5, rtol=2e-5)


def _takes(name, op, case, tier):
  b, t, s, n, k, h, dtype, *_ = case
  backend = registry.get(name)
  problem = registry.Problem(op, AttentionDims(b, t, s, n, k, h), jnp.dtype(dtype).name,
                             interpret=backend_cases.interpret_for(name, tier),
                             device=backend_cases.device_for(tier), sliding_window=case[9],
                             logits_soft_cap=case[10])
  return op in backend.ops and backend.unsupported(problem) is None


def _params(cases, op, tier):
  marks = [pytest.mark.gpu] if tier == "gpu" else []
  return [pytest.param(name, c, id=f"{name}-{_id(c)}", marks=marks)
          for name in backend_cases.PALLAS_BACKENDS for c in cases if _takes(name, op, c, tier)]


def _check_prefill(name, case, interpret):
  (q, k, v), kw = _inputs(case)
  out, lse = gp.gqa_attention(q, k, v, implementation=name, interpret=interpret,
                              return_lse=True, **kw)
  numerics.check_against_reference(out, lse, q, k, v, factor=2.0, causal=True, **kw)


@pytest.mark.parametrize("name,case", _params(CASES, "prefill", "cpu"))
def test_prefill_parity_cpu(name, case):
  _check_prefill(name, case, interpret=True)


@pytest.mark.parametrize("name,case", _params(GPU_CASES, "prefill", "gpu"))
def test_prefill_parity_gpu(name, case):
  _check_prefill(name, case, interpret=False)


def _check_gradients(name, case, interpret):
  (q, k, v), kw = _inputs(case)
  w = jax.random.normal(jax.random.key(5), q.shape, F32)

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v)
    return jnp.sum(out.astype(F32) * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.))

  kern = functools.partial(gp.gqa_attention, implementation=name, interpret=interpret,
                           return_lse=True, **kw)
  ref = functools.partial(gp.attention_reference, return_lse=True, **kw)
  ref_d = functools.partial(ref, compute_dtype=q.dtype)
  grads = [jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2)))(q, k, v)
           for fn in (kern, ref, ref_d)]
  for label, a, b, b_d in zip(("dq", "dk", "dv"), *grads):
    numerics.assert_parity(a, b, b_d, factor=3.0, name=label)


@pytest.mark.parametrize("name,case", [p for p in _params(CASES, "prefill_bwd", "cpu")
                                       if p.values[1] in (CASES[1], CASES[2], CASES[4])])
def test_gradients_cpu(name, case):
  _check_gradients(name, case, interpret=True)


@pytest.mark.parametrize("name,case", _params(GPU_CASES, "prefill_bwd", "gpu"))
def test_gradients_gpu(name, case):
  _check_gradients(name, case, interpret=False)


# (B, T, S_max, N, K, H, dtype, lengths, window, cap): one token and several, a window shorter
# than a key block, NaN past the lengths, a row of length 3.
DECODE_CASES = [
    (2, 1, 300, 8, 2, 64, BF16, [300, 77], 64, None),
    (2, 4, 500, 8, 1, 64, F32, [500, 3], 100, 20.0),
    (1, 3, 1000, 4, 2, 64, BF16, [999], 5, 5.0),
]


# Long caches on the GPU: a 4k window over 32k (the benchmark's shape, smaller batch), a window
# that ends mid-block, a row shorter than its window.
GPU_DECODE_CASES = [
    (2, 1, 32768, 32, 8, 128, BF16, [32768, 20001], 4096, None),
    (3, 2, 9000, 14, 2, 64, F16, [9000, 4097, 700], 1000, 30.0),
]


def _check_decode(name, case, interpret):
  b, t, s, n, kh, h, dtype, lens, win, cap = case
  q, k, v = numerics.random_qkv(3, b, t, s, n, kh, h, dtype, jnp.array(lens))
  q = (q.astype(F32) * 3).astype(dtype)
  lengths = jnp.array(lens, jnp.int32)
  out, lse = gp.gqa_decode(q, gp.KVCache(k, v, lengths), implementation=name,
                           interpret=interpret, return_lse=True, sliding_window=win,
                           logits_soft_cap=cap)
  numerics.check_against_reference(out, lse, q, k, v, factor=3.0, causal=True,
                                   kv_lengths=lengths, sliding_window=win, logits_soft_cap=cap)


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
@pytest.mark.parametrize("name", backend_cases.implementing("decode"))
def test_decode_parity_cpu(name, case):
  _check_decode(name, case, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_DECODE_CASES, ids=str)
@pytest.mark.parametrize("name", backend_cases.implementing("decode"))
def test_decode_parity_gpu(name, case):
  _check_decode(name, case, interpret=False)


def test_lowers_for_cuda_with_window_and_cap():
  """Prefill, its backward and decode with both features, lowered for CUDA on this CPU."""
  q = jax.ShapeDtypeStruct((2, 70, 14, 64), BF16)
  k = jax.ShapeDtypeStruct((2, 90, 2, 64), BF16)
  rows = jax.ShapeDtypeStruct((2,), jnp.int32)
  feats = dict(sliding_window=40, logits_soft_cap=30.0)

  def train(q, k, v, o, n):
    f = lambda q, k, v: jnp.sum(gp.gqa_attention(q, k, v, q_offset=o, kv_lengths=n,
                                                 **feats).astype(F32))
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  def decode(q, k, v, n):
    return gp.gqa_decode(q[:, :2], gp.KVCache(k, v, n), **feats)

  with devices.target(backend_cases.CUDA_TARGET):
    text = numerics.lower_for_cuda(train, q, k, k, rows, rows)
    assert text.count("triton") >= 3  # forward, dq, dk/dv
    assert "triton" in numerics.lower_for_cuda(decode, q, k, k, rows)


def test_mosaic_refuses_them_and_triton_takes_over():
  if "mosaic" not in gp.IMPLEMENTATIONS:
    pytest.skip("no Mosaic GPU backend")
  problem = registry.Problem("prefill", AttentionDims(1, 64, 64, 8, 2, 128), "bfloat16",
                             device=devices.H200, sliding_window=16)
  assert "sliding_window" in registry.get("mosaic").unsupported(problem)
  assert registry.resolve(None, problem).name == "triton"
  q, k, v = numerics.random_qkv(1, 1, 8, 8, 2, 1, 64, BF16)
  with pytest.raises(ValueError, match="implementation='mosaic' cannot run this prefill: "
                                       "sliding_window"):
    gp.gqa_attention(q, k, v, implementation="mosaic", interpret=True, logits_soft_cap=5.0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sliding_window=0), ValueError, "sliding_window must be a positive int"),
    (dict(sliding_window=-3), ValueError, "sliding_window must be a positive int"),
    (dict(sliding_window=2.5), TypeError, "sliding_window must be a Python int"),
    (dict(sliding_window=True), TypeError, "sliding_window must be a Python int"),
    (dict(sliding_window=4, causal=False), ValueError, "sliding_window needs causal=True"),
    (dict(logits_soft_cap=0.), ValueError, "logits_soft_cap must be > 0"),
    (dict(logits_soft_cap=-1.), ValueError, "logits_soft_cap must be > 0"),
    (dict(logits_soft_cap="30"), TypeError, "logits_soft_cap must be a Python float"),
])
def test_bad_values_are_refused(kwargs, error, match):
  q, k, v = numerics.random_qkv(1, 1, 8, 8, 2, 1, 16, F32)
  for fn in (gp.gqa_attention, gp.attention_reference):
    with pytest.raises(error, match=match):
      fn(q, k, v, **kwargs)
  if "causal" not in kwargs:
    with pytest.raises(error, match=match):
      gp.gqa_decode(q[:, :1], gp.KVCache(k, v, jnp.array([8])), **kwargs)
