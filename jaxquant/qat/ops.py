"""Quantization-aware training ops: `jax.custom_vjp` quantizers with surrogate gradients.

Each op is a pure function of arrays and a static `QuantSpec`, usable in any JAX
code (jit, vmap, grad) and in plain optax loops:

* `fake_quant`: straight-through estimator, the gradient masked to the clipping
  range (zero where the input saturates).
* `lsq`: learned step size (Esser et al. 2020), the step's gradient scaled by
  1 / sqrt(N * Q_P); `lsq_plus` adds a learned offset (LSQ+).
* `pact`: learned activation clip (Choi et al. 2018) for unsigned activations.
* `fake_quant_tree`: `fake_quant` over a params pytree by `Rule`s.
* `dampening_loss`: the oscillation-dampening regularizer (Nagel et al. 2022),
  pulling latent weights towards their grid points at low bits.

Rounding is the format's own (half to even for integers; nearest value for float
and codebook grids), so a converted model (`jaxquant.qat.lsq_quantize`,
`jaxquant.quantize_tree`) reproduces the fake-quantized weights exactly.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant import formats as formats_lib
from jaxquant import tree as tree_lib
from jaxquant.qarray import QArray
from jaxquant.quantize import QuantSpec, clip_range, dequantize, expand_groups, group_sum, quantize


def _as_spec(spec) -> QuantSpec:
  return spec if isinstance(spec, QuantSpec) else QuantSpec(spec)


# ----------------------------------------------------------------------------
# Straight-through fake quantization with a clipping mask.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quant(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """``dequantize(quantize(x, spec))``; gradient 1 inside the clipping range, else 0.

  Args:
    x: float[*shape].
    spec: a `QuantSpec` (static); scales are calibrated from `x` as `quantize` does.
  Returns:
    float[*shape] in x's dtype.
  """
  return dequantize(quantize(x, _as_spec(spec)))


def _fake_quant_fwd(x, spec):
  q = quantize(x, _as_spec(spec))
  lo, hi = clip_range(q)
  x32 = x.astype(jnp.float32)
  inside = (x32 >= lo) & (x32 <= hi)
  return dequantize(q), inside


def _fake_quant_bwd(spec, inside, g):
  del spec
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant_tree(params: Any, rules) -> Any:
  """`fake_quant` applied to the float leaves of `params` selected by `rules`.

  Use inside a loss: ``loss(jq.qat.fake_quant_tree(params, rules), batch)``.
  """
  return tree_lib.map_by_rules(lambda w, spec, _: fake_quant(w, spec), params, rules)


# ----------------------------------------------------------------------------
# LSQ and LSQ+.


def _grid_limits(spec: QuantSpec) -> tuple[float, float]:
  """(Q_N, Q_P): v/s is clipped to [-Q_N, Q_P] (symmetric ints use ±max)."""
  fmt = spec.format
  if fmt.kind in ("int", "uint") and spec.symmetric and not spec.full_range:
    return (fmt.max if fmt.signed else 0.0), fmt.max
  return -fmt.min, fmt.max


def _round_on_grid(spec: QuantSpec, u: jax.Array) -> jax.Array:
  fmt = spec.format
  return formats_lib.decode(fmt, formats_lib.encode(fmt, u))


def _check_step(x, step, spec):
  expected = spec.scale_shape(x.shape)
  if tuple(step.shape) != expected:
    raise ValueError(f"step has shape {tuple(step.shape)}; for x of shape "
                     f"{tuple(x.shape)} and this spec it must be {expected}")


def lsq_init(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """The LSQ paper's initial step, 2 mean|x| / sqrt(Q_P) per scale group (float32)."""
  spec = _as_spec(spec)
  group_shape = spec.scale_shape(x.shape)
  group_size = math.prod(x.shape) // math.prod(group_shape)
  mean_abs = group_sum(jnp.abs(x.astype(jnp.float32)), spec)
  _, q_p = _grid_limits(spec)
  return 2 * (mean_abs / group_size) / math.sqrt(q_p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lsq(x, step, offset, spec):
  return _lsq_forward(x, step, offset, spec)[0]


def _lsq_forward(x, step, offset, spec):
  q_n, q_p = _grid_limits(spec)
  s = expand_groups(step.astype(jnp.float32), spec, x.shape)
  beta = expand_groups(offset.astype(jnp.float32), spec, x.shape)
  u = (x.astype(jnp.float32) - beta) / s
  clipped = jnp.clip(u, -q_n, q_p)
  rounded = _round_on_grid(spec, clipped)
  y = (rounded * s + beta).astype(x.dtype)
  return y, (u, rounded, s)


def _lsq_fwd(x, step, offset, spec):
  y, (u, rounded, _) = _lsq_forward(x, step, offset, spec)
  return y, (u, rounded, step, offset)


def _lsq_bwd(spec, residuals, g):
  u, rounded, step, offset = residuals
  x_shape, step_shape = u.shape, step.shape
  x_dtype, step_dtype = g.dtype, step.dtype
  q_n, q_p = _grid_limits(spec)
  g32 = g.astype(jnp.float32)
  below, above = u < -q_n, u > q_p
  inside = ~(below | above)
  group_size = math.prod(x_shape) // math.prod(step_shape)
  grad_scale = 1.0 / math.sqrt(group_size * q_p)
  d_step = jnp.where(inside, rounded - u, jnp.where(below, -q_n, q_p))
  step_grad = group_sum(g32 * d_step, spec) * grad_scale
  offset_grad = group_sum(jnp.where(inside, 0.0, g32), spec)
  offset_grad = offset_grad * grad_scale
  x_grad = jnp.where(inside, g32, 0.0).astype(x_dtype)
  return x_grad, step_grad.astype(step_dtype), offset_grad.astype(offset.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq(x: jax.Array, step: jax.Array, spec: QuantSpec) -> jax.Array:
  """LSQ fake quantization ``round(clip(x / s, -Q_N, Q_P)) * s`` with a learned step.

  Gradients (Esser et al. 2020): d/dx = 1 inside the range, 0 outside; d/ds =
  round(x/s) - x/s inside, -Q_N below, Q_P above, summed over each scale group and
  multiplied by 1 / sqrt(N * Q_P), N the group size.

  Args:
    x: float[*shape].
    step: float32[spec.scale_shape(shape)], positive (e.g. from `lsq_init`).
    spec: static; its format gives Q_N, Q_P (int4 symmetric: 7, 7).
  Returns:
    float[*shape] in x's dtype.
  """
  spec = _as_spec(spec)
  _check_step(x, step, spec)
  return _lsq(x, step, jnp.zeros_like(step), spec)


def lsq_plus(x: jax.Array, step: jax.Array, offset: jax.Array, spec: QuantSpec
             ) -> jax.Array:
  """LSQ+: ``round(clip((x - b) / s, -Q_N, Q_P)) * s + b`` with learned s and b.

  d/db is 1 where x saturates, 0 inside (scaled like d/ds). For asymmetric ranges,
  e.g. activations after swish/GELU, pair it with an unsigned or full-range spec.
  """
  spec = _as_spec(spec)
  _check_step(x, step, spec)
  _check_step(x, offset, spec)
  return _lsq(x, step, offset, spec)


def lsq_quantize(x: jax.Array, step: jax.Array, spec: QuantSpec) -> QArray:
  """The QArray a trained `lsq` weight converts to: ``dequantize(...) == lsq(...)``."""
  spec = _as_spec(spec)
  _check_step(x, step, spec)
  s = expand_groups(step.astype(jnp.float32), spec, x.shape)
  q_n, q_p = _grid_limits(spec)
  codes = formats_lib.encode(spec.format, jnp.clip(x.astype(jnp.float32) / s, -q_n, q_p))
  return QArray(codes=codes, scale=step.astype(jnp.float32),
                spec=spec.replace(scale_dtype="float32"), dtype=x.dtype)


# ----------------------------------------------------------------------------
# PACT.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pact(x: jax.Array, alpha: jax.Array, bits: int) -> jax.Array:
  """PACT: ``round(clip(x, 0, alpha) * (2^b - 1) / alpha) * alpha / (2^b - 1)``.

  d/dx = 1 for 0 <= x <= alpha, else 0; d/dalpha = 1 where x >= alpha, else 0
  (summed to alpha's shape, a scalar or a broadcastable per-channel array).
  """
  levels = 2**bits - 1
  alpha32 = alpha.astype(jnp.float32)
  clipped = jnp.clip(x.astype(jnp.float32), 0.0, alpha32)
  return (jnp.round(clipped * (levels / alpha32)) * (alpha32 / levels)).astype(x.dtype)


def _pact_fwd(x, alpha, bits):
  return pact(x, alpha, bits), (x, alpha)


def _pact_bwd(bits, residuals, g):
  del bits
  x, alpha = residuals
  g32 = g.astype(jnp.float32)
  x32, alpha32 = x.astype(jnp.float32), alpha.astype(jnp.float32)
  inside = (x32 >= 0) & (x32 <= alpha32)
  x_grad = jnp.where(inside, g32, 0.0).astype(x.dtype)
  alpha_grad = jnp.where(x32 >= alpha32, g32, 0.0)
  lead = alpha_grad.ndim - alpha.ndim
  alpha_grad = jnp.sum(alpha_grad, axis=tuple(range(lead)))
  kept_ones = tuple(i for i, n in enumerate(alpha.shape) if n == 1)
  alpha_grad = jnp.sum(alpha_grad, axis=kept_ones, keepdims=True)
  return x_grad, alpha_grad.reshape(alpha.shape).astype(alpha.dtype)


pact.defvjp(_pact_fwd, _pact_bwd)


# ----------------------------------------------------------------------------
# Oscillation dampening.


def dampening_loss(params: Any, rules) -> jax.Array:
  """Sum over quantized leaves of ||w - stop_gradient(fake_quant(w))||^2 (float32).

  Add ``lambda * dampening_loss(params, rules)`` to the loss to damp weights that
  oscillate across a rounding boundary (Nagel et al. 2022, "Overcoming Oscillations
  in Quantization-Aware Training"); its gradient pulls each latent weight towards
  its current grid point. Optional per run: leave it out for plain QAT.
  """
  # Leaves no rule selects come back unchanged, so they add exactly 0.
  quantized = jax.lax.stop_gradient(fake_quant_tree(params, rules))
  total = jnp.zeros([], jnp.float32)
  for w, w_q in zip(jax.tree.leaves(params), jax.tree.leaves(quantized)):
    if hasattr(w, "dtype") and jnp.issubdtype(w.dtype, jnp.floating):
      diff = w.astype(jnp.float32) - w_q.astype(jnp.float32)
      total = total + jnp.sum(diff * diff)
  return total
