"""The Mosaic GPU backend's own rules: what it takes and refuses, its row packing, its config and
tuning entries. (Parity, in the interpreter, lowered for CUDA and on a GPU, is in
test_prefill.py.)"""
import re

import jax.numpy as jnp
import pytest

import gqa_pallas as gp
from gqa_pallas import devices, registry
from gqa_pallas.mosaic import prefill
from gqa_pallas.validation import AttentionDims
from tests import numerics

A100 = devices.DeviceInfo("gpu", "NVIDIA A100-SXM4-80GB", (8, 0), 108)


def _reason(head_dim=128, dtype="bfloat16", n=32, k=8, device=devices.H200, interpret=False):
  problem = registry.Problem("prefill", AttentionDims(2, 64, 64, n, k, head_dim), dtype,
                             interpret=interpret, device=device)
  return registry.get("mosaic").unsupported(problem)


def test_what_it_takes():
  assert "mosaic" in gp.IMPLEMENTATIONS
  for h in (64, 128):
    for dtype in ("bfloat16", "float16"):
      for n, k in ((32, 8), (14, 2), (8, 8), (16, 1), (28, 4)):
        assert _reason(h, dtype, n, k) is None, (h, dtype, n, k)
  assert _reason(interpret=True, device=devices.CPU) is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(device=A100), r"a Hopper GPU, sm90 \(the device is 'NVIDIA A100-SXM4-80GB', sm80"),
    (dict(device=devices.CPU), r"a Hopper GPU, sm90 \(the device is 'cpu'; interpret=True"),
    (dict(dtype="float32"), r"dtype=float32 \(the Mosaic GPU prefill takes bfloat16 and float16"),
    (dict(head_dim=256), r"head_dim=256 \(the Mosaic GPU prefill takes head dims \(64, 128\)"),
    (dict(head_dim=96), r"head_dim=96"),
    (dict(n=32, k=1), r"group size N // K = 32 \(the Mosaic GPU prefill packs at most 16"),
])
def test_what_it_refuses(kwargs, match):
  reason = _reason(**kwargs)
  assert reason is not None and re.search(match, reason), reason


def test_an_explicit_call_names_the_backend_and_input():
  q, k, v = numerics.random_qkv(0, 1, 8, 8, 4, 2, 64, jnp.float32)
  with pytest.raises(ValueError, match=r"implementation='mosaic' cannot run this prefill: "
                                       r"dtype=float32"):
    gp.gqa_attention(q, k, v, implementation="mosaic", interpret=True)


def test_not_in_the_default_preference_yet():
  """Until the GPU parity grid and the speed bar are met, implementation=None keeps Triton."""
  assert "mosaic" not in registry.preference(devices.H200, False)
  assert "mosaic" not in registry.preference(devices.CPU, True)


@pytest.mark.parametrize("group,rows", [(1, (1, 128)), (2, (2, 64)), (4, (4, 32)), (7, (8, 16)),
                                        (8, (8, 16)), (12, (16, 8)), (16, (16, 8))])
def test_row_packing(group, rows):
  """A 128-row tile holds every query head of the group (G padded to a power of two)."""
  assert prefill.group_rows(group) == rows


def test_config_validates_itself_and_fits_shared_memory():
  with pytest.raises(ValueError, match="block_kv must be 64 or 128"):
    prefill.MosaicPrefillConfig(block_kv=96)
  with pytest.raises(ValueError, match="stages must be an int >= 2"):
    prefill.MosaicPrefillConfig(stages=1)
  tables = dict(prefill.TUNING_TABLES, heuristic=prefill.HEURISTIC_TABLE)
  for table in tables.values():
    assert set(table) == {(h, dt) for h in (64, 128) for dt in ("bfloat16", "float16")}
    for (h, _), config in table.items():
      assert prefill.shared_memory_bytes(h, config) <= 227 * 1024  # Hopper's per-block limit
