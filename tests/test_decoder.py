"""The decoder, the generation loop, sampling, the checkpoint loader's refusals, and the CLI.

Parity with Hugging Face lives in ``test_hf_parity.py``; these tests run on the XLA path (fast)
unless they say otherwise.
"""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_layers import (Decoder, DecoderConfig, UnsupportedCheckpointError, generate,
                         generate_with_cache, init_cache, init_params, load_hf_checkpoint,
                         sample_logits, stack_layer_params, unstack_layer_params)
from flax_layers import generation

TINY = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
                     rms_norm_eps=1e-5)


def _random_params(config, seed=0, scale=4.0):
  """init_params with weights scaled up, so logits are far from uniform (argmax is stable)."""
  params = init_params(config, jax.random.PRNGKey(seed))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * scale, params)


@pytest.fixture(scope="module")
def tiny():
  return TINY, _random_params(TINY)


def _ragged_prompts(seed, lengths, width=None, vocab=64):
  rs = np.random.RandomState(seed)
  width = width or max(lengths)
  tokens = rs.randint(0, vocab, (len(lengths), width)).astype(np.int32)  # garbage padding
  return tokens, np.asarray(lengths, np.int32)


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
  windowed.check_sequence_length(8)
  with pytest.raises(ValueError, match="sliding window"):
    windowed.check_sequence_length(9)
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


# ---------------------------------------------------------------------------------------------
# sampling


def test_sample_logits_filters():
  probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
  logits = jnp.log(jnp.asarray(probs))[None].repeat(512, 0)
  keys = jax.random.PRNGKey(0)

  def support(**kw):
    return set(np.asarray(sample_logits(logits, keys, **kw)).tolist())

  assert support(temperature=0.0) == {0}
  assert support(temperature=1.0) == {0, 1, 2, 3}
  assert support(temperature=1.0, top_k=2) == {0, 1}
  assert support(temperature=1.0, top_k=1) == {0}
  assert support(temperature=1.0, top_p=0.75) == {0, 1}  # 0.5 < 0.75 <= 0.8
  assert support(temperature=1.0, top_p=0.4) == {0}  # the most likely token is always kept
  assert support(temperature=1.0, top_k=3, top_p=0.9) == {0, 1, 2}
  # Temperature sharpens: at T=0.05 nearly all mass is on the argmax.
  hot = np.asarray(sample_logits(logits, keys, temperature=0.05))
  assert np.mean(hot == 0) > 0.99
  with pytest.raises(ValueError, match="PRNG key"):
    sample_logits(logits, None, temperature=1.0)
  with pytest.raises(ValueError, match="top_p"):
    sample_logits(logits, keys, temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match="temperature"):
    sample_logits(logits, keys, temperature=-1.0)


# ---------------------------------------------------------------------------------------------
# generation


def _greedy_reference(config, params, prompt, n, width=16):
  """Greedy decoding by re-running the full forward (no cache) for every token."""
  seq = list(prompt)
  dec = Decoder(config, implementation="xla")
  fwd = jax.jit(lambda p, t: dec.apply({"params": p}, t))
  for _ in range(n):
    toks = np.zeros((1, width), np.int32)
    toks[0, :len(seq)] = seq
    seq.append(int(np.argmax(np.asarray(fwd(params, toks))[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_generate_greedy_eos_fill_and_no_retrace(tiny):
  config, params = tiny
  prompts, lengths = _ragged_prompts(0, [6, 2, 4])
  before = generation.trace_count()
  tokens, num = generate(config, params, prompts, lengths, 10, implementation="xla")
  tokens, num = np.asarray(tokens), np.asarray(num)
  chex.assert_shape(tokens, (3, 10))
  assert tokens.dtype == np.int32 and num.dtype == np.int32
  np.testing.assert_array_equal(num, 10)
  for b in range(3):
    assert tokens[b].tolist() == _greedy_reference(config, params, prompts[b, :lengths[b]], 10)

  # EOS: stop after the first EOS (counted), the rest is filled with it; the prefix is unchanged.
  eos = int(tokens[0, 3])
  t2, n2 = generate(config, params, prompts, lengths, 10, eos_token_id=eos, implementation="xla")
  t2, n2 = np.asarray(t2), np.asarray(n2)
  for b in range(3):
    hits = np.flatnonzero(tokens[b] == eos)
    stop = hits[0] + 1 if hits.size else 10
    assert n2[b] == stop
    np.testing.assert_array_equal(t2[b, :stop], tokens[b, :stop])
    assert np.all(t2[b, stop:] == eos)
  # The same shapes again, other prompt values and EOS settings: one trace for all three calls.
  other = np.random.RandomState(5).randint(0, 64, prompts.shape).astype(np.int32)
  generate(config, params, other, np.array([1, 6, 3], np.int32), 10, eos_token_id=7,
           implementation="xla")
  assert generation.trace_count() - before == 1
  # Several EOS ids (another static shape); the first one fills.
  eos2 = int(tokens[1, 1])
  t3, n3 = generate(config, params, prompts, lengths, 10, eos_token_id=[eos2, eos],
                    implementation="xla")
  stop = int(np.asarray(n3)[1])
  assert stop <= 2 and np.all(np.asarray(t3)[1, stop:] == eos2)


def test_generate_sampling_and_interpret_mode(tiny):
  config, params = tiny
  prompts, lengths = _ragged_prompts(1, [5, 3, 1])
  kw = dict(temperature=0.8, top_k=20, top_p=0.95)
  a = generate(config, params, prompts, lengths, 12, rng=jax.random.PRNGKey(1),
               implementation="xla", **kw)
  before = generation.trace_count()
  b = generate(config, params, prompts, lengths, 12, rng=jax.random.PRNGKey(1),
               implementation="xla", **kw)
  c = generate(config, params, prompts, lengths, 12, rng=jax.random.PRNGKey(2),
               implementation="xla", **dict(kw, temperature=1.3, top_p=0.9))
  assert generation.trace_count() == before  # temperature and top_p are traced values
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
  assert np.all((np.asarray(c[0]) >= 0) & (np.asarray(c[0]) < 64))
  # The loop through the Pallas kernels in interpret mode draws the same tokens.
  k = generate(config, params, prompts, lengths, 12, rng=jax.random.PRNGKey(1),
               implementation="triton", interpret=True, **kw)
  chex.assert_trees_all_equal(a, k)
  with pytest.raises(ValueError, match="PRNG key"):
    generate(config, params, prompts, lengths, 4, temperature=0.7)


def test_generate_with_cache_donates_and_continues(tiny):
  config, params = tiny
  # Two turns through one cache equal one generation over the concatenated prompt.
  first, second = [5, 9, 2, 17], [33, 4, 60]
  cache = init_cache(config, 1, 16)
  t1, n1, cache2 = generate_with_cache(config, params, cache, np.array([first], np.int32),
                                       np.array([4], np.int32), 1, implementation="xla")
  assert cache[0].k.is_deleted()  # donated
  np.testing.assert_array_equal(np.asarray(cache2[0].lengths), [4])
  t2, _, cache3 = generate_with_cache(config, params, cache2, np.array([second], np.int32),
                                      np.array([3], np.int32), 6, implementation="xla")
  np.testing.assert_array_equal(np.asarray(cache3[0].lengths), [4 + 3 + 5])
  whole, _ = generate(config, params, np.array([first + second], np.int32),
                      np.array([7], np.int32), 6, implementation="xla")
  np.testing.assert_array_equal(np.asarray(t2), np.asarray(whole))
  with pytest.raises(ValueError, match="cache slots"):
    generate_with_cache(config, params, cache3, np.array([second], np.int32),
                        np.array([3], np.int32), 4, implementation="xla")


def test_generate_input_errors(tiny):
  config, params = tiny
  prompts, lengths = _ragged_prompts(0, [3, 2])
  with pytest.raises(ValueError, match="prompt_lengths"):
    generate(config, params, prompts, np.array([0, 2]), 4)
  with pytest.raises(ValueError, match="prompt_lengths"):
    generate(config, params, prompts, np.array([4, 2]), 4)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(config, params, prompts, lengths, 0)
  with pytest.raises(ValueError, match="vocab_size"):
    generate(config, params, prompts + 64, lengths, 4)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    generate(config, params, prompts, lengths, 63)
  with pytest.raises(ValueError, match="eos_token_id"):
    generate(config, params, prompts, lengths, 4, eos_token_id=-3)


def test_bfloat16_generation(tiny):
  config, params = tiny
  cfg16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
  p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  prompts, lengths = _ragged_prompts(3, [4, 6])
  tokens, num, cache = generate_with_cache(cfg16, p16, init_cache(cfg16, 2, 12), prompts, lengths,
                                           6, implementation="xla")
  assert np.asarray(tokens).shape == (2, 6) and np.all(np.asarray(num) == 6)
  assert cache[0].k.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(cache[1].lengths), lengths + 5)


# ---------------------------------------------------------------------------------------------
# checkpoint loading (files written with safetensors directly; HF-written ones in the parity tests)


def _hf_config(**overrides):
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
         "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
         "tie_word_embeddings": False, "attention_bias": False, "dtype": "float32"}
  cfg.update(overrides)
  return cfg


def _hf_tensors(params, config, dtype=np.float32):
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


def _write(path, hf_config, tensors, shards=1):
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


def test_load_round_trip_sharded_and_bf16(tiny, tmp_path):
  config, params = tiny
  tensors = _hf_tensors(params, config)
  cfg, loaded = load_hf_checkpoint(_write(tmp_path / "single", _hf_config(), tensors))
  assert cfg == config
  chex.assert_trees_all_equal(loaded, params)
  cfg2, sharded = load_hf_checkpoint(_write(tmp_path / "sharded", _hf_config(), tensors,
                                            shards=3))
  chex.assert_trees_all_equal(sharded, params)
  cfg_scan, scan = load_hf_checkpoint(tmp_path / "single", scan_layers=True)
  chex.assert_trees_all_equal(scan, stack_layer_params(params, 2))

  import ml_dtypes
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  cfg16, p16 = load_hf_checkpoint(_write(tmp_path / "bf16", _hf_config(dtype="bfloat16"), bf16))
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
  legacy = _hf_config(rope_theta=500000.0, torch_dtype="float32", rope_scaling=None)
  del legacy["rope_parameters"], legacy["dtype"], legacy["tie_word_embeddings"]
  tied = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
  cfg_l, p_l = load_hf_checkpoint(_write(tmp_path / "legacy", legacy, tied))
  assert cfg_l.rope_theta == 500000.0 and cfg_l.tie_word_embeddings and "lm_head" not in p_l


@pytest.mark.parametrize("overrides, match", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "llama3"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096),
     "sliding"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
          sliding_window=32), "sliding"),
    (dict(layer_types=["full_attention", "sliding_attention"], sliding_window=16), "sliding"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantized"),
], ids=["arch", "llama3-rope", "linear-rope", "gelu", "mistral-window", "qwen2-window",
        "layer-types", "quantized"])
def test_loader_refuses_unsupported(tiny, tmp_path, overrides, match):
  config, params = tiny
  path = _write(tmp_path, _hf_config(**overrides), _hf_tensors(params, config))
  with pytest.raises(UnsupportedCheckpointError, match=match):
    load_hf_checkpoint(path)


def test_loader_sliding_window_opt_in(tiny, tmp_path):
  config, params = tiny
  path = _write(tmp_path, _hf_config(architectures=["MistralForCausalLM"], model_type="mistral",
                                     sliding_window=16), _hf_tensors(params, config))
  cfg, loaded = load_hf_checkpoint(path, allow_sliding_window=True)
  assert cfg.sliding_window == 16 and cfg.max_sequence_length == 16
  prompts, lengths = _ragged_prompts(0, [4, 3])
  generate(cfg, loaded, prompts, lengths, 13, implementation="xla")  # 4 + 13 - 1 = 16 positions
  with pytest.raises(ValueError, match="sliding window"):
    generate(cfg, loaded, prompts, lengths, 14, implementation="xla")


def test_loader_tensor_errors(tiny, tmp_path):
  config, params = tiny
  tensors = _hf_tensors(params, config)
  missing = dict(tensors)
  del missing["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    load_hf_checkpoint(_write(tmp_path / "missing", _hf_config(), missing))
  wrong = dict(tensors, **{"model.norm.weight": np.ones(31, np.float32)})
  with pytest.raises(ValueError, match="shape"):
    load_hf_checkpoint(_write(tmp_path / "shape", _hf_config(), wrong))
  extra = dict(tensors, **{"model.layers.2.mlp.up_proj.weight": np.ones((64, 32), np.float32)})
  with pytest.raises(ValueError, match="unexpected tensors"):
    load_hf_checkpoint(_write(tmp_path / "extra", _hf_config(), extra))
  ok = dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
  load_hf_checkpoint(_write(tmp_path / "invfreq", _hf_config(), ok))  # ignored
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text(json.dumps(_hf_config()))
  (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="safetensors"):
    load_hf_checkpoint(tmp_path / "bin")
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf_checkpoint(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_generate_random_model(capsys):
  from gqa_pallas.__main__ import main
  assert main(["generate", "--max-new-tokens", "5", "--batch", "2", "--json", "--no-warmup"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  rows = json.loads(out[0])
  assert len(rows) == 2 and all(len(r["new_ids"]) == 5 for r in rows)
  assert "tokens/s" in out[-1]


def test_cli_generate_checkpoint_with_tokenizer(tiny, tmp_path, capsys):
  tokenizers = pytest.importorskip("tokenizers")
  from gqa_pallas.__main__ import main
  config, params = tiny
  path = _write(tmp_path, _hf_config(eos_token_id=None), _hf_tensors(params, config))
  vocab = {f"w{i}": i for i in range(64)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(os.path.join(path, "tokenizer.json"))
  assert main(["generate", "--checkpoint", str(path), "--prompt", "w1 w2 w3",
               "--max-new-tokens", "4", "--no-warmup"]) == 0
  out = capsys.readouterr().out
  assert "[0] prompt ids: 1 2 3" in out and "[0] text: w" in out and "tokens/s" in out
  # Token ids agree with the Python API.
  assert main(["generate", "--checkpoint", str(path), "--prompt-ids", "1 2 3",
               "--max-new-tokens", "4", "--json", "--no-warmup"]) == 0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[0])[0]
  expected, _ = generate(config, params, np.array([[1, 2, 3]], np.int32), np.array([3]), 4,
                         implementation="xla")
  assert row["new_ids"] == np.asarray(expected)[0].tolist()
  assert row["text"] == " ".join(f"w{i}" for i in row["new_ids"])


def test_cli_demo(capsys):
  """The README's main job (`make demo`), shortened."""
  from gqa_pallas.__main__ import main
  assert main(["demo", "--max-new-tokens", "6"]) == 0
  out = capsys.readouterr().out
  assert "max |kernel - reference|" in out and "tokens/s" in out
  assert "identical tokens" in out and "demo passed" in out
