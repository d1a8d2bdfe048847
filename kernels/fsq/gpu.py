"""Pallas Triton (GPU) kernel of `fsq_quantize`.

Grid ``(N / block_n,)``; each program reads a ``[block_n, d']`` tile of z, with d
zero-padded to a power of two d' (Triton tiles are powers of two) and the padded
dimensions given neutral constants (scale 0, basis 0), and writes zhat and the int32
index in one pass. Triton has no rounding op: `round_half_to_even` builds it from
floor. Padding is sliced off.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxquant.kernels._common import out_struct, pad_to
from jaxquant.kernels.fsq.reference import FsqConstants, fsq_block, fsq_constants


def _pow2_at_least(n: int, floor: int = 1) -> int:
  return max(floor, 1 << (n - 1).bit_length())


_kernel = functools.partial(fsq_block, keepdims=False)


def _padded_constants(levels: tuple[int, ...], width: int) -> list[np.ndarray]:
  """`fsq_constants` as ``[1, width]`` rows; padded dimensions quantize to 0 and add 0."""
  fill = FsqConstants(shift=0.0, half_l=0.0, offset=0.0, half_width=1.0, basis=0)
  rows = []
  for c, f in zip(fsq_constants(levels), fill):
    rows.append(np.pad(c, (0, width - c.shape[0]), constant_values=f)[None, :])
  return rows


@functools.partial(jax.jit, static_argnames=("levels", "block_n", "num_warps",
                                             "num_stages", "interpret"))
def fsq_quantize_gpu(z: jax.Array, levels: tuple[int, ...], *,
                     block_n: Optional[int] = None, num_warps: int = 4,
                     num_stages: int = 1, interpret: Any = False):
  """`fsq_quantize` on a GPU (Triton).

  Args:
    z: float32/bfloat16[N, d].
    levels: static tuple of d ints >= 2.
    block_n: rows per program, a power of two >= 16; default the smallest such power
      >= N, at most 512 (with d' = 4 that is 16 elements per thread at 4 warps:
      enough memory parallelism for an elementwise pass, few registers).
    num_warps, num_stages: Triton launch parameters (no loop: one stage).
    interpret: passed to `pl.pallas_call`.
  Returns:
    ``(zhat float32[N, d], indices int32[N])``.
  """
  n, d = z.shape
  bn = block_n or min(_pow2_at_least(n, 16), 512)
  if bn < 16 or bn & (bn - 1):
    raise ValueError(f"fsq_quantize_gpu: block_n={bn}; expected a power of two >= 16")
  dp = _pow2_at_least(d)
  consts = _padded_constants(levels, dp)
  z = pad_to(z, (bn, dp))
  np_ = z.shape[0]
  row = pl.BlockSpec((1, dp), lambda i: (0, 0))
  zhat, idx = pl.pallas_call(
      _kernel,
      out_shape=(out_struct((np_, dp), jnp.float32, z),
                 out_struct((np_,), jnp.int32, z)),
      grid=(np_ // bn,),
      in_specs=[pl.BlockSpec((bn, dp), lambda i: (i, 0))] + [row] * len(consts),
      out_specs=(pl.BlockSpec((bn, dp), lambda i: (i, 0)),
                 pl.BlockSpec((bn,), lambda i: (i,))),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps,
                                              num_stages=num_stages),
      interpret=interpret,
      name="fsq_quantize",
  )(z, *consts)
  return zhat[:n, :d], idx[:n]
