"""The public contract of DESIGN.md is importable, and kernels install as a subpackage."""

import importlib.util

import jaxquant as jq

CONTRACT = ["get_format", "list_formats", "Format", "QuantSpec", "quantize", "dequantize",
            "fake_quant", "QArray", "Rule", "quantize_tree", "dequantize_tree",
            "tree_report", "pack_codes", "unpack_codes", "get_preset", "list_presets",
            "checkpoint"]


def test_contract_names_exist():
  missing = [name for name in CONTRACT if not hasattr(jq, name)]
  assert not missing


def test_format_attributes():
  fmt = jq.get_format("int4")
  assert (fmt.name, fmt.bits, fmt.max) == ("int4", 4, 7.0)
  assert list(fmt.values) == list(range(-8, 8))


def test_kernels_is_a_subpackage_not_a_top_level_module():
  assert importlib.util.find_spec("jaxquant.kernels") is not None
  assert importlib.util.find_spec("kernels") is None
