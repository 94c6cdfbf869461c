"""Probe: where a batch-1 decode step of the Llama-3.2-1B-shaped model spends its time.

For each attention variant and each XLA command-buffer setting, one compiled ``generate``
program (2048-token prompt, 64 new tokens) is timed by wall clock stopped after 1 and after 64
tokens, and its kernels are listed by CUPTI: the kernel count per decode step and the summed
kernel time against the wall time tell launch-bound from bandwidth-bound. Not part of
``gqa-pallas bench``; its findings go to ``benchmarks/NOTES.md``.

    python -m benchmarks.probe_e2e [--prompt 2048] [--new 64] [--batch 1]
"""
from __future__ import annotations

import argparse
import collections
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, e2e
from flax_layers import decoder, generation

# XLA's command-buffer (CUDA graph) settings tried: its default, none, and the default plus
# while loops and conditionals (the decode loop as one graph with conditional nodes).
OPTIONS = {
    "default": None,
    "no-graphs": {"xla_gpu_enable_command_buffer": ""},
    "while-graphs": {"xla_gpu_enable_command_buffer":
                     "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"},
}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--prompt", type=int, default=2048)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--variants", default="ours,cudnn")
  p.add_argument("--options", default=",".join(OPTIONS))
  p.add_argument("--scan", action="store_true", help="the scan_layers layout")
  args = p.parse_args(argv)
  common.quiet()
  config = e2e.LLAMA_1B if common.on_gpu() else e2e.TINY
  if args.scan:
    config = config.replace(scan_layers=True)
  params = decoder.init_params(config, jax.random.PRNGKey(0))
  prompt = min(args.prompt, config.max_position_embeddings // 2)
  tokens = jnp.asarray(e2e._prompts(args.batch, prompt, config.vocab_size))  # pylint: disable=protected-access
  lengths = jnp.full((args.batch,), prompt, jnp.int32)
  impls = {"ours": None, "cudnn": "cudnn", "xla": "xla", "triton": "triton"}
  print(f"{jax.devices()[0].device_kind} jax {jax.__version__}: B{args.batch} prompt {prompt} "
        f"+{args.new} tokens, scan_layers={config.scan_layers}", flush=True)
  reference = None
  for variant in args.variants.split(","):
    for option in args.options.split(","):
      jit_args, static = generation._jit_arguments(  # pylint: disable=protected-access
          config, params, None, tokens, lengths, args.new, rng=None, temperature=0.0,
          greedy=True, top_k=None, use_top_p=False, top_p=None, eos_token_id=None,
          implementation=impls[variant], interpret=False, precision=None,
          fresh_cache=(prompt + args.new - 1, config.dtype))
      base = jit_args[:-1]  # all but the step limit
      t0 = time.perf_counter()
      try:
        lowered = generation._generate_jit.lower(  # pylint: disable=protected-access
            *jit_args, **static)
        compiled = lowered.compile(compiler_options=OPTIONS[option]) if OPTIONS[option] \
            else lowered.compile()
      except Exception as e:  # pylint: disable=broad-except
        print(f"{variant:6s} {option:12s} compile failed: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:300]}", flush=True)
        continue
      compile_s = time.perf_counter() - t0
      run = lambda n: compiled(*base, np.int32(n))[0]  # pylint: disable=cell-var-from-loop
      out = jax.block_until_ready(run(args.new))
      if reference is None:
        reference = out
      same = bool(jnp.array_equal(out, reference))
      t1 = e2e._wall_ms(lambda: run(1), 7)  # pylint: disable=protected-access
      tn = e2e._wall_ms(lambda: run(args.new), 7)  # pylint: disable=protected-access
      step_ms = (tn - t1) / (args.new - 1)
      line = (f"{variant:6s} {option:12s} compile {compile_s:5.1f} s  wall t(1) {t1:7.2f} ms  "
              f"t({args.new}) {tn:7.2f} ms  step {step_ms:6.3f} ms  "
              f"tok/s {args.batch / step_ms * 1e3:7.0f}  tokens==first {same}")
      if common.on_gpu():
        from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
        kernels_1 = profiler.measure(compiled, aggregate=False)(*base, np.int32(1))[1]
        kernels_n = profiler.measure(compiled, aggregate=False)(*base, np.int32(args.new))[1]
        sum_1 = sum(t for _, t in kernels_1)
        sum_n = sum(t for _, t in kernels_n)
        per_step = (len(kernels_n) - len(kernels_1)) / (args.new - 1)
        line += (f"\n{'':20s}kernels: t(1) {len(kernels_1)} ({sum_1:.2f} ms), t({args.new}) "
                 f"{len(kernels_n)} ({sum_n:.2f} ms): {per_step:.1f} kernels and "
                 f"{(sum_n - sum_1) / (args.new - 1):.3f} ms of kernel time per step")
        if option == "default":
          by_name = collections.defaultdict(lambda: [0, 0.0])
          for name, t in kernels_n:
            by_name[name][0] += 1
            by_name[name][1] += t
          top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
          line += "\n" + "\n".join(f"{'':24s}{t:8.3f} ms {n:6d}x {name[:90]}"
                                   for name, (n, t) in top)
      print(line, flush=True)


if __name__ == "__main__":
  main()
