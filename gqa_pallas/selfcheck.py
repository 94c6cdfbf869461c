"""A quick check that the Pallas kernels agree with the reference on this machine.

``python -m gqa_pallas`` runs it: the prefill and decode kernels (compiled on a GPU, in interpret
mode elsewhere) on a small ragged GQA case in float32, against ``attention_reference``. The model
demo and generation CLI are ``gqa-pallas demo`` / ``gqa-pallas generate`` (``flax_layers.cli``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gqa_pallas import devices, registry
from gqa_pallas.api import gqa_attention, gqa_decode
from gqa_pallas.cache import KVCache
from gqa_pallas.reference import attention_reference


def attention_check(interpret: bool, seed: int = 0) -> bool:
  """Kernels vs the jnp reference on a small ragged GQA case (float32); prints the differences.

  The backends are the device's first preference (``implementation=None`` with ``interpret``).
  """
  implementation = registry.preference(devices.current(), interpret)[0]
  mode = "interpret mode" if interpret else "compiled"
  b, t, n, kh, h = 2, 80, 8, 2, 32
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32)
  k = jax.random.normal(keys[1], (b, t, kh, h), jnp.float32)
  v = jax.random.normal(keys[2], (b, t, kh, h), jnp.float32)
  lengths = jnp.array([t, 53], jnp.int32)
  kernels = dict(implementation=implementation, interpret=interpret)
  prefill = jax.jit(lambda q, k, v, n: gqa_attention(q, k, v, kv_lengths=n, **kernels))
  decode = jax.jit(lambda q, c: gqa_decode(q, c, **kernels))
  reference = jax.jit(lambda q, k, v, n: attention_reference(q, k, v, kv_lengths=n))

  def compare(out, ref):
    """(max |out - ref|, max |ref|, within 1e-5 x max |ref| + 1e-6)."""
    err = float(jnp.max(jnp.abs(out - ref)))
    scale = float(jnp.max(jnp.abs(ref)))
    return err, scale, err <= 1e-5 * scale + 1e-6

  ref = reference(q, k, v, lengths)
  # Query rows past a row's length see no key of their own: compare the valid rows.
  valid = (jnp.arange(t)[None, :] < lengths[:, None])[:, :, None, None]
  err, scale, prefill_ok = compare(jnp.where(valid, prefill(q, k, v, lengths), ref), ref)
  print(f"prefill kernel ({implementation!r}, {mode}), q {list(q.shape)}, k/v {list(k.shape)}, "
        f"kv_lengths {lengths.tolist()}: max |kernel - reference| = {err:.2e} "
        f"({'OK' if prefill_ok else 'FAIL'}, bound 1e-5 x {scale:.2f})")

  cache = jax.jit(lambda k, v, n: KVCache.init(b, 128, kh, h, jnp.float32).append(
      k, v, n, **kernels))(k, v, lengths)
  qd = jax.random.normal(keys[3], (b, n, h), jnp.float32)
  ref = reference(qd[:, None], cache.k, cache.v, cache.lengths)[:, 0]
  err, scale, decode_ok = compare(decode(qd, cache), ref)
  print(f"decode kernel ({implementation!r}, {mode}), q {list(qd.shape)}, cache "
        f"{list(cache.k.shape)}, lengths {cache.lengths.tolist()}: max |kernel - reference| = "
        f"{err:.2e} ({'OK' if decode_ok else 'FAIL'})")
  return prefill_ok and decode_ok
