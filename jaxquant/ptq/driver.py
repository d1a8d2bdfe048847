"""PTQ over a model's params by rules: each matching kernel goes through an algorithm.

    >>> stats = jq.ptq.capture_linen(model, variables, batches)
    >>> spec = jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 128})
    >>> qvars = jq.ptq.quantize_params(variables, stats, [
    ...     jq.ptq.Rule(r"params/.*/attention/.*/kernel", jq.ptq.GPTQ(spec)),
    ...     jq.ptq.Rule(r"params/.*/kernel", jq.ptq.AWQ(spec)),
    ... ])
    >>> y = model.apply(jq.ptq.dequantize_params(qvars), x)     # evaluate

`quantize_linen_sequential` / `quantize_nnx_sequential` quantize the layers in
the order they run instead, each from statistics of the partly quantized model.

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
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

from flax import nnx
import jax
import jax.numpy as jnp
from tqdm import tqdm

from jaxquant import tree as tree_lib
from jaxquant.ptq.awq import AWQResult
from jaxquant.ptq.awq import awq
from jaxquant.ptq.awq import check_awq_args
from jaxquant.ptq import calibration
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


class _Job(NamedTuple):
  index: int  # of the leaf in the flattened params
  path: str
  algorithm: Algorithm
  layer: Optional[str]  # the layer's stats key; None when stats lack the layer


def _plan(flat, stats: Mapping[str, LayerStats], rules: Sequence[Rule]) -> list[_Job]:
  """The leaves of `flat` that `rules` select, each checked against its statistics."""
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
    key = _layer_key(path, stats)
    if algorithm.needs_stats and key is None:
      known = ", ".join(sorted(stats)[:8]) + (", ..." if len(stats) > 8 else "")
      raise ValueError(f"{path}: {type(algorithm).__name__} needs calibration statistics "
                       f"of layer {path.rpartition('/')[0]!r}, which stats lack "
                       f"(stats has: {known or 'nothing'})")
    shape = tuple(leaf.shape)
    view = jax.ShapeDtypeStruct((shape[0], math.prod(shape[1:])), leaf.dtype)
    try:
      algorithm.check(view, stats[key] if algorithm.needs_stats else None)
      if len(shape) > 2:
        _features_spec(algorithm.spec, shape)
    except ValueError as e:
      raise ValueError(f"cannot quantize {path} (shape {shape}) with "
                       f"{type(algorithm).__name__}: {e}") from e
    jobs.append(_Job(index, path, algorithm, key))
  return jobs


def _stats_for(job: _Job, stats: Mapping[str, LayerStats]) -> Optional[LayerStats]:
  return stats[job.layer] if job.algorithm.needs_stats else None


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
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_quantized)
  jobs = _plan(flat, stats, _as_rules(rules))
  leaves = [leaf for _, leaf in flat]
  for job in tqdm(jobs, desc="quantize", unit="layer", disable=not progress):
    leaves[job.index] = _run(job.algorithm, leaves[job.index], _stats_for(job, stats))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def quantize_sequential(params: Any, capture: Callable[[Any], Mapping[str, LayerStats]],
                        rules, *, progress: bool = True) -> Any:
  """`quantize_params` layer by layer, each on the inputs of the partly quantized model.

  The selected kernels are quantized in the order their layers run (the order of
  ``capture(params)``); before each one that needs statistics, `capture` runs on
  `params` with every kernel quantized so far replaced by its dequantized value,
  so a layer corrects the error of the layers before it, as GPTQ's reference
  implementation does. That costs one capture per such layer, except that layers
  reading the same input (equal statistics, e.g. query, key and value) share one;
  layers that `capture` does not see come last.

  Args:
    params: float params that `capture` runs the model with.
    capture: ``capture(params) -> {layer path: LayerStats}`` over the calibration
      batches (`quantize_linen_sequential` and `quantize_nnx_sequential` build it).
    rules: as for `quantize_params`.
    progress: show a tqdm progress bar over the layers.
  Returns:
    `params` with the selected kernels quantized, as `quantize_params` returns them.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_quantized)
  stats = capture(params)
  order = {layer: position for position, layer in enumerate(stats)}
  jobs = sorted(_plan(flat, stats, _as_rules(rules)),
                key=lambda job: order.get(job.layer, len(order)))
  quantized = [leaf for _, leaf in flat]
  current = list(quantized)
  changed = []  # layers quantized since `stats` were captured
  for job in tqdm(jobs, desc="quantize (sequential)", unit="layer", disable=not progress):
    if job.algorithm.needs_stats and changed and not _shares_input(job, changed, stats):
      stats = capture(jax.tree_util.tree_unflatten(treedef, current))
      changed = []
    leaf = current[job.index]
    quantized[job.index] = _run(job.algorithm, leaf, _stats_for(job, stats))
    current[job.index] = dequantize_params(quantized[job.index], leaf.dtype)
    changed.append(job.layer)
  return jax.tree_util.tree_unflatten(treedef, quantized)


def _shares_input(job: _Job, changed: list, stats: Mapping[str, LayerStats]) -> bool:
  """Whether `job`'s layer read the same input as every layer quantized since `stats`.

  Layers fed one tensor (attention's query, key and value) have equal statistics;
  quantizing one of them cannot change the others' input, so they all take the
  statistics of one capture.
  """
  mine = stats.get(job.layer)
  return mine is not None and all(
      layer in stats and all(bool(jnp.array_equal(a, b)) for a, b in zip(stats[layer], mine))
      for layer in changed)


def quantize_linen_sequential(module, variables: Any, batches: Iterable[Any], rules, *,
                              method=None, progress: bool = True, **kwargs) -> Any:
  """`quantize_sequential` of a Linen model's `variables` over calibration `batches`.

  The capture (as `capture_linen`, every Dense layer) compiles once and reruns
  with each partly quantized set of variables. `method` and `kwargs` are those
  of ``module.apply``. Returns `variables` with the selected kernels quantized.

  Example:
    >>> spec = jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 128})
    >>> qvars = jq.ptq.quantize_linen_sequential(model, variables, batches,
    ...     [jq.ptq.Rule(r"params/.*/kernel", jq.ptq.GPTQ(spec))])
  """
  batches = list(batches)
  capture = calibration.Capture(calibration.linen_step(module, method, ".*", kwargs))
  return quantize_sequential(variables, lambda v: capture(v, batches=batches), rules,
                             progress=progress)


def quantize_nnx_sequential(model, batches: Iterable[Any], rules, *,
                            forward: Optional[Callable] = None, progress: bool = True
                            ) -> Any:
  """`quantize_sequential` of an NNX model over calibration `batches`.

  The capture (as `capture_nnx`, every nnx.Linear) compiles once; the model is
  not modified. Returns ``nnx.state(model, nnx.Param)`` with the selected
  kernels quantized (as `quantize_params` on that state).
  """
  batches = list(batches)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  capture = calibration.Capture(calibration.nnx_step(graphdef, ".*", forward))
  return quantize_sequential(params, lambda p: capture(p, rest, batches=batches), rules,
                             progress=progress)


def dequantize_params(params: Any, dtype=None) -> Any:
  """Replaces every QArray and `AWQResult` leaf by the float kernel it stands for."""

  def dequantize_leaf(leaf):
    if isinstance(leaf, AWQResult):
      return leaf.dequantize(dtype)
    return dequantize(leaf, dtype) if isinstance(leaf, QArray) else leaf

  return jax.tree_util.tree_map(dequantize_leaf, params, is_leaf=_is_quantized)
