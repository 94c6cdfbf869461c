"""The decoder: its config, prefill and decode against the full forward, the scan and loop
layouts, and its cache checks. (HF parity: ``test_hf_parity.py``.)"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_layers import (Decoder, DecoderConfig, init_cache, stack_layer_params,
                         unstack_layer_params)


# ---------------------------------------------------------------------------------------------
# config


def test_config_defaults_and_validation():
  cfg = DecoderConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1,
                      num_heads=4, num_kv_heads=2)
  assert cfg.head_dim == 16 and cfg.dtype == "float32" and not cfg.scan_layers
  assert hash(cfg) == hash(cfg.replace())  # usable as a static jit argument
  assert DecoderConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1,
                       num_heads=4, num_kv_heads=2, dtype=jnp.bfloat16).dtype == "bfloat16"
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    cfg.replace(num_kv_heads=3)
  with pytest.raises(ValueError, match="even"):
    cfg.replace(head_dim=15)
  with pytest.raises(ValueError, match="dtype"):
    cfg.replace(dtype="int8")
  with pytest.raises(ValueError, match="num_layers"):
    cfg.replace(num_layers=0)
  windowed = cfg.replace(sliding_window=8, max_position_embeddings=32)
  windowed.check_sequence_length(32)  # a window no longer caps the sequence
  with pytest.raises(ValueError, match="sliding_window must be a positive int"):
    cfg.replace(sliding_window=0)
  with pytest.raises(ValueError, match="logits_soft_cap must be a positive float"):
    cfg.replace(logits_soft_cap=-1.0)
  with pytest.raises(ValueError, match="family must be 'llama' or 'gemma2'"):
    cfg.replace(family="gpt2")
  with pytest.raises(ValueError, match="layer_types must give"):
    cfg.replace(layer_types=("sliding_attention",) * (cfg.num_layers + 1), sliding_window=4)
  with pytest.raises(ValueError, match="scan_layers=True stacks identical layers"):
    cfg.replace(num_layers=2, layer_types=("sliding_attention", "full_attention"),
                sliding_window=4, scan_layers=True)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    cfg.replace(max_position_embeddings=32).check_sequence_length(33)


# ---------------------------------------------------------------------------------------------
# the model


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_prefill_and_decode_match_full_forward(tiny, scan_layers):
  config, params = tiny
  if scan_layers:
    config = config.replace(scan_layers=True)
    params = stack_layer_params(params, config.num_layers)
  dec = Decoder(config, implementation="xla")
  tokens = np.random.RandomState(0).randint(0, 64, (3, 12)).astype(np.int32)
  full = dec.apply({"params": params}, tokens)
  chex.assert_shape(full, (3, 12, 64))
  lengths = np.array([7, 3, 10], np.int32)

  @jax.jit
  def run(params, tokens):
    # Prefill each row's first lengths[b] tokens (right-padded to 10), then feed the rest one by
    # one; every row is at its own offset.
    cache = init_cache(config, 3, 16)
    padded = jnp.where(jnp.arange(10)[None] < lengths[:, None], tokens[:, :10], 0)
    pre, cache = dec.apply({"params": params}, padded, cache=cache, num_new=jnp.asarray(lengths))
    steps = []
    for i in range(2):
      nxt = jnp.take_along_axis(tokens, (jnp.asarray(lengths) + i)[:, None], axis=1)
      logits, cache = dec.apply({"params": params}, nxt, cache=cache)
      steps.append(logits[:, 0])
    return pre, jnp.stack(steps, 1), cache

  pre, steps, cache = run(params, tokens)
  lengths_after = cache.lengths[0] if scan_layers else cache[0].lengths
  np.testing.assert_array_equal(np.asarray(lengths_after), lengths + 2)
  for b, n in enumerate(lengths):
    chex.assert_trees_all_close(pre[b, :n], full[b, :n], atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(steps[b], full[b, n:n + 2], atol=2e-5, rtol=2e-5)


def test_scan_and_loop_layouts_agree(tiny):
  config, params = tiny
  tokens = np.random.RandomState(1).randint(0, 64, (2, 9)).astype(np.int32)
  loop = Decoder(config, implementation="xla").apply({"params": params}, tokens)
  stacked = stack_layer_params(params, config.num_layers)
  assert stacked["layers"]["attn"]["query"]["kernel"].shape == (2, 32, 4, 16)
  scan = Decoder(config.replace(scan_layers=True), implementation="xla").apply(
      {"params": stacked}, tokens)
  chex.assert_trees_all_close(loop, scan, atol=1e-6, rtol=1e-6)
  back = unstack_layer_params(stacked, config.num_layers)
  chex.assert_trees_all_equal(back, params)
  # The loop layout also takes a layer-stacked KVCache.
  from gqa_pallas import KVCache
  cache = KVCache.init(2, 12, 2, 16, jnp.float32, num_layers=2)
  logits, cache = Decoder(config, implementation="xla").apply({"params": params}, tokens,
                                                              cache=cache)
  assert cache.num_layers == 2
  chex.assert_trees_all_close(logits, loop, atol=1e-5, rtol=1e-5)


def test_decoder_refuses_wrong_cache(tiny):
  config, params = tiny
  tokens = jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match="layer-stacked"):
    Decoder(config.replace(scan_layers=True)).apply(
        {"params": stack_layer_params(params, 2)}, tokens, cache=init_cache(config, 2, 8))
  with pytest.raises(ValueError, match="layers"):
    Decoder(config).apply({"params": params}, tokens, cache=init_cache(config, 2, 8)[:1])
  with pytest.raises(ValueError, match="max_position_embeddings"):
    Decoder(config).apply({"params": params}, jnp.zeros((1, 65), jnp.int32))
