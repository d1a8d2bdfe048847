"""benchmarks/optim.py runs at a small size and leaves the formats as it found them."""

import importlib.util
import pathlib
import sys

import pytest

from jaxquant import formats

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "optim.py"


@pytest.fixture(scope="module")
def benchmark():
  spec = importlib.util.spec_from_file_location("benchmark_optim", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  yield module
  del sys.modules[spec.name]


def test_small_run_reports_every_optimizer(benchmark, monkeypatch):
  monkeypatch.setattr(benchmark, "time_bitsandbytes", lambda *_: "skipped in tests")
  encode, decode = formats.encode, formats.decode
  rows = benchmark.main(["--sizes", "1", "--repeats", "1", "--casts-for-codecs"])
  assert (formats.encode, formats.decode) == (encode, decode)
  by_name = {r["optimizer"]: r for r in rows}
  assert set(by_name) == {"optax.adamw", "jq.optim.adamw_8bit", "jq.optim.adamw_4bit",
                          "adamw_8bit, casts"}
  assert by_name["optax.adamw"]["step_ratio"] == 1.0
  assert by_name["jq.optim.adamw_8bit"]["state_ratio"] <= 0.26
  # No float32 moment in the step's scratch: at most a copy of the 8-bit codes.
  assert by_name["jq.optim.adamw_8bit"]["scratch_mb"] <= 1.5 * by_name[
      "jq.optim.adamw_8bit"]["state_mb"]
