"""XLA reference of `fp8_matmul`: the definition the kernels are tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fp8_matmul_reference(x: jax.Array, x_scale: jax.Array, w: jax.Array,
                         w_scale: jax.Array, *, out_dtype) -> jax.Array:
  """``(x @ w) * (x_scale * w_scale)`` with exact products and float32 sums.

  Also the XLA fallback of `fp8_matmul`. The operands are upcast to float32
  before the dot (XLA:CPU has no native fp8 dot); every float8_e4m3fn value and
  every product of two of them is exact in float32, so only the accumulation
  rounds.

  Args:
    x: float8_e4m3fn[M, K].
    x_scale: float32[M, 1] (per row) or [1, 1] (per tensor).
    w: float8_e4m3fn[K, N].
    w_scale: float32[1, N] (per column) or [1, 1] (per tensor).
    out_dtype: dtype of the result.
  Returns:
    out_dtype[M, N].
  """
  acc = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32),
                preferred_element_type=jnp.float32)
  return (acc * (x_scale * w_scale)).astype(out_dtype)
