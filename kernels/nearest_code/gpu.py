"""Pallas Triton (GPU) kernel of `nearest_code`.

Grid ``(N / block_n,)``. Each program loads its rows of z once, then loops over the
codebook in `block_k` steps (`jax.lax.fori_loop`): ``[block_n, D] x [D, block_k]`` on
the tensor cores, distances, the block's minimum and argmin, folded into a running
best kept in registers. Only the int32 indices are written: the N x K distance
matrix never reaches HBM.

The codebook is passed transposed (``[D, K]``). Operands are zero-padded: D to a power
of two >= 16 (zeros change no dot product), N and K to block multiples. Padded codes
are masked to +inf with the true K, so they never win; padded rows are sliced off.
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
from jaxquant.kernels.nearest_code.reference import code_terms, distances, dot_precision

_NO_CODE = int(np.iinfo(np.int32).max)


def _pow2_at_least(n: int, floor: int = 16) -> int:
  return max(floor, 1 << (n - 1).bit_length())


def _kernel(z_ref, ct_ref, t_ref, o_ref, *, metric: str, num_codes: int,
            block_k: int, precision):
  z = z_ref[...]
  block_n = z.shape[0]

  def step(kk, carry):
    best, idx = carry
    start = pl.multiple_of(kk * block_k, block_k)
    ks = pl.ds(start, block_k)
    dots = jax.lax.dot_general(z, ct_ref[:, ks], (((1,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)
    code = start + jax.lax.broadcasted_iota(jnp.int32, (block_n, block_k), 1)
    dist = jnp.where(code < num_codes, distances(dots, t_ref[:, ks], metric), jnp.inf)
    block_best = jnp.min(dist, axis=1)
    block_idx = jnp.min(jnp.where(dist == block_best[:, None], code, _NO_CODE), axis=1)
    # Strictly better only: on a tie the earlier block (smaller index) keeps the row.
    better = block_best < best
    return jnp.where(better, block_best, best), jnp.where(better, block_idx, idx)

  init = (jnp.full((block_n,), jnp.inf, jnp.float32), jnp.zeros((block_n,), jnp.int32))
  _, idx = jax.lax.fori_loop(0, ct_ref.shape[1] // block_k, step, init)
  o_ref[...] = idx


@functools.partial(jax.jit, static_argnames=("metric", "block_n", "block_k",
                                             "num_warps", "num_stages", "interpret"))
def nearest_code_gpu(z: jax.Array, codebook: jax.Array, *, metric: str = "l2",
                     block_n: Optional[int] = None, block_k: Optional[int] = None,
                     num_warps: int = 4, num_stages: int = 2,
                     interpret: Any = False) -> jax.Array:
  """`nearest_code` on a GPU (Triton): fused distance matmul and running argmin.

  Args:
    z: float32/bfloat16[N, D].
    codebook: [K, D], the dtype of `z`.
    metric: "l2" or "cosine" (as in `nearest_code`).
    block_n: rows per program, a power of two >= 16; default the smallest such power
      >= N, at most 64 (the z tile stays resident for the whole loop).
    block_k: codes per loop step, a power of two >= 16; default the smallest such
      power >= K, at most 64 (a 64 x 64 float32 distance tile is 32 registers per
      thread at 4 warps; a float32 codebook step with D = 256 is 64 KiB of shared
      memory per pipeline stage).
    num_warps, num_stages: Triton launch and software-pipelining parameters.
    interpret: passed to `pl.pallas_call`.
  Returns:
    int32[N].
  """
  n, d = z.shape
  k = codebook.shape[0]
  bn = block_n or min(_pow2_at_least(n), 64)
  bk = block_k or min(_pow2_at_least(k), 64)
  for name, b in (("block_n", bn), ("block_k", bk)):
    if b < 16 or b & (b - 1):
      raise ValueError(f"nearest_code_gpu: {name}={b}; expected a power of two >= 16")
  dp = _pow2_at_least(d)
  terms = pad_to(code_terms(codebook, metric)[None, :], (1, bk))
  z = pad_to(z, (bn, dp))
  codebook_t = pad_to(codebook.T, (dp, bk))
  np_, kp = z.shape[0], codebook_t.shape[1]
  out = pl.pallas_call(
      functools.partial(_kernel, metric=metric, num_codes=k, block_k=bk,
                        precision=dot_precision(z.dtype)),
      out_shape=out_struct((np_,), jnp.int32, z, codebook_t),
      grid=(np_ // bn,),
      in_specs=[
          pl.BlockSpec((bn, dp), lambda i: (i, 0)),
          pl.BlockSpec((dp, kp), lambda i: (0, 0)),
          pl.BlockSpec((1, kp), lambda i: (0, 0)),
      ],
      out_specs=pl.BlockSpec((bn,), lambda i: (i,)),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps,
                                              num_stages=num_stages),
      interpret=interpret,
      name="nearest_code",
  )(z, codebook_t, terms)
  return out[:n]
