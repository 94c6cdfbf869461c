"""Times decode-kernel configurations on one shape, with a per-kernel breakdown (tuning aid).

    PYTHONPATH=$PWD python3 -m benchmarks.probe_decode --shape 1,32768,32,8,128,1 \
        --configs "default;num_splits=33;programs_per_sm=1,num_stages=4" [--out FILE]

Each ``--configs`` entry (``;``-separated) overrides fields of the shape's default
``DecodeConfig`` (``field=value`` pairs, ``,``-separated). Prints CUPTI medians of the whole call
and of each kernel it launches, next to cuDNN's, and the fraction of the measured copy bandwidth.
Full caches, bf16. Results go to ``--out`` as JSON when given; the committed numbers come from
``benchmarks.run``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

from benchmarks import common

common.quiet()

import gqa_pallas as gp  # pylint: disable=g-import-not-at-top
from gqa_pallas import devices, registry  # pylint: disable=g-import-not-at-top
from gqa_pallas.triton.decode import DecodeConfig  # pylint: disable=g-import-not-at-top
from gqa_pallas.validation import AttentionDims  # pylint: disable=g-import-not-at-top


def _parse_config(text: str, base: DecodeConfig) -> DecodeConfig:
  if text.strip() in ("", "default"):
    return base
  fields = {f.name: f.type for f in dataclasses.fields(base)}
  overrides = {}
  for pair in text.split(","):
    name, value = pair.split("=")
    name = name.strip()
    if name not in fields:
      raise SystemExit(f"unknown DecodeConfig field {name!r}; fields: {sorted(fields)}")
    overrides[name] = None if value == "None" else (
        float(value) if "float" in str(fields[name]) else int(value))
  return dataclasses.replace(base, **overrides)


def breakdown(fn, *args, iterations: int = 30) -> dict[str, float]:
  """Median ms per kernel name (summed over launches of one name), and ``total``."""
  jax.block_until_ready(fn(*args))
  _, runs = profiler.measure(fn, aggregate=False, iterations=iterations)(*args)
  per_name = collections.defaultdict(list)
  totals = []
  for run in runs:
    summed = collections.Counter()
    for name, ms in run:
      summed[name[:60]] += ms
    for name, ms in summed.items():
      per_name[name].append(ms)
    totals.append(sum(summed.values()))
  out = {name: statistics.median(v) for name, v in per_name.items()}
  out["total"] = statistics.median(totals)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--shape", action="append", required=True, help="B,S,N,K,H,T")
  parser.add_argument("--configs", default="default")
  parser.add_argument("--iterations", type=int, default=30)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  copy_gbs = common.copy_bandwidth_gbs()
  print(f"{jax.devices()[0].device_kind} jax {jax.__version__}: copy {copy_gbs:.0f} GB/s",
        flush=True)
  results = {"copy_gbs": copy_gbs, "jax": jax.__version__, "rows": []}
  for shape in args.shape:
    b, s, n, kh, h, t = (int(x) for x in shape.split(","))
    keys = jax.random.split(jax.random.key(b * s + t), 3)
    q = common.rand(keys[0], (b, t, n, h))
    k, v = common.rand(keys[1], (b, s, kh, h)), common.rand(keys[2], (b, s, kh, h))
    lengths = jnp.full((b,), s, jnp.int32)
    read_bytes = 2 * b * s * kh * h * 2
    problem = registry.Problem("decode", AttentionDims(b, t, s, n, kh, h), "bfloat16",
                               device=devices.current())
    base = registry.get("triton").default_config(problem)
    print(f"== B{b} S{s} {n}:{kh} H{h} T{t}: {read_bytes / 1e6:.0f} MB", flush=True)
    if t == 1:
      cudnn = breakdown(jax.jit(lambda q, k, v, l: jax.nn.dot_product_attention(
          q, k, v, key_value_seq_lengths=l, implementation="cudnn")), q, k, v, lengths,
                        iterations=args.iterations)
      print(f"  cudnn {cudnn['total'] * 1e3:7.1f} us  "
            f"{read_bytes / (cudnn['total'] * 1e-3) / 1e9 / copy_gbs:.3f} of copy  {cudnn}",
            flush=True)
      results["rows"].append({"shape": shape, "config": "cudnn", **cudnn})
    for text in args.configs.split(";"):
      cfg = _parse_config(text, base)
      fn = jax.jit(lambda q, k, v, l, cfg=cfg: gp.gqa_decode(
          q, gp.KVCache(k, v, l), implementation="triton", config=cfg))
      try:
        times = breakdown(fn, q, k, v, lengths, iterations=args.iterations)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {text:50s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        continue
      frac = read_bytes / (times["total"] * 1e-3) / 1e9 / copy_gbs
      parts = "  ".join(f"{kk[:24]}={vv * 1e3:.1f}" for kk, vv in times.items() if kk != "total")
      print(f"  {text:50s} {times['total'] * 1e3:7.1f} us  {frac:.3f} of copy  [{parts}]",
            flush=True)
      results["rows"].append({"shape": shape, "config": text, **times})
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
