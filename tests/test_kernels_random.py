"""Seeded random shapes for both kernels in interpret mode: group sizes 1-16 (including 3, 5, 7,
12), head dims 8-256, all dtypes, random lengths / offsets / split counts, NaN past the lengths.
Complements the fixed grids in test_prefill.py / test_decode.py."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import gqa_pallas as gp
from gqa_pallas import decode_triton
from tests import numerics

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]


def _dims(rng):
  b = int(rng.integers(1, 4))
  kh = int(rng.choice([1, 2, 3]))
  g = int(rng.choice([1, 2, 3, 5, 7, 8, 12, 16]))
  h = int(rng.choice([8, 16, 24, 32, 64, 96, 128, 256]))
  return b, kh * g, kh, h, DTYPES[int(rng.integers(0, 3))], int(rng.integers(1, 90))


@pytest.mark.parametrize("seed", range(4))
def test_prefill_random_shapes(seed):
  rng = np.random.default_rng(1000 + seed)
  b, n, kh, h, dtype, s = _dims(rng)
  t = int(rng.integers(1, 90))
  causal = bool(rng.integers(0, 2))
  kvl = jnp.asarray(rng.integers(0, s + 1, size=b), jnp.int32)
  q_offset = jnp.asarray(rng.integers(-5, s + 3, size=b), jnp.int32)
  q, k, v = numerics.random_qkv(seed, b, t, s, n, kh, h, dtype, kvl)
  out, lse = gp.gqa_attention(q, k, v, causal=causal, q_offset=q_offset, kv_lengths=kvl,
                              implementation="triton", interpret=True, return_lse=True)
  numerics.check_against_reference(out, lse, q, k, v, factor=2.0, causal=causal,
                                   q_offset=q_offset, kv_lengths=kvl)


@pytest.mark.parametrize("seed", range(4))
def test_decode_random_shapes(seed):
  rng = np.random.default_rng(2000 + seed)
  b, n, kh, h, dtype, s = _dims(rng)
  t = int(rng.integers(1, 17))
  lengths = jnp.asarray(rng.integers(0, s + 1, size=b), jnp.int32)
  splits = [None, 1, 2, 3, 7][int(rng.integers(0, 5))]
  q, k, v = numerics.random_qkv(seed, b, t, s, n, kh, h, dtype, lengths)
  cfg = dataclasses.replace(decode_triton.default_config(h, dtype), num_splits=splits)
  q_offset = None if seed % 2 else lengths - t  # derived in the kernel, or given
  out, lse = decode_triton.decode_attention(q, k, v, q_offset, lengths, scale=h ** -0.5,
                                            return_lse=True, interpret=True, config=cfg)
  numerics.check_against_reference(out, lse, q, k, v, factor=3.0, kv_lengths=lengths)
