"""Pallas Triton (GPU) kernel of `fp8_matmul`.

Grid (M / block_m, N / block_n); each program walks K in `block_k` steps with
`jax.lax.fori_loop`, feeding the fp8 tiles straight to `tl.dot` (H100 tensor
cores take float8_e4m3fn) with a float32 accumulator, and scales once at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxquant.kernels._scaled_matmul import scaled_matmul_gpu


def _epilogue(acc, x_scale, w_scale):
  return acc * (x_scale * w_scale)


def _fit(block: int, n: int) -> int:
  """`block`, cut to `n` rounded up to a power of two (at least 16)."""
  return min(block, max(16, pl.next_power_of_2(n)))


@functools.partial(jax.jit, static_argnames=(
    "out_dtype", "block_m", "block_n", "block_k", "num_warps", "num_stages",
    "interpret"))
def fp8_matmul_gpu(x: jax.Array, x_scale: jax.Array, w: jax.Array,
                   w_scale: jax.Array, *, out_dtype,
                   block_m: int = 128, block_n: int = 128, block_k: int = 128,
                   num_warps: int = 4, num_stages: int = 3,
                   interpret=False) -> jax.Array:
  """``(x @ w) * (x_scale * w_scale)`` as a Pallas Triton kernel.

  Args:
    x: float8_e4m3fn[M, K].
    x_scale: float32[M, 1] or [1, 1].
    w: float8_e4m3fn[K, N].
    w_scale: float32[1, N] or [1, 1].
    out_dtype: dtype of the result.
    block_m, block_n, block_k: block dims, powers of two >= 16, each cut to its
      dim rounded up to a power of two. The 128 x 128 x 128 default is one
      warpgroup's worth of fp8 wgmma work on H100, and 3 pipeline stages of its
      fp8 tiles take 96 KiB of shared memory. Shapes that do not divide are
      zero-padded.
    num_warps, num_stages: Triton launch parameters.
    interpret: run in the Pallas interpreter.
  Returns:
    out_dtype[M, N].
  Raises:
    ValueError: a block size that is not a power of two >= 16.
  """
  for name, block in (("block_m", block_m), ("block_n", block_n),
                      ("block_k", block_k)):
    if block < 16 or block & (block - 1):
      raise ValueError(f"fp8_matmul_gpu: {name}={block}; expected a power of "
                       "two >= 16")
  (m, k), n = x.shape, w.shape[1]
  bm, bn, bk = _fit(block_m, m), _fit(block_n, n), _fit(block_k, k)
  x_scale = jnp.broadcast_to(x_scale, (m, 1))
  w_scale = jnp.broadcast_to(w_scale, (1, n))
  return scaled_matmul_gpu(x, x_scale, w, w_scale, acc_dtype=jnp.float32,
                           out_dtype=out_dtype, epilogue=_epilogue, blocks=(bm, bn, bk),
                           num_warps=num_warps, num_stages=num_stages,
                           interpret=interpret, name="fp8_matmul")
