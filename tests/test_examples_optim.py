"""The quick run of examples/optim_quality.py: float vs 8-bit AdamW on two tasks.

Runs in-process under the strict dtype and rank promotion of conftest.py (~30 s).
"""

import math
import pathlib
import sys

import pytest
from example_harness import load_example, run_quick

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "optim_quality.py"
# Measured on the quick run (2 seeds, 100 steps): the 8-bit held-out loss is -3.5%
# (digits, an undertrained CNN whose seeds differ by ~13%) and -0.1% (text) from
# the float one. The bounds leave room for other XLA versions, not for a broken
# optimizer (a wrong moment or a zeroed second moment moves them by far more).
MAX_RELATIVE_DIFF = {"digits": 0.10, "text": 0.01}


@pytest.fixture(scope="module")
def example():
  yield load_example(EXAMPLE.name, "optim_quality_example")
  del sys.modules["optim_quality_example"]


@pytest.fixture(scope="module")
def quick_run(example, tmp_path_factory):
  """(returned value, JSON written, printed output, plot path) of one quick run."""
  return run_quick(example, tmp_path_factory.mktemp("optim_quality"), "curves.png")


def test_quick_run_writes_the_plot(quick_run):
  _, _, output, plot = quick_run
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert f"Loss curves written to {plot}" in output


def test_quick_run_prints_the_table(quick_run):
  _, _, output, _ = quick_run
  for text in ("optimizer", "train loss", "test loss", "val loss", "state bytes",
               "adamw_8bit vs adamw, final val loss", "target"):
    assert text in output


def test_quick_run_numbers_are_finite_and_match_the_json(quick_run):
  results, written, _, _ = quick_run
  assert set(results) == {"digits", "text"}
  for task, summary in results.items():
    heldout = summary["heldout"]
    for name in ("adamw", "adamw_8bit"):
      entry = summary["optimizers"][name]
      for key in ("train_loss", f"{heldout}_loss"):
        assert all(math.isfinite(v) and v > 0 for v in entry[key]["seeds"]), (task, name)
        assert len(entry[key]["seeds"]) == 2
        assert entry[key]["mean"] == written["tasks"][task]["optimizers"][name][key]["mean"]
      assert all(math.isfinite(v) for v in entry["curves"]["step_loss"])
  assert 0.5 < results["digits"]["optimizers"]["adamw"]["accuracy"]["mean"] <= 1


def test_quick_run_state_is_mostly_8bit_and_smaller(quick_run):
  results, _, _, _ = quick_run
  for summary in results.values():
    floats, quantized = summary["optimizers"]["adamw"], summary["optimizers"]["adamw_8bit"]
    assert floats["quantized_fraction"] == 0
    assert quantized["quantized_fraction"] > 0.9
    assert quantized["state_bytes"] < 0.35 * floats["state_bytes"]
    assert quantized["float32_params"]  # biases and small kernels stay float32


def test_quick_run_8bit_loss_is_close_to_float(quick_run):
  results, _, _, _ = quick_run
  for task, summary in results.items():
    comparison = summary["comparisons"]["adamw_8bit"][summary["heldout"]]
    assert abs(comparison["relative"]) < MAX_RELATIVE_DIFF[task], (task, comparison)
    assert comparison["holds"], (task, comparison)
