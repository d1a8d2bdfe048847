"""Pallas Triton (GPU) kernel of `weight_only_matmul`.

Grid (M / block_m, N / block_n); each program loops over K in steps of block_k
rows of `w_codes` (block_k divides the group size, so a step reads one scale row
per segment), dequantizes the codes in registers and accumulates in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxquant.kernels._common import out_struct
from jaxquant.kernels.weight_only_matmul.reference import (PACKED_FORMATS, decode_codes,
                                                           pad_operands)


def _kernel(x_ref, codes_ref, scale_ref, out_ref, *, fmt: str, segments: int,
            block_k: int, group: int):
  k_pad = codes_ref.shape[0]

  def step(t, acc):
    codes = codes_ref[pl.ds(t * block_k, block_k), :].astype(jnp.int32)
    nibbles = (codes & 0xF, codes >> 4) if segments == 2 else (codes,)
    for s, code in enumerate(nibbles):
      k = s * k_pad + t * block_k  # first column of x / row of K in the step
      w = decode_codes(fmt, code) * scale_ref[pl.ds(jax.lax.div(k, group), 1), :]
      acc += jnp.dot(x_ref[:, pl.ds(k, block_k)], w.astype(x_ref.dtype),
                     preferred_element_type=jnp.float32)
    return acc

  acc = jax.lax.fori_loop(0, k_pad // block_k, step,
                          jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _pow2_at_least_16(n: int, cap: int) -> int:
  return min(cap, max(16, pl.next_power_of_2(n)))


def weight_only_matmul_gpu(x: jax.Array, w_codes: jax.Array, w_scale: jax.Array, *,
                           fmt: str, group_size: int, out_dtype=None,
                           block_m: int | None = None, block_n: int | None = None,
                           block_k: int | None = None, num_warps: int = 4,
                           num_stages: int = 3, interpret=False) -> jax.Array:
  """``x @ dequantize(w_codes, w_scale)`` on a GPU with Triton (operands as in the reference).

  Args:
    x: float32/bfloat16[M, K].
    w_codes: int8[K, N] or uint8[K // 2, N] (packed halves).
    w_scale: float32[K // group_size, N].
    fmt, group_size, out_dtype: as in `weight_only_matmul_reference`.
    block_m, block_n: powers of two >= 16 (defaults: at most 64 and 128).
    block_k: rows of `w_codes` per step, a power of two >= 16 dividing group_size
      unless per channel (default: the group size, or at most 128 per channel).
    num_warps, num_stages: Triton launch parameters.
    interpret: run in the Pallas interpreter.
  Returns:
    out_dtype[M, N].
  """
  (m, k), (k_seg, n) = x.shape, w_codes.shape
  per_channel = group_size == k
  block_m = block_m or _pow2_at_least_16(m, 64)
  block_n = block_n or _pow2_at_least_16(n, 128)
  block_k = block_k or (_pow2_at_least_16(k_seg, 128) if per_channel else group_size)
  blocks = (block_m, block_n, block_k)
  if any(b < 16 or b & (b - 1) for b in blocks) or not (per_channel or
                                                        group_size % block_k == 0):
    raise ValueError(f"weight_only_matmul_gpu: blocks (m, n, k)={blocks}; expected "
                     f"powers of two >= 16, block_k dividing group_size={group_size}")
  x_p, codes, scale, group = pad_operands(x, w_codes, w_scale, fmt=fmt,
                                          group_size=group_size, block_m=block_m,
                                          block_n=block_n, block_k=block_k)
  out = pl.pallas_call(
      functools.partial(_kernel, fmt=fmt, segments=2 if fmt in PACKED_FORMATS else 1,
                        block_k=block_k, group=group),
      out_shape=out_struct((x_p.shape[0], codes.shape[1]), out_dtype or x.dtype, x_p, codes),
      grid=(x_p.shape[0] // block_m, codes.shape[1] // block_n),
      in_specs=[pl.BlockSpec((block_m, x_p.shape[1]), lambda i, j: (i, 0)),
                pl.BlockSpec((codes.shape[0], block_n), lambda i, j: (0, j)),
                pl.BlockSpec((scale.shape[0], block_n), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(x_p, codes, scale)
  return out[:m, :n]
