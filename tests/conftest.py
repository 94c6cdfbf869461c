import warnings

import jax
import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*[Tt]riton.*")


def _has_gpu() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config, items):
  if HAS_GPU:
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
