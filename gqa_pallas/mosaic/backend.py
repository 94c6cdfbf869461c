"""The registry entry of the Mosaic GPU kernels: Hopper (sm90) prefill."""
from __future__ import annotations

from gqa_pallas import registry
from gqa_pallas.mosaic import prefill as prefill_kernel


class MosaicBackend(registry.Backend):
  name = "mosaic"
  ops = frozenset({"prefill"})
  config_types = {"prefill": prefill_kernel.MosaicPrefillConfig}
  custom_call = "mosaic_gpu"
  slow_interpreter = True  # Mosaic GPU's interpreter: seconds per small case

  def unsupported(self, problem):
    device = problem.device
    if not problem.interpret and not (device.is_gpu and device.compute_capability == (9, 0)):
      arch = "".join(map(str, device.compute_capability or ()))
      return (f"a Hopper GPU, sm90 (the device is {device.kind!r}{f', sm{arch}' if arch else ''}"
              "; interpret=True runs the kernel in Mosaic GPU's interpreter on the CPU)")
    if problem.sliding_window is not None or problem.logits_soft_cap is not None:
      return ("sliding_window / logits_soft_cap (the Mosaic GPU prefill has neither yet; the "
              "Triton kernels take both)")
    return prefill_kernel.unsupported(problem.dims.head_dim, problem.dtype)

  def default_config(self, problem):
    return prefill_kernel.default_config(problem.dims, problem.dtype, problem.device.kind,
                                         problem.device.num_sms)

  def tuning_tables(self, op):
    if op != "prefill":
      return {}
    return dict(prefill_kernel.TUNING_TABLES, heuristic=prefill_kernel.HEURISTIC_TABLE)

  def prefill(self, q, k, v, q_offset, kv_lengths, *, causal, scale, return_lse, interpret,
              config, sliding_window=None, logits_soft_cap=None):
    del sliding_window, logits_soft_cap  # refused by unsupported()
    return prefill_kernel.prefill_attention(
        q, k, v, q_offset, kv_lengths, causal=causal, scale=scale, return_lse=return_lse,
        interpret=interpret, config=config)


BACKEND = MosaicBackend()
