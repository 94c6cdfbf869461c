"""The Mosaic GPU (``plgpu``) API the kernels use, imported once, and its interpreter.

Importing the package must work on every supported jax, also where Mosaic GPU or its
interpreter is missing pieces: then ``MISSING`` says what, and the backend refuses every call
with that reason (the next backend takes over).
"""
from __future__ import annotations

MISSING: str | None = None
try:
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError as e:  # pragma: no cover - every supported jax has it
  plgpu = None
  MISSING = f"jax.experimental.pallas.mosaic_gpu cannot be imported ({e})"

_REQUIRED = ("kernel", "SMEM", "ACC", "Barrier", "copy_gmem_to_smem", "copy_smem_to_gmem",
             "barrier_wait", "barrier_arrive", "wgmma", "set_max_registers", "commit_smem",
             "wait_smem_to_gmem", "layout_cast", "Layout", "TilingTransform",
             "SwizzleTransform", "CompilerParams")
if plgpu is not None:
  _absent = [name for name in _REQUIRED if not hasattr(plgpu, name)]
  if _absent:
    MISSING = f"this jax's Mosaic GPU lacks {', '.join(_absent)}"

try:  # public from jax 0.11; private (same class) in 0.10
  from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
except ImportError:
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError:  # pragma: no cover
    InterpretGPUParams = None


def interpret_params():
  """The ``interpret=`` value that runs a ``plgpu.kernel`` in Mosaic GPU's interpreter."""
  if InterpretGPUParams is None:
    raise ValueError("this jax has no Mosaic GPU interpreter (InterpretGPUParams); "
                     "interpret=True needs jax >= 0.10.2.")
  return InterpretGPUParams()

