"""Pallas Triton kernel of `w8a8_matmul`.

The grid of `jaxquant.kernels._scaled_matmul.scaled_matmul_gpu` with an int32
accumulator in registers; the scales are applied after the K loop.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jaxquant.kernels._scaled_matmul import scaled_matmul_gpu


def _pow2_at_least(n: int, floor: int = 16) -> int:
  return max(floor, 1 << (n - 1).bit_length())


def _epilogue(acc, x_scale, w_scale):
  return acc.astype(jnp.float32) * x_scale * w_scale


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n",
                                             "block_k", "num_warps", "num_stages",
                                             "interpret"))
def w8a8_matmul_gpu(x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array,
                    w_scale: jax.Array, *, out_dtype: jnp.dtype,
                    block_m: Optional[int] = None, block_n: int = 128,
                    block_k: int = 128, num_warps: int = 4, num_stages: int = 3,
                    interpret: Any = False) -> jax.Array:
  """``(x_codes @ w_codes) * x_scale * w_scale`` on a GPU (Triton, int32 accumulator).

  Args:
    x_codes: int8[M, K]; x_scale: float32[M, 1]; w_codes: int8[K, N];
      w_scale: float32[1, N] (as in `w8a8_matmul`).
    out_dtype: dtype of the result.
    block_m: rows per program, a power of two >= 16; default the smallest such
      power >= M, at most 128 (small for decode-sized M).
    block_n: columns per program, a power of two >= 16.
    block_k: contraction per loop step, a power of two >= 16 (128 int8 = 128 bytes).
    num_warps, num_stages: Triton launch and software-pipelining parameters.
    interpret: passed to `pl.pallas_call`.
  Returns:
    ``out_dtype[M, N]``.
  """
  bm = block_m or min(_pow2_at_least(x_codes.shape[0]), 128)
  for name, b in (("block_m", bm), ("block_n", block_n), ("block_k", block_k)):
    if b < 16 or b & (b - 1):
      raise ValueError(f"w8a8_matmul_gpu: {name}={b}; expected a power of two >= 16")
  return scaled_matmul_gpu(x_codes, x_scale, w_codes, w_scale, acc_dtype=jnp.int32,
                           out_dtype=out_dtype, epilogue=_epilogue,
                           blocks=(bm, block_n, block_k), num_warps=num_warps,
                           num_stages=num_stages, interpret=interpret, name="w8a8_matmul")
