"""``flax_layers`` attention: a drop-in for Flax's attention in linen and NNX.

Covers parameter names/shapes and defaults against ``nn.MultiHeadDotProductAttention``, loading a
Flax MHA checkpoint, GQA against MHA with repeated K/V weights, RoPE against a NumPy transcription
of HF Llama's ``rotate_half`` code, the explicit-mask / dropout / sow fallbacks, extra batch dims,
gradients, ``gqa_dot_product_attention`` inside ``nn.MultiHeadDotProductAttention`` and
``nnx.MultiHeadAttention``, the NNX twin, and the Pallas kernels (interpret mode) in the layer.

Tolerances follow design.md: float32 on CPU ``max|o - r| <= 1e-5 * max|r|``.
"""
import dataclasses
import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from flax_layers import (GQAAttention, GQAAttentionNNX, apply_rotary_embedding,
                         gqa_dot_product_attention, rope, rope_inv_freq)
from gqa_pallas import KVCache, attention_reference

HIGHEST = jax.lax.Precision.HIGHEST





def assert_f32_close(out, ref, rel=1e-5, name="output"):
  """design.md's float32 rule on CPU: ``max|o - r| <= rel * max|r|``."""
  ref = np.asarray(ref, np.float64)
  out = np.asarray(out, np.float64)
  chex.assert_shape(out, ref.shape)
  assert np.all(np.isfinite(out)), f"{name}: non-finite values"
  chex.assert_trees_all_close(out, ref, atol=rel * max(np.abs(ref).max(), 1e-30) + 1e-7, rtol=0)


def assert_grads_close(g, g_ref, rel=1e-5):
  """Gradient trees, relative to the largest gradient entry (some, like the key bias's, are
  mathematically zero and numerically noise)."""
  scale = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(g_ref))
  chex.assert_trees_all_close(g, g_ref, atol=rel * scale, rtol=0)


def _rand(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _rng():
  return np.random.default_rng()


def hf_rope_numpy(x, positions, theta):
  """HF LlamaRotaryEmbedding + apply_rotary_pos_emb, transcribed in NumPy.

  As HF, ``inv_freq`` and ``freqs = position * inv_freq`` are float32 (at large positions the
  angle's float32 rounding is part of the definition); the rest is float64.
  """
  x = np.asarray(x, np.float64)  # [B, T, heads, H]
  h = x.shape[-1]
  inv_freq = (1.0 / (theta ** (np.arange(0, h, 2).astype(np.float32) / h))).astype(np.float32)
  freqs = (np.asarray(positions, np.float32)[..., None] * inv_freq).astype(np.float64)
  emb = np.concatenate([freqs, freqs], -1)
  cos, sin = np.cos(emb)[:, :, None, :], np.sin(emb)[:, :, None, :]
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  rot = np.concatenate([-x2, x1], -1)
  return x * cos + rot * sin


_jit_reference = jax.jit(attention_reference, static_argnames=("causal",))


def layer_reference(params, xq, xkv=None, *, rope_theta=None, causal=False, positions=None,
                    q_offset=None, kv_lengths=None, use_out_bias=True):
  """The layer written out: projections, HF RoPE (NumPy), ``attention_reference``, output."""
  xkv = xq if xkv is None else xkv
  p = params["params"] if "params" in params else params
  proj = lambda x, d: jnp.einsum("btd,dnh->btnh", x, d["kernel"], precision=HIGHEST) + d.get(
      "bias", 0)
  q, k, v = proj(xq, p["query"]), proj(xkv, p["key"]), proj(xkv, p["value"])
  if rope_theta is not None:
    b, t = q.shape[:2]
    pos = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
    q = jnp.asarray(hf_rope_numpy(q, pos, rope_theta), jnp.float32)
    k = jnp.asarray(hf_rope_numpy(k, pos, rope_theta), jnp.float32)
  o = _jit_reference(q, k, v, causal=causal, q_offset=q_offset, kv_lengths=kv_lengths)
  y = jnp.einsum("btnh,nhd->btd", o, p["out"]["kernel"], precision=HIGHEST)
  return y + p["out"]["bias"] if use_out_bias else y


# --------------------------------------------------------------------------------------------
# Parameters, defaults, checkpoint compatibility.
# --------------------------------------------------------------------------------------------


def test_param_names_and_shapes():
  d, n, k, h = 24, 6, 2, 8
  x = _rand(0, (2, 5, d))
  m = GQAAttention(num_heads=n, num_kv_heads=k, head_dim=h, out_features=20, use_out_bias=False)
  shapes = jax.tree.map(jnp.shape, m.init(jax.random.key(0), x))["params"]
  assert shapes == {
      "query": {"kernel": (d, n, h), "bias": (n, h)},
      "key": {"kernel": (d, k, h), "bias": (k, h)},
      "value": {"kernel": (d, k, h), "bias": (k, h)},
      "out": {"kernel": (n, h, 20)},
  }
  mn = GQAAttentionNNX(n, d, num_kv_heads=k, head_dim=h, out_features=20, use_out_bias=False,
                       rngs=nnx.Rngs(0))
  nshapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(mn, nnx.Param)))
  assert nshapes == shapes
  chex.assert_shape(mn(x), (2, 5, 20))


def test_defaults_match_flax_mha():
  ours = {f.name: f for f in dataclasses.fields(GQAAttention)}
  theirs = {f.name: f for f in dataclasses.fields(nn.MultiHeadDotProductAttention)}
  skip = {"parent", "name", "attention_fn", "qk_attn_weights_einsum_cls",
          "attn_weights_value_einsum_cls"}
  for name, f in theirs.items():
    if name in skip:
      continue
    assert name in ours, f"missing attribute {name}"
    if f.default is not dataclasses.MISSING:
      assert ours[name].default is f.default or ours[name].default == f.default, name


def test_head_dim_and_errors():
  x = _rand(0, (1, 3, 16))
  m = GQAAttention(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="divisible by num_kv_heads"):
    m.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="qkv_features"):
    GQAAttention(num_heads=4, head_dim=8, qkv_features=16).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="divisible by number of heads"):
    GQAAttention(num_heads=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="divisible"):
    GQAAttentionNNX(4, 16, num_kv_heads=3, rngs=nnx.Rngs(0))
  # head_dim decoupled from the model width (HF config.head_dim).
  v = GQAAttention(num_heads=4, num_kv_heads=2, head_dim=16).init(jax.random.key(0), x)
  assert v["params"]["query"]["kernel"].shape == (16, 4, 16)


@pytest.mark.parametrize("kind", ["plain", "causal_mask", "padding_mask"])
def test_loads_flax_mha_checkpoint(kind):
  b, t, d, n = 2, 7, 32, 4
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  mha = nn.MultiHeadDotProductAttention(num_heads=n, precision=HIGHEST)
  params = mha.init(jax.random.key(1), x)
  ours = GQAAttention(num_heads=n, precision=HIGHEST, implementation="xla")
  chex.assert_trees_all_equal_shapes_and_dtypes(params, ours.init(jax.random.key(1), x))
  if kind == "plain":
    assert_f32_close(ours.apply(params, x), mha.apply(params, x))
  elif kind == "causal_mask":
    mask = nn.make_causal_mask(jnp.ones((b, t)))
    ref = mha.apply(params, x, mask=mask)
    assert_f32_close(ours.clone(is_causal=True).apply(params, x), ref)  # kernel path, no mask
    assert_f32_close(ours.apply(params, x, mask=mask), ref)  # XLA fallback, Flax float mask
  else:
    valid = jnp.arange(t)[None] < jnp.array([[t], [4]])
    mask = nn.make_attention_mask(valid, valid)
    ref = np.where(valid[..., None], mha.apply(params, x, mask=mask), 0)
    out = np.where(valid[..., None], ours.apply(params, x, mask=mask), 0)
    assert_f32_close(out, ref)  # fully masked (padding) query rows differ by design


def test_gqa_equals_mha_with_repeated_kv_weights():
  b, t, d, n, k = 2, 9, 32, 8, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  m = GQAAttention(num_heads=n, num_kv_heads=k, is_causal=True, precision=HIGHEST,
                   implementation="xla")
  params = m.init(jax.random.key(2), x)
  rep = lambda tree: jax.tree.map(lambda a: jnp.repeat(a, n // k, axis=-2), tree)
  p = params["params"]
  mha_params = {"params": dict(p, key=rep(p["key"]), value=rep(p["value"]))}
  mha = nn.MultiHeadDotProductAttention(num_heads=n, precision=HIGHEST)
  ref = mha.apply(mha_params, x, mask=nn.make_causal_mask(jnp.ones((b, t))))
  assert_f32_close(m.apply(params, x), ref)
  assert_f32_close(m.apply(params, x), layer_reference(params, x, causal=True))


# --------------------------------------------------------------------------------------------
# RoPE.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_rope_matches_hf(theta):
  rng = _rng()
  b, t, heads, h = 2, 11, 3, 16
  x = _rand(rng.integers(1 << 30), (b, t, heads, h))
  pos = jnp.asarray(rng.integers(0, 4000, (b, t)), jnp.int32)
  assert_f32_close(apply_rotary_embedding(x, pos, theta=theta), hf_rope_numpy(x, pos, theta),
                   rel=2e-5)
  np.testing.assert_allclose(rope_inv_freq(h, theta),
                             1.0 / theta ** (np.arange(0, h, 2) / h), rtol=1e-6)
  cos, sin = rope(pos, h, theta)
  chex.assert_shape((cos, sin), (b, t, h))
  # Position 0 is the identity; a rotation preserves norms; scores depend on offsets only.
  chex.assert_trees_all_close(apply_rotary_embedding(x, jnp.zeros((b, t), jnp.int32)), x)
  q, k = _rand(1, (1, 1, 1, h)), _rand(2, (1, 1, 1, h))
  score = lambda i, j: jnp.sum(apply_rotary_embedding(q, jnp.array([[i]]), theta=theta) *
                               apply_rotary_embedding(k, jnp.array([[j]]), theta=theta))
  np.testing.assert_allclose(score(5, 2), score(105, 102), rtol=1e-4)
  with pytest.raises(ValueError, match="even head_dim"):
    rope_inv_freq(7)


def test_layer_with_rope_and_positions_matches_reference():
  rng = _rng()
  b, t, d, n, k = 2, 10, 32, 4, 2
  x = _rand(rng.integers(1 << 30), (b, t, d))
  m = GQAAttention(num_heads=n, num_kv_heads=k, rope_theta=10000.0, is_causal=True,
                   precision=HIGHEST, implementation="xla")
  params = m.init(jax.random.key(3), x)
  assert_f32_close(m.apply(params, x), layer_reference(params, x, rope_theta=1e4, causal=True))
  pos = jnp.asarray(rng.integers(0, 100, (b, t)), jnp.int32)
  assert_f32_close(m.apply(params, x, positions=pos),
                   layer_reference(params, x, rope_theta=1e4, causal=True, positions=pos))


# --------------------------------------------------------------------------------------------
# Fallbacks: masks, dropout, sown weights, batch dims, dtypes.
# --------------------------------------------------------------------------------------------


def test_mask_fallback_matches_reference():
  b, t, d, n, k = 2, 8, 32, 4, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  m = GQAAttention(num_heads=n, num_kv_heads=k, is_causal=True, precision=HIGHEST,
                   implementation="xla")
  params = m.init(jax.random.key(4), x)
  lengths = jnp.array([8, 5], jnp.int32)
  key_mask = (jnp.arange(t)[None, :] < lengths[:, None])[:, None, None, :]  # bool [B,1,1,S]
  ref = layer_reference(params, x, causal=True, kv_lengths=lengths, q_offset=jnp.zeros(
      (b,), jnp.int32))
  assert_f32_close(m.apply(params, x, mask=key_mask), ref)
  # A mask that hides everything gives zeros before the output projection, never NaN.
  out = m.apply(params, x, mask=jnp.zeros((b, 1, t, t), bool))
  chex.assert_trees_all_close(out, jnp.broadcast_to(params["params"]["out"]["bias"], out.shape))


@pytest.mark.parametrize("broadcast_dropout", [True, False])
def test_dropout_matches_flax(broadcast_dropout):
  b, t, d, n = 2, 6, 16, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  kw = dict(num_heads=n, dropout_rate=0.3, broadcast_dropout=broadcast_dropout, precision=HIGHEST)
  mha = nn.MultiHeadDotProductAttention(**kw)
  params = mha.init(jax.random.key(5), x, deterministic=True)
  rngs = {"dropout": jax.random.key(6)}
  ref = mha.apply(params, x, deterministic=False, rngs=rngs)
  out = GQAAttention(**kw).apply(params, x, deterministic=False, rngs=rngs)
  assert_f32_close(out, ref)
  assert not np.allclose(out, GQAAttention(**kw).apply(params, x, deterministic=True))
  with pytest.raises(Exception, match="deterministic"):
    GQAAttention(**kw).apply(params, x)  # Flax's merge_param error


def test_sow_weights_like_flax():
  b, t, d, n = 2, 5, 16, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  mha = nn.MultiHeadDotProductAttention(num_heads=n, precision=HIGHEST)
  params = mha.init(jax.random.key(7), x)
  _, theirs = mha.apply(params, x, sow_weights=True, mutable=["intermediates"])
  _, ours = GQAAttention(num_heads=n, precision=HIGHEST).apply(params, x, sow_weights=True,
                                                               mutable=["intermediates"])
  w_ref = theirs["intermediates"]["attention_weights"][0]
  w = ours["intermediates"]["attention_weights"][0]
  chex.assert_shape(w, (b, n, t, t))
  assert_f32_close(w, w_ref)


def test_extra_batch_dims_and_unbatched():
  d, n, k, t = 16, 4, 2, 6
  x = _rand(_rng().integers(1 << 30), (2, 3, t, d))
  m = GQAAttention(num_heads=n, num_kv_heads=k, is_causal=True, precision=HIGHEST,
                   implementation="xla")
  params = m.init(jax.random.key(8), x)
  y = m.apply(params, x)
  chex.assert_shape(y, (2, 3, t, d))
  assert_f32_close(y, m.apply(params, x.reshape(6, t, d)).reshape(y.shape))
  assert_f32_close(m.apply(params, x[0, 0]), y[0, 0])
  mask = nn.make_causal_mask(jnp.ones((2, 3, t)))  # [2, 3, 1, T, T]
  assert_f32_close(m.clone(is_causal=False).apply(params, x, mask=mask), y)


def test_bfloat16_layer():
  b, t, d, n, k = 2, 8, 32, 4, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  m32 = GQAAttention(num_heads=n, num_kv_heads=k, is_causal=True, rope_theta=1e4,
                     precision=HIGHEST, implementation="xla")
  params = m32.init(jax.random.key(9), x)
  y16 = m32.clone(dtype=jnp.bfloat16).apply(params, x)
  assert y16.dtype == jnp.bfloat16
  ref = m32.apply(params, x)
  err = np.abs(np.asarray(y16, np.float32) - ref).max()
  assert err <= 0.05 * np.abs(ref).max(), err


def test_gradients_match_flax_mha():
  b, t, d, n = 2, 6, 16, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  mha = nn.MultiHeadDotProductAttention(num_heads=n, precision=HIGHEST)
  params = mha.init(jax.random.key(10), x)
  mask = nn.make_causal_mask(jnp.ones((b, t)))
  ours = GQAAttention(num_heads=n, is_causal=True, precision=HIGHEST, implementation="xla")
  loss = lambda f: (lambda p: jnp.sum(jnp.sin(f(p))))
  g_ref = jax.grad(loss(lambda p: mha.apply(p, x, mask=mask)))(params)
  g = jax.grad(loss(lambda p: ours.apply(p, x)))(params)
  chex.assert_tree_all_finite(g)
  assert_grads_close(g, g_ref)


# --------------------------------------------------------------------------------------------
# attention_fn inside Flax's own modules.
# --------------------------------------------------------------------------------------------

XLA_FN = functools.partial(gqa_dot_product_attention, implementation="xla")


@pytest.mark.parametrize("kind", ["none", "causal", "padding", "dropout", "sow", "batch_dims"])
def test_attention_fn_in_linen_mha(kind):
  b, t, d, n = 2, 7, 16, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  kw = dict(num_heads=n, precision=HIGHEST)
  if kind == "dropout":
    kw.update(dropout_rate=0.25)
  if kind == "batch_dims":
    x = _rand(_rng().integers(1 << 30), (2, 2, t, d))
  ref_mod = nn.MultiHeadDotProductAttention(**kw)
  our_mod = nn.MultiHeadDotProductAttention(attention_fn=XLA_FN, **kw)
  params = ref_mod.init(jax.random.key(11), x, deterministic=True)
  call = dict(rngs={"dropout": jax.random.key(12)}, deterministic=kind != "dropout")
  if kind in ("causal", "batch_dims"):
    call["mask"] = nn.make_causal_mask(jnp.ones(x.shape[:-1]))
  if kind == "padding":
    valid = jnp.ones((b, t), bool).at[1, 5:].set(False)
    call["mask"] = nn.make_attention_mask(jnp.ones((b, t), bool), valid)  # keys only
  if kind == "sow":
    call.update(sow_weights=True, mutable=["intermediates"])
  ref, out = ref_mod.apply(params, x, **call), our_mod.apply(params, x, **call)
  if kind == "sow":
    (ref, ref_w), (out, w) = ref, out
    assert_f32_close(w["intermediates"]["attention_weights"][0],
                     ref_w["intermediates"]["attention_weights"][0])
  assert_f32_close(out, ref)


def test_attention_fn_in_linen_mha_decode():
  b, t, d, n = 2, 6, 16, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  ref_mod = nn.MultiHeadDotProductAttention(num_heads=n, precision=HIGHEST, decode=True)
  our_mod = ref_mod.clone(attention_fn=XLA_FN)
  v = ref_mod.init(jax.random.key(13), x)
  for mod in (ref_mod, our_mod):
    cache, ys = v["cache"], []
    for i in range(t):
      y, upd = mod.apply({"params": v["params"], "cache": cache}, x[:, i:i + 1],
                         mutable=["cache"])
      cache, ys = upd["cache"], ys + [y]
    if mod is ref_mod:
      ref = jnp.concatenate(ys, 1)
  assert_f32_close(jnp.concatenate(ys, 1), ref)


@pytest.mark.parametrize("kind", ["none", "causal", "mask", "cross_causal", "sow"])
def test_attention_fn_in_nnx_mha(kind):
  b, t, d, n, k = 2, 7, 16, 4, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  xk = _rand(_rng().integers(1 << 30), (b, 11, d)) if kind == "cross_causal" else x
  ref_mod = nnx.MultiHeadAttention(n, d, num_kv_heads=k, precision=HIGHEST, decode=False,
                                   rngs=nnx.Rngs(0))
  our_mod = nnx.MultiHeadAttention(n, d, num_kv_heads=k, precision=HIGHEST, decode=False,
                                   attention_fn=XLA_FN, rngs=nnx.Rngs(0))
  nnx.update(our_mod, nnx.state(ref_mod, nnx.Param))
  call = {}
  if kind in ("causal", "cross_causal"):
    call["is_causal"] = True
  if kind == "mask":
    call["mask"] = nn.make_causal_mask(jnp.ones((b, t))) > 0
  if kind == "sow":  # both through nnx.capture: no sow-outside-capture deprecation, from Flax
    call["sow_weights"] = True
    (ref, ref_w), (out, w) = (nnx.capture(m, nnx.Intermediate)(x, xk, **call)
                              for m in (ref_mod, our_mod))
    assert_f32_close(w["attention_weights"].get_value()[0],
                     ref_w["attention_weights"].get_value()[0])
  else:
    ref, out = ref_mod(x, xk, **call), our_mod(x, xk, **call)
  assert_f32_close(out, ref)


def test_attention_fn_in_nnx_mha_decode():
  b, t, d, n, k = 2, 6, 16, 4, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  mods = []
  for fn in (nnx.dot_product_attention, XLA_FN):
    mod = nnx.MultiHeadAttention(n, d, num_kv_heads=k, precision=HIGHEST, decode=True,
                                 attention_fn=fn, rngs=nnx.Rngs(0))
    mod.init_cache((b, t, d))
    mods.append(jnp.concatenate([mod(x[:, i:i + 1]) for i in range(t)], 1))
  assert_f32_close(mods[1], mods[0])


def test_custom_attention_fn_in_gqa_attention():
  b, t, d, n = 2, 6, 16, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  ours = GQAAttention(num_heads=n, is_causal=True, precision=HIGHEST,
                      attention_fn=nn.dot_product_attention)
  params = ours.init(jax.random.key(14), x)
  ref = nn.MultiHeadDotProductAttention(num_heads=n, precision=HIGHEST).apply(
      params, x, mask=nn.make_causal_mask(jnp.ones((b, t))))
  assert_f32_close(ours.apply(params, x), ref)


# --------------------------------------------------------------------------------------------
# The NNX twin.
# --------------------------------------------------------------------------------------------


def test_nnx_twin_equals_nnx_mha_and_linen():
  b, t, d, n, k = 2, 7, 16, 4, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  theirs = nnx.MultiHeadAttention(n, d, num_kv_heads=k, precision=HIGHEST, decode=False,
                                  rngs=nnx.Rngs(0))
  ours = GQAAttentionNNX(n, d, num_kv_heads=k, precision=HIGHEST, implementation="xla",
                         rngs=nnx.Rngs(0))
  nnx.update(ours, nnx.state(theirs, nnx.Param))
  assert_f32_close(ours(x), theirs(x))
  assert_f32_close(ours(x, is_causal=True), theirs(x, is_causal=True))
  lin = GQAAttention(num_heads=n, num_kv_heads=k, precision=HIGHEST, implementation="xla")
  params = {"params": nnx.to_pure_dict(nnx.state(ours, nnx.Param))}
  assert_f32_close(lin.clone(is_causal=True).apply(params, x), ours(x, is_causal=True))


def test_nnx_twin_dropout_and_sow():
  b, t, d, n = 2, 6, 16, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  m = GQAAttentionNNX(n, d, dropout_rate=0.5, implementation="xla", rngs=nnx.Rngs(0, dropout=1))
  y1, y2 = m(x, deterministic=False), m(x, deterministic=False)
  assert not np.allclose(y1, y2)  # the stored dropout stream advances
  assert_f32_close(m(x, deterministic=True), m(x, deterministic=True))
  m2 = GQAAttentionNNX(n, d, implementation="xla", rngs=nnx.Rngs(0))
  m2(x, sow_weights=True, is_causal=True)
  w = m2.attention_weights.get_value()[0]
  chex.assert_shape(w, (b, n, t, t))
  np.testing.assert_allclose(np.sum(w, -1), 1.0, rtol=1e-5)
  assert float(w[0, 0, 0, 1]) == 0.0


def test_nnx_sow_weights_attribute_and_capture_without_deprecation():
  """Outside ``nnx.capture`` the weights land in ``attention_weights`` (a tuple, one entry per
  call, as ``Module.sow`` stored them); inside, in the captured state and not on the module.
  Neither route calls the deprecated sow-outside-capture (flax >= 0.12.8 warns there)."""
  b, t, d, n, k = 2, 6, 16, 4, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  m = GQAAttentionNNX(n, d, num_kv_heads=k, implementation="xla", precision=HIGHEST,
                      rngs=nnx.Rngs(0))
  mha = nnx.MultiHeadAttention(n, d, num_kv_heads=k, decode=False, precision=HIGHEST,
                               attention_fn=XLA_FN, rngs=nnx.Rngs(0))
  nnx.update(mha, nnx.state(m, nnx.Param))
  with warnings.catch_warnings():
    warnings.filterwarnings("error", category=DeprecationWarning, message=".*sow.*")
    m(x, sow_weights=True, is_causal=True)
    m(x[:, :3], sow_weights=True)
    mha(x, sow_weights=True, is_causal=True)           # gqa_dot_product_attention, module=mha
    _, captured = nnx.capture(m, nnx.Intermediate)(x, sow_weights=True, is_causal=True)
    _, none = nnx.capture(m, nnx.Param)(x, sow_weights=True)   # Intermediate not captured
  w1, w2 = m.attention_weights.get_value()
  chex.assert_shape([w1, w2], [(b, n, t, t), (b, n, 3, 3)])
  causal = np.tril(np.ones((t, t), bool))
  assert np.all(np.asarray(w1)[..., ~causal] == 0) and np.all(np.asarray(w2)[0, 0, 0, 1:] != 0)
  assert len(m.attention_weights.get_value()) == 2     # the captures left the attribute alone
  (wc,) = captured["attention_weights"].get_value()
  assert_f32_close(wc, w1)
  (wm,) = mha.attention_weights.get_value()
  assert_f32_close(wm, w1)
  assert "attention_weights" not in none


@pytest.mark.parametrize("chunk", [1, 3])
def test_nnx_twin_decode_equals_full(chunk):
  b, t, d, n, k, s = 2, 9, 32, 4, 2, 12
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  m = GQAAttentionNNX(n, d, num_kv_heads=k, rope_theta=1e4, is_causal=True, precision=HIGHEST,
                      implementation="xla", rngs=nnx.Rngs(0))
  ref = m(x)
  m.init_cache((b, s, d))
  chex.assert_shape(m.cached_key[...], (b, s, k, d // n))
  ys = [m(x[:, i:i + chunk], decode=True) for i in range(0, t, chunk)]
  assert_f32_close(jnp.concatenate(ys, 1), ref)
  np.testing.assert_array_equal(m.cache_index[...], [t, t])
  # Functional mode on the same module: leaves the nnx.Cache variables alone.
  cache = KVCache.init(b, s, k, d // n, jnp.float32)
  ys = []
  for i in range(0, t, chunk):
    y, cache = m(x[:, i:i + chunk], cache=cache)
    ys.append(y)
  assert_f32_close(jnp.concatenate(ys, 1), ref)
  np.testing.assert_array_equal(m.cache_index[...], [t, t])
  with pytest.raises(ValueError, match="not both"):
    m(x[:, :1], cache=cache, decode=True)


def test_nnx_view_allocates_cache():
  b, t, d = 2, 5, 32
  m = GQAAttentionNNX(4, d, num_kv_heads=2, is_causal=True, precision=HIGHEST,
                      implementation="xla", rngs=nnx.Rngs(0))
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  full = m(x)
  view = nnx.view(m, decode=True, batch_size=b, max_length=8)
  chex.assert_shape(view.cached_key[...], (b, 8, 2, 8))
  assert_f32_close(jnp.concatenate([view(x[:, i:i + 1]) for i in range(t)], 1), full)


def test_inputs_kv_is_deprecated_but_works():
  x = _rand(0, (2, 5, 16))
  m = GQAAttention(num_heads=2, precision=HIGHEST, implementation="xla")
  params = m.init(jax.random.key(0), x)
  with pytest.warns(DeprecationWarning, match="inputs_kv"):
    y = m.apply(params, x, inputs_kv=x)
  assert_f32_close(y, m.apply(params, x))


def test_nnx_twin_needs_init_cache():
  m = GQAAttentionNNX(2, 16, decode=True, implementation="xla", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="init_cache"):
    m(jnp.ones((1, 1, 16)))


# --------------------------------------------------------------------------------------------
# Linen decode=True ('cache' collection) and functional mode basics.
# --------------------------------------------------------------------------------------------


def test_linen_decode_collection_layout_and_multi_token():
  b, t, d, n, k, s = 2, 8, 32, 4, 2, 10
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  m = GQAAttention(num_heads=n, num_kv_heads=k, rope_theta=1e4, is_causal=True,
                   precision=HIGHEST, implementation="xla")
  params = m.init(jax.random.key(15), x)["params"]
  ref = m.apply({"params": params}, x)
  md = m.clone(decode=True)
  cache = md.init(jax.random.key(15), jnp.ones((b, s, d)))["cache"]
  chex.assert_trees_all_equal_shapes_and_dtypes(cache, {
      "cached_key": jnp.zeros((b, s, k, d // n)), "cached_value": jnp.zeros((b, s, k, d // n)),
      "cache_index": jnp.zeros((b,), jnp.int32)})
  ys = []
  for lo, hi in ((0, 3), (3, 4), (4, 8)):
    y, upd = md.apply({"params": params, "cache": cache}, x[:, lo:hi], mutable=["cache"])
    cache, ys = upd["cache"], ys + [y]
  assert_f32_close(jnp.concatenate(ys, 1), ref)
  np.testing.assert_array_equal(cache["cache_index"], [t, t])
  with pytest.raises(ValueError, match="overflow"):
    md.apply({"params": params, "cache": cache}, x[:, :3], mutable=["cache"])
  with pytest.raises(ValueError, match="not both"):
    md.apply({"params": params, "cache": cache}, x[:, :1],
             cache=KVCache.init(b, s, k, d // n, jnp.float32), mutable=["cache"])
  with pytest.raises(ValueError, match="cache shape"):
    md.apply({"params": params, "cache": cache}, x[:1, :1], mutable=["cache"])


def test_functional_mode_ragged_rows_and_positions():
  """Rows with different prompt lengths (right padding, num_new) then a decode step."""
  b, t, d, n, k, s = 2, 6, 32, 4, 2, 12
  rng = _rng()
  x = _rand(rng.integers(1 << 30), (b, t, d))
  m = GQAAttention(num_heads=n, num_kv_heads=k, rope_theta=1e4, precision=HIGHEST,
                   implementation="xla")
  params = m.init(jax.random.key(16), x)
  m_apply = jax.jit(m.apply)
  num_new = jnp.array([6, 3], jnp.int32)
  cache = KVCache.init(b, s, k, d // n, jnp.float32)
  y, cache = m_apply(params, x, cache=cache, num_new=num_new)
  np.testing.assert_array_equal(cache.lengths, num_new)
  nxt = _rand(rng.integers(1 << 30), (b, 1, d))
  y1, cache = m_apply(params, nxt, cache=cache)
  np.testing.assert_array_equal(cache.lengths, num_new + 1)
  for row, n_valid in enumerate([6, 3]):
    seq = jnp.concatenate([x[row:row + 1, :n_valid], nxt[row:row + 1]], 1)
    full = layer_reference(params, seq, rope_theta=1e4, causal=True)
    assert_f32_close(y[row, :n_valid], full[0, :n_valid])
    assert_f32_close(y1[row], full[0, -1:])
  # Explicit positions: a row that continues at position 40 (e.g. after trimming a prefix).
  pos = jnp.array([[40], [41]], jnp.int32)
  y2, _ = m_apply(params, nxt, cache=cache, positions=pos)
  assert not np.allclose(y2, m_apply(params, nxt, cache=cache)[0])


def test_functional_mode_with_mask_uses_cache_semantics():
  """An explicit mask with a cache is AND-ed with the cache's causal visibility."""
  b, t, d, n, k, s = 2, 5, 32, 4, 2, 8
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  m = GQAAttention(num_heads=n, num_kv_heads=k, precision=HIGHEST, implementation="xla")
  params = m.init(jax.random.key(17), x)
  cache = KVCache.init(b, s, k, d // n, jnp.float32)
  y, _ = m.apply(params, x, cache=cache)
  y_mask, _ = m.apply(params, x, cache=cache, mask=jnp.ones((b, 1, t, s), bool))
  assert_f32_close(y_mask, y)
  assert_f32_close(y, layer_reference(params, x, causal=True))


# --------------------------------------------------------------------------------------------
# The Pallas kernels (interpret mode) inside the layer.
# --------------------------------------------------------------------------------------------


def test_layer_kernel_interpret_forward_and_grad():
  b, t, d, n, k = 2, 12, 64, 4, 2  # head_dim 16
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  m = GQAAttention(num_heads=n, num_kv_heads=k, rope_theta=1e4, is_causal=True,
                   precision=HIGHEST, implementation="triton", interpret=True)
  params = m.init(jax.random.key(18), x)
  ref_mod = m.clone(implementation="xla", interpret=False)
  loss = lambda mod: jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.sin(mod.apply(p, x)))))
  (l, g), (l_ref, g_ref) = loss(m)(params), loss(ref_mod)(params)
  text = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(m.apply(p, x))))(params))
  assert "gqa_prefill_dq" in text and "gqa_prefill_dkdv" in text  # the backward kernels run
  assert_f32_close(m.apply(params, x), layer_reference(params, x, rope_theta=1e4, causal=True))
  np.testing.assert_allclose(l, l_ref, rtol=1e-4)  # a sum: compared loosely, the terms above
  assert_grads_close(g, g_ref)


def test_nnx_layer_kernel_interpret_grad():
  """nnx.grad through GQAAttentionNNX runs the backward kernels and equals the XLA layer's."""
  b, t, d, n, k = 2, 11, 64, 4, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))

  def grads(implementation, interpret):
    mod = GQAAttentionNNX(n, d, num_kv_heads=k, precision=HIGHEST, rope_theta=1e4,
                          is_causal=True, implementation=implementation, interpret=interpret,
                          rngs=nnx.Rngs(3))
    loss = lambda mod: jnp.sum(jnp.sin(mod(x)))
    graph, state = nnx.split(mod)
    text = str(jax.make_jaxpr(jax.grad(lambda st: loss(nnx.merge(graph, st))))(state))
    return nnx.jit(nnx.grad(loss))(mod), text

  g, text = grads("triton", True)
  g_ref, text_ref = grads("xla", False)
  assert "gqa_prefill_dq" in text and "gqa_prefill_dkdv" in text
  assert "gqa_prefill_dq" not in text_ref
  assert_grads_close(nnx.to_pure_dict(g), nnx.to_pure_dict(g_ref))


def test_attention_fn_kernel_interpret_in_nnx_mha():
  b, t, d, n, k = 2, 9, 64, 4, 2
  x = _rand(_rng().integers(1 << 30), (b, t, d))
  fn = functools.partial(gqa_dot_product_attention, implementation="triton", interpret=True)
  ref_mod = nnx.MultiHeadAttention(n, d, num_kv_heads=k, precision=HIGHEST, decode=False,
                                   rngs=nnx.Rngs(0))
  our_mod = nnx.MultiHeadAttention(n, d, num_kv_heads=k, precision=HIGHEST, decode=False,
                                   attention_fn=fn, rngs=nnx.Rngs(0))
  assert_f32_close(nnx.jit(lambda mod, x: mod(x, is_causal=True))(our_mod, x),
                   ref_mod(x, is_causal=True))


# --------------------------------------------------------------------------------------------
# Routing: which entry point each mode reaches.
# --------------------------------------------------------------------------------------------


def test_routing(monkeypatch):
  import gqa_pallas.api as api  # pylint: disable=g-import-not-at-top
  calls = []
  for name in ("gqa_attention", "gqa_decode"):
    real = getattr(api, name)
    monkeypatch.setattr(api, name, functools.partial(
        lambda real, name, *a, **kw: (calls.append((name, kw)), real(*a, **kw))[1], real, name))
  b, t, d, n, k = 2, 6, 32, 4, 2
  x = _rand(0, (b, t, d))
  m = GQAAttention(num_heads=n, num_kv_heads=k, is_causal=True, implementation="xla")
  params = m.init(jax.random.key(0), x)

  def route(fn):
    calls.clear()
    fn()
    return [(name, kw.get("causal"), kw.get("q_offset") is not None) for name, kw in calls]

  assert route(lambda: m.apply(params, x)) == [("gqa_attention", True, False)]
  assert route(lambda: m.clone(is_causal=False).apply(params, x)) == [
      ("gqa_attention", False, False)]
  assert route(lambda: m.apply(params, x, mask=jnp.ones((b, 1, t, t), bool))) == []
  assert route(lambda: m.clone(dropout_rate=0.1).apply(
      params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})) == []
  assert route(lambda: m.clone(dropout_rate=0.1).apply(params, x, deterministic=True)) == [
      ("gqa_attention", True, False)]
  assert route(lambda: m.apply(params, x, sow_weights=True, mutable=["intermediates"])) == []
  cache = KVCache.init(b, 40, k, d // n, jnp.float32)
  # One token: the default q_offset (lengths - 1) sees the same keys as the old lengths.
  assert route(lambda: m.apply(params, x[:, :1], cache=cache)) == [("gqa_decode", None, False)]
  assert route(lambda: m.clone(sliding_window=4).apply(params, x[:, :1], cache=cache)) == [
      ("gqa_decode", None, True)]
  # A prefill of an empty cache: the prompt over itself, from the static position 0.
  calls.clear()
  m.apply(params, x, cache=cache, cache_empty=True)
  assert [(name, kw.get("q_offset")) for name, kw in calls] == [("gqa_attention", 0)]
  assert route(lambda: m.apply(params, x[:, :1].repeat(16, 1), cache=cache)) == [
      ("gqa_decode", None, True)]
  assert route(lambda: m.apply(params, x[:, :1].repeat(17, 1), cache=cache)) == [
      ("gqa_attention", True, True)]
  # attention_fn: the kernel for no mask / is_causal (top-left: q_offset 0), XLA with a mask.
  q = _rand(1, (b, t, n, 8))
  kv = _rand(2, (b, t, k, 8))
  assert route(lambda: gqa_dot_product_attention(q, kv, kv, is_causal=True)) == [
      ("gqa_attention", True, True)]
  assert route(lambda: gqa_dot_product_attention(q, kv, kv, mask=jnp.ones((t, t)))) == []


@pytest.mark.parametrize("implementation,interpret", [("xla", False), ("triton", True)])
def test_cache_empty_prefill_equals_the_cache_path(implementation, interpret):
  """cache_empty=True (the prompt over itself, q_offset=0) gives what attending over the empty
  cache gives: the output at every prompt position and the cache, ragged rows included."""
  b, t, d, n, k = 3, 20, 32, 4, 2
  x = _rand(3, (b, t, d))
  m = GQAAttention(num_heads=n, num_kv_heads=k, is_causal=True, rope_theta=10000.0,
                   implementation=implementation, interpret=interpret)
  params = m.init(jax.random.key(0), x)
  cache = KVCache.init(b, 32, k, d // n, jnp.float32)
  num_new = jnp.array([20, 7, 1], jnp.int32)
  run = jax.jit(lambda p, x, c, empty: m.apply(p, x, cache=c, num_new=num_new,
                                               cache_empty=empty), static_argnums=3)
  y0, c0 = run(params, x, cache, False)
  y1, c1 = run(params, x, cache, True)
  valid = np.arange(t)[None, :] < np.asarray(num_new)[:, None]
  np.testing.assert_allclose(np.asarray(y1)[valid], np.asarray(y0)[valid], atol=2e-5, rtol=2e-5)
  # (The cache's RoPE'd keys may differ in the last bit: XLA fuses the two programs apart.)
  chex.assert_trees_all_close(c0, c1, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(c0.lengths, c1.lengths)


def test_cache_empty_refuses_a_filled_cache():
  b, t, d, n, k = 2, 4, 32, 4, 2
  x = _rand(4, (b, t, d))
  m = GQAAttention(num_heads=n, num_kv_heads=k, is_causal=True, implementation="xla")
  params = m.init(jax.random.key(0), x)
  cache = KVCache(jnp.zeros((b, 16, k, d // n)), jnp.zeros((b, 16, k, d // n)),
                  jnp.array([0, 5], jnp.int32))
  with pytest.raises(ValueError, match=r"cache_empty=True, but the cache holds tokens: "
                                       r"lengths \[0, 5\]"):
    m.apply(params, x, cache=cache, cache_empty=True)
  with pytest.raises(TypeError, match="cache_empty"):
    m.apply(params, x, cache=cache, cache_empty="yes")
  # Under jit the lengths are not known: the row that holds tokens gets NaN, not a wrong value.
  y, _ = jax.jit(lambda p, x, c: m.apply(p, x, cache=c, cache_empty=True))(params, x, cache)
  assert np.all(np.isfinite(np.asarray(y[0]))) and np.all(np.isnan(np.asarray(y[1])))
