"""Calibration capture: per-layer input statistics of a Flax model, batch by batch.

PTQ algorithms need second-order statistics of each quantized layer's input
(GPTQ and AWQ: the Hessian proxy ``X^T X``; AWQ: the mean ``|x|`` per channel;
SmoothQuant: the ``max |x|`` per channel; bias correction: the mean of ``x``).
`capture_linen` and `capture_nnx` run a model, unedited, over calibration
batches and return one `LayerStats` per dense layer, keyed by the layer's path
(the "/"-joined path of the kernel's parent, e.g. ``encoder/layer_0/query``).

Each batch runs through one jitted function that returns that batch's
statistics (never the activations); the statistics are summed across batches
in float32. Memory is ``O(in^2)`` per layer, whatever the number of tokens.

* Linen: `flax.linen.intercept_methods` sees every ``nn.Dense`` call (and
  ``nn.DenseGeneral`` contracting only the last input axis, without batch
  dims: a kernel ``[in, *features]``, 2-D in effect).
* NNX: the model is split, merged into a copy inside the jitted function, and
  each ``nnx.Linear`` of the copy records the input its ``dot_general`` hook
  receives (the layer's own hook is then called). The model is not touched.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, NamedTuple, Optional

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm import tqdm

from jaxquant import nnx as nnx_lib

_HIGHEST = jax.lax.Precision.HIGHEST


class LayerStats(NamedTuple):
  """Sums of one layer's inputs over calibration tokens (a pytree).

  Attributes:
    xtx: float32[in, in], sum over tokens of ``x x^T`` (GPTQ's Hessian up to a
      factor ``2 / count``).
    absmax: float32[in], max over tokens of ``|x|``.
    abs_sum: float32[in], sum over tokens of ``|x|``.
    x_sum: float32[in], sum over tokens of ``x``.
    count: int32[], tokens seen.
  """

  xtx: jax.Array
  absmax: jax.Array
  abs_sum: jax.Array
  x_sum: jax.Array
  count: jax.Array

  @staticmethod
  def from_inputs(x: jax.Array) -> "LayerStats":
    """Statistics of one batch of inputs ``x: float[..., in]`` (all leading axes are tokens)."""
    return _stats_of(jnp.asarray(x))

  def merge(self, other: "LayerStats") -> "LayerStats":
    """Statistics of the union of the tokens behind `self` and `other`."""
    return LayerStats(self.xtx + other.xtx, jnp.maximum(self.absmax, other.absmax),
                      self.abs_sum + other.abs_sum, self.x_sum + other.x_sum,
                      self.count + other.count)

  def _per_token(self, total: jax.Array) -> jax.Array:
    return total / jnp.maximum(self.count, 1).astype(jnp.float32)

  @property
  def mean_abs(self) -> jax.Array:
    """float32[in]: mean of ``|x|`` per input channel."""
    return self._per_token(self.abs_sum)

  @property
  def mean(self) -> jax.Array:
    """float32[in]: mean of ``x`` per input channel."""
    return self._per_token(self.x_sum)

  @property
  def hessian(self) -> jax.Array:
    """float32[in, in]: ``E[x x^T]``, the mean of ``x x^T`` over tokens."""
    return self._per_token(self.xtx)


@jax.jit
def _stats_of(x: jax.Array) -> LayerStats:
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  magnitude = jnp.abs(x)
  return LayerStats(xtx=jnp.matmul(x.T, x, precision=_HIGHEST),
                    absmax=jnp.max(magnitude, axis=0, initial=0.0),
                    abs_sum=jnp.sum(magnitude, axis=0),
                    x_sum=jnp.sum(x, axis=0),
                    count=jnp.asarray(x.shape[0], jnp.int32))


@jax.jit
def output_error(w: jax.Array, w_hat: jax.Array, xtx: jax.Array) -> jax.Array:
  """float32[]: ``sum over tokens ||x^T (w - w_hat)||^2``, from ``xtx`` alone.

  Equals ``tr(D^T xtx D)`` with ``D = w - w_hat``: the squared error of the
  layer's output over the calibration tokens, without their activations.

  Args:
    w, w_hat: float[in, out], the float kernel and its approximation.
    xtx: float32[in, in], `LayerStats.xtx`.
  """
  delta = (jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32))
  return jnp.sum(delta * jnp.matmul(jnp.asarray(xtx, jnp.float32), delta, precision=_HIGHEST))


def _record(records: dict, name: str, x: jax.Array) -> None:
  stats = LayerStats.from_inputs(x)
  records[name] = records[name].merge(stats) if name in records else stats


def _sum_stats(total: Optional[dict], batch: dict) -> dict:
  """`total` with `batch`'s statistics merged in, layer by layer (None: `batch`)."""
  if total is None:
    return batch
  merged = dict(total)
  for name, stats in batch.items():
    merged[name] = merged[name].merge(stats) if name in merged else stats
  return merged


_merge_stats = jax.jit(_sum_stats)


def _run(step: Callable, batches: Iterable[Any], progress: bool) -> dict[str, LayerStats]:
  """Sums ``step(batch)`` (a dict of per-batch `LayerStats`) over `batches`."""
  total = None
  for batch in tqdm(batches, desc="capture", unit="batch", disable=not progress):
    batch_stats = step(batch if isinstance(batch, tuple) else (batch,))
    total = _merge_stats(total, batch_stats)
  if total is None:
    raise ValueError("batches is empty; capture needs at least one calibration batch")
  return total


class Capture:
  """A jitted capture, compiled once and rerun with other variables.

  ``Capture(step)(*args, batches=...)`` sums ``step(*args, batch)`` (a dict of
  one batch's `LayerStats`, see `linen_step` / `nnx_step`) over the batches and
  returns it in the order the layers ran (a jitted function's dict output comes
  back sorted by key; the order is read from the records while tracing).
  """

  def __init__(self, step: Callable):
    self.order: list[str] = []

    def ordered(*args):
      records = step(*args)
      self.order.extend(name for name in records if name not in self.order)
      return records

    self._jitted = jax.jit(ordered)

  def __call__(self, *args, batches: Iterable[Any], progress: bool = False
               ) -> dict[str, LayerStats]:
    total = _run(lambda batch: self._jitted(*args, batch), batches, progress)
    return {name: total[name] for name in self.order if name in total}


def _check_pattern(pattern: str) -> None:
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"pattern={pattern!r} is not a valid regex: {e}") from e


# ----------------------------------------------------------------------------
# Linen.


def _dense_input(module: nn.Module, args, kwargs) -> Optional[jax.Array]:
  """The input of a Dense / 2-D-in-effect DenseGeneral call, or None for other calls."""
  if not isinstance(module, (nn.Dense, nn.DenseGeneral)):
    return None
  if not module.has_variable("params", "kernel"):
    return None  # init: the layer is creating its params
  x = jnp.asarray(args[0] if args else kwargs["inputs"])
  if isinstance(module, nn.DenseGeneral):
    axis = module.axis if isinstance(module.axis, Iterable) else (module.axis,)
    batch_dims = (module.batch_dims if isinstance(module.batch_dims, Iterable)
                  else (module.batch_dims,))
    if tuple(a % x.ndim for a in axis) != (x.ndim - 1,) or tuple(batch_dims):
      return None
  return x


def capture_linen(module: nn.Module, variables: Any, batches: Iterable[Any], *,
                  method=None, pattern: str = ".*", progress: bool = True,
                  **kwargs) -> dict[str, LayerStats]:
  """Input statistics of every Dense layer of a Linen model over `batches`.

  Args:
    module: any Linen module, unmodified (layers may hold QArrays when run
      inside `jaxquant.linen.intercept`).
    variables: its variables.
    batches: an iterable of positional inputs: an array, or a tuple of arguments.
    method: the module method to run (as for ``module.apply``).
    pattern: regex (`re.fullmatch`) over layer paths; only matching layers are
      captured.
    progress: show a tqdm progress bar over batches.
    **kwargs: keyword arguments of the method (e.g. ``deterministic=True``).
  Returns:
    ``{layer path: LayerStats}`` in the order the layers ran, e.g.
    ``"encoder/layer_0/attention/query"``
    (``module.path`` joined with "/"; the kernel is
    ``params/<layer path>/kernel``). A layer called several times per batch
    accumulates all its calls.
  Raises:
    ValueError: an invalid pattern or no batches.

  Example:
    >>> stats = jq.ptq.capture_linen(model, variables, [x0, x1, x2])
    >>> stats["Dense_0"].xtx.shape
    (128, 128)
  """
  _check_pattern(pattern)
  capture = Capture(linen_step(module, method, pattern, kwargs))
  return capture(variables, batches=batches, progress=progress)


def linen_step(module: nn.Module, method, pattern: str, kwargs: dict) -> Callable:
  """``step(variables, batch) -> {layer path: LayerStats}`` of one batch (`capture_linen`)."""

  def step(variables, batch):
    records: dict[str, LayerStats] = {}

    def interceptor(next_fun, args, kw, context):
      mod = context.module
      if context.method_name == "__call__" and mod.scope is not None:
        x = _dense_input(mod, args, kw)
        name = "/".join(map(str, mod.path))
        if x is not None and re.fullmatch(pattern, name):
          _record(records, name, x)
      return next_fun(*args, **kw)

    with nn.intercept_methods(interceptor):
      module.apply(variables, *batch, method=method, **kwargs)
    return records

  return step


# ----------------------------------------------------------------------------
# NNX.


def _recording_dot_general(records: dict, name: str, dot_general: Callable) -> Callable:
  def record_then_contract(lhs, rhs, *args, **kwargs):
    _record(records, name, lhs)
    return dot_general(lhs, rhs, *args, **kwargs)
  return record_then_contract


def capture_nnx(model: nnx.Module, batches: Iterable[Any], *, pattern: str = ".*",
                forward: Optional[Callable] = None, progress: bool = True
                ) -> dict[str, LayerStats]:
  """Input statistics of every `nnx.Linear` of an NNX model over `batches`.

  The model is not modified: each step runs a copy merged from its state inside
  a jitted function (state updates such as dropout RNG counters are dropped;
  call ``model.eval()`` first for inference behaviour).

  Args:
    model: any NNX module. Layers made to run quantized by
      `jaxquant.nnx.quantize_model` bypass the ``dot_general`` hook and are
      refused when `pattern` selects them; a Linear subclass whose own
      ``__call__`` never calls ``self.dot_general`` is not seen.
    batches: an iterable of positional inputs: an array, or a tuple of arguments.
    pattern: regex (`re.fullmatch`) over layer paths such as ``layers/0``.
    forward: ``forward(model, *batch)``; defaults to ``model(*batch)``.
    progress: show a tqdm progress bar over batches.
  Returns:
    ``{layer path: LayerStats}`` in the order the layers ran; the kernel of layer
    ``layers/0`` is
    ``layers/0/kernel`` in ``nnx.state(model, nnx.Param)``.
  Raises:
    ValueError: an invalid pattern, no batches, or a selected quantized layer.
  """
  _check_pattern(pattern)
  for path, node in nnx.graph.iter_graph(model):
    name = "/".join(map(str, path))
    if (isinstance(node, nnx.Linear) and nnx_lib.is_quantized(node)
        and re.fullmatch(pattern, name)):
      raise ValueError(f"{name} runs quantized (jq.nnx.quantize_model); capture_nnx "
                       "needs its float forward pass: capture before quantize_model")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  capture = Capture(nnx_step(graphdef, pattern, forward))
  return capture(params, rest, batches=batches, progress=progress)


def nnx_step(graphdef, pattern: str, forward: Optional[Callable] = None) -> Callable:
  """``step(params, rest, batch) -> {layer path: LayerStats}`` of one batch of the model
  ``nnx.merge(graphdef, params, rest)`` (`capture_nnx`)."""
  forward = forward or (lambda m, *batch: m(*batch))

  def step(params, rest, batch):
    copy = nnx.merge(graphdef, params, rest)
    records: dict[str, LayerStats] = {}
    layers = [("/".join(map(str, path)), node) for path, node in nnx.graph.iter_graph(copy)
              if isinstance(node, nnx.Linear)]
    for name, layer in layers:
      if re.fullmatch(pattern, name):
        layer.dot_general = _recording_dot_general(records, name, layer.dot_general)
    forward(copy, *batch)
    return records

  return step
