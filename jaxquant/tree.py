"""Quantization of whole pytrees by rules over key paths, and a report of the result.

Key paths are joined with "/": a Linen variable dict gives ``params/Dense_0/kernel``,
NNX state (``nnx.state(model)``) gives ``Linear_0/kernel`` (the trailing ``.value``
of each `nnx.Variable` is dropped). Rules are regexes matched with `re.fullmatch`;
the first matching rule wins; a rule whose spec is None keeps the leaf in float.
Only floating-point array leaves are quantized; integer arrays, QArrays and
non-array leaves pass through untouched.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.qarray import QArray
from jaxquant.quantize import QuantSpec, dequantize, quantize


@dataclasses.dataclass(frozen=True)
class Rule:
  """Quantize leaves whose "/"-joined path fully matches `pattern` with `spec`.

  Attributes:
    pattern: a regular expression, matched with `re.fullmatch`.
    spec: a `QuantSpec`, a format name, or None to keep matching leaves in float.
  """

  pattern: str
  spec: Optional[Union[QuantSpec, str]]

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regex: {e}") from e
    if isinstance(self.spec, str):
      object.__setattr__(self, "spec", QuantSpec(self.spec))
    if self.spec is not None and not isinstance(self.spec, QuantSpec):
      raise TypeError(f"Rule spec must be a QuantSpec, a format name or None; got "
                      f"{type(self.spec).__name__}")

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None


RulesLike = Union[Rule, Sequence[Union[Rule, tuple]]]


def _as_rules(rules: RulesLike) -> tuple[Rule, ...]:
  if isinstance(rules, Rule):
    return (rules,)
  return tuple(r if isinstance(r, Rule) else Rule(*r) for r in rules)


def _key_name(entry) -> Optional[str]:
  if isinstance(entry, jax.tree_util.DictKey):
    return str(entry.key)
  if isinstance(entry, jax.tree_util.SequenceKey):
    return str(entry.idx)
  if isinstance(entry, jax.tree_util.GetAttrKey):
    return entry.name
  if isinstance(entry, jax.tree_util.FlattenedIndexKey):
    return str(entry.key)
  return str(entry)


def path_to_str(path: Iterable[Any]) -> str:
  """"/"-joined key path; an NNX Variable's trailing ``value`` is dropped."""
  names = [_key_name(entry) for entry in path]
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names = names[:-1]
  return "/".join(names)


def _is_float_array(leaf) -> bool:
  return (isinstance(leaf, (jax.Array, np.ndarray))
          and jnp.issubdtype(leaf.dtype, jnp.floating))


def _is_qarray(leaf) -> bool:
  return isinstance(leaf, QArray)


def spec_for(path: str, rules: RulesLike) -> Optional[QuantSpec]:
  """The spec of the first rule matching `path`, or None."""
  for rule in _as_rules(rules):
    if rule.matches(path):
      return rule.spec
  return None


def quantize_tree(params: Any, rules: RulesLike) -> Any:
  """Quantizes the float leaves of `params` selected by `rules`.

  Args:
    params: any pytree (Linen variables, NNX state, nested dicts/lists).
    rules: a `Rule` or a sequence of Rules (or ``(pattern, spec)`` tuples).
  Returns:
    The same structure with matched float leaves replaced by QArrays.
  Raises:
    ValueError: a rule cannot apply to a leaf; the message names the leaf's path.

  Example:
    >>> rules = [jq.Rule(r".*/kernel", jq.QuantSpec("int8", channel_axes=(-1,))),
    ...          jq.Rule(r".*", None)]
    >>> qparams = jq.quantize_tree(params, rules)
  """

  def quantize_leaf(leaf, spec, name):
    try:
      return quantize(leaf, spec)
    except (ValueError, TypeError) as e:
      raise type(e)(f"cannot quantize {name} (shape {tuple(leaf.shape)}) with "
                    f"format {spec.format.name}: {e}") from e

  return map_by_rules(quantize_leaf, params, rules)


def map_by_rules(fn, params: Any, rules: RulesLike) -> Any:
  """Replaces each float array leaf selected by `rules` with ``fn(leaf, spec, path)``.

  The one walk behind `quantize_tree` and `jaxquant.qat.fake_quant_tree`: the
  first rule whose pattern fully matches the leaf's "/"-joined path gives `spec`;
  leaves with no match, a None spec, a non-float dtype, and QArrays pass through.
  """
  rules = _as_rules(rules)

  def leaf_fn(path, leaf):
    if not _is_float_array(leaf):
      return leaf
    name = path_to_str(path)
    spec = spec_for(name, rules)
    return leaf if spec is None else fn(leaf, spec, name)

  return jax.tree_util.tree_map_with_path(leaf_fn, params, is_leaf=_is_qarray)


def dequantize_tree(qparams: Any, dtype=None) -> Any:
  """Replaces every QArray leaf of `qparams` by its dequantized array."""
  return jax.tree_util.tree_map(
      lambda leaf: dequantize(leaf, dtype) if _is_qarray(leaf) else leaf,
      qparams, is_leaf=_is_qarray)


# ----------------------------------------------------------------------------
# Report.


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """One row of a `TreeReport`; `sqnr_db` is None for leaves kept in float."""

  path: str
  shape: tuple[int, ...]
  format: str
  bytes_before: int
  bytes_after: int
  sqnr_db: Optional[float]

  @property
  def bits_per_weight(self) -> float:
    size = math.prod(self.shape)
    return 8 * self.bytes_after / size if size else 0.0


@dataclasses.dataclass(frozen=True)
class TreeReport:
  """Per-leaf and total sizes and errors of a quantized pytree; `str()` is a table."""

  leaves: tuple[LeafReport, ...]

  @property
  def bytes_before(self) -> int:
    return sum(r.bytes_before for r in self.leaves)

  @property
  def bytes_after(self) -> int:
    return sum(r.bytes_after for r in self.leaves)

  @property
  def compression(self) -> float:
    return self.bytes_before / max(self.bytes_after, 1)

  def __str__(self) -> str:
    header = ("path", "shape", "format", "bits/w", "bytes before", "bytes after",
              "SQNR dB")
    rows = [(r.path, "x".join(map(str, r.shape)) or "scalar", r.format,
             f"{r.bits_per_weight:.2f}", f"{r.bytes_before:,}", f"{r.bytes_after:,}",
             "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f}") for r in self.leaves]
    total_size = sum(math.prod(r.shape) for r in self.leaves)
    rows.append(("total", f"{total_size:,} values", "",
                 f"{8 * self.bytes_after / max(total_size, 1):.2f}",
                 f"{self.bytes_before:,}", f"{self.bytes_after:,}",
                 f"{self.compression:.2f}x smaller"))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    align = ["<", "<", "<", ">", ">", ">", ">"]
    fmt_row = lambda row: "  ".join(f"{c:{a}{w}}" for c, a, w in zip(row, align, widths))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_row(header), rule, *map(fmt_row, rows[:-1]), rule,
                      fmt_row(rows[-1])])


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
  """Signal-to-quantization-noise ratio, 10 log10(sum x^2 / sum (x - x_hat)^2)."""
  reference = np.asarray(reference, np.float64)
  noise = np.sum((reference - np.asarray(approximation, np.float64)) ** 2)
  signal = np.sum(reference**2)
  if noise == 0:
    return math.inf
  return float(10 * np.log10(signal / noise)) if signal > 0 else -math.inf


def _leaf_bytes(leaf) -> int:
  if _is_qarray(leaf):
    return leaf.nbytes
  if hasattr(leaf, "nbytes"):
    return int(leaf.nbytes)
  return 0


def tree_report(params: Any, qparams: Any) -> TreeReport:
  """Per-leaf format, bits per weight (scales included), bytes and SQNR.

  Args:
    params: the float pytree.
    qparams: `quantize_tree(params, ...)`: same structure, some leaves QArrays.
  Returns:
    A `TreeReport`; ``print(report)`` shows it as a table with a total row.
  """
  flat_q, treedef_q = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_qarray)
  flat_p = treedef_q.flatten_up_to(params)
  rows = []
  for (path, q_leaf), p_leaf in zip(flat_q, flat_p):
    if not hasattr(p_leaf, "shape"):
      continue
    shape = tuple(p_leaf.shape)
    if _is_qarray(q_leaf):
      approx = np.asarray(dequantize(q_leaf, jnp.float32))
      error = sqnr_db(np.asarray(p_leaf, np.float32), approx)
      fmt = q_leaf.format.name
    else:
      error, fmt = None, str(jnp.dtype(p_leaf.dtype))
    rows.append(LeafReport(path_to_str(path), shape, fmt, _leaf_bytes(p_leaf),
                           _leaf_bytes(q_leaf), error))
  return TreeReport(tuple(rows))
