"""Prefill parity (``gqa_attention``) for every registered backend that can run each case, in the
three tiers: the kernel code on this CPU (Pallas interpret mode / Mosaic GPU's interpreter; the
``"xla"`` backend as it is), lowered for CUDA on this CPU (every tuning-table entry), and compiled
on a GPU (``-m gpu``)."""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_pallas as gp
from benchmarks import shapes
from gqa_pallas import devices, registry
from gqa_pallas.validation import AttentionDims
from tests import backend_cases, numerics

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

# (B, T, S, N, K, H, dtype, kv_lengths, q_offset, causal): odd lengths, T < S and T > S, ragged
# lengths including 0, every ratio class (1, 2, 4, 7, 8, N:1), head dims 64/128 and two padded
# ones, all three dtypes.
CPU_CASES = [
    (1, 17, 17, 4, 4, 64, F32, None, None, True),           # MHA, square
    (2, 17, 113, 8, 4, 64, BF16, [113, 60], None, True),      # G=2, T < S, ragged
    (2, 113, 17, 8, 2, 128, F16, None, None, True),           # G=4, T > S: leading rows empty
    (2, 1, 250, 14, 2, 64, BF16, [250, 0], None, True),       # G=7, a row of length 0
    (1, 40, 40, 8, 1, 128, F32, [33], None, True),            # G=8 = N:1 (MQA)
    (2, 33, 70, 16, 1, 64, F16, None, [37, -5], True),        # MQA 16:1, explicit offsets
    (2, 9, 9, 4, 2, 32, F32, None, None, True),               # small head dim
    (1, 21, 30, 6, 3, 80, BF16, [25], None, True),            # H=80 (padded to 128)
    (2, 20, 50, 4, 4, 64, F32, [5, 50], None, False),         # non-causal, ragged
    (1, 130, 130, 2, 1, 64, BF16, None, None, True),          # several query tiles
]

# The CPU tier of a backend whose interpreter takes seconds per case (Mosaic GPU's): fewer cases,
# the same classes: tails of T and S, T != S, ragged lengths with NaN past them, an empty row,
# negative offsets, G = 1 (two warpgroups on different positions), 2, 4, 5, 7, 8, 16, 32 (tiles
# that split a position block's heads), head dims 64 and 128, bf16 and fp16, causal and full.
SLOW_INTERPRETER_CASES = [
    (1, 50, 77, 8, 2, 64, BF16, [70], None, True),            # G=4, T < S, tails, ragged
    (2, 20, 130, 14, 2, 64, F16, [130, 0], None, True),       # G=7, a row of length 0
    (1, 40, 40, 8, 1, 128, BF16, [33], None, True),           # G=8 = N:1 (MQA), H=128
    (2, 33, 70, 16, 1, 64, F16, None, [37, -5], True),        # G=16, explicit offsets
    (1, 136, 100, 2, 2, 128, F16, None, None, True),          # G=1, T > S, two query tiles
    (1, 90, 60, 4, 2, 64, BF16, [41], None, False),           # G=2, non-causal, ragged
    (1, 27, 35, 5, 1, 128, BF16, None, [8], True),            # G=5: chunks across tiles
    (1, 9, 20, 32, 1, 64, F16, [17], None, True),             # G=32 (MQA 32:1)
]

# The same grid at realistic sizes on the GPU.
GPU_CASES = [
    (2, 1000, 1000, 32, 8, 128, BF16, [1000, 517], None, True),
    (2, 77, 3000, 14, 2, 64, F16, [0, 2999], None, True),
    (1, 3000, 200, 8, 1, 128, BF16, None, None, True),
    (2, 513, 4097, 28, 4, 128, F32, [4097, 1000], None, True),
    (1, 250, 16384, 32, 8, 128, BF16, None, None, True),
    (1, 2048, 16384, 32, 8, 128, BF16, [16000], None, True),  # chunk at the end of 16k
    (3, 1024, 1024, 4, 4, 64, BF16, None, [0, 100, -10], True),
    (2, 700, 1100, 7, 1, 64, F16, [1100, 3], None, False),
    (2, 333, 333, 16, 2, 80, BF16, None, None, True),
]


def _random_case(seed):
  """Seeded random shapes: group sizes 1-16 (3, 5, 7, 12 included), head dims 8-256, all dtypes,
  random lengths and offsets (NaN past the lengths), causal or not."""
  rng = np.random.default_rng(1000 + seed)
  b, kh = int(rng.integers(1, 4)), int(rng.choice([1, 2, 3]))
  g = int(rng.choice([1, 2, 3, 5, 7, 8, 12, 16]))
  h = int(rng.choice([8, 16, 24, 32, 64, 96, 128, 256]))
  dtype = [BF16, F16, F32][int(rng.integers(0, 3))]
  s, t = int(rng.integers(1, 90)), int(rng.integers(1, 90))
  causal = bool(rng.integers(0, 2))
  kvl = [int(x) for x in rng.integers(0, s + 1, size=b)]
  q_offset = [int(x) for x in rng.integers(-5, s + 3, size=b)]
  return (b, t, s, kh * g, kh, h, dtype, kvl, q_offset, causal)


RANDOM_CASES = [_random_case(seed) for seed in range(4)]


def _case_id(c):
  b, t, s, n, k, h, dt, kvl, qo, causal = c
  return f"B{b}T{t}S{s}-{n}:{k}-H{h}-{jnp.dtype(dt).name}{'-ragged' if kvl else ''}" \
         f"{'-qoff' if qo is not None else ''}{'' if causal else '-full'}"


def _dims(c):
  b, t, s, n, k, h, dtype, _, _, causal = c
  return AttentionDims(b, t, s, n, k, h), dtype, causal


def _check_case(name, case, tier):
  b, t, s, n, k, h, dtype, kvl, q_offset, causal = case
  kv_lengths = None if kvl is None else jnp.array(kvl, jnp.int32)
  q_offset = None if q_offset is None else jnp.array(q_offset, jnp.int32)
  seed = zlib.crc32(_case_id(case).encode()) % 1000
  q, kk, v = numerics.random_qkv(seed, b, t, s, n, k, h, dtype, kv_lengths)
  out, lse = gp.gqa_attention(q, kk, v, causal=causal, q_offset=q_offset, kv_lengths=kv_lengths,
                              implementation=name,
                              interpret=backend_cases.interpret_for(name, tier),
                              return_lse=True)
  numerics.check_against_reference(out, lse, q, kk, v, factor=2.0, causal=causal,
                                   q_offset=q_offset, kv_lengths=kv_lengths)


@pytest.mark.parametrize("name,case", backend_cases.params(
    "prefill", CPU_CASES + RANDOM_CASES, "cpu", _dims, _case_id, SLOW_INTERPRETER_CASES))
def test_parity_cpu(name, case):
  _check_case(name, case, "cpu")


def test_default_dispatch_in_interpret_mode_and_scale():
  """``interpret=True`` with no implementation runs a kernel; a custom scale is honoured."""
  q, k, v = numerics.random_qkv(3, 1, 12, 20, 4, 2, 64, F32)
  out = gp.gqa_attention(q, k, v, interpret=True, scale=0.3)
  ref = gp.attention_reference(q, k, v, scale=0.3)
  numerics.assert_parity(out, ref, ref)


@pytest.mark.parametrize("scale", [0.3, -0.25])  # a negative scale flips which score is largest
@pytest.mark.parametrize("name", backend_cases.implementing("prefill"))
def test_custom_scale(name, scale):
  dtype = backend_cases.first_dtype(name, "prefill", AttentionDims(1, 12, 20, 4, 2, 64),
                                    (F32, BF16))
  q, k, v = numerics.random_qkv(3, 1, 12, 20, 4, 2, 64, dtype)
  out = gp.gqa_attention(q, k, v, implementation=name, interpret=True, scale=scale)
  ref = gp.attention_reference(q, k, v, scale=scale)
  numerics.assert_parity(out, ref, gp.attention_reference(q, k, v, scale=scale,
                                                          compute_dtype=dtype))


@pytest.mark.parametrize("name", backend_cases.implementing("prefill"))
def test_gradients_match_reference(name):
  h = 64 if registry.get(name).slow_interpreter else 32
  dtype = backend_cases.first_dtype(name, "prefill", AttentionDims(1, 10, 14, 4, 2, h),
                                    (F32, BF16))
  q, k, v = numerics.random_qkv(4, 1, 10, 14, 4, 2, h, dtype)
  kvl = jnp.array([11], jnp.int32)

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v)
    return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.))

  kern = functools.partial(gp.gqa_attention, kv_lengths=kvl, implementation=name,
                           interpret=True, return_lse=True)
  ref = functools.partial(gp.attention_reference, kv_lengths=kvl, return_lse=True)
  ref_d = functools.partial(ref, compute_dtype=dtype)
  grads = [jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2))(q, k, v)
           for fn in (kern, ref, ref_d)]
  for a, b, b_d in zip(*grads):
    numerics.assert_parity(a, b, b_d, factor=3.0, name="gradient")


@pytest.mark.parametrize("name", backend_cases.implementing("prefill", pallas_only=False))
def test_empty_query_batch_keys_and_heads(name):
  interpret = backend_cases.interpret_for(name, "cpu")
  dtype = backend_cases.first_dtype(name, "prefill", AttentionDims(2, 3, 5, 4, 2, 64),
                                    (F32, BF16))
  for b, t, s, n in ((2, 0, 5, 4), (0, 3, 5, 4), (2, 3, 0, 4), (2, 3, 5, 0)):
    q, k, v = numerics.random_qkv(8, b, t, s, n, 2, 64, dtype)
    out, lse = gp.gqa_attention(q, k, v, implementation=name, interpret=interpret,
                                return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert not np.any(np.asarray(out, np.float32)) and np.all(np.isneginf(lse))


@pytest.mark.parametrize("name,kind,key,config", backend_cases.tuning_entries("prefill"))
def test_every_tuning_entry_lowers_for_cuda(name, kind, key, config):
  """Interpreters skip lowering: lower each tuning-table entry for CUDA on this CPU, through
  ``gqa_attention`` (validation and dispatch included), planned for a GPU."""
  head_dim, dtype = key
  q = jax.ShapeDtypeStruct((2, 70, 14, head_dim), jnp.dtype(dtype))
  k = jax.ShapeDtypeStruct((2, 90, 2, head_dim), jnp.dtype(dtype))
  rows = jax.ShapeDtypeStruct((2,), jnp.int32)
  f = functools.partial(gp.gqa_attention, scale=0.1, return_lse=True, implementation=name,
                        config=config)
  with devices.target(backend_cases.CUDA_TARGET):
    text = numerics.lower_for_cuda(lambda q, k, v, o, n: f(q, k, v, q_offset=o, kv_lengths=n),
                                   q, k, k, rows, rows)
  assert registry.get(name).custom_call in text


def _mosaic_splits_case(kv_splits):
  """Chunked prefill over a split key range: T != S, a row of length 0, an offset that puts
  keys of the last split out of reach, tails in T and S."""
  from gqa_pallas.mosaic.prefill import MosaicPrefillConfig  # pylint: disable=g-import-not-at-top
  q, k, v = numerics.random_qkv(11, 3, 13, 300, 8, 2, 64, BF16,
                                jnp.array([300, 0, 190], jnp.int32))
  kw = dict(q_offset=jnp.array([287, 0, 100], jnp.int32),
            kv_lengths=jnp.array([300, 0, 190], jnp.int32))
  return (q, k, v), kw, MosaicPrefillConfig(block_kv=64, stages=2, kv_splits=kv_splits)


@pytest.mark.skipif("mosaic" not in gp.IMPLEMENTATIONS, reason="no Mosaic GPU backend")
def test_mosaic_kv_splits_cpu():
  """Splits of the keys (the chunked-prefill launch), merged by their lse, in the interpreter."""
  (q, k, v), kw, config = _mosaic_splits_case(kv_splits=3)
  out, lse = gp.gqa_attention(q, k, v, implementation="mosaic", interpret=True, config=config,
                              return_lse=True, **kw)
  numerics.check_against_reference(out, lse, q, k, v, factor=2.0, **kw)


@pytest.mark.skipif("mosaic" not in gp.IMPLEMENTATIONS, reason="no Mosaic GPU backend")
def test_mosaic_kv_splits_lower_for_cuda():
  (q, k, v), kw, config = _mosaic_splits_case(kv_splits=4)
  f = functools.partial(gp.gqa_attention, implementation="mosaic", config=config)
  with devices.target(backend_cases.CUDA_TARGET):
    text = numerics.lower_for_cuda(lambda q, k, v, o, n: f(q, k, v, q_offset=o, kv_lengths=n),
                                   q, k, v, kw["q_offset"], kw["kv_lengths"])
  assert "mosaic_gpu" in text


# ---------------------------------------------------------------------------------------------
# GPU: the grid at realistic sizes, plus the benchmark's anchor shapes.


@pytest.mark.parametrize("name,case", backend_cases.params("prefill", GPU_CASES, "gpu", _dims,
                                                           _case_id))
def test_parity_gpu(name, case):
  _check_case(name, case, "gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", shapes.PREFILL_GRID, ids=str)
def test_gpu_anchor_shapes(shape):
  """The default backend on the anchor shapes, against cuDNN and, on one kv group of one row,
  the float32 reference."""
  b, s, n, k, h = shape
  q, kk, v = numerics.random_qkv(s + n, b, s, s, n, k, h, BF16)
  out = gp.gqa_attention(q, kk, v)
  assert bool(jnp.all(jnp.isfinite(out)))
  g = n // k
  sl = min(s, 2048)
  part = (slice(0, 1), slice(s - sl, s), slice(0, g))
  ref32 = gp.attention_reference(q[part], kk[:1, :, :1], v[:1, :, :1],
                                 q_offset=jnp.array([s - sl]))
  ref_d = gp.attention_reference(q[part], kk[:1, :, :1], v[:1, :, :1],
                                 q_offset=jnp.array([s - sl]), compute_dtype=BF16)
  numerics.assert_parity(out[part], ref32, ref_d, factor=2.0)
  cudnn = jax.nn.dot_product_attention(q, kk, v, is_causal=True, implementation="cudnn")
  err = np.abs(np.asarray(out, np.float32) - np.asarray(cudnn, np.float32))
  assert err.max() < 0.05
