"""Sharding on simulated CPU devices (``tests/sharding_checks.py`` and ``bench sharded``, in
subprocesses: the device count is fixed when JAX starts), and on two GPUs where there are."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sequence_parallel_decode_on_8_simulated_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "tests.sharding_checks"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
      proc.stdout[-3000:] + proc.stderr[-6000:])


def _gpu_count():
  import jax  # pylint: disable=g-import-not-at-top
  try:
    return len(jax.devices("gpu"))
  except RuntimeError:
    return 0


@pytest.mark.gpu
def test_sharding_checks_on_two_gpus():
  """The same checks with the compiled kernels, on (data=2, model=1) and (data=1, model=2)."""
  if _gpu_count() < 2:
    pytest.skip("needs 2 or more GPUs (the nvidia-h200-x2 machine)")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "tests.sharding_checks", "--gpu"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
      proc.stdout[-3000:] + proc.stderr[-6000:])


def test_bench_sharded_on_2_simulated_devices(tmp_path):
  """``gqa-pallas bench sharded`` on 2 CPU devices: one device against the mesh for the
  data- and model-parallel decoder and the sequence-parallel decode, the docs block from it."""
  out = tmp_path / "sharded.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "flax_layers", "bench", "sharded", "--out",
                         str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  assert "NOT GPU numbers" in proc.stdout
  res = json.loads(out.read_text())
  assert res["devices"] == 2 and res["gpu"] is False
  assert res["command"] == "gqa-pallas bench sharded"
  decoder_rows = [r for r in res["rows"] if r["kind"] == "sharded_decode"]
  assert [r["layout"] for r in decoder_rows] == ["data", "model"]
  for r in decoder_rows:
    assert not r.get("errors") and set(r["generate_ms"]) == {"1", "2"}, r
    assert r["same_tokens"] == 1.0  # float32 tiny model: the mesh gives the same greedy tokens
  (seq,) = [r for r in res["rows"] if r["kind"] == "sequence_parallel"]
  assert set(seq["ms_per_step"]) == {"1", "2"} and seq["exact"] == {"1": True, "2": True}, seq
  assert seq["max_err"]["2"] <= 3 * seq["max_err_ref_dtype"] + 1e-5

  from benchmarks import report  # pylint: disable=g-import-not-at-top
  doc = tmp_path / "sharding.md"
  doc.write_text(f"# Sharding\n\n{report.SHARDING_BEGIN}\nold\n{report.SHARDING_END}\n\nrest\n")
  report.update_sharding_doc(str(out), str(doc))
  text = doc.read_text()
  assert "old" not in text and text.endswith("rest\n") and "NOT GPU numbers" in text
  assert "| data | tiny (CPU), 4:2 H16 | 4 | 16 + 8 |" in text
  assert "| model | tiny (CPU), 4:2 H16 | 2 | 16 + 8 |" in text
  assert "| 2 |" in text and "exact (design.md)" in text


def test_bench_sharded_needs_two_devices_or_says_baseline(capsys):
  from flax_layers import cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["bench", "sharded", "--out", os.devnull]) == 2
  err = capsys.readouterr().err
  assert "needs at least 2 devices" in err and "--devices 1" in err
  assert cli.main(["bench", "sharded", "--devices", "3", "--out", os.devnull]) == 2
  assert "--devices must be between 1 and the 1 devices" in capsys.readouterr().err
