"""The registry entry of the Mosaic GPU kernels: Hopper (sm90) prefill and its backward."""
from __future__ import annotations

from gqa_pallas import registry
from gqa_pallas.mosaic import backward as backward_kernel
from gqa_pallas.mosaic import prefill as prefill_kernel


class MosaicBackend(registry.Backend):
  name = "mosaic"
  ops = frozenset({"prefill", "prefill_bwd"})
  config_types = {"prefill": prefill_kernel.MosaicPrefillConfig,
                  "prefill_bwd": backward_kernel.MosaicBackwardConfig}
  custom_call = "mosaic_gpu"
  is_pallas = True
  slow_interpreter = True  # Mosaic GPU's interpreter: seconds per small case

  def unsupported(self, problem):
    device = problem.device
    if not problem.interpret and not (device.is_gpu and device.compute_capability == (9, 0)):
      arch = "".join(map(str, device.compute_capability or ()))
      return (f"a Hopper GPU, sm90 (the device is {device.kind!r}{f', sm{arch}' if arch else ''}"
              "; interpret=True runs the kernel in Mosaic GPU's interpreter on the CPU)")
    if problem.sliding_window is not None or problem.logits_soft_cap is not None:
      return ("sliding_window / logits_soft_cap (the Mosaic GPU prefill and its backward have "
              "neither yet; the Triton kernels take both)")
    return prefill_kernel.unsupported(problem.dims.head_dim, problem.dtype)

  def default_config(self, problem):
    if problem.op == "prefill_bwd":
      return backward_kernel.default_config(problem.head_dim, problem.dtype, problem.device.kind)
    return prefill_kernel.default_config(problem.dims, problem.dtype, problem.device.kind,
                                         problem.device.num_sms)

  def tuning_tables(self, op):
    kernel = {"prefill": prefill_kernel, "prefill_bwd": backward_kernel}.get(op)
    if kernel is None:
      return {}
    return dict(kernel.TUNING_TABLES, heuristic=kernel.HEURISTIC_TABLE)

  def prefill(self, q, k, v, q_offset, kv_lengths, *, causal, scale, return_lse, interpret,
              config, sliding_window=None, logits_soft_cap=None):
    del sliding_window, logits_soft_cap  # refused by unsupported()
    return prefill_kernel.prefill_attention(
        q, k, v, q_offset, kv_lengths, causal=causal, scale=scale, return_lse=return_lse,
        interpret=interpret, config=config)

  def prefill_bwd(self, q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse, *, causal,
                  scale, interpret, config, sliding_window=None, logits_soft_cap=None):
    del sliding_window, logits_soft_cap  # refused by unsupported()
    return backward_kernel.prefill_attention_bwd(
        q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse, causal=causal, scale=scale,
        interpret=interpret, config=config)


BACKEND = MosaicBackend()
