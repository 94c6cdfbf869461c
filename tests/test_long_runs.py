"""Long runs through the Flax layer: a jit-compiled decode step called for every slot of the
cache with the cache donated — one trace, device memory flat, outputs equal to the full-sequence
layer at sampled steps — then the cache filled exactly to ``S_max`` and one token past it
(dropped, the row flagged, nothing else touched). 4096 steps on the GPU, 48 on the CPU."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_layers import GQAAttention
from gqa_pallas import KVCache
from tests.conftest import HAS_GPU

HIGHEST = jax.lax.Precision.HIGHEST


def _bytes_in_use():
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("bytes_in_use")


def _decode_loop(steps, implementation, interpret=False, b=2, d=128, n=8, k=2):
  x = jax.random.normal(jax.random.key(0), (b, steps, d), jnp.float32)
  layer = GQAAttention(num_heads=n, num_kv_heads=k, rope_theta=1e4, is_causal=True,
                       precision=HIGHEST, implementation=implementation, interpret=interpret)
  params = layer.init(jax.random.key(1), x[:, :8])
  traces = []

  @functools.partial(jax.jit, donate_argnames="cache")
  def step(params, x_t, cache):
    traces.append(1)  # runs once per trace
    return layer.apply(params, x_t, cache=cache)

  cache = KVCache.init(b, steps, k, d // n, jnp.float32)
  ys, memory = [], []
  for i in range(steps):
    y, cache = step(params, x[:, i:i + 1], cache)
    ys.append(np.asarray(y))  # on the host: device memory holds only the cache
    if i in (15, steps - 1):
      jax.block_until_ready(cache)
      memory.append(_bytes_in_use())
  assert len(traces) == 1, f"{len(traces)} traces for {steps} steps"
  if memory[0] is not None:  # device memory flat
    grown = memory[1] - memory[0]
    assert abs(grown) <= 1 << 20, f"device memory grew by {grown} bytes"
  np.testing.assert_array_equal(np.asarray(cache.lengths), [steps] * b)
  assert not np.asarray(cache.overflowed).any()

  # The same layer over the whole sequence at once, in XLA: sampled steps agree.
  full = GQAAttention(num_heads=n, num_kv_heads=k, rope_theta=1e4, is_causal=True,
                      precision=HIGHEST, implementation="xla").apply(params, x)
  for i in sorted({0, 1, steps // 3, steps // 2, steps - 2, steps - 1}):
    np.testing.assert_allclose(ys[i][:, 0], np.asarray(full[:, i]), rtol=2e-4,
                               atol=2e-5, err_msg=f"step {i}")

  # One token past S_max: dropped, the rows flagged, the cache's data and lengths unchanged.
  k_before, v_before = np.asarray(cache.k), np.asarray(cache.v)
  _, cache = step(params, x[:, :1], cache)
  assert len(traces) == 1
  np.testing.assert_array_equal(np.asarray(cache.lengths), [steps] * b)
  assert np.asarray(cache.overflowed).all()
  np.testing.assert_array_equal(np.asarray(cache.k), k_before)
  np.testing.assert_array_equal(np.asarray(cache.v), v_before)


def test_decode_loop_to_the_end_of_the_cache_cpu():
  _decode_loop(48, "triton", interpret=True)


@pytest.mark.gpu
def test_decode_loop_4096_steps_gpu():
  assert HAS_GPU
  _decode_loop(4096, None)
