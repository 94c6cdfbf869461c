"""The Triton backend's own rules: tuning-table lookup by device kind, the decode split and tile
heuristics, config validation, the DEBUG launch log. (Parity lives in the op suites.)"""
import dataclasses
import logging

import jax.numpy as jnp
import pytest

import gqa_pallas as gp
from gqa_pallas import devices, registry
from gqa_pallas.triton import decode, prefill
from gqa_pallas.validation import AttentionDims
from tests import numerics

UNKNOWN_GPU = devices.DeviceInfo("gpu", "NVIDIA A100-SXM4-80GB", (8, 0), 108)


def _default(op, device, head_dim=128, dtype="bfloat16"):
  problem = registry.Problem(op, AttentionDims(2, 1, 4096, 32, 8, head_dim), dtype,
                             device=device)
  return registry.get("triton").default_config(problem)


@pytest.mark.parametrize("op,kernel", [("prefill", prefill), ("decode", decode)])
def test_tables_are_keyed_by_device_kind(op, kernel):
  for kind, table in kernel.TUNING_TABLES.items():
    device = devices.DeviceInfo("gpu", kind, (9, 0), 132)
    assert _default(op, device) == table[(128, "bfloat16")]
    assert _default(op, device, 64, "float16") == table[(64, "float16")]
  # Any other device (another GPU; a CPU in interpret mode) gets the documented heuristic.
  for device in (UNKNOWN_GPU, devices.CPU):
    assert _default(op, device, 96, "float32") == kernel.HEURISTIC_TABLE[(128, "float32")]
  assert set(kernel.TUNING_TABLES) >= {"NVIDIA H100 80GB HBM3", "NVIDIA H200"}
  for table in list(kernel.TUNING_TABLES.values()) + [kernel.HEURISTIC_TABLE]:
    assert set(table) == {(hp, dt) for hp in (16, 32, 64, 128, 256)
                          for dt in ("bfloat16", "float16", "float32")}


def test_prefill_config_validates_itself():
  with pytest.raises(ValueError, match="block_m must be a power of two"):
    prefill.PrefillConfig(block_m=96)
  with pytest.raises(ValueError, match="num_stages must be a positive int"):
    prefill.PrefillConfig(num_stages=0)


def test_splits_heuristic():
  cfg = decode.DecodeConfig()
  # A full GPU of programs and a short cache: one split, no combine pass.
  assert decode.choose_splits(128, 2048, cfg, sm_count=132) == 1
  # Few programs: split the sequence so every SM gets work.
  assert decode.choose_splits(8, 32768, cfg, sm_count=132) >= 16
  # Never more splits than blocks.
  assert decode.choose_splits(1, 100, cfg, sm_count=132) <= 2
  # Many query rows over a short cache: the float32 partials would outweigh the K/V they
  # summarise, so the splits are capped (at a power of two).
  small = decode.DecodeConfig(programs_per_sm=4)
  assert decode.choose_splits(32, 4096, small, sm_count=132, tile_rows=7) == 16
  assert decode.choose_splits(32, 4096, small, sm_count=132, tile_rows=56) == 8
  # The SM count comes from the device calls are planned for.
  with devices.target(UNKNOWN_GPU):
    assert decode.choose_splits(1, 1 << 20, cfg) == 108 * cfg.programs_per_sm
  # Wide tiles (more than 16 query rows per kv head) are padded to 64 rows with one warp per
  # 16 rows; narrow ones keep the configured warps.
  assert decode.tile_rows_for(4, 7, cfg) == 64
  assert decode.tile_rows_for(1, 7, cfg) == 16
  assert decode.tile_rows_for(16, 8, cfg) == 64  # two row tiles
  assert decode.tile_rows_for(16, 8, dataclasses.replace(cfg, max_block_m=128)) == 128
  assert decode.warps_for(64, 2, cfg) == 4
  assert decode.warps_for(16, 2, cfg) == 2
  assert decode.warps_for(128, 4, cfg) == 8


def test_launch_parameters_logged_at_debug(caplog):
  q, k, v = numerics.random_qkv(5, 1, 8, 8, 2, 1, 16, jnp.float32)
  with caplog.at_level(logging.DEBUG, logger="gqa_pallas"):
    gp.gqa_attention(q, k, v, implementation="triton", interpret=True)
  assert any("gqa prefill launch" in r.getMessage() and "num_warps" in r.getMessage()
             for r in caplog.records)
