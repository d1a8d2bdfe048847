"""Shared by the example tests: load an example script and run its quick mode once."""

import contextlib
import importlib.util
import io
import json
import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def load_example(filename: str, module_name: str):
  """Imports examples/<filename> as `module_name` (registered while in use)."""
  spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / filename)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def run_quick(module, out_dir: pathlib.Path, plot_name: str):
  """(returned value, JSON written, printed output, plot path) of `main(["--quick"])`."""
  pytest.importorskip("sklearn")
  pytest.importorskip("matplotlib")
  plot, numbers = out_dir / plot_name, out_dir / "numbers.json"
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    result = module.main(["--quick", "--plot", str(plot), "--json", str(numbers)])
  print(printed.getvalue())
  return result, json.loads(numbers.read_text()), printed.getvalue(), plot
