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
from jax.experimental.pallas import triton as pltriton

from jaxquant.kernels._common import pad_to


def _kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, block_k):
  bm, bn = o_ref.shape

  def step(k, acc):
    start = pl.multiple_of(k * block_k, block_k)
    return acc + jnp.dot(x_ref[:, pl.ds(start, block_k)],
                         w_ref[pl.ds(start, block_k), :],
                         preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, step,
                          jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = (acc * (xs_ref[...] * ws_ref[...])).astype(o_ref.dtype)


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
  x = pad_to(x, (bm, bk))
  w = pad_to(w, (bk, bn))
  x_scale = pad_to(jnp.broadcast_to(x_scale, (m, 1)), (bm, 1))
  w_scale = pad_to(jnp.broadcast_to(w_scale, (1, n)), (1, bn))
  (mp, kp), np_ = x.shape, w.shape[1]
  out = pl.pallas_call(
      functools.partial(_kernel, block_k=bk),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=(mp // bm, np_ // bn),
      in_specs=[
          pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
          pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
          pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
          pl.BlockSpec((1, bn), lambda i, j: (0, j)),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps,
                                              num_stages=num_stages),
      interpret=interpret,
  )(x, x_scale, w, w_scale)
  return out[:m, :n]
