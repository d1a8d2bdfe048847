"""Calibration-free weight fitting: HQQ (half-quadratic) and per-group MSE clipping.

`hqq` fits the scale and zero point of an asymmetric integer quantizer to the
weights alone by minimizing a sparsity-promoting error ``sum |w - deq(Q(w))|^p``,
``p < 1`` (Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine
Learning Models"). Half-quadratic splitting adds an auxiliary error ``e`` and
alternates closed-form steps, per scale group:

1. codes ``c = clip(round(w / s) + z)`` (the nearest grid point);
2. ``e = shrink_p(w - (c - z) s; beta)``, the generalized soft threshold
   ``sign(x) max(|x| - |x|^(p-1) / beta, 0)``: large errors (outliers) stay in
   ``e``, the bulk goes to 0;
3. the zero point minimizing ``||(w - e) - (c - z) s||^2``: the group mean of
   ``c - (w - e) / s``, rounded (QArray zero points are integer codes, and the
   quadratic is symmetric about its minimum, so rounding gives the best integer);
4. the scale minimizing the same quadratic given ``c`` and ``z`` (least squares);
5. ``beta <- kappa beta``.

The paper updates only the (float) zero point; ours is an integer code, so the
scale is fitted too. Step 2 measures errors in units of the group's initial
step, which makes the fit independent of the weights' magnitude
(``hqq(a w) == a hqq(w)``). Each group keeps the iterate with the lowest
objective, starting from round-to-nearest (`jaxquant.quantize`), so more
iterations never increase the objective and ``iters=0`` is RTN.

`mse_fit` searches per group for the clipping range with the lowest squared
error: ``[a lo, b hi]`` over a grid of ratios a, b (independently for
asymmetric specs, ``a = b`` for symmetric ones), ``[lo, hi]`` the absmax range.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import formats as formats_lib
from jaxquant.qarray import QArray
from jaxquant.quantize import (QuantSpec, _blocked_layout, _decode, _encode, _scales,
                               dequantize, quantize)

_FLOAT_SCALES = ("float32", "bfloat16", "float16")


def _check(w, spec, what: str) -> QuantSpec:
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"spec must be a QuantSpec; got {type(spec).__name__}")
  if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
    raise TypeError(f"{what} expects floating-point weights; got dtype {jnp.result_type(w)}")
  if spec.tensor_scale:
    raise ValueError(f"{what} does not fit specs with tensor_scale=True")
  if spec.rounding != "nearest":
    raise ValueError(f"{what} needs spec.rounding='nearest'; got {spec.rounding!r}")
  return spec


def _blocked(w, spec):
  """(w float32 in the blocked layout, reduced axes, compact scale shape)."""
  channel, blocks = spec.resolve(w.shape)
  blocked_shape, axes, _ = _blocked_layout(w.shape, channel, blocks)
  return w.astype(jnp.float32).reshape(blocked_shape), axes, spec.scale_shape(w.shape)


def _qarray(w, spec, wb, scale, zero_point, compact) -> QArray:
  codes = _encode(spec, wb, scale, zero_point, None, None)
  return QArray(codes=codes.reshape(w.shape), scale=scale.reshape(compact),
                zero_point=None if zero_point is None else zero_point.reshape(compact),
                spec=spec, dtype=w.dtype)


def _group_error(spec, wb, axes, scale, zero_point, p):
  codes = _encode(spec, wb, scale, zero_point, None, None)
  err = jnp.abs(_decode(spec, codes, scale, zero_point, None) - wb)
  return jnp.sum(err * err if p == 2 else err**p, axis=axes, keepdims=True)


def shrink_lp(x: jax.Array, beta, p: float) -> jax.Array:
  """``sign(x) max(|x| - |x|^(p-1) / beta, 0)``, the l_p (p <= 1) shrinkage of HQQ."""
  ax = jnp.abs(x)
  safe = jnp.where(ax > 0, ax, 1.0)
  return jnp.where(ax > 0, jnp.sign(x) * jnp.maximum(ax - safe ** (p - 1) / beta, 0.0), 0.0)


@functools.partial(jax.jit, static_argnames=("p",))
def lp_error(w: jax.Array, q: QArray, p: float = 0.7) -> jax.Array:
  """float32[]: ``sum |w - dequantize(q)|^p``, HQQ's objective."""
  err = jnp.abs(w.astype(jnp.float32) - dequantize(q, jnp.float32))
  return jnp.sum(err**p)


@functools.partial(jax.jit, static_argnames=("spec", "p"))
def hqq(w: jax.Array, spec: QuantSpec, *, iters: int = 20, p: float = 0.7,
        beta: float = 1.0, kappa: float = 1.01) -> QArray:
  """Fits an asymmetric integer quantizer to `w` by half-quadratic optimization.

  Args:
    w: float[*shape] weights, e.g. a Dense kernel [in, out].
    spec: an asymmetric (``symmetric=False``) int/uint `QuantSpec`, e.g.
      ``QuantSpec("uint4", channel_axes=(1,), block_sizes={0: 64}, symmetric=False)``;
      scale dtype float32, bfloat16 or float16. The initial range follows its
      calibration.
    iters: half-quadratic iterations (may be traced); 0 gives `jaxquant.quantize`.
    p: the l_p exponent of the error, 0 < p <= 1 (static).
    beta: initial weight of the quadratic coupling. Errors are measured in steps
      of the initial quantizer, and those beyond ``beta^(-1 / (2 - p))`` steps
      (1 step for the default) are shrunk only partly: the fit discounts them.
    kappa: factor beta grows by per iteration.
  Returns:
    QArray with the spec's layout, the scale and zero point of each group being
    the iterate with the lowest ``sum |w - deq|^p`` (never above RTN's).
  Raises:
    ValueError: a symmetric or non-integer spec, tensor scales, e8m0/fp8 scales,
      ``p`` outside (0, 1].

  Example:
    >>> spec = jq.QuantSpec("uint3", channel_axes=(1,), block_sizes={0: 64}, symmetric=False)
    >>> q = jq.ptq.hqq(w, spec)
  """
  spec = _check(w, spec, "hqq")
  fmt = spec.format
  if spec.symmetric or fmt.kind not in ("int", "uint"):
    raise ValueError(f"hqq fits a zero point: spec must be an integer format with "
                     f"symmetric=False; got format={fmt.name!r}, symmetric={spec.symmetric}")
  if spec.scale_dtype not in _FLOAT_SCALES:
    raise ValueError(f"hqq needs a float scale dtype {_FLOAT_SCALES}; got "
                     f"scale_dtype={spec.scale_dtype!r}")
  if not 0 < p <= 1:
    raise ValueError(f"p={p}; expected 0 < p <= 1")
  wb, axes, compact = _blocked(w, spec)
  q0 = quantize(w, spec)
  stat_shape = tuple(1 if a in axes else n for a, n in enumerate(wb.shape))
  scale0 = q0.scale.reshape(stat_shape)
  zero0 = q0.zero_point.reshape(stat_shape)
  step0 = scale0.astype(jnp.float32)
  step0 = jnp.where(step0 > 0, step0, 1.0)
  count = float(np.prod([wb.shape[a] for a in axes]))

  def body(_, carry):
    scale, zero, best_scale, best_zero, best_err, beta = carry
    s = scale.astype(jnp.float32)
    safe = jnp.where(s > 0, s, 1.0)
    c = formats_lib.decode(fmt, _encode(spec, wb, scale, zero, None, None))
    residual = wb - (c - zero.astype(jnp.float32)) * s
    target = wb - step0 * shrink_lp(residual / step0, beta, p)
    z = jnp.sum(c - target / safe, axis=axes, keepdims=True) / count
    z = jnp.clip(jnp.round(z), fmt.min, fmt.max)
    u = c - z
    num = jnp.sum(target * u, axis=axes, keepdims=True)
    den = jnp.sum(u * u, axis=axes, keepdims=True)
    fitted = num / jnp.where(den > 0, den, 1.0)
    new_scale = jnp.where((den > 0) & (fitted > 0), fitted, s).astype(scale.dtype)
    new_zero = z.astype(zero.dtype)
    err = _group_error(spec, wb, axes, new_scale, new_zero, p)
    better = err < best_err
    return (new_scale, new_zero, jnp.where(better, new_scale, best_scale),
            jnp.where(better, new_zero, best_zero), jnp.where(better, err, best_err),
            beta * jnp.asarray(kappa, jnp.float32))

  err0 = _group_error(spec, wb, axes, scale0, zero0, p)
  init = (scale0, zero0, scale0, zero0, err0, jnp.asarray(beta, jnp.float32))
  _, _, scale, zero, _, _ = jax.lax.fori_loop(0, iters, body, init)
  return _qarray(w, spec, wb, scale, zero, compact)


@functools.partial(jax.jit, static_argnames=("spec", "grid", "min_ratio"))
def mse_fit(w: jax.Array, spec: QuantSpec, *, grid: int = 20, min_ratio: float = 0.5
            ) -> QArray:
  """Quantizes `w` with the per-group clipping range of lowest squared error.

  Tries ``[a lo, b hi]`` for a, b in ``linspace(1, min_ratio, grid)``, with
  ``[lo, hi]`` the group's absmax range (``[min(w, 0), max(w, 0)]`` when
  asymmetric, ``[-max|w|, max|w|]`` when symmetric, then a = b), and keeps for
  each group the pair with the lowest ``sum (w - deq)^2``. Ratio 1 is RTN, so the
  error never exceeds `jaxquant.quantize`'s with absmax calibration.

  Args:
    w: float[*shape] weights.
    spec: any `QuantSpec` without tensor scales (its calibration is ignored).
    grid: ratios per end (static); asymmetric specs try grid^2 pairs.
    min_ratio: the smallest ratio, in (0, 1] (static).
  Returns:
    QArray with the spec's layout.
  Raises:
    ValueError: ``tensor_scale=True``, stochastic rounding, a bad grid or min_ratio.
  """
  spec = _check(w, spec, "mse_fit")
  if grid < 1 or not 0 < min_ratio <= 1:
    raise ValueError(f"grid={grid}, min_ratio={min_ratio}; expected grid >= 1 and "
                     "0 < min_ratio <= 1")
  wb, axes, compact = _blocked(w, spec)
  if spec.symmetric:
    hi = jnp.max(jnp.abs(wb), axis=axes, keepdims=True)
    lo = -hi
  else:
    lo = jnp.minimum(jnp.min(wb, axis=axes, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(wb, axis=axes, keepdims=True), 0.0)
  ratios = jnp.asarray(np.linspace(1.0, min_ratio, grid, dtype=np.float32))
  pairs = grid if spec.symmetric else grid * grid

  def candidate(i):
    a, b = (ratios[i], ratios[i]) if spec.symmetric else (ratios[i // grid], ratios[i % grid])
    scale, zero = _scales(spec, lo * a, hi * b, None)
    return scale, zero, _group_error(spec, wb, axes, scale, zero, 2)

  def body(i, carry):
    best = carry
    scale, zero, err = candidate(i)
    better = err < best[-1]
    keep = lambda new, old: None if new is None else jnp.where(better, new, old)
    return tuple(keep(n, o) for n, o in zip((scale, zero, err), best))

  scale, zero, _ = jax.lax.fori_loop(1, pairs, body, candidate(0))
  return _qarray(w, spec, wb, scale, zero, compact)
