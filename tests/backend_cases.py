"""Which registered backends a parity case runs on, in each of the three tiers.

Tiers: ``"cpu"`` (a Pallas backend in its interpreter, the ``"xla"`` backend as it is), ``"cuda"``
(lowered for CUDA on this machine, planned for a GPU), ``"gpu"`` (compiled, on a GPU). A backend
joins a case when the registry says it can run it, so a new backend enters every suite by being
registered.
"""
import jax.numpy as jnp
import pytest

from gqa_pallas import devices, registry
from tests.conftest import HAS_GPU

PALLAS_BACKENDS = tuple(name for name in registry.names() if registry.get(name).is_pallas)
# The GPU the "cuda" tier plans for (its tuning tables, its split counts), and the one the GPU
# tier is listed for on a machine without a GPU (where those tests are skipped).
CUDA_TARGET = devices.H200


def implementing(op, pallas_only=True):
  """The registered backends that implement ``op``: the Pallas ones, and with ``pallas_only=False``
  the reference (``"xla"``) too. (``"cudnn"``, GPU-only and a comparison, has its own tests:
  tests/test_cudnn_backend.py.)"""
  return tuple(name for name in registry.implementing(op)
               if name in PALLAS_BACKENDS or (not pallas_only and name == "xla"))


def interpret_for(name, tier) -> bool:
  """The ``interpret=`` a backend is called with in a tier."""
  return tier == "cpu" and name in PALLAS_BACKENDS


def device_for(tier) -> devices.DeviceInfo:
  if tier == "cpu":
    return devices.CPU
  if tier == "gpu" and HAS_GPU:
    return devices.current()
  return CUDA_TARGET


def runs(name, op, dims, dtype, tier, causal=True) -> bool:
  """Whether backend ``name`` can run this ``op`` in ``tier`` (the registry's answer)."""
  backend = registry.get(name)
  problem = registry.Problem(op, dims, jnp.dtype(dtype).name, causal=causal,
                             interpret=interpret_for(name, tier), device=device_for(tier))
  return op in backend.ops and backend.unsupported(problem) is None


def params(op, cases, tier, dims_of, case_id, slow_cases=()):
  """``pytest.param(backend_name, case)`` for every (backend, case) pair that runs in ``tier``.

  ``dims_of(case) -> (AttentionDims, dtype, causal)``. The ``"cuda"`` and ``"gpu"`` tiers list
  the Pallas backends only (``"xla"`` is the reference those tests compare with); the ``"gpu"``
  tier is marked ``gpu``. In the ``"cpu"`` tier a backend with a slow interpreter runs
  ``slow_cases`` (a short list covering the same classes) instead of ``cases``.
  """
  names = registry.names() if tier == "cpu" else PALLAS_BACKENDS
  marks = [pytest.mark.gpu] if tier == "gpu" else []
  out = []
  for name in names:
    slow = tier == "cpu" and registry.get(name).slow_interpreter
    for case in (slow_cases if slow else cases):
      dims, dtype, causal = dims_of(case)
      if runs(name, op, dims, dtype, tier, causal):
        out.append(pytest.param(name, case, id=f"{name}-{case_id(case)}", marks=marks))
  return out


def first_dtype(name, op, dims, dtypes, tier="cpu"):
  """The first of ``dtypes`` that backend ``name`` runs ``op`` with (None if none)."""
  return next((d for d in dtypes if runs(name, op, dims, d, tier)), None)


def tuning_entries(op):
  """``pytest.param(backend, device kind, (head dim, dtype), config)`` for every tuning-table
  entry of ``op`` of every Pallas backend (each is lowered for CUDA in the op's suite)."""
  out = []
  for name in PALLAS_BACKENDS:
    for kind, table in registry.get(name).tuning_tables(op).items():
      for key, config in sorted(table.items()):
        out.append(pytest.param(name, kind, key, config, id=f"{name}-{kind}-{key[0]}-{key[1]}"))
  return out
