"""The ``"cudnn"`` backend: what it takes, what it refuses (CPU), parity with the reference (GPU).

It is cuDNN through ``jax.nn.dot_product_attention``: only what that call can express with the
package's semantics runs, the rest is a ``ValueError`` naming the input, and
``implementation=None`` never picks it.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_pallas as gp
from gqa_pallas import devices, registry
from gqa_pallas.validation import AttentionDims
from tests import numerics

BF16, F16 = jnp.bfloat16, jnp.float16


def _problem(op="prefill", dims=AttentionDims(2, 64, 64, 8, 2, 64), dtype="bfloat16", **kw):
  return registry.Problem(op, dims, dtype, device=devices.H200, **kw)


def _reason(**kw):
  return registry.get("cudnn").unsupported(_problem(**kw))


def test_registered_but_never_the_default():
  assert "cudnn" in gp.IMPLEMENTATIONS
  backend = registry.get("cudnn")
  assert not backend.is_pallas and backend.differentiable
  for interpret in (False, True):
    for device in (devices.H200, devices.H100, devices.CPU):
      assert "cudnn" not in registry.preference(device, interpret)


@pytest.mark.parametrize("kw", [
    dict(),  # square causal, default positions
    dict(sliding_window=16),
    dict(offset=0, kv_lengths_given=True),  # top-left rows (right-padded prompts)
    dict(offset=0, dims=AttentionDims(2, 64, 300, 8, 2, 64)),  # T != S, top-left
    dict(offset=0, kv_lengths_given=True, sliding_window=9),
    dict(causal=False, kv_lengths_given=True),
    dict(causal=False, offset="array"),  # an offset means nothing without causal masking
    dict(dtype="float16", dims=AttentionDims(1, 8, 8, 4, 4, 128)),
    dict(op="decode", dims=AttentionDims(4, 1, 500, 32, 8, 128), kv_lengths_given=True),
    dict(op="append", dims=AttentionDims(4, 3, 500, 8, 8, 128)),
])
def test_takes(kw):
  assert _reason(**kw) is None


@pytest.mark.parametrize("kw,words", [
    (dict(offset="array"), "q_offset"),
    (dict(offset=3), "q_offset"),
    (dict(kv_lengths_given=True), "kv_lengths"),
    (dict(dims=AttentionDims(2, 16, 64, 8, 2, 64)), "T=16 != S=64"),
    (dict(return_lse=True), "return_lse"),
    (dict(logits_soft_cap=30.0), "logits_soft_cap"),
    (dict(dtype="float32"), "dtype float32"),
    (dict(dims=AttentionDims(1, 8, 8, 4, 4, 100)), "head_dim=100"),
    (dict(dims=AttentionDims(1, 8, 8, 4, 4, 256)), "head_dim=256"),
    (dict(op="decode", dims=AttentionDims(4, 2, 500, 32, 8, 128)), "T=2 decode"),
    (dict(op="decode", dims=AttentionDims(4, 1, 500, 32, 8, 128), offset="array"), "q_offset"),
    (dict(op="decode", dims=AttentionDims(4, 1, 500, 32, 8, 128), sliding_window=64),
     "sliding_window"),
    (dict(interpret=True), "interpret=True"),
])
def test_refuses_with_a_reason(kw, words):
  reason = _reason(**kw)
  assert reason is not None and words in reason, reason


def test_refuses_other_devices():
  assert "CUDA GPU" in registry.get("cudnn").unsupported(
      registry.Problem("prefill", AttentionDims(1, 8, 8, 4, 4, 64), "bfloat16"))
  old = devices.DeviceInfo("gpu", "Tesla V100", (7, 0), 80)
  assert "sm80" in registry.get("cudnn").unsupported(
      registry.Problem("prefill", AttentionDims(1, 8, 8, 4, 4, 64), "bfloat16", device=old))


def test_the_public_calls_say_why(tiny):
  """Through gqa_attention / gqa_decode the refusal is a ValueError naming the backend."""
  del tiny
  q = jnp.zeros((1, 8, 4, 64), BF16)
  k = jnp.zeros((1, 8, 2, 64), BF16)
  with devices.target(devices.H200):
    with pytest.raises(ValueError, match="implementation='cudnn' cannot run this prefill: a "
                                         "q_offset other than"):
      jax.eval_shape(functools.partial(gp.gqa_attention, implementation="cudnn"), q, k, k,
                     q_offset=jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="return_lse"):
      jax.eval_shape(functools.partial(gp.gqa_attention, implementation="cudnn",
                                       return_lse=True), q, k, k)
    cache = gp.KVCache.init(1, 32, 2, 64, BF16)
    with pytest.raises(ValueError, match="T=2 decode"):
      jax.eval_shape(functools.partial(gp.gqa_decode, implementation="cudnn"), q[:, :2], cache)
  with pytest.raises(ValueError, match="CUDA GPU"):
    gp.gqa_attention(q, k, k, implementation="cudnn")


def test_static_offset_is_recorded():
  """A Python int q_offset is static (the Problem says which); an array is not."""
  seen = []
  real = registry.resolve

  def spy(implementation, problem):
    seen.append((problem.offset, problem.kv_lengths_given))
    return real(implementation, problem)

  q = jnp.ones((2, 8, 4, 64), jnp.float32)
  k = jnp.ones((2, 8, 2, 64), jnp.float32)
  registry.resolve = spy
  try:
    gp.gqa_attention(q, k, k)
    gp.gqa_attention(q, k, k, q_offset=0, kv_lengths=jnp.array([8, 3]))
    gp.gqa_attention(q, k, k, q_offset=jnp.array([0, 0]))
    gp.gqa_attention(q, k, k, q_offset=np.int32(2))
  finally:
    registry.resolve = real
  assert seen == [("default", False), (0, True), ("array", False), (2, False)]


def _xla_standing_in_for_cudnn(*args, implementation, **kwargs):
  """jax.nn's XLA path keeps no invisible-slot rule either (its masked weights meet NaN in the
  ``P V`` product, as cuDNN's do), so it stands in for cuDNN on the CPU."""
  assert implementation == "cudnn"
  return jax.nn.dot_product_attention(*args, implementation="xla", **kwargs)


@pytest.mark.parametrize("form", ["causal", "window", "offset0", "noncausal"])
def test_prefill_guard_keeps_the_invisible_slot_rule(form):
  """Non-finite K/V values in slots a row cannot see never reach it; rows that see one are NaN:
  what the reference does, around a kernel that leaks them."""
  from gqa_pallas import cudnn  # pylint: disable=g-import-not-at-top
  b, t, n, kh, h = 2, 24, 4, 2, 16
  s = 30 if form in ("offset0", "noncausal") else t
  q, k, v = numerics.random_qkv(21, b, t, s, n, kh, h, jnp.float32, poison=False)
  lengths = jnp.array([s, 17], jnp.int32)
  k = k.at[0, 20, 1, 3].set(jnp.inf).at[1, 25, 0, 0].set(jnp.nan)  # row 1: past its length
  v = v.at[0, 9, 0, 5].set(jnp.nan).at[1, 3, 1, 2].set(-jnp.inf).at[1, 29, 0, 1].set(jnp.nan)
  kw = dict(causal=form != "noncausal", scale=h ** -0.5, window=5 if form == "window" else None,
            with_lengths=form in ("offset0", "noncausal"))
  full = jnp.full((b,), s, jnp.int32)
  out = cudnn.prefill_with_finite_guard(_xla_standing_in_for_cudnn, q, k, v,
                                        lengths if kw["with_lengths"] else full, **kw)
  ref = gp.attention_reference(
      q, k, v, causal=kw["causal"], q_offset=jnp.zeros((b,), jnp.int32),
      kv_lengths=lengths if kw["with_lengths"] else None, sliding_window=kw["window"])
  leaky = _xla_standing_in_for_cudnn(q, k, v, is_causal=kw["causal"], implementation="cudnn",
                                     key_value_seq_lengths=lengths if kw["with_lengths"] else None,
                                     local_window_size=None if kw["window"] is None else (4, 0))
  out, ref, leaky = (np.asarray(x) for x in (out, ref, leaky))
  np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
  clean = ~np.isnan(ref)
  np.testing.assert_allclose(out[clean], ref[clean], atol=2e-6, rtol=2e-6)
  assert np.isnan(ref).any() and clean.any()
  assert np.isnan(leaky[clean]).any() or form == "window"  # the stand-in does leak


# ---------------------------------------------------------------------------------------------
# GPU: parity with the reference on every form it takes.

# (B, T, S, N, K, H), kwargs of gqa_attention, dtype
GPU_PREFILL = [
    ((2, 1000, 1000, 32, 8, 128), dict(), BF16),
    ((1, 777, 777, 14, 2, 64), dict(), F16),
    ((2, 1024, 1024, 16, 4, 128), dict(sliding_window=300), BF16),
    ((3, 600, 600, 8, 1, 64), dict(q_offset=0, kv_lengths=[600, 0, 257]), BF16),
    ((2, 300, 900, 32, 8, 128), dict(q_offset=0, kv_lengths=[300, 41]), BF16),  # onto a cache
    ((2, 128, 700, 8, 8, 128), dict(causal=False, kv_lengths=[700, 13]), F16),
]


def _case_id(case):
  (b, t, s, n, k, h), kw, dtype = case
  return (f"B{b}T{t}S{s}-{n}:{k}-H{h}-{jnp.dtype(dtype).name}"
          + "".join(f"-{name}" for name in sorted(kw)))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_PREFILL, ids=_case_id)
def test_prefill_parity_gpu(case):
  (b, t, s, n, k, h), kw, dtype = case
  kw = {name: (jnp.asarray(x, jnp.int32) if isinstance(x, list) else x) for name, x in kw.items()}
  q, kk, v = numerics.random_qkv(7, b, t, s, n, k, h, dtype, kv_lengths=kw.get("kv_lengths"),
                                 poison=False)
  out = jax.jit(functools.partial(gp.gqa_attention, implementation="cudnn", **kw))(q, kk, v)
  ref_kw = dict(kw)
  ref32, _ = gp.attention_reference(q, kk, v, return_lse=True, **ref_kw)
  ref_d = gp.attention_reference(q, kk, v, compute_dtype=dtype, **ref_kw)
  numerics.assert_parity(out, ref32, ref_d, factor=2.0)
  if "kv_lengths" in kw:  # rows with no key are exactly 0
    empty = np.asarray(kw["kv_lengths"]) == 0
    assert np.all(np.asarray(out[empty]) == 0)


@pytest.mark.gpu
def test_decode_parity_gpu():
  b, s, n, k, h = 5, 4096, 32, 8, 128
  lengths = jnp.array([4096, 1, 0, 2999, 17], jnp.int32)
  q, kk, v = numerics.random_qkv(3, b, 1, s, n, k, h, BF16, poison=False)
  cache = gp.KVCache(kk, v, lengths)
  out = jax.jit(functools.partial(gp.gqa_decode, implementation="cudnn"))(q, cache)
  ref32 = gp.gqa_decode(q.astype(jnp.float32), gp.KVCache(kk.astype(jnp.float32),
                                                          v.astype(jnp.float32), lengths),
                        implementation="xla")
  ref_d = gp.attention_reference(q, kk, v, kv_lengths=lengths, compute_dtype=BF16)
  numerics.assert_parity(out, ref32, ref_d, factor=2.0)
  assert np.all(np.asarray(out[2]) == 0)


@pytest.mark.gpu
def test_gradients_gpu():
  """cuDNN's own backward, against jax.grad of the reference."""
  b, t, n, k, h = 2, 512, 16, 4, 128
  q, kk, v = numerics.random_qkv(11, b, t, t, n, k, h, BF16, poison=False)
  d_out = numerics.random_qkv(12, b, t, t, n, k, h, BF16)[0]

  def loss(fn, q, kk, v):
    return jnp.sum(fn(q, kk, v).astype(jnp.float32) * d_out.astype(jnp.float32))

  grads = jax.jit(jax.grad(functools.partial(loss, functools.partial(
      gp.gqa_attention, implementation="cudnn")), argnums=(0, 1, 2)))(q, kk, v)
  f32 = [x.astype(jnp.float32) for x in (q, kk, v)]
  ref32 = jax.grad(functools.partial(loss, gp.attention_reference), argnums=(0, 1, 2))(*f32)
  ref_d = jax.grad(functools.partial(loss, functools.partial(gp.attention_reference,
                                                             compute_dtype=BF16)),
                   argnums=(0, 1, 2))(q, kk, v)
  for name, g, r, rd in zip(("dq", "dk", "dv"), grads, ref32, ref_d):
    numerics.assert_parity(g, r, rd, factor=3.0, name=name)


@pytest.mark.gpu
def test_invisible_slots_gpu():
  """Records what cuDNN does with non-finite values where no query looks (docs/numerics.md):
  past kv_lengths in decode, and causally in the future in a square prefill."""
  b, s, n, k, h = 2, 2048, 16, 4, 128
  lengths = jnp.array([2048, 1000], jnp.int32)
  q, kk, v = numerics.random_qkv(5, b, 1, s, n, k, h, BF16, kv_lengths=lengths)  # NaN past them
  out = jax.jit(functools.partial(gp.gqa_decode, implementation="cudnn"))(
      q, gp.KVCache(kk, v, lengths))
  assert np.all(np.isfinite(np.asarray(out, np.float32))), "NaN past kv_lengths reached decode"
  q, kk, v = numerics.random_qkv(6, 1, 1024, 1024, n, k, h, BF16, poison=False)
  v = v.at[0, 700, 1, 3].set(jnp.nan)
  out = np.asarray(jax.jit(functools.partial(gp.gqa_attention, implementation="cudnn"))(
      q, kk, v), np.float32)
  assert np.all(np.isfinite(out[0, :700])), "a NaN in V reached queries before its position"
  assert not np.any(np.isfinite(out[0, 700:, 4:8, 3])), "the queries that see it are not NaN"
