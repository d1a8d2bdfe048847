"""Public entry point of the fp8 x fp8 matmul with float32 accumulation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.kernels._common import dispatch
from jaxquant.kernels.fp8_matmul.gpu import fp8_matmul_gpu
from jaxquant.kernels.fp8_matmul.reference import fp8_matmul_reference
from jaxquant.kernels.fp8_matmul.tpu import fp8_matmul_tpu

OP = "fp8_matmul"


def _check(name: str, got, expected: str, ok: bool) -> None:
  if not ok:
    raise ValueError(f"{OP}: {name} is {got}; expected {expected}")


def fp8_matmul(x: jax.Array, x_scale: jax.Array, w: jax.Array,
               w_scale: jax.Array, *, out_dtype=jnp.float32, impl: str = "auto",
               interpret=False) -> jax.Array:
  """``(x @ w) * (x_scale * w_scale)``: fp8 operands, float32 accumulation.

  Args:
    x: float8_e4m3fn[M, K], e.g. activations quantized per token.
    x_scale: float32[M, 1] (per row) or [1, 1] (per tensor).
    w: float8_e4m3fn[K, N], e.g. weights quantized per output channel.
    w_scale: float32[1, N] (per column) or [1, 1] (per tensor).
    out_dtype: dtype of the result.
    impl: "auto" (the TPU or GPU kernel on those platforms, XLA elsewhere),
      "xla" or "pallas"; see `jaxquant.kernels._common.dispatch`.
    interpret: True or `pltpu.InterpretParams()` runs the TPU kernel in the
      Pallas interpreter.
  Returns:
    out_dtype[M, N].
  Raises:
    ValueError: operands of the wrong rank, dtype or shape, or a bad `impl`.
  """
  fp8 = jnp.dtype(jnp.float8_e4m3fn)
  for name, a in (("x", x), ("x_scale", x_scale), ("w", w),
                  ("w_scale", w_scale)):
    _check(f"{name}.ndim", a.ndim, "2", a.ndim == 2)
  for name, a, dtype in (("x", x, fp8), ("w", w, fp8),
                         ("x_scale", x_scale, jnp.dtype(jnp.float32)),
                         ("w_scale", w_scale, jnp.dtype(jnp.float32))):
    _check(f"{name}.dtype", a.dtype, dtype, a.dtype == dtype)
  (m, k), (kw, n) = x.shape, w.shape
  _check("w.shape", w.shape, f"({k}, N) to match x.shape={x.shape}", kw == k)
  _check("x_scale.shape", x_scale.shape, f"({m}, 1) or (1, 1)",
         x_scale.shape in ((m, 1), (1, 1)))
  _check("w_scale.shape", w_scale.shape, f"(1, {n}) or (1, 1)",
         w_scale.shape in ((1, n), (1, 1)))
  return dispatch(
      impl, interpret,
      tpu=functools.partial(fp8_matmul_tpu, out_dtype=out_dtype),
      gpu=functools.partial(fp8_matmul_gpu, out_dtype=out_dtype),
      xla=functools.partial(fp8_matmul_reference, out_dtype=out_dtype),
      op=OP)(x, x_scale, w, w_scale)
