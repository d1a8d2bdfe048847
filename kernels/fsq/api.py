"""Public entry point of finite scalar quantization."""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.kernels._common import dispatch
from jaxquant.kernels.fsq.gpu import fsq_quantize_gpu
from jaxquant.kernels.fsq.reference import fsq_quantize_reference
from jaxquant.kernels.fsq.tpu import fsq_quantize_tpu

_DTYPES = (jnp.float32, jnp.bfloat16)
_MAX_CODES = int(np.iinfo(np.int32).max) + 1  # indices must fit int32


def _check_levels(levels: Sequence[int], d: int) -> tuple[int, ...]:
  try:
    levels = tuple(levels)
  except TypeError:
    raise ValueError(f"fsq_quantize: levels={levels!r}; expected a sequence of "
                     "ints >= 2") from None
  for j, level in enumerate(levels):
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, (int, np.integer)):
      raise ValueError(f"fsq_quantize: levels[{j}]={level!r}; expected an int >= 2")
    if level < 2:
      raise ValueError(f"fsq_quantize: levels[{j}]={level}; expected an int >= 2")
  if len(levels) != d:
    raise ValueError(f"fsq_quantize: levels={levels} has length {len(levels)}; "
                     f"expected one level per dimension of z (d={d})")
  levels = tuple(operator.index(level) for level in levels)
  if math.prod(levels) > _MAX_CODES:
    raise ValueError(f"fsq_quantize: levels={levels} make {math.prod(levels)} codes; "
                     f"expected at most 2**31 (int32 indices)")
  return levels


def fsq_quantize(z: jax.Array, levels: Sequence[int], *, impl: str = "auto",
                 interpret: Any = False, block_n: Optional[int] = None):
  """Finite scalar quantization of the rows of z, with their code indices.

  The FSQ paper's quantizer, per dimension j with ``L = levels[j]``:
  ``half_l = (L - 1)(1 - 1e-3) / 2``; ``offset = 0.5`` if L is even else 0;
  ``shift = tan(offset / half_l)``; ``r = round(tanh(z + shift) * half_l - offset)``
  (half to even), so ``r + L // 2`` is in ``[0, L)``; ``zhat = r / (L // 2)``; and
  ``index = sum_j (r_j + L_j // 2) * basis_j`` with ``basis = [1, L0, L0 L1, ...]``.
  The kernels do it in one pass over z. No gradient: wrap it (e.g. straight-through)
  where one is needed.

  Args:
    z: float32/bfloat16[N, d] (computed in float32).
    levels: d ints >= 2 (static), with a product of at most 2**31.
    impl: "auto" (the Pallas kernel on TPU and CUDA, XLA elsewhere), "xla", or
      "pallas" (the kernel; on a CPU only with `interpret`).
    interpret: falsy, or True / `pltpu.InterpretParams()` to run the TPU kernel in
      the Pallas interpreter on any platform.
    block_n: rows per block; None picks each kernel's default (see
      `fsq_quantize_tpu` and `fsq_quantize_gpu` for the constraints).
  Returns:
    ``(zhat float32[N, d], indices int32[N])``.
  Raises:
    ValueError: a z of the wrong dtype or rank, bad `levels`, or an `impl` that
      cannot run here.
  """
  if getattr(z, "ndim", None) != 2 or z.dtype not in _DTYPES:
    raise ValueError(f"fsq_quantize: z has dtype {getattr(z, 'dtype', type(z))} and "
                     f"shape {getattr(z, 'shape', None)}; expected float32 or "
                     "bfloat16[N, d]")
  n, d = z.shape
  levels = _check_levels(levels, d)
  fn = dispatch(
      impl, interpret,
      tpu=functools.partial(fsq_quantize_tpu, levels=levels, block_n=block_n),
      gpu=functools.partial(fsq_quantize_gpu, levels=levels, block_n=block_n),
      xla=functools.partial(fsq_quantize_reference, levels=levels),
      op="fsq_quantize")
  if n == 0:
    return jnp.zeros((0, d), jnp.float32), jnp.zeros((0,), jnp.int32)
  return fn(z)
