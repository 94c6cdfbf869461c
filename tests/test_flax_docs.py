"""Runs the Python examples of docs/flax.md, each on its own in a fresh namespace.

The page promises that every example is self-contained (its own imports and inputs), so each
block runs alone here: a block that leans on names from an earlier one fails.
"""
import pathlib
import re

import jax
import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "flax.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_docs_flax_has_examples():
  assert len(BLOCKS) >= 9


@pytest.mark.skipif(jax.default_backend() == "gpu",
                    reason="the examples' float32 tolerances assume CPU matmuls (no TF32)")
@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_docs_flax_example_runs_alone(i):
  block = BLOCKS[i]
  try:
    exec(compile(block, f"docs/flax.md[block {i}]", "exec"), {"__name__": "docs_flax"})  # pylint: disable=exec-used
  except Exception as e:  # pylint: disable=broad-except
    raise AssertionError(f"docs/flax.md example {i} failed:\n{block}") from e
