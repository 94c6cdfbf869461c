"""Quick GPU parity check of both kernels over a few shapes (prints max errors)."""
import jax, jax.numpy as jnp
from benchmarks import common
common.quiet()
import gqa_pallas as gp

def case(B, T, S, N, K, H, dtype, kvl=None, decode=False):
  ks = jax.random.split(jax.random.key(B + T + S + N), 3)
  q = common.rand(ks[0], (B, T, N, H), dtype)
  k, v = common.rand(ks[1], (B, S, K, H), dtype), common.rand(ks[2], (B, S, K, H), dtype)
  kvl = jnp.full((B,), S, jnp.int32) if kvl is None else jnp.asarray(kvl, jnp.int32)
  valid = (jnp.arange(S)[None, :] < kvl[:, None])[:, :, None, None]
  k = jnp.where(valid, k, jnp.nan); v = jnp.where(valid, v, jnp.nan)
  if decode:
    c = gp.KVCache(k=k, v=v, lengths=kvl, overflowed=jnp.zeros((B,), bool))
    o, l = gp.gqa_decode(q, c, implementation="triton", return_lse=True)
  else:
    o, l = gp.gqa_attention(q, k, v, kv_lengths=kvl, implementation="triton", return_lse=True)
  r32, rl = gp.attention_reference(q, k, v, kv_lengths=kvl, return_lse=True)
  rd = gp.attention_reference(q, k, v, kv_lengths=kvl, compute_dtype=dtype) if dtype != jnp.float32 else r32
  e = float(jnp.max(jnp.abs(o.astype(jnp.float32) - r32.astype(jnp.float32))))
  ed = float(jnp.max(jnp.abs(rd.astype(jnp.float32) - r32.astype(jnp.float32))))
  le = float(jnp.max(jnp.where(jnp.isinf(rl), 0, jnp.abs(l - rl))))
  ok = bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isinf(l) == jnp.isinf(rl)))
  print(f"{'decode' if decode else 'prefill'} B{B} T{T} S{S} {N}:{K} H{H} {jnp.dtype(dtype).name}: err {e:.2e} (ref_d {ed:.2e}) lse {le:.2e} finite/inf-match {ok}", flush=True)

for dt in (jnp.bfloat16, jnp.float16, jnp.float32):
  case(2, 1000, 1000, 32, 8, 128, dt, kvl=[1000, 517])
  case(2, 77, 3000, 14, 2, 64, dt, kvl=[0, 2999])
  case(1, 300, 200, 8, 1, 128, dt)
  case(3, 1, 5000, 32, 8, 128, dt, kvl=[0, 1, 4097], decode=True)
  case(2, 4, 9000, 28, 4, 64, dt, kvl=[9000, 333], decode=True)
  case(2, 16, 700, 7, 1, 128, dt, decode=True)
