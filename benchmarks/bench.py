"""``gqa-pallas bench {prefill,decode,backward,e2e,all}``: one run, every implementation side by
side, one JSON, the plots and the benchmark page (``sharded``: ``benchmarks/sharded.py``).

On a GPU it measures the ceilings first (device copy and read-only bandwidth, a bf16 matmul),
then each part over the anchor grids of ``benchmarks/shapes.py``: every registered Pallas
backend of ours (``ours`` is the one ``implementation=None`` picks), cuDNN and XLA through
``jax.nn.dot_product_attention``, JAX's own Pallas kernels (``pl-triton``, ``pl-mgpu``,
``pl-gqa``) — kernel times by CUPTI — and the end-to-end generation of a Llama-3.2-1B-shaped
model (wall-clock). It writes ``benchmarks/results/<device>.json`` (``all``) or
``<device>-<part>.json``, PNG plots beside the page (``docs/img``), and, for the committed
``all`` file, regenerates ``docs/benchmarks.md`` and the README's headline table. ``all`` is
each part's core (prefill in bf16 with chunked prefill, the decode grid, forward+backward, e2e
with the host-overhead row); a part run on its own adds its extras (fp16 prefill; ragged, T = 4
and jit-step decode; the backward kernels alone). ``--resume`` finishes a run cut short.

Without a GPU it runs small shapes on the CPU (our kernels in interpret mode, XLA, a tiny
model) and says so: those numbers are CPU wall-clock times of interpreters, not GPU numbers.
Its JSON goes to ``benchmarks/results/cpu*.json`` (not committed) and its plots beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import common, e2e, report, run, shapes

PARTS = ("prefill", "decode", "backward", "e2e")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The CPU run: small shapes (B, S, N, K, H), two sequence lengths per head config so that the
# plots have lines.
CPU_PREFILL = [(1, 64, 4, 2, 64), (1, 128, 4, 2, 64)]
CPU_DECODE = [(2, 256, 4, 2, 64), (2, 512, 4, 2, 64)]
CPU_BACKWARD = [(1, 64, 4, 2, 64)]

NOT_GPU = ("No GPU here: small shapes on the CPU, our kernels in interpret mode. These are CPU "
           "wall-clock times, NOT GPU numbers; run on a CUDA GPU for those.")

# The row kinds each part writes.
PART_KINDS = {"prefill": ("prefill", "chunked_prefill"), "decode": ("decode", "decode_step"),
              "backward": ("backward",), "e2e": ("e2e", "host_overhead")}

# The rate each kind of row is compared by.
RATE_KEYS = {"prefill": "tflops", "chunked_prefill": "tflops", "backward": "tflops",
             "decode": "gbs", "e2e": "decode_tokens_per_s"}


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("part", choices=PARTS + ("all", "sharded"),
                 help="what to measure ('sharded': decode on one device against several, "
                 "benchmarks/sharded.py; not part of 'all')")
  p.add_argument("--out", default=None, help="the JSON to write (default: "
                 "benchmarks/results/<device>[-<part>].json)")
  p.add_argument("--iterations", type=int, default=None,
                 help="timed calls per measurement (default: 20 on a GPU, 3 on the CPU)")
  p.add_argument("--dtypes", default=None, help="prefill dtypes, comma-separated (default: "
                 "bfloat16,float16 for 'prefill', bfloat16 for 'all')")
  p.add_argument("--baseline-configs", type=int, default=1,
                 help="block configs tried for each of JAX's own Pallas kernels (best first)")
  p.add_argument("--no-plots", action="store_true", help="write the JSON only")
  p.add_argument("--resume", action="store_true",
                 help="continue a run that was cut short (a time limit) into the same --out: "
                 "the parts it finished are kept, the others run (the file records the resume)")
  p.add_argument("--only", default=None,
                 help="with 'all': run only these parts (comma-separated) into the 'all' file; "
                 "a later --resume runs the others (for machines with a time limit per command)")
  p.add_argument("--devices", type=int, default=None,
                 help="with 'sharded': how many devices (default: all of them; 1: the one-device "
                 "baseline alone)")
  p.add_argument("--no-docs", action="store_true",
                 help="do not regenerate docs/benchmarks.md and the README table (they are "
                 "regenerated only from the default GPU 'all' file)")


class _Progress:
  """A progress bar over the rows a run will write (tqdm when installed, else a counter);
  every row's one-line summary is printed above it."""

  def __init__(self, total: int):
    self.total, self.done = total, 0
    try:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, unit="row", file=sys.stderr, dynamic_ncols=True)
    except ImportError:
      self.bar = None

  def step(self, n=1):
    self.done += n
    if self.bar is not None:
      self.bar.update(n)
    else:
      print(f"[{self.done}/{self.total}]", file=sys.stderr, flush=True)

  def say(self, text):
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


class _Rows(run._Results):  # pylint: disable=protected-access
  """Results that advance the progress bar and add the ratios to cuDNN as rows arrive."""

  def __init__(self, path, header, progress):
    super().__init__(path, header)
    self.progress = progress

  def append(self, row):
    _add_ratios(row)
    super().append(row)
    self.progress.step()


def _add_ratios(row):
  key = RATE_KEYS.get(row.get("kind"))
  rates = row.get(key) if key else None
  if not rates or not rates.get("cudnn"):
    return
  row["vs_cudnn"] = {name: rate / rates["cudnn"] for name, rate in rates.items()}


def _expected_rows(parts, gpu, dtypes, lean) -> int:
  n = 0
  if "prefill" in parts:
    n += len(dtypes) * len(shapes.PREFILL_GRID if gpu else CPU_PREFILL)
    n += len(shapes.CHUNKED_PREFILL) if gpu else 0
  if "decode" in parts:
    grid = shapes.DECODE_GRID if gpu else CPU_DECODE
    n += len(grid) + ((3 + len(grid) + len(shapes.STEP_GRID)) if gpu and not lean else 0)
  if "backward" in parts:
    n += len(shapes.PREFILL_GRID if gpu else CPU_BACKWARD)
  if "e2e" in parts:
    points = e2e.GPU_POINTS if gpu else e2e.CPU_POINTS
    n += sum(len(batches) for _, _, batches in points) + 1
  return n


def _ceilings(gpu: bool) -> dict:
  if gpu:
    return dict(copy_gbs=common.copy_bandwidth_gbs(), read_gbs=common.read_bandwidth_gbs(),
                matmul_tflops=common.matmul_tflops())
  return dict(copy_gbs=common.copy_bandwidth_gbs(64 << 20), read_gbs=common.read_bandwidth_gbs(
      64 << 20), matmul_tflops=common.matmul_tflops(1024))


def device_name(info) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()


def main_with_args(args) -> int:
  if args.part == "sharded":
    from benchmarks import sharded  # pylint: disable=g-import-not-at-top
    return sharded.main_with_args(args)
  if args.devices is not None:
    raise ValueError(f"--devices is for 'sharded'; part {args.part!r} runs on one device.")
  common.quiet()
  gpu = common.on_gpu()
  parts = PARTS if args.part == "all" else (args.part,)
  only = PARTS if args.only is None else tuple(x for x in args.only.split(",") if x)
  if args.only is not None and (args.part != "all" or not set(only) <= set(PARTS)):
    raise ValueError(f"--only takes parts of 'all' ({', '.join(PARTS)}), comma-separated; got "
                     f"{args.only!r} with part {args.part!r}.")
  iterations = args.iterations or (20 if gpu else 3)
  dtypes = [jnp.dtype(d) for d in (args.dtypes or (
      "bfloat16" if args.part == "all" else "bfloat16,float16")).split(",")]
  info = common.device_info()
  name = device_name(info) if gpu else "cpu"
  out = args.out or os.path.join(RESULTS, name + ("" if args.part == "all" else f"-{args.part}")
                                 + ".json")
  if not gpu:
    print(NOT_GPU, flush=True)
  started = time.perf_counter()
  now = datetime.datetime.now(datetime.timezone.utc).isoformat()
  kept, timings = [], {}
  if args.resume and os.path.exists(out):
    with open(out) as f:
      header = json.load(f)
    if header.get("device") != info["device"] or header.get("jax") != info["jax"]:
      raise ValueError(f"--resume: {out} was written on {header.get('device')} with jax "
                       f"{header.get('jax')}, not here ({info['device']}, jax {info['jax']}).")
    timings = {k: v for k, v in header.get("seconds", {}).items() if k in parts}
    done = {kind for part in timings for kind in PART_KINDS[part]}
    kept = [r for r in header.pop("rows") if r["kind"] in done]
    header["resumed"] = header.get("resumed", []) + [now]
    ceilings = {k: header[k] for k in ("copy_gbs", "read_gbs", "matmul_tflops")}
  else:
    ceilings = _ceilings(gpu)
    header = dict(info, date=now, command=f"gqa-pallas bench {args.part}", gpu=gpu,
                  iterations=iterations, sweep=False, **ceilings)
    if not gpu:
      header["note"] = NOT_GPU
  print(f"{info['device']} jax {info['jax']}: copy {ceilings['copy_gbs']:.0f} GB/s, read-only "
        f"{ceilings['read_gbs']:.0f} GB/s, bf16 matmul {ceilings['matmul_tflops']:.1f} TFLOP/s",
        flush=True)
  todo = [part for part in parts if part not in timings and part in only]
  lean = args.part == "all"  # the extras of a part run on their own are left out
  progress = _Progress(_expected_rows(todo, gpu, dtypes, lean))
  rows = _Rows(out, header, progress)
  rows.extend(kept)
  real_print = print

  def say(*a, **kw):  # the run functions print a line per row: keep it above the bar
    if kw.get("file") not in (None, sys.stdout):
      return real_print(*a, **kw)
    progress.say(" ".join(str(x) for x in a))
  run.print = say
  try:
    for part in todo:
      t0 = time.perf_counter()
      if part == "prefill":
        run.bench_prefill(False, iterations, dtypes, rows, grid=None if gpu else CPU_PREFILL,
                          gpu=gpu, baseline_configs=args.baseline_configs)
        if gpu:
          run.bench_chunked_prefill(iterations, rows)
      elif part == "decode":
        # 'all' keeps to the decode grid; 'decode' adds ragged lengths, T = 4, the jit step.
        grid = (shapes.DECODE_GRID if lean else None) if gpu else CPU_DECODE
        run.bench_decode(False, iterations, ceilings, rows, grid=grid, gpu=gpu)
        if gpu and not lean:
          run.bench_decode_step(iterations, rows)
      elif part == "backward":
        run.bench_backward(False, iterations, rows, grid=None if gpu else CPU_BACKWARD, gpu=gpu,
                           baseline_configs=args.baseline_configs, kernels_alone=not lean)
      elif part == "e2e":
        e2e.bench_e2e(rows, on_gpu=gpu, progress=progress.say)
        e2e.bench_host_overhead(rows, on_gpu=gpu, progress=progress.say)
      timings[part] = time.perf_counter() - t0
      rows.header["seconds"] = dict(timings)
      rows.save()
  finally:
    run.print = real_print
    progress.close()
  print(f"wrote {out} ({len(rows)} rows, {time.perf_counter() - started:.0f} s)")
  left = [part for part in parts if part not in timings]
  if left:
    print(f"parts not run yet: {', '.join(left)} (run again with --resume --out {out})")
  if not args.no_plots:
    img_dir = (report.IMG_DIR if os.path.abspath(out) == _default_all(name) else
               os.path.join(os.path.dirname(os.path.abspath(out)), "img"))
    for path in report.plots_from(out, img_dir):
      print("wrote", path)
  if gpu and not args.no_docs and not left and os.path.abspath(out) == _default_all(name):
    report.main([out])
  if not gpu:
    print(NOT_GPU)
  return 0


def _default_all(name) -> str:
  return os.path.abspath(os.path.join(RESULTS, name + ".json"))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="gqa-pallas bench", description=__doc__.split("\n\n")[0])
  add_arguments(p)
  return main_with_args(p.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
