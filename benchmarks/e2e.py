"""End to end: a Llama-3.2-1B-shaped decoder generating after a long prompt, and the host
overhead of one ``generate`` call.

The model has Llama 3.2 1B's shapes (16 layers, hidden 2048, 32:8 heads of 64, intermediate
8192, vocabulary 128256, tied embeddings) with random bf16 weights: nothing is downloaded, and
attention's cost does not depend on the weights. Each variant is the same ``generate`` call
with another ``implementation`` (ours: ``None``; ``"cudnn"``; ``"xla"``).

Times are wall-clock medians of whole ``generate`` calls (end-to-end loops: the one place
wall-clock is the measure), the program compiled beforehand:

* ``prefill_ms``: ``t(1)``, the call stopped after its first token (the prompt's forward, its
  cache, one sampled token);
* ``decode_tokens_per_s``: ``B * (N - 1) / (t(N) - t(1))`` for ``max_new_tokens = N``: the
  decode steps alone.

``t(1)`` and ``t(N)`` are the same compiled ``generate`` program (``max_new_tokens = N``) stopped
by its runtime step limit after 1 or N tokens, so each variant compiles once per point. The
model uses the decoder's default layer layout (an explicit loop over per-layer caches, updated in
place); ``scan_layers`` would copy the stacked cache and slice the stacked weights at every step.

The host-overhead row times one ``generate`` call at batch 1 against its device time (CUPTI:
every kernel of the compiled program, summed) and against the compiled program called
directly: what ``generate`` adds in Python on top of the program.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from flax_layers import decoder, generation

# Llama 3.2 1B's shapes (config.json of meta-llama/Llama-3.2-1B).
LLAMA_1B = decoder.DecoderConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
    num_kv_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, max_position_embeddings=131072, dtype="bfloat16",
    param_dtype="bfloat16")

# The CPU run: the same code on a model a CPU generates with in seconds.
TINY = decoder.DecoderConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=256, dtype="float32",
    param_dtype="float32")

# (prompt length, new tokens, batch sizes); the long-context point runs at batch 1.
GPU_POINTS = [(2048, 256, (1, 16, 64)), (32768, 256, (1,))]
CPU_POINTS = [(32, 8, (1, 4))]
GPU_VARIANTS = (("ours", None), ("cudnn", "cudnn"), ("xla", "xla"))
CPU_VARIANTS = (("xla", "xla"),)
# XLA materialises the [B, N, T, T] float32 logits and weights of the prompt.
XLA_PREFILL_BYTES = 80 << 30


def _wall_ms(fn, reps):
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - start) * 1e3)
  return float(statistics.median(times))


def _prompts(batch, length, vocab, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, vocab, size=(batch, length), dtype=np.int32)


def _generate(config, params, tokens, new_tokens, implementation, steps, *, interpret=False,
              mesh=None):
  """``generate(config, params, tokens, None, new_tokens, implementation=..., mesh=...)``
  stopped after ``steps`` tokens."""
  return lambda: generation._generate_new_cache(  # pylint: disable=protected-access
      config, params, tokens, None, new_tokens, rng=None, temperature=0.0, top_k=None,
      top_p=None, eos_token_id=None, implementation=implementation, interpret=interpret,
      precision=None, max_length=None, cache_dtype=None, steps=steps, mesh=mesh)[0]


def bench_e2e(rows, *, on_gpu: bool, reps: int = 3, progress=None):
  """Appends one ``e2e`` row per (prompt, batch) with every variant side by side."""
  config = LLAMA_1B if on_gpu else TINY
  params = decoder.init_params(config, jax.random.PRNGKey(0))
  variants = GPU_VARIANTS if on_gpu else CPU_VARIANTS
  for prompt_len, new_tokens, batches in (GPU_POINTS if on_gpu else CPU_POINTS):
    for b in batches:
      tokens = jnp.asarray(_prompts(b, prompt_len, config.vocab_size))
      row = {"kind": "e2e", "model": "Llama-3.2-1B shapes" if on_gpu else "tiny (CPU)",
             "B": b, "prompt": prompt_len, "new_tokens": new_tokens,
             "N": config.num_heads, "K": config.num_kv_heads, "H": config.head_dim,
             "layers": config.num_layers, "dtype": config.dtype, "prefill_ms": {},
             "generate_ms": {}, "decode_tokens_per_s": {}}
      for name, impl in variants:
        if impl == "xla" and b * config.num_heads * prompt_len ** 2 * 8 > XLA_PREFILL_BYTES:
          row.setdefault("skipped", {})[name] = (
              f"XLA materialises [B, N, T, T] float32 logits and weights "
              f"({b * config.num_heads * prompt_len ** 2 * 8 / 2**30:.0f} GiB)")
          continue
        try:
          first = _generate(config, params, tokens, new_tokens, impl, 1)
          full = _generate(config, params, tokens, new_tokens, impl, new_tokens)
          jax.block_until_ready(full())  # compile (one program for both)
          # Batch 1 is the noisiest ratio (a few ms per call): more calls there.
          n = reps + 2 if b == 1 else reps
          t1, tn = _wall_ms(first, n), _wall_ms(full, n)
        except Exception as e:  # pylint: disable=broad-except
          row.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
          continue
        row["prefill_ms"][name] = t1
        row["generate_ms"][name] = tn
        row["decode_tokens_per_s"][name] = b * (new_tokens - 1) / max(tn - t1, 1e-9) * 1e3
      tps = row["decode_tokens_per_s"]
      if "ours" in tps and "cudnn" in tps:
        row["decode_vs_cudnn"] = tps["ours"] / tps["cudnn"]
      if "ours" in row["prefill_ms"] and "cudnn" in row["prefill_ms"]:
        row["prefill_speedup_vs_cudnn"] = row["prefill_ms"]["cudnn"] / row["prefill_ms"]["ours"]
      rows.append(row)
      if progress:
        progress(f"e2e B{b} prompt {prompt_len}: decode tok/s " + "  ".join(
            f"{k} {v:.0f}" for k, v in tps.items()) + "; prefill ms " + "  ".join(
                f"{k} {v:.1f}" for k, v in row["prefill_ms"].items()))


def bench_host_overhead(rows, *, on_gpu: bool, reps: int = 10, prompt_len: int = 128,
                        new_tokens: int = 32, progress=None):
  """One ``generate`` call at batch 1: its wall time against its device time."""
  config = LLAMA_1B if on_gpu else TINY
  params = decoder.init_params(config, jax.random.PRNGKey(0))
  # NumPy prompts, as a tokenizer gives them: generate checks them on the host and the call
  # moves them with its other arguments (a device array would be read back for the check).
  tokens = _prompts(1, min(prompt_len, config.max_position_embeddings // 2), config.vocab_size)
  t = tokens.shape[1]
  call = lambda: generation.generate(config, params, tokens, None, new_tokens)[0]
  jax.block_until_ready(call())
  wall = _wall_ms(call, reps)
  # The compiled program alone, on the arguments generate passes it.
  lengths = np.full((1,), t, np.int32)
  run_kwargs = dict(rng=None, temperature=0.0, greedy=True, top_k=None, use_top_p=False,
                    top_p=None, eos_token_id=None, implementation=None, interpret=False,
                    precision=None, fresh_cache=(t + new_tokens - 1, config.dtype))
  direct = lambda: generation._run(  # pylint: disable=protected-access
      config, params, None, tokens, lengths, new_tokens, **run_kwargs)[0]
  jax.block_until_ready(direct())
  program = _wall_ms(direct, reps)
  row = {"kind": "host_overhead", "model": "Llama-3.2-1B shapes" if on_gpu else "tiny (CPU)",
         "B": 1, "prompt": t, "new_tokens": new_tokens, "generate_wall_ms": wall,
         "program_wall_ms": program}
  if on_gpu:
    args, static = generation._jit_arguments(  # pylint: disable=protected-access
        config, params, None, tokens, lengths, new_tokens, **run_kwargs)
    device = common.measure_ms(
        lambda *a: generation._generate_jit(*a, **static)[0],  # pylint: disable=protected-access
        *args, iterations=reps)
    row["device_ms"] = device
    row["overhead_ms"] = wall - device
    row["within_2ms"] = bool(wall - device <= 2.0)
  row["python_overhead_ms"] = wall - program
  rows.append(row)
  if progress:
    progress(f"host overhead B1 prompt {t} +{new_tokens}: generate {wall:.2f} ms, program "
             f"{program:.2f} ms" + (f", device {row['device_ms']:.2f} ms" if on_gpu else ""))
