"""``python -m gqa_pallas``: the kernels against the reference on this machine (``selfcheck``).

The model demo and generation are ``gqa-pallas demo`` / ``gqa-pallas generate``
(``python -m flax_layers``).
"""
import sys
import warnings

from gqa_pallas import devices, selfcheck


def main() -> int:
  warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*[Tt]riton.*")
  import jax  # pylint: disable=g-import-not-at-top
  print(f"gqa-pallas kernel check on {jax.devices()[0].device_kind} (jax {jax.__version__})")
  ok = selfcheck.attention_check(interpret=not devices.on_gpu())
  print("check", "passed" if ok else "FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
