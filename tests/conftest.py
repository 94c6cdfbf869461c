import warnings

import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*[Tt]riton.*")

from gqa_pallas import devices  # pylint: disable=g-import-not-at-top

HAS_GPU = devices.on_gpu()


def pytest_collection_modifyitems(config, items):
  if HAS_GPU:
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny():
  """A tiny random-weight decoder: ``(config, params)`` (tests/decoder_fixtures.py)."""
  from tests.decoder_fixtures import TINY, random_params  # pylint: disable=g-import-not-at-top
  return TINY, random_params(TINY)
