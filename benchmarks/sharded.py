"""``gqa-pallas bench sharded``: decode across devices, one device against ``n`` in one run.

Three points, each measured on one device and on a mesh of ``n`` devices in the same process:

* ``data``: the Llama-3.2-1B-shaped decoder (``benchmarks/e2e.py``) at batch 64, rows split
  over a ``(data=n, model=1)`` mesh (data parallel: each device holds every weight and
  ``64 / n`` rows of the cache);
* ``model``: a Llama-3-8B-shaped decoder (32 layers, hidden 4096, 32:8 heads of 128,
  intermediate 14336) at batch 16 on a ``(data=1, model=n)`` mesh (tensor parallel: heads, kv
  heads, the MLP and the vocabulary split, ``flax_layers.partitioning``);
* ``sequence``: one layer's decode attention (32:8 heads of 128, bf16) over a 256k-token cache
  at batch 1, the cache split along its sequence over ``n`` devices
  (``gqa_pallas.sharding.sequence_parallel_decode``) against ``gqa_decode`` on one device, with
  its error against a float32 reference next to the unsharded kernel's (design.md's rule).

Decoder rows time whole ``generate`` calls by wall clock, as ``benchmarks/e2e.py`` does (a 2048
token prompt, 256 new tokens, decode tokens/s from ``t(N) - t(1)``); the sequence row times a
compiled loop of decode calls, each step's query the previous step's output (no call can be
skipped), by wall clock divided by the steps: CUPTI sums kernel times over devices, which says
nothing about a parallel speedup. ``speedup`` is the ``n``-device rate over the one-device rate.

``--devices 1`` runs the one-device baseline alone (a machine with one GPU). Without a GPU it
runs the same code on tiny shapes over the CPU's devices (run it with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` or more) and says so.
"""
from __future__ import annotations

import datetime
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gqa_pallas as gp
from benchmarks import common, e2e, run
from flax_layers import decoder, partitioning
from gqa_pallas import sharding

# Llama 3 8B's shapes (config.json of meta-llama/Meta-Llama-3-8B).
LLAMA_8B = decoder.DecoderConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, max_position_embeddings=131072, dtype="bfloat16",
    param_dtype="bfloat16")

# The CPU run: two kv heads, so a model axis of 2 splits them.
TINY = e2e.TINY

# The end-to-end benchmark's helpers: the same generate call, timing and prompts.
_generate, _wall_ms, _prompts = e2e._generate, e2e._wall_ms, e2e._prompts  # pylint: disable=protected-access

# (layout, model name, config, batch, prompt, new tokens)
GPU_DECODER_POINTS = [("data", "Llama-3.2-1B shapes", e2e.LLAMA_1B, 64, 2048, 256),
                      ("model", "Llama-3-8B shapes", LLAMA_8B, 16, 2048, 256)]
CPU_DECODER_POINTS = [("data", "tiny (CPU)", TINY, 4, 16, 8),
                      ("model", "tiny (CPU)", TINY, 2, 16, 8)]
# (B, S, N, K, H, dtype, loop steps) of the sequence-parallel row.
GPU_SEQUENCE = (1, 262144, 32, 8, 128, "bfloat16", 64)
CPU_SEQUENCE = (1, 512, 4, 2, 64, "bfloat16", 4)


def _mesh(devices, layout) -> Mesh:
  n = len(devices)
  shape = {"data": (n, 1), "model": (1, n)}[layout]
  return Mesh(np.array(devices).reshape(shape), ("data", "model"))


def bench_decoder(rows, devices, *, on_gpu, reps, implementation, interpret, progress=None):
  """One row per point: decode tokens/s on one device and on ``len(devices)`` devices."""
  n = len(devices)
  for layout, model, config, b, prompt_len, new_tokens in (
      GPU_DECODER_POINTS if on_gpu else CPU_DECODER_POINTS):
    row = {"kind": "sharded_decode", "layout": layout, "model": model, "devices": n, "B": b,
           "prompt": prompt_len, "new_tokens": new_tokens, "N": config.num_heads,
           "K": config.num_kv_heads, "H": config.head_dim, "layers": config.num_layers,
           "dtype": config.dtype, "implementation": implementation or "ours",
           "prefill_ms": {}, "generate_ms": {}, "decode_tokens_per_s": {}}
    if b % n if layout == "data" else config.num_kv_heads % n:
      row["skipped"] = (f"{'B' if layout == 'data' else 'K'} does not divide over {n} devices")
      rows.append(row)
      continue
    params = decoder.init_params(config, jax.random.PRNGKey(0))
    tokens = _prompts(b, prompt_len, config.vocab_size)
    outputs = {}
    mesh = _mesh(devices, layout)
    for name, variant_mesh in (("1", None), (str(n), mesh))[:1 if n == 1 else 2]:
      try:
        if variant_mesh is None:
          p, t = params, jnp.asarray(tokens)
        else:
          p = partitioning.shard_params(params, variant_mesh)
          t = jax.device_put(tokens, partitioning.batch_sharding(tokens.shape, variant_mesh))
        call = functools.partial(_generate, config, p, t, new_tokens, implementation,
                                 interpret=interpret, mesh=variant_mesh)
        first, full = call(1), call(new_tokens)
        outputs[name] = np.asarray(jax.block_until_ready(full()))  # compile (one program)
        t1, tn = _wall_ms(first, reps), _wall_ms(full, reps)
      except Exception as e:  # pylint: disable=broad-except
        row.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        continue
      row["prefill_ms"][name] = t1
      row["generate_ms"][name] = tn
      if tn <= t1:  # a CPU run's noise: no rate to give
        row.setdefault("errors", {})[name] = f"t(N) {tn:.3f} ms <= t(1) {t1:.3f} ms"
        continue
      row["decode_tokens_per_s"][name] = b * (new_tokens - 1) / (tn - t1) * 1e3
    tps = row["decode_tokens_per_s"]
    if n > 1 and "1" in tps and str(n) in tps:
      row["speedup"] = tps[str(n)] / tps["1"]
      # Greedy tokens: equal where every device computes what one device does; a model-axis
      # split sums partial products in another order, so a near tie may pick another token.
      row["same_tokens"] = float(np.mean(outputs["1"] == outputs[str(n)]))
    rows.append(row)
    del params
    if progress:
      progress(f"sharded {layout} {model} B{b}: decode tok/s " + "  ".join(
          f"{k} device(s) {v:.0f}" for k, v in tps.items()) + (
              f"; speedup {row['speedup']:.2f}x" if "speedup" in row else ""))


def _loop_ms(step, q, cache, steps, reps):
  """Wall-clock ms per step of ``steps`` chained calls ``q <- step(q, cache)``."""
  loop = jax.jit(lambda q, c: lax.fori_loop(0, steps, lambda _, x: step(x, c).astype(x.dtype), q))
  jax.block_until_ready(loop(q, cache))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(loop(q, cache))
    times.append((time.perf_counter() - start) * 1e3 / steps)
  return float(statistics.median(times))


def bench_sequence(rows, devices, *, on_gpu, reps, implementation, interpret, progress=None):
  """Decode over a cache split along its sequence against the one-device decode."""
  n = len(devices)
  b, s, heads, kv_heads, h, dtype, steps = GPU_SEQUENCE if on_gpu else CPU_SEQUENCE
  dtype = jnp.dtype(dtype)
  row = {"kind": "sequence_parallel", "devices": n, "B": b, "S_max": s, "N": heads,
         "K": kv_heads, "H": h, "T": 1, "dtype": dtype.name, "loop_steps": steps,
         "implementation": implementation or "ours", "ms_per_step": {}}
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q = common.rand(keys[0], (b, heads, h), dtype)
  k = common.rand(keys[1], (b, s, kv_heads, h), dtype)
  v = common.rand(keys[2], (b, s, kv_heads, h), dtype)
  lengths = jnp.full((b,), s, jnp.int32)
  whole = gp.KVCache(k, v, lengths)
  mesh = Mesh(np.array(devices), ("seq",))
  seq = NamedSharding(mesh, P(None, "seq"))
  split = gp.KVCache(jax.device_put(k, seq), jax.device_put(v, seq), lengths)
  kw = dict(implementation=implementation, interpret=interpret)
  one = lambda q, c: gp.gqa_decode(q, c, **kw)
  spread = lambda q, c: sharding.sequence_parallel_decode(q, c, mesh=mesh, axis_name="seq", **kw)
  outs = {}
  for name, fn, cache in (("1", one, whole), (str(n), spread, split))[:1 if n == 1 else 2]:
    try:
      outs[name] = np.asarray(jax.jit(fn)(q, cache), np.float64)
      row["ms_per_step"][name] = _loop_ms(fn, q, cache, steps, reps)
    except Exception as e:  # pylint: disable=broad-except
      row.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  if on_gpu:  # the one-device kernel's CUPTI time, next to the loop's wall time per step
    row["cupti_ms_1"] = common.measure_ms(jax.jit(one), q, whole, iterations=20)
  # Parity (design.md): against the float32 reference, next to the reference in the dtype.
  up = lambda x: x.astype(jnp.float32)
  reference = jax.jit(functools.partial(gp.attention_reference, q_offset=lengths - 1,
                                        kv_lengths=lengths), static_argnames="compute_dtype")
  ref32 = np.asarray(reference(up(q)[:, None], up(k), up(v))[:, 0], np.float64)
  ref_d = np.asarray(reference(q[:, None], k, v, compute_dtype=dtype)[:, 0].astype(jnp.float32),
                     np.float64)
  err_d = np.abs(ref_d - ref32)
  row["max_err_ref_dtype"] = float(err_d.max())
  for name, out in outs.items():
    err = np.abs(out - ref32)
    row.setdefault("max_err", {})[name] = float(err.max())
    row.setdefault("exact", {})[name] = bool(err.max() <= 3 * err_d.max() + 1e-5 and
                                             err.mean() <= 1.5 * err_d.mean() + 1e-6)
  ms = row["ms_per_step"]
  if n > 1 and "1" in ms and str(n) in ms:
    row["speedup"] = ms["1"] / ms[str(n)]
  rows.append(row)
  if progress:
    progress(f"sequence-parallel decode S{s} {heads}:{kv_heads} H{h}: ms/step " + "  ".join(
        f"{k} device(s) {v:.3f}" for k, v in ms.items()) + (
            f"; speedup {row['speedup']:.2f}x" if "speedup" in row else "") +
        f"; exact {row.get('exact')}")


def main_with_args(args) -> int:
  common.quiet()
  gpu = common.on_gpu()
  devices = jax.devices()
  if args.devices is not None:
    if not 1 <= args.devices <= len(devices):
      raise ValueError(f"--devices must be between 1 and the {len(devices)} devices here; got "
                       f"{args.devices}.")
    devices = devices[:args.devices]
  elif len(devices) < 2:
    raise ValueError(f"bench sharded needs at least 2 devices; this machine has {len(devices)} "
                     f"({devices[0].device_kind}). Pass --devices 1 for the one-device baseline "
                     "alone; on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=2 "
                     "before starting.")
  if len(devices) == 1:
    print("one device: the baseline rows only (no mesh, no speedup)", flush=True)
  from benchmarks import bench, report  # pylint: disable=g-import-not-at-top
  info = common.device_info()
  name = bench.device_name(info) if gpu else "cpu"
  out = args.out or os.path.join(bench.RESULTS, f"{name}-x{len(devices)}-sharded.json")
  if not gpu:
    print(bench.NOT_GPU, flush=True)
  header = dict(info, devices=len(devices),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                command="gqa-pallas bench sharded", gpu=gpu)
  if not gpu:
    header["note"] = bench.NOT_GPU
  rows = run._Results(out, header)  # pylint: disable=protected-access
  reps = args.iterations or 3
  implementation, interpret = (None, False) if gpu else ("triton", True)
  started = time.perf_counter()
  say = lambda text: print(text, flush=True)
  bench_decoder(rows, devices, on_gpu=gpu, reps=reps, implementation=implementation,
                interpret=interpret, progress=say)
  bench_sequence(rows, devices, on_gpu=gpu, reps=reps, implementation=implementation,
                 interpret=interpret, progress=say)
  rows.save()
  print(f"wrote {out} ({len(rows)} rows, {time.perf_counter() - started:.0f} s)")
  if gpu and len(devices) > 1 and not args.no_docs and args.out is None:
    print("updated", report.update_sharding_doc(out))
  if not gpu:
    print(bench.NOT_GPU)
  return 0
