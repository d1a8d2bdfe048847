"""AWQ (Lin et al., 2024): activation-aware per-input-channel weight scaling.

Inputs with large mean ``|x|`` matter most to the output; scaling their kernel
rows up before quantization (``w -> diag(s) w``, undone by ``x -> x / s``)
shrinks their relative rounding error. AWQ searches

    s = mean|x|^alpha / sqrt(max * min),   alpha in {0, 1/grid, ..., (grid-1)/grid}

(``duo_scaling`` divides by ``mean_k(|W_jk| / max_j |W_jk|)^(1 - alpha)``
first) for the lowest output error over the calibration tokens,

    E(s) = tr(D^T H D),  D = w - diag(1/s) Q(diag(s) w),  H = X^T X,

computed from `LayerStats` alone (`output_error`), no activations stored.
``s = 1`` (plain round-to-nearest) is always a candidate, so AWQ is never worse
than RTN on the calibration data. The search (without AWQ's weight-clipping
search) runs in one jitted loop.

The result keeps ``s`` explicit (`AWQResult`): for serving, fold ``1/s`` into
the op producing the input (`fold_scales_into_layernorm`,
`fold_scales_into_linear`) and use ``qweight`` as the kernel; for evaluation,
`AWQResult.dequantize` gives ``diag(1/s) dequantize(qweight)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Union

import jax
import jax.numpy as jnp

from jaxquant.ptq.calibration import LayerStats
from jaxquant.ptq.calibration import output_error
from jaxquant.ptq.gptq import as_spec
from jaxquant.ptq.gptq import check_kernel
from jaxquant.ptq.smoothquant import apply_input_scales
from jaxquant.qarray import QArray
from jaxquant.quantize import QuantSpec
from jaxquant.quantize import dequantize
from jaxquant.quantize import quantize

_MIN_SCALE = 1e-4


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AWQResult:
  """An AWQ-quantized kernel with its explicit input scales (a pytree).

  Attributes:
    scales: float32[in], ``s``; the layer computes ``(x / s) @ dequantize(qweight)``.
    qweight: QArray[in, out], ``Q(diag(s) w)``.
  """

  scales: jax.Array
  qweight: QArray

  def dequantize(self, dtype=None) -> jax.Array:
    """``diag(1/s) dequantize(qweight)``: float[in, out], the kernel it stands for."""
    dtype = dtype or self.qweight.dtype
    values = dequantize(self.qweight, jnp.float32)
    scales = self.scales.astype(jnp.float32).reshape((-1,) + (1,) * (values.ndim - 1))
    return (values / scales).astype(dtype)


def check_awq_args(w, stats: LayerStats, spec: QuantSpec, *, grid: int) -> None:
  """Raises the error `awq` would raise for these arguments (shapes suffice)."""
  check_kernel(w)
  n = w.shape[0]
  if not isinstance(stats, LayerStats):
    raise TypeError(f"stats must be a LayerStats; got {type(stats).__name__}")
  if tuple(stats.xtx.shape) != (n, n) or tuple(stats.abs_sum.shape) != (n,):
    raise ValueError(f"stats are for {stats.abs_sum.shape[0]} inputs; w has {n} "
                     f"(shape {tuple(w.shape)})")
  if not isinstance(grid, int) or grid < 1:
    raise ValueError(f"grid={grid!r} must be a positive int")
  if spec.rounding != "nearest":
    raise ValueError(f"AWQ rounds to nearest; spec.rounding={spec.rounding!r}")
  spec.resolve(tuple(w.shape))


def awq(w: jax.Array, stats: LayerStats, spec: Union[QuantSpec, str], *, grid: int = 20,
        duo_scaling: bool = False) -> AWQResult:
  """AWQ scale search and quantization of a Dense kernel.

  Args:
    w: float[in, out], with ``y = x @ w``.
    stats: the layer's `LayerStats` (``xtx``, ``abs_sum``, ``count`` are used).
    spec: how to quantize ``diag(s) w``, as for `jaxquant.quantize`.
    grid: number of alpha values tried, ``k / grid`` for k < grid.
    duo_scaling: also divide by the normalized mean weight magnitude.
  Returns:
    `AWQResult` with the best scales (all ones if none beats RTN).
  Raises:
    ValueError: bad shapes, grid < 1, or stochastic rounding.

  Example:
    >>> result = jq.ptq.awq(w, stats["Dense_0"], jq.QuantSpec("int4", channel_axes=(1,)))
    >>> w_hat = result.dequantize()
  """
  spec = as_spec(spec)
  check_awq_args(w, stats, spec, grid=grid)
  scales, qweight = _awq(w, stats.xtx, stats.mean_abs, spec=spec, grid=grid,
                         duo_scaling=duo_scaling)
  return AWQResult(scales=scales, qweight=qweight)


@functools.partial(jax.jit, static_argnames=("spec", "grid", "duo_scaling"))
def _awq(w, xtx, mean_abs, *, spec: QuantSpec, grid: int, duo_scaling: bool):
  w32 = w.astype(jnp.float32)
  magnitude = jnp.abs(w32)
  w_mean = jnp.mean(magnitude / jnp.maximum(jnp.max(magnitude, axis=0, keepdims=True),
                                            1e-30), axis=1)

  def candidate(alpha):
    s = jnp.power(mean_abs, alpha)
    if duo_scaling:
      s = s / (jnp.power(w_mean, 1.0 - alpha) + _MIN_SCALE)
    s = jnp.maximum(s, _MIN_SCALE)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

  def error(s):
    w_hat = dequantize(quantize(apply_input_scales(w32, s), spec)) / s[:, None]
    return output_error(w32, w_hat, xtx)

  def body(k, carry):
    best_error, best_s = carry
    s = candidate(k.astype(jnp.float32) / grid)
    err = error(s)
    better = err < best_error
    return jnp.where(better, err, best_error), jnp.where(better, s, best_s)

  ones = jnp.ones_like(mean_abs)
  _, s = jax.lax.fori_loop(0, grid, body, (error(ones), ones))
  qweight = dataclasses.replace(quantize(apply_input_scales(w32, s), spec), dtype=w.dtype)
  return s, qweight
