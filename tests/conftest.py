import faulthandler
import sys
import warnings

import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*[Tt]riton.*")

import jax  # pylint: disable=g-import-not-at-top

# Synchronous CPU dispatch, set before the CPU client exists. Mosaic GPU's interpreter runs each
# warpgroup as a compiled program on its own Python thread and makes eager JAX calls from there;
# with asynchronous dispatch, eager ops the test thread enqueues while such a kernel is in flight
# can wait on the kernel while its threads wait behind them: a deadlock, seen in CI on 2 cores.
# Inline execution cannot interleave that way. (GPU runs are unaffected: the flag is CPU only.)
jax.config.update("jax_cpu_enable_async_dispatch", False)

from gqa_pallas import devices  # pylint: disable=g-import-not-at-top

HAS_GPU = devices.on_gpu()


def _cache_interpreter_thread_compiles():
  """Speed only: Mosaic GPU's interpreter compiles each warpgroup's program afresh for every
  grid point (a new ``jax.jit`` object per call, so JAX's cache never hits); compiling it once
  per program and argument shapes makes the kernel tests 3-4x faster. What runs is unchanged.
  Skipped where the private function is not there (other jax versions)."""
  try:
    from jax._src.pallas.mosaic.interpret import thread_map  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  if not hasattr(thread_map, "_run_jaxpr"):
    return
  import jax  # pylint: disable=g-import-not-at-top
  compiled = {}

  def run_jaxpr(jaxpr, consts, *args):
    key = (id(jaxpr), tuple((getattr(a, "shape", ()), str(getattr(a, "dtype", type(a))))
                            for a in (*consts, *args)))
    hit = compiled.get(key)
    if hit is None or hit[0] is not jaxpr:  # keep the jaxpr alive: its id stays unique
      run = lambda consts, *args: jax.core.eval_jaxpr(jaxpr, consts, *args)
      hit = compiled[key] = (jaxpr, jax.jit(run).trace(consts, *args).lower().compile())
    hit[1](consts, *args)

  thread_map._run_jaxpr = run_jaxpr  # pylint: disable=protected-access


_cache_interpreter_thread_compiles()


# A test that runs this long is hung (the slowest takes about a minute on 2 cores): dump every
# thread's stack and end the worker, so that CI reports which test crashed instead of timing out.
_HUNG_TEST_S = 900


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # pylint: disable=unused-argument
  faulthandler.dump_traceback_later(_HUNG_TEST_S, exit=True, file=sys.__stderr__)
  try:
    yield
  finally:
    faulthandler.cancel_dump_traceback_later()


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
