"""Loading Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` checkpoints.

``load_hf_checkpoint(path)`` reads ``config.json`` and ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``) with the ``safetensors`` package into NumPy (no torch at run
time), checks that the architecture is one the decoder runs exactly, and maps the weights onto the
parameter tree of ``flax_layers.decoder.Decoder``:

==========================================  ===============================================
HF tensor (torch ``Linear.weight`` is        Flax parameter
``[out, in]``)
==========================================  ===============================================
``model.embed_tokens.weight [V, D]``         ``embed/embedding [V, D]``
``...self_attn.q_proj.weight [N*H, D]``      ``attn/query/kernel [D, N, H]`` (``W.T.reshape``)
``...self_attn.{k,v}_proj.weight``           ``attn/{key,value}/kernel [D, K, H]``
``...self_attn.{q,k,v}_proj.bias``           ``attn/{query,key,value}/bias [N|K, H]``
``...self_attn.o_proj.weight [D, N*H]``      ``attn/out/kernel [N, H, D]``
``...mlp.{gate,up}_proj.weight [I, D]``      ``mlp/{gate,up}/kernel [D, I]``
``...mlp.down_proj.weight [D, I]``           ``mlp/down/kernel [I, D]``
``...input_layernorm.weight``                ``input_norm/scale``
``...post_attention_layernorm.weight``       ``post_attention_norm/scale``
``model.norm.weight``                        ``final_norm/scale``
``lm_head.weight [V, D]``                    ``lm_head/kernel [D, V]`` (absent when tied)
==========================================  ===============================================

The per-layer parameters sit under ``layers_0``, ``layers_1``, ... (the default explicit-loop
layout), or stacked on a leading layer axis under ``layers/`` with ``scan_layers=True``.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, Mapping, Tuple

import jax.numpy as jnp
import numpy as np

from flax_layers.decoder import DecoderConfig

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Gemma2ForCausalLM": "gemma2",
}

# Tensors a checkpoint may carry that the model recomputes (old Llama checkpoints store RoPE's
# inverse frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class UnsupportedCheckpointError(ValueError):
  """The checkpoint uses a feature the decoder does not implement (a ``ValueError``)."""


def _refuse(path, msg: str):
  raise UnsupportedCheckpointError(f"{path}: {msg}")


def _read_json(filename, what: str):
  """A JSON object from ``filename``; anything else is a ``ValueError`` naming the file."""
  try:
    with open(filename) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{filename}: not a valid JSON {what} ({e}).") from e
  if not isinstance(data, dict):
    raise ValueError(f"{filename}: expected a JSON object ({what}); got "
                     f"{type(data).__name__}.")
  return data


_MISSING = object()


def _number(hf, key, source, kind, default=_MISSING):
  """``hf[key]`` as a positive ``int`` / ``float``; absent or null takes ``default``. Missing
  (without a default) or mistyped is a ``ValueError`` naming the file, the field and what it
  takes."""
  value = hf.get(key)
  if value is None:
    value = default
  if value is _MISSING:
    raise ValueError(f"{source}: missing field {key!r} (a positive {kind.__name__}).")
  ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0 and (
      kind is float or float(value).is_integer())
  if not ok:
    raise ValueError(f"{source}: field {key!r} must be a positive {kind.__name__}; got "
                     f"{value!r}.")
  return kind(value)


def config_from_hf(hf: Mapping[str, Any], *, dtype=None, param_dtype=None, scan_layers=False,
                   source: str = "config.json", tensor_names=None) -> DecoderConfig:
  """Builds a ``DecoderConfig`` from a HF ``config.json`` dict, refusing what is not supported.

  Args:
    hf: the parsed ``config.json``.
    dtype, param_dtype: compute and parameter dtypes; default: the checkpoint's ``dtype``
      (``torch_dtype`` in older files) when it is float32/bfloat16/float16, else float32.
    scan_layers: see ``DecoderConfig``.
    source: a name for error messages.
    tensor_names: the checkpoint's tensor names, used to infer ``tie_word_embeddings`` when the
      config does not say.
  """
  archs = hf.get("architectures") or []
  model_type = hf.get("model_type")
  arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
  if arch is None:
    if archs:
      _refuse(source, f"architecture {archs} is not supported; supported: "
              f"{sorted(SUPPORTED_ARCHITECTURES)}.")
    if model_type not in SUPPORTED_ARCHITECTURES.values():
      _refuse(source, f"model_type {model_type!r} is not supported; supported: "
              f"{sorted(SUPPORTED_ARCHITECTURES.values())}.")
    family = model_type
  else:
    family = SUPPORTED_ARCHITECTURES[arch]
    if model_type is not None and model_type != family:
      _refuse(source, f"architecture {arch} with model_type {model_type!r} is inconsistent.")

  if family == "gemma2":
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
      _refuse(source, f"hidden_activation {act!r} is not supported for Gemma 2 (only "
              "'gelu_pytorch_tanh', the tanh-approximate GeGLU).")
  else:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      _refuse(source, f"hidden_act {act!r} is not supported (only 'silu', the SwiGLU MLP).")
  if hf.get("quantization_config"):
    _refuse(source, "quantized checkpoints are not supported.")

  # RoPE: v5 keeps theta in rope_parameters; v4 files have rope_theta and rope_scaling.
  rope_params = hf.get("rope_parameters") or {}
  if isinstance(rope_params, dict) and rope_params and "rope_type" not in rope_params and all(
      isinstance(v, dict) for v in rope_params.values()):
    _refuse(source, "per-layer-type rope_parameters are not supported.")
  rope_scaling = hf.get("rope_scaling") or {}
  for spec in (rope_params, rope_scaling):
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in (None, "default"):
      _refuse(source, f"RoPE type {rope_type!r} is not supported (only the default RoPE; "
              "Llama-3.1-style 'llama3', 'linear', 'dynamic', 'yarn' scaling are not).")
  rope_theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
  partial = rope_params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    _refuse(source, f"partial_rotary_factor={partial} is not supported.")

  # Sliding windows: every layer's, or per layer (layer_types).
  window = None
  per_layer = None
  layer_types = hf.get("layer_types")
  if not layer_types and family == "gemma2" and hf.get("sliding_window"):
    # Gemma 2 alternates, sliding first (transformers' default layer_types).
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                   for i in range(hf.get("num_hidden_layers", 0))]
  if not layer_types and family == "qwen2" and hf.get("use_sliding_window"):
    # Qwen2 slides from layer max_window_layers on (transformers' own rule).
    first = hf.get("max_window_layers", 0) or 0
    layer_types = ["full_attention" if i < first else "sliding_attention"
                   for i in range(hf.get("num_hidden_layers", 0))]
  if layer_types:
    kinds = set(layer_types)
    if not kinds <= {"full_attention", "sliding_attention"}:
      _refuse(source, f"layer types {sorted(kinds - {'full_attention', 'sliding_attention'})} "
              "are not supported.")
    if "sliding_attention" in kinds:
      window = hf.get("sliding_window")
      if len(kinds) > 1:
        if len(layer_types) != hf.get("num_hidden_layers"):
          _refuse(source, f"layer_types has {len(layer_types)} entries for "
                  f"{hf.get('num_hidden_layers')} layers.")
        if scan_layers:
          _refuse(source, "scan_layers=True needs identical layers; this model mixes "
                  "sliding-window and full-attention layers (load it without scan_layers).")
        per_layer = tuple(layer_types)
  elif family == "mistral":
    window = hf.get("sliding_window")
  if window is not None and (isinstance(window, bool) or not isinstance(window, int) or
                             window <= 0):
    _refuse(source, f"sliding_window must be a positive int or null; got {window!r}.")

  num_heads = _number(hf, "num_attention_heads", source, int)
  num_kv_heads = _number(hf, "num_key_value_heads", source, int, default=num_heads)
  head_dim = _number(hf, "head_dim", source, int,
                     default=_number(hf, "hidden_size", source, int) // num_heads)
  if family == "qwen2":
    qkv_bias, out_bias = True, False
  elif family in ("llama", "gemma2"):
    qkv_bias = out_bias = bool(hf.get("attention_bias", False))
  else:  # mistral
    qkv_bias = out_bias = False
  mlp_bias = bool(hf.get("mlp_bias", False))
  if family != "llama" and mlp_bias:
    _refuse(source, "mlp_bias is only supported for Llama.")

  tied = hf.get("tie_word_embeddings")
  if tied is None:
    tied = tensor_names is not None and "lm_head.weight" not in tensor_names

  gemma = {}
  if family == "gemma2":
    gemma = dict(family="gemma2", query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
                 logits_soft_cap=hf.get("attn_logit_softcapping"),
                 final_logit_soft_cap=hf.get("final_logit_softcapping"))
  ckpt_dtype = hf.get("dtype", hf.get("torch_dtype"))
  if ckpt_dtype not in ("float32", "bfloat16", "float16"):
    ckpt_dtype = "float32"
  param_dtype = ckpt_dtype if param_dtype is None else param_dtype
  dtype = param_dtype if dtype is None else dtype

  if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or rope_theta <= 0:
    raise ValueError(f"{source}: rope_theta must be a positive float; got {rope_theta!r}.")
  return DecoderConfig(
      vocab_size=_number(hf, "vocab_size", source, int),
      hidden_size=_number(hf, "hidden_size", source, int),
      intermediate_size=_number(hf, "intermediate_size", source, int),
      num_layers=_number(hf, "num_hidden_layers", source, int),
      num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      rope_theta=float(rope_theta),
      rms_norm_eps=_number(hf, "rms_norm_eps", source, float, default=1e-6),
      tie_word_embeddings=bool(tied), attention_bias=qkv_bias, attention_out_bias=out_bias,
      mlp_bias=mlp_bias,
      max_position_embeddings=_number(hf, "max_position_embeddings", source, int, default=2048),
      sliding_window=None if window is None else int(window), layer_types=per_layer,
      dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, **gemma)


# ---------------------------------------------------------------------------------------------
# safetensors reading

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_raw_safetensors(filename) -> Dict[str, np.ndarray]:
  """A minimal reader of the safetensors format, used only when the package cannot give NumPy
  arrays for a dtype (bfloat16 with old ``safetensors`` releases)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (a jax dependency)
  dtypes = dict(_ST_DTYPES, BF16=ml_dtypes.bfloat16)
  with open(filename, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise UnsupportedCheckpointError(f"{filename}: tensor {name} has unsupported dtype "
                                       f"{info['dtype']}.")
    start, end = info["data_offsets"]
    out[name] = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(
        info["shape"])
  return out


def read_safetensors(filename) -> Dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as NumPy arrays (bfloat16 via ``ml_dtypes``)."""
  try:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("load_hf_checkpoint needs the 'safetensors' package: "
                      "pip install 'gqa-pallas[hf]' (or pip install safetensors)") from e
  try:
    with safe_open(os.fspath(filename), framework="np") as f:
      return {name: f.get_tensor(name) for name in f.keys()}
  except (TypeError, ValueError) as e:  # e.g. bfloat16 on old releases
    if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
      raise ValueError(f"{filename}: not a readable safetensors file ({e}).") from e
    return _read_raw_safetensors(filename)
  except Exception as e:  # the library's own error types (e.g. SafetensorError)
    raise ValueError(f"{filename}: not a readable safetensors file ({type(e).__name__}: "
                     f"{e}).") from e


def read_checkpoint_tensors(path) -> Dict[str, np.ndarray]:
  """Tensors of ``model.safetensors`` or of every shard of ``model.safetensors.index.json``."""
  path = os.fspath(path)
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    weight_map = _read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()):
      raise ValueError(f"{index}: expected a 'weight_map' object of tensor name -> shard file.")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(path, shard)
      if not os.path.exists(shard_path):
        raise FileNotFoundError(f"{index} lists shard {shard}, which is missing.")
      tensors.update(read_safetensors(shard_path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise ValueError(f"{index}: tensors {missing[:5]} are listed but not in any shard.")
    return tensors
  if os.path.exists(single):
    return read_safetensors(single)
  found = sorted(os.listdir(path)) if os.path.isdir(path) else []
  raise FileNotFoundError(
      f"{path}: no model.safetensors or model.safetensors.index.json (found {found}). Only "
      "safetensors checkpoints are supported; convert .bin files with transformers' "
      "save_pretrained(safe_serialization=True).")


# ---------------------------------------------------------------------------------------------
# conversion


def convert_hf_tensors(config: DecoderConfig, tensors: Mapping[str, np.ndarray],
                       source: str = "checkpoint") -> Dict[str, Any]:
  """Maps HF tensor names/layouts onto the ``Decoder`` parameter tree (NumPy arrays)."""
  cfg = config
  n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
  used = set()

  def take(name, shape):
    if name not in tensors:
      raise ValueError(f"{source}: missing tensor {name!r} (expected shape {tuple(shape)}).")
    x = np.asarray(tensors[name])
    if tuple(x.shape) != tuple(shape):
      raise ValueError(f"{source}: tensor {name!r} has shape {tuple(x.shape)}, expected "
                       f"{tuple(shape)} for this config.")
    used.add(name)
    return x

  def linear(prefix, out_features, in_features, bias):
    w = take(prefix + ".weight", (out_features, in_features)).T  # [in, out]
    b = take(prefix + ".bias", (out_features,)) if bias else None
    return w, b

  layers = []
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    attn = {}
    for name, heads, proj in (("query", n, "q_proj"), ("key", k, "k_proj"),
                              ("value", k, "v_proj")):
      w, b = linear(p + "self_attn." + proj, heads * h, d, cfg.attention_bias)
      attn[name] = {"kernel": w.reshape(d, heads, h)}
      if b is not None:
        attn[name]["bias"] = b.reshape(heads, h)
    w, b = linear(p + "self_attn.o_proj", d, n * h, cfg.attention_out_bias)
    attn["out"] = {"kernel": w.reshape(n, h, d)}
    if b is not None:
      attn["out"]["bias"] = b
    mlp = {}
    for name, proj, fo, fi in (("gate", "gate_proj", cfg.intermediate_size, d),
                               ("up", "up_proj", cfg.intermediate_size, d),
                               ("down", "down_proj", d, cfg.intermediate_size)):
      w, b = linear(p + "mlp." + proj, fo, fi, cfg.mlp_bias)
      mlp[name] = {"kernel": w} if b is None else {"kernel": w, "bias": b}
    layer = {
        "input_norm": {"scale": take(p + "input_layernorm.weight", (d,))},
        "attn": attn,
        "post_attention_norm": {"scale": take(p + "post_attention_layernorm.weight", (d,))},
        "mlp": mlp,
    }
    if cfg.family == "gemma2":
      for name in ("pre_feedforward", "post_feedforward"):
        layer[f"{name}_norm"] = {"scale": take(p + f"{name}_layernorm.weight", (d,))}
    layers.append(layer)

  params = {
      "embed": {"embedding": take("model.embed_tokens.weight", (cfg.vocab_size, d))},
      "final_norm": {"scale": take("model.norm.weight", (d,))},
  }
  if cfg.tie_word_embeddings:
    used.add("lm_head.weight")  # Some tied checkpoints store a copy; the embedding is used.
  else:
    params["lm_head"] = {"kernel": take("lm_head.weight", (cfg.vocab_size, d)).T}
  if cfg.scan_layers:
    import jax  # pylint: disable=g-import-not-at-top
    params["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)
  else:
    for i, layer in enumerate(layers):
      params[f"layers_{i}"] = layer

  unexpected = sorted(name for name in tensors if name not in used and
                      not name.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise ValueError(f"{source}: unexpected tensors {unexpected[:8]}"
                     f"{' ...' if len(unexpected) > 8 else ''}; the checkpoint does not match a "
                     f"{cfg.num_layers}-layer Llama/Qwen2/Mistral decoder with this config.")
  return params


def load_hf_checkpoint(path, *, dtype=None, param_dtype=None, scan_layers: bool = False
                       ) -> Tuple[DecoderConfig, Dict[str, Any]]:
  """Loads a HF Llama / Qwen2 / Mistral / Gemma 2 causal-LM directory.

  Args:
    path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded
      ``model.safetensors.index.json``), as written by ``save_pretrained``.
    dtype: compute dtype; default: the parameter dtype.
    param_dtype: parameter dtype; default: the checkpoint's (bfloat16 stays bfloat16).
    scan_layers: stack layer parameters for ``nn.scan`` instead of the default ``layers_{i}``.

  Returns:
    ``(config, params)`` for ``Decoder(config).apply({"params": params}, tokens)``.

  Raises:
    UnsupportedCheckpointError (a ValueError): another architecture, RoPE scaling, an MLP
      activation the family does not use, quantization, mixed sliding/full layers under
      ``scan_layers``. ValueError: broken files, missing or mistyped config fields, missing,
      unexpected or misshapen tensors.
    FileNotFoundError: no config.json or no safetensors files.
  """
  path = os.fspath(path)
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path}: no config.json (expected a save_pretrained directory).")
  hf = _read_json(cfg_path, "config")
  tensors = read_checkpoint_tensors(path)
  config = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                          source=cfg_path,
                          tensor_names=set(tensors))
  params = convert_hf_tensors(config, tensors, source=path)
  del tensors
  pdt = config.params_dtype
  import jax  # pylint: disable=g-import-not-at-top
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=pdt), params)
  return config, params


def generation_defaults(path) -> Dict[str, Any]:
  """``eos_token_id`` etc. from ``generation_config.json`` (falling back to ``config.json``)."""
  out = {}
  for name in ("config.json", "generation_config.json"):
    p = os.path.join(os.fspath(path), name)
    if os.path.exists(p):
      data = _read_json(p, "generation config" if name.startswith("generation") else "config")
      for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if data.get(key) is not None:
          out[key] = data[key]
  return out
