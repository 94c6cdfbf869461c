"""``gqa-pallas bench`` on the CPU (small shapes, said to be CPU numbers) and the report built
from a results file (tables, plots, the README's headline block)."""
import json
import os

import pytest

from benchmarks import bench, report
from flax_layers import cli


def test_cpu_run_says_what_it_is_and_resumes(tmp_path, capsys):
  out = tmp_path / "cpu.json"
  assert cli.main(["bench", "decode", "--out", str(out), "--no-plots", "--iterations", "1"]) == 0
  printed = capsys.readouterr().out
  assert "NOT GPU numbers" in printed
  res = json.loads(out.read_text())
  assert res["gpu"] is False and "NOT GPU numbers" in res["note"]
  assert res["command"] == "gqa-pallas bench decode" and set(res["seconds"]) == {"decode"}
  rows = [r for r in res["rows"] if r["kind"] == "decode"]
  assert len(rows) == len(bench.CPU_DECODE)
  for r in rows:
    assert {"ours", "triton", "xla", "jnp-ref"} <= set(r["ms"]) and r["ours_backend"] == "triton"
    assert r["rel_err_vs_f32_ref"] < 1e-2
  # A run cut short in its part: --resume keeps the header and runs the part again.
  res["seconds"], res["rows"] = {}, rows[:1]
  out.write_text(json.dumps(res))
  assert cli.main(["bench", "decode", "--out", str(out), "--no-plots", "--iterations", "1",
                   "--resume"]) == 0
  again = json.loads(out.read_text())
  assert again["date"] == res["date"] and len(again["resumed"]) == 1
  assert len([r for r in again["rows"] if r["kind"] == "decode"]) == len(bench.CPU_DECODE)


def test_unknown_part_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", "everything"])
  assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def _synthetic(tmp_path):
  rows = []
  for s in (2048, 8192):
    rows.append(dict(kind="prefill", B=16384 // s, S=s, N=32, K=8, H=128, dtype="bfloat16",
                     ours_backend="mosaic", rel_err_vs_f32_ref=2e-3,
                     tflops={"ours": 500.0, "mosaic": 500.0, "cudnn": 550.0, "xla": 40.0},
                     ms={}))
  rows.append(dict(kind="decode", label="full", B=16, S_max=8192, N=32, K=8, H=128, T=1,
                   dtype="bfloat16", kv_bytes_read=2 ** 28, ours_backend="triton",
                   gbs={"ours": 4000.0, "cudnn": 3900.0}, ms={"ours": 0.067, "cudnn": 0.069}))
  rows.append(dict(kind="e2e", model="Llama-3.2-1B shapes", B=16, prompt=2048, new_tokens=256,
                   prefill_ms={"ours": 120.0, "cudnn": 123.0},
                   decode_tokens_per_s={"ours": 2750.0, "cudnn": 2745.0},
                   decode_vs_cudnn=2750 / 2745))
  rows.append(dict(kind="host_overhead", model="Llama-3.2-1B shapes", B=1, prompt=128,
                   new_tokens=32, generate_wall_ms=100.5, program_wall_ms=100.0, device_ms=99.0,
                   overhead_ms=1.5, within_2ms=True, python_overhead_ms=0.5))
  res = dict(device="NVIDIA H200", jax="0.11.2", date="2026-12-03T00:00:00", gpu=True,
             copy_gbs=3360.0, read_gbs=4600.0, matmul_tflops=810.0, rows=rows)
  path = tmp_path / "gpu.json"
  path.write_text(json.dumps(res))
  return path, res


def test_plots_and_tables_from_a_results_file(tmp_path):
  pytest.importorskip("matplotlib")
  path, res = _synthetic(tmp_path)
  made = report.plots_from(str(path), str(tmp_path / "img"))
  assert sorted(os.path.basename(p) for p in made) == ["decode.png", "e2e.png", "prefill.png"]
  assert all(os.path.getsize(p) > 10_000 for p in made)
  rows = res["rows"]
  section = "\n".join(report.e2e_section([rows[3]], [rows[4]]))
  assert "| 16 | 2048 | 256 | 120.0 / 123.0 / - | 2750 / 2745 / - | 1.00 |" in section
  assert "wall minus device **1.50 ms** (bar: 2 ms, met)" in section
  table = report.headline([rows[0]], [rows[2]], [rows[3]])
  assert "| prefill bf16 B8 S2048 32:8 H128 (TFLOP/s) | 500 | 550 | 0.91 |" in table
  assert "| decode B16 S8192 32:8 H128 (us) | 67.0 | 69.0 | 1.03 (time) |" in table
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\nrest\n")
  assert report.update_readme(table, res, "benchmarks/results/gpu.json", str(readme))
  text = readme.read_text()
  assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
  assert table in text
  plain = tmp_path / "PLAIN.md"
  plain.write_text("no markers\n")
  assert not report.update_readme(table, res, "x", str(plain))


def test_all_in_stages_with_only_then_resume(tmp_path, capsys):
  out = tmp_path / "cpu.json"
  argv = ["bench", "all", "--out", str(out), "--no-plots", "--iterations", "1"]
  assert cli.main(argv + ["--only", "decode"]) == 0
  res = json.loads(out.read_text())
  assert set(res["seconds"]) == {"decode"} and {r["kind"] for r in res["rows"]} == {"decode"}
  assert "parts not run yet: prefill, backward, e2e" in capsys.readouterr().out
  assert cli.main(argv + ["--only", "e2e", "--resume"]) == 0
  again = json.loads(out.read_text())
  assert set(again["seconds"]) == {"decode", "e2e"} and len(again["resumed"]) == 1
  kinds = [r["kind"] for r in again["rows"]]
  assert kinds.count("decode") == len(bench.CPU_DECODE) and "host_overhead" in kinds
  e2e_rows = [r for r in again["rows"] if r["kind"] == "e2e"]
  assert [r["B"] for r in e2e_rows] == [1, 4]
  assert all(r["decode_tokens_per_s"]["xla"] > 0 and r["prefill_ms"]["xla"] > 0
             for r in e2e_rows)
  capsys.readouterr()
  assert cli.main(argv + ["--only", "prefil"]) == 2
  assert "--only takes parts of 'all'" in capsys.readouterr().err
