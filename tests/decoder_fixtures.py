"""Shared pieces of the model tests: a tiny decoder, ragged prompts, HF-style checkpoint files."""
import json
import os

import jax
import numpy as np

from flax_layers import DecoderConfig, init_params

TINY = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
                     rms_norm_eps=1e-5)


def random_params(config, seed=0, scale=4.0):
  """init_params with weights scaled up, so logits are far from uniform (argmax is stable)."""
  params = init_params(config, jax.random.PRNGKey(seed))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * scale, params)


def ragged_prompts(seed, lengths, width=None, vocab=64):
  rs = np.random.RandomState(seed)
  width = width or max(lengths)
  tokens = rs.randint(0, vocab, (len(lengths), width)).astype(np.int32)  # garbage padding
  return tokens, np.asarray(lengths, np.int32)


def hf_config(**overrides):
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
         "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
         "tie_word_embeddings": False, "attention_bias": False, "dtype": "float32"}
  cfg.update(overrides)
  return cfg


def hf_tensors(params, config, dtype=np.float32):
  """The inverse of the loader's mapping (Flax loop layout -> HF names and layouts)."""
  out = {"model.embed_tokens.weight": params["embed"]["embedding"],
         "model.norm.weight": params["final_norm"]["scale"],
         "lm_head.weight": params["lm_head"]["kernel"].T}
  for i in range(config.num_layers):
    p, layer = f"model.layers.{i}.", params[f"layers_{i}"]
    for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      kern = layer["attn"][name]["kernel"]
      out[p + f"self_attn.{proj}.weight"] = kern.reshape(kern.shape[0], -1).T
    out[p + "self_attn.o_proj.weight"] = layer["attn"]["out"]["kernel"].reshape(
        -1, config.hidden_size).T
    for name in ("gate", "up", "down"):
      out[p + f"mlp.{name}_proj.weight"] = layer["mlp"][name]["kernel"].T
    out[p + "input_layernorm.weight"] = layer["input_norm"]["scale"]
    out[p + "post_attention_layernorm.weight"] = layer["post_attention_norm"]["scale"]
  return {k: np.ascontiguousarray(np.asarray(v, np.float32)).astype(dtype)
          for k, v in out.items()}


def write_checkpoint(path, hf_config, tensors, shards=1):
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f)
  if shards == 1:
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: tensors[n] for n in names[s::shards]}
    save_file(part, os.path.join(path, fname))
    weight_map.update({n: fname for n in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return path
