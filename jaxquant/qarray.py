"""`QArray`, the quantized array pytree, and sub-byte packing of codes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_dtypes

from jaxquant import formats as formats_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized array: ``dequantize(q) = (decode(codes) - zero_point) * scale``.

  Arrays are pytree children, so a QArray passes through `jit`, `vmap`,
  `tree_map` and sharding like any array; `spec` and `dtype` are static.

  Attributes:
    codes: [*shape] codes in ``spec.format.code_dtype`` (unpacked).
    scale: one scale per channel/block; same rank as `codes`, each axis of size
      1 (shared), ``shape[a]`` (channel axis) or ``shape[a] // block`` (blocked).
      Stored in ``spec.scale_dtype`` (float32, bfloat16, e8m0 or fp8_e4m3).
    zero_point: like `scale`, in the code dtype; None when symmetric.
    tensor_scale: float32[] second-level scale (NVFP4); None when unused.
    spec: the normalized `QuantSpec` that produced this array (static).
    dtype: dtype of the original array, returned by `dequantize` (static).
  """

  codes: jax.Array
  scale: jax.Array
  zero_point: Optional[jax.Array] = None
  tensor_scale: Optional[jax.Array] = None
  spec: Any = dataclasses.field(default=None, metadata=dict(static=True))
  dtype: Any = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def format(self) -> formats_lib.Format:
    return self.spec.format

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def ndim(self) -> int:
    return len(self.codes.shape)

  @property
  def size(self) -> int:
    return math.prod(self.codes.shape)

  @property
  def nbytes(self) -> int:
    """Storage bytes with codes packed at `format.bits` each, plus scales."""
    total = packed_nbytes(self.size, self.format.bits)
    total += _array_nbytes(self.scale)
    if self.zero_point is not None:
      total += packed_nbytes(math.prod(self.zero_point.shape), self.format.bits)
    if self.tensor_scale is not None:
      total += _array_nbytes(self.tensor_scale)
    return total

  def __repr__(self):
    return (f"QArray(shape={self.shape}, format={self.format.name}, "
            f"dtype={jnp.dtype(self.dtype).name}, scale_shape={tuple(self.scale.shape)})")


def _array_nbytes(x) -> int:
  return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def packed_nbytes(size: int, bits: int) -> int:
  """Bytes taken by `size` codes of `bits` bits, packed densely."""
  return -(-size * bits // 8)


def _group_size(bits: int) -> int:
  """Codes per group of whole bytes: a group of g codes fills g * bits / 8 bytes."""
  return 8 // math.gcd(bits, 8)


def _dtype_bits(dtype) -> int:
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return ml_dtypes.finfo(dtype).bits
  return jnp.iinfo(dtype).bits


def _as_unsigned(dtype):
  """The unsigned integer dtype of the same bit width as float `dtype`."""
  return {4: jnp.uint4, 8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[_dtype_bits(dtype)]


def to_bit_patterns(codes: jax.Array, bits: int) -> jax.Array:
  """Codes (int, uint or float code dtypes) -> uint32 holding their low `bits`."""
  if jnp.issubdtype(codes.dtype, jnp.floating):
    codes = jax.lax.bitcast_convert_type(codes, _as_unsigned(codes.dtype))
  mask = (1 << bits) - 1
  return codes.astype(jnp.int32).astype(jnp.uint32) & mask


def _bits_of(x: jax.Array, width: int) -> jax.Array:
  """uint32[...] -> uint32[..., width], its low `width` bits, least significant first."""
  shifts = jnp.arange(width, dtype=jnp.uint32).reshape((1,) * x.ndim + (width,))
  return (x[..., None] >> shifts) & 1


def _from_bits(bit_stream: jax.Array, width: int) -> jax.Array:
  """Inverse of `_bits_of`: uint32[..., width] bits -> uint32[...]."""
  shifts = jnp.arange(width, dtype=jnp.uint32).reshape((1,) * (bit_stream.ndim - 1) + (width,))
  return jnp.sum(bit_stream << shifts, axis=-1, dtype=jnp.uint32)


def pack_codes(codes: jax.Array, bits: int, axis: int = -1) -> jax.Array:
  """Packs codes of `bits` bits densely into uint8 words along `axis`.

  Bit order is little-endian: code ``i`` of a group occupies bits
  ``[i * bits, (i + 1) * bits)`` of the group's bit string, and byte ``j`` holds
  bits ``[8j, 8j + 8)``. For 4-bit codes this is the usual layout (code 2k in the
  low nibble of byte k, code 2k + 1 in the high nibble); 2-bit codes go four to a
  byte; 6-bit codes go four to three bytes.

  Args:
    codes: [..., n, ...] codes in any integer or float code dtype.
    bits: bits per code, 1..8.
    axis: the axis to pack along; its length must be a multiple of
      ``8 // gcd(bits, 8)``.
  Returns:
    uint8[..., n * bits // 8, ...].
  Raises:
    ValueError: bad `bits` or an axis length that does not divide into groups.
  """
  if not 1 <= bits <= 8:
    raise ValueError(f"bits={bits} must be between 1 and 8")
  axis = axis % codes.ndim
  group = _group_size(bits)
  n = codes.shape[axis]
  if n % group:
    raise ValueError(f"axis {axis} has length {n}, which is not a multiple of "
                     f"{group} ({bits}-bit codes pack {group} to {group * bits // 8} bytes)")
  patterns = to_bit_patterns(codes, bits)
  if bits == 8:
    return patterns.astype(jnp.uint8)
  x = jnp.moveaxis(patterns, axis, -1)
  lead = x.shape[:-1]
  x = x.reshape(*lead, n // group, group)
  bit_stream = _bits_of(x, bits)  # [..., groups, group, bits]
  bit_stream = bit_stream.reshape(*lead, n // group, group * bits // 8, 8)
  words = _from_bits(bit_stream, 8).astype(jnp.uint8)
  words = words.reshape(*lead, n * bits // 8)
  return jnp.moveaxis(words, -1, axis)


def unpack_codes(words: jax.Array, bits: int, dtype, axis: int = -1) -> jax.Array:
  """Inverse of `pack_codes`: uint8 words -> codes of `dtype`.

  Args:
    words: uint8[..., m, ...] as written by `pack_codes`.
    bits: bits per code.
    dtype: code dtype to return (e.g. ``jnp.int4``, ``jnp.float4_e2m1fn``).
    axis: the packed axis.
  Returns:
    [..., m * 8 // bits, ...] codes of `dtype`; signed integer codes are sign-extended.
  """
  if not 1 <= bits <= 8:
    raise ValueError(f"bits={bits} must be between 1 and 8")
  dtype = jnp.dtype(dtype)
  axis = axis % words.ndim
  x = jnp.moveaxis(words.astype(jnp.uint32), axis, -1)
  lead, m = x.shape[:-1], x.shape[-1]
  group = _group_size(bits)
  if m % (group * bits // 8):
    raise ValueError(f"axis {axis} has {m} bytes, not a whole number of "
                     f"{group * bits // 8}-byte groups of {bits}-bit codes")
  n = m * 8 // bits
  if bits == 8:
    patterns = x
  else:
    bit_stream = _bits_of(x, 8).reshape(*lead, n, bits)
    patterns = _from_bits(bit_stream, bits)
  patterns = jnp.moveaxis(patterns, -1, axis)
  return from_bit_patterns(patterns, bits, dtype)


def from_bit_patterns(patterns: jax.Array, bits: int, dtype) -> jax.Array:
  """uint32 bit patterns (low `bits` used) -> codes of `dtype`."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    unsigned = _as_unsigned(dtype)
    return jax.lax.bitcast_convert_type(patterns.astype(unsigned), dtype)
  if jnp.issubdtype(dtype, jnp.signedinteger):
    signed = patterns.astype(jnp.int32)
    signed = jnp.where(signed >= (1 << (bits - 1)), signed - (1 << bits), signed)
    return signed.astype(dtype)
  return patterns.astype(dtype)
