"""Runs the Python examples of docs/flax.md, in order, in one namespace."""
import pathlib
import re

import jax
import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "flax.md"


@pytest.mark.skipif(jax.default_backend() == "gpu",
                    reason="the examples' float32 tolerances assume CPU matmuls (no TF32)")
def test_docs_flax_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
  assert len(blocks) >= 6
  namespace = {"__name__": "docs_flax"}
  for i, block in enumerate(blocks):
    try:
      exec(compile(block, f"docs/flax.md[block {i}]", "exec"), namespace)  # pylint: disable=exec-used
    except Exception as e:  # pylint: disable=broad-except
      raise AssertionError(f"docs/flax.md example {i} failed:\n{block}") from e
