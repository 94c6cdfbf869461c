"""The split-K Triton decode kernel over the KV cache: interpret mode on CPU (CI), the CUDA
lowering on CPU, and the compiled kernel on a GPU (``-m gpu``)."""
import dataclasses
import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_pallas as gp
from gqa_pallas import decode_triton
from tests import numerics

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def _cache(k, v, lengths):
  return gp.KVCache(k=k, v=v, lengths=jnp.asarray(lengths, jnp.int32),
                    overflowed=jnp.zeros((k.shape[0],), jnp.bool_))


def _run_case(b, t, s_max, n, kh, h, dtype, lengths, splits, interpret, seed):
  lengths = jnp.asarray(lengths, jnp.int32)
  q, k, v = numerics.random_qkv(seed, b, t, s_max, n, kh, h, dtype, lengths)
  cfg = dataclasses.replace(decode_triton.default_config(h, dtype), num_splits=splits)
  # q_offset=None: the kernel derives lengths - T itself (the path gqa_decode takes by default).
  out, lse = decode_triton.decode_attention(q, k, v, None, lengths, scale=h ** -0.5,
                                            return_lse=True, interpret=interpret, config=cfg)
  numerics.check_against_reference(out, lse, q, k, v, factor=3.0, kv_lengths=lengths)
  return q, k, v, lengths, cfg


# (B, T, S_max, N, K, H, dtype, lengths, forced splits): odd S_max; lengths 0, 1, block-1,
# block+1, S_max; T in {1, 3, 8}; ratios 1, 2, 4, 7, 8, N:1; H 64/128; three dtypes; NaN past
# lengths; one split (direct path) and several (combine path, some splits empty).
CPU_CASES = [
    (5, 1, 131, 8, 2, 64, F32, [0, 1, 63, 65, 131], 3),
    (3, 3, 97, 7, 1, 128, BF16, [3, 50, 97], 4),
    (2, 8, 77, 8, 8, 64, F16, [8, 77], 1),
    (2, 1, 150, 16, 2, 128, F32, [150, 129], 2),
    (3, 3, 70, 4, 2, 64, BF16, [0, 3, 70], 1),
    (2, 8, 45, 32, 1, 64, F32, [45, 9], 5),
    (1, 1, 300, 8, 1, 128, F16, [255], None),
]


def _case_id(c):
  b, t, s, n, k, h, dt, lengths, splits = c
  return f"B{b}T{t}S{s}-{n}:{k}-H{h}-{jnp.dtype(dt).name}-splits{splits}"


@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_interpret_parity(case):
  *shape, splits = case
  _run_case(*shape, splits=splits, interpret=True, seed=zlib.crc32(_case_id(case).encode()))


def test_explicit_offset_equals_derived_offset():
  q, k, v, lengths, cfg = _run_case(3, 3, 70, 8, 2, 64, F32, [0, 5, 70], splits=3,
                                    interpret=True, seed=5)
  explicit = decode_triton.decode_attention(q, k, v, lengths - 3, lengths, scale=0.125,
                                            interpret=True, config=cfg)
  derived = decode_triton.decode_attention(q, k, v, None, lengths, scale=0.125, interpret=True,
                                           config=cfg)
  np.testing.assert_array_equal(explicit, derived)


def test_batched_equals_per_row_calls():
  lengths = jnp.array([40, 0, 17], jnp.int32)
  q, k, v = numerics.random_qkv(11, 3, 2, 40, 8, 2, 32, F32, lengths)
  cache = _cache(k, v, lengths)
  batched = gp.gqa_decode(q, cache, implementation="triton", interpret=True)
  for row in range(3):
    single = gp.gqa_decode(q[row:row + 1], _cache(k[row:row + 1], v[row:row + 1],
                                                   lengths[row:row + 1]),
                           implementation="triton", interpret=True)
    chex.assert_trees_all_close(batched[row:row + 1], single, atol=1e-6, rtol=1e-6)


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


def test_jit_decode_step_with_append_and_donation():
  """A jit step (append + decode) with the cache donated: no retrace, in place, correct."""
  b, s_max, n, kh, h = 2, 24, 4, 2, 32
  cache = gp.KVCache.init(b, s_max, kh, h, F32)
  traces = []

  @functools.partial(jax.jit, donate_argnums=0)
  def step(cache, q, k_new, v_new):
    traces.append(1)
    cache = cache.append(k_new, v_new)
    return cache, gp.gqa_decode(q, cache, implementation="triton", interpret=True)

  ks, vs, qs = [], [], []
  for i in range(5):
    q, k_new, v_new = numerics.random_qkv(100 + i, b, 1, 1, n, kh, h, F32)
    old_k = cache.k
    cache, out = step(cache, q[:, 0], k_new, v_new)
    assert old_k.is_deleted()
    ks.append(k_new)
    vs.append(v_new)
    qs.append(q)
    k_all, v_all = jnp.concatenate(ks, 1), jnp.concatenate(vs, 1)
    ref = gp.attention_reference(q, k_all, v_all)[:, 0]
    chex.assert_trees_all_close(out, ref, atol=2e-6, rtol=1e-5)
  assert len(traces) == 1
  np.testing.assert_array_equal(cache.lengths, [5, 5])


def test_splits_heuristic():
  cfg = decode_triton.DecodeConfig()
  # A full GPU of programs and a short cache: one split, no combine pass.
  assert decode_triton.choose_splits(128, 2048, cfg, sm_count=132) == 1
  # Few programs: split the sequence so every SM gets work.
  assert decode_triton.choose_splits(8, 32768, cfg, sm_count=132) >= 16
  # Never more splits than blocks.
  assert decode_triton.choose_splits(1, 100, cfg, sm_count=132) <= 2
  # Many query rows over a short cache: the float32 partials would outweigh the K/V they
  # summarise, so the splits are capped (at a power of two).
  small = decode_triton.DecodeConfig(programs_per_sm=4)
  assert decode_triton.choose_splits(32, 4096, small, sm_count=132, tile_rows=7) == 16
  assert decode_triton.choose_splits(32, 4096, small, sm_count=132, tile_rows=56) == 8
  # Wide tiles (more than 16 query rows per kv head) are padded to 64 rows with one warp per
  # 16 rows; narrow ones keep the configured warps.
  assert decode_triton.tile_rows_for(4, 7, cfg) == 64
  assert decode_triton.tile_rows_for(1, 7, cfg) == 16
  assert decode_triton.tile_rows_for(16, 8, cfg) == 64  # two row tiles
  assert decode_triton.tile_rows_for(16, 8, dataclasses.replace(cfg, max_block_m=128)) == 128
  assert decode_triton.warps_for(64, 2, cfg) == 4
  assert decode_triton.warps_for(16, 2, cfg) == 2
  assert decode_triton.warps_for(128, 4, cfg) == 8


@pytest.mark.parametrize("key", sorted(decode_triton.TUNING_TABLE), ids=str)
@pytest.mark.parametrize("split", [1, 3])
def test_every_tuning_entry_lowers_for_cuda(key, split):
  head_dim_p, dtype = key
  q = jax.ShapeDtypeStruct((2, 3, 14, head_dim_p), jnp.dtype(dtype))
  k = jax.ShapeDtypeStruct((2, 500, 2, head_dim_p), jnp.dtype(dtype))
  rows = jax.ShapeDtypeStruct((2,), jnp.int32)
  cfg = dataclasses.replace(decode_triton.TUNING_TABLE[key], num_splits=split)
  f = functools.partial(decode_triton.decode_attention, scale=0.1, return_lse=True, config=cfg)
  text = numerics.lower_for_cuda(f, q, k, k, rows, rows)
  assert "triton" in text


# ---------------------------------------------------------------------------------------------
# GPU: the same at realistic sizes (heuristic split counts).

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


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_gpu_parity(case):
  b, t, s, n, kh, h, dtype, lengths, splits = case
  lengths = [s] * b if lengths is None else lengths
  _run_case(b, t, s, n, kh, h, dtype, lengths, splits=splits, interpret=False,
            seed=zlib.crc32(_case_id(case).encode()))
