"""The parity rule of design.md, shared by every kernel test."""
import jax.numpy as jnp
import numpy as np


def assert_parity(out, ref32, ref_d, *, factor=2.0, name="output"):
  """``max|o - r32| <= factor * max|r_d - r32| + 1e-5`` and mean error <= 1.5x that of ``r_d``.

  For float32 outputs: ``max|o - r32| / max|r32| <= 1e-5`` (CPU) instead.
  """
  o = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  r = np.asarray(jnp.asarray(ref32, jnp.float32), np.float64)
  assert o.shape == r.shape, (o.shape, r.shape)
  assert np.all(np.isfinite(o)), f"{name}: non-finite values in kernel output"
  err = np.abs(o - r)
  if jnp.asarray(out).dtype == jnp.float32:
    bound = 1e-5 * max(np.max(np.abs(r)), 1e-30) if r.size else 0
    assert err.max(initial=0) <= bound + 1e-7, (
        f"{name}: float32 max error {err.max():.3e} > 1e-5 relative (max|ref| {np.abs(r).max():.3e})")
    return
  d = np.asarray(jnp.asarray(ref_d, jnp.float32), np.float64)
  err_d = np.abs(d - r)
  bound = factor * err_d.max(initial=0) + 1e-5
  assert err.max(initial=0) <= bound, (
      f"{name}: max error {err.max():.3e} > {factor} * {err_d.max(initial=0):.3e} + 1e-5")
  if err.size:
    assert err.mean() <= 1.5 * err_d.mean() + 1e-6, (
        f"{name}: mean error {err.mean():.3e} > 1.5 * {err_d.mean():.3e}")
