"""Packing, gather-free decoding, padding and the XLA reference of `weight_only_matmul`.

The weight layout is in the package docstring: int8[K, N] codes, or 4-bit codes
packed along K in halves, uint8[K // 2, N] (`pack_halves`), with float32 scales
[K // group_size, N].

`decode_codes` is what the reference and both kernels use to turn integer codes
into float32 grid values: arithmetic for int4, a tree of selects over the 16
table entries for nf4 and fp4_e2m1 (no gathers, which Mosaic and Triton handle
poorly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import formats
from jaxquant.kernels._common import pad_to, round_up

FORMATS = ("int8", "int4", "nf4", "fp4_e2m1")
PACKED_FORMATS = FORMATS[1:]  # 4-bit codes, two per byte


def _table(fmt: str) -> np.ndarray:
  """float32[16]: the value of each 4-bit code of a codebook or float format."""
  f = formats.get_format(fmt)
  if f.kind == "codebook":
    return np.asarray(f.table, np.float32)
  return np.arange(16, dtype=np.uint8).view(f.ml_dtype).astype(np.float32)


def decode_codes(fmt: str, codes: jax.Array) -> jax.Array:
  """float32 grid values of integer `codes` (int8 codes, or 4-bit codes 0..15)."""
  codes = codes.astype(jnp.int32)
  if fmt == "int8":
    return codes.astype(jnp.float32)
  if fmt == "int4":  # two's complement nibble
    return ((codes ^ 8) - 8).astype(jnp.float32)
  return formats.select_lookup(_table(fmt), codes)


def pack_halves(codes: jax.Array) -> jax.Array:
  """Packs 4-bit codes along K in halves.

  Args:
    codes: uint8[K, N] holding values 0..15; K even.
  Returns:
    uint8[K // 2, N]: byte ``[r, n]`` is ``codes[r, n] | codes[r + K // 2, n] << 4``.
  """
  if codes.ndim != 2 or codes.shape[0] % 2:
    raise ValueError(f"codes.shape={codes.shape}; expected [K, N] with K even")
  half = codes.shape[0] // 2
  return (codes[:half] & 0xF) | (codes[half:] << 4)


def unpack_halves(packed: jax.Array) -> jax.Array:
  """Inverse of `pack_halves`: uint8[K // 2, N] -> uint8[K, N] of values 0..15."""
  return jnp.concatenate([packed & 0xF, packed >> 4], axis=0)


def dequantize(w_codes: jax.Array, w_scale: jax.Array, *, fmt: str,
               group_size: int) -> jax.Array:
  """float32[K, N] weights: ``decode(code[k, n]) * w_scale[k // group_size, n]``."""
  codes = unpack_halves(w_codes) if fmt in PACKED_FORMATS else w_codes
  values = decode_codes(fmt, codes)
  return values * jnp.repeat(w_scale, group_size, axis=0)


def weight_only_matmul_reference(x: jax.Array, w_codes: jax.Array, w_scale: jax.Array, *,
                                 fmt: str, group_size: int, out_dtype=None) -> jax.Array:
  """``x @ W`` with W dequantized in float32 then cast to x.dtype (the XLA fallback).

  Args:
    x: float32/bfloat16[M, K].
    w_codes: int8[K, N] ("int8") or uint8[K // 2, N] packed with `pack_halves`.
    w_scale: float32[K // group_size, N].
    fmt: one of `FORMATS`.
    group_size: rows of K sharing a scale.
    out_dtype: result dtype; None for x.dtype.
  Returns:
    out_dtype[M, N], accumulated in float32.
  """
  w = dequantize(w_codes, w_scale, fmt=fmt, group_size=group_size).astype(x.dtype)
  out = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
  return out.astype(out_dtype or x.dtype)


def pad_operands(x: jax.Array, w_codes: jax.Array, w_scale: jax.Array, *, fmt: str,
                 group_size: int, block_m: int, block_n: int, block_k: int):
  """Zero-pads the operands to whole blocks, one K segment at a time.

  A segment is the part of K one row of `w_codes` spans: all of K for int8, each
  half for the packed formats. Padded x columns are 0, so padded codes and scales
  add nothing. Per-channel scales become one group per padded segment.

  Args:
    x, w_codes, w_scale: as in `weight_only_matmul_reference`.
    block_m, block_n, block_k: block sizes; block_k (rows of `w_codes`) and the
      group size must divide one another.
  Returns:
    ``(x, w_codes, w_scale, group)``: x[Mp, S * Kp] (segment s in columns
    ``[s * Kp, (s + 1) * Kp)``), w_codes[Kp, Np], float32 w_scale[S * Kp // group,
    Np] (segment s from row ``s * Kp // group``) and the group size of the result.
  """
  segments = 2 if fmt in PACKED_FORMATS else 1
  (m, k), (k_seg, n) = x.shape, w_codes.shape
  k_pad = round_up(k_seg, block_k)
  if group_size == k:  # per channel
    scale, group = jnp.broadcast_to(w_scale, (segments, 1, n)), k_pad
  else:
    scale = pad_to(w_scale.reshape(segments, k_seg // group_size, n),
                   (1, k_pad // group_size, 1))
    group = group_size
  scale = pad_to(scale, (1, 1, block_n))
  x = pad_to(x.reshape(m, segments, k_seg), (block_m, 1, block_k))
  return (x.reshape(x.shape[0], segments * k_pad), pad_to(w_codes, (block_k, block_n)),
          scale.reshape(-1, scale.shape[-1]), group)
