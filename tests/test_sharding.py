"""Sharding on 8 simulated CPU devices (``tests/sharding_checks.py``, in a subprocess: the device
count is fixed when JAX starts)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sequence_parallel_decode_on_8_simulated_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "tests.sharding_checks"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
      proc.stdout[-3000:] + proc.stderr[-6000:])
