"""Mosaic TPU kernel of `weight_only_matmul`.

Grid (M / block_m, N / block_n, K steps), K last and "arbitrary": each step loads a
[block_k, block_n] tile of codes (and, for the packed formats, the two x blocks its
low and high nibbles multiply), dequantizes it in VMEM (decode, scale each group's
rows, cast to x.dtype) and adds its products to a float32 accumulator.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxquant.kernels._common import out_struct, round_up
from jaxquant.kernels.weight_only_matmul.reference import (PACKED_FORMATS, decode_codes,
                                                           pad_operands)


def _kernel(*refs, fmt: str, segments: int):
  x_refs, codes_ref = refs[:segments], refs[segments]
  scale_refs, (out_ref, acc_ref) = refs[segments + 1:-2], refs[-2:]

  @pl.when(pl.program_id(2) == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  codes = codes_ref[...].astype(jnp.int32)
  nibbles = (codes & 0xF, codes >> 4) if segments == 2 else (codes,)
  acc = acc_ref[...]
  for x_ref, scale_ref, code in zip(x_refs, scale_refs, nibbles):
    scale = scale_ref[...]  # float32[groups in the step, 1, block_n]
    values = decode_codes(fmt, code)
    w = (values.reshape(scale.shape[0], -1, values.shape[1]) * scale).reshape(values.shape)
    acc += jnp.dot(x_ref[...], w.astype(x_ref.dtype), preferred_element_type=jnp.float32)
  acc_ref[...] = acc

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def weight_only_matmul_tpu(x: jax.Array, w_codes: jax.Array, w_scale: jax.Array, *,
                           fmt: str, group_size: int, out_dtype=None,
                           block_m: int | None = None, block_n: int | None = None,
                           block_k: int | None = None, interpret=False) -> jax.Array:
  """``x @ dequantize(w_codes, w_scale)`` on a TPU (operands as in the reference).

  Args:
    x: float32/bfloat16[M, K].
    w_codes: int8[K, N] or uint8[K // 2, N] (packed halves).
    w_scale: float32[K // group_size, N].
    fmt, group_size, out_dtype: as in `weight_only_matmul_reference`.
    block_m: rows of x per step, a multiple of 8 (default: M rounded up to 16,
      at most 256).
    block_n: columns per step, a multiple of 128 (default: at most 256).
    block_k: rows of `w_codes` per step, a multiple of 128 (default: at most 512
      for int8, 256 for packed formats, i.e. 512 rows of K per step either way).
    interpret: False, True or `pltpu.InterpretParams` for the Pallas interpreter.
  Returns:
    out_dtype[M, N].
  """
  (m, _), (k_seg, n) = x.shape, w_codes.shape
  segments = 2 if fmt in PACKED_FORMATS else 1
  block_m = block_m or min(256, round_up(m, 16))
  block_n = block_n or min(256, round_up(n, 128))
  block_k = block_k or min(512 // segments, round_up(k_seg, 128))
  if block_m % 8 or block_n % 128 or block_k % 128:
    raise ValueError(f"weight_only_matmul_tpu: blocks (m, n, k)={(block_m, block_n, block_k)}"
                     "; expected multiples of (8, 128, 128)")
  x_p, codes, scale, group = pad_operands(x, w_codes, w_scale, fmt=fmt,
                                          group_size=group_size, block_m=block_m,
                                          block_n=block_n, block_k=block_k)
  k_pad = codes.shape[0]
  steps = k_pad // block_k
  # Scale rows per step: block_k is a multiple of the group, or (per channel) a divisor.
  step_groups = max(block_k // group, 1)

  def x_spec(s):
    return pl.BlockSpec((block_m, block_k), lambda i, j, k: (i, s * steps + k))

  def scale_spec(s):
    return pl.BlockSpec((step_groups, 1, block_n),
                        lambda i, j, k: (jax.lax.div(s * k_pad + k * block_k,
                                                     step_groups * group), 0, j))

  out = pl.pallas_call(
      functools.partial(_kernel, fmt=fmt, segments=segments),
      out_shape=out_struct((x_p.shape[0], codes.shape[1]), out_dtype or x.dtype, x_p, codes),
      grid=(x_p.shape[0] // block_m, codes.shape[1] // block_n, steps),
      in_specs=([x_spec(s) for s in range(segments)]
                + [pl.BlockSpec((block_k, block_n), lambda i, j, k: (k, j))]
                + [scale_spec(s) for s in range(segments)]),
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, k: (i, j)),
      scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(*[x_p] * segments, codes, *[scale[:, None, :]] * segments)
  return out[:m, :n]
