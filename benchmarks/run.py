"""One GPU run: ceilings, the anchor prefill grid and the anchor decode grid, side by side.

    PYTHONPATH=$PWD python3 -m benchmarks.run [--only prefill|decode|step] [--sweep] [--out FILE]

Writes ``benchmarks/results/<device>.json`` (``--only step``: ``<device>-decode-step.json``; or
``--out``) and prints a table. Kernel times are
CUPTI medians (``benchmarks.common.measure_ms``); every row of one file comes from one process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

common.quiet()

import gqa_pallas as gp  # pylint: disable=g-import-not-at-top
from gqa_pallas import decode_triton, prefill_triton  # pylint: disable=g-import-not-at-top

# (B, S, N, K, H), causal bf16, T == S.
PREFILL_GRID = [(8, 2048, 32, 8, 128), (4, 4096, 32, 8, 128), (2, 8192, 32, 8, 128),
                (1, 16384, 32, 8, 128), (8, 2048, 14, 2, 64), (2, 8192, 14, 2, 64)]
# (B, S, N, K, H), one query token per row, full caches, bf16.
DECODE_GRID = [(16, 2048, 8, 8, 64), (16, 2048, 32, 8, 128), (16, 8192, 32, 8, 128),
               (64, 4096, 32, 8, 128), (1, 32768, 32, 8, 128), (16, 4096, 14, 2, 64),
               (8, 16384, 28, 4, 128)]

# (B, S_max, N, K, H) for the jit decode step (append + decode, cache donated).
STEP_GRID = [(16, 8192, 32, 8, 128), (1, 32768, 32, 8, 128), (16, 4096, 14, 2, 64)]

PREFILL_SWEEP = {
    64: [prefill_triton.PrefillConfig(*c) for c in
         [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2),
          (128, 64, 8, 2)]],
    128: [prefill_triton.PrefillConfig(*c) for c in
          [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2),
           (64, 64, 4, 2)]],
}
# Only the split path is swept (the single-split path is fixed by the tuning table).
DECODE_SWEEP = [decode_triton.DecodeConfig(bk, w, st, programs_per_sm=p, min_split_keys=mk,
                                           single_split_max_length=0)
                for (bk, w, st, p, mk) in [
                    (64, 4, 3, 2, 256), (64, 4, 3, 4, 256), (64, 4, 4, 4, 256),
                    (64, 4, 5, 4, 256), (64, 8, 3, 4, 256), (64, 2, 3, 4, 256),
                    (32, 4, 4, 4, 128), (32, 4, 6, 8, 128), (32, 2, 4, 8, 128),
                    (64, 4, 3, 8, 128), (128, 4, 2, 4, 256), (128, 8, 3, 2, 256),
                    (64, 4, 4, 8, 128), (32, 4, 4, 16, 64)]]


def _try(fn):
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print("   failed:", msg, file=sys.stderr)
    return msg


def _rel_err(out, ref):
  out = np.asarray(out, np.float32)
  ref = np.asarray(ref, np.float32)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def bench_prefill(sweep: bool, iterations: int):
  from jax.experimental.pallas.ops.gpu import attention as pl_attention  # pylint: disable=g-import-not-at-top
  rows = []
  for (b, s, n, kh, h) in PREFILL_GRID:
    ks = jax.random.split(jax.random.key(b * s + n), 3)
    q = common.rand(ks[0], (b, s, n, h))
    k, v = common.rand(ks[1], (b, s, kh, h)), common.rand(ks[2], (b, s, kh, h))
    flops = 2 * b * s * s * n * h  # causal: half of 4*B*T*S*N*H
    scale = 1 / math.sqrt(h)
    row = {"kind": "prefill", "B": b, "S": s, "N": n, "K": kh, "H": h, "dtype": "bfloat16",
           "causal": True, "flops": flops, "ms": {}, "tflops": {}}

    def record(name, fn, *args):
      ms = _try(lambda: common.measure_ms(jax.jit(fn), *args, iterations=iterations))
      if isinstance(ms, float):
        row["ms"][name] = ms
        row["tflops"][name] = flops / (ms * 1e-3) / 1e12
      else:
        row.setdefault("errors", {})[name] = ms

    configs = PREFILL_SWEEP[h] if sweep else [prefill_triton.default_config(h, jnp.bfloat16)]
    for cfg in configs:
      name = "ours" if not sweep else f"ours[{cfg.block_m},{cfg.block_k},{cfg.num_warps},{cfg.num_stages}]"
      record(name, lambda q, k, v, cfg=cfg: prefill_triton.prefill_attention(
          q, k, v, jnp.zeros((b,), jnp.int32), jnp.full((b,), s, jnp.int32), causal=True,
          scale=scale, config=cfg), q, k, v)
    if sweep:
      ours = {kk: vv for kk, vv in row["tflops"].items() if kk.startswith("ours[")}
      if ours:
        best = max(ours, key=ours.get)
        row["best_ours"] = best
        row["tflops"]["ours"] = ours[best]
        row["ms"]["ours"] = row["ms"][best]
    record("cudnn", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"), q, k, v)
    record("xla", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla"), q, k, v)
    # JAX's Pallas-Triton mha has no GQA: K/V repeated beforehand, the repeat is not timed.
    g = n // kh
    kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    best = None
    for bq, bk, nw in ((128, 64, None), (128, 128, None), (64, 64, None), (128, 64, 4)):
      name = f"pl-triton[{bq},{bk},{nw}]"
      record(name, lambda q, k, v, bq=bq, bk=bk, nw=nw: pl_attention.mha(
          q, k, v, None, sm_scale=scale, causal=True,
          block_sizes=pl_attention.BlockSizes(block_q=bq, block_k=bk), num_warps=nw), q, kr, vr)
      if name in row["tflops"] and (best is None or row["tflops"][name] > row["tflops"][best]):
        best = name
    if best:
      row["tflops"]["pl-triton"] = row["tflops"][best]
      row["ms"]["pl-triton"] = row["ms"][best]
      row["best_pl_triton"] = best
    del kr, vr
    # Correctness of our kernel on this very input, against cuDNN and a float32 XLA reference on
    # the first 2 heads' worth of batch row 0 (the full reference would not fit for S = 16k).
    out = prefill_triton.prefill_attention(q, k, v, jnp.zeros((b,), jnp.int32),
                                           jnp.full((b,), s, jnp.int32), causal=True, scale=scale)
    sl = min(s, 4096)
    ref = gp.attention_reference(q[:1, -sl:, :g], k[:1, :, :1], v[:1, :, :1],
                                 q_offset=jnp.array([s - sl]))
    row["rel_err_vs_f32_ref"] = _rel_err(out[:1, -sl:, :g], ref)
    cud = _try(lambda: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                    implementation="cudnn"))
    if not isinstance(cud, str):
      row["rel_err_vs_cudnn"] = _rel_err(out, cud)
    rows.append(row)
    t = row["tflops"]
    print(f"prefill B{b} S{s} {n}:{kh} H{h}: ours {t.get('ours', 0):.0f}  cudnn "
          f"{t.get('cudnn', 0):.0f}  xla {t.get('xla', 0):.0f}  pl-triton "
          f"{t.get('pl-triton', 0):.0f} TFLOP/s  err {row['rel_err_vs_f32_ref']:.2e}", flush=True)
  return rows


def bench_decode(sweep: bool, iterations: int, copy_gbs: float, grid=None):
  from jax.experimental.pallas.ops.gpu import decode_attention as pl_decode  # pylint: disable=g-import-not-at-top
  rows = []

  def run_case(b, s, n, kh, h, lengths, t=1, label="full", baselines=True):
    ks = jax.random.split(jax.random.key(b * s + n + t), 3)
    q = common.rand(ks[0], (b, t, n, h))
    k, v = common.rand(ks[1], (b, s, kh, h)), common.rand(ks[2], (b, s, kh, h))
    lengths = jnp.asarray(lengths, jnp.int32)
    cache = gp.KVCache(k=k, v=v, lengths=lengths, overflowed=jnp.zeros((b,), jnp.bool_))
    read_bytes = int(2 * np.sum(np.asarray(lengths)) * kh * h * 2)
    row = {"kind": "decode", "label": label, "B": b, "S_max": s, "N": n, "K": kh, "H": h, "T": t,
           "dtype": "bfloat16", "mean_length": float(np.mean(np.asarray(lengths))),
           "kv_bytes_read": read_bytes, "ms": {}, "gbs": {}}

    def record(name, fn, *args):
      ms = _try(lambda: common.measure_ms(jax.jit(fn), *args, iterations=iterations))
      if isinstance(ms, float):
        row["ms"][name] = ms
        row["gbs"][name] = read_bytes / (ms * 1e-3) / 1e9
      else:
        row.setdefault("errors", {})[name] = ms

    scale = 1 / math.sqrt(h)
    configs = DECODE_SWEEP if sweep else [decode_triton.default_config(h, jnp.bfloat16)]
    for cfg in configs:
      name = "ours" if not sweep else (f"ours[{cfg.block_k},{cfg.num_warps},{cfg.num_stages},"
                                       f"{cfg.programs_per_sm},{cfg.min_split_keys}]")
      record(name, lambda q, c, cfg=cfg: decode_triton.decode_attention(
          q, c.k, c.v, None, c.lengths, scale=scale, config=cfg), q, cache)
    if sweep:
      ours = {kk: vv for kk, vv in row["gbs"].items() if kk.startswith("ours[")}
      if ours:
        best = max(ours, key=ours.get)
        row["best_ours"] = best
        row["gbs"]["ours"], row["ms"]["ours"] = ours[best], row["ms"][best]
    if baselines and t == 1:
      record("cudnn", lambda q, c: jax.nn.dot_product_attention(
          q, c.k, c.v, key_value_seq_lengths=c.lengths, implementation="cudnn"), q, cache)
      record("xla", lambda q, c: jax.nn.dot_product_attention(
          q, c.k, c.v, key_value_seq_lengths=c.lengths, implementation="xla"), q, cache)
      record("jnp-ref", lambda q, c: gp.gqa_decode(q, c, implementation="xla"), q, cache)
      record("pl-gqa", lambda q, c: pl_decode.gqa(
          q[:, 0], c.k, c.v, kv_seq_len=c.lengths, sm_scale=scale), q, cache)
    out = gp.gqa_decode(q, cache)
    ref = gp.gqa_decode(q, cache, implementation="xla")
    row["rel_err_vs_f32_ref"] = _rel_err(out, ref)
    row["copy_gbs"] = copy_gbs
    row["frac_of_copy"] = row["gbs"].get("ours", 0) / copy_gbs
    rows.append(row)
    gb = row["gbs"]
    print(f"decode {label} B{b} S{s} {n}:{kh} H{h} T{t} ({read_bytes / 1e6:.0f} MB): ours "
          f"{gb.get('ours', 0):.0f} ({row['frac_of_copy']:.2f} of copy) cudnn "
          f"{gb.get('cudnn', 0):.0f} xla {gb.get('xla', 0):.0f} pl-gqa {gb.get('pl-gqa', 0):.0f}"
          f" GB/s  ms ours {row['ms'].get('ours', 0):.4f} cudnn {row['ms'].get('cudnn', 0):.4f}"
          f"  err {row['rel_err_vs_f32_ref']:.2e}", flush=True)
    return row

  for (b, s, n, kh, h) in (grid or DECODE_GRID):
    run_case(b, s, n, kh, h, np.full((b,), s))
  if grid:
    return rows
  # Ragged lengths against the full cache, and T = 4.
  b, s, n, kh, h = 16, 8192, 32, 8, 128
  rng = np.random.default_rng(0)
  full = run_case(b, s, n, kh, h, np.full((b,), s), label="ragged-base")
  for hi, label in ((s, "ragged-50"), (s // 2, "ragged-25")):
    row = run_case(b, s, n, kh, h, rng.integers(0, hi + 1, size=(b,)), label=label)
    row["time_vs_full"] = {kk: row["ms"][kk] / full["ms"][kk] for kk in row["ms"]
                           if kk in full["ms"]}
  for (b, s, n, kh, h) in ([] if sweep else DECODE_GRID):
    base = next(r for r in rows if r["label"] == "full" and (r["B"], r["S_max"], r["N"], r["K"],
                                                             r["H"]) == (b, s, n, kh, h))
    row = run_case(b, s, n, kh, h, np.full((b,), s), t=4, label="T4", baselines=False)
    row["time_vs_T1"] = row["ms"].get("ours", float("nan")) / base["ms"].get("ours", float("nan"))
  return rows


def bench_decode_step(iterations: int, loop_steps: int = 9):
  """The per-step cost of a jit decode loop (``KVCache.append`` of one token, then
  ``gqa_decode``), against the decode call alone on the same cache.

  CUPTI times a compiled loop of 1 and of ``loop_steps`` steps (the cache as the loop carry);
  the per-step cost is the difference over ``loop_steps - 1``, so the one copy of the
  non-donated input cache into the loop cancels out. Separately, one call of a single step
  with the cache donated checks that the donated buffers are consumed (updated in place).
  """
  rows = []
  for (b, s, n, kh, h) in STEP_GRID:
    ks = jax.random.split(jax.random.key(b + s + n), 5)
    q = common.rand(ks[0], (b, n, h))
    k_new, v_new = common.rand(ks[1], (b, 1, kh, h)), common.rand(ks[2], (b, 1, kh, h))
    cache = gp.KVCache(k=common.rand(ks[3], (b, s, kh, h)), v=common.rand(ks[4], (b, s, kh, h)),
                       lengths=jnp.full((b,), s - loop_steps, jnp.int32),
                       overflowed=jnp.zeros((b,), jnp.bool_))

    def step(cache, q, k_new, v_new):
      cache = cache.append(k_new, v_new)
      return cache, gp.gqa_decode(q, cache)

    def loop(num_steps):
      def run(cache, q, k_new, v_new):
        # The output rides in the carry (no extra kernel to keep it alive).
        body = lambda _, carry: step(carry[0], q, k_new, v_new)
        return jax.lax.fori_loop(0, num_steps, body, (cache, jnp.zeros_like(q)))
      return jax.jit(run)

    one = common.measure_ms(loop(1), cache, q, k_new, v_new, iterations=iterations)
    many = common.measure_ms(loop(loop_steps), cache, q, k_new, v_new, iterations=iterations)
    step_ms = (many - one) / (loop_steps - 1)
    kernel_ms = common.measure_ms(jax.jit(lambda c, q: gp.gqa_decode(q, c)), cache, q,
                                  iterations=iterations)
    donated = jax.jit(step, donate_argnums=0)
    fresh = jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, cache))
    old_k, old_v = fresh.k, fresh.v
    jax.block_until_ready(donated(fresh, q, k_new, v_new))
    in_place = old_k.is_deleted() and old_v.is_deleted()
    row = {"kind": "decode_step", "B": b, "S_max": s, "N": n, "K": kh, "H": h, "T": 1,
           "dtype": "bfloat16", "loop_steps": loop_steps, "loop_1_ms": one,
           "loop_n_ms": many, "step_ms": step_ms, "kernel_ms": kernel_ms,
           "step_over_kernel": step_ms / kernel_ms, "cache_donated_in_place": bool(in_place)}
    rows.append(row)
    print(f"decode step B{b} S{s} {n}:{kh} H{h}: step {step_ms * 1e3:.1f} us, decode alone "
          f"{kernel_ms * 1e3:.1f} us ({row['step_over_kernel']:.3f}x); loop of 1 "
          f"{one * 1e3:.1f} us, of {loop_steps} {many * 1e3:.1f} us; donated buffers consumed "
          f"{in_place}", flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--only", choices=["prefill", "decode", "step"], default=None)
  parser.add_argument("--sweep", action="store_true", help="time several kernel configs")
  parser.add_argument("--iterations", type=int, default=30)
  parser.add_argument("--out", default=None)
  parser.add_argument("--decode-shapes", default=None,
                      help="only these decode grid shapes, e.g. '16,4096,14,2,64;16,2048,8,8,64'")
  args = parser.parse_args(argv)
  info = common.device_info()
  if info["platform"] != "gpu":
    sys.exit("benchmarks need a CUDA GPU")
  result = dict(info, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                sweep=args.sweep, rows=[])
  result["copy_gbs"] = common.copy_bandwidth_gbs()
  result["matmul_tflops"] = common.matmul_tflops()
  print(f"{info['device']} jax {info['jax']}: copy {result['copy_gbs']:.0f} GB/s, bf16 matmul "
        f"{result['matmul_tflops']:.0f} TFLOP/s", flush=True)
  if args.only in (None, "prefill"):
    result["rows"] += bench_prefill(args.sweep, args.iterations)
  if args.only in (None, "decode"):
    grid = None
    if args.decode_shapes:
      grid = [tuple(int(x) for x in shape.split(",")) for shape in args.decode_shapes.split(";")]
    result["rows"] += bench_decode(args.sweep, args.iterations, result["copy_gbs"], grid)
  if args.only == "step":
    result["rows"] += bench_decode_step(args.iterations)
  name = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
  if args.only == "step":
    name += "-decode-step"
  out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{name}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
