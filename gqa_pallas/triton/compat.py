"""The few Pallas-Triton APIs the kernels use, imported once for jax 0.10 through 0.12.

The Triton lowering is deprecated from jax 0.11 (it still ships, complete, through 0.12); its
DeprecationWarning is silenced here so importing the package stays quiet.
"""
import warnings

with warnings.catch_warnings():
  warnings.simplefilter("ignore", DeprecationWarning)
  from jax.experimental.pallas import triton as _plt
  # jax 0.11 imports the Pallas fuser lazily, inside the first interpret-mode pallas_call, and
  # the import registers a trace-context flag: a user's jit step traced before it would
  # retrace once on its second call. Importing it with the package keeps one trace.
  from jax.experimental.pallas import fuser as _fuser
  del _fuser

load = _plt.load
store = _plt.store
dot = _plt.dot


def compiler_params(num_warps: int, num_stages: int):
  """Triton compiler params; without them a GPU ``pallas_call`` lowers to Mosaic GPU."""
  return _plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
