"""The registry entry of the Triton kernels: what they run and with which config."""
from __future__ import annotations

from gqa_pallas import reference, registry
from gqa_pallas.triton import append as append_kernel
from gqa_pallas.triton import backward as backward_kernel
from gqa_pallas.triton import decode as decode_kernel
from gqa_pallas.triton import flash
from gqa_pallas.triton import prefill as prefill_kernel


class TritonBackend(registry.Backend):
  name = "triton"
  ops = frozenset({"prefill", "prefill_bwd", "decode", "append"})
  config_types = {"prefill": prefill_kernel.PrefillConfig,
                  "prefill_bwd": backward_kernel.BackwardConfig,
                  "decode": decode_kernel.DecodeConfig}
  custom_call = "triton"
  is_pallas = True
  _kernels = {"prefill": prefill_kernel, "prefill_bwd": backward_kernel,
              "decode": decode_kernel}

  def unsupported(self, problem):
    if not (problem.device.is_gpu or problem.interpret):
      return (f"a CUDA GPU (the device is {problem.device.kind!r}; interpret=True runs the "
              "kernel code on the CPU)")
    if problem.op == "append":  # a copy: any head dim, any supported dtype
      return None
    return flash.head_dim_unsupported(problem.head_dim)

  def default_config(self, problem):
    kernel = self._kernels.get(problem.op)
    if kernel is None:
      return None
    return kernel.default_config(problem.head_dim, problem.dtype, problem.device.kind)

  def tuning_tables(self, op):
    kernel = self._kernels.get(op)
    if kernel is None:
      return {}
    return dict(kernel.TUNING_TABLES, heuristic=kernel.HEURISTIC_TABLE)

  def prefill(self, q, k, v, q_offset, kv_lengths, *, causal, scale, return_lse, interpret,
              config, sliding_window=None, logits_soft_cap=None):
    return prefill_kernel.prefill_attention(
        q, k, v, q_offset, kv_lengths, causal=causal, scale=scale, return_lse=return_lse,
        interpret=interpret, config=config, sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap)

  def prefill_bwd(self, q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse, *, causal,
                  scale, interpret, config, sliding_window=None, logits_soft_cap=None):
    return backward_kernel.prefill_attention_bwd(
        q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse, causal=causal, scale=scale,
        interpret=interpret, config=config, sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap)

  def decode(self, q, k, v, q_offset, lengths, *, scale, return_lse, interpret, config,
             sliding_window=None, logits_soft_cap=None):
    return decode_kernel.decode_attention(q, k, v, q_offset, lengths, scale=scale,
                                          return_lse=return_lse, interpret=interpret,
                                          config=config, sliding_window=sliding_window,
                                          logits_soft_cap=logits_soft_cap)

  def append(self, k, v, lengths, overflowed, k_new, v_new, num_new, *, interpret):
    if k_new.shape[0] == 0 or k_new.shape[1] == 0:  # nothing to write: no launch
      return reference.append_reference(k, v, lengths, overflowed, k_new, v_new, num_new)
    return append_kernel.append(k, v, lengths, overflowed, k_new, v_new, num_new,
                                interpret=interpret)


BACKEND = TritonBackend()
