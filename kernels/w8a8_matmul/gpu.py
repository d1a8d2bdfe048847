"""Pallas Triton kernel of `w8a8_matmul`.

Grid ``(M / block_m, N / block_n)``; each program loops over K in `block_k` steps,
accumulating int32 products in registers, then applies the scales. Operands are
zero-padded to block multiples (zero codes add nothing) and the result is sliced back.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxquant.kernels._common import pad_to


def _pow2_at_least(n: int, floor: int = 16) -> int:
  return max(floor, 1 << (n - 1).bit_length())


def _kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, block_k: int):
  bm, bn = o_ref.shape

  def step(kk, acc):
    ks = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
    return acc + jnp.dot(x_ref[:, ks], w_ref[ks, :], preferred_element_type=jnp.int32)

  acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, step,
                          jnp.zeros((bm, bn), jnp.int32))
  out = acc.astype(jnp.float32) * xs_ref[...] * ws_ref[...]
  o_ref[...] = out.astype(o_ref.dtype)


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
  m, k = x_codes.shape
  n = w_codes.shape[1]
  bm = block_m or min(_pow2_at_least(m), 128)
  for name, b in (("block_m", bm), ("block_n", block_n), ("block_k", block_k)):
    if b < 16 or b & (b - 1):
      raise ValueError(f"w8a8_matmul_gpu: {name}={b}; expected a power of two >= 16")
  x_codes, x_scale = pad_to(x_codes, (bm, block_k)), pad_to(x_scale, (bm, 1))
  w_codes, w_scale = pad_to(w_codes, (block_k, block_n)), pad_to(w_scale, (1, block_n))
  mp, kp = x_codes.shape
  np_ = w_codes.shape[1]
  out = pl.pallas_call(
      functools.partial(_kernel, block_k=block_k),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=(mp // bm, np_ // block_n),
      in_specs=[
          pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
          pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
          pl.BlockSpec((kp, block_n), lambda i, j: (0, j)),
          pl.BlockSpec((1, block_n), lambda i, j: (0, j)),
      ],
      out_specs=pl.BlockSpec((bm, block_n), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps,
                                              num_stages=num_stages),
      interpret=interpret,
      name="w8a8_matmul",
  )(x_codes, x_scale, w_codes, w_scale)
  return out[:m, :n]
