"""Finite Scalar Quantization (Mentzer et al. 2023) and residual FSQ.

Each of the `d` channels of ``z`` is squashed into a bounded range and rounded to
one of ``levels[i]`` values; the codebook is the implicit grid of
``prod(levels)`` points, and a code's index is its mixed-radix number with basis
``[1, L0, L0*L1, ...]``.

Three bounds (the ``bound`` argument):

* ``"reference"`` (default): the paper's published code, kept bit-for-bit for
  compatibility: ``eps = 1e-3``, ``half_l = (L-1)(1-eps)/2``, ``offset = 0.5``
  for even L else 0, ``shift = tan(offset / half_l)``,
  ``bound(z) = tanh(z + shift) * half_l - offset``, ``zhat = round(bound(z)) /
  (L // 2)``. Codes are ``k / (L // 2)`` for integers ``k`` in
  ``[-(L // 2), (L - 1) // 2]``, so even L has one more negative code than
  positive (L=8: -1, -0.75, ..., 0.75).
* ``"atanh"``: the same with ``shift = atanh(offset / half_l)``, which is what the
  paper meant (``tan`` is a slip): then ``bound(0) = 0`` up to rounding. Same codes.
* ``"symmetric"``: L codes spaced evenly over [-1, 1], both ends included and
  ``codes == -codes``: ``(2k - (L - 1)) / (L - 1)`` for ``k = 0 .. L-1``.
  ``y = tanh(z) * (L - 1)/2``; ``zhat = (round(y - offset) + offset) / ((L-1)/2)``
  with ``offset = 0.5`` for even L, else 0. For odd L this equals "atanh" without
  the ``eps`` margin; for even L the codes are the half-integers scaled to
  [-1, 1] (L=4: -1, -1/3, 1/3, 1), and ``zhat(-z) = -zhat(z)`` off the decision
  boundaries (z = 0 is one for even L).

Rounding is half to even (``jnp.round``) with a straight-through gradient, so
``d zhat / dz = bound'(z) / scale``. Math is float32; ``zhat`` has ``z``'s dtype.

`fsq` can run the "reference" bound as the fused Pallas kernel
(``jaxquant.kernels.fsq``, ``impl="auto"`` or ``"pallas"``) with the same
straight-through gradient. The kernel takes its ``shift`` from ``tan`` in float64
rounded once to float32, the XLA path from ``tan`` in float32; the two agree for
the recommended levels but can differ by an ulp for others (L = 16), which can
move a value lying on a rounding boundary. Hence ``impl="xla"`` stays the default.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.kernels import _common as kernels_common
from jaxquant.kernels.fsq import fsq_quantize
from jaxquant.vq import _common

BOUNDS = ("reference", "atanh", "symmetric")
_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)
_EPS = 1e-3
_MAX_CODES = 2**31  # indices 0 .. 2**31 - 1 fit int32


def check_levels(levels: Sequence[int], dim: Optional[int] = None) -> tuple[int, ...]:
  """`levels` as a tuple of ints, each >= 2, whose product fits int32 indices.

  Raises:
    ValueError: levels empty, not integers, < 2, too many codes, or a length
      other than `dim` (the last axis of the input).
  """
  try:
    levels = tuple(levels)
  except TypeError:
    raise ValueError(f"levels={levels!r} must be a sequence of ints >= 2") from None
  if not levels or not all(isinstance(l, (int, np.integer)) and not isinstance(l, bool)
                           and l >= 2 for l in levels):
    raise ValueError(f"levels={levels!r} must be a non-empty sequence of ints >= 2")
  levels = tuple(int(l) for l in levels)
  if math.prod(levels) > _MAX_CODES:
    raise ValueError(f"levels={levels} give {math.prod(levels)} codes; int32 indices "
                     f"allow at most {_MAX_CODES}")
  if dim is not None and len(levels) != dim:
    raise ValueError(f"levels={levels} has {len(levels)} entries but z has last axis "
                     f"of size {dim}; expected one level per channel")
  return levels


def _grid(levels: tuple[int, ...], bound: str, ndim: int = 1):
  """float32[1, ..., 1, d] (rank `ndim`) constants (half_l, offset, shift, scale).

  ``zhat = (round(tanh(z + shift) * half_l - offset) + code_offset) / scale``
  where code_offset is `offset` for "symmetric" and 0 otherwise. As in the
  paper's code, half_l is computed in float64 and rounded once to float32, and
  shift is ``tan`` (or ``atanh``) evaluated by JAX in float32.
  """
  _common.check_choice("bound", bound, BOUNDS)
  l = np.asarray(levels, np.float64)
  offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
  if bound == "symmetric":
    half_l = (l - 1) / 2
    scale = half_l
  else:
    half_l = (l - 1) * (1 - _EPS) / 2
    scale = np.asarray([L // 2 for L in levels], np.float64)
  f32 = lambda a: _common.lift(jnp.asarray(np.asarray(a, np.float32)), ndim)
  half_l, offset, scale = f32(half_l), f32(offset), f32(scale)
  if bound == "symmetric":
    shift = jnp.zeros_like(half_l)
  else:
    shift = (jnp.tan if bound == "reference" else jnp.arctanh)(offset / half_l)
  return half_l, offset, shift, scale


def fsq_bound(z: jax.Array, levels: Sequence[int], *, bound: str = "reference"
              ) -> jax.Array:
  """float32[..., d]: the value FSQ rounds, ``tanh(z + shift) * half_l - offset``.

  For "symmetric" this is ``tanh(z) * (L-1)/2 - offset``. Exposed for tests and
  for callers that want the pre-rounding value.
  """
  z = _common.check_float("z", z)
  levels = check_levels(levels, z.shape[-1])
  half_l, offset, shift, _ = _grid(levels, bound, z.ndim)
  return jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset


def fsq(z: jax.Array, levels: Sequence[int], *, bound: str = "reference",
        impl: str = "xla", interpret: Any = False) -> tuple[jax.Array, jax.Array]:
  """Quantizes each channel of `z` to its FSQ grid; returns ``(zhat, indices)``.

  Args:
    z: float[..., d], unbounded (FSQ bounds it with tanh).
    levels: d ints >= 2, the number of values per channel.
    bound: "reference" (paper code, default), "atanh" or "symmetric"; see the
      module docstring.
    impl: "xla" (default, the code below), "auto" or "pallas". Where the kernel
      applies (bound "reference", z float32/bfloat16) these call
      ``jaxquant.kernels.fsq.fsq_quantize``: "auto" runs its Pallas kernel on
      TPU and CUDA GPUs and its XLA reference elsewhere, "pallas" the kernel
      (on a CPU only with `interpret`). Elsewhere "auto" is "xla".
    interpret: True or ``pltpu.InterpretParams()`` runs the kernel in the
      Pallas interpreter (tests on CPU).
  Returns:
    zhat: [..., d] of z's dtype, values on the grid in [-1, 1]; its gradient is
      straight-through rounding: ``d zhat/dz = bound'(z) / scale``.
    indices: int32[...], in ``[0, prod(levels))``.
  Raises:
    ValueError: bad `levels`, ``len(levels) != d``, an unknown `bound` or
      `impl`, or ``impl="pallas"`` with another bound or dtype than the kernel's.

  Example:
    >>> zhat, idx = fsq(jnp.zeros((2, 3)), (8, 5, 5))
    >>> idx.shape
    (2,)
  """
  z = _common.check_float("z", z)
  levels = check_levels(levels, z.shape[-1])
  _common.check_choice("impl", impl, kernels_common.IMPLS)
  _, offset, _, scale = _grid(levels, bound, z.ndim)
  kernel_applies = bound == "reference" and z.dtype in _KERNEL_DTYPES
  if impl == "pallas" and not kernel_applies:
    raise ValueError(f"impl='pallas' runs bound='reference' on float32/bfloat16 z; got "
                     f"bound={bound!r} and z of dtype {z.dtype}; use impl='auto' or 'xla'")
  if impl != "xla" and kernel_applies:
    rows = jax.lax.stop_gradient(z).reshape(-1, z.shape[-1])
    zhat_rows, indices = fsq_quantize(rows, levels, impl=impl, interpret=interpret)
    # The kernel has no gradient: the straight-through one is that of bound(z) / scale.
    zhat = _common.straight_through(fsq_bound(z, levels, bound=bound) / scale,
                                    zhat_rows.reshape(z.shape))
    return zhat.astype(z.dtype), indices.reshape(z.shape[:-1])
  code_offset = offset if bound == "symmetric" else jnp.zeros_like(offset)
  rounded = _common.round_ste(fsq_bound(z, levels, bound=bound))
  zhat = (rounded + code_offset) / scale
  return zhat.astype(z.dtype), fsq_codes_to_indices(zhat, levels, bound=bound)


def _basis(levels: tuple[int, ...]) -> jax.Array:
  """int32[d]: the mixed-radix basis [1, L0, L0*L1, ...]."""
  return jnp.asarray(np.cumprod((1,) + levels[:-1]).astype(np.int32))


def fsq_codes_to_indices(zhat: jax.Array, levels: Sequence[int], *,
                         bound: str = "reference") -> jax.Array:
  """int32[...]: the index of each FSQ code ``zhat: float[..., d]``.

  Digit i is ``zhat_i * scale_i + scale_i`` (scale is ``L // 2``, or ``(L - 1)/2``
  for "symmetric"), the code's position 0..L_i-1 on its channel; the index is
  ``sum(digit * basis)``. Digits are rounded before the int32 cast, so float
  error in `zhat` cannot move them (the paper's code truncates).
  """
  zhat = _common.check_float("zhat", zhat)
  levels = check_levels(levels, zhat.shape[-1])
  _, _, _, scale = _grid(levels, bound, zhat.ndim)
  digits = jnp.round(zhat.astype(jnp.float32) * scale + scale).astype(jnp.int32)
  return jnp.sum(digits * _common.lift(_basis(levels), zhat.ndim), axis=-1)


def fsq_indices_to_codes(indices: jax.Array, levels: Sequence[int], *,
                         bound: str = "reference") -> jax.Array:
  """float32[..., d]: the FSQ code of each index ``indices: int[...]``."""
  levels = check_levels(levels)
  indices = jnp.asarray(indices)
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f"indices must be an integer array; got dtype {indices.dtype}")
  ndim = indices.ndim + 1
  _, _, _, scale = _grid(levels, bound, ndim)
  level_arr = _common.lift(jnp.asarray(np.asarray(levels, np.int32)), ndim)
  digits = (indices.astype(jnp.int32)[..., None] // _common.lift(_basis(levels), ndim)
            ) % level_arr
  return (digits.astype(jnp.float32) - scale) / scale


def fsq_codebook(levels: Sequence[int], *, bound: str = "reference") -> jax.Array:
  """float32[prod(levels), d]: the implicit codebook, row i being index i's code."""
  levels = check_levels(levels)
  return fsq_indices_to_codes(jnp.arange(math.prod(levels), dtype=jnp.int32), levels,
                              bound=bound)


def residual_fsq_scales(levels: Sequence[int], num_stages: int) -> jax.Array:
  """float32[num_stages, d]: the default per-stage scales ``(L - 1) ** -s``.

  Stage 0 has scale 1. A grid of L values over [-1, 1] has spacing about
  ``2 / (L - 1)``, so the residual it leaves is within about ``1 / (L - 1)``;
  stage s therefore works at scale ``(L - 1) ** -s`` (per channel).
  """
  levels = check_levels(levels)
  stages = np.arange(num_stages, dtype=np.float64)[:, None]
  base = np.asarray(levels, np.float64)[None, :] - 1
  return jnp.asarray((base ** -stages).astype(np.float32))


def residual_fsq(z: jax.Array, levels: Sequence[int], num_stages: int,
                 scales: Optional[jax.Array] = None, *, bound: str = "reference"
                 ) -> tuple[jax.Array, jax.Array]:
  """Residual FSQ: stage s quantizes ``residual / scale_s`` and adds back ``* scale_s``.

  Args:
    z: float[..., d].
    levels: d ints >= 2, shared by all stages.
    num_stages: number of stages S >= 1 (static).
    scales: float[S] or float[S, d]; defaults to `residual_fsq_scales`.
    bound: as for `fsq`.
  Returns:
    zhat_sum: [..., d] of z's dtype, the sum of the stages' codes times scales.
      Gradients flow through every stage with straight-through rounding.
    indices: int32[..., S], the FSQ index of each stage.
  Raises:
    ValueError: bad levels/bound, ``num_stages < 1``, or scales of the wrong shape.
  """
  z = _common.check_float("z", z)
  levels = check_levels(levels, z.shape[-1])
  if not isinstance(num_stages, (int, np.integer)) or num_stages < 1:
    raise ValueError(f"num_stages={num_stages!r}; expected an int >= 1")
  d = len(levels)
  if scales is None:
    scales = residual_fsq_scales(levels, num_stages)
  scales = jnp.asarray(scales, jnp.float32)
  if scales.shape == (num_stages,):
    scales = jnp.broadcast_to(scales[:, None], (num_stages, d))
  if scales.shape != (num_stages, d):
    raise ValueError(f"scales has shape {scales.shape}; expected ({num_stages},) or "
                     f"({num_stages}, {d}) for num_stages={num_stages}, levels={levels}")
  residual = z.astype(jnp.float32)
  zhat_sum = jnp.zeros_like(residual)
  stage_indices = []
  for s in range(num_stages):
    scale = _common.lift(scales[s], residual.ndim)
    zhat, idx = fsq(residual / scale, levels, bound=bound)
    zhat = zhat * scale
    zhat_sum = zhat_sum + zhat
    residual = residual - zhat
    stage_indices.append(idx)
  return zhat_sum.astype(z.dtype), jnp.stack(stage_indices, axis=-1)
