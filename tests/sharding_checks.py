"""Sharding checks on simulated CPU devices; ``tests/test_sharding.py`` runs this module in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set
before JAX starts). Each check raises on failure; the last line printed is ``ok``."""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gqa_pallas as gp
from gqa_pallas import sharding
from tests import numerics

BF16, F32 = jnp.bfloat16, jnp.float32


def _cache(devices, s, lengths, dtype, seed, n=8, k=2, h=32, t=1):
  b = len(lengths)
  lengths = jnp.asarray(lengths, jnp.int32)
  q, kk, v = numerics.random_qkv(seed, b, t, s, n, k, h, dtype, kv_lengths=lengths)  # NaN past
  mesh = Mesh(np.array(jax.devices()[:devices]), ("seq",))
  seq = NamedSharding(mesh, P(None, "seq"))
  cache = gp.KVCache(jax.device_put(kk, seq), jax.device_put(v, seq), lengths)
  return mesh, q, cache, gp.KVCache(kk, v, lengths)


def check_sequence_parallel(implementation, interpret, dtype, devices, t=1, window=None,
                            offset=None):
  s = 16 * devices
  # Full; ending inside the second slice; empty; inside the first slice only.
  lengths = [s, 16 + 5, 0, 3]
  mesh, q, cache, whole = _cache(devices, s, lengths, dtype, seed=devices + t, t=t)
  kw = dict(implementation=implementation, interpret=interpret, sliding_window=window,
            q_offset=offset)
  run = jax.jit(functools.partial(sharding.sequence_parallel_decode, mesh=mesh, axis_name="seq",
                                  return_lse=True, **kw))
  out, lse = run(q, cache)
  ref_kw = dict(q_offset=offset, sliding_window=window, return_lse=True)
  up = lambda x: x.astype(F32)
  ref32, lse32 = gp.gqa_decode(up(q), gp.KVCache(up(whole.k), up(whole.v), whole.lengths),
                               implementation="xla", **ref_kw)
  ref_d, _ = gp.gqa_decode(q, whole, implementation="xla", **ref_kw)
  numerics.assert_parity(out, ref32, ref_d, factor=2.0)
  finite = np.isfinite(np.asarray(lse32))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(lse32)[finite], atol=1e-4)
  assert np.all(np.asarray(out[2], F32) == 0), "an empty row must be 0"
  # The cache never moves: the program holds no all-gather, only the partials' all-reduce.
  hlo = run.lower(q, cache).compile().as_text()
  assert "all-gather" not in hlo, "the sharded cache was gathered"
  assert "all-reduce" in hlo


def check_refusals():
  mesh = Mesh(np.array(jax.devices()[:3]), ("seq",))
  _, q, _, whole = _cache(1, 16, [16, 4], F32, seed=0)
  for call, words in (
      (lambda: sharding.sequence_parallel_decode(q, whole, mesh=mesh, axis_name="seq"),
       "divide evenly"),
      (lambda: sharding.sequence_parallel_decode(q, whole, mesh=mesh, axis_name="x"),
       "not an axis")):
    try:
      call()
    except ValueError as e:
      assert words in str(e), e
    else:
      raise AssertionError(f"no error for {words}")


def main():
  assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  check_refusals()
  for devices in (2, 8):
    check_sequence_parallel("xla", False, F32, devices)
  check_sequence_parallel("xla", False, F32, 4, t=3)
  check_sequence_parallel("xla", False, F32, 4, t=2, offset=jnp.array([40, 10, 0, 1]))
  check_sequence_parallel("xla", False, F32, 4, window=20)
  check_sequence_parallel("triton", True, BF16, 4)
  check_sequence_parallel("triton", True, F32, 4, t=3, window=9)
  print("ok")


if __name__ == "__main__":
  sys.exit(main())
