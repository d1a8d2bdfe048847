"""Mosaic TPU kernel of `fsq_quantize`.

Grid ``(N / block_n,)``; each step reads a ``[block_n, d]`` block of z (d is the full
last dimension, so it needs no lane padding in HBM) with the per-dimension constants
as ``[1, d]`` rows, and writes zhat and the int32 index (the sum of the index terms
over the lanes) in one pass. Rows are zero-padded to a block multiple and sliced off.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxquant.kernels._common import out_struct, pad_to, round_up
from jaxquant.kernels.fsq.reference import fsq_block, fsq_constants


_kernel = functools.partial(fsq_block, keepdims=True)


@functools.partial(jax.jit, static_argnames=("levels", "block_n", "interpret"))
def fsq_quantize_tpu(z: jax.Array, levels: tuple[int, ...], *,
                     block_n: Optional[int] = None, interpret: Any = False):
  """`fsq_quantize` on a TPU.

  Args:
    z: float32/bfloat16[N, d].
    levels: static tuple of d ints >= 2.
    block_n: rows per block, a multiple of 8 (16 for bfloat16); default
      ``min(round_up(N, 16), 1024)``: the work per row is tiny, so large blocks
      amortize the per-step cost, while each lane-padded ``[1024, d]`` float32
      block and temporary is 512 KiB of VMEM.
    interpret: passed to `pl.pallas_call` (True or a `pltpu.InterpretParams`).
  Returns:
    ``(zhat float32[N, d], indices int32[N])``.
  """
  n, d = z.shape
  sublanes = 8 * (4 // z.dtype.itemsize)
  bn = block_n or min(round_up(n, 16), 1024)
  if bn <= 0 or bn % sublanes:
    raise ValueError(f"fsq_quantize_tpu: block_n={bn}; expected a positive multiple "
                     f"of {sublanes} for {z.dtype}")
  consts = [c[None, :] for c in fsq_constants(levels)]
  z = pad_to(z, (bn, 1))
  np_ = z.shape[0]
  row = pl.BlockSpec((1, d), lambda i: (0, 0))
  zhat, idx = pl.pallas_call(
      _kernel,
      out_shape=(out_struct((np_, d), jnp.float32, z),
                 out_struct((np_, 1), jnp.int32, z)),
      grid=(np_ // bn,),
      in_specs=[pl.BlockSpec((bn, d), lambda i: (i, 0))] + [row] * len(consts),
      out_specs=(pl.BlockSpec((bn, d), lambda i: (i, 0)),
                 pl.BlockSpec((bn, 1), lambda i: (i, 0))),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
      name="fsq_quantize",
  )(z, *consts)
  return zhat[:n], idx[:n, 0]
