"""PTQ over a model's params by rules: each matching kernel goes through an algorithm.

    >>> stats = jq.ptq.capture_linen(model, variables, batches)
    >>> spec = jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 128})
    >>> qvars = jq.ptq.quantize_params(variables, stats, [
    ...     jq.ptq.Rule(r"params/.*/attention/.*/kernel", jq.ptq.GPTQ(spec)),
    ...     jq.ptq.Rule(r"params/.*/kernel", jq.ptq.AWQ(spec)),
    ... ])
    >>> y = model.apply(jq.ptq.dequantize_params(qvars), x)     # evaluate

Kernels replaced by QArrays (RTN, GPTQ) run as they are through
`jaxquant.linen.apply` / `jaxquant.nnx.quantize_model`; AWQ's explicit-scale
`AWQResult` leaves need either `dequantize_params` (evaluation) or their scales
folded into the previous op (`fold_scales_into_layernorm` /
`fold_scales_into_linear`, then use ``result.qweight`` as the kernel).

Paths. Rules match the "/"-joined path of each leaf (``params/Dense_0/kernel``
for Linen variables, ``layers/0/kernel`` for ``nnx.state(model, nnx.Param)``).
A kernel's statistics are those of its parent layer path, the key
`capture_linen` / `capture_nnx` use (``Dense_0``, ``layers/0``; a leading
``params/`` is dropped). Kernels ``[in, *features]`` (DenseGeneral) are
quantized as ``[in, prod(features)]`` and reshaped back.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

import jax
from tqdm import tqdm

from jaxquant import tree as tree_lib
from jaxquant.ptq.awq import AWQResult
from jaxquant.ptq.awq import awq
from jaxquant.ptq.awq import check_awq_args
from jaxquant.ptq.calibration import LayerStats
from jaxquant.ptq.gptq import as_spec
from jaxquant.ptq.gptq import check_gptq_args
from jaxquant.ptq.gptq import check_kernel
from jaxquant.ptq.gptq import gptq
from jaxquant.ptq.gptq import rtn
from jaxquant.qarray import QArray
from jaxquant.quantize import QuantSpec
from jaxquant.quantize import dequantize


@dataclasses.dataclass(frozen=True)
class RTN:
  """Round-to-nearest with `spec` (needs no statistics)."""

  spec: Union[QuantSpec, str]
  needs_stats = False

  def __post_init__(self):
    object.__setattr__(self, "spec", as_spec(self.spec))

  def check(self, w, stats: Optional[LayerStats]) -> None:
    """Raises for a kernel (array or ShapeDtypeStruct) this cannot quantize."""
    del stats
    check_kernel(w)
    self.spec.resolve(tuple(w.shape))

  def __call__(self, w: jax.Array, stats: Optional[LayerStats]) -> QArray:
    del stats
    return rtn(w, self.spec)


@dataclasses.dataclass(frozen=True)
class GPTQ:
  """`gptq` with these settings, from the layer's ``xtx``."""

  spec: Union[QuantSpec, str]
  block_size: int = 128
  damp: float = 0.01
  act_order: bool = True
  static_groups: bool = True
  needs_stats = True

  def __post_init__(self):
    object.__setattr__(self, "spec", as_spec(self.spec))

  def check(self, w, stats: LayerStats) -> None:
    """Raises for a kernel (array or ShapeDtypeStruct) this cannot quantize."""
    check_gptq_args(w, stats.xtx, self.spec, block_size=self.block_size, damp=self.damp,
                    act_order=self.act_order, static_groups=self.static_groups)

  def __call__(self, w: jax.Array, stats: LayerStats) -> QArray:
    return gptq(w, stats.xtx, self.spec, block_size=self.block_size, damp=self.damp,
                act_order=self.act_order, static_groups=self.static_groups)


@dataclasses.dataclass(frozen=True)
class AWQ:
  """`awq` with these settings; the kernel becomes an explicit-scale `AWQResult`."""

  spec: Union[QuantSpec, str]
  grid: int = 20
  duo_scaling: bool = False
  needs_stats = True

  def __post_init__(self):
    object.__setattr__(self, "spec", as_spec(self.spec))

  def check(self, w, stats: LayerStats) -> None:
    """Raises for a kernel (array or ShapeDtypeStruct) this cannot quantize."""
    check_awq_args(w, stats, self.spec, grid=self.grid)

  def __call__(self, w: jax.Array, stats: LayerStats) -> AWQResult:
    return awq(w, stats, self.spec, grid=self.grid, duo_scaling=self.duo_scaling)


Algorithm = Union[RTN, GPTQ, AWQ]
_ALGORITHMS = (RTN, GPTQ, AWQ)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Leaves whose "/"-joined path fully matches `pattern` go through `algorithm`.

  Attributes:
    pattern: a regular expression, matched with `re.fullmatch`.
    algorithm: `RTN`, `GPTQ` or `AWQ`, or None to keep matching leaves float.
  """

  pattern: str
  algorithm: Optional[Algorithm]

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regex: {e}") from e
    if self.algorithm is not None and not isinstance(self.algorithm, _ALGORITHMS):
      raise TypeError(f"Rule algorithm must be jq.ptq.RTN, GPTQ, AWQ or None; got "
                      f"{type(self.algorithm).__name__}")


def _as_rules(rules) -> tuple[Rule, ...]:
  """ptq Rules from Rules, ``(pattern, algorithm)`` pairs and `jq.Rule` (spec: RTN)."""
  if isinstance(rules, (Rule, tree_lib.Rule)):
    rules = [rules]
  result = []
  for rule in rules:
    if isinstance(rule, tree_lib.Rule):
      rule = Rule(rule.pattern, None if rule.spec is None else RTN(rule.spec))
    elif not isinstance(rule, Rule):
      rule = Rule(*rule)
    result.append(rule)
  return tuple(result)


def _algorithm_for(path: str, rules: Sequence[Rule]) -> Optional[Algorithm]:
  for rule in rules:
    if re.fullmatch(rule.pattern, path):
      return rule.algorithm
  return None


def _layer_key(path: str, stats: Mapping[str, LayerStats]) -> Optional[str]:
  parent = path.rpartition("/")[0]
  candidates = [parent]
  if parent.startswith("params/"):
    candidates.append(parent[len("params/"):])
  return next((key for key in candidates if key in stats), None)


def _features_spec(spec: QuantSpec, shape: tuple[int, ...]) -> QuantSpec:
  """The spec of a [in, out] result reshaped to the kernel's [in, *features]."""
  channel, blocks = spec.resolve((shape[0], math.prod(shape[1:])))
  if 1 in blocks:
    raise ValueError(f"block_sizes={spec.block_size_dict} blocks the output axis, which "
                     f"cannot be reshaped into the kernel's features {shape[1:]}")
  features = tuple(range(1, len(shape))) if 1 in channel else ()
  return spec.replace(channel_axes=((0,) if 0 in channel else ()) + features,
                      block_sizes={0: blocks[0]} if 0 in blocks else {})


def _reshape(q: QArray, shape: tuple[int, ...], spec: QuantSpec) -> QArray:
  scale_shape = spec.scale_shape(shape)
  reshape = lambda a: None if a is None else a.reshape(scale_shape)
  return QArray(codes=q.codes.reshape(shape), scale=reshape(q.scale),
                zero_point=reshape(q.zero_point), tensor_scale=q.tensor_scale, spec=spec,
                dtype=q.dtype)


def _run(algorithm: Algorithm, leaf, stats: Optional[LayerStats]):
  shape = tuple(leaf.shape)
  if len(shape) == 2:
    return algorithm(leaf, stats)
  spec = _features_spec(algorithm.spec, shape)
  result = algorithm(leaf.reshape(shape[0], -1), stats)
  if isinstance(result, AWQResult):
    return AWQResult(result.scales, _reshape(result.qweight, shape, spec))
  return _reshape(result, shape, spec)


def _is_quantized(leaf) -> bool:
  return isinstance(leaf, (QArray, AWQResult))


def quantize_params(params: Any, stats: Mapping[str, LayerStats], rules, *,
                    progress: bool = True) -> Any:
  """Quantizes the kernels of `params` selected by `rules` with their algorithms.

  Args:
    params: Linen variables (or their ``params``), NNX state, or any pytree.
    stats: ``{layer path: LayerStats}`` from `capture_linen` / `capture_nnx`;
      only layers whose algorithm needs statistics must be present.
    rules: a `Rule`, or a sequence of Rules, ``(pattern, algorithm)`` pairs or
      `jq.Rule`s (whose spec means `RTN`); the first match wins, None keeps
      the leaf float.
    progress: show a tqdm progress bar over the layers.
  Returns:
    `params` with each selected kernel replaced by a QArray (RTN, GPTQ) or an
    `AWQResult` (AWQ); everything else unchanged.
  Raises:
    ValueError: a selected leaf that is not a float kernel ``[in, ...]``, a
      layer without statistics for an algorithm that needs them, statistics of
      the wrong size, or a spec that does not fit the kernel. All selected
      leaves are checked before any is quantized.
  """
  rules = _as_rules(rules)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_quantized)
  jobs = []
  for index, (key_path, leaf) in enumerate(flat):
    if not tree_lib._is_float_array(leaf):  # pylint: disable=protected-access
      continue
    path = tree_lib.path_to_str(key_path)
    algorithm = _algorithm_for(path, rules)
    if algorithm is None:
      continue
    if leaf.ndim < 2:
      raise ValueError(f"{path} has shape {tuple(leaf.shape)}; PTQ algorithms quantize "
                       "kernels [in, ...]: restrict the rule's pattern to kernels")
    layer_stats = None
    if algorithm.needs_stats:
      key = _layer_key(path, stats)
      if key is None:
        known = ", ".join(sorted(stats)[:8]) + (", ..." if len(stats) > 8 else "")
        raise ValueError(f"{path}: {type(algorithm).__name__} needs calibration statistics "
                         f"of layer {path.rpartition('/')[0]!r}, which stats lack "
                         f"(stats has: {known or 'nothing'})")
      layer_stats = stats[key]
    shape = tuple(leaf.shape)
    view = jax.ShapeDtypeStruct((shape[0], math.prod(shape[1:])), leaf.dtype)
    try:
      algorithm.check(view, layer_stats)
      if len(shape) > 2:
        _features_spec(algorithm.spec, shape)
    except ValueError as e:
      raise ValueError(f"cannot quantize {path} (shape {shape}) with "
                       f"{type(algorithm).__name__}: {e}") from e
    jobs.append((index, algorithm, layer_stats))
  leaves = [leaf for _, leaf in flat]
  for index, algorithm, layer_stats in tqdm(jobs, desc="quantize", unit="layer",
                                            disable=not progress):
    leaves[index] = _run(algorithm, leaves[index], layer_stats)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def dequantize_params(params: Any, dtype=None) -> Any:
  """Replaces every QArray and `AWQResult` leaf by the float kernel it stands for."""

  def dequantize_leaf(leaf):
    if isinstance(leaf, AWQResult):
      return leaf.dequantize(dtype)
    return dequantize(leaf, dtype) if isinstance(leaf, QArray) else leaf

  return jax.tree_util.tree_map(dequantize_leaf, params, is_leaf=_is_quantized)
