"""`QuantSpec`, `quantize`, `dequantize` and `fake_quant`.

Granularity. Every axis of the input is one of three kinds:

* a *channel* axis (in ``channel_axes``) keeps one scale per index;
* a *blocked* axis (in ``block_sizes``) is split into blocks, one scale per block;
* any other axis shares its scale.

So per-tensor is ``QuantSpec(fmt)``, per-output-channel of a Dense kernel
``[in, out]`` is ``channel_axes=(1,)``, per-group of 128 along its input axis is
``channel_axes=(1,), block_sizes={0: 128}``, 2-D blocks are
``block_sizes={0: 128, 1: 128}``, and per-token activations ``[tokens, d]`` are
``channel_axes=(0,)``.

Scales. A calibration picks a clipping range per scale group (``absmax``: the
largest magnitude; ``absmean``: the mean magnitude, BitNet b1.58's choice and the
default for binary and ternary; ``percentile:P``: the P-th percentile of the
magnitudes; ``mse`` or ``mse:N``: the one of N clipping ratios in [0.3, 1] of the
absmax with the lowest squared error). Symmetric quantization maps that range to
``±format.max``: int8 -> ±127, int4 -> ±7 (``full_range=True`` maps -range to the
most negative code instead, int4 -> -8..7, and lets +range saturate to 7).
Asymmetric quantization (``symmetric=False``, integer formats only) maps
``[min(x, 0), max(x, 0)]`` onto ``[format.min, format.max]`` with an integer zero
point, so 0 is exact.

Scale dtypes. ``float32``, ``bfloat16`` and ``float16`` round the scale to that
dtype; ``fp8_e4m3`` too (clamped to its normal range). ``e8m0`` keeps powers of
two: for float element formats it follows the OCP Microscaling rule
``2^(floor(log2(amax)) - emax)`` (elements beyond the element max saturate), for
other formats it takes the smallest power of two >= ``amax / format.max``.
Codes are always computed with the rounded scale, so dequantization matches.
``tensor_scale=True`` adds a float32 per-tensor scale under the block scales,
``amax / (format.max * scale_max)``, as NVFP4 does with fp8_e4m3 block scales.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxquant import formats as formats_lib
from jaxquant.qarray import QArray

_SCALE_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp8_e4m3": jnp.float8_e4m3fn,
    "e8m0": jnp.float8_e8m0fnu,
}
_MSE_DEFAULT_STEPS = 32
_MSE_MIN_RATIO = 0.3


def _scale_dtype_name(scale_dtype) -> str:
  if isinstance(scale_dtype, str) and scale_dtype in _SCALE_DTYPES:
    return scale_dtype
  try:
    name = jnp.dtype(scale_dtype).name
  except TypeError:
    name = None
  aliases = {"float8_e4m3fn": "fp8_e4m3", "float8_e8m0fnu": "e8m0"}
  name = aliases.get(name, name)
  if name not in _SCALE_DTYPES:
    raise ValueError(f"scale_dtype={scale_dtype!r} is not supported; expected one of "
                     f"{', '.join(_SCALE_DTYPES)}")
  return name


def _parse_calibration(calibration: str) -> tuple[str, Optional[float]]:
  """'absmax' -> ('absmax', None); 'percentile:99.9' -> ('percentile', 99.9)."""
  method, _, arg = calibration.partition(":")
  if method in ("absmax", "absmean") and not arg:
    return method, None
  if method == "percentile":
    try:
      value = float(arg)
    except ValueError:
      value = -1.0
    if 0 < value <= 100:
      return method, value
  if method == "mse":
    if not arg:
      return method, float(_MSE_DEFAULT_STEPS)
    if arg.isdigit() and int(arg) >= 1:
      return method, float(arg)
  raise ValueError(
      f"calibration={calibration!r} is not understood; expected 'absmax', "
      "'absmean', 'percentile:P' with 0 < P <= 100, or 'mse' / 'mse:N'")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize an array: format, granularity, calibration and scale dtype.

  Frozen and hashable, so it can be a static argument of `jax.jit`.

  Attributes:
    format: a format name (see `jaxquant.list_formats`) or a `Format`.
    channel_axes: axes that keep one scale per index (negative axes allowed).
    block_sizes: ``{axis: block}``; the axis is split into blocks of that size,
      one scale each. Given as a dict, stored as sorted ``((axis, block), ...)``.
    symmetric: False for an integer zero point (int/uint formats only).
    calibration: ``"absmax"``, ``"absmean"``, ``"percentile:P"``, ``"mse"``,
      ``"mse:N"``; None picks ``"absmean"`` for binary/ternary, else ``"absmax"``.
    scale_dtype: ``jnp.float32``, ``jnp.bfloat16``, ``jnp.float16``,
      ``"fp8_e4m3"`` or ``"e8m0"``; stored as a name.
    full_range: symmetric integer formats use the most negative code too.
    tensor_scale: add a float32 per-tensor scale under the block scales (NVFP4).
    rounding: ``"nearest"`` or ``"stochastic"`` (then `quantize` needs a key).
  """

  format: Union[str, formats_lib.Format]
  channel_axes: tuple[int, ...] = ()
  block_sizes: Union[Mapping[int, int], tuple[tuple[int, int], ...]] = ()
  symmetric: bool = True
  calibration: Optional[str] = None
  scale_dtype: Any = "float32"
  full_range: bool = False
  tensor_scale: bool = False
  rounding: str = "nearest"

  def __post_init__(self):
    fmt = formats_lib.get_format(self.format)
    if fmt.kind == "scale":
      raise ValueError(f"format={fmt.name!r} is a scale format; use it as "
                       "scale_dtype='e8m0'")
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("format", fmt)
    set_("channel_axes", tuple(int(a) for a in self.channel_axes))
    blocks = self.block_sizes
    blocks = blocks.items() if isinstance(blocks, Mapping) else blocks
    blocks = tuple(sorted((int(a), int(b)) for a, b in blocks))
    for axis, block in blocks:
      if block < 1:
        raise ValueError(f"block_sizes={dict(blocks)} has block {block} for axis "
                         f"{axis}; blocks must be >= 1")
    set_("block_sizes", blocks)
    if self.calibration is None:
      default = "absmean" if fmt.name in ("binary", "ternary") else "absmax"
      set_("calibration", default)
    _parse_calibration(self.calibration)
    set_("scale_dtype", _scale_dtype_name(self.scale_dtype))
    if not self.symmetric and fmt.kind not in ("int", "uint"):
      raise ValueError(f"symmetric=False needs an integer format; {fmt.name!r} is "
                       f"a {fmt.kind} format")
    if not self.symmetric and fmt.name == "ternary":
      raise ValueError("symmetric=False is not defined for format='ternary'")
    if self.rounding not in ("nearest", "stochastic"):
      raise ValueError(f"rounding={self.rounding!r}; expected 'nearest' or 'stochastic'")

  @property
  def block_size_dict(self) -> dict[int, int]:
    return dict(self.block_sizes)

  def resolve(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], dict[int, int]]:
    """Non-negative channel axes and block sizes for an array of `shape`.

    Raises:
      ValueError: an axis out of range, an axis both channel and blocked, or a
        block that does not divide its axis.
    """
    ndim = len(shape)

    def norm(axis, what):
      if not -ndim <= axis < ndim:
        raise ValueError(f"{what} names axis {axis}, out of range for an array of "
                         f"shape {tuple(shape)}")
      return axis % ndim

    channel = tuple(sorted({norm(a, f"channel_axes={self.channel_axes}")
                            for a in self.channel_axes}))
    blocks = {}
    for axis, block in self.block_sizes:
      a = norm(axis, f"block_sizes={self.block_size_dict}")
      if a in channel:
        raise ValueError(f"axis {a} is both in channel_axes={self.channel_axes} and "
                         f"block_sizes={self.block_size_dict}")
      if shape[a] % block:
        raise ValueError(f"block_sizes={self.block_size_dict} does not divide axis "
                         f"{a} (size {shape[a]}) of an array of shape {tuple(shape)}")
      blocks[a] = block
    return channel, blocks

  def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scale array for an input of `shape` (same rank)."""
    channel, blocks = self.resolve(shape)
    return tuple(n // blocks[a] if a in blocks else n if a in channel else 1
                 for a, n in enumerate(shape))

  def replace(self, **changes) -> "QuantSpec":
    return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------
# Blocked views: x[*shape] <-> xb[*blocked_shape], scales broadcast against xb.


def _blocked_layout(shape, channel, blocks):
  """Blocked shape, the axes of it that are reduced, and the keepdims stat shape."""
  blocked_shape, reduce_axes, stat_shape = [], [], []
  for a, n in enumerate(shape):
    if a in blocks:
      blocked_shape += [n // blocks[a], blocks[a]]
      stat_shape += [n // blocks[a], 1]
      reduce_axes.append(len(blocked_shape) - 1)
    elif a in channel:
      blocked_shape.append(n)
      stat_shape.append(n)
    else:
      blocked_shape.append(n)
      stat_shape.append(1)
      reduce_axes.append(len(blocked_shape) - 1)
  return tuple(blocked_shape), tuple(reduce_axes), tuple(stat_shape)


def _quantile(x, q, axes):
  """q-quantile of x over `axes`, keepdims (moves the axes last and flattens)."""
  kept = [a for a in range(x.ndim) if a not in axes]
  moved = jnp.transpose(x, kept + list(axes))
  flat = moved.reshape(*moved.shape[: len(kept)], -1)
  result = jnp.quantile(flat, q, axis=-1, keepdims=True)
  stat_shape = tuple(1 if a in axes else x.shape[a] for a in range(x.ndim))
  return result.reshape(stat_shape)


def _range_stats(spec, xb, axes):
  """(lo, hi) clipping range per scale group (lo = -hi when symmetric)."""
  method, arg = _parse_calibration(spec.calibration)
  if spec.symmetric:
    if method == "absmean":
      hi = jnp.mean(jnp.abs(xb), axis=axes, keepdims=True)
    elif method == "percentile":
      hi = _quantile(jnp.abs(xb), arg / 100, axes)
    else:  # absmax, and the starting point of mse
      hi = jnp.max(jnp.abs(xb), axis=axes, keepdims=True)
    return -hi, hi
  if method == "percentile":
    lo, hi = _quantile(xb, 1 - arg / 100, axes), _quantile(xb, arg / 100, axes)
  elif method == "absmean":
    hi = jnp.mean(jnp.abs(xb), axis=axes, keepdims=True)
    lo = -hi
  else:
    lo, hi = jnp.min(xb, axis=axes, keepdims=True), jnp.max(xb, axis=axes, keepdims=True)
  return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)


def _e8m0_from_exponent(exponent):
  """float8_e8m0fnu 2**exponent, built from its bits (no float32 subnormals)."""
  biased = (jnp.clip(exponent, -127, 127) + 127).astype(jnp.uint8)
  return jax.lax.bitcast_convert_type(biased, jnp.float8_e8m0fnu)


def _pow2_scale(fmt, amax):
  """e8m0 scale: OCP MX rule for float elements, else the next power of two up.

  A group of zeros gets the smallest scale, 2^-127.
  """
  if fmt.kind != "float":
    return _next_pow2_scale(amax / fmt.max)
  _, exp = jnp.frexp(jnp.where(amax > 0, amax, 1.0))
  exponent = exp - 1 - fmt.emax  # floor(log2(amax)) - emax_elem
  return _e8m0_from_exponent(jnp.where(amax > 0, exponent, -127).astype(jnp.int32))


def _next_pow2_scale(raw):
  """e8m0 scale: the smallest power of two >= raw (2^-127 for raw == 0)."""
  exponent = jnp.ceil(jnp.log2(jnp.where(raw > 0, raw, 1.0)))
  return _e8m0_from_exponent(jnp.where(raw > 0, exponent, -127).astype(jnp.int32))


def _round_scale(spec, raw):
  """Scale to the spec's scale dtype; raw is float32, >= 0.

  A group of zeros (raw == 0) keeps scale 0, so it dequantizes to exact zeros
  whatever the format's grid (even one without 0). Other scales are clamped to
  the scale dtype's normal range, so they never round to 0 or inf.
  """
  dtype = _SCALE_DTYPES[spec.scale_dtype]
  if spec.scale_dtype != "float32":
    info = ml_dtypes.finfo(dtype)
    raw = jnp.where(raw > 0, jnp.clip(raw, float(info.tiny), float(info.max)), 0.0)
  return raw.astype(dtype)


def _tensor_scale(spec, amax):
  """float32[] per-tensor scale putting block scales in the scale dtype's range."""
  scale_max = float(ml_dtypes.finfo(_SCALE_DTYPES[spec.scale_dtype]).max)
  ts = jnp.max(amax) / (spec.format.max * scale_max)
  return jnp.where(ts > 0, ts, 1.0).astype(jnp.float32)


def _symmetric_divisor(spec):
  fmt = spec.format
  return -fmt.min if (spec.full_range and fmt.kind == "int") else fmt.max


def _scales(spec, lo, hi, tensor_scale):
  """(stored scale, zero point or None) for a clipping range [lo, hi]."""
  fmt = spec.format
  if spec.symmetric:
    amax = hi
    if spec.scale_dtype == "e8m0" and tensor_scale is None:
      return _pow2_scale(fmt, amax), None
    raw = amax / _symmetric_divisor(spec)
    if tensor_scale is not None:
      raw = raw / tensor_scale
    return _round_scale(spec, raw), None
  raw = (hi - lo) / (fmt.max - fmt.min)
  if spec.scale_dtype == "e8m0":
    scale = _next_pow2_scale(raw)
  else:
    scale = _round_scale(spec, raw)
  scale_f32 = scale.astype(jnp.float32)
  zero_point = jnp.clip(jnp.round(fmt.min - lo / scale_f32), fmt.min, fmt.max)
  return scale, zero_point.astype(fmt.code_dtype)


def _effective_scale(scale, tensor_scale):
  scale = scale.astype(jnp.float32)
  return scale if tensor_scale is None else scale * tensor_scale


def _encode(spec, xb, scale, zero_point, tensor_scale, key):
  scale_f32 = _effective_scale(scale, tensor_scale)
  safe = jnp.where(scale_f32 > 0, scale_f32, 1.0)
  y = xb / safe
  if zero_point is not None:
    y = jnp.round(y) + zero_point.astype(jnp.float32)
  if spec.rounding == "stochastic":
    return formats_lib.stochastic_encode(spec.format, y, key)
  return formats_lib.encode(spec.format, y)


def _decode(spec, codes_b, scale, zero_point, tensor_scale):
  values = formats_lib.decode(spec.format, codes_b)
  if zero_point is not None:
    values = values - zero_point.astype(jnp.float32)
  return values * _effective_scale(scale, tensor_scale)


def _mse_range(spec, xb, axes, lo, hi, tensor_scale):
  """The clipping ratio (of N in [0.3, 1]) with the lowest squared error, per group."""
  steps = int(_parse_calibration(spec.calibration)[1])
  # A numpy constant: jnp.linspace differs in the last bit between eager and jit.
  ratios = jnp.asarray(np.linspace(1.0, _MSE_MIN_RATIO, steps, dtype=np.float32))

  def error_at(ratio):
    scale, zp = _scales(spec, lo * ratio, hi * ratio, tensor_scale)
    codes = _encode(spec.replace(rounding="nearest"), xb, scale, zp, tensor_scale, None)
    err = _decode(spec, codes, scale, zp, tensor_scale) - xb
    return jnp.sum(err * err, axis=axes, keepdims=True)

  def body(i, carry):
    best_err, best_ratio = carry
    err = error_at(ratios[i])
    better = err < best_err
    return jnp.where(better, err, best_err), jnp.where(better, ratios[i], best_ratio)

  init = (error_at(ratios[0]), jnp.ones_like(hi))
  _, best_ratio = jax.lax.fori_loop(1, steps, body, init)
  return lo * best_ratio, hi * best_ratio


# ----------------------------------------------------------------------------
# Public functions.


def _check_input(x, spec) -> QuantSpec:
  if isinstance(spec, (str, formats_lib.Format)):
    spec = QuantSpec(spec)
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"spec must be a QuantSpec, a format name or a Format; got "
                    f"{type(spec).__name__}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f"quantize expects a floating-point array; got dtype "
                    f"{jnp.result_type(x)}")
  return spec


def quantize(x: jax.Array, spec: "QuantSpec | str", *, key: Optional[jax.Array] = None
             ) -> QArray:
  """Quantizes `x` to a `QArray` as described by `spec`.

  Args:
    x: float32/bfloat16/float16[*shape].
    spec: a `QuantSpec`, or a format name for per-tensor absmax.
    key: PRNG key, required when ``spec.rounding == "stochastic"``.
  Returns:
    QArray with codes[*shape] and scale[spec.scale_shape(shape)].
  Raises:
    ValueError: axes out of range, blocks that do not divide their axis, or a
      missing key for stochastic rounding.
    TypeError: `x` is not floating point.

  Example:
    >>> spec = jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 128})
    >>> q = jq.quantize(w, spec)  # w: float32[1024, 512]
    >>> q.scale.shape
    (8, 512)
  """
  spec = _check_input(x, spec)
  if spec.rounding == "stochastic" and key is None:
    raise ValueError("spec.rounding='stochastic' needs a PRNG key: quantize(x, spec, key=...)")
  x = jnp.asarray(x)
  channel, blocks = spec.resolve(x.shape)
  blocked_shape, axes, stat_shape = _blocked_layout(x.shape, channel, blocks)
  xb = x.astype(jnp.float32).reshape(blocked_shape)
  lo, hi = _range_stats(spec, xb, axes)
  amax = jnp.maximum(-lo, hi)
  tensor_scale = _tensor_scale(spec, amax) if spec.tensor_scale else None
  if spec.calibration.startswith("mse"):
    lo, hi = _mse_range(spec, xb, axes, lo, hi, tensor_scale)
  scale, zero_point = _scales(spec, lo, hi, tensor_scale)
  codes = _encode(spec, xb, scale, zero_point, tensor_scale, key)
  compact = spec.scale_shape(x.shape)
  return QArray(
      codes=codes.reshape(x.shape),
      scale=scale.reshape(compact),
      zero_point=None if zero_point is None else zero_point.reshape(compact),
      tensor_scale=tensor_scale,
      spec=spec,
      dtype=x.dtype,
  )


def dequantize(q: QArray, dtype=None) -> jax.Array:
  """The float array a `QArray` stands for: ``(decode(codes) - zero_point) * scale``.

  Args:
    q: a QArray.
    dtype: result dtype; defaults to the dtype `q` was quantized from.
  Returns:
    [*q.shape] array of `dtype`, computed in float32 and cast once.
  """
  if not isinstance(q, QArray):
    raise TypeError(f"dequantize expects a QArray; got {type(q).__name__}")
  spec = q.spec
  channel, blocks = spec.resolve(q.shape)
  blocked_shape, _, stat_shape = _blocked_layout(q.shape, channel, blocks)
  zero_point = None if q.zero_point is None else q.zero_point.reshape(stat_shape)
  values = _decode(spec, q.codes.reshape(blocked_shape), q.scale.reshape(stat_shape),
                   zero_point, q.tensor_scale)
  return values.reshape(q.shape).astype(dtype or q.dtype)


def expand_groups(values: jax.Array, spec: QuantSpec, shape: tuple[int, ...]) -> jax.Array:
  """Broadcasts per-group `values` (shape ``spec.scale_shape(shape)``) to `shape`.

  Every element gets the value of its scale group (channel, block or tensor).
  """
  channel, blocks = spec.resolve(shape)
  blocked_shape, _, stat_shape = _blocked_layout(shape, channel, blocks)
  expanded = jnp.broadcast_to(values.reshape(stat_shape), blocked_shape)
  return expanded.reshape(shape)


def group_sum(values: jax.Array, spec: QuantSpec) -> jax.Array:
  """Sums `values` over each scale group -> shape ``spec.scale_shape(values.shape)``.

  The adjoint of `expand_groups`: reduces over blocks and shared axes.
  """
  shape = tuple(values.shape)
  channel, blocks = spec.resolve(shape)
  blocked_shape, axes, _ = _blocked_layout(shape, channel, blocks)
  summed = jnp.sum(values.reshape(blocked_shape), axis=axes)
  return summed.reshape(spec.scale_shape(shape))


def clip_range(q: QArray) -> tuple[jax.Array, jax.Array]:
  """float32 (lo, hi)[*q.shape]: the range each element can represent unclipped.

  ``lo = (format.min - zero_point) * scale`` and ``hi = (format.max - zero_point) *
  scale`` per element; inputs outside it saturate. Used to mask straight-through
  gradients.
  """
  fmt = q.format
  scale = _effective_scale(q.scale, q.tensor_scale)
  zero_point = 0.0 if q.zero_point is None else q.zero_point.astype(jnp.float32)
  lo = (fmt.min - zero_point) * scale
  hi = (fmt.max - zero_point) * scale
  return (expand_groups(lo, q.spec, q.shape), expand_groups(hi, q.spec, q.shape))


@jax.custom_jvp
def straight_through(x: jax.Array, x_quantized: jax.Array) -> jax.Array:
  """`x_quantized` in the forward pass (exactly, no ``x + (q - x)`` rounding
  error); the tangent of `x` (same shape) in the backward pass."""
  del x
  return x_quantized


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
  _, x_quantized = primals
  x_dot, _ = tangents
  return x_quantized, x_dot


def fake_quant(x: jax.Array, spec: "QuantSpec | str", *, key: Optional[jax.Array] = None
               ) -> jax.Array:
  """``dequantize(quantize(x, spec))`` with a straight-through (identity) gradient.

  Args:
    x: float[*shape].
    spec: as for `quantize`.
    key: PRNG key for stochastic rounding.
  Returns:
    float[*shape] of x's dtype. Its gradient with respect to `x` is the identity;
    see `jaxquant.qat` for clipped and learned-scale variants.
  """
  quantized = dequantize(quantize(jax.lax.stop_gradient(x), spec, key=key))
  return straight_through(x, quantized)
