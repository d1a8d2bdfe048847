"""Run an unmodified Flax NNX model with quantized weights and activations.

    >>> model = jq.nnx.quantize_model(model, weight_rules=[
    ...     jq.Rule(r".*/kernel", jq.QuantSpec("int8", channel_axes=(-1,)))],
    ...     activation_rules=[(r"layers/\\d+", jq.nnx.ActivationQuant("int8"))])
    >>> y = model(x)                      # or under nnx.jit

`quantize_model` works in place on the same graph: the float ``Param`` values
chosen by the weight rules (paths of ``nnx.state(model, nnx.Param)``, such as
``layers/0/kernel``) become QArrays, and every `nnx.Linear`,
`nnx.LinearGeneral`, `nnx.Einsum` and `nnx.Conv` (or a subclass that keeps its
``__call__``) with a QArray kernel or a matching activation rule (over module
paths such as ``layers/0``) runs quantized. The layer math, activation
quantization and the int8 x int8 -> int32 contraction are those of
`jaxquant.linen`.

Mechanism: each such layer instance's ``__class__`` is swapped for a direct
subclass, ``Quantized<Name>`` (made once per class; `unquantized_class` gives
the original back), whose ``__call__`` computes the output from the layer's
attributes and possibly-QArray params, or calls the original ``__call__`` when
nothing applies. Why not the layers' own hooks: `nnx.Linear.dot_general`,
`nnx.Einsum.einsum_op` and `nnx.Conv.conv_general_dilated` can be set per
instance, but the layers read ``self.kernel[...]`` and promote its dtype before
calling them, so a QArray kernel never reaches the hook (and a hook sees no
layer state for calibrated ranges). A per-instance ``__call__`` needs a
per-instance class, since Python looks ``__call__`` up on the type; the
subclass adds no slots, so the instance layout is unchanged. NNX records the
class in the graphdef, so `nnx.split` / `nnx.merge`, `nnx.jit` and `nnx.clone`
keep the quantized behaviour. The model's own classes are untouched; nothing
in `jax.lax` is patched. Quantized layers ignore a custom ``dot_general``,
``einsum_op`` or ``conv_general_dilated``, so `quantize_model` refuses them.

Static activation ranges are `QuantStats` variables on the layer
(``input_amax``: float32[], ``input_count``: int32[]), filled by `calibrate`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional

from flax import nnx
import jax
import jax.numpy as jnp

from jaxquant import linen as core
from jaxquant import tree as tree_lib
from jaxquant.linen import ActivationQuant  # re-exported: jq.nnx.ActivationQuant
from jaxquant.linen import Observer  # noqa: F401  (re-exported: jq.nnx.Observer)
from jaxquant.qarray import QArray

SUPPORTED_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)
_DEFAULT_OPS = {"dot_general": (None, jax.lax.dot_general),
                "dot_general_cls": (None,),
                "einsum_op": (jnp.einsum,),
                "conv_general_dilated": (jax.lax.conv_general_dilated,)}
_STATS_ATTRS = ("input_amax", "input_count")
_UNQUANTIZED = "_jaxquant_unquantized_class"


class QuantStats(nnx.Variable):
  """A calibrated activation range of a quantized layer (see `calibrate`)."""


def _quantized_call(self, inputs, *args, **kwargs):
  """``__call__`` of a quantized layer: the float layer's unless quantization applies."""
  act = self.quant_activation
  amax = None
  if act is not None and act.is_static:
    if self.quant_calibrating:
      amax, count = core.observe(self.input_amax.get_value(), self.input_count.get_value(),
                                 jnp.asarray(inputs), act.observer)
      self.input_amax.set_value(amax)
      self.input_count.set_value(count)
      act = None  # calibration runs with float activations
    amax = self.input_amax.get_value()
  if act is None and not isinstance(_kernel(self), QArray):
    return unquantized_class(self).__call__(self, inputs, *args, **kwargs)
  quantize_fn = lambda x, axes: core.quantize_input(x, act, axes, amax)
  return _layer_output(self, jnp.asarray(inputs), args, kwargs, quantize_fn)


@functools.cache
def _quantized_class(cls: type) -> type:
  """``Quantized<Name>(cls)`` with `_quantized_call` as ``__call__``, once per class.

  A direct subclass adding no slots keeps the instance layout, so an instance's
  ``__class__`` can be swapped (a mixin base would change the layout).
  Instance attributes it reads (static): ``quant_path`` (str),
  ``quant_activation`` (`ActivationQuant` or None), ``quant_calibrating`` (bool).
  """
  if _UNQUANTIZED in cls.__dict__:
    return cls
  name = f"Quantized{cls.__name__}"
  namespace = {"__module__": __name__, "__qualname__": name, "__slots__": (),
               "__call__": _quantized_call, _UNQUANTIZED: cls,
               "__doc__": f"`{cls.__name__}` run by jaxquant (see jaxquant.nnx)."}
  return type(cls)(name, (cls,), namespace)


def unquantized_class(layer) -> type:
  """The layer's class before `quantize_model` (its own class if not quantized)."""
  return type(layer).__dict__.get(_UNQUANTIZED, type(layer))


def is_quantized(layer) -> bool:
  """Whether `quantize_model` made this layer run quantized."""
  return _UNQUANTIZED in type(layer).__dict__


# The Flax classes' quantized twins, importable by name (pickling, repr).
QuantizedLinear = _quantized_class(nnx.Linear)
QuantizedLinearGeneral = _quantized_class(nnx.LinearGeneral)
QuantizedEinsum = _quantized_class(nnx.Einsum)
QuantizedConv = _quantized_class(nnx.Conv)


def _runs_quantized(node: Any) -> bool:
  """A supported layer type (or a subclass that keeps its ``__call__``)."""
  cls = unquantized_class(node)
  for base in SUPPORTED_TYPES:
    if issubclass(cls, base):
      return cls.__call__ is base.__call__
  return False


def _value(variable):
  return None if variable is None else variable.get_value()


def _kernel(layer):
  return _value(layer.kernel)


def _promote(layer) -> Callable:
  return lambda x, k, b: layer.promote_dtype((x, k, b), dtype=layer.dtype)


def _layer_output(layer, x, args, kwargs, quantize_fn) -> jax.Array:
  """The output of a supported NNX layer, computed from its attributes and params."""
  names = ("einsum_str", "out_sharding") if isinstance(layer, nnx.Einsum) else ("out_sharding",)
  bound = dict(zip(names, args), **kwargs)
  kernel, bias = _kernel(layer), _value(layer.bias)
  common = dict(promote=_promote(layer), quantize_fn=quantize_fn, precision=layer.precision,
                preferred_element_type=layer.preferred_element_type,
                out_sharding=bound.get("out_sharding"))
  if isinstance(layer, nnx.Linear):
    return core.linear_general(x, kernel, bias, axis=(-1,), batch_dims=(), **common)
  if isinstance(layer, nnx.LinearGeneral):
    return core.linear_general(x, kernel, bias, axis=layer.axis,
                               batch_dims=tuple(layer.batch_axis.keys()), **common)
  if isinstance(layer, nnx.Einsum):
    equation = bound.get("einsum_str") or layer.einsum_str
    return core.einsum(x, kernel, bias, equation=equation, **common)
  return core.conv(x, kernel, bias, kernel_size=layer.kernel_size, strides=layer.strides,
                   padding=layer.padding, input_dilation=layer.input_dilation,
                   kernel_dilation=layer.kernel_dilation,
                   feature_group_count=layer.feature_group_count, mask=layer.mask, **common)


def _check_no_custom_op(layer, path: str) -> None:
  for attr, defaults in _DEFAULT_OPS.items():
    if hasattr(layer, attr) and not any(getattr(layer, attr) is d for d in defaults):
      raise ValueError(f"{path} ({type(layer).__name__}) sets a custom {attr}; jaxquant "
                       "replaces the layer's contraction and cannot combine it with one")


def _modules(model) -> dict[tuple, Any]:
  return {tuple(path): node for path, node in nnx.graph.iter_graph(model)
          if isinstance(node, nnx.Module)}


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def _check_owners(params, modules) -> None:
  """Raises for a QArray param owned by a layer that cannot run quantized."""
  for path, variable in nnx.to_flat_state(params):
    if not isinstance(variable.get_value(), QArray):
      continue
    owner = modules.get(tuple(path[:-1]))
    if not _runs_quantized(owner):
      name = _path_str(path)
      raise TypeError(
          f"{name} would be a QArray, but {type(owner).__name__} layers cannot run "
          "quantized: jaxquant.nnx runs Linear, LinearGeneral, Einsum and Conv (and "
          "subclasses that keep their __call__). Keep it float with a weight rule such "
          f"as jq.Rule({name!r}, None).")


def _quantize_layer(layer, path: str, act: Optional[ActivationQuant]) -> None:
  _check_no_custom_op(layer, path)
  layer.__class__ = _quantized_class(type(layer))
  layer.quant_path = path
  layer.quant_activation = act
  layer.quant_calibrating = False
  if act is not None and act.is_static:
    for attr in _STATS_ATTRS:
      existing = getattr(layer, attr, None)
      if existing is not None and not isinstance(existing, QuantStats):
        raise ValueError(f"{path} already has an attribute {attr!r}; jaxquant keeps its "
                         "calibrated range there")
    if not isinstance(getattr(layer, "input_amax", None), QuantStats):
      layer.input_amax = QuantStats(jnp.zeros((), jnp.float32))
      layer.input_count = QuantStats(jnp.zeros((), jnp.int32))


def quantize_model(model: nnx.Module, weight_rules=(), activation_rules=None) -> nnx.Module:
  """Quantizes `model` in place and returns it: QArray params, quantized layers.

  Args:
    model: any NNX module, unmodified.
    weight_rules: `quantize_tree` rules over ``nnx.state(model, nnx.Param)``
      paths (``layers/0/kernel``); None specs keep leaves float.
    activation_rules: ``(pattern, ActivationQuant | QuantSpec | format | None)``
      pairs or `jq.Rule`s over module paths (``layers/0``).
  Returns:
    `model` (same graph), its supported layers running quantized.
  Raises:
    TypeError: a QArray param in a layer type that cannot run quantized (checked
      before anything changes).
    ValueError: a quantized layer with a custom dot_general / einsum_op / conv op.

  Example:
    >>> jq.nnx.quantize_model(model, [jq.Rule(r".*kernel", jq.QuantSpec("int8", channel_axes=(-1,)))])
  """
  rules = core.as_activation_rules(activation_rules)
  params = nnx.state(model, nnx.Param)
  if weight_rules:
    params = tree_lib.quantize_tree(params, weight_rules)
  modules = _modules(model)
  _check_owners(params, modules)
  nnx.update(model, params)
  for path, layer in modules.items():
    if not _runs_quantized(layer):
      continue
    name = _path_str(path)
    act = core.activation_for(name, rules)
    if act is not None or isinstance(_kernel(layer), QArray):
      _quantize_layer(layer, name, act)
  return model


def _static_layers(model) -> list:
  return [layer for layer in _modules(model).values()
          if is_quantized(layer) and layer.quant_activation is not None
          and layer.quant_activation.is_static]


def calibrate(model: nnx.Module, batches: Iterable[Any], *,
              forward: Optional[Callable] = None, jit: bool = True) -> nnx.Module:
  """Runs `model` over `batches`, updating the static ranges of its layers in place.

  Layers with a static `ActivationQuant` update ``input_amax`` / ``input_count``
  (`QuantStats`) with their `Observer`; the forward pass uses float activations.

  Args:
    model: a model returned by `quantize_model`.
    batches: an iterable of positional inputs: an array, or a tuple of arguments.
    forward: ``forward(model, *batch)``; defaults to ``model(*batch)``.
    jit: run each step under `nnx.jit` (compiled once).
  Returns:
    `model`.
  Raises:
    ValueError: no layer of `model` has static activation quantization.
  """
  layers = _static_layers(model)
  if not layers:
    raise ValueError("calibrate: no layer of the model has static activation "
                     "quantization; pass ActivationQuant(granularity='static') rules "
                     "to quantize_model first")
  forward = forward or (lambda m, *batch: m(*batch))
  step = (lambda m, batch: forward(m, *batch))
  step = nnx.jit(step) if jit else step
  for layer in layers:
    layer.quant_calibrating = True
  try:
    for batch in batches:
      step(model, batch if isinstance(batch, tuple) else (batch,))
  finally:
    for layer in layers:
      layer.quant_calibrating = False
  return model
