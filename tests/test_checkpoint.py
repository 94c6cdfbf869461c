"""Loading Hugging Face checkpoints: round trips (sharded, bf16) and clear refusals. (Files
written by HF itself: ``test_hf_parity.py``.)"""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_layers import (Decoder, UnsupportedCheckpointError, generate, load_hf_checkpoint,
                         stack_layer_params)
from tests.decoder_fixtures import hf_config, hf_tensors, ragged_prompts, write_checkpoint


def test_load_round_trip_sharded_and_bf16(tiny, tmp_path):
  config, params = tiny
  tensors = hf_tensors(params, config)
  cfg, loaded = load_hf_checkpoint(write_checkpoint(tmp_path / "single", hf_config(), tensors))
  assert cfg == config
  chex.assert_trees_all_equal(loaded, params)
  cfg2, sharded = load_hf_checkpoint(write_checkpoint(tmp_path / "sharded", hf_config(), tensors,
                                            shards=3))
  chex.assert_trees_all_equal(sharded, params)
  cfg_scan, scan = load_hf_checkpoint(tmp_path / "single", scan_layers=True)
  chex.assert_trees_all_equal(scan, stack_layer_params(params, 2))

  import ml_dtypes
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  cfg16, p16 = load_hf_checkpoint(
      write_checkpoint(tmp_path / "bf16", hf_config(dtype="bfloat16"), bf16))
  assert cfg16.dtype == cfg16.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(p16))
  np.testing.assert_array_equal(
      np.asarray(p16["layers_1"]["attn"]["key"]["kernel"], np.float32),
      np.asarray(params["layers_1"]["attn"]["key"]["kernel"]).astype(ml_dtypes.bfloat16).astype(
          np.float32))
  # bf16 weights, float32 compute on request.
  cfg_mixed, _ = load_hf_checkpoint(tmp_path / "bf16", dtype="float32")
  assert (cfg_mixed.dtype, cfg_mixed.param_dtype) == ("float32", "bfloat16")

  # Legacy (transformers 4.x) config fields; tied embeddings inferred from a missing lm_head.
  legacy = hf_config(rope_theta=500000.0, torch_dtype="float32", rope_scaling=None)
  del legacy["rope_parameters"], legacy["dtype"], legacy["tie_word_embeddings"]
  tied = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
  cfg_l, p_l = load_hf_checkpoint(write_checkpoint(tmp_path / "legacy", legacy, tied))
  assert cfg_l.rope_theta == 500000.0 and cfg_l.tie_word_embeddings and "lm_head" not in p_l


@pytest.mark.parametrize("overrides, match", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "llama3"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(layer_types=["full_attention", "sliding_attention", "full_attention"],
          sliding_window=16), "layer_types has 3 entries"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=0),
     "sliding_window must be a positive int"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantized"),
    (dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_activation="relu"),
     "hidden_activation 'relu'"),
], ids=["arch", "llama3-rope", "linear-rope", "gelu", "layer-types-length", "bad-window",
        "quantized", "gemma2-activation"])
def test_loader_refuses_unsupported(tiny, tmp_path, overrides, match):
  config, params = tiny
  path = write_checkpoint(tmp_path, hf_config(**overrides), hf_tensors(params, config))
  with pytest.raises(UnsupportedCheckpointError, match=match):
    load_hf_checkpoint(path)


@pytest.mark.parametrize("overrides", [
    dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=6),
    dict(layer_types=["sliding_attention", "sliding_attention"], sliding_window=6),
    dict(layer_types=["sliding_attention", "full_attention"], sliding_window=6),
], ids=["mistral", "layer-types", "mixed-layer-types"])
def test_loader_applies_the_sliding_window(tiny, tmp_path, overrides):
  """A window shorter than the sequence is applied (generation goes past it), and changes the
  result against the same weights without a window."""
  config, params = tiny
  path = write_checkpoint(tmp_path, hf_config(**overrides), hf_tensors(params, config))
  cfg, loaded = load_hf_checkpoint(path)
  assert cfg.sliding_window == 6 and cfg.max_sequence_length == cfg.max_position_embeddings
  prompts, lengths = ragged_prompts(0, [9, 7])
  generate(cfg, loaded, prompts, lengths, 8, implementation="xla")  # 9 + 8 tokens > window 6
  logits = Decoder(cfg, implementation="xla").apply({"params": loaded}, prompts)
  full = Decoder(cfg.replace(sliding_window=None, layer_types=None), implementation="xla").apply(
      {"params": loaded}, prompts)
  np.testing.assert_allclose(np.asarray(logits[:, :6]), np.asarray(full[:, :6]), rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(np.asarray(logits[:, 6:]), np.asarray(full[:, 6:]), atol=1e-4)


def test_qwen2_window_follows_max_window_layers():
  from flax_layers.checkpoint import config_from_hf  # pylint: disable=g-import-not-at-top
  qwen = hf_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=6,
                   use_sliding_window=True)
  assert config_from_hf(dict(qwen, max_window_layers=0)).sliding_window == 6
  assert config_from_hf(dict(qwen, max_window_layers=2)).sliding_window is None
  assert config_from_hf(dict(qwen, use_sliding_window=False)).sliding_window is None
  mixed = config_from_hf(dict(qwen, max_window_layers=1))
  assert mixed.layer_types == ("full_attention", "sliding_attention")
  assert (mixed.window_of(0), mixed.window_of(1)) == (None, 6)
  with pytest.raises(UnsupportedCheckpointError, match="scan_layers=True needs identical"):
    config_from_hf(dict(qwen, max_window_layers=1), scan_layers=True)


def test_loader_tensor_errors(tiny, tmp_path):
  config, params = tiny
  tensors = hf_tensors(params, config)
  missing = dict(tensors)
  del missing["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    load_hf_checkpoint(write_checkpoint(tmp_path / "missing", hf_config(), missing))
  wrong = dict(tensors, **{"model.norm.weight": np.ones(31, np.float32)})
  with pytest.raises(ValueError, match="shape"):
    load_hf_checkpoint(write_checkpoint(tmp_path / "shape", hf_config(), wrong))
  extra = dict(tensors, **{"model.layers.2.mlp.up_proj.weight": np.ones((64, 32), np.float32)})
  with pytest.raises(ValueError, match="unexpected tensors"):
    load_hf_checkpoint(write_checkpoint(tmp_path / "extra", hf_config(), extra))
  ok = dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
  load_hf_checkpoint(write_checkpoint(tmp_path / "invfreq", hf_config(), ok))  # ignored
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text(json.dumps(hf_config()))
  (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="safetensors"):
    load_hf_checkpoint(tmp_path / "bin")
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf_checkpoint(tmp_path / "nowhere")




@pytest.mark.parametrize("broken,match", [
    ("config_text", "config.json: not a valid JSON config"),
    ("config_list", "config.json: expected a JSON object"),
    ("missing_field", "missing field 'vocab_size'"),
    ("wrong_type", "field 'hidden_size' must be a positive int; got '32'"),
    ("bool_field", "field 'num_hidden_layers' must be a positive int; got True"),
    ("bad_eps", "field 'rms_norm_eps' must be a positive float"),
    ("index_no_map", "index.json: expected a 'weight_map' object"),
    ("index_text", "index.json: not a valid JSON safetensors index"),
    ("tensors", "model.safetensors: not a readable safetensors file"),
])
def test_broken_checkpoints_name_the_file_and_field(tiny, tmp_path, broken, match):
  """Broken files raise a ValueError that names the file and the field (no JSONDecodeError,
  KeyError or library error without the path)."""
  config, params = tiny
  cfg = hf_config()
  if broken == "missing_field":
    del cfg["vocab_size"]
  elif broken == "wrong_type":
    cfg["hidden_size"] = "32"
  elif broken == "bool_field":
    cfg["num_hidden_layers"] = True
  elif broken == "bad_eps":
    cfg["rms_norm_eps"] = -1
  path = write_checkpoint(tmp_path, cfg, hf_tensors(params, config),
                          shards=2 if broken.startswith("index") else 1)
  if broken == "config_text":
    (tmp_path / "config.json").write_text("{not json")
  elif broken == "config_list":
    (tmp_path / "config.json").write_text("[1, 2]")
  elif broken == "index_no_map":
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
  elif broken == "index_text":
    (tmp_path / "model.safetensors.index.json").write_text("weight_map")
  elif broken == "tensors":
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
  with pytest.raises(ValueError, match=match):
    load_hf_checkpoint(path)


def test_null_optional_fields_take_their_defaults():
  """transformers writes ``"head_dim": null`` (Mistral) and may write other optional fields as
  null: they take the documented defaults, as when absent."""
  from flax_layers.checkpoint import config_from_hf  # pylint: disable=g-import-not-at-top
  cfg = config_from_hf(hf_config(head_dim=None, num_key_value_heads=None, rms_norm_eps=None,
                                 max_position_embeddings=None))
  assert cfg.head_dim == 32 // 4 and cfg.num_kv_heads == cfg.num_heads == 4
  assert cfg.rms_norm_eps == 1e-6 and cfg.max_position_embeddings == 2048
