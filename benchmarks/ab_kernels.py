"""A/B timing of kernel code against an earlier version of it, in one process (a tuning aid).

Ratios between runs drift; within one process they do not. This swaps in earlier sources of
package modules (``--old``), then times ``gqa_attention`` (forward, or forward+backward with
``--grad``) with each version in turn, old / new / old again, so the spread of the two old runs
bounds the noise:

    git show 3e3809c:gqa_pallas/mosaic/prefill.py > old_prefill.py     # before the GPU call
    PYTHONPATH=$PWD python3 -m benchmarks.ab_kernels --implementation mosaic \\
        --old gqa_pallas.mosaic.prefill=old_prefill.py --shapes "8,2048,32,8,128;2,8192,32,8,128"

Shapes are ``B,S,N,K,H`` (square causal, bf16); ``--window W`` adds a sliding window. The old
module replaces the new one wherever a ``gqa_pallas`` module refers to it (a backend's
``prefill_kernel``, say), so it must keep the entry points the callers use. ``--smoke`` runs
tiny shapes in interpret mode on a CPU (it checks the plumbing, it times nothing). Committed
numbers come from ``benchmarks.run``.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import sys

import jax
import jax.numpy as jnp

from benchmarks import common

common.quiet()

import gqa_pallas as gp  # pylint: disable=g-import-not-at-top


def load_old(name: str, path: str):
  """The source at ``path`` as a module standing in for ``name``."""
  spec = importlib.util.spec_from_file_location(f"{name}__old", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up here
  spec.loader.exec_module(module)
  return module


def swap(new, replacement) -> int:
  """Points every ``gqa_pallas`` module attribute that is ``new`` at ``replacement``; returns
  how many there were."""
  count = 0
  for mod_name, module in list(sys.modules.items()):
    if not mod_name.startswith("gqa_pallas") or module is None:
      continue
    for attr, value in list(vars(module).items()):
      if value is new:
        setattr(module, attr, replacement)
        count += 1
  return count


def tflops(b, s, n, kh, h, *, implementation, window, grad, smoke, iterations):
  keys = jax.random.split(jax.random.key(0), 3)
  dtype = jnp.bfloat16
  q = jax.random.normal(keys[0], (b, s, n, h), dtype)
  k = jax.random.normal(keys[1], (b, s, kh, h), dtype)
  v = jax.random.normal(keys[2], (b, s, kh, h), dtype)
  fwd = functools.partial(gp.gqa_attention, implementation=implementation,
                          sliding_window=window, interpret=smoke)
  f = fwd
  if grad:
    f = jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
  f = jax.jit(f)
  if smoke:
    jax.block_until_ready(f(q, k, v))
    return 0.0
  ms = common.measure_ms(f, q, k, v, iterations=iterations)
  seen = sum(min(i + 1, window or s) for i in range(s))
  return 4 * b * n * h * seen * (3.5 if grad else 1.0) / ms / 1e9


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--old", action="append", required=True, metavar="MODULE=FILE",
                 help="an earlier source of a package module; repeat for several")
  p.add_argument("--implementation", default=None)
  p.add_argument("--shapes", default="8,2048,32,8,128;2,8192,32,8,128")
  p.add_argument("--window", type=int, default=None)
  p.add_argument("--grad", action="store_true", help="time forward+backward (3.5x the FLOPs)")
  p.add_argument("--iterations", type=int, default=20)
  p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode, no timing")
  args = p.parse_args(argv)
  pairs = []
  for item in args.old:
    name, _, path = item.partition("=")
    pairs.append((sys.modules[name] if name in sys.modules else importlib.import_module(name),
                  load_old(name, path)))
  shapes = ([(1, 64, 4, 2, 64)] if args.smoke else
            [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")])
  kw = dict(implementation=args.implementation, window=args.window, grad=args.grad,
            smoke=args.smoke, iterations=args.iterations)
  print(f"{jax.devices()[0].device_kind} jax {jax.__version__}; TFLOP/s of the visible work"
        f"{' (forward+backward)' if args.grad else ''}")
  for shape in shapes:
    results = []
    for label, use_old in (("old", True), ("new", False), ("old", True)):
      for new, old in pairs:
        swap(old, new)  # back to the current code, then (for "old") the earlier one
        if use_old and not swap(new, old):
          raise SystemExit(f"no gqa_pallas module refers to {new.__name__}: nothing to swap")
      jax.clear_caches()  # the jitted entry points must trace the swapped code
      results.append(f"{label} {tflops(*shape, **kw):.0f}")
    for new, old in pairs:
      swap(old, new)
    print(f"B{shape[0]} S{shape[1]} {shape[2]}:{shape[3]} H{shape[4]}: " + "  ".join(results),
          flush=True)


if __name__ == "__main__":
  main()
