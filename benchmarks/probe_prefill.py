"""A quick GPU probe of one prefill backend: parity on a few shapes, then CUPTI times next to the
Triton kernel and cuDNN (a tuning aid; committed numbers come from ``benchmarks.run``).

    PYTHONPATH=$PWD python3 -m benchmarks.probe_prefill [--implementation mosaic]
        [--shapes "2,8192,32,8,128;2,8192,14,2,64"] [--iterations 10]
        [--configs "128x2,64x3"]   # mosaic block_kv x stages to time side by side
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks import common

common.quiet()

import gqa_pallas as gp  # pylint: disable=g-import-not-at-top
from gqa_pallas.mosaic.prefill import MosaicPrefillConfig  # pylint: disable=g-import-not-at-top
from tests import numerics  # pylint: disable=g-import-not-at-top

BF16, F16 = jnp.bfloat16, jnp.float16
# (B, T, S, N, K, H, dtype, kv_lengths, q_offset, causal): ragged with NaN past the lengths,
# an empty row, T > S, offsets (one negative), non-causal, G = 1, 4, 7, 8.
PARITY_CASES = [
    (2, 1000, 1000, 32, 8, 128, BF16, [1000, 517], None, True),
    (2, 77, 3000, 14, 2, 64, F16, [0, 2999], None, True),
    (1, 3000, 200, 8, 1, 128, BF16, None, None, True),
    (3, 1024, 1024, 4, 4, 64, BF16, None, [0, 100, -10], True),
    (2, 700, 1100, 7, 1, 64, F16, [1100, 3], None, False),
]
TIMING_SHAPES = "2,8192,32,8,128;2,8192,14,2,64;8,2048,32,8,128"


def parity(implementation, b, t, s, n, kh, h, dtype, kvl, qo, causal):
  kv = None if kvl is None else jnp.array(kvl, jnp.int32)
  q, k, v = numerics.random_qkv(b + t + s, b, t, s, n, kh, h, dtype, kv)
  qo = None if qo is None else jnp.array(qo, jnp.int32)
  try:
    out, lse = gp.gqa_attention(q, k, v, causal=causal, q_offset=qo, kv_lengths=kv,
                                implementation=implementation, return_lse=True)
    numerics.check_against_reference(out, lse, q, k, v, factor=2.0, causal=causal,
                                     q_offset=qo, kv_lengths=kv)
    result = "PASS"
  except Exception as e:  # pylint: disable=broad-except
    result = f"FAIL {type(e).__name__}: {str(e)[:300]}"
  print(f"parity B{b} T{t} S{s} {n}:{kh} H{h} {jnp.dtype(dtype).name} kvl={kvl} qo={qo} "
        f"causal={causal}: {result}", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--implementation", default="mosaic")
  parser.add_argument("--shapes", default=TIMING_SHAPES, help="B,S,N,K,H;... (causal, T == S)")
  parser.add_argument("--iterations", type=int, default=10)
  parser.add_argument("--configs", default="",
                      help="mosaic configs to time, block_kv x stages (default: the table's)")
  parser.add_argument("--skip-parity", action="store_true")
  args = parser.parse_args(argv)
  configs = [None] + [MosaicPrefillConfig(*(int(x) for x in c.split("x")))
                      for c in args.configs.split(",") if c]
  start = time.time()
  for case in [] if args.skip_parity else PARITY_CASES:
    parity(args.implementation, *case)
  print(f"parity done {time.time() - start:.0f}s", flush=True)
  for shape in args.shapes.split(";"):
    b, s, n, kh, h = (int(x) for x in shape.split(","))
    for dtype in (BF16, F16):
      ks = jax.random.split(jax.random.key(1), 3)
      q = common.rand(ks[0], (b, s, n, h), dtype)
      k, v = common.rand(ks[1], (b, s, kh, h), dtype), common.rand(ks[2], (b, s, kh, h), dtype)
      flops = 2 * b * s * s * n * h
      cells = []
      runs = [(args.implementation, c) for c in configs if args.implementation == "mosaic" or
              c is None] + [("triton", None), ("cudnn", None)]
      for name, config in dict.fromkeys(runs):
        fn = (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                           implementation="cudnn")
              ) if name == "cudnn" else (lambda q, k, v, name=name, config=config:
                                         gp.gqa_attention(q, k, v, implementation=name,
                                                          config=config))
        label = name if config is None else f"{name}[{config.block_kv}x{config.stages}]"
        try:
          ms = common.measure_ms(jax.jit(fn), q, k, v, iterations=args.iterations)
          cells.append(f"{label} {flops / ms / 1e9:.0f}")
        except Exception as e:  # pylint: disable=broad-except
          cells.append(f"{label} FAIL {type(e).__name__}: {str(e)[:200]}")
      print(f"time B{b} S{s} {n}:{kh} H{h} {jnp.dtype(dtype).name}: " + "  ".join(cells) +
            " TFLOP/s", flush=True)
  print(f"all done {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
  main()
