"""The scaled-accumulator matmul that `w8a8_matmul` and `fp8_matmul` share.

``epilogue(x @ w, x_scale, w_scale)`` with the product accumulated in `acc_dtype`
(int32 for int8 codes, float32 for fp8) and the scales applied once per output
block. The ops differ only in operand dtypes, accumulator, epilogue and default
blocks, which their own modules choose and validate; the grids live here.
Operands are zero-padded to block multiples (zero codes add nothing) and the
result is sliced back.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from jaxquant.kernels._common import out_struct, pad_to

# epilogue(acc, x_scale [bm, 1], w_scale [1, bn]) -> float32 [bm, bn]
Epilogue = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _pad_operands(x, x_scale, w, w_scale, bm, bn, bk):
  return (pad_to(x, (bm, bk)), pad_to(x_scale, (bm, 1)),
          pad_to(w, (bk, bn)), pad_to(w_scale, (1, bn)))


def _tpu_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref, *, epilogue):
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=acc_ref.dtype)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = epilogue(acc_ref[...], xs_ref[...], ws_ref[...]).astype(o_ref.dtype)


def scaled_matmul_tpu(x: jax.Array, x_scale: jax.Array, w: jax.Array,
                      w_scale: jax.Array, *, acc_dtype, out_dtype, epilogue: Epilogue,
                      blocks: tuple[int, int, int], interpret: Any, name: str
                      ) -> jax.Array:
  """Mosaic TPU grid ``(M / bm, N / bn, K / bk)``, K last and "arbitrary".

  Each (i, j) output block sums its K steps in a VMEM accumulator of `acc_dtype`
  and applies `epilogue` at the last step.

  Args:
    x: [M, K] 8-bit operand; x_scale: float32[M, 1]; w: [K, N]; w_scale: float32[1, N].
    acc_dtype: accumulator dtype (int32 or float32).
    out_dtype: dtype of the result.
    epilogue: ``fn(acc, x_scale_block, w_scale_block) -> float32 block``.
    blocks: (bm, bn, bk), already validated by the caller.
    interpret: passed to `pl.pallas_call`.
    name: the kernel's name in the lowered module.
  Returns:
    out_dtype[M, N].
  """
  m, n = x.shape[0], w.shape[1]
  bm, bn, bk = blocks
  x, x_scale, w, w_scale = _pad_operands(x, x_scale, w, w_scale, bm, bn, bk)
  (mp, kp), np_ = x.shape, w.shape[1]
  out = pl.pallas_call(
      functools.partial(_tpu_kernel, epilogue=epilogue),
      out_shape=out_struct((mp, np_), out_dtype, x, w),
      grid=(mp // bm, np_ // bn, kp // bk),
      in_specs=[
          pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
          pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
          pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
          pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), acc_dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * mp * np_ * kp, transcendentals=0,
          bytes_accessed=(mp * kp + kp * np_) * x.dtype.itemsize +
          mp * np_ * jnp.dtype(out_dtype).itemsize),
      interpret=interpret,
      name=name,
  )(x, x_scale, w, w_scale)
  return out[:m, :n]


def _gpu_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, block_k, acc_dtype, epilogue):
  bm, bn = o_ref.shape

  def step(kk, acc):
    ks = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
    return acc + jnp.dot(x_ref[:, ks], w_ref[ks, :], preferred_element_type=acc_dtype)

  acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, step,
                          jnp.zeros((bm, bn), acc_dtype))
  o_ref[...] = epilogue(acc, xs_ref[...], ws_ref[...]).astype(o_ref.dtype)


def scaled_matmul_gpu(x: jax.Array, x_scale: jax.Array, w: jax.Array,
                      w_scale: jax.Array, *, acc_dtype, out_dtype, epilogue: Epilogue,
                      blocks: tuple[int, int, int], num_warps: int, num_stages: int,
                      interpret: Any, name: str) -> jax.Array:
  """Pallas Triton grid ``(M / bm, N / bn)``; each program loops over K in `bk` steps.

  The accumulator stays in registers; `epilogue` applies the scales at the end.
  Arguments as `scaled_matmul_tpu`, plus Triton's `num_warps` and `num_stages`.
  """
  m, n = x.shape[0], w.shape[1]
  bm, bn, bk = blocks
  x, x_scale, w, w_scale = _pad_operands(x, x_scale, w, w_scale, bm, bn, bk)
  (mp, kp), np_ = x.shape, w.shape[1]
  out = pl.pallas_call(
      functools.partial(_gpu_kernel, block_k=bk, acc_dtype=acc_dtype,
                        epilogue=epilogue),
      out_shape=out_struct((mp, np_), out_dtype, x, w),
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
      name=name,
  )(x, x_scale, w, w_scale)
  return out[:m, :n]
