"""Parity with Hugging Face transformers (PyTorch, float32, eager attention).

Tiny random-weight ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` models are
written with ``save_pretrained`` and loaded with ``load_hf_checkpoint`` (one Mistral with a sliding
window shorter than its prompts). Checked, with the Pallas
kernels in interpret mode on CPU (and compiled on a GPU, ``-m gpu``; HF stays on the CPU):

* full-sequence logits within 1e-4 relative (``max|ours - hf| / max|hf|``);
* prefill of ragged right-padded prompts, then step-wise decode, token for token against the
  logits of HF's full-sequence forward over prompt + continuation;
* greedy generation of 24 tokens for a batch of prompts of different lengths, token for token
  against HF ``generate`` (run per prompt, so HF needs no padding), also with an EOS stop.
"""
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from flax_layers import Decoder, generate, init_cache, load_hf_checkpoint  # noqa: E402

REL_TOL = 1e-4
VOCAB = 96


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  family: str  # llama | qwen2 | mistral | gemma2
  hidden: int
  heads: int
  kv_heads: int
  head_dim: int
  layers: int
  tied: bool = False
  attention_bias: bool = False  # Llama only (q/k/v and o)
  scan_layers: bool = False  # nn.scan layout and a layer-stacked cache
  window: int | None = None  # Mistral's / Qwen2's sliding_window
  window_from: int = 0  # Qwen2's max_window_layers: layers below it attend in full

  @property
  def ratio(self):
    return self.heads // self.kv_heads


CASES = [
    # GQA ratio 2, head_dim == hidden / heads.
    Case("llama-g2", "llama", hidden=64, heads=4, kv_heads=2, head_dim=16, layers=2),
    # GQA ratio 4, head_dim != hidden / heads (64 / 8 = 8), biases everywhere, 3 layers.
    Case("llama-g4-hd16-bias", "llama", hidden=64, heads=8, kv_heads=2, head_dim=16, layers=3,
         attention_bias=True),
    # Qwen2: q/k/v bias, no o bias; ratio 4 with head_dim 32 != 64 / 4; tied embeddings.
    Case("qwen2-g4-hd32-tied", "qwen2", hidden=64, heads=4, kv_heads=1, head_dim=32, layers=2,
         tied=True),
    # Qwen2 ratio 2, head_dim == hidden / heads, untied; layers under nn.scan.
    Case("qwen2-g2-scan", "qwen2", hidden=64, heads=4, kv_heads=2, head_dim=16, layers=2,
         scan_layers=True),
    # Mistral (no sliding window), ratio 2, head_dim == hidden / heads.
    Case("mistral-g2", "mistral", hidden=32, heads=2, kv_heads=1, head_dim=16, layers=2),
    # Mistral with a window shorter than the prompts (5 < 9, 13) and the generations.
    Case("mistral-window5", "mistral", hidden=32, heads=4, kv_heads=2, head_dim=16, layers=2,
         window=5),
    # Qwen2 whose first layer attends in full and whose second slides (window 4).
    Case("qwen2-mixed-window4", "qwen2", hidden=32, heads=4, kv_heads=2, head_dim=16, layers=2,
         window=4, window_from=1),
    # Gemma 2: sliding (window 4) and global layers alternating, attention and final soft-caps
    # small enough to bite, query_pre_attn_scalar != head_dim, tied embeddings.
    Case("gemma2-window4-caps", "gemma2", hidden=32, heads=4, kv_heads=2, head_dim=16, layers=2,
         tied=True, window=4),
]

# (implementation, interpret, precision): the kernels in interpret mode on CPU and compiled on a
# GPU; the XLA path too for the (cheap) full-sequence check.
BACKENDS = [
    pytest.param(("triton", True, None), id="interpret"),
    pytest.param(("triton", False, "highest"), id="gpu", marks=pytest.mark.gpu),
]
ALL_BACKENDS = BACKENDS + [pytest.param(("xla", False, None), id="xla")]


def _hf_model(case: Case, seed: int):
  from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM,
                            MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
  common = dict(vocab_size=VOCAB, hidden_size=case.hidden, intermediate_size=2 * case.hidden,
                num_hidden_layers=case.layers, num_attention_heads=case.heads,
                num_key_value_heads=case.kv_heads, head_dim=case.head_dim,
                max_position_embeddings=256, rope_theta=5000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=case.tied, initializer_range=0.1,
                attn_implementation="eager", bos_token_id=None, eos_token_id=None,
                pad_token_id=None)
  if case.family == "llama":
    cfg, cls = LlamaConfig(**common, attention_bias=case.attention_bias,
                           mlp_bias=case.attention_bias), LlamaForCausalLM
  elif case.family == "qwen2":
    cfg, cls = Qwen2Config(**common, use_sliding_window=case.window is not None,
                           sliding_window=case.window, max_window_layers=case.window_from
                           ), Qwen2ForCausalLM
  elif case.family == "gemma2":
    cfg, cls = Gemma2Config(**common, sliding_window=case.window, query_pre_attn_scalar=24,
                            attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                            hidden_activation="gelu_pytorch_tanh"), Gemma2ForCausalLM
  else:
    cfg, cls = MistralConfig(**common, sliding_window=case.window), MistralForCausalLM
  torch.manual_seed(seed)
  model = cls(cfg).float().eval()
  with torch.no_grad():  # Norm weights start at one and biases at zero: make them matter.
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def loaded(request, tmp_path_factory):
  case = request.param
  model = _hf_model(case, seed=CASES.index(case))
  path = tmp_path_factory.mktemp(case.name)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model.save_pretrained(path)
  config, params = load_hf_checkpoint(path, scan_layers=case.scan_layers)
  assert config.scan_layers == case.scan_layers
  assert config.num_heads // config.num_kv_heads == case.ratio
  assert config.head_dim == case.head_dim
  assert config.tie_word_embeddings == case.tied
  assert config.attention_bias == (case.family == "qwen2" or case.attention_bias)
  if case.family == "gemma2":
    assert config.layer_types == ("sliding_attention", "full_attention")
    assert (config.logits_soft_cap, config.final_logit_soft_cap) == (5.0, 3.0)
  assert config.attention_out_bias == case.attention_bias
  assert config.sliding_window == case.window
  return case, model, config, params


def _rel_err(ours, ref):
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  assert np.all(np.isfinite(ours))
  return np.max(np.abs(ours - ref)) / np.max(np.abs(ref))


def _precision_ctx(precision):
  return jax.default_matmul_precision(precision) if precision else _nullctx()


class _nullctx:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_full_sequence_logits(loaded, backend):
  case, model, config, params = loaded
  impl, interpret, precision = backend
  tokens = np.random.RandomState(1).randint(0, VOCAB, (2, 13))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  with _precision_ctx(precision):
    ours = Decoder(config, implementation=impl, interpret=interpret,
                   precision=precision).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
  assert ours.shape == (2, 13, VOCAB)
  err = _rel_err(ours, ref)
  assert err <= REL_TOL, f"{case.name}: full-sequence logits rel err {err:.2e}"


def _hf_prefill_decode(model, prompt, continuation):
  """What a prefill of ``prompt`` then one decode step per ``continuation`` token must give: HF's
  logits of the prompt's last token and of each continuation token, ``[1 + steps, vocab]``.

  Taken from one full-sequence forward of ``prompt + continuation`` (the model is causal, so
  position ``i``'s logits depend on tokens ``<= i`` alone), not from HF's own KV cache: no
  ``past_key_values`` (going away in transformers), and a reference without cache machinery.
  """
  with torch.no_grad():
    out = model(torch.tensor([list(prompt) + list(continuation)]), use_cache=False)
  return out.logits[0, len(prompt) - 1:].numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_then_decode_logits(loaded, backend):
  case, model, config, params = loaded
  impl, interpret, precision = backend
  rs = np.random.RandomState(2)
  lengths = np.array([9, 4, 6], np.int32)
  prompts = rs.randint(0, VOCAB, (3, 9)).astype(np.int32)
  prompts[1, 4:] = rs.randint(0, VOCAB, 5)  # Right padding: garbage that must be ignored.
  steps = 5
  cont = rs.randint(0, VOCAB, (3, steps)).astype(np.int32)
  dec = Decoder(config, implementation=impl, interpret=interpret, precision=precision)

  @jax.jit
  def run(params, prompts, lengths, cont):
    cache = init_cache(config, 3, 9 + steps)
    logits, cache = dec.apply({"params": params}, prompts, cache=cache, num_new=lengths,
                              logits_index=lengths - 1)

    def step(cache, tok):
      logits, cache = dec.apply({"params": params}, tok[:, None], cache=cache)
      return cache, logits[:, 0]

    cache, decoded = jax.lax.scan(step, cache, cont.T)
    out = jnp.concatenate([logits[:, None], jnp.moveaxis(decoded, 0, 1)], axis=1)
    return out, cache.lengths[0] if config.scan_layers else cache[0].lengths

  with _precision_ctx(precision):
    ours, final_lengths = run(params, prompts, lengths, cont)
  np.testing.assert_array_equal(np.asarray(final_lengths), lengths + steps)
  for b in range(3):
    ref = _hf_prefill_decode(model, prompts[b, :lengths[b]].tolist(), cont[b].tolist())
    err = _rel_err(ours[b], ref)
    assert err <= REL_TOL, f"{case.name} row {b}: prefill/decode logits rel err {err:.2e}"


def _hf_greedy(model, prompt, max_new_tokens, eos=None):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                           dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
  return out[0, len(prompt):].numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_matches_hf(loaded, backend):
  case, model, config, params = loaded
  impl, interpret, precision = backend
  rs = np.random.RandomState(3)
  lengths = np.array([9, 3, 6, 1], np.int32)
  prompts = np.zeros((4, 9), np.int32)
  for b, n in enumerate(lengths):
    prompts[b, :n] = rs.randint(0, VOCAB, n)
  with _precision_ctx(precision):
    tokens, num = generate(config, params, prompts, lengths, 24, implementation=impl,
                           interpret=interpret, precision=precision)
  tokens, num = np.asarray(tokens), np.asarray(num)
  assert tokens.shape == (4, 24) and tokens.dtype == np.int32
  np.testing.assert_array_equal(num, 24)
  refs = [_hf_greedy(model, prompts[b, :lengths[b]].tolist(), 24) for b in range(4)]
  for b in range(4):
    np.testing.assert_array_equal(tokens[b], refs[b], err_msg=f"{case.name} row {b}")

  # With an EOS: pick a token HF emits mid-way in row 0; every row stops where HF stops.
  eos = int(refs[0][7])
  with _precision_ctx(precision):
    tokens, num = generate(config, params, prompts, lengths, 24, eos_token_id=eos,
                           implementation=impl, interpret=interpret, precision=precision)
  tokens, num = np.asarray(tokens), np.asarray(num)
  for b in range(4):
    ref = _hf_greedy(model, prompts[b, :lengths[b]].tolist(), 24, eos=eos)
    ref = ref[:list(ref).index(eos) + 1] if eos in ref else ref
    assert num[b] == len(ref), (b, num[b], ref)
    np.testing.assert_array_equal(tokens[b, :num[b]], ref)
    assert np.all(tokens[b, num[b]:] == eos)
