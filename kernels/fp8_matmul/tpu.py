"""Mosaic TPU kernel of `fp8_matmul`.

Grid (M / block_m, N / block_n, K / block_k), K innermost and "arbitrary": each
(i, j) output block sums its K steps in a float32 VMEM accumulator and applies
the scales once, at the last K step. The fp8 tiles go to the dot as they are:
jax 0.10.2 lowers it to a ``tpu.matmul`` of float8_e4m3fn operands with a
float32 accumulator, which v7's MXU runs natively (chips without an fp8 MXU
depend on libtpu's Mosaic compiler accepting it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.kernels._common import round_up
from jaxquant.kernels._scaled_matmul import scaled_matmul_tpu

# 8-bit arrays tile as (32, 128) in VMEM; blocks are multiples of that.
SUBLANE, LANE = 32, 128


def _epilogue(acc, x_scale, w_scale):
  return acc * (x_scale * w_scale)


@functools.partial(jax.jit, static_argnames=(
    "out_dtype", "block_m", "block_n", "block_k", "interpret"))
def fp8_matmul_tpu(x: jax.Array, x_scale: jax.Array, w: jax.Array,
                   w_scale: jax.Array, *, out_dtype,
                   block_m: int = 512, block_n: int = 512, block_k: int = 1024,
                   interpret=False) -> jax.Array:
  """``(x @ w) * (x_scale * w_scale)`` as a Pallas TPU kernel.

  Args:
    x: float8_e4m3fn[M, K].
    x_scale: float32[M, 1] or [1, 1].
    w: float8_e4m3fn[K, N].
    w_scale: float32[1, N] or [1, 1].
    out_dtype: dtype of the result.
    block_m: rows of x per block, a multiple of 32 (cut to M rounded up to 32).
    block_n: columns of w per block, a multiple of 128 (cut to N rounded up).
    block_k: depth per K step, a multiple of 128 (cut to K rounded up).
      The defaults fill the 256-wide MXU of v6e/v7 and keep the double-buffered
      fp8 tiles, the float32 accumulator and the output block near 6 MiB, under
      every generation's default scoped VMEM; each K step does 512 flops per
      byte it loads. Shapes that do not divide are zero-padded.
    interpret: False, True or `pltpu.InterpretParams()` (Pallas interpreter).
  Returns:
    out_dtype[M, N].
  Raises:
    ValueError: a block size that is not a multiple of its tile.
  """
  for name, block, tile in (("block_m", block_m, SUBLANE),
                            ("block_n", block_n, LANE),
                            ("block_k", block_k, LANE)):
    if block <= 0 or block % tile:
      raise ValueError(f"fp8_matmul_tpu: {name}={block}; expected a positive "
                       f"multiple of {tile}")
  (m, k), n = x.shape, w.shape[1]
  bm = min(block_m, round_up(m, SUBLANE))
  bn = min(block_n, round_up(n, LANE))
  bk = min(block_k, round_up(k, LANE))
  x_scale = jnp.broadcast_to(x_scale, (m, 1))
  w_scale = jnp.broadcast_to(w_scale, (1, n))
  return scaled_matmul_tpu(x, x_scale, w, w_scale, acc_dtype=jnp.float32,
                           out_dtype=out_dtype, epilogue=_epilogue, blocks=(bm, bn, bk),
                           interpret=interpret, name="fp8_matmul")
