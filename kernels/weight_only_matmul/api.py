"""`weight_only_matmul`: float activations times low-bit weights, dequantized in the kernel."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.kernels._common import dispatch
from jaxquant.kernels.weight_only_matmul.gpu import weight_only_matmul_gpu
from jaxquant.kernels.weight_only_matmul.reference import (FORMATS, PACKED_FORMATS,
                                                           weight_only_matmul_reference)
from jaxquant.kernels.weight_only_matmul.tpu import weight_only_matmul_tpu

_OP = "weight_only_matmul"
_X_DTYPES = (jnp.float32, jnp.bfloat16)
_GROUP_SIZES = (32, 64, 128)


def _check(ok: bool, name: str, value, expected: str):
  if not ok:
    raise ValueError(f"{_OP}: {name}={value}; expected {expected}")


def _validate(x, w_codes, w_scale, fmt, group_size, out_dtype):
  _check(fmt in FORMATS, "fmt", repr(fmt), f"one of {FORMATS}")
  _check(x.ndim == 2 and x.dtype in _X_DTYPES, "x", _typeof(x), "float32 or bfloat16 [M, K]")
  k = x.shape[1]
  packed = fmt in PACKED_FORMATS
  _check(not packed or k % 2 == 0, "x.shape[1]", k, f"an even K for fmt={fmt!r}")
  rows, codes_dtype = (k // 2, "uint8") if packed else (k, "int8")
  _check(w_codes.ndim == 2 and w_codes.dtype == codes_dtype and w_codes.shape[0] == rows,
         "w_codes", _typeof(w_codes), f"{codes_dtype}[{rows}, N] for fmt={fmt!r}, K={k}")
  _check(group_size in _GROUP_SIZES or group_size == k > 0, "group_size", group_size,
         f"one of {_GROUP_SIZES} or K={k} (per channel)")
  _check(k % group_size == 0, "group_size", group_size, f"a divisor of K={k}")
  _check(not packed or group_size == k or rows % group_size == 0, "group_size",
         group_size, f"a divisor of K // 2={rows} (or K) for fmt={fmt!r}")
  scale_shape = (k // group_size, w_codes.shape[1])
  _check(w_scale.dtype == jnp.float32 and w_scale.shape == scale_shape, "w_scale",
         _typeof(w_scale), f"float32{list(scale_shape)}")
  _check(jnp.issubdtype(out_dtype, jnp.floating), "out_dtype", out_dtype.name,
         "a float dtype")


def _typeof(a) -> str:
  return jax.typeof(a).str_short()


def weight_only_matmul(x: jax.Array, w_codes: jax.Array, w_scale: jax.Array, *,
                       fmt: str, group_size: int, out_dtype=None, impl: str = "auto",
                       interpret=False) -> jax.Array:
  """``x @ W`` with ``W[k, n] = decode(code[k, n]) * w_scale[k // group_size, n]``.

  The weight layout is described in the package docstring
  (`jaxquant.kernels.weight_only_matmul`).

  Args:
    x: float32/bfloat16[M, K].
    w_codes: int8[K, N] ("int8") or uint8[K // 2, N], 4-bit codes packed along K
      in halves with `pack_halves` (code ``[r + K // 2, n]`` in the high nibble).
    w_scale: float32[K // group_size, N].
    fmt: "int8", "int4", "nf4" or "fp4_e2m1".
    group_size: 32, 64 or 128 rows of K per scale, or K (per channel); for 4-bit
      formats K // 2 must be a multiple of it (unless per channel).
    out_dtype: result dtype; None for x.dtype.
    impl: "auto", "xla" or "pallas" (see `jaxquant.kernels._common.dispatch`).
    interpret: run the TPU kernel in the Pallas interpreter (True or
      `pltpu.InterpretParams`).
  Returns:
    out_dtype[M, N]: the dequantized weights are cast to x.dtype and the products
    accumulated in float32.
  Raises:
    ValueError: an argument out of range, naming it.
  """
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  _validate(x, w_codes, w_scale, fmt, group_size, out_dtype)
  static = dict(fmt=fmt, group_size=group_size, out_dtype=out_dtype)
  return dispatch(impl, interpret,
                  tpu=functools.partial(weight_only_matmul_tpu, **static),
                  gpu=functools.partial(weight_only_matmul_gpu, **static),
                  xla=functools.partial(weight_only_matmul_reference, **static),
                  op=_OP)(x, w_codes, w_scale)
