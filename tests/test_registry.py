"""The backend registry: which backend a call gets, the errors of an explicit name, config
checks, the VJP pairing, and the package's import structure (no upward or circular imports)."""
import ast
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import gqa_pallas as gp
from gqa_pallas import devices, registry
from gqa_pallas.triton import decode, prefill
from gqa_pallas.validation import AttentionDims
from tests import numerics
from tests.conftest import HAS_GPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = jnp.float32


def _problem(op="prefill", head_dim=64, dtype="float32", device=devices.CPU, interpret=False):
  return registry.Problem(op, AttentionDims(1, 4, 4, 2, 2, head_dim), dtype, interpret=interpret,
                          device=device)


def test_implementations_come_from_the_registry():
  assert gp.IMPLEMENTATIONS == registry.names()
  assert {"triton", "xla"} <= set(gp.IMPLEMENTATIONS)
  for name in gp.IMPLEMENTATIONS:
    backend = registry.get(name)
    assert backend.name == name and backend.ops <= set(registry.OPS)


def test_preference_by_device():
  assert registry.preference(devices.CPU, False) == ("xla",)
  assert registry.preference(devices.H200, False) == ("mosaic", "triton", "xla")
  assert registry.preference(devices.DeviceInfo("gpu", "NVIDIA A100", (8, 0), 108),
                             False) == ("triton", "xla")
  assert registry.preference(devices.CPU, True)[-1] == "triton"
  assert "xla" not in registry.preference(devices.CPU, True)


def test_default_resolution():
  on_this_machine = registry.resolve(None, _problem(device=devices.current()))
  assert on_this_machine.name == (registry.preference(devices.current(), False)[0])
  assert registry.resolve(None, _problem()).name == "xla"
  assert registry.resolve(None, _problem(interpret=True)).name in ("triton", "mosaic")
  assert registry.resolve(None, _problem(device=devices.H200)).name != "xla"


def test_default_on_a_gpu_falls_back_with_a_warning(caplog):
  """An input no kernel takes (H = 12) runs on XLA, and the log says which and why."""
  with caplog.at_level(logging.WARNING, logger="gqa_pallas"):
    backend = registry.resolve(None, _problem(head_dim=12, device=devices.H200))
  assert backend.name == "xla"
  assert any("head_dim=12" in r.getMessage() for r in caplog.records)


def test_kernel_to_kernel_fallback_is_quiet(caplog):
  """float32 on an H200: Mosaic GPU refuses it, Triton takes it, and nothing is warned."""
  with caplog.at_level(logging.WARNING, logger="gqa_pallas"):
    backend = registry.resolve(None, _problem(dtype="float32", device=devices.H200))
  assert backend.name == "triton"
  assert not caplog.records
  assert registry.resolve(None, _problem(dtype="bfloat16", device=devices.H200)).name == "mosaic"


@pytest.mark.parametrize("implementation", ["cuDNN", "pallas", "XLA", "cuda-magic"])
def test_unknown_implementation_lists_the_valid_ones(implementation):
  msg = re.escape(f"implementation must be one of {gp.IMPLEMENTATIONS} or None; got "
                  f"{implementation!r}")
  q, k, v = numerics.random_qkv(0, 1, 4, 4, 2, 2, 16, F32)
  with pytest.raises(ValueError, match=msg):
    gp.gqa_attention(q, k, v, implementation=implementation)
  with pytest.raises(ValueError, match=msg):
    gp.gqa_decode(q[:, 0], gp.KVCache(k, v, jnp.array([4])), implementation=implementation)
  with pytest.raises(ValueError, match=msg):
    gp.KVCache.init(1, 8, 2, 16, F32).append(k, v, implementation=implementation)
  with pytest.raises(TypeError, match="implementation must be a backend name"):
    gp.gqa_attention(q, k, v, implementation=1)


def test_an_explicit_name_never_falls_back():
  q, k, v = numerics.random_qkv(7, 1, 4, 4, 2, 2, 12, F32)
  with pytest.raises(ValueError, match=r"implementation='triton' cannot run this prefill: "
                                       r"head_dim=12 \(the Triton kernels take head dims that "
                                       r"are multiples of 8 up to 256"):
    gp.gqa_attention(q, k, v, implementation="triton", interpret=True)
  if not HAS_GPU:
    with pytest.raises(ValueError, match=r"implementation='triton' cannot run this decode: a "
                                         r"CUDA GPU \(the device is 'cpu'; interpret=True"):
      gp.gqa_decode(q[:, 0], gp.KVCache(k, v, jnp.array([4])), implementation="triton")
  with pytest.raises(ValueError, match=r"implementation='xla' cannot run this prefill: "
                                       r"interpret=True \(it runs no Pallas kernel"):
    gp.gqa_attention(q, k, v, implementation="xla", interpret=True)


def test_interpret_with_no_kernel_for_the_input():
  q, k, v = numerics.random_qkv(7, 1, 4, 4, 2, 2, 12, F32)
  with pytest.raises(ValueError, match=r"interpret=True runs a Pallas kernel's code on the CPU, "
                                       r"and no Pallas backend can run this prefill: 'triton': "
                                       r"head_dim=12"):
    gp.gqa_attention(q, k, v, interpret=True)


def test_config_is_checked_against_the_backend():
  q, k, v = numerics.random_qkv(1, 1, 8, 8, 2, 2, 16, F32)
  cfg = prefill.PrefillConfig(64, 32, 4, 2)
  out = gp.gqa_attention(q, k, v, implementation="triton", interpret=True, config=cfg)
  numerics.assert_parity(out, gp.attention_reference(q, k, v), None)
  with pytest.raises(TypeError, match=r"config for implementation='triton' prefill must be a "
                                      r"gqa_pallas\.triton\.prefill\.PrefillConfig \(or None\); "
                                      r"got DecodeConfig"):
    gp.gqa_attention(q, k, v, implementation="triton", interpret=True,
                     config=decode.DecodeConfig())
  with pytest.raises(TypeError, match=r"implementation='xla' takes no config for prefill"):
    gp.gqa_attention(q, k, v, implementation="xla", config=cfg)
  cache = gp.KVCache(k, v, jnp.array([8]))
  with pytest.raises(TypeError, match=r"DecodeConfig \(or None\); got PrefillConfig"):
    gp.gqa_decode(q[:, 0], cache, implementation="triton", interpret=True, config=cfg)


def test_backward_pairs_with_a_backward_kernel_or_the_reference_vjp():
  triton = registry.get("triton")
  assert registry.resolve_backward(triton, _problem(interpret=True)).name == "triton"
  assert registry.resolve_backward(triton, _problem(device=devices.H200)).name == "triton"
  xla = registry.get("xla")
  assert registry.resolve_backward(xla, _problem()).name == "xla"
  # A head dim no backward kernel takes: the reference's VJP.
  odd = _problem(device=devices.H200, head_dim=260)
  assert registry.resolve_backward(triton, odd).name == "xla"


def test_xla_forward_keeps_forward_mode_autodiff():
  """The XLA backend is differentiated by JAX itself (no custom_vjp): jvp works."""
  q, k, v = numerics.random_qkv(2, 1, 5, 5, 2, 1, 16, F32)
  f = lambda q: gp.gqa_attention(q, k, v, implementation="xla")
  out, tangent = jax.jvp(f, (q,), (jnp.ones_like(q),))
  assert out.shape == tangent.shape == q.shape


# ---------------------------------------------------------------------------------------------
# Import structure.


def _package_imports():
  """{module: set of gqa_pallas / flax_layers modules it imports} for every module of both."""
  graph = {}
  for package in ("gqa_pallas", "flax_layers"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if not f.endswith(".py"):
          continue
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        module = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
          if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
              deps.add(f"{node.module}.{alias.name}")
              deps.add(node.module)
          elif isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
        graph[module] = {d for d in deps if d.split(".")[0] in ("gqa_pallas", "flax_layers")}
  # Keep only names that are modules (``from pkg import name`` may import a function).
  for module, deps in graph.items():
    graph[module] = {d for d in deps if d in graph and d != module}
  return graph


def test_the_kernel_package_never_imports_the_model_package():
  for module, deps in _package_imports().items():
    if module.startswith("gqa_pallas"):
      assert not any(d.startswith("flax_layers") for d in deps), (module, deps)
  code = ("import sys, gqa_pallas; bad = [m for m in sys.modules if m.startswith('flax_layers')];"
          " assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_circular_imports_between_modules():
  graph = _package_imports()
  # A package's __init__ importing its own submodules is not a cycle of the modules themselves.
  edges = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")}
           for m, deps in graph.items()}
  state = {}

  def visit(node, path):
    state[node] = "active"
    for dep in edges.get(node, ()):
      if state.get(dep) == "active":
        raise AssertionError("import cycle: " + " -> ".join(path + [dep]))
      if dep not in state:
        visit(dep, path + [dep])
    state[node] = "done"

  for module in edges:
    if module not in state:
      visit(module, [module])
  assert "gqa_pallas.api" not in graph["gqa_pallas.cache"]


def test_kernel_modules_of_one_backend_share_rules_through_its_common_module():
  """A kernel module never imports a sibling kernel for a shared rule (head dims, helpers)."""
  graph = _package_imports()
  kernels = {"gqa_pallas.triton.prefill", "gqa_pallas.triton.decode", "gqa_pallas.triton.append"}
  for module in kernels:
    assert not graph[module] & kernels, (module, graph[module])
