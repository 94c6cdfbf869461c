"""Timing and ceilings shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time
import warnings

import jax
import jax.numpy as jnp


def on_gpu() -> bool:
  return jax.devices()[0].platform == "gpu"


def measure_ms(fn, *args, iterations: int = 30, warmup: int = 2) -> float:
  """Median kernel time in ms by CUPTI (all kernels one call launches, summed); on a machine
  without a GPU, the median wall time of whole calls (CPU numbers, not GPU ones)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  if not on_gpu():
    times = []
    for _ in range(iterations):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
  _, times = profiler.measure(fn, iterations=iterations)(*args)
  if times is None:
    raise RuntimeError("no kernel was launched")
  if not isinstance(times, (list, tuple)):
    times = [times]
  return float(statistics.median(times))


def rand(key, shape, dtype=jnp.bfloat16):
  """Standard-normal inputs drawn in float32, then cast (the same values for every dtype)."""
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def copy_bandwidth_gbs(num_bytes: int = 2 << 30) -> float:
  """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
  x = jax.random.normal(jax.random.key(0), (num_bytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: a + jnp.bfloat16(1))
  ms = measure_ms(f, x, iterations=20)
  return 2 * x.nbytes / (ms * 1e-3) / 1e9


def read_bandwidth_gbs(num_bytes: int = 4 << 30) -> float:
  """Read-only bandwidth in GB/s: a float32-accumulated sum over ``num_bytes`` of bf16 (decode
  only reads, so this is its ceiling)."""
  x = jax.random.normal(jax.random.key(3), (num_bytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  ms = measure_ms(f, x, iterations=20)
  return x.nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  ms = measure_ms(f, a, b, iterations=20)
  return 2 * n ** 3 / (ms * 1e-3) / 1e12


def device_info() -> dict:
  dev = jax.devices()[0]
  return {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
          "num_sms": getattr(dev, "core_count", None)}


def quiet():
  warnings.filterwarnings("ignore", category=DeprecationWarning)
