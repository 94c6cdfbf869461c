"""The backend registry: which backends exist, what each one runs, and which one a call gets.

A backend is one object (a ``Backend`` subclass) that says

* which operations it implements (``OPS``: the prefill forward and backward, decode, the cache
  append),
* whether it can run a given problem (``unsupported``: device, head dim, dtype, features; the
  answer is ``None`` or the reason it cannot, naming the input and what it supports),
* its config type per operation and the default config for a problem,

and runs the operations on validated inputs. ``resolve`` picks the backend of a call:

* an explicit ``implementation="name"`` runs that backend or raises a ``ValueError`` that names
  it, the input it cannot take and what it supports; it never falls back to another backend;
* ``implementation=None`` walks the preference order of the device (``preference``) and takes
  the first backend that can run the problem.

Adding a backend is one subpackage with a ``Backend`` subclass and one line in ``_ENTRIES``
(see docs/design.md, "Adding a backend").
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
from typing import Any

import jax

from gqa_pallas import devices, validation

logger = logging.getLogger("gqa_pallas")

# prefill: gqa_attention's forward; prefill_bwd: its gradients; decode: gqa_decode;
# append: KVCache.append.
OPS = ("prefill", "prefill_bwd", "decode", "append")

# name -> module holding ``BACKEND``. Registered on first use (gqa_pallas imports them all up
# front, see gqa_pallas/__init__.py).
_ENTRIES = (
    ("mosaic", "gqa_pallas.mosaic.backend"),
    ("triton", "gqa_pallas.triton.backend"),
    ("xla", "gqa_pallas.xla"),
    ("cudnn", "gqa_pallas.cudnn"),
)

# Preference of implementation=None, by device (first match wins; unregistered names are
# skipped). interpret=True asks for a Pallas kernel's code run on the CPU.
_PREFERENCE = {
    "sm90": ("mosaic", "triton", "xla"),
    "gpu": ("triton", "xla"),
    "interpret": ("triton",),
    "other": ("xla",),
}


@dataclasses.dataclass(frozen=True)
class Problem:
  """The static facts of one call that decide which backend may run it.

  Attributes:
    op: one of ``OPS``.
    dims: the call's sizes (for ``append``: ``q_len`` = new tokens, ``kv_len`` = ``S_max``,
      ``num_heads`` = ``num_kv_heads``).
    dtype: the inputs' dtype name (``"bfloat16"``; for ``append`` the cache's).
    causal: causal masking (prefill; decode is always causal).
    interpret: run the kernel's code in an interpreter on the CPU.
    device: the device the call is planned for (``devices.current()``).
    sliding_window: the window (keys a query sees, itself included) or ``None``.
    logits_soft_cap: the logit soft-cap or ``None``.
    return_lse: the call returns the log-sum-exp too.
    offset: how the caller gave ``q_offset``: ``"default"`` (not given: ``kv_lengths - T``),
      ``"array"`` (per-row values, known only at run time) or a Python ``int`` (the same static
      position for every row).
    kv_lengths_given: the caller gave ``kv_lengths`` (else every row holds ``S`` keys).
  """
  op: str
  dims: validation.AttentionDims
  dtype: str
  causal: bool = True
  interpret: bool = False
  device: devices.DeviceInfo = devices.CPU
  sliding_window: int | None = None
  logits_soft_cap: float | None = None
  return_lse: bool = False
  offset: str | int = "default"
  kv_lengths_given: bool = False

  @property
  def head_dim(self) -> int:
    return self.dims.head_dim


class Backend:
  """Base class of a backend. Subclasses set the class attributes and implement their ops.

  Attributes:
    name: the ``implementation=`` name.
    ops: the subset of ``OPS`` it implements.
    config_types: op -> the config type it takes (an op not listed takes no config).
    differentiable: JAX can differentiate its prefill itself (no ``custom_vjp`` needed).
    custom_call: a string the CUDA lowering of its kernels contains (tests look for it).
    is_pallas: its kernels are this package's Pallas kernels (the parity suites' CUDA and GPU
      tiers and the tuning tests run these; ``"xla"`` is the reference, ``"cudnn"`` a
      comparison).
    slow_interpreter: its interpreter takes seconds per small case (the CPU-tier parity
      suites give it a short list of cases that still covers every class).
  """
  name: str = ""
  ops: frozenset[str] = frozenset()
  config_types: dict[str, type] = {}
  differentiable: bool = False
  custom_call: str = ""
  is_pallas: bool = False
  slow_interpreter: bool = False

  def unsupported(self, problem: Problem) -> str | None:
    """``None`` if this backend can run ``problem``, else why not (input and what it takes)."""
    raise NotImplementedError

  def default_config(self, problem: Problem) -> Any:
    """The config used when the caller passes none (``None`` for config-less ops)."""
    return None

  def tuning_tables(self, op: str) -> dict[str, dict[tuple[int, str], Any]]:
    """``{device kind: {(head dim, dtype name): config}}`` for ``op``; the key ``"heuristic"``
    holds what any other device gets. Every entry is lowered for CUDA in the tests."""
    return {}

  # The operations, on validated inputs (defaults resolved, lengths int32[B]).
  # ``sliding_window`` / ``logits_soft_cap`` (static, ``None`` = off) reach a backend only when
  # its ``unsupported`` accepted them.
  def prefill(self, q, k, v, q_offset, kv_lengths, *, causal, scale, return_lse, interpret,
              config, sliding_window=None, logits_soft_cap=None):
    """``[B, T, N, H]`` output (and the float32 lse ``[B, T, N]`` when ``return_lse``)."""
    raise NotImplementedError

  def prefill_bwd(self, q, k, v, q_offset, kv_lengths, out, lse, d_out, d_lse, *, causal,
                  scale, interpret, config, sliding_window=None, logits_soft_cap=None):
    """``(dq, dk, dv)`` of the prefill; ``d_lse`` is ``None`` when the lse was not returned."""
    raise NotImplementedError

  def decode(self, q, k, v, q_offset, lengths, *, scale, return_lse, interpret, config,
             sliding_window=None, logits_soft_cap=None):
    """q ``[B, T, N, H]`` over the cache ``[B, S_max, K, H]``; ``q_offset`` may be ``None``
    (``lengths - T``)."""
    raise NotImplementedError

  def append(self, k, v, lengths, overflowed, k_new, v_new, num_new, *, interpret):
    """The new ``(k, v, lengths, overflowed)`` of one layer's cache."""
    raise NotImplementedError

  def __repr__(self):
    return f"<gqa_pallas backend {self.name!r}>"


_BACKENDS: dict[str, Backend] = {}


def kernel_scope():
  """The context a backend's kernels are traced in: 32-bit integer types, also when the user
  turned on ``jax_enable_x64`` (the kernels' index arithmetic mixes traced int32 values with
  Python ints, which x64 mode would make int64). Every input is at most 32 bits wide, so
  nothing changes for the caller."""
  if not jax.config.jax_enable_x64:
    return contextlib.nullcontext()
  return jax.enable_x64(False)


def _load() -> dict[str, Backend]:
  if not _BACKENDS:
    for name, module in _ENTRIES:
      backend = importlib.import_module(module).BACKEND
      assert backend.name == name, (backend.name, name)
      _BACKENDS[name] = backend
  return _BACKENDS


def names() -> tuple[str, ...]:
  """The registered backend names (``gqa_pallas.IMPLEMENTATIONS``)."""
  return tuple(_load())


def get(name: str) -> Backend:
  """The backend called ``name``; an unknown name is a ``ValueError`` listing the known ones."""
  backends = _load()
  if name not in backends:
    raise ValueError(f"implementation must be one of {names()} or None; got {name!r}.")
  return backends[name]


def preference(device: devices.DeviceInfo, interpret: bool) -> tuple[str, ...]:
  """The order ``implementation=None`` tries, for this device (registered backends only)."""
  if interpret:
    key = "interpret"
  elif device.is_gpu:
    key = "sm90" if device.compute_capability == (9, 0) else "gpu"
  else:
    key = "other"
  return tuple(name for name in _PREFERENCE[key] if name in _load())


def resolve(implementation: str | None, problem: Problem) -> Backend:
  """The backend that runs ``problem`` (see the module docstring for the rules)."""
  if implementation is not None:
    if not isinstance(implementation, str):
      raise TypeError(f"implementation must be a backend name {names()} or None; got "
                      f"{type(implementation).__name__}.")
    backend = get(implementation)
    if problem.op not in backend.ops:
      raise ValueError(f"implementation={implementation!r} does not implement {problem.op}; "
                       f"backends that do: {implementing(problem.op)}.")
    reason = backend.unsupported(problem)
    if reason is not None:
      raise ValueError(f"implementation={implementation!r} cannot run this {problem.op}: "
                       f"{reason}.")
    return backend
  order = preference(problem.device, problem.interpret)
  reasons = []
  for name in order:
    backend = _BACKENDS[name]
    if problem.op not in backend.ops:
      continue
    reason = backend.unsupported(problem)
    if reason is None:
      if reasons and problem.device.is_gpu:
        # Not silent: a GPU call that lands on XLA (no kernel takes it) warns why; one that a
        # later kernel takes (Mosaic GPU -> Triton, e.g. float32) says so in the debug log.
        logger.log(logging.WARNING if name == "xla" else logging.DEBUG,
                   "gqa_pallas: %s runs on implementation=%r: %s", problem.op, name,
                   "; ".join(reasons))
      return backend
    reasons.append(f"{name!r}: {reason}")
  if problem.interpret:
    raise ValueError(f"interpret=True runs a Pallas kernel's code on the CPU, and no Pallas "
                     f"backend can run this {problem.op}: " + "; ".join(reasons) + ".")
  raise ValueError(f"no backend can run this {problem.op}: " + "; ".join(reasons) + ".")


def resolve_backward(forward: Backend, problem: Problem) -> Backend:
  """The backend of the prefill's gradients: the forward's own when it can run them, else the
  first in the device's preference that can, else the reference's VJP (``"xla"``, which takes
  any problem and ignores ``interpret``)."""
  problem = backward_problem(problem)
  candidates = (forward.name,) + preference(problem.device, problem.interpret)
  for name in candidates:
    backend = _BACKENDS[name]
    if "prefill_bwd" in backend.ops and backend.unsupported(problem) is None:
      return backend
  return _BACKENDS["xla"]


def backward_problem(problem: Problem) -> Problem:
  """The ``prefill_bwd`` problem of a prefill problem."""
  return dataclasses.replace(problem, op="prefill_bwd")


def check_config(backend: Backend, op: str, config, problem: Problem):
  """``config`` if it fits the backend's config type for ``op``; the default when ``None``."""
  if config is None:
    return backend.default_config(problem)
  expected = backend.config_types.get(op)
  if expected is None:
    raise TypeError(f"implementation={backend.name!r} takes no config for {op}; got "
                    f"{type(config).__name__}.")
  if not isinstance(config, expected):
    raise TypeError(f"config for implementation={backend.name!r} {op} must be a "
                    f"{expected.__module__}.{expected.__qualname__} (or None); got "
                    f"{type(config).__name__}.")
  return config


def implementing(op: str) -> tuple[str, ...]:
  """The registered backends that implement ``op`` (one of ``OPS``)."""
  return tuple(name for name, b in _load().items() if op in b.ops)
