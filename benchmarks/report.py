"""Writes ``docs/benchmarks.md`` (tables) and ``docs/img/*.png`` (plots) from a results JSON.

    python -m benchmarks.report [benchmarks/results/nvidia-h200.json]

Every number in the page comes from the JSON that ``benchmarks.run`` wrote; nothing is typed by
hand. Runs on any machine (no GPU needed).
"""
from __future__ import annotations

import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "benchmarks", "results", "nvidia-h200.json")
IMG_DIR = os.path.join(ROOT, "docs", "img")
OUR_BACKENDS = ("mosaic", "triton")  # columns shown when a row timed them
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _f(x, fmt="{:.0f}"):
  return "-" if x is None else fmt.format(x)


def _ratio(a, b):
  return None if a is None or not b else a / b


def _backend_columns(rows, key):
  return [b for b in OUR_BACKENDS if any(b in r[key] for r in rows)]


def prefill_table(rows):
  backends = _backend_columns(rows, "tflops")
  head = (["B", "S", "N:K", "H", "ours (backend)"] + [f"`{b}`" for b in backends] +
          ["cuDNN", "XLA", "Pallas-Triton `mha`", "Pallas Mosaic `attention_mgpu`",
           "ours / cuDNN", "ours / mha", "rel. err vs f32 ref"])
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    t = r["tflops"]
    cells = [r["B"], r["S"], f"{r['N']}:{r['K']}", r["H"],
             f"{_f(t.get('ours'))} ({r.get('ours_backend', 'triton')})"]
    cells += [_f(t.get(b)) for b in backends]
    cells += [_f(t.get("cudnn")), _f(t.get("xla")), _f(t.get("pl-triton")), _f(t.get("pl-mgpu")),
              _f(_ratio(t.get("ours"), t.get("cudnn")), "{:.2f}"),
              _f(_ratio(t.get("ours"), t.get("pl-triton")), "{:.2f}"),
              f"{r['rel_err_vs_f32_ref']:.1e}"]
    out.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(out)


def chunked_table(rows):
  backends = _backend_columns(rows, "tflops")
  head = (["B", "T new", "S cache", "N:K", "H", "ours (backend)"] + [f"`{b}`" for b in backends]
          + ["square-causal (B, S)", "ours / square", "ours / `triton`", "rel. err vs f32 ref"])
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    t, sq = r["tflops"], r.get("square", {})
    shape = sq.get("shape") or [None, None]
    cells = [r["B"], r["T"], r["S"], f"{r['N']}:{r['K']}", r["H"],
             f"{_f(t.get('ours'))} ({r.get('ours_backend', '?')})"]
    cells += [_f(t.get(b)) for b in backends]
    cells += [f"{_f(sq.get('tflops'))} (B{shape[0]}, S{shape[1]})",
              _f(r.get("vs_square"), "{:.2f}"),
              _f(_ratio(t.get("ours"), t.get("triton")), "{:.2f}"),
              f"{r['rel_err_vs_f32_ref']:.1e}"]
    out.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(out)


def decode_table(rows, res):
  read = res.get("read_gbs")
  head = ["B", "S_max", "N:K", "H", "K+V MB", "ours GB/s (backend)"]
  head += ["of read-only BW"] if read else []
  head += ["of copy BW", "cuDNN GB/s", "XLA", "jnp ref", "JAX Pallas `gqa`", "ours us",
           "cuDNN us", "cuDNN time / ours"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    g, ms = r["gbs"], r["ms"]
    cells = [r["B"], r["S_max"], f"{r['N']}:{r['K']}", r["H"], f"{r['kv_bytes_read'] / 1e6:.0f}",
             f"{_f(g.get('ours'))} ({r.get('ours_backend', 'triton')})"]
    if read:
      cells.append(_f(_ratio(g.get("ours"), read), "{:.2f}"))
    cells += [_f(_ratio(g.get("ours"), res["copy_gbs"]), "{:.2f}"), _f(g.get("cudnn")),
              _f(g.get("xla")), _f(g.get("jnp-ref")), _f(g.get("pl-gqa")),
              _f(ms.get("ours", 0) * 1e3, "{:.1f}"),
              _f(ms["cudnn"] * 1e3 if "cudnn" in ms else None, "{:.1f}"),
              _f(_ratio(ms.get("cudnn"), ms.get("ours")), "{:.2f}")]
    out.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(out)


def ragged_table(rows):
  out = ["| lengths | mean fill | ours us | ours time / full cache | cuDNN us | "
         "cuDNN time / full cache |", "|---|---|---|---|---|---|"]
  for r in rows:
    tv = r.get("time_vs_full", {})
    out.append(f"| {r['label']} | {r['mean_length'] / r['S_max']:.2f} | "
               f"{r['ms']['ours'] * 1e3:.1f} | {_f(tv.get('ours'), '{:.3f}')} | "
               f"{_f(r['ms'].get('cudnn', 0) * 1e3, '{:.1f}')} | "
               f"{_f(tv.get('cudnn'), '{:.3f}')} |")
  return "\n".join(out)


def t4_table(rows):
  out = ["| B | S_max | N:K | H | T=4 us | T=4 time / T=1 time |", "|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['B']} | {r['S_max']} | {r['N']}:{r['K']} | {r['H']} | "
               f"{r['ms']['ours'] * 1e3:.1f} | {r['time_vs_T1']:.3f} |")
  return "\n".join(out)


def step_section(main_path, main_res):
  """The jit decode-step table: the main file's rows, else ``<main>-decode-step.json``."""
  rows, res, path = _pick(main_res, main_path, "decode-step", ("decode_step",), "decode")
  if not rows:
    return []
  out = ["### A jit decode step (append one token + decode)", "",
         _source(res, path, main_path) + "Step = CUPTI time of a "
         "compiled loop of n steps minus a loop of 1, over n - 1 (the cache is the loop "
         "carry; the one copy of the input cache cancels); next to the decode call alone on the "
         "same cache, same process. 'Donated' = a single jit step with the cache donated "
         "consumed the old buffers.", "",
         "| B | S_max | N:K | H | step us | decode alone us | step / decode | donated |",
         "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['B']} | {r['S_max']} | {r['N']}:{r['K']} | {r['H']} | "
               f"{r['step_ms'] * 1e3:.1f} | {r['kernel_ms'] * 1e3:.1f} | "
               f"{r['step_over_kernel']:.3f} | "
               f"{'yes' if r['cache_donated_in_place'] else 'NO'} |")
  return out + [""]


_PLOT_IMPLS = ("ours", "mosaic", "triton", "cudnn", "pl-mgpu", "pl-triton", "pl-gqa", "xla")


def plots_from(path, img_dir, rows=None):
  """The PNGs of one results file: prefill TFLOP/s against the sequence length per head config,
  decode GB/s against the cache length with the bandwidth ceilings, end-to-end decode tokens/s
  per batch (``rows``: these instead of the file's). Returns the paths written (none without
  matplotlib, or for a file without rows)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  res = _load(path)
  rows = res["rows"] if rows is None else rows
  title = f"{res['device']}, jax {res['jax']}, {res['date'][:10]}"
  if not res.get("gpu", True):
    title += " (CPU: not GPU numbers)"
  os.makedirs(img_dir, exist_ok=True)
  made = []

  def save(fig, name):
    fig.tight_layout()
    out = os.path.join(img_dir, f"{name}.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    made.append(out)

  prefill = [r for r in rows if r["kind"] == "prefill"]
  configs = sorted({(r["N"], r["K"], r["H"], r["dtype"]) for r in prefill})
  if configs:
    fig, axes = plt.subplots(1, len(configs), figsize=(3.4 * len(configs), 3.6), squeeze=False)
    for ax, (n, k, h, dtype) in zip(axes[0], configs):
      sel = sorted((r for r in prefill if (r["N"], r["K"], r["H"], r["dtype"]) == (n, k, h, dtype)),
                   key=lambda r: r["S"])
      for impl in _PLOT_IMPLS:
        pts = [(r["S"], r["tflops"][impl]) for r in sel if impl in r["tflops"]]
        if pts:
          ax.plot(*zip(*pts), marker="o", label=impl, linewidth=2.5 if impl == "ours" else 1)
      ax.set_xscale("log", base=2)
      ax.set_title(f"{n}:{k} H{h} {_SHORT.get(dtype, dtype)}", fontsize=9)
      ax.set_xlabel("S = T (B·S fixed)", fontsize=8)
    axes[0][0].set_ylabel("TFLOP/s (causal)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Prefill: " + title, fontsize=9)
    save(fig, "prefill")

  decode = sorted((r for r in rows if r["kind"] == "decode" and r.get("label") == "full"),
                  key=lambda r: (r["S_max"], r["B"]))
  if decode:
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(decode)), 4))
    x = range(len(decode))
    for impl in _PLOT_IMPLS:
      if impl in ("mosaic", "triton") or not any(impl in r["gbs"] for r in decode):
        continue
      ax.plot([i for i, r in zip(x, decode) if impl in r["gbs"]],
              [r["gbs"][impl] for r in decode if impl in r["gbs"]], marker="o", label=impl,
              linewidth=2.5 if impl == "ours" else 1)
    for label, key, style in (("device copy", "copy_gbs", "--"), ("read-only", "read_gbs", ":")):
      if res.get(key):
        ax.axhline(res[key], color="k", linestyle=style, linewidth=1, label=label)
    ax.set_xticks(list(x), [f"S{r['S_max']}\nB{r['B']} {r['N']}:{r['K']} H{r['H']}"
                            for r in decode], fontsize=7)
    ax.set_xlabel("cache length (and shape)", fontsize=8)
    ax.set_ylabel("GB/s of K+V read")
    ax.set_title("Decode: " + title, fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    save(fig, "decode")

  e2e_rows = [r for r in rows if r["kind"] == "e2e"]
  if e2e_rows:
    impls = [i for i in ("ours", "cudnn", "xla") if any(i in r["decode_tokens_per_s"]
                                                        for r in e2e_rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(e2e_rows)), 3.8))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
      ax.bar([j + i * width for j in range(len(e2e_rows))],
             [r["decode_tokens_per_s"].get(impl, 0) for r in e2e_rows], width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(e2e_rows))],
                  [f"B{r['B']}\nprompt {r['prompt']}" for r in e2e_rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (all rows)")
    ax.set_title(f"End to end ({e2e_rows[0]['model']}): " + title, fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "e2e")
  return made


def backward_table(rows):
  backends = _backend_columns(rows, "tflops")
  head = (["B", "S", "N:K", "H", "ours (forward + backward)"] + [f"`{b}`" for b in backends] +
          ["cuDNN", "XLA", "Pallas-Triton `mha`", "ours / cuDNN", "ours / mha",
           "backward alone (TFLOP/s, 2.5x fwd FLOPs)", "rel. err of dq, dk, dv vs cuDNN"])
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    t = r["tflops"]
    ours = r.get("ours_backend", "?")
    pair = f"{ours} + {r.get('backward_of', {}).get(ours, '?')}"
    only = r.get("backward_only_tflops", {})
    default_only = {k: v for k, v in only.items() if "[" not in k}
    err = r.get("rel_err_vs_cudnn") or {}
    cells = [r["B"], r["S"], f"{r['N']}:{r['K']}", r["H"], f"{_f(t.get('ours'))} ({pair})"]
    cells += [_f(t.get(b)) for b in backends]
    cells += [_f(t.get("cudnn")), _f(t.get("xla")), _f(t.get("pl-triton")),
              _f(_ratio(t.get("ours"), t.get("cudnn")), "{:.2f}"),
              _f(_ratio(t.get("ours"), t.get("pl-triton")), "{:.2f}"),
              ", ".join(f"{k} {v:.0f}" for k, v in default_only.items()) or "-",
              ", ".join(f"{err[g]:.1e}" for g in ("dq", "dk", "dv") if g in err) or "-"]
    out.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(out)


def backward_section(main_path, main_res):
  rows, res, path = _pick(main_res, main_path, "backward", ("backward",), "backward")
  if not rows:
    return []
  return [
      "## Forward + backward (causal, bf16, T = S; TFLOP/s counting 3.5x the forward's FLOPs)",
      "",
      _source(res, path, main_path) + "One call = the forward and the VJP for one output cotangent "
      "(`jax.vjp`), what a training step runs per attention layer. Our column pairs the "
      "default forward with the backward the registry picks for it; cuDNN and XLA are "
      "`jax.grad` through `jax.nn.dot_product_attention` (XLA only where its float32 "
      "`[B, N, S, S]` fits); Pallas-Triton `mha` is JAX's kernel with its own backward (K/V "
      "repeated beforehand, untimed; the best of the backward block sizes tried).",
      "",
      backward_table(rows),
      "",
  ]


def window_section(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    res = json.load(f)
  prefill = [r for r in res["rows"] if r["kind"] == "window_prefill"]
  decode = [r for r in res["rows"] if r["kind"] == "window_decode"]
  out = ["## Sliding windows (bf16)", "",
         f"From `{os.path.relpath(path, ROOT)}`: {res['device']}, jax {res['jax']}, "
         f"{res['date'][:10]}. Prefill TFLOP/s of the visible work (4·B·N·H·Σ keys each row "
         "sees); cuDNN through `jax.nn.dot_product_attention(is_causal=True, "
         "local_window_size=(W - 1, 0))`, the same computation.", ""]
  if prefill:
    head = ["B", "S", "window", "N:K", "H", "ours (backend)", "cuDNN", "ours / cuDNN",
            "rel. err vs cuDNN"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in prefill:
      t = r["tflops"]
      out.append("| " + " | ".join(str(c) for c in [
          r["B"], r["S"], r["window"], f"{r['N']}:{r['K']}", r["H"],
          f"{_f(t.get('ours'))} ({r.get('ours_backend', '?')})", _f(t.get("cudnn")),
          _f(_ratio(t.get("ours"), t.get("cudnn")), "{:.2f}"),
          _f(r.get("rel_err_vs_cudnn"), "{:.1e}")]) + " |")
    out.append("")
  if decode:
    out += ["Decode, one token per row over a full cache, against a cache as long as the "
            "window (what a window should cost):", "",
            "| B | N:K | H | times (us) | long / window-length |", "|---|---|---|---|---|"]
    for r in decode:
      times = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r["ms"].items())
      out.append(f"| {r['B']} | {r['N']}:{r['K']} | {r['H']} | {times} | "
                 f"{r['ratio_long_over_window']:.2f} |")
    out.append("")
  return out


def _history(main_path):
  shown = {os.path.abspath(main_path),
           os.path.abspath(main_path.replace(".json", "-window.json"))}
  others = sorted(p for p in glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json"))
                  if os.path.abspath(p) not in shown)
  if not others:
    return []
  out = ["## Other result files", "",
         "Earlier runs and tuning sweeps (raw JSON, same format; the H100 files are history from "
         "before the GPU machine became an H200):", ""]
  for p in others:
    with open(p) as f:
      res = json.load(f)
    out.append(f"- `{os.path.relpath(p, ROOT)}`: {res.get('device', '?')}, jax "
               f"{res.get('jax', '?')}, {res.get('date', '?')[:10]}"
               f"{', sweep' if res.get('sweep') else ''}")
  return out + [""]


def _load(path):
  with open(path) as f:
    return json.load(f)


def _pick(main_res, main_path, suffix, kinds, part):
  """``(rows, res, path)`` of ``kinds``: from the main file, or from ``<main>-<suffix>.json``
  (a part run on its own) where that is the newer run of them or the main file's run of
  ``part`` did not finish (a ``gqa-pallas bench`` file lists its finished parts)."""
  rows = [r for r in main_res["rows"] if r["kind"] in kinds]
  if "seconds" in main_res and part not in main_res["seconds"]:
    rows = []
  side = main_path.replace(".json", f"-{suffix}.json")
  if os.path.exists(side):
    res = _load(side)
    side_rows = [r for r in res["rows"] if r["kind"] in kinds]
    if side_rows and (not rows or res["date"] > main_res["date"]):
      return side_rows, res, side
  return rows, main_res, main_path


def _source(res, path, main_path):
  """A sentence naming the run a section comes from, when it is not the main file's."""
  if path == main_path:
    return ""
  return (f"From an earlier run, `{os.path.relpath(path, ROOT)}`: {res['device']}, jax "
          f"{res['jax']}, {res['date'][:10]}. ")


def e2e_section(rows, host_rows, source=""):
  if not rows and not host_rows:
    return []
  out = ["## End to end: generation with a Llama-3.2-1B-shaped model", "",
         source + "16 layers, hidden 2048, 32:8 heads of 64, intermediate 8192, vocabulary 128256, random "
         "bf16 weights, the decoder's default layer loop; `flax_layers.generate` with "
         "`implementation=None` (ours), `\"cudnn\"` and `\"xla\"`, same run. Wall-clock "
         "medians of whole calls, compiled beforehand; t(n) is the call's one compiled program "
         "stopped after n tokens by its runtime step limit: prefill = t(1) (the prompt's "
         "forward, its cache, one token); decode tokens/s = B·(N - 1) / (t(N) - t(1)).", "",
         "| B | prompt | new tokens | prefill ms: ours / cuDNN / XLA | decode tok/s: ours / "
         "cuDNN / XLA | ours / cuDNN (decode) | notes |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    p, d = r["prefill_ms"], r["decode_tokens_per_s"]
    notes = "; ".join(f"{k}: {v}" for k, v in {**r.get("skipped", {}),
                                                **r.get("errors", {})}.items())
    out.append(f"| {r['B']} | {r['prompt']} | {r['new_tokens']} | "
               + " / ".join(_f(p.get(k), "{:.1f}") for k in ("ours", "cudnn", "xla")) + " | "
               + " / ".join(_f(d.get(k)) for k in ("ours", "cudnn", "xla")) + " | "
               + _f(r.get("decode_vs_cudnn"), "{:.2f}") + f" | {notes or '-'} |")
  out.append("")
  for r in host_rows:
    out += ["### Host overhead of one `generate` call (batch 1)", "",
            f"Prompt {r['prompt']}, {r['new_tokens']} new tokens: `generate` takes "
            f"**{r['generate_wall_ms']:.2f} ms** of wall time; the compiled program called "
            f"directly {r['program_wall_ms']:.2f} ms"
            + (f"; its kernels (CUPTI, summed) {r['device_ms']:.2f} ms: wall minus device "
               f"**{r['overhead_ms']:.2f} ms** (bar: 2 ms, "
               f"{'met' if r['within_2ms'] else 'NOT met'})" if "device_ms" in r else "")
            + f". What `generate` adds in Python over the program: "
            f"{r['python_overhead_ms']:.2f} ms.", ""]
  return out


SHARDING_BEGIN = "<!-- sharded: generated by gqa-pallas bench sharded -->"
SHARDING_END = "<!-- /sharded -->"
# The bars of issue 16: n-device throughput over one device's.
SHARDING_BARS = {"data": 1.8, "model": 1.5}


def sharded_section(res, rel):
  """The measured-scaling block of ``docs/sharding.md`` from a ``bench sharded`` file."""
  n = res["devices"]
  out = [f"{res['device']} x {n}, jax {res['jax']}, {res['date'][:10]} (`{rel}`, written by "
         "`gqa-pallas bench sharded`; do not edit by hand)."
         + ("" if res.get("gpu") else " " + res.get("note", "CPU numbers, not GPU numbers.")),
         "", "Decoder rows: `generate` after a prompt, wall-clock medians of whole calls, "
         "decode tokens/s = B·(N - 1) / (t(N) - t(1)) for N new tokens, one device and the mesh "
         "in the same process. `same tokens`: the fraction of greedy tokens equal to the "
         "one-device run's.", "",
         f"| layout | model | B | prompt + new | decode tok/s, 1 device | {n} devices | speedup "
         "| bar | same tokens | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    if r["kind"] != "sharded_decode":
      continue
    d = r["decode_tokens_per_s"]
    bar = SHARDING_BARS.get(r["layout"])
    met = ("met" if r["speedup"] >= bar else "NOT met") if "speedup" in r and bar else "-"
    notes = "; ".join(f"{k}: {v}" for k, v in r.get("errors", {}).items()) or r.get(
        "skipped", "-")
    out.append(f"| {r['layout']} | {r['model']}, {r['N']}:{r['K']} H{r['H']} | {r['B']} | "
               f"{r['prompt']} + {r['new_tokens']} | {_f(d.get('1'))} | {_f(d.get(str(n)) if n > 1 else None)} | "
               f"{_f(r.get('speedup'), '{:.2f}x')} | "
               f"{bar}x ({met}) | {_f(r.get('same_tokens'), '{:.3f}')} | {notes} |")
  out.append("")
  for r in res["rows"]:
    if r["kind"] != "sequence_parallel":
      continue
    ms, err, exact = r["ms_per_step"], r.get("max_err", {}), r.get("exact", {})
    out += [f"Sequence-parallel decode, B{r['B']}, a {r['S_max']}-token cache, {r['N']}:{r['K']} "
            f"H{r['H']} {r['dtype']} (one layer; wall-clock per step of a compiled loop of "
            f"{r['loop_steps']} chained calls):", "",
            f"| devices | ms per step | speedup | max error vs float32 | exact (design.md) |",
            "|---|---|---|---|---|"]
    for name in sorted(ms, key=int):
      out.append(f"| {name} | {_f(ms.get(name), '{:.3f}')} | "
                 f"{_f(r.get('speedup') if name != '1' else 1.0, '{:.2f}x')} | "
                 f"{_f(err.get(name), '{:.2e}')} | {exact.get(name, '-')} |")
    out += ["", f"The reference in {r['dtype']} is off by {r['max_err_ref_dtype']:.2e}; the "
            "rule allows 3x that plus 1e-5 and a mean error at most 1.5x the reference's.", ""]
  return out


def update_sharding_doc(path, doc=os.path.join(ROOT, "docs", "sharding.md")):
  """Rewrites the block between ``SHARDING_BEGIN`` and ``SHARDING_END`` of ``doc`` from the
  ``bench sharded`` file ``path``; returns ``doc``."""
  with open(doc) as f:
    text = f.read()
  if SHARDING_BEGIN not in text or SHARDING_END not in text:
    raise ValueError(f"{doc} has no {SHARDING_BEGIN} ... {SHARDING_END} block.")
  head, rest = text.split(SHARDING_BEGIN, 1)
  tail = rest.split(SHARDING_END, 1)[1]
  block = "\n".join(sharded_section(_load(path), os.path.relpath(path, ROOT)))
  with open(doc, "w") as f:
    f.write(f"{head}{SHARDING_BEGIN}\n{block}\n{SHARDING_END}{tail}")
  return doc


def headline(prefill, decode, e2e_rows):
  """The README's table: ours / cuDNN at a few anchor points."""
  out = ["| workload | ours | cuDNN | ours / cuDNN |", "|---|---|---|---|"]
  for r in prefill:
    if r["dtype"] == "bfloat16" and r["B"] * r["S"] in (16384,) and (r["N"], r["K"]) == (32, 8):
      t = r["tflops"]
      out.append(f"| prefill bf16 B{r['B']} S{r['S']} 32:8 H128 (TFLOP/s) | {_f(t.get('ours'))}"
                 f" | {_f(t.get('cudnn'))} | {_f(_ratio(t.get('ours'), t.get('cudnn')), '{:.2f}')} |")
  for r in decode:
    if (r["B"], r["S_max"], r["N"], r["K"]) in ((16, 8192, 32, 8), (1, 32768, 32, 8)):
      ms = r["ms"]
      out.append(f"| decode B{r['B']} S{r['S_max']} 32:8 H128 (us) | "
                 f"{_f(ms.get('ours', 0) * 1e3, '{:.1f}')} | "
                 f"{_f(ms['cudnn'] * 1e3 if 'cudnn' in ms else None, '{:.1f}')} | "
                 f"{_f(_ratio(ms.get('cudnn'), ms.get('ours')), '{:.2f}')} (time) |")
  for r in e2e_rows:
    d = r["decode_tokens_per_s"]
    out.append(f"| Llama-3.2-1B shapes, B{r['B']}, prompt {r['prompt']}: decode tokens/s | "
               f"{_f(d.get('ours'))} | {_f(d.get('cudnn'))} | "
               f"{_f(r.get('decode_vs_cudnn'), '{:.2f}')} |")
  return "\n".join(out) if len(out) > 2 else ""


README_BEGIN = "<!-- headline: generated by python -m benchmarks.report -->"
README_END = "<!-- /headline -->"


def update_readme(table, res, rel, path=os.path.join(ROOT, "README.md")):
  """Replaces the block between the README's headline markers; False where it has none."""
  with open(path) as f:
    text = f.read()
  if README_BEGIN not in text or README_END not in text or not table:
    return False
  head, rest = text.split(README_BEGIN, 1)
  _, tail = rest.split(README_END, 1)
  block = (f"{README_BEGIN}\n{res['device']}, jax {res['jax']}, {res['date'][:10]} (`{rel}`; all "
           f"figures and more in [docs/benchmarks.md](docs/benchmarks.md)):\n\n{table}\n"
           f"{README_END}")
  with open(path, "w") as f:
    f.write(head + block + tail)
  return True


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  path = os.path.abspath(argv[0] if argv else DEFAULT)
  res = _load(path)
  rows = res["rows"]
  prefill, prefill_res, prefill_path = _pick(res, path, "prefill", ("prefill",), "prefill")
  chunked, chunked_res, chunked_path = _pick(res, path, "prefill", ("chunked_prefill",), "prefill")
  decode = [r for r in rows if r["kind"] == "decode" and r["label"] == "full"]
  ragged = [r for r in rows if r["kind"] == "decode" and r["label"].startswith("ragged")]
  t4 = [r for r in rows if r["kind"] == "decode" and r["label"] == "T4"]
  e2e_rows, e2e_res, e2e_path = _pick(res, path, "e2e", ("e2e",), "e2e")
  host_rows = [r for r in e2e_res["rows"] if r["kind"] == "host_overhead"]
  made = plots_from(path, IMG_DIR, rows=prefill + decode + e2e_rows)
  rel = os.path.relpath(path, ROOT)
  read = (f", read-only **{res['read_gbs']:.0f} GB/s** (an f32-accumulated sum over bf16)"
          if res.get("read_gbs") else "")
  command = res.get("command", "python -m benchmarks.run")
  text = [
      "# Benchmarks",
      "",
      f"Generated by `python -m benchmarks.report` from `{rel}` (written by `{command}` on the "
      "GPU machine; `gqa-pallas bench all` regenerates the file, the plots and this page). Do "
      "not edit by hand.",
      "",
      f"Device: **{res['device']}**, jax {res['jax']}, {res['date'][:10]}. Ceilings measured in "
      f"the same run: device copy **{res['copy_gbs']:.0f} GB/s** (read + write){read}, bf16 "
      f"8192^3 matmul **{res['matmul_tflops']:.0f} TFLOP/s**. Kernel times are CUPTI medians "
      "(`jax.experimental.mosaic.gpu.profiler.measure`), all implementations in one process; "
      "random normal inputs. Ratios within this run are what to compare. `ours` is what "
      "`implementation=None` runs on this device; each of our backends that runs a shape is "
      "also timed under its own name.",
      "",
  ]
  if res.get("seconds") is not None:
    missing = [p for p in ("prefill", "decode", "backward", "e2e") if p not in res["seconds"]
               and res.get("command") == "gqa-pallas bench all"]
    text += ["Time the run took, by part (s): " + (", ".join(
        f"{k} {v:.0f}" for k, v in res["seconds"].items()) or "none finished") + "." + (
            f" It was cut short before finishing {', '.join(missing)} (the GPU machine's time "
            "limit; `gqa-pallas bench all --resume` finishes it): those sections come from the "
            "earlier runs they name." if missing else ""), ""]
  for dtype in sorted({r["dtype"] for r in prefill}):
    text += [
        f"## Prefill (causal, {dtype}, T = S; TFLOP/s with causal FLOPs 2·B·S²·N·H)",
        "",
        _source(prefill_res, prefill_path, path) +
        "Pallas-Triton `mha` and Mosaic `attention_mgpu` are JAX's own kernels (no GQA packing: "
        "`mha` gets K/V repeated beforehand, repeat not timed; the best of the block configs "
        "tried; `attention_mgpu` runs fp16 only). Our kernels read each K/V tile once per group.",
        "",
        prefill_table([r for r in prefill if r["dtype"] == dtype]),
        "",
    ]
  if chunked:
    text += [
        "## Chunked prefill (T new tokens onto a cache of S, bottom-right causal, bf16)",
        "",
        _source(chunked_res, chunked_path, path) +
        "TFLOP/s of the visible work (4·B·N·H·Σ keys seen per row). `jax.nn`'s cuDNN path cannot "
        "express bottom-right offsets, so the comparison is our Triton kernel and the square-"
        "causal rate of the same head config (`implementation=None`, same run).",
        "",
        chunked_table(chunked),
        "",
    ]
  if decode:
    text += [
        "## Decode (one query token per row, full caches, bf16)",
        "",
        "GB/s = bytes of K and V actually read (per-row lengths) / time. cuDNN and XLA are "
        "`jax.nn.dot_product_attention(..., key_value_seq_lengths=...)`; `jnp ref` is this "
        "package's reference under `jit`; JAX Pallas `gqa` is `decode_attention.gqa`.",
        "",
        decode_table(decode, res),
        "",
    ]
  if ragged:
    text += ["### Ragged lengths (B16, S_max 8192, 32:8, H128)", "", ragged_table(ragged), ""]
  if t4:
    text += ["### Several query tokens per row (T = 4, speculative / chunked decoding)", "",
             t4_table(t4), ""]
  text += step_section(path, res)
  text += backward_section(path, res)
  text += e2e_section(e2e_rows, host_rows, _source(e2e_res, e2e_path, path))
  text += window_section(path.replace(".json", "-window.json"))
  for p in made:
    text += [f"![{os.path.basename(p)}](img/{os.path.basename(p)})", ""]
  text += [
      "## Tuning sweeps",
      "",
      "The Triton tuning tables (`gqa_pallas/triton/prefill.py` and `gqa_pallas/triton/decode.py`,"
      " one table per device kind) come from `python -m benchmarks.run --sweep` runs on that "
      "card; their raw results are the `*-sweep*.json` files beside the main result. "
      "`python -m benchmarks.probe_decode` times decode configurations on one shape with a "
      "per-kernel breakdown; its logs and what each run tried are in "
      "`benchmarks/results/probes-*/` and `benchmarks/NOTES.md`.",
      "",
  ]
  text += _history(path)
  out = os.path.join(ROOT, "docs", "benchmarks.md")
  with open(out, "w") as f:
    f.write("\n".join(text))
  print("wrote", out, *made)
  if update_readme(headline(prefill, decode, e2e_rows), res, rel):
    print("updated the README's headline table")


if __name__ == "__main__":
  main()
