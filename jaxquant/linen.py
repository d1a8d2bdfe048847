"""Run an unmodified Flax Linen model with quantized weights and activations.

A user's model (their own code or a library's) runs quantized without edits:
its `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum` and `nn.Conv` layers (and
subclasses that keep their ``__call__``) take `QArray` params and route their
matmuls through a quantized contraction.

    >>> qvars = jq.quantize_tree(variables, [
    ...     jq.Rule(r"params/.*/kernel", jq.QuantSpec("int8", channel_axes=(-1,)))])
    >>> y = jq.linen.apply(model, qvars, x,
    ...                    activation_rules=[(r".*", jq.linen.ActivationQuant("int8"))])

Mechanism. `flax.linen.intercept_methods` (Flax's own, documented interception
of module methods) wraps every method call while `intercept` / `apply` is
active. For a supported layer whose kernel is a QArray, or whose module path
matches an activation rule, the interceptor computes the layer's output itself
from the layer's attributes (axes, bias, padding, strides, dilation, feature
groups, einsum equation, dtype promotion): the layer's own ``__call__`` cannot
run, as its `promote_dtype` turns the kernel into an array and fails on a
QArray. Every other call passes through untouched. Nothing in `jax.lax` is
patched. A QArray among the params of a layer type that cannot run quantized
raises a `TypeError` naming the variable.

Contractions go through `jaxquant.matmul` (`quantized_dot_general`,
`quantized_einsum`, `quantized_conv`): int8 x int8 -> int32 when both operands'
scales factor out of the contraction, dequantize-then-contract otherwise.

Rules and paths. Weight rules are the `quantize_tree` rules over variable paths
(``params/Dense_0/kernel``); activation rules are ``(pattern, value)`` pairs or
`jq.Rule`s matched with `re.fullmatch` against the module path
(``Dense_0``, ``Block_0/Dense_1``), first match wins. A value is an
`ActivationQuant`, a `QuantSpec` (dynamic, its axes as given), a format name
(dynamic per tensor), or None (float input).

Activations are quantized as they enter the layer, in their own dtype, before
the layer's dtype promotion: per token (one scale per index of every axis the
layer does not contract), per tensor, or statically from calibrated ranges.
Static ranges live in the ``quant_stats`` collection (``input_amax``:
float32[], ``input_count``: int32[] per layer), filled by `calibrate`, which runs
the model with float activations and `Observer` updates.

This module also holds the framework-independent layer math used by
`jaxquant.nnx` (the "layer math" section).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import flax.linen as nn
from flax.linen import linear as linen_linear
import jax
import jax.numpy as jnp

from jaxquant import formats as formats_lib
from jaxquant import tree as tree_lib
from jaxquant.matmul import (as_float as _as_float, explicit_einsum, quantized_conv,
                             quantized_dot_general, quantized_einsum)
from jaxquant.qarray import QArray
from jaxquant.quantize import QuantSpec, quantize

STATS_COLLECTION = "quant_stats"
_GRANULARITIES = ("per_token", "per_tensor", "static", "spec")
_AVERAGES = ("ema", "max", "mean")


# ----------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class Observer:
  """How `calibrate` turns a layer's inputs, batch by batch, into one static range.

  Attributes:
    statistic: per batch, ``"absmax"`` (largest |x|) or ``"percentile:P"`` (the
      P-th percentile of |x|, 0 < P <= 100).
    average: across batches, ``"ema"`` (exponential moving average with
      `decay`), ``"max"`` (running max) or ``"mean"`` (running mean). The first
      batch sets the range.
    decay: EMA decay in [0, 1).
  """

  statistic: str = "absmax"
  average: str = "ema"
  decay: float = 0.9

  def __post_init__(self):
    _percentile(self.statistic)  # validates
    if self.average not in _AVERAGES:
      raise ValueError(f"Observer average={self.average!r}; expected one of {_AVERAGES}")
    if not 0.0 <= self.decay < 1.0:
      raise ValueError(f"Observer decay={self.decay} must be in [0, 1)")


def _percentile(statistic: str) -> Optional[float]:
  """'absmax' -> None; 'percentile:P' -> P."""
  if statistic == "absmax":
    return None
  method, _, arg = statistic.partition(":")
  try:
    value = float(arg)
  except ValueError:
    value = -1.0
  if method == "percentile" and 0 < value <= 100:
    return value
  raise ValueError(f"Observer statistic={statistic!r}; expected 'absmax' or "
                   "'percentile:P' with 0 < P <= 100")


@dataclasses.dataclass(frozen=True)
class ActivationQuant:
  """How a layer's input is quantized. Frozen and hashable (static under jit).

  Attributes:
    format: a format name or `Format`; symmetric integer formats of <= 8 bits
      (with int8 weights) take the integer matmul, others are fake-quantized.
    granularity: ``"per_token"`` (dynamic, one scale per index of every axis
      the layer does not contract: all but the last for Dense),
      ``"per_tensor"`` (dynamic, one scale), ``"static"`` (one scale from the
      range `calibrate` stored), or ``"spec"`` (dynamic, `spec` as given).
    calibration: dynamic scales: ``"absmax"`` or ``"percentile:P"`` per group.
    observer: static scales: how `calibrate` collects the range.
    spec: the `QuantSpec` for ``granularity="spec"``.
  """

  format: Union[str, formats_lib.Format] = "int8"
  granularity: str = "per_token"
  calibration: str = "absmax"
  observer: Observer = Observer()
  spec: Optional[QuantSpec] = None

  def __post_init__(self):
    if self.granularity not in _GRANULARITIES:
      raise ValueError(f"ActivationQuant granularity={self.granularity!r}; expected "
                       f"one of {_GRANULARITIES}")
    if self.granularity == "spec":
      if not isinstance(self.spec, QuantSpec):
        raise TypeError("ActivationQuant(granularity='spec') needs spec=QuantSpec(...)")
      object.__setattr__(self, "format", self.spec.format)
      return
    fmt = formats_lib.get_format(self.format)
    object.__setattr__(self, "format", fmt)
    QuantSpec(fmt, calibration=self.calibration)  # validates calibration
    if self.granularity == "static" and fmt.kind not in ("int", "float"):
      raise ValueError(f"static activation ranges need an int or float format; "
                       f"{fmt.name!r} is a {fmt.kind} format")

  @property
  def is_static(self) -> bool:
    return self.granularity == "static"

  def dynamic_spec(self, ndim: int, contract_axes: Sequence[int]) -> QuantSpec:
    """The `QuantSpec` of a dynamic granularity for an input of rank `ndim`."""
    if self.granularity == "spec":
      return self.spec
    channel = ()
    if self.granularity == "per_token":
      contract = {a % ndim for a in contract_axes}
      channel = tuple(a for a in range(ndim) if a not in contract)
    return QuantSpec(self.format, channel_axes=channel, calibration=self.calibration)


ActivationValue = Union[ActivationQuant, QuantSpec, str, None]
ActivationRules = Sequence[Union[tree_lib.Rule, tuple[str, ActivationValue]]]


def _as_activation(value: ActivationValue) -> Optional[ActivationQuant]:
  if value is None or isinstance(value, ActivationQuant):
    return value
  if isinstance(value, (str, formats_lib.Format)):
    value = QuantSpec(value)
  if isinstance(value, QuantSpec):
    return ActivationQuant(granularity="spec", spec=value)
  raise TypeError(f"an activation rule value must be an ActivationQuant, a QuantSpec, "
                  f"a format name or None; got {type(value).__name__}")


def as_activation_rules(rules: Optional[ActivationRules]
                        ) -> tuple[tuple[str, Optional[ActivationQuant]], ...]:
  """Normalizes activation rules to ``((pattern, ActivationQuant | None), ...)``."""
  if rules is None:
    return ()
  if isinstance(rules, tree_lib.Rule) or (
      isinstance(rules, tuple) and len(rules) == 2 and isinstance(rules[0], str)):
    rules = [rules]
  result = []
  for rule in rules:
    pattern, value = (rule.pattern, rule.spec) if isinstance(rule, tree_lib.Rule) else rule
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"activation rule pattern {pattern!r} is not a valid regex: {e}") from e
    result.append((pattern, _as_activation(value)))
  return tuple(result)


def activation_for(path: str, rules) -> Optional[ActivationQuant]:
  """The `ActivationQuant` of the first rule whose pattern fully matches `path`."""
  for pattern, act in rules:
    if re.fullmatch(pattern, path):
      return act
  return None


# ----------------------------------------------------------------------------
# Activation quantization and observers (pure functions).


def quantize_static(x: jax.Array, fmt: formats_lib.Format, amax: jax.Array) -> QArray:
  """Quantizes `x` per tensor with the fixed range `amax` (values beyond saturate).

  Args:
    x: float[*shape].
    fmt: a symmetric int or float format.
    amax: float32[], the calibrated absolute range; 0 gives all-zero codes.
  Returns:
    QArray with codes[*shape] and float32 scale[1, ..., 1] = amax / fmt.max.
  """
  scale = jnp.reshape(amax.astype(jnp.float32) / fmt.max, (1,) * x.ndim)
  safe = jnp.where(scale > 0, scale, 1.0)
  codes = formats_lib.encode(fmt, x.astype(jnp.float32) / safe)
  return QArray(codes=codes, scale=scale, spec=QuantSpec(fmt), dtype=x.dtype)


def batch_statistic(x: jax.Array, observer: Observer) -> jax.Array:
  """float32[]: the observer's statistic of |x| for one batch."""
  magnitude = jnp.abs(x.astype(jnp.float32))
  percent = _percentile(observer.statistic)
  if percent is None:
    return jnp.max(magnitude)
  return jnp.percentile(jnp.ravel(magnitude), percent)


def observe(amax: jax.Array, count: jax.Array, x: jax.Array, observer: Observer
            ) -> tuple[jax.Array, jax.Array]:
  """One observer update: (float32[] range, int32[] batches seen) after batch `x`."""
  stat = batch_statistic(x, observer)
  if observer.average == "ema":
    merged = observer.decay * amax + (1.0 - observer.decay) * stat
  elif observer.average == "max":
    merged = jnp.maximum(amax, stat)
  else:
    seen = count.astype(jnp.float32)
    merged = (amax * seen + stat) / (seen + 1.0)
  return jnp.where(count > 0, merged, stat), count + 1


def quantize_input(x: jax.Array, act: Optional[ActivationQuant],
                   contract_axes: Sequence[int], amax: Optional[jax.Array] = None):
  """`x` as the layer sees it: unchanged (act None) or a QArray.

  Args:
    x: float[*shape], the layer's input.
    act: the layer's `ActivationQuant`, or None.
    contract_axes: axes of `x` the layer contracts (per-token scales exclude them).
    amax: float32[] calibrated range, needed for static granularity.
  """
  if act is None:
    return x
  if act.is_static:
    return quantize_static(x, act.format, amax)
  return quantize(jax.lax.stop_gradient(x), act.dynamic_spec(x.ndim, contract_axes))


# ----------------------------------------------------------------------------
# Layer math, shared with jaxquant.nnx: each reproduces a Flax layer's forward
# pass from its attributes, with `quantize_fn(x, contract_axes)` on the input.


def _struct(a):
  return None if a is None else jax.ShapeDtypeStruct(tuple(a.shape), a.dtype)


def promoted_dtypes(promote: Callable, x, kernel, bias) -> tuple[Any, Any, Any]:
  """Dtypes the layer's `promote(x, kernel, bias)` gives, computed abstractly.

  A QArray stands in as an array of its shape and original dtype.
  """
  out = jax.eval_shape(promote, _struct(x), _struct(kernel), _struct(bias))
  return tuple(None if o is None else o.dtype for o in out)


def _normalize_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
  return tuple(a % ndim for a in axes)


def _operands(x, kernel, x_dtype, k_dtype, quantize_fn, contract_axes):
  """(lhs, rhs): the quantized input or x cast to x_dtype; the QArray or cast kernel."""
  lhs = quantize_fn(x, contract_axes)
  lhs = lhs if isinstance(lhs, QArray) else lhs.astype(x_dtype)
  return lhs, (kernel if isinstance(kernel, QArray) else kernel.astype(k_dtype))


def linear_general(x, kernel, bias, *, axis: Sequence[int], batch_dims: Sequence[int],
                   promote: Callable, quantize_fn: Callable, precision=None,
                   preferred_element_type=None, out_sharding=None) -> jax.Array:
  """Dense / DenseGeneral / Linear / LinearGeneral forward pass.

  Args:
    x: float[*in_shape].
    kernel: [*batch, *contracted, *features], array or QArray.
    bias: [*batch, *features] array or QArray, or None.
    axis: input axes contracted with the kernel's leading non-batch axes.
    batch_dims: input axes shared with the kernel's leading axes.
    promote: ``(x, kernel, bias) -> (x, kernel, bias)``, the layer's dtype promotion.
    quantize_fn: ``(x, contract_axes) -> x or QArray``.
  Returns:
    [*batch, *other input axes, *features] in the promoted dtype.
  """
  ndim = x.ndim
  axis, batch_dims = _normalize_axes(axis, ndim), _normalize_axes(batch_dims, ndim)
  n_batch, n_axis = len(batch_dims), len(axis)
  features = tuple(kernel.shape[n_batch + n_axis:])
  x_dtype, k_dtype, b_dtype = promoted_dtypes(promote, x, kernel, bias)
  lhs, rhs = _operands(x, kernel, x_dtype, k_dtype, quantize_fn, axis)
  dn = ((axis, tuple(range(n_batch, n_batch + n_axis))), (batch_dims, tuple(range(n_batch))))
  y = quantized_dot_general(lhs, rhs, dn, dtype=x_dtype, precision=precision,
                            preferred_element_type=preferred_element_type,
                            out_sharding=out_sharding)
  if bias is not None:
    expanded = tuple(x.shape[a] if a in batch_dims else 1
                     for a in range(ndim) if a not in axis)
    y = y + jnp.reshape(_as_float(bias, b_dtype), expanded + features)
  return y


def einsum(x, kernel, bias, *, equation: str, promote: Callable, quantize_fn: Callable,
           precision=None, preferred_element_type=None, out_sharding=None) -> jax.Array:
  """Einsum layer forward pass: ``einsum(equation, x, kernel) + bias``.

  The bias covers the output axes that come from the kernel; x's axes whose
  labels are not in the output are the contracted ones.
  """
  lhs_letters, rhs_letters, out_letters = explicit_einsum(equation, x.shape, kernel.shape)
  x_dtype, k_dtype, b_dtype = promoted_dtypes(promote, x, kernel, bias)
  contract_axes = tuple(i for i, c in enumerate(lhs_letters) if c not in out_letters)
  lhs, rhs = _operands(x, kernel, x_dtype, k_dtype, quantize_fn, contract_axes)
  y = quantized_einsum(equation, lhs, rhs, dtype=x_dtype, precision=precision,
                       preferred_element_type=preferred_element_type,
                       out_sharding=out_sharding)
  if bias is not None:
    sizes = dict(zip(rhs_letters, kernel.shape))
    shape = [sizes[c] if c in rhs_letters else 1 for c in out_letters]
    y = y + jnp.reshape(_as_float(bias, b_dtype), shape)
  return y


def _per_axis(value, rank: int) -> tuple[int, ...]:
  if value is None:
    value = 1
  return (value,) * rank if isinstance(value, int) else tuple(value)


def conv(x, kernel, bias, *, kernel_size: Sequence[int], strides, padding, input_dilation,
         kernel_dilation, feature_group_count: int, mask, promote: Callable,
         quantize_fn: Callable, precision=None, preferred_element_type=None,
         out_sharding=None) -> jax.Array:
  """Conv forward pass, channels last, as `flax.linen.Conv` / `flax.nnx.Conv` compute it.

  Args:
    x: float[*batch, *spatial, in_features]; any number of batch axes (0 adds one).
    kernel: [*kernel_size, in_features // feature_group_count, out_features].
    bias: [out_features] or None.
    padding: 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL' (1-D), an int or
      per-axis pairs.
    mask: kernel-shaped multiplier or None.
  Returns:
    float[*batch, *out_spatial, out_features].
  """
  rank = len(kernel_size)
  n_batch = x.ndim - (rank + 1)
  batch_shape = x.shape[:n_batch]
  if n_batch != 1:
    x = jnp.reshape(x, (-1,) + x.shape[n_batch:])
  strides = _per_axis(strides, rank)
  input_dilation = _per_axis(input_dilation, rank)
  kernel_dilation = _per_axis(kernel_dilation, rank)
  padding = linen_linear.canonicalize_padding(padding, rank)
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    padding = "VALID"
  elif padding == "CAUSAL":
    if rank != 1:
      raise ValueError("padding='CAUSAL' is only implemented for 1-D convolutions")
    x = jnp.pad(x, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
    padding = "VALID"
  dimension_numbers = linen_linear._conv_dimension_numbers(x.shape)  # pylint: disable=protected-access
  x_dtype, k_dtype, b_dtype = promoted_dtypes(promote, x, kernel, bias)
  if mask is not None:
    kernel = _as_float(kernel, kernel.dtype) * mask
  lhs, rhs = _operands(x, kernel, x_dtype, k_dtype, quantize_fn, (x.ndim - 1,))
  y = quantized_conv(lhs, rhs, strides, padding, dimension_numbers=dimension_numbers,
                     dtype=x_dtype, lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
                     feature_group_count=feature_group_count, precision=precision,
                     preferred_element_type=preferred_element_type,
                     out_sharding=out_sharding)
  if bias is not None:
    b = _as_float(bias, b_dtype)
    y = y + jnp.reshape(b, (1,) * (y.ndim - b.ndim) + b.shape)
  if n_batch != 1:
    y = jnp.reshape(y, batch_shape + y.shape[1:])
  return y


# ----------------------------------------------------------------------------
# Linen interception.

SUPPORTED_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)


def _runs_quantized(module: nn.Module) -> bool:
  """A supported layer type (or a subclass that keeps its ``__call__``)."""
  for base in SUPPORTED_TYPES:
    if isinstance(module, base):
      return type(module).__call__ is base.__call__
  return False


def _unbox(value):
  return nn.meta.unbox(value) if isinstance(value, nn.meta.AxisMetadata) else value


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def _check_no_qarrays(module: nn.Module) -> None:
  """Raises for a layer that cannot run quantized but holds QArray params."""
  params = module.variables.get("params", {})
  for name, value in params.items():
    if isinstance(_unbox(value), QArray):
      path = "/".join(["params", *map(str, module.path), name])
      raise TypeError(
          f"{path} is a QArray, but {type(module).__name__} layers cannot run "
          "quantized: jaxquant.linen runs Dense, DenseGeneral, Einsum and Conv (and "
          "subclasses that keep their __call__). Keep it float with a weight rule "
          f"such as jq.Rule({path!r}, None).")


def _linen_promote(module):
  return lambda x, k, b: module.promote_dtype(x, k, b, dtype=module.dtype)


def _check_no_custom_op(module: nn.Module) -> None:
  for attr in ("dot_general", "dot_general_cls", "conv_general_dilated",
               "conv_general_dilated_cls"):
    if getattr(module, attr, None) is not None:
      raise ValueError(f"{_path(module)} ({type(module).__name__}) sets {attr}=...; "
                       "jaxquant replaces the layer's contraction and cannot combine "
                       "it with a custom one")


def _layer_output(module: nn.Module, args, kwargs, quantize_fn) -> jax.Array:
  """The output of a supported Linen layer, computed from its variables."""
  _check_no_custom_op(module)
  bound = dict(zip(("inputs", "einsum_str"), args), **kwargs)
  x = jnp.asarray(bound["inputs"])
  kernel = _unbox(module.get_variable("params", "kernel"))
  bias = _unbox(module.get_variable("params", "bias"))
  common = dict(promote=_linen_promote(module), quantize_fn=quantize_fn,
                precision=module.precision)
  if isinstance(module, nn.Dense):
    return linear_general(x, kernel, bias, axis=(-1,), batch_dims=(), **common)
  if isinstance(module, nn.DenseGeneral):
    as_tuple = lambda v: tuple(v) if isinstance(v, Iterable) else (v,)
    return linear_general(x, kernel, bias, axis=as_tuple(module.axis),
                          batch_dims=as_tuple(module.batch_dims), **common)
  if isinstance(module, nn.Einsum):
    equation = nn.merge_param("einsum_str", module.einsum_str, bound.get("einsum_str"))
    return einsum(x, kernel, bias, equation=equation,
                  preferred_element_type=module.preferred_element_type, **common)
  kernel_size = ((module.kernel_size,) if isinstance(module.kernel_size, int)
                 else tuple(module.kernel_size))
  return conv(x, kernel, bias, kernel_size=kernel_size, strides=module.strides,
              padding=module.padding, input_dilation=module.input_dilation,
              kernel_dilation=module.kernel_dilation,
              feature_group_count=module.feature_group_count, mask=module.mask, **common)


def _static_range(module: nn.Module, x, act: ActivationQuant, calibrating: bool):
  """The layer's calibrated range; while calibrating, updates it from `x` first."""
  if calibrating:
    amax = module.variable(STATS_COLLECTION, "input_amax", jnp.zeros, (), jnp.float32)
    count = module.variable(STATS_COLLECTION, "input_count", jnp.zeros, (), jnp.int32)
    amax.value, count.value = observe(amax.value, count.value, x, act.observer)
    return amax.value
  if not module.has_variable(STATS_COLLECTION, "input_amax"):
    raise ValueError(
        f"{_path(module)} has static activation quantization but no calibrated range "
        f"in variables[{STATS_COLLECTION!r}]; run jq.linen.calibrate(...) first and "
        "pass the variables it returns")
  return module.get_variable(STATS_COLLECTION, "input_amax")


@dataclasses.dataclass(frozen=True)
class _Interceptor:
  """The `intercept_methods` callback; frozen config, no state."""

  activation_rules: tuple

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if module.scope is None or context.method_name == "setup":
      return next_fun(*args, **kwargs)
    if not _runs_quantized(module):
      _check_no_qarrays(module)
      return next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not module.has_variable("params", "kernel"):
      return next_fun(*args, **kwargs)  # e.g. during init: the layer creates its params
    act = activation_for(_path(module), self.activation_rules)
    kernel = _unbox(module.get_variable("params", "kernel"))
    if act is None and not isinstance(kernel, QArray):
      return next_fun(*args, **kwargs)
    amax = None
    if act is not None and act.is_static:
      calibrating = module.is_mutable_collection(STATS_COLLECTION)
      inputs = args[0] if args else kwargs["inputs"]
      amax = _static_range(module, jnp.asarray(inputs), act, calibrating)
      if calibrating:
        act = None  # calibration runs with float activations
    quantize_fn = lambda x, axes: quantize_input(x, act, axes, amax)
    return _layer_output(module, args, kwargs, quantize_fn)


@contextlib.contextmanager
def intercept(activation_rules: Optional[ActivationRules] = None) -> Iterator[None]:
  """Within this context, Linen layers run quantized (see the module docstring).

  Layers whose kernel is a QArray use it; layers matched by `activation_rules`
  quantize their input. Trace (jit) inside the context: the interception
  happens when the model's Python code runs.

  Example:
    >>> with jq.linen.intercept([(r"Dense_\\d+", jq.linen.ActivationQuant("int8"))]):
    ...   y = model.apply(qvariables, x)
  """
  with nn.intercept_methods(_Interceptor(as_activation_rules(activation_rules))):
    yield


def quantize_params(variables: Any, weight_rules) -> Any:
  """`quantize_tree` over the ``params`` collection only (paths keep ``params/``)."""
  if not weight_rules:
    return variables
  quantized = tree_lib.quantize_tree({"params": variables["params"]}, weight_rules)
  return {**variables, "params": quantized["params"]}


def apply(module: nn.Module, variables: Any, *args, weight_rules=None,
          activation_rules: Optional[ActivationRules] = None, method=None,
          mutable=False, rngs=None, **kwargs):
  """``module.apply(variables, *args, ...)`` with quantized layers.

  Args:
    module: any Linen module, unmodified.
    variables: its variables; ``params`` may hold QArrays from `jq.quantize_tree`.
    *args, **kwargs: passed to the method.
    weight_rules: optional `quantize_tree` rules applied to the float ``params``
      on each call (convenient; quantize once beforehand for speed).
    activation_rules: rules over module paths selecting `ActivationQuant`s.
    method, mutable, rngs: as for `flax.linen.Module.apply`.
  Returns:
    What ``module.apply`` returns.
  Raises:
    TypeError: a QArray in the params of a layer type that cannot run quantized.
    ValueError: a static activation rule for a layer without calibrated ranges.

  Example:
    >>> y = jq.linen.apply(model, qvariables, x, activation_rules=[
    ...     (r".*", jq.linen.ActivationQuant("int8", "per_token"))])
  """
  variables = quantize_params(variables, weight_rules)
  with intercept(activation_rules):
    return module.apply(variables, *args, method=method, mutable=mutable, rngs=rngs,
                        **kwargs)


def calibrate(module: nn.Module, variables: Any, batches: Iterable[Any], *,
              activation_rules: ActivationRules, weight_rules=None, method=None,
              jit: bool = True, **kwargs) -> Any:
  """Runs the model over `batches`, collecting static activation ranges.

  Layers whose activation rule is static (`ActivationQuant(granularity="static")`)
  update ``quant_stats/<layer path>/input_amax`` (float32[]) and ``input_count``
  (int32[]) with their `Observer`; the forward pass uses float activations.

  Args:
    module, variables, weight_rules, method, **kwargs: as for `apply`.
    batches: an iterable of positional inputs: an array, or a tuple of arguments.
    activation_rules: the rules inference will use.
    jit: compile the calibration step once (the default).
  Returns:
    `variables` with the ``quant_stats`` collection added or updated.
  """
  variables = quantize_params(variables, weight_rules)
  rules = as_activation_rules(activation_rules)

  def step(variables, batch):
    _, updates = apply(module, variables, *batch, activation_rules=rules, method=method,
                       mutable=[STATS_COLLECTION], **kwargs)
    return {**variables, **updates}

  step = jax.jit(step) if jit else step
  for batch in batches:
    variables = step(variables, batch if isinstance(batch, tuple) else (batch,))
  return variables
