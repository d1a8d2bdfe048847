"""Public entry point of the W8A8 matmul."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.kernels._common import dispatch
from jaxquant.kernels.w8a8_matmul.gpu import w8a8_matmul_gpu
from jaxquant.kernels.w8a8_matmul.reference import w8a8_matmul_reference
from jaxquant.kernels.w8a8_matmul.tpu import w8a8_matmul_tpu


def _check(name: str, x: jax.Array, dtype: jnp.dtype, shape: tuple, expected: str):
  if x.dtype != dtype or x.ndim != len(shape) or any(
      want is not None and got != want for got, want in zip(x.shape, shape)):
    raise ValueError(f"w8a8_matmul: {name} has dtype {x.dtype} and shape {x.shape}; "
                     f"expected {expected}")


def w8a8_matmul(x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array,
                w_scale: jax.Array, *, out_dtype: jnp.dtype = jnp.float32,
                impl: str = "auto", interpret: Any = False) -> jax.Array:
  """Matmul of int8 activations and int8 weights, dequantized per token and channel.

  Computes ``(x_codes @ w_codes) * x_scale * w_scale``: the products are summed
  exactly in int32, the scales applied in float32 and the result cast to `out_dtype`.

  Args:
    x_codes: int8[M, K] activation codes.
    x_scale: float32[M, 1] per-token (row) scales.
    w_codes: int8[K, N] weight codes.
    w_scale: float32[1, N] per-output-channel (column) scales.
    out_dtype: floating dtype of the result.
    impl: "auto" (the Pallas kernel on TPU and CUDA, XLA elsewhere), "xla", or
      "pallas" (the kernel; on a CPU only with `interpret`).
    interpret: falsy, or True / `pltpu.InterpretParams()` to run the TPU kernel in
      the Pallas interpreter on any platform.
  Returns:
    ``out_dtype[M, N]``.
  Raises:
    ValueError: operands of the wrong dtype or shape, a non-floating `out_dtype`,
      or an `impl` that cannot run here.
  """
  _check("x_codes", x_codes, jnp.int8, (None, None), "int8[M, K]")
  m, k = x_codes.shape
  _check("w_codes", w_codes, jnp.int8, (k, None), f"int8[K={k}, N] (K of x_codes)")
  n = w_codes.shape[1]
  _check("x_scale", x_scale, jnp.float32, (m, 1), f"float32[M={m}, 1]")
  _check("w_scale", w_scale, jnp.float32, (1, n), f"float32[1, N={n}]")
  if not jnp.issubdtype(out_dtype, jnp.floating):
    raise ValueError(f"w8a8_matmul: out_dtype={out_dtype!r}; expected a floating dtype")
  return dispatch(
      impl, interpret,
      tpu=functools.partial(w8a8_matmul_tpu, out_dtype=out_dtype),
      gpu=functools.partial(w8a8_matmul_gpu, out_dtype=out_dtype),
      xla=functools.partial(w8a8_matmul_reference, out_dtype=out_dtype),
      op="w8a8_matmul")(x_codes, x_scale, w_codes, w_scale)
