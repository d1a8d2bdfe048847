"""SmoothQuant (Xiao et al., 2023) and the per-input-channel scale transforms it shares with AWQ.

A Dense layer ``y = x @ w`` is unchanged by ``x -> x diag(1/s)``,
``w -> diag(s) w`` for any positive ``s [in]``. SmoothQuant picks

    s_j = max|X_j|^alpha / max_k |W_jk|^(1 - alpha)

to move activation outliers into the weights (alpha, the migration strength,
in [0, 1]; 0.5 balances the two ranges: afterwards ``max|X_j / s_j| =
max_k |s_j W_jk|``). The division of ``x`` is folded into the op that produces
it: a LayerNorm/RMSNorm (`fold_scales_into_layernorm`) or a previous linear
layer (`fold_scales_into_linear`); the multiplication into the kernel
(`apply_input_scales`). Layers that share an input (query, key and value) must
share ``s``: pass all their kernels to `smoothquant_scales`.

    >>> s = jq.ptq.smoothquant_scales(stats["attn/query"].absmax, [wq, wk, wv], alpha=0.5)
    >>> ln_scale, ln_bias = jq.ptq.fold_scales_into_layernorm(ln_scale, ln_bias, s)
    >>> wq, wk, wv = (jq.ptq.apply_input_scales(w, s) for w in (wq, wk, wv))
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

_MIN_SCALE = 1e-5


def _check_scales(s, size: int, what: str) -> None:
  if getattr(s, "ndim", None) != 1 or s.shape[0] != size:
    raise ValueError(f"s must be a vector [{size}] matching {what}; got shape "
                     f"{tuple(getattr(s, 'shape', ()))}")


@jax.jit
def _divide(x, s):
  """x / s in float32, cast back to x's dtype (s broadcasts against x's last axis)."""
  s = s.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
  return (x.astype(jnp.float32) / s).astype(x.dtype)


@jax.jit
def _scale_rows(w, s):
  s = s.astype(jnp.float32).reshape((-1,) + (1,) * (w.ndim - 1))
  return (w.astype(jnp.float32) * s).astype(w.dtype)


def apply_input_scales(w: jax.Array, s: jax.Array) -> jax.Array:
  """``diag(s) w``: row j of the kernel times ``s_j``.

  Args:
    w: float[in, ...], a kernel whose first axis is the input.
    s: float32[in], positive.
  Returns:
    float[in, ...] in w's dtype (computed in float32).
  """
  _check_scales(s, w.shape[0], f"the input axis of w {tuple(w.shape)}")
  return _scale_rows(w, s)


def fold_scales_into_layernorm(ln_scale: jax.Array, ln_bias: Optional[jax.Array],
                               s: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
  """A LayerNorm (or RMSNorm, bias None) whose output is divided by `s`.

  Args:
    ln_scale: float[in], gamma.
    ln_bias: float[in], beta, or None.
    s: float32[in], positive.
  Returns:
    ``(ln_scale / s, ln_bias / s)`` (None stays None), in the params' dtypes.
  """
  _check_scales(s, ln_scale.shape[-1], f"ln_scale {tuple(ln_scale.shape)}")
  return _divide(ln_scale, s), None if ln_bias is None else _divide(ln_bias, s)


def fold_scales_into_linear(prev_w: jax.Array, prev_b: Optional[jax.Array], s: jax.Array
                            ) -> tuple[jax.Array, Optional[jax.Array]]:
  """A previous linear layer whose output is divided by `s`.

  Args:
    prev_w: float[k, in], the kernel producing this layer's input.
    prev_b: float[in] or None.
    s: float32[in], positive.
  Returns:
    ``(prev_w diag(1/s), prev_b / s)`` in the params' dtypes.
  """
  _check_scales(s, prev_w.shape[-1], f"the output axis of prev_w {tuple(prev_w.shape)}")
  return _divide(prev_w, s), None if prev_b is None else _divide(prev_b, s)


@jax.jit
def _smoothquant_scales(act_absmax, kernels, alpha):
  size = act_absmax.shape[0]
  weight_absmax = jnp.max(jnp.stack([
      jnp.max(jnp.abs(k.astype(jnp.float32)).reshape(size, -1), axis=1) for k in kernels]),
      axis=0)
  weight_absmax = jnp.maximum(weight_absmax, _MIN_SCALE)
  act_absmax = act_absmax.astype(jnp.float32)
  s = jnp.power(act_absmax, alpha) / jnp.power(weight_absmax, 1.0 - alpha)
  return jnp.maximum(s, _MIN_SCALE)


def smoothquant_scales(act_absmax: jax.Array, w: Union[jax.Array, Sequence[jax.Array]],
                       alpha: float = 0.5) -> jax.Array:
  """SmoothQuant's per-input-channel smoothing scales.

  Args:
    act_absmax: float32[in], ``max |x_j|`` over calibration tokens
      (`LayerStats.absmax`).
    w: float[in, out] kernel, or a sequence of kernels sharing the input.
    alpha: migration strength in [0, 1].
  Returns:
    float32[in]: ``max|X_j|^alpha / max_k |W_jk|^(1 - alpha)``, with the weight
    range and the result clipped below at 1e-5.
  Raises:
    ValueError: alpha outside [0, 1], or shapes that disagree.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha!r} must be in [0, 1]")
  kernels = [w] if hasattr(w, "ndim") else list(w)
  if getattr(act_absmax, "ndim", None) != 1:
    raise ValueError(f"act_absmax must be a vector [in]; got shape "
                     f"{tuple(getattr(act_absmax, 'shape', ()))}")
  size = act_absmax.shape[0]
  for i, kernel in enumerate(kernels):
    if getattr(kernel, "ndim", 0) < 2 or kernel.shape[0] != size:
      raise ValueError(f"w[{i}] must be a kernel [{size}, ...] matching act_absmax; got "
                       f"shape {tuple(getattr(kernel, 'shape', ()))}")
  if not kernels:
    raise ValueError("w is empty; pass at least one kernel")
  return _smoothquant_scales(act_absmax, kernels, jnp.float32(alpha))


def smoothquant(w: Union[jax.Array, Sequence[jax.Array]], act_absmax: jax.Array,
                alpha: float = 0.5):
  """SmoothQuant in one call: the smoothed kernel(s) and the scales to fold upstream.

  Args:
    w: float[in, out] kernel, or a sequence of kernels sharing the input.
    act_absmax: float32[in], ``max |x_j|`` (`LayerStats.absmax`).
    alpha: migration strength in [0, 1].
  Returns:
    ``(smoothed, s)``: ``diag(s) w`` (a list when `w` is a sequence) and
    float32[in] `s`; divide the input by `s` with `fold_scales_into_layernorm`,
    `fold_scales_into_linear`, or explicitly, and the float model is unchanged.

  Example:
    >>> (wq, wk, wv), s = jq.ptq.smoothquant([wq, wk, wv], stats["q"].absmax)
    >>> ln_scale, ln_bias = jq.ptq.fold_scales_into_layernorm(ln_scale, ln_bias, s)
  """
  s = smoothquant_scales(act_absmax, w, alpha)
  if hasattr(w, "ndim"):
    return apply_input_scales(w, s), s
  return [apply_input_scales(kernel, s) for kernel in w], s
