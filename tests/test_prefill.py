"""The Triton prefill kernel: interpret mode on CPU (CI), the real lowering for CUDA on CPU, and
the compiled kernel on a GPU (``-m gpu``)."""
import functools
import zlib
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_pallas as gp
from gqa_pallas import prefill_triton
from tests import numerics
from tests.conftest import HAS_GPU

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
    (2, 33, 70, 16, 1, 64, F16, None, jnp.array([37, -5]), True),  # MQA 16:1, explicit offsets
    (2, 9, 9, 4, 2, 32, F32, None, None, True),               # small head dim
    (1, 21, 30, 6, 3, 80, BF16, [25], None, True),            # H=80 (padded to 128)
    (2, 20, 50, 4, 4, 64, F32, [5, 50], None, False),         # non-causal, ragged
    (1, 130, 130, 2, 1, 64, BF16, None, None, True),          # several query tiles
]


def _case_id(c):
  b, t, s, n, k, h, dt, kvl, qo, causal = c
  return f"B{b}T{t}S{s}-{n}:{k}-H{h}-{jnp.dtype(dt).name}{'-ragged' if kvl else ''}" \
         f"{'-qoff' if qo is not None else ''}{'' if causal else '-full'}"


def _check_case(case, interpret):
  b, t, s, n, k, h, dtype, kvl, q_offset, causal = case
  kv_lengths = None if kvl is None else jnp.array(kvl, jnp.int32)
  seed = zlib.crc32(_case_id(case).encode()) % 1000
  q, kk, v = numerics.random_qkv(seed, b, t, s, n, k, h, dtype, kv_lengths)
  out, lse = gp.gqa_attention(q, kk, v, causal=causal, q_offset=q_offset, kv_lengths=kv_lengths,
                              implementation="triton", interpret=interpret, return_lse=True)
  numerics.check_against_reference(out, lse, q, kk, v, factor=2.0, causal=causal,
                                   q_offset=q_offset, kv_lengths=kv_lengths)


@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_interpret_parity(case):
  _check_case(case, interpret=True)


def test_interpret_default_dispatch_and_scale():
  """``interpret=True`` with no implementation runs the kernel; a custom scale is honoured."""
  q, k, v = numerics.random_qkv(3, 1, 12, 20, 4, 2, 64, F32)
  out = gp.gqa_attention(q, k, v, interpret=True, scale=0.3)
  ref = gp.attention_reference(q, k, v, scale=0.3)
  chex.assert_trees_all_close(out, ref, atol=2e-6, rtol=1e-5)


def test_gradients_match_reference():
  q, k, v = numerics.random_qkv(4, 1, 10, 14, 4, 2, 32, F32)
  kvl = jnp.array([11], jnp.int32)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))

  kern = functools.partial(gp.gqa_attention, kv_lengths=kvl, implementation="triton",
                           interpret=True)
  ref = functools.partial(gp.attention_reference, kv_lengths=kvl)
  g_kern = jax.grad(functools.partial(loss, kern), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(g_kern, g_ref, atol=1e-5, rtol=1e-4)


def test_launch_parameters_logged_at_debug(caplog):
  q, k, v = numerics.random_qkv(5, 1, 8, 8, 2, 1, 16, F32)
  with caplog.at_level(logging.DEBUG, logger="gqa_pallas"):
    gp.gqa_attention(q, k, v, interpret=True)
  assert any("gqa prefill launch" in r.getMessage() and "num_warps" in r.getMessage()
             for r in caplog.records)


def test_cpu_default_is_xla_and_unknown_name_rejected():
  assert gp.api.resolve_implementation(None, False) == ("triton" if HAS_GPU else "xla")
  q, k, v = numerics.random_qkv(6, 1, 4, 4, 2, 2, 16, F32)
  with pytest.raises(ValueError, match="triton.*xla"):
    gp.gqa_attention(q, k, v, implementation="cuda-magic")


def test_unsupported_head_dim_rejected():
  q, k, v = numerics.random_qkv(7, 1, 4, 4, 2, 2, 12, F32)
  with pytest.raises(ValueError, match="head dims"):
    gp.gqa_attention(q, k, v, implementation="triton", interpret=True)


def test_empty_query_and_batch():
  q, k, v = numerics.random_qkv(8, 2, 0, 5, 4, 2, 16, F32)
  out, lse = gp.gqa_attention(q, k, v, implementation="triton", interpret=True, return_lse=True)
  chex.assert_shape(out, (2, 0, 4, 16))
  chex.assert_shape(lse, (2, 0, 4))


@pytest.mark.parametrize("key", sorted(prefill_triton.TUNING_TABLE), ids=str)
def test_every_tuning_entry_lowers_for_cuda(key):
  """Interpret mode skips lowering: lower each tuning-table entry for CUDA on this CPU."""
  head_dim_p, dtype = key
  h = head_dim_p
  q = jax.ShapeDtypeStruct((2, 70, 14, h), jnp.dtype(dtype))
  k = jax.ShapeDtypeStruct((2, 90, 2, h), jnp.dtype(dtype))
  rows = jax.ShapeDtypeStruct((2,), jnp.int32)
  f = functools.partial(prefill_triton.prefill_attention, causal=True, scale=0.1,
                        return_lse=True, config=prefill_triton.TUNING_TABLE[key])
  text = numerics.lower_for_cuda(f, q, k, k, rows, rows)
  assert "triton" in text


# ---------------------------------------------------------------------------------------------
# GPU: the same grid at realistic sizes, plus the anchor shapes.

GPU_CASES = [
    (2, 1000, 1000, 32, 8, 128, BF16, [1000, 517], None, True),
    (2, 77, 3000, 14, 2, 64, F16, [0, 2999], None, True),
    (1, 3000, 200, 8, 1, 128, BF16, None, None, True),
    (2, 513, 4097, 28, 4, 128, F32, [4097, 1000], None, True),
    (1, 250, 16384, 32, 8, 128, BF16, None, None, True),
    (1, 2048, 16384, 32, 8, 128, BF16, [16000], None, True),  # chunk at the end of 16k
    (3, 1024, 1024, 4, 4, 64, BF16, None, jnp.array([0, 100, -10]), True),
    (2, 700, 1100, 7, 1, 64, F16, [1100, 3], None, False),
    (2, 333, 333, 16, 2, 80, BF16, None, None, True),
]
ANCHOR_SHAPES = [(8, 2048, 32, 8, 128), (4, 4096, 32, 8, 128), (2, 8192, 32, 8, 128),
                 (1, 16384, 32, 8, 128), (8, 2048, 14, 2, 64), (2, 8192, 14, 2, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_gpu_parity(case):
  _check_case(case, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ANCHOR_SHAPES, ids=str)
def test_gpu_anchor_shapes(shape):
  """Anchor shapes against cuDNN and, on one kv group of one row, the float32 reference."""
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
