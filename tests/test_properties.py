"""Property tests (hypothesis): random B, T, S, N, K, H, lengths, offsets, windows, soft-caps and
dtypes; every backend that takes the drawn call equals the reference (design.md's rule). Kernels
run in their interpreters; the example counts are bounded so that CI stays fast (the fixed grids
of test_prefill.py / test_decode.py cover the shapes these miss)."""
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gqa_pallas as gp
from gqa_pallas import devices, registry
from gqa_pallas.validation import AttentionDims
from tests import backend_cases, numerics

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def attention_calls(draw, max_t=40, causal=None):
  b = draw(st.integers(1, 3))
  kh = draw(st.sampled_from([1, 2, 3]))
  g = draw(st.sampled_from([1, 2, 3, 4, 7, 8]))
  h = draw(st.sampled_from([16, 32, 64]))
  t = draw(st.integers(1, max_t))
  s = draw(st.integers(1, 48))
  causal = draw(st.booleans()) if causal is None else causal
  kv_lengths = draw(st.none() | st.lists(st.integers(-2, s + 3), min_size=b, max_size=b))
  q_offset = draw(st.none() | st.lists(st.integers(-8, s + 8), min_size=b, max_size=b))
  window = draw(st.none() | st.integers(1, s + 2)) if causal else None
  cap = draw(st.none() | st.sampled_from([5.0, 30.0]))
  dtype = draw(st.sampled_from(DTYPES))
  seed = draw(st.integers(0, 2 ** 16))
  return dict(b=b, t=t, s=s, n=kh * g, kh=kh, h=h, causal=causal, kv_lengths=kv_lengths,
              q_offset=q_offset, window=window, cap=cap, dtype=dtype, seed=seed)


def _backend_takes(name, op, call):
  problem = registry.Problem(
      op, AttentionDims(call["b"], call["t"], call["s"], call["n"], call["kh"], call["h"]),
      jnp.dtype(call["dtype"]).name, causal=call["causal"],
      interpret=backend_cases.interpret_for(name, "cpu"), device=devices.CPU,
      sliding_window=call["window"], logits_soft_cap=call["cap"])
  return registry.get(name).unsupported(problem) is None


def _inputs(call):
  lengths = None if call["kv_lengths"] is None else jnp.array(call["kv_lengths"], jnp.int32)
  offsets = None if call["q_offset"] is None else jnp.array(call["q_offset"], jnp.int32)
  poison = None if lengths is None else jnp.clip(lengths, 0, call["s"])
  q, k, v = numerics.random_qkv(call["seed"], call["b"], call["t"], call["s"], call["n"],
                                call["kh"], call["h"], call["dtype"], poison)
  return q, k, v, lengths, offsets


# The Mosaic GPU interpreter takes seconds per call: its properties are the fixed grids'.
FAST_PREFILL = [n for n in backend_cases.implementing("prefill", pallas_only=False)
                if not registry.get(n).slow_interpreter]
FAST_DECODE = [n for n in backend_cases.implementing("decode", pallas_only=False)
               if not registry.get(n).slow_interpreter]


@pytest.mark.parametrize("name", FAST_PREFILL)
@settings(max_examples=8, **SETTINGS)
@given(call=attention_calls())
def test_prefill_equals_reference(name, call):
  if not _backend_takes(name, "prefill", call):
    return
  q, k, v, lengths, offsets = _inputs(call)
  kw = dict(causal=call["causal"], kv_lengths=lengths, q_offset=offsets,
            sliding_window=call["window"], logits_soft_cap=call["cap"])
  out, lse = gp.gqa_attention(q, k, v, implementation=name, return_lse=True,
                              interpret=backend_cases.interpret_for(name, "cpu"), **kw)
  numerics.check_against_reference(out, lse, q, k, v, factor=2.0, **kw)


@pytest.mark.parametrize("name", FAST_DECODE)
@settings(max_examples=6, **SETTINGS)
@given(call=attention_calls(max_t=4, causal=True))
def test_decode_equals_reference(name, call):
  if not _backend_takes(name, "decode", call):
    return
  q, k, v, lengths, offsets = _inputs(call)
  if lengths is None:
    lengths = jnp.full((call["b"],), call["s"], jnp.int32)
  cache = gp.KVCache(k, v, lengths)
  kw = dict(q_offset=offsets, sliding_window=call["window"], logits_soft_cap=call["cap"])
  out, lse = gp.gqa_decode(q, cache, implementation=name, return_lse=True,
                           interpret=backend_cases.interpret_for(name, "cpu"), **kw)
  numerics.check_against_reference(out, lse, q, k, v, factor=3.0, kv_lengths=lengths, **kw)
