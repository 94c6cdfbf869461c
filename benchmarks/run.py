"""One GPU run: ceilings, the anchor prefill grid and the anchor decode grid, side by side.

    PYTHONPATH=$PWD python3 -m benchmarks.run [--only prefill,chunked,decode,step,backward,window]
        [--sweep]
        [--dtypes bfloat16,float16] [--out FILE]

Writes ``benchmarks/results/<device>.json`` (``--only step``: ``<device>-decode-step.json``;
``--only prefill,chunked``: ``<device>-prefill.json``; ``--only backward``:
``<device>-backward.json``; ``--only window``: ``<device>-window.json``; or ``--out``) and prints a table. Every
Pallas backend of the registry that runs a shape is timed
under its own name; ``ours`` is the one ``implementation=None`` picks on this device. Kernel
times are CUPTI medians (``benchmarks.common.measure_ms``); every row of one file comes from one
process. ``--sweep`` times the Triton configs of ``PREFILL_SWEEP`` / ``DECODE_SWEEP`` (the tuning
tables come from these runs).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, shapes

common.quiet()

import gqa_pallas as gp  # pylint: disable=g-import-not-at-top
from gqa_pallas import devices, registry  # pylint: disable=g-import-not-at-top
from gqa_pallas.triton.backward import BackwardConfig  # pylint: disable=g-import-not-at-top
from gqa_pallas.triton.decode import DecodeConfig  # pylint: disable=g-import-not-at-top
from gqa_pallas.triton.prefill import PrefillConfig  # pylint: disable=g-import-not-at-top
from gqa_pallas.validation import AttentionDims  # pylint: disable=g-import-not-at-top

PREFILL_SWEEP = {
    64: [PrefillConfig(*c) for c in
         [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2),
          (128, 64, 8, 2)]],
    128: [PrefillConfig(*c) for c in
          [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2),
           (64, 64, 4, 2)]],
}
# Only the split path is swept (the single-split path is fixed by the tuning table).
DECODE_SWEEP = [DecodeConfig(bk, w, st, programs_per_sm=p, min_split_keys=mk,
                             single_split_max_length=0)
                for (bk, w, st, p, mk) in [
                    (64, 4, 3, 2, 256), (64, 4, 3, 4, 256), (64, 4, 4, 4, 256),
                    (64, 4, 5, 4, 256), (64, 4, 3, 8, 256), (64, 2, 3, 4, 256),
                    (32, 4, 4, 4, 128), (32, 4, 6, 8, 128), (32, 2, 4, 8, 128),
                    (64, 4, 3, 8, 128), (128, 4, 2, 4, 256), (128, 8, 3, 2, 256),
                    (64, 4, 4, 8, 128), (32, 4, 4, 16, 64)]]

# JAX's Pallas Mosaic GPU attention (fp16 only: its shared buffers are fp16), best of these
# (block_q, block_kv, max_concurrent_steps).
PL_MGPU_CONFIGS = [(64, 128, 2), (64, 64, 2), (64, 128, 3)]


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


def _backends(op, dims, dtype, interpret=False, **features):
  """(the default backend's name, the Pallas backends that run this shape on this device);
  ``features``: ``sliding_window`` / ``logits_soft_cap`` of the ``registry.Problem``. With
  ``interpret`` (a run without a GPU): the backends whose interpreter runs in seconds."""
  problem = registry.Problem(op, dims, jnp.dtype(dtype).name, device=devices.current(),
                             interpret=interpret, **features)
  default = registry.resolve(None, problem).name
  names = [n for n in gp.IMPLEMENTATIONS
           if registry.get(n).is_pallas and op in registry.get(n).ops
           and registry.get(n).unsupported(problem) is None
           and not (interpret and registry.get(n).slow_interpreter)]
  return default, names


class _Results(list):
  """The rows of one run; every ``append`` rewrites the JSON, so a run cut short keeps what it
  measured."""

  def __init__(self, path, header):
    super().__init__()
    self.path, self.header = path, header

  def append(self, row):
    super().append(row)
    self.save()

  def save(self):
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    tmp = self.path + ".tmp"  # a run killed mid-write keeps the previous file whole
    with open(tmp, "w") as f:
      json.dump(dict(self.header, rows=list(self)), f, indent=1)
    os.replace(tmp, self.path)


class _Row(dict):
  """One result row: ``ms`` per implementation and the derived rate under ``rate_key``."""

  def __init__(self, rate_key, work, **fields):
    super().__init__(ms={}, **{rate_key: {}}, **fields)
    self.rate_key, self.work = rate_key, work

  def record(self, name, fn, *args, iterations):
    ms = _try(lambda: common.measure_ms(jax.jit(fn), *args, iterations=iterations))
    if isinstance(ms, float):
      self["ms"][name] = ms
      self[self.rate_key][name] = self.work / (ms * 1e-3) / (1e12 if self.rate_key == "tflops"
                                                             else 1e9)
    else:
      self.setdefault("errors", {})[name] = ms

  def best_of(self, prefix, label):
    """Copies the best ``prefix[...]`` entry to ``label`` (and names it)."""
    cands = {k: v for k, v in self[self.rate_key].items() if k.startswith(prefix + "[")}
    if cands:
      best = max(cands, key=cands.get)
      self[self.rate_key][label], self["ms"][label] = cands[best], self["ms"][best]
      self[f"best_{label}"] = best

  def alias(self, name, label):
    if name in self["ms"]:
      self["ms"][label], self[self.rate_key][label] = self["ms"][name], self[self.rate_key][name]


def bench_prefill(sweep: bool, iterations: int, dtypes, rows, grid=None, gpu=True,
                  baseline_configs=None):
  """Appends one row per (dtype, shape) to ``rows`` (a ``_Results``, saved as it grows).

  ``gpu=False`` (a machine without one): our kernels in interpret mode and XLA, no cuDNN and no
  JAX Pallas baselines. ``baseline_configs``: how many block configs of JAX's own Pallas
  kernels to try (all by default)."""
  for dtype in dtypes:
    for (b, s, n, kh, h) in (grid or shapes.PREFILL_GRID):
      ks = jax.random.split(jax.random.key(b * s + n), 3)
      q = common.rand(ks[0], (b, s, n, h), dtype)
      k, v = common.rand(ks[1], (b, s, kh, h), dtype), common.rand(ks[2], (b, s, kh, h), dtype)
      flops = 2 * b * s * s * n * h  # causal: half of 4*B*T*S*N*H
      scale = 1 / math.sqrt(h)
      default, backends = _backends("prefill", AttentionDims(b, s, s, n, kh, h), dtype,
                                    interpret=not gpu)
      row = _Row("tflops", flops, kind="prefill", B=b, S=s, N=n, K=kh, H=h,
                 dtype=jnp.dtype(dtype).name, causal=True, flops=flops, ours_backend=default)
      record = functools.partial(row.record, iterations=iterations)

      for name in backends:
        configs = PREFILL_SWEEP[h] if sweep and name == "triton" else [None]
        for cfg in configs:
          label = name if cfg is None else (
              f"{name}[{cfg.block_m},{cfg.block_k},{cfg.num_warps},{cfg.num_stages}]")
          record(label, lambda q, k, v, name=name, cfg=cfg: gp.gqa_attention(
              q, k, v, implementation=name, config=cfg, interpret=not gpu), q, k, v)
        if sweep and name == "triton":
          row.best_of("triton", "triton")
      if not gpu:
        record("xla", lambda q, k, v: gp.gqa_attention(q, k, v, implementation="xla"), q, k, v)
      row.alias(default, "ours")
      if gpu:
        record("cudnn", lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"), q, k, v)
      if gpu and not sweep:  # a sweep compares our configs (and cuDNN) only
        _prefill_baselines(record, row, q, k, v, scale, baseline_configs)
      # Correctness of the default backend on this very input, against cuDNN and a float32
      # reference on the first kv group of batch row 0 (the full reference would not fit).
      out = gp.gqa_attention(q, k, v)
      g, sl = n // kh, min(s, 4096)
      ref = gp.attention_reference(q[:1, -sl:, :g], k[:1, :, :1], v[:1, :, :1],
                                   q_offset=jnp.array([s - sl]))
      row["rel_err_vs_f32_ref"] = _rel_err(out[:1, -sl:, :g], ref)
      cud = _try(lambda: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                      implementation="cudnn")) if gpu else ""
      if not isinstance(cud, str):
        row["rel_err_vs_cudnn"] = _rel_err(out, cud)
      rows.append(row)
      t = row["tflops"]
      print(f"prefill {row['dtype']} B{b} S{s} {n}:{kh} H{h}: ours ({default}) "
            f"{t.get('ours', 0):.0f}  cudnn {t.get('cudnn', 0):.0f}  xla {t.get('xla', 0):.0f}  "
            f"pl-triton {t.get('pl-triton', 0):.0f}  pl-mgpu {t.get('pl-mgpu', 0):.0f} TFLOP/s  "
            f"err {row['rel_err_vs_f32_ref']:.2e}", flush=True)


def bench_window(iterations: int, rows, dtype=jnp.bfloat16):
  """Sliding windows: prefill (TFLOP/s of the visible work) next to cuDNN's
  ``local_window_size=(W - 1, 0)`` (the same computation), and decode over a long cache with a
  window against the same decode over a cache as long as the window (``jax.nn`` cannot express a
  bottom-right window for one query, so there is no cuDNN decode row)."""
  for (b, s, n, kh, h), w in shapes.WINDOW_PREFILL:
    ks = jax.random.split(jax.random.key(s + w), 3)
    q = common.rand(ks[0], (b, s, n, h), dtype)
    k, v = common.rand(ks[1], (b, s, kh, h), dtype), common.rand(ks[2], (b, s, kh, h), dtype)
    seen = sum(min(t + 1, w) for t in range(s))  # keys each row sees, summed
    flops = 4 * b * n * h * seen
    default, backends = _backends("prefill", AttentionDims(b, s, s, n, kh, h), dtype,
                                  sliding_window=w)
    row = _Row("tflops", flops, kind="window_prefill", B=b, S=s, N=n, K=kh, H=h, window=w,
               dtype=jnp.dtype(dtype).name, flops=flops, ours_backend=default)
    for name in backends:
      row.record(name, lambda q, k, v, name=name: gp.gqa_attention(
          q, k, v, implementation=name, sliding_window=w), q, k, v, iterations=iterations)
    row.alias(default, "ours")
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(w - 1, 0), implementation="cudnn")
    row.record("cudnn", cudnn, q, k, v, iterations=iterations)
    ours = gp.gqa_attention(q, k, v, sliding_window=w)
    ref = _try(lambda: jax.jit(cudnn)(q, k, v))
    if not isinstance(ref, str):
      row["rel_err_vs_cudnn"] = _rel_err(ours, ref)
    rows.append(row)
    t = row["tflops"]
    print(f"window prefill B{b} S{s} W{w} {n}:{kh} H{h}: " + "  ".join(
        f"{k_} {v_:.0f}" for k_, v_ in t.items()) + f" TFLOP/s err vs cudnn "
          f"{row.get('rel_err_vs_cudnn', float('nan')):.1e}", flush=True)
  for (b, s, n, kh, h), w in shapes.WINDOW_DECODE:
    ks = jax.random.split(jax.random.key(s + w + 1), 3)
    q = common.rand(ks[0], (b, 1, n, h), dtype)
    times = {}
    for length, window in ((s, w), (w, None)):
      k = common.rand(ks[1], (b, length, kh, h), dtype)
      v = common.rand(ks[2], (b, length, kh, h), dtype)
      cache = gp.KVCache(k, v, jnp.full((b,), length, jnp.int32))
      times[f"S{length}" + (f"-W{window}" if window else "")] = common.measure_ms(
          jax.jit(lambda q, c, window=window: gp.gqa_decode(q, c, sliding_window=window)), q,
          cache, iterations=iterations)
      del k, v, cache
    (long_key, long_ms), (short_key, short_ms) = times.items()
    row = {"kind": "window_decode", "B": b, "S": s, "N": n, "K": kh, "H": h, "window": w,
           "dtype": jnp.dtype(dtype).name, "ms": times, "ratio_long_over_window": long_ms /
           short_ms}
    rows.append(row)
    print(f"window decode B{b} {n}:{kh} H{h}: {long_key} {long_ms * 1e3:.1f} us, {short_key} "
          f"{short_ms * 1e3:.1f} us ({row['ratio_long_over_window']:.2f}x)", flush=True)


def bench_chunked_prefill(iterations: int, rows, dtype=jnp.bfloat16):
  """Chunked prefill (T new tokens onto a cache of S, bottom-right), TFLOP/s of the visible
  work, every Pallas backend; each row also carries the default backend's square-causal
  TFLOP/s for its head config (``square``), measured in the same run."""
  square = {}
  for (heads, (b, s, n, kh, h)) in shapes.CHUNKED_SQUARE.items():
    ks = jax.random.split(jax.random.key(s + n), 3)
    q = common.rand(ks[0], (b, s, n, h), dtype)
    k, v = common.rand(ks[1], (b, s, kh, h), dtype), common.rand(ks[2], (b, s, kh, h), dtype)
    row = _Row("tflops", 2 * b * s * s * n * h)
    row.record("ours", lambda q, k, v: gp.gqa_attention(q, k, v), q, k, v,
               iterations=iterations)
    square[heads] = dict(shape=[b, s, n, kh, h], tflops=row["tflops"].get("ours"))
  for (b, t, s, n, kh, h) in shapes.CHUNKED_PREFILL:
    ks = jax.random.split(jax.random.key(b * t + s + n), 3)
    q = common.rand(ks[0], (b, t, n, h), dtype)
    k, v = common.rand(ks[1], (b, s, kh, h), dtype), common.rand(ks[2], (b, s, kh, h), dtype)
    visible = t * (s - t) + t * (t + 1) // 2  # keys seen by the T rows, summed
    flops = 4 * b * n * h * visible
    default, backends = _backends("prefill", AttentionDims(b, t, s, n, kh, h), dtype)
    row = _Row("tflops", flops, kind="chunked_prefill", B=b, T=t, S=s, N=n, K=kh, H=h,
               dtype=jnp.dtype(dtype).name, causal=True, flops=flops, ours_backend=default,
               square=square[(n, kh, h)])
    for name in backends:
      row.record(name, lambda q, k, v, name=name: gp.gqa_attention(q, k, v, implementation=name),
                 q, k, v, iterations=iterations)
    row.alias(default, "ours")
    out = gp.gqa_attention(q, k, v)
    g, tl = n // kh, min(t, 256)  # the last rows of one kv group: the full reference won't fit
    ref = gp.attention_reference(q[:1, -tl:, :g], k[:1, :, :1], v[:1, :, :1],
                                 q_offset=jnp.array([s - tl]))
    row["rel_err_vs_f32_ref"] = _rel_err(out[:1, -tl:, :g], ref)
    sq = square[(n, kh, h)]["tflops"]
    if sq and "ours" in row["tflops"]:
      row["vs_square"] = row["tflops"]["ours"] / sq
    rows.append(row)
    cells = "  ".join(f"{k} {v:.0f}" for k, v in row["tflops"].items())
    print(f"chunked {row['dtype']} B{b} T{t} S{s} {n}:{kh} H{h}: {cells} TFLOP/s "
          f"(square {sq or 0:.0f}) err {row['rel_err_vs_f32_ref']:.2e}", flush=True)


def _prefill_baselines(record, row, q, k, v, scale, num_configs=None):
  """XLA and JAX's own Pallas kernels on the same inputs (the first ``num_configs`` block
  configs of each, all by default)."""
  from jax.experimental.pallas.ops.gpu import attention as pl_attention  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.gpu import attention_mgpu as pl_mgpu  # pylint: disable=g-import-not-at-top
  record("xla", lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="xla"), q, k, v)
  # JAX's Pallas-Triton mha has no GQA: K/V repeated beforehand, the repeat is not timed.
  g = q.shape[2] // k.shape[2]
  kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  # Best first on the H200 (so that a lean run's one config is the usual winner).
  for bq, bk, nw in ((128, 64, 4), (64, 64, None), (128, 128, None),
                     (128, 64, None))[:num_configs]:
    record(f"pl-triton[{bq},{bk},{nw}]", lambda q, k, v, bq=bq, bk=bk, nw=nw: pl_attention.mha(
        q, k, v, None, sm_scale=scale, causal=True,
        block_sizes=pl_attention.BlockSizes(block_q=bq, block_k=bk), num_warps=nw), q, kr, vr)
  row.best_of("pl-triton", "pl-triton")
  del kr, vr
  if q.dtype == jnp.float16:  # it keeps its shared-memory buffers in fp16
    for bq, bkv, st in PL_MGPU_CONFIGS[:num_configs]:
      cfg = pl_mgpu.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=st, causal=True)
      # (It applies no logit scale; the timing does not depend on it.)
      record(f"pl-mgpu[{bq},{bkv},{st}]", lambda q, k, v, cfg=cfg: pl_mgpu.attention(
          q, k, v, cfg), q, k, v)
    row.best_of("pl-mgpu", "pl-mgpu")


# Triton backward configs timed (backward kernels alone) by --only backward --sweep.
BACKWARD_SWEEP = [BackwardConfig(*c) for c in
                  [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2),
                   (128, 128, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)]]


def _fwd_bwd(attention):
  """The forward and the VJP of ``attention`` for one output cotangent: what a training step
  runs per attention call."""
  def run(q, k, v, d_out):
    _, vjp = jax.vjp(attention, q, k, v)
    return vjp(d_out)
  return run


def bench_backward(sweep: bool, iterations: int, rows, dtype=jnp.bfloat16, grid=None, gpu=True,
                   baseline_configs=None, kernels_alone=True):
  """Forward+backward of the prefill grid (TFLOP/s counting 3.5x the causal forward's FLOPs):
  each of our forward backends with the backward the registry pairs it with, cuDNN and XLA
  through ``jax.nn``, and JAX's Pallas-Triton ``mha`` (K/V repeated beforehand, untimed).
  ``gpu=False``: our kernels in interpret mode and XLA only."""
  from jax.experimental.pallas.ops.gpu import attention as pl_attention  # pylint: disable=g-import-not-at-top
  for (b, s, n, kh, h) in (grid or shapes.PREFILL_GRID):
    ks = jax.random.split(jax.random.key(b * s + n + 7), 4)
    q = common.rand(ks[0], (b, s, n, h), dtype)
    k, v = common.rand(ks[1], (b, s, kh, h), dtype), common.rand(ks[2], (b, s, kh, h), dtype)
    d_out = common.rand(ks[3], (b, s, n, h), dtype)
    dims = AttentionDims(b, s, s, n, kh, h)
    flops = 3.5 * 2 * b * s * s * n * h
    default, backends = _backends("prefill", dims, dtype, interpret=not gpu)
    problem = registry.Problem("prefill", dims, jnp.dtype(dtype).name, device=devices.current(),
                               interpret=not gpu)
    row = _Row("tflops", flops, kind="backward", B=b, S=s, N=n, K=kh, H=h,
               dtype=jnp.dtype(dtype).name, causal=True, flops=flops, ours_backend=default,
               backward_of={name: registry.resolve_backward(registry.get(name), problem).name
                            for name in backends})
    record = functools.partial(row.record, iterations=iterations)
    for name in backends:
      record(name, _fwd_bwd(functools.partial(gp.gqa_attention, implementation=name,
                                              interpret=not gpu)), q, k, v, d_out)
    row.alias(default, "ours")
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation="cudnn")
    if gpu:
      record("cudnn", _fwd_bwd(cudnn), q, k, v, d_out)
    if b * n * s * s * 4 <= 8 << 30:  # XLA materialises [B, N, S, S] in float32
      record("xla", _fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="xla")), q, k, v, d_out)
    if not gpu:
      rows.append(row)
      print(f"fwd+bwd {row['dtype']} B{b} S{s} {n}:{kh} H{h}: " + "  ".join(
          f"{k_} {v_:.3g}" for k_, v_ in row["tflops"].items()) + " TFLOP/s (CPU)", flush=True)
      continue
    g = n // kh
    kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    for blocks in ((64, 64), (32, 32))[:baseline_configs]:  # best first on the H200
      sizes = pl_attention.BlockSizes(block_q=128, block_k=64, block_q_dkv=blocks[0],
                                      block_kv_dkv=blocks[1], block_q_dq=blocks[0],
                                      block_kv_dq=blocks[1])
      record(f"pl-triton[{blocks[0]},{blocks[1]}]", _fwd_bwd(
          lambda q, k, v, sizes=sizes: pl_attention.mha(q, k, v, None, sm_scale=1 / math.sqrt(h),
                                                        causal=True, block_sizes=sizes)),
             q, kr, vr, d_out)
    row.best_of("pl-triton", "pl-triton")
    del kr, vr
    # The backward kernels alone (the forward's residuals computed once, untimed).
    kv_lengths = jnp.full((b,), s, jnp.int32)
    q_offset = jnp.zeros((b,), jnp.int32)
    out, lse = gp.gqa_attention(q, k, v, return_lse=True)
    for name in dict.fromkeys(row["backward_of"].values() if kernels_alone else ()):
      backend = registry.get(name)
      if "prefill_bwd" not in backend.ops or name == "xla":
        continue
      configs = [None] + (BACKWARD_SWEEP if sweep and s == 8192 and name == "triton" else [])
      for cfg in configs:
        cfg_run = cfg or backend.default_config(registry.backward_problem(problem))
        label = f"{name}-bwd" + ("" if cfg is None else
                                 f"[{cfg.block_m},{cfg.block_n},{cfg.num_warps},{cfg.num_stages}]")
        record(label, lambda q, k, v, d_out, backend=backend, cfg_run=cfg_run: backend.prefill_bwd(
            q, k, v, q_offset, kv_lengths, out, lse, d_out, None, causal=True,
            scale=1 / math.sqrt(h), interpret=False, config=cfg_run), q, k, v, d_out)
        if label in row["ms"]:  # its own fields: the backward alone is 2.5x the forward's FLOPs
          row.setdefault("backward_only_ms", {})[label] = row["ms"].pop(label)
          row.setdefault("backward_only_tflops", {})[label] = row["tflops"].pop(label) * 2.5 / 3.5
    # Gradients of the default pairing against cuDNN's on this very input.
    ours = jax.jit(_fwd_bwd(gp.gqa_attention))(q, k, v, d_out)
    ref = _try(lambda: jax.jit(_fwd_bwd(cudnn))(q, k, v, d_out))
    if not isinstance(ref, str):
      row["rel_err_vs_cudnn"] = {name: _rel_err(a, r) for name, a, r in
                                 zip(("dq", "dk", "dv"), ours, ref)}
    rows.append(row)
    t = row["tflops"]
    cells = "  ".join(f"{k} {v:.0f}" for k, v in t.items())
    print(f"fwd+bwd {row['dtype']} B{b} S{s} {n}:{kh} H{h}: {cells} TFLOP/s "
          f"err vs cudnn {row.get('rel_err_vs_cudnn')}", flush=True)


def bench_decode(sweep: bool, iterations: int, ceilings: dict, rows, grid=None, gpu=True):
  """Appends the decode rows to ``rows``: the grid, ragged lengths and T = 4 (with ``grid``:
  those shapes only). ``gpu=False``: our kernels in interpret mode, XLA and the reference."""
  from jax.experimental.pallas.ops.gpu import decode_attention as pl_decode  # pylint: disable=g-import-not-at-top

  def run_case(b, s, n, kh, h, lengths, t=1, label="full", baselines=True):
    ks = jax.random.split(jax.random.key(b * s + n + t), 3)
    q = common.rand(ks[0], (b, t, n, h))
    k, v = common.rand(ks[1], (b, s, kh, h)), common.rand(ks[2], (b, s, kh, h))
    cache = gp.KVCache(k, v, jnp.asarray(lengths, jnp.int32))
    read_bytes = int(2 * np.sum(np.asarray(lengths)) * kh * h * 2)
    default, backends = _backends("decode", AttentionDims(b, t, s, n, kh, h), jnp.bfloat16,
                                  interpret=not gpu)
    row = _Row("gbs", read_bytes, kind="decode", label=label, B=b, S_max=s, N=n, K=kh, H=h, T=t,
               dtype="bfloat16", mean_length=float(np.mean(np.asarray(lengths))),
               kv_bytes_read=read_bytes, ours_backend=default)
    record = functools.partial(row.record, iterations=iterations)
    scale = 1 / math.sqrt(h)
    for name in backends:
      configs = DECODE_SWEEP if sweep and name == "triton" else [None]
      for cfg in configs:
        label_ = name if cfg is None else (f"{name}[{cfg.block_k},{cfg.num_warps},"
                                           f"{cfg.num_stages},{cfg.programs_per_sm},"
                                           f"{cfg.min_split_keys}]")
        record(label_, lambda q, c, name=name, cfg=cfg: gp.gqa_decode(
            q, c, implementation=name, config=cfg, interpret=not gpu), q, cache)
      if sweep and name == "triton":
        row.best_of("triton", "triton")
    row.alias(default, "ours")
    if baselines and t == 1 and gpu:
      record("cudnn", lambda q, c: jax.nn.dot_product_attention(
          q, c.k, c.v, key_value_seq_lengths=c.lengths, implementation="cudnn"), q, cache)
    if baselines and t == 1 and not sweep:  # a sweep compares our configs (and cuDNN) only
      record("xla", lambda q, c: jax.nn.dot_product_attention(
          q, c.k, c.v, key_value_seq_lengths=c.lengths, implementation="xla"), q, cache)
      record("jnp-ref", lambda q, c: gp.gqa_decode(q, c, implementation="xla"), q, cache)
    if baselines and t == 1 and not sweep and gpu:
      record("pl-gqa", lambda q, c: pl_decode.gqa(
          q[:, 0], c.k, c.v, kv_seq_len=c.lengths, sm_scale=scale), q, cache)
    out = gp.gqa_decode(q, cache)
    ref = gp.gqa_decode(q, cache, implementation="xla")
    row["rel_err_vs_f32_ref"] = _rel_err(out, ref)
    row["copy_gbs"], row["read_gbs"] = ceilings["copy_gbs"], ceilings["read_gbs"]
    row["frac_of_copy"] = row["gbs"].get("ours", 0) / ceilings["copy_gbs"]
    row["frac_of_read"] = row["gbs"].get("ours", 0) / ceilings["read_gbs"]
    rows.append(row)
    gb = row["gbs"]
    print(f"decode {label} B{b} S{s} {n}:{kh} H{h} T{t} ({read_bytes / 1e6:.0f} MB): ours "
          f"({default}) {gb.get('ours', 0):.0f} ({row['frac_of_read']:.2f} of read-only) cudnn "
          f"{gb.get('cudnn', 0):.0f} xla {gb.get('xla', 0):.0f} pl-gqa {gb.get('pl-gqa', 0):.0f}"
          f" GB/s  us ours {row['ms'].get('ours', 0) * 1e3:.1f} cudnn "
          f"{row['ms'].get('cudnn', 0) * 1e3:.1f}  err {row['rel_err_vs_f32_ref']:.2e}",
          flush=True)
    return row

  for (b, s, n, kh, h) in (grid or shapes.DECODE_GRID):
    run_case(b, s, n, kh, h, np.full((b,), s))
  if grid:
    return
  # Ragged lengths against the full cache, and T = 4.
  b, s, n, kh, h = shapes.RAGGED_DECODE
  rng = np.random.default_rng(0)
  full = run_case(b, s, n, kh, h, np.full((b,), s), label="ragged-base")
  for hi, label in ((s, "ragged-50"), (s // 2, "ragged-25")):
    row = run_case(b, s, n, kh, h, rng.integers(0, hi + 1, size=(b,)), label=label)
    row["time_vs_full"] = {kk: row["ms"][kk] / full["ms"][kk] for kk in row["ms"]
                           if kk in full["ms"]}
  for (b, s, n, kh, h) in ([] if sweep else shapes.DECODE_GRID):
    base = next(r for r in rows if r.get("label") == "full" and (
        r["B"], r["S_max"], r["N"], r["K"], r["H"]) == (b, s, n, kh, h))
    row = run_case(b, s, n, kh, h, np.full((b,), s), t=4, label="T4", baselines=False)
    row["time_vs_T1"] = row["ms"].get("ours", float("nan")) / base["ms"].get("ours", float("nan"))
    rows.save()


def bench_decode_step(iterations: int, rows, loop_steps: int = 9):
  """The per-step cost of a jit decode loop (``KVCache.append`` of one token, then
  ``gqa_decode``), against the decode call alone on the same cache.

  CUPTI times a compiled loop of 1 and of ``loop_steps`` steps (the cache as the loop carry);
  the per-step cost is the difference over ``loop_steps - 1``, so the one copy of the
  non-donated input cache into the loop cancels out. Separately, one call of a single step
  with the cache donated checks that the donated buffers are consumed (updated in place).
  """
  for (b, s, n, kh, h) in shapes.STEP_GRID:
    ks = jax.random.split(jax.random.key(b + s + n), 5)
    q = common.rand(ks[0], (b, n, h))
    k_new, v_new = common.rand(ks[1], (b, 1, kh, h)), common.rand(ks[2], (b, 1, kh, h))
    cache = gp.KVCache(common.rand(ks[3], (b, s, kh, h)), common.rand(ks[4], (b, s, kh, h)),
                       jnp.full((b,), s - loop_steps, jnp.int32))

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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--only", default=None,
                      help="comma-separated parts: prefill, chunked, decode, step, backward, "
                           "window (default: the first three)")
  parser.add_argument("--sweep", action="store_true", help="time several Triton configs")
  parser.add_argument("--dtypes", default="bfloat16,float16",
                      help="prefill input dtypes, comma-separated")
  parser.add_argument("--iterations", type=int, default=30)
  parser.add_argument("--out", default=None)
  parser.add_argument("--decode-shapes", default=None,
                      help="only these decode grid shapes, e.g. '16,4096,14,2,64;16,2048,8,8,64'")
  args = parser.parse_args(argv)
  parts = set(args.only.split(",")) if args.only else {"prefill", "chunked", "decode"}
  if not parts <= {"prefill", "chunked", "decode", "step", "backward", "window"}:
    parser.error(f"--only takes prefill, chunked, decode, step, backward, window; got "
                 f"{args.only!r}")
  info = common.device_info()
  if info["platform"] != "gpu":
    sys.exit("benchmarks need a CUDA GPU")
  result = dict(info, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                sweep=args.sweep)
  result["copy_gbs"] = common.copy_bandwidth_gbs()
  result["read_gbs"] = common.read_bandwidth_gbs()
  result["matmul_tflops"] = common.matmul_tflops()
  print(f"{info['device']} jax {info['jax']}: copy {result['copy_gbs']:.0f} GB/s, read-only "
        f"{result['read_gbs']:.0f} GB/s, bf16 matmul {result['matmul_tflops']:.0f} TFLOP/s",
        flush=True)
  name = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
  if parts == {"step"}:
    name += "-decode-step"
  elif parts == {"backward"}:
    name += "-backward"
  elif parts == {"window"}:
    name += "-window"
  elif parts <= {"prefill", "chunked"}:
    name += "-prefill"
  out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{name}.json")
  rows = _Results(out, result)
  if "prefill" in parts:
    dtypes = [jnp.dtype(d) for d in args.dtypes.split(",")]
    bench_prefill(args.sweep, args.iterations, dtypes, rows)
  if "chunked" in parts:
    bench_chunked_prefill(args.iterations, rows)
  if "decode" in parts:
    grid = None
    if args.decode_shapes:
      grid = [tuple(int(x) for x in shape.split(",")) for shape in args.decode_shapes.split(";")]
    bench_decode(args.sweep, args.iterations, result, rows, grid)
  if "step" in parts:
    bench_decode_step(args.iterations, rows)
  if "backward" in parts:
    bench_backward(args.sweep, args.iterations, rows)
  if "window" in parts:
    bench_window(args.iterations, rows)
  rows.save()
  print("wrote", out)

if __name__ == "__main__":
  main()
