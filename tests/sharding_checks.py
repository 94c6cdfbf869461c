"""Sharding checks on simulated CPU devices; ``tests/test_sharding.py`` runs this module in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set
before JAX starts). With ``--gpu`` it runs the same checks with the compiled kernels on the
machine's GPUs (two or more: ``(data=2, model=1)`` and ``(data=1, model=2)`` meshes). Each check
raises on failure; the last line printed is ``ok``."""
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gqa_pallas as gp
from flax_layers import decoder, generation, partitioning
from gqa_pallas import sharding
from tests import numerics

BF16, F32 = jnp.bfloat16, jnp.float32


def _cache(devices, s, lengths, dtype, seed, n=8, k=2, h=32, t=1):
  b = len(lengths)
  lengths = jnp.asarray(lengths, jnp.int32)
  q, kk, v = numerics.random_qkv(seed, b, t, s, n, k, h, dtype, kv_lengths=lengths)  # NaN past
  mesh = Mesh(np.array(jax.devices()[:devices]), ("seq",))
  seq = NamedSharding(mesh, P(None, "seq"))
  cache = gp.KVCache(jax.device_put(kk, seq), jax.device_put(v, seq), lengths)
  return mesh, q, cache, gp.KVCache(kk, v, lengths)


def check_sequence_parallel(implementation, interpret, dtype, devices, t=1, window=None,
                            offset=None):
  s = 16 * devices
  # Full; ending inside the second slice; empty; inside the first slice only.
  lengths = [s, 16 + 5, 0, 3]
  mesh, q, cache, whole = _cache(devices, s, lengths, dtype, seed=devices + t, t=t)
  kw = dict(implementation=implementation, interpret=interpret, sliding_window=window,
            q_offset=offset)
  run = jax.jit(functools.partial(sharding.sequence_parallel_decode, mesh=mesh, axis_name="seq",
                                  return_lse=True, **kw))
  out, lse = run(q, cache)
  ref_kw = dict(q_offset=offset, sliding_window=window, return_lse=True)
  up = lambda x: x.astype(F32)
  ref32, lse32 = gp.gqa_decode(up(q), gp.KVCache(up(whole.k), up(whole.v), whole.lengths),
                               implementation="xla", **ref_kw)
  ref_d, _ = gp.gqa_decode(q, whole, implementation="xla", **ref_kw)
  numerics.assert_parity(out, ref32, ref_d, factor=2.0)
  finite = np.isfinite(np.asarray(lse32))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(lse32)[finite], atol=1e-4)
  assert np.all(np.asarray(out[2], F32) == 0), "an empty row must be 0"
  # The cache never moves: the program holds no all-gather, only the partials' all-reduce.
  hlo = run.lower(q, cache).compile().as_text()
  assert "all-gather" not in hlo, "the sharded cache was gathered"
  assert "all-reduce" in hlo


def check_refusals():
  mesh = Mesh(np.array(jax.devices()[:3]), ("seq",))
  _, q, _, whole = _cache(1, 16, [16, 4], F32, seed=0)
  for call, words in (
      (lambda: sharding.sequence_parallel_decode(q, whole, mesh=mesh, axis_name="seq"),
       "divide evenly"),
      (lambda: sharding.sequence_parallel_decode(q, whole, mesh=mesh, axis_name="x"),
       "not an axis")):
    try:
      call()
    except ValueError as e:
      assert words in str(e), e
    else:
      raise AssertionError(f"no error for {words}")


def _mesh(data=2, model=4):
  return Mesh(np.array(jax.devices()[:data * model]).reshape(data, model), ("data", "model"))


def _no_gather(fn, *args):
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  assert "all-gather" not in hlo, "an operand was gathered"


def check_batch_and_heads(implementation, interpret, mesh=None, tol=2e-5):
  """q/k/v (and the per-row vectors) sharded over batch and kv heads: each device runs its
  shard (no all-gather), the result is the unsharded one; gradients, decode and the append
  too."""
  mesh = mesh or _mesh()
  b, t, n, k, h = 4, 24, 8, 4, 32
  lengths = jnp.array([24, 9, 0, 17], jnp.int32)
  q, kk, v = numerics.random_qkv(5, b, t, t, n, k, h, F32, kv_lengths=lengths)
  heads = NamedSharding(mesh, P("data", None, "model", None))
  rows = NamedSharding(mesh, P("data"))
  qs, ks, vs = (jax.device_put(x, heads) for x in (q, kk, v))
  ls = jax.device_put(lengths, rows)
  kw = dict(implementation=implementation, interpret=interpret)
  attend = lambda q, k, v, l: gp.gqa_attention(q, k, v, q_offset=jnp.zeros_like(l),
                                               kv_lengths=l, **kw)
  out = jax.jit(attend)(qs, ks, vs, ls)
  ref = gp.attention_reference(q, kk, v, q_offset=jnp.zeros((b,), jnp.int32), kv_lengths=lengths)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol, rtol=tol)
  assert out.sharding.is_equivalent_to(heads, out.ndim), out.sharding
  _no_gather(attend, qs, ks, vs, ls)

  d_out = numerics.random_qkv(6, b, t, t, n, k, h, F32)[0]
  loss = lambda f: (lambda q, k, v, l: jnp.sum(f(q, k, v, l) * d_out))
  grads = jax.jit(jax.grad(loss(attend), argnums=(0, 1, 2)))(qs, ks, vs, ls)
  ref_attend = lambda q, k, v, l: gp.attention_reference(q, k, v, q_offset=jnp.zeros_like(l),
                                                         kv_lengths=l)
  clean = [jnp.where(jnp.isfinite(x), x, 0) for x in (q, kk, v)]
  ref_grads = jax.grad(loss(ref_attend), argnums=(0, 1, 2))(*clean, lengths)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2.5 * tol, rtol=2.5 * tol)
  _no_gather(jax.grad(loss(attend), argnums=(0, 1, 2)), qs, ks, vs, ls)

  # Decode over a cache sharded the same way, and the append that fills it.
  cache = gp.KVCache(ks, vs, ls)
  q1 = jax.device_put(q[:, :1], heads)
  dec = lambda q, c: gp.gqa_decode(q, c, **kw)
  out = jax.jit(dec)(q1, cache)
  ref = gp.gqa_decode(q[:, :1], gp.KVCache(kk, v, lengths), implementation="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol, rtol=tol)
  _no_gather(dec, q1, cache)
  empty = gp.KVCache.init(b, 32, k, h, F32)
  empty = jax.tree_util.tree_map(
      lambda x: jax.device_put(x, heads if x.ndim == 4 else rows), empty)
  add = lambda c, kn, vn: c.append(kn, vn, jnp.array([24, 9, 0, 17]), **kw)
  filled = jax.jit(add)(empty, ks, vs)
  want = gp.KVCache.init(b, 32, k, h, F32).append(kk, v, lengths, implementation="xla")
  np.testing.assert_array_equal(np.asarray(filled.lengths), np.asarray(want.lengths))
  np.testing.assert_array_equal(np.asarray(filled.k), np.asarray(want.k))
  _no_gather(add, empty, ks, vs)

  # Inside the caller's own shard_map the kernel sees the local shards.
  local = jax.shard_map(attend, mesh=mesh, in_specs=(P("data", None, "model"),) * 3 + (P("data"),),
                        out_specs=P("data", None, "model"), check_vma=False)
  out = jax.jit(local)(qs, ks, vs, ls)
  np.testing.assert_allclose(np.asarray(out), np.asarray(attend(q, kk, v, lengths)), atol=tol,
                             rtol=tol)


def _gathered_elements(hlo):
  """The element count of every all-gather result in a compiled program's text."""
  sizes = []
  for shape in re.findall(r"= \(?[a-z0-9]+\[([0-9,]*)\][^=]*? all-gather\(", hlo):
    sizes.append(int(np.prod([int(d) for d in shape.split(",") if d])))
  return sizes


def _sharded_as(x, mesh, spec):
  """Whether ``x`` is laid out as ``spec`` on ``mesh`` (an axis of size 1 counts as whole)."""
  return x.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), x.ndim)


def check_generate_on_mesh(scan_layers=False, mesh=None, implementation="triton",
                           interpret=True):
  """``generate`` on a (data=2, model=4) mesh (or ``mesh``) with sharded parameters and cache
  gives the one-device tokens (greedy and sampled, a fresh and a caller-owned cache) with one
  trace, and its program gathers nothing bigger than the per-shard argmax of the vocab-split
  logits."""
  mesh = mesh or _mesh()
  cfg = decoder.DecoderConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                              num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16,
                              attention_bias=True, scan_layers=scan_layers)
  params = decoder.init_params(cfg, jax.random.PRNGKey(3))
  placed = partitioning.shard_params(params, mesh)
  lead = (None,) if scan_layers else ()
  query = (placed["layers"] if scan_layers else placed["layers_0"])["attn"]["query"]["kernel"]
  assert _sharded_as(query, mesh, lead + (None, "model", None)), query.sharding
  rows = lambda x: jax.device_put(x, partitioning.batch_sharding(x.shape, mesh))
  rs = np.random.RandomState(7)
  prompts = [jnp.asarray(rs.randint(0, 256, (4, 9)), jnp.int32) for _ in range(2)]
  lengths = jnp.array([9, 3, 7, 1], jnp.int32)
  kw = dict(implementation=implementation, interpret=interpret)
  sample = dict(rng=jax.random.PRNGKey(11), temperature=0.8, top_k=40)
  for opts in ({}, sample):
    for i, prompt in enumerate(prompts):
      want, want_num = generation.generate(cfg, params, prompt, lengths, 6, **opts, **kw)
      before = generation.trace_count()
      got, num = generation.generate(cfg, placed, rows(prompt), rows(lengths), 6, mesh=mesh,
                                     **opts, **kw)
      traced = generation.trace_count() - before
      # The first prompt traces the mesh program once (never more); the second reuses it.
      assert traced == (1 if i == 0 else 0), f"prompt {i} traced generate {traced} times"
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      np.testing.assert_array_equal(np.asarray(num), np.asarray(want_num))
  # A caller-owned cache, placed by the helper, keeps its sharding through the loop.
  cache = partitioning.shard_cache(decoder.init_cache(cfg, 4, 16), mesh)
  got, _, cache = generation.generate_with_cache(cfg, placed, cache, rows(prompts[0]),
                                                 rows(lengths), 6, mesh=mesh, **kw)
  np.testing.assert_array_equal(
      np.asarray(got), np.asarray(generation.generate(cfg, params, prompts[0], lengths, 6, **kw)[0]))
  k = cache.k if scan_layers else cache[1].k
  assert _sharded_as(k, mesh, lead + ("data", None, "model", None)), k.sharding
  args, static = generation._jit_arguments(  # pylint: disable=protected-access
      cfg, placed, None, rows(prompts[0]), rows(lengths), 6, rng=None, temperature=0.0,
      greedy=True, top_k=None, use_top_p=False, top_p=None, eos_token_id=None, precision=None,
      fresh_cache=(14, "float32"), mesh=mesh, **kw)
  hlo = generation._generate_jit.lower(*args, **static).compile().as_text()  # pylint: disable=protected-access
  gathered = _gathered_elements(hlo)
  assert "all-gather" not in hlo or gathered, "all-gathers present but not parsed"
  assert all(n <= 4 * mesh.size for n in gathered), f"generate gathered arrays of {gathered}"


def main_gpu():
  """The checks with the compiled kernels (``implementation=None``) on two GPUs; XLA's float32
  matmuls at full precision (our float32 kernels use it; TF32 would blur the comparisons)."""
  assert jax.devices()[0].platform == "gpu" and len(jax.devices()) >= 2, "needs 2 or more GPUs"
  with jax.default_matmul_precision("highest"):
    check_sequence_parallel(None, False, BF16, 2)
    check_sequence_parallel(None, False, BF16, 2, t=3, window=9)
    check_sequence_parallel(None, False, F32, 2, t=2, offset=jnp.array([40, 10, 0, 1]))
    for data, model in ((2, 1), (1, 2)):
      check_batch_and_heads(None, False, _mesh(data, model), tol=1e-4)
      check_generate_on_mesh(mesh=_mesh(data, model), implementation=None, interpret=False)
  print("ok")


def main():
  if "--gpu" in sys.argv[1:]:
    return main_gpu()
  assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  check_refusals()
  for devices in (2, 8):
    check_sequence_parallel("xla", False, F32, devices)
  check_sequence_parallel("xla", False, F32, 4, t=3)
  check_sequence_parallel("xla", False, F32, 4, t=2, offset=jnp.array([40, 10, 0, 1]))
  check_sequence_parallel("xla", False, F32, 4, window=20)
  check_sequence_parallel("triton", True, BF16, 4)
  check_sequence_parallel("triton", True, F32, 4, t=3, window=9)
  check_batch_and_heads("triton", True)
  check_generate_on_mesh()
  check_generate_on_mesh(scan_layers=True)
  print("ok")


if __name__ == "__main__":
  sys.exit(main())
