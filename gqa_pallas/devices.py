"""The device a call runs on: the one place that answers "is this a GPU, and which one".

Backends read a ``DeviceInfo`` to decide whether they can run (a CUDA GPU, its compute
capability) and which tuning table applies (its ``kind``, e.g. ``"NVIDIA H200"``). ``target``
lets a test lower the kernels for a GPU on a CPU-only machine
(``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``): inside it the registry plans
for that device instead of the one in hand.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
  """Static facts about the device a call is planned for.

  Attributes:
    platform: ``"gpu"``, ``"cpu"`` or ``"tpu"`` (JAX's platform name).
    kind: JAX's ``device_kind``: ``"NVIDIA H200"``, ``"NVIDIA H100 80GB HBM3"``, ``"cpu"``.
    compute_capability: ``(major, minor)`` of a CUDA GPU, else ``None``.
    num_sms: streaming multiprocessors of a CUDA GPU, else ``None``.
  """
  platform: str
  kind: str
  compute_capability: tuple[int, int] | None = None
  num_sms: int | None = None

  @property
  def is_gpu(self) -> bool:
    return self.platform == "gpu"


H100 = DeviceInfo("gpu", "NVIDIA H100 80GB HBM3", (9, 0), 132)
H200 = DeviceInfo("gpu", "NVIDIA H200", (9, 0), 132)
CPU = DeviceInfo("cpu", "cpu")

_TARGET: contextvars.ContextVar[DeviceInfo | None] = contextvars.ContextVar(
    "gqa_pallas_target_device", default=None)


def _parse_capability(value) -> tuple[int, int] | None:
  if value is None:
    return None
  try:
    major, minor = str(value).split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def describe(device) -> DeviceInfo:
  """The ``DeviceInfo`` of a ``jax.Device``."""
  if device.platform != "gpu":
    return DeviceInfo(device.platform, str(device.device_kind))
  return DeviceInfo("gpu", str(device.device_kind),
                    _parse_capability(getattr(device, "compute_capability", None)),
                    getattr(device, "core_count", None) or None)


def current() -> DeviceInfo:
  """The device calls are planned for: the ``target`` in force, else JAX's default device."""
  target = _TARGET.get()
  if target is not None:
    return target
  try:
    return describe(jax.devices()[0])
  except RuntimeError:  # no backend could be initialised
    return CPU


def on_gpu() -> bool:
  """Whether calls run on a CUDA GPU (the test every caller of the package shares)."""
  return current().is_gpu


@contextlib.contextmanager
def target(device: DeviceInfo):
  """Plans calls for ``device`` instead of the one in hand (for lowering on another machine).

  Only the planning changes (backend choice, tuning table, split counts); what runs is still
  decided by how the caller lowers or executes the result.
  """
  token = _TARGET.set(device)
  try:
    yield device
  finally:
    _TARGET.reset(token)
