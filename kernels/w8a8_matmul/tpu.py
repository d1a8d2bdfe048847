"""Mosaic TPU kernel of `w8a8_matmul`.

The grid of `jaxquant.kernels._scaled_matmul.scaled_matmul_tpu` with an int32
accumulator: K last and "arbitrary", the scales applied once at the last K step.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxquant.kernels._common import round_up
from jaxquant.kernels._scaled_matmul import scaled_matmul_tpu


def _epilogue(acc, x_scale, w_scale):
  return acc.astype(jnp.float32) * x_scale * w_scale


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n",
                                             "block_k", "interpret"))
def w8a8_matmul_tpu(x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array,
                    w_scale: jax.Array, *, out_dtype: jnp.dtype,
                    block_m: Optional[int] = None, block_n: Optional[int] = None,
                    block_k: Optional[int] = None, interpret: Any = False) -> jax.Array:
  """``(x_codes @ w_codes) * x_scale * w_scale`` on a TPU (int8 MXU, int32 accumulator).

  Args:
    x_codes: int8[M, K]; x_scale: float32[M, 1]; w_codes: int8[K, N];
      w_scale: float32[1, N] (as in `w8a8_matmul`).
    out_dtype: dtype of the result.
    block_m: rows per block, a multiple of 32 (int8 sublane tiling); default
      ``min(round_up(M, 32), 256)``.
    block_n: columns per block, a multiple of 128; default ``min(round_up(N, 128), 512)``.
    block_k: contraction per step, a multiple of 128; default
      ``min(round_up(K, 128), 512)``.
    interpret: passed to `pl.pallas_call` (True or a `pltpu.InterpretParams`).
  Returns:
    ``out_dtype[M, N]``.
  """
  m, k = x_codes.shape
  n = w_codes.shape[1]
  bm = block_m or min(round_up(m, 32), 256)
  bn = block_n or min(round_up(n, 128), 512)
  bk = block_k or min(round_up(k, 128), 512)
  return scaled_matmul_tpu(x_codes, x_scale, w_codes, w_scale, acc_dtype=jnp.int32,
                           out_dtype=out_dtype, epilogue=_epilogue, blocks=(bm, bn, bk),
                           interpret=interpret, name="w8a8_matmul")
