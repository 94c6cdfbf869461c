"""The ``"xla"`` backend: the reference itself, ``jit``-compiled (every op, any device).

It materialises the ``[B, N, T, S]`` logits, so it is the fallback, not the fast path; JAX
differentiates it natively, and its VJP is the backward every other forward can pair with.
"""
from __future__ import annotations

import functools

import jax

from gqa_pallas import reference, registry


@functools.partial(jax.jit, static_argnames=("causal", "scale", "return_lse", "sliding_window",
                                             "logits_soft_cap"))
def _attention(q, k, v, q_offset, kv_lengths, *, causal, scale, return_lse, sliding_window=None,
               logits_soft_cap=None):
  return reference.attention_reference(q, k, v, causal=causal, q_offset=q_offset,
                                       kv_lengths=kv_lengths, scale=scale, return_lse=return_lse,
                                       sliding_window=sliding_window,
                                       logits_soft_cap=logits_soft_cap)


class XlaBackend(registry.Backend):
  name = "xla"
  ops = frozenset(registry.OPS)
  differentiable = True

  def unsupported(self, problem):
    if problem.interpret:
      return ("interpret=True (it runs no Pallas kernel; interpret mode takes "
              f"implementation={registry.preference(problem.device, True)} or None)")
    return None

  def prefill(self, q, k, v, q_offset, kv_lengths, *, causal, scale, return_lse, interpret,
              config, sliding_window=None, logits_soft_cap=None):
    del interpret, config
    return _attention(q, k, v, q_offset, kv_lengths, causal=causal, scale=scale,
                      return_lse=return_lse, sliding_window=sliding_window,
                      logits_soft_cap=logits_soft_cap)

  def prefill_bwd(self, q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse, *, causal,
                  scale, interpret, config, sliding_window=None, logits_soft_cap=None):
    del out, lse, interpret, config
    return_lse = d_lse is not None
    return reference.attention_vjp(
        q, k, v, (d_out, d_lse) if return_lse else d_out, causal=causal, q_offset=q_offset,
        kv_lengths=kv_lengths, scale=scale, return_lse=return_lse,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)

  def decode(self, q, k, v, q_offset, lengths, *, scale, return_lse, interpret, config,
             sliding_window=None, logits_soft_cap=None):
    del interpret, config
    if q_offset is None:
      q_offset = lengths - q.shape[1]
    return _attention(q, k, v, q_offset, lengths, causal=True, scale=scale,
                      return_lse=return_lse, sliding_window=sliding_window,
                      logits_soft_cap=logits_soft_cap)

  def append(self, k, v, lengths, overflowed, k_new, v_new, num_new, *, interpret):
    del interpret
    return reference.append_reference(k, v, lengths, overflowed, k_new, v_new, num_new)


BACKEND = XlaBackend()
