"""Public entry point of the nearest-code search."""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxquant.kernels._common import dispatch
from jaxquant.kernels.nearest_code.gpu import nearest_code_gpu
from jaxquant.kernels.nearest_code.reference import METRICS, nearest_code_reference
from jaxquant.kernels.nearest_code.tpu import nearest_code_tpu

_DTYPES = (jnp.float32, jnp.bfloat16)


def nearest_code(z: jax.Array, codebook: jax.Array, *, metric: str = "l2",
                 impl: str = "auto", interpret: Any = False,
                 block_n: Optional[int] = None,
                 block_k: Optional[int] = None) -> jax.Array:
  """Index of the nearest codebook entry of each row of `z`.

  "l2" picks ``argmin_k ||z - c_k||^2``, computed as ``||c_k||^2 - 2 z.c_k`` (the
  ``||z||^2`` term is the same for every code); "cosine" picks
  ``argmax_k z.c_k / ||c_k||`` (the norm of z does not change the argmax). Distances
  are float32 (bfloat16 operands are multiplied exactly and accumulated in float32).
  Ties go to the smallest index. The kernels fuse the distance matmul with a running
  argmin over codebook blocks and never write the N x K distances to memory.

  Args:
    z: float32/bfloat16[N, D] vectors (e.g. encoder outputs, flattened).
    codebook: [K, D] codes, the dtype of `z`.
    metric: "l2" or "cosine".
    impl: "auto" (the Pallas kernel on TPU and CUDA, XLA elsewhere), "xla", or
      "pallas" (the kernel; on a CPU only with `interpret`).
    interpret: falsy, or True / `pltpu.InterpretParams()` to run the TPU kernel in
      the Pallas interpreter on any platform.
    block_n, block_k: rows of z and codes per block; None picks each kernel's
      default (see `nearest_code_tpu` and `nearest_code_gpu` for the constraints:
      multiples of 128 and 8/16 on TPU, powers of two >= 16 on GPU).
  Returns:
    int32[N], each in ``[0, K)``.
  Raises:
    ValueError: operands of the wrong dtype or shape, an unknown `metric`, or an
      `impl` that cannot run here.
  """
  if getattr(z, "ndim", None) != 2 or z.dtype not in _DTYPES:
    raise ValueError(f"nearest_code: z has dtype {getattr(z, 'dtype', type(z))} and "
                     f"shape {getattr(z, 'shape', None)}; expected float32 or "
                     "bfloat16[N, D]")
  n, d = z.shape
  if (getattr(codebook, "ndim", None) != 2 or codebook.dtype != z.dtype
      or codebook.shape[1] != d or codebook.shape[0] < 1):
    raise ValueError(
        f"nearest_code: codebook has dtype {getattr(codebook, 'dtype', type(codebook))} "
        f"and shape {getattr(codebook, 'shape', None)}; expected {z.dtype}[K, D={d}] "
        "with K >= 1 (the dtype and D of z)")
  if metric not in METRICS:
    raise ValueError(f"nearest_code: metric={metric!r}; expected one of {METRICS}")
  fn = dispatch(
      impl, interpret,
      tpu=functools.partial(nearest_code_tpu, metric=metric, block_n=block_n,
                            block_k=block_k),
      gpu=functools.partial(nearest_code_gpu, metric=metric, block_n=block_n,
                            block_k=block_k),
      xla=functools.partial(nearest_code_reference, metric=metric),
      op="nearest_code")
  if n == 0:
    return jnp.zeros((0,), jnp.int32)
  return fn(z, codebook)
