"""Command line: ``gqa-pallas`` / ``python -m flax_layers``.

Subcommands:
  demo       the main job on any machine: the Pallas kernels (interpret mode on CPU, compiled on a
             GPU) against the jnp reference on a small GQA case (prefill and decode), then a small
             random-weight Llama-style model generating with the jit loop, with tokens/s.
  generate   generation from a Hugging Face Llama / Qwen2 / Mistral checkpoint directory
             (``--checkpoint DIR``), or from a random-weight model built on the fly without one.
             Token ids in and out; text in and out when the directory has a ``tokenizer.json`` and
             the ``tokenizers`` package is installed.
  bench      ``bench {prefill,decode,backward,e2e,all,sharded}``: the benchmarks of a source checkout
             (``benchmarks/bench.py``): every implementation side by side, one JSON, plots.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

from gqa_pallas import IMPLEMENTATIONS, devices, registry, selfcheck


class UsageError(Exception):
  """A mistake in the command line (printed as one line, exit status 2)."""


_DEMO_MODEL = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4,
                   num_heads=8, num_kv_heads=2, head_dim=16, max_position_embeddings=1024)


def _resolve_backend(args):
  """(implementation, interpret) for the model: XLA on CPU unless --interpret, kernels on GPU."""
  impl = None if args.implementation == "auto" else args.implementation
  interpret = bool(args.interpret)
  if interpret and impl == "xla":
    raise UsageError("--interpret runs the Pallas kernels; it cannot be combined with "
                     "--implementation xla.")
  if impl is None:
    impl = registry.preference(devices.current(), interpret)[0]
  if impl != "xla" and not interpret and not devices.on_gpu():
    raise UsageError(f"--implementation {impl} needs a GPU; on CPU add --interpret to run the "
                     "kernels in interpret mode.")
  return impl, interpret


def _describe(impl, interpret) -> str:
  if impl == "xla":
    return "XLA attention (jit-compiled reference)"
  mode = "interpret mode" if interpret else "compiled"
  return f"Pallas kernels, implementation={impl!r} ({mode})"


# ---------------------------------------------------------------------------------------------
# generation helpers shared by demo and generate


def _random_model(seed: int, dtype: str):
  import jax  # pylint: disable=g-import-not-at-top
  from flax_layers.decoder import DecoderConfig, init_params  # pylint: disable=g-import-not-at-top
  config = DecoderConfig(**_DEMO_MODEL, dtype=dtype, param_dtype=dtype)
  return config, init_params(config, jax.random.PRNGKey(seed))


def _right_pad(rows, pad=0):
  t = max(len(r) for r in rows)
  tokens = np.full((len(rows), t), pad, np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  return tokens, np.array([len(r) for r in rows], np.int32)


def _run_generation(config, params, prompts, *, max_new_tokens, impl, interpret, rng_seed,
                    temperature, top_k, top_p, eos, warmup=True):
  """Generates; returns (tokens, num_generated, first_call_s, timed_s)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax_layers.generation import generate  # pylint: disable=g-import-not-at-top
  tokens, lengths = _right_pad(prompts)
  rng = jax.random.PRNGKey(rng_seed)
  kw = dict(rng=rng, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos,
            implementation=impl, interpret=interpret)
  print(f"compiling and running the first call ({len(prompts)} prompts, {max_new_tokens} new "
        "tokens each at most)...", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  out = jax.block_until_ready(generate(config, params, tokens, lengths, max_new_tokens, **kw))
  first = time.perf_counter() - t0
  timed = first
  if warmup:  # The same shapes again: no retrace, no compile; this is the steady-state speed.
    t0 = time.perf_counter()
    out = jax.block_until_ready(generate(config, params, tokens, lengths, max_new_tokens, **kw))
    timed = time.perf_counter() - t0
  new, num = (np.asarray(x) for x in out)
  return new, num, first, timed


def _report_speed(num, first, timed, warmup, file=None):
  total = int(num.sum())
  rate = total / timed if timed > 0 else float("inf")
  what = f"{total} new tokens in all ({len(num)} rows)"
  if warmup:
    print(f"{what} in {timed * 1e3:.1f} ms: {rate:,.1f} tokens/s (compiled; the first call, "
          f"with compilation, took {first:.2f} s)", file=file)
  else:
    print(f"{what} in {timed:.2f} s including compilation: {rate:,.1f} tokens/s", file=file)
  return rate


# ---------------------------------------------------------------------------------------------
# demo


def cmd_demo(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  gpu = devices.on_gpu()
  print(f"gqa-pallas demo on {jax.devices()[0].device_kind} (jax {jax.__version__})")
  print("\n== 1. attention kernels vs the jnp reference")
  ok = selfcheck.attention_check(interpret=not gpu, seed=args.seed)

  print("\n== 2. a random-weight Llama-style model, jit generation loop")
  impl, interpret = _resolve_backend(args)
  config, params = _random_model(args.seed, args.dtype)
  print(f"model: {config.num_layers} layers, hidden {config.hidden_size}, {config.num_heads} query "
        f"heads / {config.num_kv_heads} kv heads x {config.head_dim}, vocab {config.vocab_size}, "
        f"{config.dtype}; attention: {_describe(impl, interpret)}")
  rs = np.random.RandomState(args.seed)
  prompts = [list(rs.randint(0, config.vocab_size, size=n)) for n in (12, 5, 9, 16)]
  new, num, first, timed = _run_generation(
      config, params, prompts, max_new_tokens=args.max_new_tokens, impl=impl,
      interpret=interpret, rng_seed=args.seed, temperature=0.0, top_k=None, top_p=None, eos=None)
  for i, p in enumerate(prompts):
    print(f"  row {i}: prompt {len(p)} tokens -> {new[i, :num[i]].tolist()[:12]}...")
  _report_speed(num, first, timed, warmup=True)

  if impl == "xla" and not args.no_cross_check:
    # The same greedy generation through the kernels (interpret mode on CPU) must agree.
    k_new, k_num, _, _ = _run_generation(
        config, params, prompts, max_new_tokens=args.max_new_tokens,
        impl=registry.preference(devices.current(), not gpu)[0], interpret=not gpu,
        rng_seed=args.seed, temperature=0.0, top_k=None, top_p=None,
        eos=None, warmup=False)
    same = bool(np.array_equal(k_new, new) and np.array_equal(k_num, num))
    ok &= same
    print(f"the same generation through the Pallas kernels ({'interpret mode' if not gpu else 'GPU'}"
          f"): {'identical tokens' if same else 'DIFFERENT tokens'}")
  print("\ndemo", "passed" if ok else "FAILED")
  return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# generate


def _load_tokenizer(path):
  if path is None:
    return None
  tok_file = os.path.join(path, "tokenizer.json")
  if not os.path.exists(tok_file):
    return None
  try:
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  except ImportError:
    warnings.warn(f"{tok_file} exists but the 'tokenizers' package is not installed; token ids "
                  "only (pip install tokenizers for text).")
    return None
  return Tokenizer.from_file(tok_file)


def _parse_ids(text):
  try:
    return [int(x) for x in text.replace(",", " ").split()]
  except ValueError as e:
    raise UsageError(f"--prompt-ids takes integers separated by spaces or commas; got {text!r}.") \
        from e


def cmd_generate(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  impl, interpret = _resolve_backend(args)
  tokenizer = None
  eos = None
  if args.checkpoint:
    from flax_layers.checkpoint import generation_defaults, load_hf_checkpoint  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    config, params = load_hf_checkpoint(args.checkpoint, dtype=args.dtype,
                                        param_dtype=args.dtype)
    print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.2f} s: {config}",
          file=sys.stderr)
    tokenizer = _load_tokenizer(args.checkpoint)
    eos = generation_defaults(args.checkpoint).get("eos_token_id")
  else:
    config, params = _random_model(args.seed, args.dtype or "float32")
    print(f"no --checkpoint: a random-weight model built on the fly: {config}", file=sys.stderr)
  if args.eos_id is not None:
    eos = args.eos_id
  if args.ignore_eos:
    eos = None

  if args.prompt:
    if tokenizer is None:
      raise UsageError("--prompt needs a checkpoint directory with tokenizer.json and the "
                       "'tokenizers' package; pass token ids with --prompt-ids instead.")
    prompts = [tokenizer.encode(p).ids for p in args.prompt]
  elif args.prompt_ids:
    prompts = [_parse_ids(p) for p in args.prompt_ids]
  else:
    rs = np.random.RandomState(args.seed)
    prompts = [list(rs.randint(0, config.vocab_size, size=rs.randint(4, 17)))
               for _ in range(args.batch)]
    print(f"no prompt given: {len(prompts)} random prompts", file=sys.stderr)
  if any(len(p) == 0 for p in prompts):
    raise UsageError("every prompt needs at least one token.")

  print(f"attention: {_describe(impl, interpret)} on {jax.devices()[0].device_kind}",
        file=sys.stderr)
  new, num, first, timed = _run_generation(
      config, params, prompts, max_new_tokens=args.max_new_tokens, impl=impl,
      interpret=interpret, rng_seed=args.seed, temperature=args.temperature, top_k=args.top_k,
      top_p=args.top_p, eos=eos, warmup=not args.no_warmup)
  results = []
  for i, p in enumerate(prompts):
    ids = new[i, :num[i]].tolist()
    row = {"prompt_ids": [int(x) for x in p], "new_ids": ids}
    if tokenizer is not None:
      row["text"] = tokenizer.decode(ids, skip_special_tokens=True)
    results.append(row)
  if args.json:
    print(json.dumps(results))
  else:
    for i, row in enumerate(results):
      print(f"[{i}] prompt ids: {' '.join(map(str, row['prompt_ids']))}")
      if args.prompt:
        print(f"[{i}] prompt: {args.prompt[i]}")
      print(f"[{i}] new ids: {' '.join(map(str, row['new_ids']))}")
      if "text" in row:
        print(f"[{i}] text: {row['text']}")
  # With --json, stdout holds the JSON alone (it parses); the speed goes to stderr.
  _report_speed(num, first, timed, warmup=not args.no_warmup,
                file=sys.stderr if args.json else None)
  return 0


# ---------------------------------------------------------------------------------------------


def _bench_module():
  """``benchmarks.bench`` of the source checkout this package runs from (it is not installed:
  it writes into the checkout's ``benchmarks/results``)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.exists(os.path.join(root, "benchmarks", "bench.py")):
    raise UsageError("gqa-pallas bench runs from a source checkout: git clone the repository, "
                     "pip install -e '.[bench]' there, and run it again.")
  if root not in sys.path:
    sys.path.insert(0, root)
  from benchmarks import bench  # pylint: disable=g-import-not-at-top
  return bench


def cmd_bench(args):
  return _bench_module().main_with_args(args)


def _backend_args(p):
  p.add_argument("--implementation", choices=("auto",) + IMPLEMENTATIONS, default="auto",
                 help="attention backend of the model: auto = the Pallas kernels on a GPU, XLA "
                 "on CPU")
  p.add_argument("--interpret", action="store_true",
                 help="run the model's attention through the Pallas kernels in interpret mode "
                 "(CPU; slow but exercises the kernel code)")
  p.add_argument("--seed", type=int, default=0, help="seed of the random model, prompts and "
                 "sampling")


class _HelpWithDefaults(argparse.HelpFormatter):
  """Shows each option's default after its help, unless it has none to show."""

  def _get_help_string(self, action):
    text = action.help or ""
    if ("(default" in text or action.default is None or action.default is False
        or action.default == argparse.SUPPRESS):
      return text
    return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="gqa-pallas",
      description="Grouped-query attention Pallas kernels: a demo of the kernels and of a small "
      "model, and generation from Hugging Face Llama / Qwen2 / Mistral checkpoints.")
  sub = parser.add_subparsers(dest="command")

  fmt = dict(formatter_class=_HelpWithDefaults)
  d = sub.add_parser("demo", help="kernels vs reference, then a small model generating", **fmt)
  _backend_args(d)
  d.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per row")
  d.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="the model's compute and parameter dtype")
  d.add_argument("--no-cross-check", action="store_true",
                 help="skip re-running the generation through the kernels")
  d.set_defaults(func=cmd_demo)

  g = sub.add_parser("generate", help="generate from a HF checkpoint (or a random model)", **fmt)
  g.add_argument("--checkpoint", metavar="DIR",
                 help="HF Llama/Qwen2/Mistral directory (config.json + safetensors); without it "
                 "a small random-weight model is built")
  g.add_argument("--prompt", action="append", help="prompt text (needs tokenizer.json); repeat "
                 "for a batch")
  g.add_argument("--prompt-ids", action="append", metavar="IDS",
                 help="prompt token ids, e.g. '1 15043 29892'; repeat for a batch")
  g.add_argument("--batch", type=int, default=4, help="random prompts when none is given")
  g.add_argument("--max-new-tokens", type=int, default=32,
                 help="tokens generated per row, at most (a row stops at its eos)")
  g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  g.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
  g.add_argument("--top-p", type=float, default=None,
                 help="sample from the smallest set of tokens holding probability p")
  g.add_argument("--eos-id", type=int, default=None,
                 help="stop token (default: the checkpoint's eos_token_id)")
  g.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
  g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                 help="compute/parameter dtype (default: the checkpoint's)")
  g.add_argument("--no-warmup", action="store_true",
                 help="time one call, compilation included (default: time a second call)")
  g.add_argument("--json", action="store_true", help="print the results as JSON")
  _backend_args(g)
  g.set_defaults(func=cmd_generate)

  b = sub.add_parser("bench", help="benchmarks: ceilings, then every implementation side by side "
                     "(a source checkout)", **fmt)
  try:
    _bench_module().add_arguments(b)
  except UsageError as e:
    b.add_argument("part", help=str(e))
  b.set_defaults(func=cmd_bench)
  return parser


def main(argv=None) -> int:
  warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*[Tt]riton.*")
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 2
  try:
    return args.func(args)
  except (UsageError, ValueError, TypeError, OSError) as e:
    # What the user gave is wrong (a flag, a file, a checkpoint field): the package's message
    # names it, on one line, without a traceback.
    print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
