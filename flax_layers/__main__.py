"""``python -m flax_layers``: the ``gqa-pallas`` command line (``flax_layers.cli``)."""
import sys

from flax_layers.cli import main

if __name__ == "__main__":
  sys.exit(main())
