"""Gradients of ``gqa_attention`` (the backward kernels) and of ``gqa_decode``.

Parity of dq, dk, dv with ``jax.grad`` of the reference (design.md's rule, factor 3) for every
Pallas backend that implements ``prefill_bwd``: on this CPU through the kernel's interpreter
(the prefill grid: odd lengths, T != S, ragged lengths with NaN past them, empty rows, every
ratio class, head dims 64/128 and padded ones, all dtypes), and compiled on a GPU at realistic
sizes (``-m gpu``) with the determinism and memory checks.
"""
import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_pallas as gp
from gqa_pallas import devices, registry
from gqa_pallas.validation import AttentionDims
from tests import backend_cases, numerics
from tests.test_prefill import CPU_CASES, GPU_CASES, RANDOM_CASES, _case_id, _dims

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

BACKWARD_BACKENDS = backend_cases.implementing("prefill_bwd")

# More backward classes on top of the forward's grid: the lse's own cotangent, a query tile
# that straddles the diagonal of several key blocks, q_offset past the keys, S not a multiple
# of the key block with H=128.
EXTRA_CPU_CASES = [
    (1, 70, 70, 8, 2, 128, BF16, None, None, True),
    (2, 24, 40, 6, 2, 64, F32, [40, 17], [30, 60], True),
    (1, 5, 100, 4, 1, 64, F16, [99], [94], True),
]

# What a backend with a slow interpreter (Mosaic GPU's) runs on this CPU instead of the grid.
SLOW_INTERPRETER_CASES = [
    (1, 50, 77, 8, 2, 64, BF16, [70], None, True),      # G=4, T < S, tails, NaN past the length
    (1, 20, 70, 7, 1, 64, F16, [60], [45], True),       # G=7: chunks across tiles, offsets
    (1, 90, 60, 4, 2, 64, BF16, [41], None, False),     # G=2, non-causal, ragged
    (1, 136, 100, 2, 2, 128, F16, None, None, True),    # G=1, T > S (empty rows), H=128
]


def _inputs(case):
  b, t, s, n, k, h, dtype, kvl, q_offset, causal = case
  kv_lengths = None if kvl is None else jnp.array(kvl, jnp.int32)
  q_offset = None if q_offset is None else jnp.array(q_offset, jnp.int32)
  seed = zlib.crc32(("bwd" + _case_id(case)).encode()) % 1000
  q, kk, v = numerics.random_qkv(seed, b, t, s, n, k, h, dtype, kv_lengths)
  w = jax.random.normal(jax.random.key(seed + 1), q.shape, jnp.float32)
  return (q, kk, v), dict(causal=causal, q_offset=q_offset, kv_lengths=kv_lengths), w


def _loss(fn, w, q, k, v):
  """A loss that gives every output element and every finite lse its own cotangent."""
  out, lse = fn(q, k, v)
  lse_w = jnp.cos(jnp.arange(lse.size, dtype=jnp.float32).reshape(lse.shape))
  return (jnp.sum(out.astype(jnp.float32) * w)
          + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.) * lse_w))


def _grads(fn, w, q, k, v):
  return jax.jit(jax.grad(functools.partial(_loss, fn, w), argnums=(0, 1, 2)))(q, k, v)


def check_gradients(name, case, interpret):
  (q, k, v), kw, w = _inputs(case)
  kern = functools.partial(gp.gqa_attention, implementation=name, interpret=interpret,
                           return_lse=True, **kw)
  ref = functools.partial(gp.attention_reference, return_lse=True, **kw)
  ref_d = functools.partial(ref, compute_dtype=q.dtype)
  grads = [_grads(fn, w, q, k, v) for fn in (kern, ref, ref_d)]
  for label, a, b, b_d in zip(("dq", "dk", "dv"), *grads):
    assert a.dtype == b.dtype and a.shape == b.shape
    numerics.assert_parity(a, b, b_d, factor=3.0, name=label)
  return grads[0]


def _params(cases, tier, slow_cases=()):
  return [p for p in backend_cases.params("prefill_bwd", cases, tier, _dims, _case_id,
                                          slow_cases)
          if p.values[0] in BACKWARD_BACKENDS]


@pytest.mark.parametrize("name,case", _params(CPU_CASES + RANDOM_CASES + EXTRA_CPU_CASES, "cpu",
                                             SLOW_INTERPRETER_CASES))
def test_gradient_parity_cpu(name, case):
  check_gradients(name, case, interpret=True)


@pytest.mark.parametrize("name", BACKWARD_BACKENDS)
def test_backward_runs_the_kernels(name):
  """jax.grad of gqa_attention runs this backend's backward kernels (no [B, N, T, S] VJP)."""
  (q, k, v), kw, w = _inputs(CPU_CASES[1])
  fn = functools.partial(gp.gqa_attention, implementation=name, interpret=True,
                         return_lse=True, **kw)
  text = str(jax.make_jaxpr(jax.grad(functools.partial(_loss, fn, w), argnums=(0, 1, 2)))(
      q, k, v))
  assert "gqa_prefill_dkdv" in text and "gqa_prefill_dq" in text
  b, t, s, n, kh = CPU_CASES[1][:5]
  assert f"[{b},{kh},{n // kh},{t},{s}]" not in text  # the reference VJP's [B, K, G, T, S]


@pytest.mark.parametrize("name", BACKWARD_BACKENDS)
def test_rows_without_keys_get_zero_gradients(name):
  """Rows that see no key (T > S leading rows, a zero-length row) give exactly zero dq."""
  dims = AttentionDims(2, 30, 9, 4, 2, 64)
  case = (2, 30, 9, 4, 2, 64, backend_cases.first_dtype(name, "prefill_bwd", dims, (F32, BF16)),
          [9, 0], None, True)
  dq, dk, dv = check_gradients(name, case, interpret=True)
  dq = np.asarray(dq)
  assert not np.any(dq[1]) and not np.any(dq[0, :21])
  assert not np.any(np.asarray(dk)[1]) and not np.any(np.asarray(dv)[1])


def test_each_forward_pairs_with_a_backward_kernel():
  """On sm90 the Mosaic forward runs its own backward; a forward it refuses (a window) runs on
  Triton with the Triton backward; an explicit Triton forward keeps the Triton backward."""
  if "mosaic" not in gp.IMPLEMENTATIONS:
    pytest.skip("no Mosaic GPU backend")
  problem = registry.Problem("prefill", AttentionDims(1, 64, 64, 8, 2, 128), "bfloat16",
                             device=devices.H200)
  mosaic, triton = registry.get("mosaic"), registry.get("triton")
  assert registry.resolve(None, problem) is mosaic
  assert registry.resolve_backward(mosaic, problem) is mosaic
  assert registry.resolve_backward(triton, problem) is triton
  windowed = dataclasses.replace(problem, sliding_window=16)
  assert registry.resolve(None, windowed) is triton
  assert registry.resolve_backward(triton, windowed) is triton


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name,kind,key,config", backend_cases.tuning_entries("prefill_bwd"))
def test_every_backward_tuning_entry_lowers_for_cuda(name, kind, key, config, causal):
  head_dim, dtype = key
  q = jax.ShapeDtypeStruct((2, 70, 14, head_dim), jnp.dtype(dtype))
  k = jax.ShapeDtypeStruct((2, 90, 2, head_dim), jnp.dtype(dtype))
  rows = jax.ShapeDtypeStruct((2,), jnp.int32)
  backend = registry.get(name)

  def f(q, k, v, o, n):
    lse = jnp.zeros(q.shape[:3], jnp.float32)  # residuals and cotangents of the right shapes
    return backend.prefill_bwd(q, k, v, o, n, q, lse, q, lse, causal=causal, scale=0.1,
                               interpret=False, config=config)

  with devices.target(backend_cases.CUDA_TARGET):
    text = numerics.lower_for_cuda(f, q, k, k, rows, rows)
  assert registry.get(name).custom_call in text


# ---------------------------------------------------------------------------------------------
# Decode: the reference's VJP behind the kernel.


@pytest.mark.parametrize("name", backend_cases.implementing("decode", pallas_only=False))
def test_decode_gradients(name):
  q, k, v = numerics.random_qkv(21, 2, 3, 40, 8, 2, 64, F32, jnp.array([30, 5]))
  lengths = jnp.array([30, 5], jnp.int32)
  interpret = backend_cases.interpret_for(name, "cpu")

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v)
    return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.))

  kern = lambda q, k, v: gp.gqa_decode(q, gp.KVCache(k, v, lengths), implementation=name,
                                       interpret=interpret, return_lse=True)
  ref = lambda q, k, v: gp.attention_reference(q, k, v, kv_lengths=lengths, return_lse=True)
  got = jax.grad(functools.partial(loss, kern), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    numerics.assert_parity(a, b, b, name="decode gradient")
  # One token per row ([B, N, H]) too.
  dq = jax.grad(lambda q: jnp.sum(gp.gqa_decode(q, gp.KVCache(k, v, lengths),
                                                implementation=name, interpret=interpret)))(
                                                    q[:, 0])
  assert dq.shape == q[:, 0].shape and np.all(np.isfinite(np.asarray(dq)))


# ---------------------------------------------------------------------------------------------
# GPU: realistic sizes, determinism, memory.


@pytest.mark.parametrize("name,case", _params(GPU_CASES, "gpu"))
def test_gradient_parity_gpu(name, case):
  check_gradients(name, case, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("name", BACKWARD_BACKENDS)
def test_gradients_are_bitwise_deterministic_gpu(name):
  case = (2, 2048, 2048, 32, 8, 128, BF16, [2048, 1500], None, True)
  (q, k, v), kw, w = _inputs(case)
  fn = functools.partial(gp.gqa_attention, implementation=name, return_lse=True, **kw)
  first = _grads(fn, w, q, k, v)
  for _ in range(2):
    again = _grads(fn, w, q, k, v)
    for a, b in zip(first, again):
      np.testing.assert_array_equal(np.asarray(a.astype(F32)), np.asarray(b.astype(F32)))


@pytest.mark.gpu
def test_backward_memory_is_linear_in_length_gpu():
  """B1 S32k 32:8 H128 bf16 forward+backward (default backends): the compiled program's
  temporaries are a small multiple of the inputs, no [T, S] buffer (one would be 4 GiB per
  head in float32)."""
  b, s, n, kh, h = 1, 32768, 32, 8, 128
  q = jnp.zeros((b, s, n, h), BF16)
  k = jnp.zeros((b, s, kh, h), BF16)
  w = jnp.ones((b, s, n, h), BF16)
  f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(gp.gqa_attention(q, k, v).astype(F32) * w),
                       argnums=(0, 1, 2)))
  compiled = f.lower(q, k, k).compile()
  inputs = q.nbytes + 2 * k.nbytes
  stats = compiled.memory_analysis()
  assert stats.temp_size_in_bytes < 4 * inputs, (stats.temp_size_in_bytes, inputs)
  grads = jax.block_until_ready(compiled(q, k, k))
  assert all(g.shape == x.shape for g, x in zip(grads, (q, k, k)))


# ---------------------------------------------------------------------------------------------
# Training: the decoder's loss curve with the kernels equals the one with XLA attention.


def _train_losses(implementation, interpret, steps=4):
  import optax  # pylint: disable=g-import-not-at-top
  from flax_layers import Decoder  # pylint: disable=g-import-not-at-top
  from tests.decoder_fixtures import TINY, random_params  # pylint: disable=g-import-not-at-top
  params = random_params(TINY, seed=3, scale=1.0)
  tokens = jax.random.randint(jax.random.key(7), (2, 13), 0, TINY.vocab_size)
  model = Decoder(TINY, implementation=implementation, interpret=interpret)
  optimizer = optax.adam(3e-2)

  def loss_fn(params):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  return np.array(losses)


@pytest.mark.parametrize("name", [n for n in BACKWARD_BACKENDS if backend_cases.runs(
    n, "prefill_bwd", AttentionDims(2, 12, 12, 4, 2, 16), F32, "cpu")])
def test_training_loss_curve_matches_xla(name):
  kernels = _train_losses(name, interpret=True)
  xla = _train_losses("xla", interpret=False)
  assert kernels[-1] < kernels[0]  # it trains
  np.testing.assert_allclose(kernels, xla, rtol=2e-4)
