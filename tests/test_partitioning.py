"""The decoder's logical axes and their mesh shardings (one device here; the 8-device runs of
``generate`` on a mesh are in ``tests/sharding_checks.py``)."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from flax_layers import decoder, generation, partitioning

CFG = decoder.DecoderConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8)


def _one_device_mesh():
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))


@pytest.mark.parametrize("changes", [
    {},
    dict(attention_bias=True, attention_out_bias=True, mlp_bias=True),
    dict(family="gemma2", tie_word_embeddings=True),
    dict(scan_layers=True),
])
def test_every_parameter_has_logical_axes(changes):
  cfg = CFG.replace(**changes)
  params = jax.eval_shape(lambda: decoder.init_params(cfg))
  axes = partitioning.param_logical_axes(params)
  flat = jax.tree_util.tree_leaves_with_path(params)
  named = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, P)))
  assert len(named) == len(flat)
  for path, leaf in flat:
    assert len(named[path]) == leaf.ndim, (path, named[path])
  layer = axes["layers"] if cfg.scan_layers else axes["layers_1"]
  lead = ("layers",) if cfg.scan_layers else ()
  assert tuple(layer["attn"]["query"]["kernel"]) == lead + ("embed", "heads", "head_dim")
  assert tuple(layer["attn"]["key"]["kernel"]) == lead + ("embed", "kv_heads", "head_dim")
  assert tuple(layer["attn"]["out"]["kernel"]) == lead + ("heads", "head_dim", "embed")
  assert tuple(layer["mlp"]["down"]["kernel"]) == lead + ("mlp", "embed")
  assert tuple(axes["embed"]["embedding"]) == ("vocab", "embed")
  if changes.get("attention_bias"):
    assert tuple(layer["attn"]["value"]["bias"]) == ("kv_heads", "head_dim")
    assert tuple(layer["mlp"]["gate"]["bias"]) == ("mlp",)


def test_unknown_or_misshapen_parameters_are_refused():
  params = jax.eval_shape(lambda: decoder.init_params(CFG))
  extra = dict(params, adapter={"lora": {"kernel": jnp.zeros((4, 4))}})
  with pytest.raises(ValueError, match="adapter/lora/kernel"):
    partitioning.param_logical_axes(extra)
  bad = dict(params, final_norm={"scale": jnp.zeros((4, 4))})
  with pytest.raises(ValueError, match="final_norm/scale.*expected 1 dimensions"):
    partitioning.param_logical_axes(bad)
  with pytest.raises(TypeError, match="Mesh"):
    partitioning.param_sharding(params, mesh="data")
  with pytest.raises(TypeError, match="KVCache"):
    partitioning.cache_logical_axes([jnp.zeros(3)])


def test_cache_axes_and_the_fit_to_a_mesh():
  stacked = jax.eval_shape(lambda: decoder.init_cache(CFG.replace(scan_layers=True), 2, 8))
  axes = partitioning.cache_logical_axes(stacked)
  assert tuple(axes.k) == ("layers", "batch", "length", "kv_heads", "head_dim")
  assert tuple(axes.lengths) == ("layers", "batch")
  per_layer = partitioning.cache_logical_axes(decoder.init_cache(CFG, 2, 8))
  assert len(per_layer) == CFG.num_layers and tuple(per_layer[0].overflowed) == ("batch",)
  mesh = types.SimpleNamespace(shape={"data": 2, "model": 4})  # _fit reads only the axis sizes
  fit = partitioning._fit  # pylint: disable=protected-access
  # kv heads 8 split 4 ways, rows 6 over 2; 2 kv heads do not divide by 4: whole.
  assert fit(P("data", None, "model", None), (6, 16, 8, 64), mesh) == P("data", None, "model", None)
  assert fit(P("data", None, "model", None), (3, 16, 2, 64), mesh) == P(None, None, None, None)
  assert fit(P(("data", "model")), (8,), mesh) == P(("data", "model"))
  assert fit(P(("data", "model")), (6,), mesh) == P("data")
  assert fit(P("seq"), (8,), mesh) == P(None)  # an axis the mesh lacks


def test_generate_on_a_one_device_mesh_and_its_refusals():
  params = decoder.init_params(CFG)
  mesh = _one_device_mesh()
  placed = partitioning.shard_params(params, mesh)
  prompt = jnp.array([[5, 9, 3], [7, 1, 0]], jnp.int32)
  lengths = jnp.array([3, 2], jnp.int32)
  want = generation.generate(CFG, params, prompt, lengths, 4, implementation="xla")
  got = generation.generate(CFG, placed, prompt, lengths, 4, implementation="xla", mesh=mesh,
                            logical_rules=partitioning.LOGICAL_RULES)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cache = partitioning.shard_cache(decoder.init_cache(CFG, 2, 8), mesh)
  out, _, cache = generation.generate_with_cache(CFG, placed, cache, prompt, lengths, 4,
                                                 implementation="xla", mesh=mesh)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want[0]))
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    generation.generate(CFG, params, prompt, lengths, 4, implementation="xla", mesh="data")
  with pytest.raises(ValueError, match="logical_rules needs a mesh"):
    generation.generate(CFG, params, prompt, lengths, 4, implementation="xla",
                        logical_rules=partitioning.LOGICAL_RULES)
  with pytest.raises(TypeError, match="logical_rules must be"):
    generation.generate(CFG, params, prompt, lengths, 4, implementation="xla", mesh=mesh,
                        logical_rules=[("batch",)])
