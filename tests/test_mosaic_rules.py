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
      for n, k in ((32, 8), (14, 2), (8, 8), (16, 1), (28, 4), (40, 1), (64, 2)):
        assert _reason(h, dtype, n, k) is None, (h, dtype, n, k)
  assert _reason(interpret=True, device=devices.CPU) is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(device=A100), r"a Hopper GPU, sm90 \(the device is 'NVIDIA A100-SXM4-80GB', sm80"),
    (dict(device=devices.CPU), r"a Hopper GPU, sm90 \(the device is 'cpu'; interpret=True"),
    (dict(dtype="float32"), r"dtype=float32 \(the Mosaic GPU prefill takes bfloat16 and float16"),
    (dict(head_dim=256), r"head_dim=256 \(the Mosaic GPU prefill takes head dims \(64, 128\)"),
    (dict(head_dim=96), r"head_dim=96"),
])
def test_what_it_refuses(kwargs, match):
  reason = _reason(**kwargs)
  assert reason is not None and re.search(match, reason), reason


def test_an_explicit_call_names_the_backend_and_input():
  q, k, v = numerics.random_qkv(0, 1, 8, 8, 4, 2, 64, jnp.float32)
  with pytest.raises(ValueError, match=r"implementation='mosaic' cannot run this prefill: "
                                       r"dtype=float32"):
    gp.gqa_attention(q, k, v, implementation="mosaic", interpret=True)


def test_default_on_hopper_only():
  """implementation=None takes it on sm90; the interpreter default stays Triton (Mosaic GPU's
  interpreter takes seconds per case), and other GPUs have no Mosaic GPU kernel."""
  assert registry.preference(devices.H200, False)[0] == "mosaic"
  assert registry.preference(devices.H100, False)[0] == "mosaic"
  assert "mosaic" not in registry.preference(A100, False)
  assert "mosaic" not in registry.preference(devices.CPU, True)


def test_kv_splits_fill_the_gpu():
  """Few query tiles over a long cache split the keys; a square prefill that fills the GPU, or
  a short cache, does not."""
  def splits(b, t, s, n, k):
    dims = AttentionDims(b, t, s, n, k, 128)
    return prefill.default_config(dims, "bfloat16", "NVIDIA H200", 132).kv_splits
  assert splits(1, 256, 131072, 8, 1) == 8        # 16 tiles: 8 splits of 128 blocks
  assert splits(1, 1024, 32768, 32, 8) == 1       # 256 tiles already
  assert splits(2, 8192, 8192, 32, 8) == 1
  assert splits(1, 16, 512, 8, 1) == 1            # 4 blocks: too few to split
  assert 1 < splits(1, 64, 16384, 4, 1) <= 16
  cpu = prefill.default_config(AttentionDims(1, 256, 131072, 8, 1, 128), "bfloat16", "cpu",
                               None)
  assert cpu.kv_splits == 1


@pytest.mark.parametrize("group,q_len", [(1, 200), (2, 64), (3, 70), (4, 33), (5, 17), (7, 9),
                                         (8, 1), (9, 20), (12, 40), (32, 16), (40, 3)])
def test_row_packing(group, q_len):
  """The tiles cover every (head, position) of the group exactly once, a tile holds every head
  of each position it touches and its positions are contiguous (no head padded, whatever G is)."""
  rows = prefill.chunk_rows(group)
  assert rows in (8, 16, 32, 64) and (rows == 8 or rows * group <= prefill.TILE_ROWS)
  assert rows * 2 * group > prefill.TILE_ROWS or rows == 64  # the largest chunk that fits
  chunks, tiles = prefill.tiling(group, q_len)
  per_tile = prefill.TILE_ROWS // rows
  assert tiles == -(-chunks // per_tile)
  seen = []
  for tile in range(tiles):
    firsts = {}
    for j in range(tile * per_tile, min((tile + 1) * per_tile, chunks)):
      head, first = (int(x) for x in prefill.chunk_origin(j, group))
      seen += [(head, t) for t in range(first, min(first + rows, q_len))]
      firsts.setdefault(first, set()).add(head)
    span = sorted(firsts)
    assert span == list(range(span[0], span[-1] + 1, rows))
    if group * rows <= prefill.TILE_ROWS:  # interior position blocks carry every head
      assert all(firsts[f] == set(range(group)) for f in span[1:-1])
  assert sorted(seen) == [(h, t) for h in range(group) for t in range(q_len)]


def test_config_validates_itself_and_fits_shared_memory():
  with pytest.raises(ValueError, match="block_kv must be 64 or 128"):
    prefill.MosaicPrefillConfig(block_kv=96)
  with pytest.raises(ValueError, match="stages must be an int >= 2"):
    prefill.MosaicPrefillConfig(stages=1)
  with pytest.raises(ValueError, match="kv_splits must be an int >= 1"):
    prefill.MosaicPrefillConfig(kv_splits=0)
  tables = dict(prefill.TUNING_TABLES, heuristic=prefill.HEURISTIC_TABLE)
  for table in tables.values():
    assert set(table) == {(h, dt) for h in (64, 128) for dt in ("bfloat16", "float16")}
    for (h, _), config in table.items():
      assert prefill.shared_memory_bytes(h, config) <= 227 * 1024  # Hopper's per-block limit
