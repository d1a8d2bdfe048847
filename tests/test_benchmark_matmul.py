"""benchmarks/matmul.py runs end to end at tiny sizes and reports every row."""

import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "matmul.py"


@pytest.fixture(scope="module")
def benchmark():
  spec = importlib.util.spec_from_file_location("benchmark_matmul", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quick_tiny_run(benchmark, tmp_path, capsys):
  out = tmp_path / "matmul.json"
  rows = benchmark.main(["--quick", "--kn", "256", "--repeats", "2", "--min-time", "0",
                         "--rotate-mb", "0", "--json", str(out)])
  printed = capsys.readouterr().out
  paths = ["bf16", *benchmark.PATHS]
  assert [(r["kind"], r["m"], r["path"]) for r in rows] == [
      (kind, m, p) for kind, m in [("decode", 1), ("decode", 16), ("prefill", 256)]
      for p in paths]
  for row in rows:
    assert row["ms"] > 0 and row["speedup"] > 0 and row["k"] == row["n"] == 256
    assert row["rel_err"] < (0.02 if row["path"] in ("bf16", "w8a8", "w8a16") else 0.2)
    assert row["tflop_per_s"] > 0 and row["bytes"] > 0
  assert json.loads(out.read_text())["rows"] == rows
  assert "prefill 256x256x256" in printed and "w4a16" in printed
  if benchmark.jax.devices()[0].platform == "cpu":
    assert "n/a" in printed and "XLA reference paths" in printed and "MISS" not in printed


def test_subset_of_paths_and_shapes(benchmark, capsys):
  rows = benchmark.main(["--shapes", "prefill", "--kn", "256", "--paths", "w4a16",
                         "--repeats", "1", "--min-time", "0", "--rotate-mb", "0"])
  capsys.readouterr()
  assert [(r["kind"], r["m"], r["path"]) for r in rows] == [
      ("prefill", 2048, "bf16"), ("prefill", 2048, "w4a16")]
