"""Quantization recipes: named, ordered lists of `jq.Rule`s read from TOML files.

A recipe file has a name, a description and an ordered list of rules; the first
rule whose ``pattern`` fully matches a leaf's "/"-joined path (``params/Dense_0/
kernel``) decides what happens to it, and leaves no rule matches stay as they are::

  name = "mixed"
  description = "nvfp4 output projections, int8 elsewhere; biases stay float."

  [[rules]]
  pattern = ".*bias"
  keep = true                      # keep matching leaves in float

  [[rules]]
  pattern = ".*/out_proj/kernel"
  preset = "nvfp4"                 # a preset of `jq.list_presets()`, with optional
  axis = 0                         #   axis (the one the blocks run along) and ndim
  ndim = 2

  [[rules]]
  pattern = ".*kernel"
  format = "int8"                  # or QuantSpec fields, all optional but format:
  channel_axes = [-1]              #   channel_axes, block_sizes = { -2 = 128 },
                                   #   symmetric, calibration, scale_dtype
                                   #   ("float32", "bfloat16", "fp8_e4m3", "e8m0"),
                                   #   full_range, tensor_scale

Recipes shipped with jaxquant live in ``configs/`` (the package `jaxquant.configs`)
and are loaded by name: ``load_recipe("int4-g128")``. Anything else is a path.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import pathlib
import re
import textwrap
from typing import Any, Union

from jaxquant import presets as presets_lib
from jaxquant.quantize import QuantSpec
from jaxquant.tree import Rule

try:
  import tomllib  # Python >= 3.11
except ImportError:  # pragma: no cover  (Python 3.10)
  tomllib = None

DEFAULT_RECIPE = "int8"
CONFIGS_PACKAGE = "jaxquant.configs"

_TOP_KEYS = ("name", "description", "rules")
_SPEC_KEYS = ("format", "channel_axes", "block_sizes", "symmetric", "calibration",
              "scale_dtype", "full_range", "tensor_scale")
_PRESET_KEYS = ("preset", "axis", "ndim")
_RULE_KEYS = ("pattern", "keep", *_SPEC_KEYS, *_PRESET_KEYS)
_BOOL_KEYS = ("symmetric", "full_range", "tensor_scale")
_SCALE_DTYPES = ("float32", "bfloat16", "float16", "fp8_e4m3", "e8m0")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A named, ordered tuple of rules for `jq.quantize_tree`.

  Attributes:
    name: the recipe's name (``"int8"``).
    description: one paragraph saying what it does and why.
    rules: the rules, first match wins: ``jq.quantize_tree(params, recipe.rules)``.
  """

  name: str
  description: str
  rules: tuple[Rule, ...]

  def __str__(self) -> str:
    """The name and description (wrapped to 88 columns), then one line per rule."""
    lines = [textwrap.fill(f"Recipe {self.name}: {self.description}", width=88,
                           subsequent_indent="  ")]
    width = max((len(rule.pattern) for rule in self.rules), default=0)
    for rule in self.rules:
      lines.append(f"  {rule.pattern:<{width}}  -> {describe_spec(rule.spec)}")
    return "\n".join(lines)


def describe_spec(spec: QuantSpec | None) -> str:
  """A short description of `spec`: its format and the fields not at their default."""
  if spec is None:
    return "keep float"
  default = QuantSpec(spec.format)
  parts = [spec.format.name]
  for field in dataclasses.fields(QuantSpec):
    value = getattr(spec, field.name)
    if field.name != "format" and value != getattr(default, field.name):
      if field.name == "block_sizes":
        value = spec.block_size_dict
      parts.append(f"{field.name}={value}")
  return " ".join(parts)


# ----------------------------------------------------------------------------
# Parsing.


def _toml(value: Any) -> str:
  """`value` written as in TOML (true, "text", [0, 1], { -2 = 128 }) for messages."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return json.dumps(value)
  if isinstance(value, list):
    return "[" + ", ".join(map(_toml, value)) + "]"
  if isinstance(value, dict):
    return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
  return str(value)


def _fail(source: str, where: str, message: str) -> ValueError:
  return ValueError(f"recipe {source}: {where}{message}")


def _check_type(source, where, key, value, kind, expected):
  if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
    raise _fail(source, where, f"{key} = {_toml(value)}; expected {expected}")


def _int_list(source, where, key, value) -> tuple[int, ...]:
  if not isinstance(value, list) or not all(
      isinstance(a, int) and not isinstance(a, bool) for a in value):
    raise _fail(source, where, f"{key} = {_toml(value)}; expected a list of integer axes, "
                "e.g. [-1]")
  return tuple(value)


def _block_sizes(source, where, value) -> dict[int, int]:
  """TOML table with string keys (``{ -2 = 128 }``) -> ``{axis: block}``."""
  if not isinstance(value, dict):
    raise _fail(source, where, f"block_sizes = {_toml(value)}; expected a table of axis = "
                "block size, e.g. { -2 = 128 }")
  blocks = {}
  for axis, block in value.items():
    if not re.fullmatch(r"-?\d+", axis):
      raise _fail(source, where, f"block_sizes has the key {axis!r}; expected an "
                  "integer axis such as 0 or -2")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
      raise _fail(source, where, f"block_sizes = {_toml(value)} has block {_toml(block)} for "
                  f"axis {axis}; expected a positive integer")
    blocks[int(axis)] = block
  return blocks


def _spec_kwargs(source, where, table) -> dict[str, Any]:
  """QuantSpec keyword arguments from the spec fields of a rule table."""
  kwargs = {}
  for key in _SPEC_KEYS:
    if key not in table:
      continue
    value = table[key]
    if key == "channel_axes":
      value = _int_list(source, where, key, value)
    elif key == "block_sizes":
      value = _block_sizes(source, where, value)
    elif key in _BOOL_KEYS:
      _check_type(source, where, key, value, bool, "true or false")
    elif key == "scale_dtype" and value not in _SCALE_DTYPES:
      raise _fail(source, where, f"scale_dtype = {_toml(value)}; expected one of "
                  f"{', '.join(map(_toml, _SCALE_DTYPES))}")
    else:
      _check_type(source, where, key, value, str, "a string")
    kwargs[key] = value
  return kwargs


def _preset_spec(source, where, table) -> QuantSpec:
  name = table["preset"]
  if name not in presets_lib.list_presets():
    raise _fail(source, where, f"preset = {_toml(name)} is not known; known presets: "
                f"{', '.join(presets_lib.list_presets())}")
  kwargs = {}
  for key in ("axis", "ndim"):
    if key in table:
      _check_type(source, where, key, table[key], int, "an integer")
      kwargs[key] = table[key]
  try:
    return presets_lib.get_preset(name, **kwargs)
  except ValueError as e:
    raise _fail(source, where, str(e)) from e


def _parse_rule(source: str, index: int, table: Any) -> Rule:
  """One ``[[rules]]`` table -> a `Rule`; errors name the file and rule number."""
  where = f"rule {index + 1}: "
  if not isinstance(table, dict):
    raise _fail(source, where, f"expected a table ([[rules]]), got {_toml(table)}")
  pattern = table.get("pattern")
  if pattern is not None:
    where = f"rule {index + 1} (pattern {pattern!r}): "
  unknown = [key for key in table if key not in _RULE_KEYS]
  if unknown:
    raise _fail(source, where, f"unknown key {unknown[0]!r}; expected keys: "
                f"{', '.join(_RULE_KEYS)}")
  if pattern is None:
    raise _fail(source, where, "missing pattern (a regex over paths such as "
                "'params/Dense_0/kernel')")
  _check_type(source, where, "pattern", pattern, str, "a string")
  spec_keys = [key for key in _SPEC_KEYS if key in table]
  preset_keys = [key for key in _PRESET_KEYS if key in table]
  if "keep" in table:
    if table["keep"] is not True:
      raise _fail(source, where, f"keep = {_toml(table['keep'])}; expected keep = true "
                  "(leave out keep to quantize)")
    if spec_keys or preset_keys:
      raise _fail(source, where, "keep = true cannot be combined with "
                  f"{(spec_keys + preset_keys)[0]}")
    spec = None
  elif "preset" in table:
    if spec_keys:
      raise _fail(source, where, f"preset cannot be combined with {spec_keys[0]}; "
                  "a preset sets the whole spec")
    spec = _preset_spec(source, where, table)
  elif preset_keys:
    raise _fail(source, where, f"{preset_keys[0]} is only allowed with preset")
  elif "format" not in table:
    raise _fail(source, where, "expected keep = true, format = ... or preset = ...")
  else:
    kwargs = _spec_kwargs(source, where, table)
    try:
      spec = QuantSpec(**kwargs)
    except (ValueError, TypeError) as e:
      raise _fail(source, where, str(e)) from e
  try:
    return Rule(pattern, spec)
  except ValueError as e:
    raise _fail(source, where, str(e)) from e


def parse_recipe(data: dict[str, Any], source: str = "<dict>") -> Recipe:
  """A `Recipe` from parsed TOML (a dict).

  Args:
    data: ``{"name": str, "description": str, "rules": [dict, ...]}``.
    source: where `data` came from, for error messages.
  Returns:
    The `Recipe`.
  Raises:
    ValueError: unknown keys, missing or mistyped fields, bad spec values; the
      message names `source` and the rule's number and pattern.
  """
  unknown = [key for key in data if key not in _TOP_KEYS]
  if unknown:
    raise _fail(source, "", f"unknown top-level key {unknown[0]!r}; expected "
                f"{', '.join(_TOP_KEYS)}")
  name = data.get("name")
  _check_type(source, "", "name", name, str, "a string (the recipe's name)")
  description = data.get("description", "")
  _check_type(source, "", "description", description, str, "a string")
  rules = data.get("rules")
  if not isinstance(rules, list) or not rules:
    raise _fail(source, "", "expected at least one [[rules]] table")
  return Recipe(name, " ".join(description.split()),
                tuple(_parse_rule(source, i, table) for i, table in enumerate(rules)))


# ----------------------------------------------------------------------------
# Loading.


def _parse_toml(text: str, source: str) -> dict[str, Any]:
  if tomllib is None:  # pragma: no cover
    raise ValueError(f"recipe {source}: reading TOML needs Python >= 3.11 (tomllib)")
  try:
    return tomllib.loads(text)
  except tomllib.TOMLDecodeError as e:
    raise ValueError(f"recipe {source}: not valid TOML: {e}") from e


def _shipped_files() -> dict[str, Any]:
  """{name: Traversable} of the recipe files in `jaxquant.configs`."""
  root = importlib.resources.files(CONFIGS_PACKAGE)
  files = {}
  for entry in root.iterdir():
    if entry.name.endswith(".toml") and entry.is_file():
      files[entry.name[: -len(".toml")]] = entry
  return files


def _is_recipe_file(text: str) -> bool:
  try:
    return isinstance(tomllib.loads(text).get("rules"), list)
  except tomllib.TOMLDecodeError:
    return False


def list_recipes() -> list[str]:
  """Names of the recipes shipped with jaxquant, sorted (`load_recipe` takes them)."""
  return sorted(name for name, entry in _shipped_files().items()
                if _is_recipe_file(entry.read_text(encoding="utf-8")))


def _looks_like_path(name_or_path: str) -> bool:
  return (name_or_path.endswith(".toml") or os.sep in name_or_path
          or "/" in name_or_path)


def load_recipe(name_or_path: Union[str, os.PathLike]) -> Recipe:
  """The recipe shipped under `name`, or read from a TOML file.

  Args:
    name_or_path: a shipped recipe's name (see `list_recipes`), or a path to a
      TOML file (anything ending in ``.toml`` or containing a path separator,
      and any `os.PathLike`).
  Returns:
    The `Recipe`.
  Raises:
    ValueError: unknown name (the message lists the shipped ones), a missing file,
      or a file that is not a valid recipe (the message names file and rule).

  Example:
    >>> recipe = load_recipe("int4-g128")
    >>> qparams = jq.quantize_tree(params, recipe.rules)
  """
  if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)):
    path = pathlib.Path(name_or_path)
    if not path.is_file():
      raise ValueError(f"recipe file {str(path)!r} does not exist")
    return parse_recipe(_parse_toml(path.read_text(encoding="utf-8"), str(path)),
                        str(path))
  if not isinstance(name_or_path, str):
    raise TypeError(f"name_or_path must be a str or a path; got "
                    f"{type(name_or_path).__name__}")
  names = list_recipes()
  if name_or_path not in names:
    raise ValueError(f"recipe {name_or_path!r} is not known; known recipes: "
                     f"{', '.join(names)} (or give a path to a .toml file)")
  source = f"{name_or_path} ({CONFIGS_PACKAGE}/{name_or_path}.toml)"
  text = _shipped_files()[name_or_path].read_text(encoding="utf-8")
  return parse_recipe(_parse_toml(text, source), source)
