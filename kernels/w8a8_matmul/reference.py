"""XLA reference of `w8a8_matmul`; also its fallback where no kernel runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def w8a8_matmul_reference(x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array,
                          w_scale: jax.Array, *, out_dtype: jnp.dtype) -> jax.Array:
  """``(x_codes @ w_codes) * x_scale * w_scale``, accumulated exactly in int32.

  Args:
    x_codes: int8[M, K] activation codes.
    x_scale: float32[M, 1] per-token scales.
    w_codes: int8[K, N] weight codes.
    w_scale: float32[1, N] per-output-channel scales.
    out_dtype: dtype of the result.
  Returns:
    ``out_dtype[M, N]``; the scales are applied in float32, then cast.
  """
  acc = jax.lax.dot_general(x_codes, w_codes, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * x_scale * w_scale).astype(out_dtype)
