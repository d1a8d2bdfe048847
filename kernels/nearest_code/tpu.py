"""Mosaic TPU kernel of `nearest_code`.

Grid ``(N / block_n, K / block_k)``. Each step multiplies a block of codes by a block
of rows of z on the MXU (``[block_k, D] x [block_n, D]^T``: codes on sublanes, rows of
z on lanes), turns the products into distances, reduces them over the codes and
folds the block's best into a running minimum and argmin kept in VMEM scratch; the K
axis is last and "arbitrary". Only the int32 indices leave the kernel, lane-dense as
``[1, N]``: the N x K distance matrix never reaches HBM.

z and the codebook are zero-padded: D to a multiple of 128 (zeros change no dot
product), N and K to block multiples. Padded codes are masked to +inf with the true
K, so they never win; padded rows are sliced off.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxquant.kernels._common import out_struct, pad_to, round_up
from jaxquant.kernels.nearest_code.reference import code_terms, distances, dot_precision

_NO_CODE = int(np.iinfo(np.int32).max)


def _kernel(c_ref, t_ref, z_ref, o_ref, best_ref, idx_ref, *, metric: str,
            num_codes: int, precision):
  k = pl.program_id(1)
  block_k = c_ref.shape[0]

  @pl.when(k == 0)
  def _():
    best_ref[...] = jnp.full(best_ref.shape, jnp.inf, jnp.float32)
    idx_ref[...] = jnp.zeros(idx_ref.shape, jnp.int32)

  dots = jax.lax.dot_general(c_ref[...], z_ref[...], (((1,), (1,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
  code = k * block_k + jax.lax.broadcasted_iota(jnp.int32, dots.shape, 0)
  dist = jnp.where(code < num_codes, distances(dots, t_ref[...], metric), jnp.inf)
  block_best = jnp.min(dist, axis=0, keepdims=True)  # [1, block_n]
  block_idx = jnp.min(jnp.where(dist == block_best, code, _NO_CODE), axis=0,
                      keepdims=True)
  # Strictly better only: on a tie the earlier block (smaller index) keeps the row.
  better = block_best < best_ref[...]
  best_ref[...] = jnp.where(better, block_best, best_ref[...])
  idx_ref[...] = jnp.where(better, block_idx, idx_ref[...])

  @pl.when(k == pl.num_programs(1) - 1)
  def _():
    o_ref[...] = idx_ref[...]


@functools.partial(jax.jit, static_argnames=("metric", "block_n", "block_k",
                                             "interpret"))
def nearest_code_tpu(z: jax.Array, codebook: jax.Array, *, metric: str = "l2",
                     block_n: Optional[int] = None, block_k: Optional[int] = None,
                     interpret: Any = False) -> jax.Array:
  """`nearest_code` on a TPU: fused distance matmul and running argmin.

  Args:
    z: float32/bfloat16[N, D].
    codebook: [K, D], the dtype of `z`.
    metric: "l2" or "cosine" (as in `nearest_code`).
    block_n: rows of z per block, a multiple of 128 (they lie on lanes); default
      ``min(round_up(N, 128), 512)``: at N / block_n codebook passes, 512 rows keep
      the MXU work per codebook byte above the HBM roofline.
    block_k: codes per step, a multiple of 8 (16 for bfloat16: sublane tiling);
      default ``min(round_up(K, 16), 256)``: the float32 distance tile
      ``[block_k, block_n]`` is then 512 KiB, and the blocks and temporaries
      stay well inside the default scoped VMEM for D up to 256.
    interpret: passed to `pl.pallas_call` (True or a `pltpu.InterpretParams`).
  Returns:
    int32[N].
  """
  n, d = z.shape
  k = codebook.shape[0]
  sublanes = 8 * (4 // z.dtype.itemsize)
  bn = block_n or min(round_up(n, 128), 512)
  bk = block_k or min(round_up(k, 16), 256)
  if bn <= 0 or bn % 128:
    raise ValueError(f"nearest_code_tpu: block_n={bn}; expected a positive multiple "
                     "of 128")
  if bk <= 0 or bk % sublanes:
    raise ValueError(f"nearest_code_tpu: block_k={bk}; expected a positive multiple "
                     f"of {sublanes} for {z.dtype}")
  terms = pad_to(code_terms(codebook, metric)[:, None], (bk, 1))
  z = pad_to(z, (bn, 128))
  codebook = pad_to(codebook, (bk, 128))
  (np_, dp), kp = z.shape, codebook.shape[0]
  out = pl.pallas_call(
      functools.partial(_kernel, metric=metric, num_codes=k,
                        precision=dot_precision(z.dtype)),
      out_shape=out_struct((1, np_), jnp.int32, z, codebook),
      grid=(np_ // bn, kp // bk),
      in_specs=[
          pl.BlockSpec((bk, dp), lambda i, j: (j, 0)),
          pl.BlockSpec((bk, 1), lambda i, j: (j, 0)),
          pl.BlockSpec((bn, dp), lambda i, j: (i, 0)),
      ],
      out_specs=pl.BlockSpec((1, bn), lambda i, j: (0, i)),
      scratch_shapes=[pltpu.VMEM((1, bn), jnp.float32), pltpu.VMEM((1, bn), jnp.int32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="nearest_code",
  )(codebook, terms, z)
  return out[0, :n]
