"""Data-free quantization (Nagel et al. 2019): cross-layer equalization and bias correction.

Cross-layer equalization. For ``Dense(w1, b1) -> f -> Dense(w2)`` with a
positively homogeneous ``f`` (``f(x / s) = f(x) / s`` for ``s > 0``: ReLU,
leaky ReLU, identity), dividing output channel ``i`` of the first layer by
``s_i`` and multiplying input channel ``i`` of the second by ``s_i`` leaves the
network's function unchanged. The paper's choice

    s_i = sqrt(r1_i * r2_i) / r2_i,

with ``r1_i`` the range of output channel ``i`` of ``w1`` (column ``i`` of a
``[in, out]`` kernel) and ``r2_i`` the range of input channel ``i`` of ``w2``
(row ``i``), makes both ranges ``sqrt(r1_i * r2_i)``: the per-channel ranges of
the two layers become equal, which is what per-tensor quantization needs. Ranges
are max |w| (the symmetric range; the paper's max - min gives the same ratios
for symmetric channels). Over a chain of layers the pairs are equalized in turn,
sweep after sweep, until the scales settle (`equalize_chain`).

Bias correction. Quantizing ``w`` to ``w_q`` shifts the expected output by
``E[x] @ (w - w_q)``; adding it to the bias makes the error zero-mean:
``b' = b + E[x] @ (w - w_q)`` (`bias_correction`). ``E[x]`` comes from
calibration inputs, or data-free from the previous layer's BatchNorm: for
``x = relu(z)``, ``z ~ N(beta, gamma^2)`` per channel, `expected_relu` gives
``E[x] = gamma phi(beta / gamma) + beta Phi(beta / gamma)``.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_pair(w1, b1, w2):
  if w1.ndim != 2 or w2.ndim != 2 or w1.shape[1] != w2.shape[0]:
    raise ValueError(f"w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} must be Dense kernels "
                     "[in, out] with w1's out equal to w2's in")
  if b1 is not None and tuple(b1.shape) != (w1.shape[1],):
    raise ValueError(f"b1 has shape {tuple(b1.shape)}; expected ({w1.shape[1]},)")


@jax.jit
def equalization_scales(w1: jax.Array, w2: jax.Array) -> jax.Array:
  """float32[c]: ``s_i = sqrt(r1_i r2_i) / r2_i`` for the c channels between w1 and w2.

  A channel that is zero in either layer keeps ``s_i = 1``.

  Args:
    w1: float[in, c], the producing layer.
    w2: float[c, out], the consuming layer.
  """
  _check_pair(w1, None, w2)
  r1 = jnp.max(jnp.abs(w1.astype(jnp.float32)), axis=0)
  r2 = jnp.max(jnp.abs(w2.astype(jnp.float32)), axis=1)
  ok = (r1 > 0) & (r2 > 0)
  r1, r2 = jnp.where(ok, r1, 1.0), jnp.where(ok, r2, 1.0)
  return jnp.where(ok, jnp.sqrt(r1 * r2) / r2, 1.0)


def _scale_pair(w1, b1, w2, s):
  w1_new = (w1.astype(jnp.float32) / s[None, :]).astype(w1.dtype)
  b1_new = None if b1 is None else (b1.astype(jnp.float32) / s).astype(b1.dtype)
  w2_new = (w2.astype(jnp.float32) * s[:, None]).astype(w2.dtype)
  return w1_new, b1_new, w2_new


@jax.jit
def cross_layer_equalize(w1: jax.Array, b1: Optional[jax.Array], w2: jax.Array
                         ) -> tuple[jax.Array, Optional[jax.Array], jax.Array, jax.Array]:
  """Equalizes the channels between ``Dense(w1, b1) -> f -> Dense(w2)``.

  For positively homogeneous ``f``: ``f(x @ w1' + b1') @ w2' == f(x @ w1 + b1) @ w2``.

  Args:
    w1: float[in, c] kernel of the first layer.
    b1: float[c] its bias, or None.
    w2: float[c, out] kernel of the second layer (its bias is unchanged).
  Returns:
    (w1 / s, b1 / s, s[:, None] * w2, s): the new kernels (input dtypes), with
    ``max |w1'[:, i]| == max |w2'[i, :]|``, and s float32[c] (`equalization_scales`).
  Raises:
    ValueError: shapes that do not chain.

  Example:
    >>> w1, b1, w2, s = jq.ptq.cross_layer_equalize(w1, b1, w2)
  """
  s = equalization_scales(w1, w2)
  return (*_scale_pair(w1, b1, w2, s), s)


@functools.partial(jax.jit, static_argnames=("sweeps",))
def equalize_chain(layers: Sequence[tuple[jax.Array, Optional[jax.Array]]], *,
                   sweeps: int = 20) -> tuple[list, list]:
  """Cross-layer equalization of a chain ``Dense -> f -> Dense -> f -> ... -> Dense``.

  Each sweep equalizes every adjacent pair in order; sweeps repeat `sweeps` times
  (the scales settle geometrically, as each pair's equalization moves its
  neighbours' ranges by less and less).

  Args:
    layers: ``[(w, b), ...]``, w float[in_l, out_l] with ``out_l == in_{l+1}``,
      b float[out_l] or None. Activations between them positively homogeneous.
    sweeps: number of passes over the pairs (static, >= 1).
  Returns:
    (layers', scales): the equalized ``[(w, b), ...]`` and, per junction l
    (between layers l and l + 1), the float32[out_l] product of the scales
    applied there, so that ``w_l' = scales[l-1][:, None] * w_l / scales[l]`` and
    ``b_l' = b_l / scales[l]`` (no scales[-1] for the first layer, none after the
    last).
  Raises:
    ValueError: fewer than two layers, shapes that do not chain, sweeps < 1.
  """
  if len(layers) < 2:
    raise ValueError(f"layers has {len(layers)} layer(s); equalization needs at least 2")
  if sweeps < 1:
    raise ValueError(f"sweeps={sweeps}; expected >= 1")
  for (w1, b1), (w2, _) in zip(layers[:-1], layers[1:]):
    _check_pair(w1, b1, w2)
  weights = [w for w, _ in layers]
  biases = [b for _, b in layers]

  def sweep(_, carry):
    weights, biases, scales = (list(c) for c in carry)
    for i in range(len(weights) - 1):
      s = equalization_scales(weights[i], weights[i + 1])
      weights[i], biases[i], weights[i + 1] = _scale_pair(
          weights[i], biases[i], weights[i + 1], s)
      scales[i] = scales[i] * s
    return weights, biases, scales

  scales = [jnp.ones((w.shape[1],), jnp.float32) for w in weights[:-1]]
  weights, biases, scales = jax.lax.fori_loop(0, sweeps, sweep, (weights, biases, scales))
  return list(zip(weights, biases)), list(scales)


@jax.jit
def bias_correction(w: jax.Array, qw_dequantized: jax.Array, b: Optional[jax.Array],
                    x_mean: jax.Array) -> jax.Array:
  """The bias that makes a quantized layer's expected output error zero.

  ``b' = b + x_mean @ (w - w_q)``, so ``E[x @ w + b] == E[x @ w_q + b']`` over the
  inputs whose mean is `x_mean`.

  Args:
    w: float[in, out] float kernel.
    qw_dequantized: float[in, out] its quantized version, dequantized.
    b: float[out] bias, or None (zero).
    x_mean: float[in], the mean layer input (calibration data, or `expected_relu`).
  Returns:
    float32[out] (b's dtype when given).
  Raises:
    ValueError: shapes that do not match.

  Example:
    >>> b_new = jq.ptq.bias_correction(w, jq.dequantize(qw), b, x_mean)
  """
  if tuple(qw_dequantized.shape) != tuple(w.shape) or w.ndim != 2:
    raise ValueError(f"qw_dequantized has shape {tuple(qw_dequantized.shape)}; expected the "
                     f"shape of w, a Dense kernel [in, out], {tuple(w.shape)}")
  if tuple(x_mean.shape) != (w.shape[0],):
    raise ValueError(f"x_mean has shape {tuple(x_mean.shape)}; expected ({w.shape[0]},)")
  if b is not None and tuple(b.shape) != (w.shape[1],):
    raise ValueError(f"b has shape {tuple(b.shape)}; expected ({w.shape[1]},)")
  delta = w.astype(jnp.float32) - qw_dequantized.astype(jnp.float32)
  shift = jnp.matmul(x_mean.astype(jnp.float32), delta, precision=_HIGHEST)
  if b is None:
    return shift
  return (b.astype(jnp.float32) + shift).astype(b.dtype)


@jax.jit
def expected_relu(mean: jax.Array, std: jax.Array) -> jax.Array:
  """``E[relu(z)]`` for ``z ~ N(mean, std^2)`` per channel (data-free bias correction).

  ``std * phi(mean / std) + mean * Phi(mean / std)``; ``relu(mean)`` where std is 0.
  With a BatchNorm before the ReLU, pass its shift ``beta`` as `mean` and ``|gamma|``
  as `std`.

  Args:
    mean, std: float[c].
  Returns:
    float32[c].
  """
  mean, std = mean.astype(jnp.float32), jnp.abs(std.astype(jnp.float32))
  safe = jnp.where(std > 0, std, 1.0)
  t = mean / safe
  value = safe * jax.scipy.stats.norm.pdf(t) + mean * jax.scipy.stats.norm.cdf(t)
  return jnp.where(std > 0, value, jnp.maximum(mean, 0.0))
