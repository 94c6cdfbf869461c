"""A quick GPU probe of the backward kernels: gradient parity of the Mosaic GPU backward (not in
the registry yet) and the Triton one on a few shapes, then CUPTI times of the backward kernels
alone next to cuDNN's forward+backward (a tuning aid; committed numbers come from
``benchmarks.run --only backward``).

    PYTHONPATH=$PWD python3 -m benchmarks.probe_backward [--shapes "2,8192,32,8,128"]
        [--iterations 10] [--stages 2,3] [--skip-parity]
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp

from benchmarks import common

common.quiet()

import gqa_pallas as gp  # pylint: disable=g-import-not-at-top
from gqa_pallas import devices, registry, validation  # pylint: disable=g-import-not-at-top
from gqa_pallas.mosaic import backward as mosaic_backward  # pylint: disable=g-import-not-at-top
from tests import numerics  # pylint: disable=g-import-not-at-top
from tests.test_backward import _case_id, _inputs  # pylint: disable=g-import-not-at-top

BF16, F16 = jnp.bfloat16, jnp.float16
# (B, T, S, N, K, H, dtype, kv_lengths, q_offset, causal)
PARITY_CASES = [
    (2, 1000, 1000, 32, 8, 128, BF16, [1000, 517], None, True),
    (2, 77, 3000, 14, 2, 64, F16, [0, 2999], None, True),
    (1, 3000, 200, 8, 1, 128, BF16, None, None, True),
    (3, 1024, 1024, 4, 4, 64, BF16, None, [0, 100, -10], True),
    (2, 700, 1100, 7, 1, 64, F16, [1100, 3], None, False),
    (1, 2048, 4096, 40, 8, 128, BF16, [4000], None, True),
]
TIMING_SHAPES = "2,8192,32,8,128;2,8192,14,2,64;8,2048,32,8,128"
INTERPRET = False  # a CPU dry run of the script sets it


def _mosaic_bwd(stages):
  config = mosaic_backward.MosaicBackwardConfig(stages=stages)

  def run(q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse, causal):
    return mosaic_backward.prefill_attention_bwd(
        q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse, causal=causal,
        scale=1 / math.sqrt(q.shape[-1]), interpret=INTERPRET, config=config)
  return run


def _triton_bwd(q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse, causal):
  backend = registry.get("triton")
  dims = validation.validate_attention(q, k, v, None, None)[0]
  problem = registry.Problem("prefill_bwd", dims, jnp.dtype(q.dtype).name,
                             device=devices.current())
  return backend.prefill_bwd(q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse,
                             causal=causal, scale=1 / math.sqrt(q.shape[-1]), interpret=INTERPRET,
                             config=backend.default_config(problem))


def parity(case, stages):
  (q, k, v), kw, w = _inputs(case)
  b, t, s = case[:3]
  kvl = jnp.full((b,), s, jnp.int32) if kw["kv_lengths"] is None else kw["kv_lengths"]
  qo = kvl - t if kw["q_offset"] is None else kw["q_offset"]
  out, lse = gp.gqa_attention(q, k, v, return_lse=True, causal=kw["causal"], q_offset=qo,
                              kv_lengths=kvl)
  d_out = w.astype(q.dtype)

  def loss(q, k, v, compute_dtype=jnp.float32):
    o = gp.attention_reference(q, k, v, causal=kw["causal"], q_offset=qo, kv_lengths=kvl,
                               compute_dtype=compute_dtype)
    return jnp.sum(o.astype(jnp.float32) * d_out.astype(jnp.float32))

  ref = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  ref_d = jax.jit(jax.grad(lambda *a: loss(*a, compute_dtype=q.dtype), argnums=(0, 1, 2)))(
      q, k, v)
  for name, fn in (("mosaic", _mosaic_bwd(stages)), ("triton", _triton_bwd)):
    try:
      got = jax.jit(fn, static_argnames="causal")(q, k, v, qo, kvl, out, lse, d_out, None,
                                                  causal=kw["causal"])
      for label, a, r, r_d in zip(("dq", "dk", "dv"), got, ref, ref_d):
        numerics.assert_parity(a, r, r_d, factor=3.0, name=label)
      result = "PASS"
    except Exception as e:  # pylint: disable=broad-except
      result = f"FAIL {type(e).__name__}: {str(e)[:300]}"
    print(f"parity {name} {_case_id(case)}: {result}", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--shapes", default=TIMING_SHAPES, help="B,S,N,K,H;... (causal, T == S)")
  parser.add_argument("--iterations", type=int, default=10)
  parser.add_argument("--stages", default="2", help="Mosaic ring depths to time")
  parser.add_argument("--skip-parity", action="store_true")
  args = parser.parse_args(argv)
  stages = [int(x) for x in args.stages.split(",")]
  start = time.time()
  for case in [] if args.skip_parity else PARITY_CASES:
    parity(case, stages[0])
  print(f"parity done {time.time() - start:.0f}s", flush=True)
  for shape in args.shapes.split(";"):
    b, s, n, kh, h = (int(x) for x in shape.split(","))
    ks = jax.random.split(jax.random.key(3), 4)
    q = common.rand(ks[0], (b, s, n, h))
    k, v = common.rand(ks[1], (b, s, kh, h)), common.rand(ks[2], (b, s, kh, h))
    d_out = common.rand(ks[3], (b, s, n, h))
    kvl, qo = jnp.full((b,), s, jnp.int32), jnp.zeros((b,), jnp.int32)
    out, lse = gp.gqa_attention(q, k, v, return_lse=True)
    bwd_flops = 2.5 * 2 * b * s * s * n * h
    cells = []
    runs = [(f"mosaic[{st}]", _mosaic_bwd(st)) for st in stages] + [("triton", _triton_bwd)]
    for label, fn in runs:
      try:
        ms = common.measure_ms(jax.jit(lambda q, k, v, d, fn=fn: fn(
            q, k, v, qo, kvl, out, lse, d, None, True)), q, k, v, d_out,
                               iterations=args.iterations)
        cells.append(f"{label} {bwd_flops / ms / 1e9:.0f}")
      except Exception as e:  # pylint: disable=broad-except
        cells.append(f"{label} FAIL {type(e).__name__}: {str(e)[:200]}")

    def cudnn(q, k, v, d):
      _, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn"), q, k, v)
      return vjp(d)
    ms = common.measure_ms(jax.jit(cudnn), q, k, v, d_out, iterations=args.iterations)
    cells.append(f"cudnn fwd+bwd {3.5 * 2 * b * s * s * n * h / ms / 1e9:.0f}")
    print(f"time B{b} S{s} {n}:{kh} H{h} bf16 (backward alone, 2.5x fwd FLOPs): "
          + "  ".join(cells) + " TFLOP/s", flush=True)
  print(f"all done {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
  main()
