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


def step_section(path):
  """The jit decode-step table, from ``<main>-decode-step.json`` (a separate run) if present."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    res = json.load(f)
  out = ["### A jit decode step (append one token + decode)", "",
         f"From `{os.path.relpath(path, ROOT)}` (`python -m benchmarks.run --only step`, "
         f"{res['device']}, jax {res['jax']}, {res['date'][:10]}). Step = CUPTI time of a "
         "compiled loop of n steps minus a loop of 1, over n - 1 (the cache is the loop "
         "carry; the one copy of the input cache cancels); next to the decode call alone on the "
         "same cache, same process. 'Donated' = a single jit step with the cache donated "
         "consumed the old buffers.", "",
         "| B | S_max | N:K | H | step us | decode alone us | step / decode | donated |",
         "|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    if r["kind"] != "decode_step":
      continue
    out.append(f"| {r['B']} | {r['S_max']} | {r['N']}:{r['K']} | {r['H']} | "
               f"{r['step_ms'] * 1e3:.1f} | {r['kernel_ms'] * 1e3:.1f} | "
               f"{r['step_over_kernel']:.3f} | "
               f"{'yes' if r['cache_donated_in_place'] else 'NO'} |")
  return out + [""]


def plots(prefill, decode, res, img_dir):
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  os.makedirs(img_dir, exist_ok=True)
  made = []
  ceilings = [("device copy", res["copy_gbs"], "--")]
  if res.get("read_gbs"):
    ceilings.append(("read-only", res["read_gbs"], ":"))
  for name, rows, key, ylabel, impls, lines in (
      ("prefill", prefill, "tflops", "TFLOP/s (causal)",
       ["ours", "cudnn", "pl-triton", "pl-mgpu", "xla"], []),
      ("decode", decode, "gbs", "GB/s of K+V read", ["ours", "cudnn", "pl-gqa", "xla"],
       ceilings)):
    impls = [i for i in impls if any(i in r[key] for r in rows)]
    labels = [f"B{r['B']} S{r.get('S', r.get('S_max'))}\n{r['N']}:{r['K']} H{r['H']}"
              + (f" {_SHORT.get(r['dtype'], r['dtype'])}" if name == "prefill" else "")
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(10, len(rows) * 0.9), 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
      ax.bar([x + i * width for x in range(len(rows))], [r[key].get(impl, 0) for r in rows],
             width, label=impl)
    for label, value, style in lines:
      ax.axhline(value, color="k", linestyle=style, linewidth=1, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{res['device']}, jax {res['jax']}", fontsize=9)
    ax.legend(fontsize=8, ncol=len(impls) + len(lines), loc="upper center",
              bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    path = os.path.join(img_dir, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
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


def backward_section(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    res = json.load(f)
  rows = [r for r in res["rows"] if r["kind"] == "backward"]
  if not rows:
    return []
  return [
      "## Forward + backward (causal, bf16, T = S; TFLOP/s counting 3.5x the forward's FLOPs)",
      "",
      f"From `{os.path.relpath(path, ROOT)}`: {res['device']}, jax {res['jax']}, "
      f"{res['date'][:10]}. One call = the forward and the VJP for one output cotangent "
      "(`jax.vjp`), what a training step runs per attention layer. Our column pairs the "
      "default forward with the backward the registry picks for it; cuDNN and XLA are "
      "`jax.grad` through `jax.nn.dot_product_attention` (XLA only where its float32 "
      "`[B, N, S, S]` fits); Pallas-Triton `mha` is JAX's kernel with its own backward (K/V "
      "repeated beforehand, untimed; best of two backward block sizes).",
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
           os.path.abspath(main_path.replace(".json", "-prefill.json")),
           os.path.abspath(main_path.replace(".json", "-backward.json")),
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


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  path = argv[0] if argv else DEFAULT
  with open(path) as f:
    res = json.load(f)
  rows = res["rows"]
  prefill = [r for r in rows if r["kind"] == "prefill"]
  chunked = [r for r in rows if r["kind"] == "chunked_prefill"]
  # A later prefill-only run (``--only prefill,chunked``) supersedes the main file's prefill.
  prefill_path, prefill_res = path.replace(".json", "-prefill.json"), res
  if os.path.exists(prefill_path):
    with open(prefill_path) as f:
      prefill_res = json.load(f)
    prefill = [r for r in prefill_res["rows"] if r["kind"] == "prefill"]
    chunked = [r for r in prefill_res["rows"] if r["kind"] == "chunked_prefill"]
  decode = [r for r in rows if r["kind"] == "decode" and r["label"] == "full"]
  ragged = [r for r in rows if r["kind"] == "decode" and r["label"].startswith("ragged")]
  t4 = [r for r in rows if r["kind"] == "decode" and r["label"] == "T4"]
  img_dir = os.path.join(ROOT, "docs", "img")
  made = plots(prefill, decode, res, img_dir)
  rel = os.path.relpath(path, ROOT)
  read = (f", read-only **{res['read_gbs']:.0f} GB/s** (an f32-accumulated sum over bf16)"
          if res.get("read_gbs") else "")
  text = [
      "# Benchmarks",
      "",
      f"Generated by `python -m benchmarks.report` from `{rel}` (written by "
      "`python -m benchmarks.run` on the GPU machine). Do not edit by hand.",
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
  if prefill_res is not res:
    text += [
        f"The prefill and chunked-prefill tables come from a later run, "
        f"`{os.path.relpath(prefill_path, ROOT)}`: {prefill_res['device']}, jax "
        f"{prefill_res['jax']}, {prefill_res['date'][:10]}, copy "
        f"{prefill_res['copy_gbs']:.0f} GB/s, bf16 matmul {prefill_res['matmul_tflops']:.0f} "
        "TFLOP/s; the decode tables from the main file.",
        "",
    ]
  for dtype in sorted({r["dtype"] for r in prefill}):
    text += [
        f"## Prefill (causal, {dtype}, T = S; TFLOP/s with causal FLOPs 2·B·S²·N·H)",
        "",
        "Pallas-Triton `mha` and Mosaic `attention_mgpu` are JAX's own kernels (no GQA packing: "
        "`mha` gets K/V repeated beforehand, repeat not timed; best of their block configs; "
        "`attention_mgpu` runs fp16 only). Our kernels read each K/V tile once per group.",
        "",
        prefill_table([r for r in prefill if r["dtype"] == dtype]),
        "",
    ]
  if chunked:
    text += [
        "## Chunked prefill (T new tokens onto a cache of S, bottom-right causal, bf16)",
        "",
        "TFLOP/s of the visible work (4·B·N·H·Σ keys seen per row). `jax.nn`'s cuDNN path cannot "
        "express bottom-right offsets, so the comparison is our Triton kernel and the square-"
        "causal rate of the same head config (`implementation=None`, same run).",
        "",
        chunked_table(chunked),
        "",
    ]
  text += [
      "## Decode (one query token per row, full caches, bf16)",
      "",
      "GB/s = bytes of K and V actually read (per-row lengths) / time. cuDNN and XLA are "
      "`jax.nn.dot_product_attention(..., key_value_seq_lengths=...)`; `jnp ref` is this "
      "package's reference under `jit`; JAX Pallas `gqa` is `decode_attention.gqa`.",
      "",
      decode_table(decode, res),
      "",
      "### Ragged lengths (B16, S_max 8192, 32:8, H128)",
      "",
      ragged_table(ragged),
      "",
      "### Several query tokens per row (T = 4, speculative / chunked decoding)",
      "",
      t4_table(t4),
      "",
  ]
  text += step_section(path.replace(".json", "-decode-step.json"))
  text += backward_section(path.replace(".json", "-backward.json"))
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


if __name__ == "__main__":
  main()
