"""The prefill's gradients: one ``custom_vjp`` that pairs any forward backend with any backward.

A Pallas forward is opaque to JAX's autodiff, so ``gqa_attention`` wraps it here: the forward
rule runs the chosen backend's ``prefill`` (always with the lse, which flash backward kernels
reuse) and keeps ``(q, k, v, q_offset, kv_lengths, out, lse)``; the backward rule runs the
``prefill_bwd`` of the backend ``registry.resolve_backward`` picked: the Triton flash backward
(``gqa_pallas/triton/backward.py``) wherever a Pallas forward runs and it takes the head dim, else
the reference's VJP (``"xla"``: exact, but it materialises ``[B, N, T, S]``). A backward kernel
plugs in by implementing ``prefill_bwd`` in its backend. A forward JAX can differentiate itself (the
``"xla"`` backend) is called directly, so forward-mode and higher-order derivatives keep working.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import math

import jax
import jax.numpy as jnp

from gqa_pallas import finite, partitioning, reference, registry

LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything static about one differentiable prefill call."""
  forward: registry.Backend
  backward: registry.Backend
  causal: bool
  scale: float
  return_lse: bool
  interpret: bool
  config: Any
  backward_config: Any
  sliding_window: int | None = None
  logits_soft_cap: float | None = None

  @property
  def features(self):
    return dict(sliding_window=self.sliding_window, logits_soft_cap=self.logits_soft_cap)


def backward_rows(out, lse, d_out, d_lse):
  """The per-row inputs flash backward kernels read, ``float32[B, T, N]`` each: the lse in base 2
  (``+inf`` for rows with no key, so their ``P = exp2(s - lse2)`` is 0, not NaN) and ``delta =
  rowsum(dO * O) - d_lse`` (the lse's own cotangent folds in here: ``d lse / d s = P``)."""
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2_E)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  if d_lse is not None:
    delta = delta - d_lse.astype(jnp.float32)
  return lse2, delta


def prefill(q, k, v, q_offset, kv_lengths, plan: Plan):
  """``plan.forward``'s prefill, differentiable through ``plan.backward``."""
  if plan.forward.differentiable:
    return _forward(plan, q, k, v, q_offset, kv_lengths, plan.return_lse)
  return _prefill(q, k, v, q_offset, kv_lengths, plan)


def _forward(plan, q, k, v, q_offset, kv_lengths, return_lse):
  def run(q, k, v, q_offset, kv_lengths):
    with registry.kernel_scope():
      res = plan.forward.prefill(q, k, v, q_offset, kv_lengths, causal=plan.causal,
                                 scale=plan.scale, return_lse=return_lse,
                                 interpret=plan.interpret, config=plan.config, **plan.features)
    return tuple(res) if return_lse else (res,)

  if plan.forward.differentiable:  # JAX differentiates it, and XLA partitions it, itself
    res = run(q, k, v, q_offset, kv_lengths)
  else:
    res = partitioning.per_shard(
        run, (q, k, v, q_offset, kv_lengths), (partitioning.Q, partitioning.KV, partitioning.KV, partitioning.ROWS, partitioning.ROWS),
        (partitioning.Q, partitioning.ROW_HEADS) if return_lse else (partitioning.Q,), q.shape[2] // k.shape[2])
  return res if return_lse else res[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _prefill(q, k, v, q_offset, kv_lengths, plan):
  return _forward(plan, q, k, v, q_offset, kv_lengths, plan.return_lse)


def _prefill_fwd(q, k, v, q_offset, kv_lengths, plan):
  out, lse = _forward(plan, q, k, v, q_offset, kv_lengths, True)
  return (out, lse) if plan.return_lse else out, (q, k, v, q_offset, kv_lengths, out, lse)


def _prefill_bwd(plan, residuals, cotangent):
  q, k, v, q_offset, kv_lengths, out, lse = residuals
  d_out, d_lse = cotangent if plan.return_lse else (cotangent, None)
  # A slot no query sees may hold inf; a backward kernel's dS K and dO V^T products would turn
  # its zero weight into NaN (design.md, "Invisible slots"). Cleared here, once, for every
  # backward: a small pass next to the backward's compute.
  k, v = finite.clear(k), finite.clear(v)

  def run(q, k, v, q_offset, kv_lengths, out, lse, d_out, *d_lse):
    with registry.kernel_scope():
      return tuple(plan.backward.prefill_bwd(
          q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse[0] if d_lse else None,
          causal=plan.causal, scale=plan.scale, interpret=plan.interpret,
          config=plan.backward_config, **plan.features))

  operands = (q, k, v, q_offset, kv_lengths, out, lse, d_out) + (
      () if d_lse is None else (d_lse,))
  layouts = (partitioning.Q, partitioning.KV, partitioning.KV, partitioning.ROWS, partitioning.ROWS, partitioning.Q, partitioning.ROW_HEADS, partitioning.Q) + (
      () if d_lse is None else (partitioning.ROW_HEADS,))
  dq, dk, dv = partitioning.per_shard(run, operands, layouts, (partitioning.Q, partitioning.KV, partitioning.KV),
                                      q.shape[2] // k.shape[2])
  return dq, dk, dv, None, None


_prefill.defvjp(_prefill_fwd, _prefill_bwd)


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """Everything static about one differentiable decode call."""
  backend: registry.Backend
  scale: float
  return_lse: bool
  interpret: bool
  config: Any
  sliding_window: int | None = None
  logits_soft_cap: float | None = None

  @property
  def features(self):
    return dict(sliding_window=self.sliding_window, logits_soft_cap=self.logits_soft_cap)


def decode(q, k, v, q_offset, lengths, plan: DecodePlan):
  """``plan.backend``'s decode, differentiable in q, k and v.

  A decode kernel has no backward of its own: its gradients are the reference's VJP, which is
  cheap here (``T <= 16`` query tokens: the ``[B, N, T, S]`` weights are a few of the cache's
  bytes per token). ``q_offset`` may be ``None`` (``lengths - T``).
  """
  if plan.backend.differentiable:
    return _decode_forward(plan, q, k, v, q_offset, lengths)
  return _decode(q, k, v, q_offset, lengths, plan)


def _decode_forward(plan, q, k, v, q_offset, lengths):
  def run(q, k, v, lengths, *q_offset):
    with registry.kernel_scope():
      res = plan.backend.decode(q, k, v, q_offset[0] if q_offset else None, lengths,
                                scale=plan.scale, return_lse=plan.return_lse,
                                interpret=plan.interpret, config=plan.config, **plan.features)
    return tuple(res) if plan.return_lse else (res,)

  if plan.backend.differentiable:  # JAX differentiates it, and XLA partitions it, itself
    res = run(q, k, v, lengths, *(() if q_offset is None else (q_offset,)))
  else:
    operands = (q, k, v, lengths) + (() if q_offset is None else (q_offset,))
    layouts = (partitioning.Q, partitioning.KV, partitioning.KV, partitioning.ROWS) + (() if q_offset is None else (partitioning.ROWS,))
    res = partitioning.per_shard(run, operands, layouts,
                                 (partitioning.Q, partitioning.ROW_HEADS) if plan.return_lse else (partitioning.Q,),
                                 q.shape[2] // k.shape[2])
  return res if plan.return_lse else res[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _decode(q, k, v, q_offset, lengths, plan):
  return _decode_forward(plan, q, k, v, q_offset, lengths)


def _decode_fwd(q, k, v, q_offset, lengths, plan):
  return _decode_forward(plan, q, k, v, q_offset, lengths), (q, k, v, q_offset, lengths)


def _decode_bwd(plan, residuals, cotangent):
  q, k, v, q_offset, lengths = residuals
  if q_offset is None:
    q_offset = lengths - q.shape[1]
  dq, dk, dv = reference.attention_vjp(q, k, v, cotangent, causal=True, q_offset=q_offset,
                                       kv_lengths=lengths, scale=plan.scale,
                                       return_lse=plan.return_lse, **plan.features)
  return dq, dk, dv, None, None


_decode.defvjp(_decode_fwd, _decode_bwd)
