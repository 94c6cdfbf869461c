"""The parity rule of design.md, shared by every kernel test."""
import jax.numpy as jnp
import numpy as np


F32_EPS = float(np.finfo(np.float32).eps)


def float32_bound(max_logit: float = 0.) -> float:
  """The float32 rule's relative bound: ``1e-5 + 0.5 * eps32 * max|logit|``. A logit carries a
  rounding error of ``eps32 * |logit|``, which ``exp`` turns into a relative error of the
  weights: at ``|logit|`` of several hundred the float32 reference itself misses a fixed 1e-5
  (measured: 0.04-0.08 ``eps32 * max|logit|`` against float64, kernels and reference alike)."""
  return 1e-5 + 0.5 * F32_EPS * max_logit


def max_logit(q, k, scale=None):
  """``max |scale * q . k|`` over every (query head, key) pair, NaN-free: the float32 rule's
  logit magnitude."""
  import jax  # pylint: disable=g-import-not-at-top
  h = q.shape[-1]
  g = q.shape[2] // max(k.shape[2], 1)
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  kk = jnp.where(jnp.isfinite(k), k, 0).astype(jnp.float32)
  qq = jnp.where(jnp.isfinite(q), q, 0).astype(jnp.float32)
  s = jnp.einsum("btkgh,bskh->bkgts", qq.reshape(q.shape[:2] + (k.shape[2], g, h)), kk,
                 precision=jax.lax.Precision.HIGHEST)
  return float(jnp.max(jnp.abs(s), initial=0.)) * abs(scale)


def assert_parity(out, ref32, ref_d, *, factor=2.0, name="output", max_logit=0.):
  """``max|o - r32| <= factor * max|r_d - r32| + 1e-5`` and mean error <= 1.5x that of ``r_d``.

  For float32 outputs: ``max|o - r32| / max|r32| <= float32_bound(max_logit)`` (CPU) instead.
  """
  o = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  r = np.asarray(jnp.asarray(ref32, jnp.float32), np.float64)
  assert o.shape == r.shape, (o.shape, r.shape)
  assert np.all(np.isfinite(o)), f"{name}: non-finite values in kernel output"
  err = np.abs(o - r)
  if jnp.asarray(out).dtype == jnp.float32:
    rel = float32_bound(max_logit)
    bound = rel * max(np.max(np.abs(r)), 1e-30) if r.size else 0
    assert err.max(initial=0) <= bound + 1e-7, (
        f"{name}: float32 max error {err.max():.3e} > {rel:.2e} relative "
        f"(max|ref| {np.abs(r).max():.3e}, max|logit| {max_logit:.3g})")
    return
  d = np.asarray(jnp.asarray(ref_d, jnp.float32), np.float64)
  err_d = np.abs(d - r)
  bound = factor * err_d.max(initial=0) + 1e-5
  assert err.max(initial=0) <= bound, (
      f"{name}: max error {err.max():.3e} > {factor} * {err_d.max(initial=0):.3e} + 1e-5")
  if err.size:
    assert err.mean() <= 1.5 * err_d.mean() + 1e-6, (
        f"{name}: mean error {err.mean():.3e} > 1.5 * {err_d.mean():.3e}")


def random_qkv(seed, b, t, s, n, k, h, dtype, kv_lengths=None, poison=True):
  """Fresh random q ``[B,T,N,H]``, k/v ``[B,S,K,H]``; slots past ``kv_lengths`` hold NaN."""
  import jax  # pylint: disable=g-import-not-at-top
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32).astype(dtype)
  kk = jax.random.normal(ks[1], (b, s, k, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, k, h), jnp.float32).astype(dtype)
  if poison and kv_lengths is not None:
    valid = (jnp.arange(s)[None, :] < jnp.asarray(kv_lengths)[:, None])[:, :, None, None]
    kk = jnp.where(valid, kk, jnp.nan)
    v = jnp.where(valid, v, jnp.nan)
  return q, kk, v


def check_against_reference(out, lse, q, k, v, *, factor, **kwargs):
  """Design rule against the float32 reference and the in-dtype reference; lse too."""
  import jax  # pylint: disable=g-import-not-at-top
  from gqa_pallas import attention_reference  # pylint: disable=g-import-not-at-top
  # The kernel's result first: Mosaic GPU's interpreter makes eager JAX calls from its callback
  # threads, which deadlock behind eager ops dispatched while its computation is in flight.
  jax.block_until_ready((out, lse))
  r32, lse32 = attention_reference(q, k, v, return_lse=True, **kwargs)
  r_d = attention_reference(q, k, v, compute_dtype=q.dtype, **kwargs) if q.dtype != jnp.float32 \
      else r32
  assert out.dtype == q.dtype and out.shape == q.shape
  logit = max_logit(q, k, kwargs.get("scale")) if q.dtype == jnp.float32 else 0.
  assert_parity(out, r32, r_d, factor=factor, max_logit=logit)
  if lse is not None:
    lse, lse32 = np.asarray(lse), np.asarray(lse32)
    assert lse.shape == lse32.shape and lse.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse32))
    finite = np.isfinite(lse32)
    assert np.all(np.isfinite(lse[finite]))
    np.testing.assert_allclose(lse[finite], lse32[finite], rtol=1e-5, atol=2e-5)
  # Rows that see no key are exactly 0.
  empty = np.isneginf(np.asarray(lse32))
  o = np.asarray(jnp.asarray(out, jnp.float32))
  assert np.all(o[empty] == 0)


def lower_for_cuda(f, *args):
  """Lowers ``f`` for CUDA on this machine (catches what the interpreter accepts but the real
  lowering rejects). jax 0.10 does this without a GPU; jax >= 0.11 needs one for Triton."""
  import jax  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  try:
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  except RuntimeError as e:
    if "No supported GPU devices" in str(e):
      pytest.skip("this jax lowers Triton kernels for CUDA only with a GPU present")
    raise
