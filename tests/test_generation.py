"""The jit generation loop and sampling: greedy decoding against the full forward, EOS, no
retrace, interpret mode, donated caches, input errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_layers import Decoder, generate, generate_with_cache, init_cache, sample_logits
from flax_layers import generation
from tests.decoder_fixtures import ragged_prompts


# ---------------------------------------------------------------------------------------------
# generation


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
  prompts, lengths = ragged_prompts(0, [6, 2, 4])
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
  # The runtime step limit (what the e2e benchmark times): the same program stopped after 4
  # tokens gives their prefix, the rest filled (0 without an EOS), and no retrace.
  t4, n4 = generation._run(  # pylint: disable=protected-access
      config, params, None, jnp.asarray(prompts), jnp.asarray(lengths, jnp.int32), 10,
      rng=None, temperature=0.0, greedy=True, top_k=None, use_top_p=False, top_p=None,
      eos_token_id=None, implementation="xla", interpret=False, precision=None,
      fresh_cache=(prompts.shape[1] + 9, "float32"), steps=4)[:2]
  assert generation.trace_count() - before == 1
  np.testing.assert_array_equal(np.asarray(n4), 4)
  np.testing.assert_array_equal(np.asarray(t4)[:, :4], tokens[:, :4])
  assert np.all(np.asarray(t4)[:, 4:] == 0)
  # Several EOS ids (another static shape); the first one fills.
  eos2 = int(tokens[1, 1])
  t3, n3 = generate(config, params, prompts, lengths, 10, eos_token_id=[eos2, eos],
                    implementation="xla")
  stop = int(np.asarray(n3)[1])
  assert stop <= 2 and np.all(np.asarray(t3)[1, stop:] == eos2)


def test_generate_builds_its_cache_inside_the_program(tiny, monkeypatch):
  """Host overhead: no eager per-layer cache allocation before the call; the result equals
  generate_with_cache over an eagerly built cache."""
  config, params = tiny
  prompts, lengths = ragged_prompts(3, [5, 3])
  built = []
  real = generation.init_cache

  def spy(*args, **kwargs):
    cache = real(*args, **kwargs)
    built.append(isinstance(jax.tree_util.tree_leaves(cache)[0], jax.core.Tracer))
    return cache

  monkeypatch.setattr(generation, "init_cache", spy)
  tokens, num = generate(config, params, prompts, lengths, 6, implementation="xla",
                         max_length=17)  # a cache length no other test compiles
  assert built == [True]  # traced once, inside jit; nothing built eagerly
  monkeypatch.undo()
  want, want_num, _ = generate_with_cache(config, params, init_cache(config, 2, 17), prompts,
                                          lengths, 6, implementation="xla")
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(num), np.asarray(want_num))


def test_generate_moves_host_inputs_with_the_call(tiny, monkeypatch):
  """Host overhead: NumPy prompts, the default key, the sampling scalars, the EOS ids and the
  step limit reach the compiled program as NumPy values (no eager transfer or read-back of
  their own before it); device prompts stay as given."""
  config, params = tiny
  prompts, lengths = ragged_prompts(3, [5, 3])
  prompts, lengths = np.asarray(prompts), np.asarray(lengths)
  seen = []
  real = generation._generate_jit  # pylint: disable=protected-access

  def spy(*args, **kwargs):
    seen.append(args[2:])
    return real(*args, **kwargs)

  monkeypatch.setattr(generation, "_generate_jit", spy)
  want = generate(config, params, prompts.tolist(), lengths.tolist(), 4, implementation="xla",
                  eos_token_id=[7, 3])
  for host in seen[0]:
    assert isinstance(host, (np.ndarray, np.generic)), type(host)
  assert seen[0][0].dtype == np.int32 and seen[0][1].dtype == np.int32
  got = generate(config, params, jnp.asarray(prompts), jnp.asarray(lengths), 4,
                 implementation="xla", eos_token_id=[7, 3])
  assert isinstance(seen[1][0], jax.Array) and isinstance(seen[1][1], jax.Array)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generate_sampling_and_interpret_mode(tiny):
  config, params = tiny
  prompts, lengths = ragged_prompts(1, [5, 3, 1])
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
  prompts, lengths = ragged_prompts(0, [3, 2])
  with pytest.raises(ValueError, match="prompt_lengths"):
    generate(config, params, prompts, np.array([0, 2]), 4)
  with pytest.raises(ValueError, match="prompt_lengths"):
    generate(config, params, prompts, np.array([4, 2]), 4)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(config, params, prompts, lengths, 0)
  with pytest.raises(ValueError, match=r"prompt_tokens\[0, 0\] = .* is outside \[0, vocab_size"):
    generate(config, params, prompts + 64, lengths, 4)
  # Padding past prompt_lengths may hold anything (here -1 and the vocabulary size).
  padded = np.asarray(prompts).copy()
  for row, n in enumerate(np.asarray(lengths)):
    padded[row, n:] = -1 if row % 2 else config.vocab_size
  np.testing.assert_array_equal(np.asarray(generate(config, params, padded, lengths, 3)[0]),
                                np.asarray(generate(config, params, prompts, lengths, 3)[0]))
  with pytest.raises(ValueError, match="max_position_embeddings"):
    generate(config, params, prompts, lengths, 63)
  with pytest.raises(ValueError, match="eos_token_id"):
    generate(config, params, prompts, lengths, 4, eos_token_id=-3)


def test_bfloat16_generation(tiny):
  config, params = tiny
  cfg16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
  p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  prompts, lengths = ragged_prompts(3, [4, 6])
  tokens, num, cache = generate_with_cache(cfg16, p16, init_cache(cfg16, 2, 12), prompts, lengths,
                                           6, implementation="xla")
  assert np.asarray(tokens).shape == (2, 6) and np.all(np.asarray(num) == 6)
  assert cache[0].k.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(cache[1].lengths), lengths + 5)


