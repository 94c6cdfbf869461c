"""Decode parity (``gqa_decode`` over a ``KVCache``) for every registered backend that can run each
case, in the three tiers: the kernel code on this CPU (interpreters; ``"xla"`` as it is), lowered
for CUDA on this CPU (every tuning-table entry), and compiled on a GPU (``-m gpu``)."""
import dataclasses
import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_pallas as gp
from gqa_pallas import devices, registry
from gqa_pallas.validation import AttentionDims
from tests import backend_cases, numerics

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def _cache(k, v, lengths):
  return gp.KVCache(k, v, jnp.asarray(lengths, jnp.int32))


# (B, T, S_max, N, K, H, dtype, lengths, forced splits): odd S_max; lengths 0, 1, block-1,
# block+1, S_max; T in {1, 3, 8}; ratios 1, 2, 4, 7, 8, N:1; H 64/128; three dtypes; NaN past
# lengths; one split (direct path) and several (combine path, some splits empty). The forced
# split count applies to backends whose config has ``num_splits`` (the Triton kernel).
CPU_CASES = [
    (5, 1, 131, 8, 2, 64, F32, [0, 1, 63, 65, 131], 3),
    (3, 3, 97, 7, 1, 128, BF16, [3, 50, 97], 4),
    (2, 8, 77, 8, 8, 64, F16, [8, 77], 1),
    (2, 1, 150, 16, 2, 128, F32, [150, 129], 2),
    (3, 3, 70, 4, 2, 64, BF16, [0, 3, 70], 1),
    (2, 8, 45, 32, 1, 64, F32, [45, 9], 5),
    (1, 1, 300, 8, 1, 128, F16, [255], None),
]

GPU_CASES = [
    (16, 1, 2048, 32, 8, 128, BF16, None, None),
    (4, 1, 8191, 28, 4, 128, F16, [0, 1, 4095, 8191], None),
    (3, 3, 16384, 14, 2, 64, BF16, [16384, 77, 9000], None),
    (2, 8, 5000, 8, 8, 64, F32, [5000, 129], None),
    (1, 16, 32768, 32, 8, 128, BF16, [32768], None),
    (8, 4, 4097, 32, 1, 128, BF16, [4097, 0, 1, 63, 65, 2048, 3000, 4000], None),
    (64, 1, 1024, 32, 8, 128, BF16, None, None),
    (2, 1, 3000, 7, 1, 64, F16, [2999, 1], 7),
]


def _random_case(seed):
  """Seeded random shapes (group sizes 1-16, head dims 8-256, all dtypes, T 1-16, random
  lengths and split counts)."""
  rng = np.random.default_rng(2000 + seed)
  b, kh = int(rng.integers(1, 4)), int(rng.choice([1, 2, 3]))
  g = int(rng.choice([1, 2, 3, 5, 7, 8, 12, 16]))
  h = int(rng.choice([8, 16, 24, 32, 64, 96, 128, 256]))
  dtype = [BF16, F16, F32][int(rng.integers(0, 3))]
  s = int(rng.integers(1, 90))
  t = int(rng.integers(1, 17))
  lengths = [int(x) for x in rng.integers(0, s + 1, size=b)]
  splits = [None, 1, 2, 3, 7][int(rng.integers(0, 5))]
  return (b, t, s, kh * g, kh, h, dtype, lengths, splits)


RANDOM_CASES = [_random_case(seed) for seed in range(4)]


def _case_id(c):
  b, t, s, n, k, h, dt, lengths, splits = c
  return f"B{b}T{t}S{s}-{n}:{k}-H{h}-{jnp.dtype(dt).name}-splits{splits}"


def _dims(c):
  b, t, s, n, k, h, dtype, _, _ = c
  return AttentionDims(b, t, s, n, k, h), dtype, True


def _config(name, case, tier):
  """The backend's default config, with the case's forced split count where it has one."""
  splits = case[-1]
  backend = registry.get(name)
  dims, dtype, _ = _dims(case)
  problem = registry.Problem("decode", dims, jnp.dtype(dtype).name,
                             interpret=backend_cases.interpret_for(name, tier),
                             device=backend_cases.device_for(tier))
  config = backend.default_config(problem)
  if splits is not None and hasattr(config, "num_splits"):
    config = dataclasses.replace(config, num_splits=splits)
  return config


def _run_case(name, case, tier, explicit_offset=False):
  b, t, s_max, n, kh, h, dtype, lengths, _ = case
  lengths = jnp.asarray([s_max] * b if lengths is None else lengths, jnp.int32)
  q, k, v = numerics.random_qkv(zlib.crc32(_case_id(case).encode()), b, t, s_max, n, kh, h,
                                dtype, lengths)
  # q_offset=None: a kernel may derive lengths - T itself (the path gqa_decode takes by default).
  out, lse = gp.gqa_decode(q, _cache(k, v, lengths), implementation=name,
                           q_offset=lengths - t if explicit_offset else None,
                           interpret=backend_cases.interpret_for(name, tier), return_lse=True,
                           config=_config(name, case, tier))
  numerics.check_against_reference(out, lse, q, k, v, factor=3.0, kv_lengths=lengths)
  return out


@pytest.mark.parametrize("name,case", backend_cases.params("decode", CPU_CASES + RANDOM_CASES,
                                                           "cpu", _dims, _case_id))
def test_parity_cpu(name, case):
  _run_case(name, case, "cpu", explicit_offset=zlib.crc32(_case_id(case).encode()) % 2 == 1)


DECODE_KERNELS = backend_cases.implementing("decode")


@pytest.mark.parametrize("name", DECODE_KERNELS)
def test_explicit_offset_equals_derived_offset(name):
  case = (3, 3, 70, 8, 2, 64, F32, [0, 5, 70], 3)
  derived = _run_case(name, case, "cpu")
  explicit = _run_case(name, case, "cpu", explicit_offset=True)
  np.testing.assert_array_equal(explicit, derived)


@pytest.mark.parametrize("name", backend_cases.implementing("decode", pallas_only=False))
def test_batched_equals_per_row_calls(name):
  lengths = jnp.array([40, 0, 17], jnp.int32)
  q, k, v = numerics.random_qkv(11, 3, 2, 40, 8, 2, 32, F32, lengths)
  kw = dict(implementation=name, interpret=backend_cases.interpret_for(name, "cpu"))
  batched = gp.gqa_decode(q, _cache(k, v, lengths), **kw)
  for row in range(3):
    single = gp.gqa_decode(q[row:row + 1], _cache(k[row:row + 1], v[row:row + 1],
                                                   lengths[row:row + 1]), **kw)
    chex.assert_trees_all_close(batched[row:row + 1], single, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", backend_cases.implementing("decode", pallas_only=False))
def test_empty_cache_heads_and_batch(name):
  """S_max = 0, no query heads, B = 0: zeros and lse -inf, whatever the backend (no launch)."""
  kw = dict(implementation=name, interpret=backend_cases.interpret_for(name, "cpu"),
            return_lse=True)
  for b, s, n in ((2, 0, 4), (2, 8, 0), (0, 8, 4)):
    q, k, v = numerics.random_qkv(13, b, 1, s, n, 2, 32, F32)
    out, lse = gp.gqa_decode(q[:, 0], _cache(k, v, jnp.full((b,), min(s, 3), jnp.int32)), **kw)
    assert out.shape == (b, n, 32) and lse.shape == (b, n)
    assert not np.any(np.asarray(out)) and np.all(np.isneginf(np.asarray(lse)))


def test_single_token_layout_and_explicit_offset():
  """``q [B, N, H]`` returns ``[B, N, H]``; an explicit q_offset (ragged num_new) is honoured."""
  lengths = jnp.array([9, 30], jnp.int32)
  q, k, v = numerics.random_qkv(12, 2, 3, 30, 4, 2, 32, F32, lengths)
  cache = _cache(k, v, lengths)
  out1 = gp.gqa_decode(q[:, 0], cache, interpret=True)
  chex.assert_shape(out1, (2, 4, 32))
  ref1 = gp.attention_reference(q[:, :1], k, v, kv_lengths=lengths)[:, 0]
  chex.assert_trees_all_close(out1, ref1, atol=2e-6, rtol=1e-5)
  q_offset = jnp.array([7, 27], jnp.int32)  # row 0 appended 2 valid tokens of 3
  out = gp.gqa_decode(q, cache, q_offset=q_offset, interpret=True)
  ref = gp.attention_reference(q, k, v, q_offset=q_offset, kv_lengths=lengths)
  chex.assert_trees_all_close(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", DECODE_KERNELS)
def test_jit_decode_step_with_append_and_donation(name):
  """A jit step (append + decode) with the cache donated: no retrace, in place, correct."""
  b, s_max, n, kh, h = 2, 24, 4, 2, 32
  cache = gp.KVCache.init(b, s_max, kh, h, F32)
  traces = []

  @functools.partial(jax.jit, donate_argnums=0)
  def step(cache, q, k_new, v_new):
    traces.append(1)
    cache = cache.append(k_new, v_new, implementation=name, interpret=True)
    return cache, gp.gqa_decode(q, cache, implementation=name, interpret=True)

  ks, vs = [], []
  for i in range(5):
    q, k_new, v_new = numerics.random_qkv(100 + i, b, 1, 1, n, kh, h, F32)
    old_k = cache.k
    cache, out = step(cache, q[:, 0], k_new, v_new)
    assert old_k.is_deleted()
    ks.append(k_new)
    vs.append(v_new)
    ref = gp.attention_reference(q, jnp.concatenate(ks, 1), jnp.concatenate(vs, 1))[:, 0]
    chex.assert_trees_all_close(out, ref, atol=2e-6, rtol=1e-5)
  assert len(traces) == 1
  np.testing.assert_array_equal(cache.lengths, [5, 5])


@pytest.mark.parametrize("name,kind,key,config", backend_cases.tuning_entries("decode"))
@pytest.mark.parametrize("batch", [2, 64], ids=["few-programs", "many-programs"])
def test_every_tuning_entry_lowers_for_cuda(name, kind, key, config, batch):
  """Each decode tuning entry lowered for CUDA on this CPU through ``gqa_decode``: with few
  programs (the sequence is split, then combined) and with many (one launch)."""
  head_dim, dtype = key
  q = jax.ShapeDtypeStruct((batch, 3, 14, head_dim), jnp.dtype(dtype))
  k = jax.ShapeDtypeStruct((batch, 500, 2, head_dim), jnp.dtype(dtype))
  rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
  f = lambda q, k, v, n: gp.gqa_decode(q, gp.KVCache(k, v, n), scale=0.1, return_lse=True,
                                       implementation=name, config=config)
  with devices.target(backend_cases.CUDA_TARGET):
    text = numerics.lower_for_cuda(f, q, k, k, rows)
  assert registry.get(name).custom_call in text


@pytest.mark.parametrize("name,case", backend_cases.params("decode", GPU_CASES, "gpu", _dims,
                                                           _case_id))
def test_parity_gpu(name, case):
  _run_case(name, case, "gpu")
