"""Mosaic TPU kernel of `w8a8_matmul`.

Grid ``(M / block_m, N / block_n, K / block_k)``: the K axis is last and "arbitrary",
accumulating int32 products in a VMEM scratch; the scales are applied once, at the
last K step. Operands are zero-padded to block multiples (zero codes add nothing) and
the result is sliced back.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxquant.kernels._common import pad_to, round_up


def _kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref):
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.int32)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    out = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


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
  x_codes, x_scale = pad_to(x_codes, (bm, bk)), pad_to(x_scale, (bm, 1))
  w_codes, w_scale = pad_to(w_codes, (bk, bn)), pad_to(w_scale, (1, bn))
  mp, kp = x_codes.shape
  np_ = w_codes.shape[1]
  out = pl.pallas_call(
      _kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=(mp // bm, np_ // bn, kp // bk),
      in_specs=[
          pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
          pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
          pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
          pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="w8a8_matmul",
  )(x_codes, x_scale, w_codes, w_scale)
  return out[:m, :n]
