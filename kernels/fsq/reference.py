"""XLA reference of `fsq_quantize`; also its fallback where no kernel runs.

Also the pieces the kernels share with it: the per-dimension constants
(`fsq_constants`) and an exact round-half-to-even built from `floor`
(`round_half_to_even`), since Pallas Triton has no rounding op.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-3


class FsqConstants(NamedTuple):
  """Per-dimension constants of FSQ, numpy float32[d] (`basis` int32[d])."""
  shift: np.ndarray       # tan(offset / half_l)
  half_l: np.ndarray      # (L - 1) (1 - EPS) / 2
  offset: np.ndarray      # 0.5 for even L, 0 for odd L
  half_width: np.ndarray  # L // 2
  basis: np.ndarray       # [1, L0, L0 L1, ...]


def fsq_constants(levels: Sequence[int]) -> FsqConstants:
  """The constants of `levels` (computed in float64, rounded once to float32)."""
  lv = np.asarray(levels, np.float64)
  half_l = (lv - 1) * (1 - EPS) / 2
  offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
  shift = np.tan(offset / half_l)
  basis = np.cumprod([1, *levels[:-1]], dtype=np.int64)
  f32 = lambda a: np.asarray(a, np.float32)
  return FsqConstants(f32(shift), f32(half_l), f32(offset),
                      f32(np.asarray(levels) // 2), np.asarray(basis, np.int32))


def round_half_to_even(x: jax.Array) -> jax.Array:
  """`jnp.round` (half to even, sign of zero kept) from floor, compare and select.

  ``x - floor(x)`` is exact for float32 except in (-1, 0), where rounding it can only
  move it onto 0.5 from above with floor(x) = -1 odd: both round up, so the result
  is exact everywhere (unlike ``floor(x + 0.5)``, which misrounds 0.5 + 2**-24).
  """
  f = jnp.floor(x)
  frac = x - f
  half = f * 0.5
  odd = jnp.floor(half) != half
  r = jnp.where((frac > 0.5) | ((frac == 0.5) & odd), f + 1.0, f)
  return jnp.where(r == 0.0, x * 0.0, r)  # -0.0 for x in [-0.5, 0), as round gives


def fsq_values(z: jax.Array, consts, round_fn=jnp.round):
  """The float32 arithmetic every implementation runs, in the same order.

  Args:
    z: float32[..., d].
    consts: `FsqConstants`, or arrays of its fields broadcasting against z.
    round_fn: round half to even (`jnp.round` or `round_half_to_even`).
  Returns:
    ``(zhat float32[..., d], terms int32[..., d])``: the index is the sum of the
    terms, ``(r_j + L_j // 2) * basis_j``, over the last axis.
  """
  bounded = jnp.tanh(z + consts.shift) * consts.half_l - consts.offset
  r = round_fn(bounded)
  zhat = r / consts.half_width
  codes = (r + consts.half_width).astype(jnp.int32)
  return zhat, codes * consts.basis


def fsq_block(z_ref, shift_ref, half_l_ref, offset_ref, half_width_ref, basis_ref,
              zhat_ref, idx_ref, *, keepdims: bool):
  """The body both kernels run on one block of rows: `fsq_values` with exact
  round-half-to-even, the index summed over the row (kept as a [rows, 1] column
  where the TPU layout wants one)."""
  consts = FsqConstants(shift_ref[...], half_l_ref[...], offset_ref[...],
                        half_width_ref[...], basis_ref[...])
  zhat, terms = fsq_values(z_ref[...].astype(jnp.float32), consts, round_half_to_even)
  zhat_ref[...] = zhat
  idx_ref[...] = jnp.sum(terms, axis=1, keepdims=keepdims)


@functools.partial(jax.jit, static_argnames=("levels",))
def fsq_quantize_reference(z: jax.Array, levels: tuple[int, ...]):
  """FSQ of the rows of z: the paper's bound, round half to even, scale and index.

  Per dimension j with ``L = levels[j]``: ``half_l = (L - 1)(1 - 1e-3) / 2``,
  ``offset = 0.5`` if L is even else 0, ``shift = tan(offset / half_l)``;
  ``r = round(tanh(z + shift) * half_l - offset)``; ``zhat = r / (L // 2)`` and
  ``index = sum_j (r_j + L_j // 2) * basis_j`` with ``basis = [1, L0, L0 L1, ...]``.

  Jitted, so that its float32 ops always compile together as they do in the kernels:
  inside one fusion XLA may contract ``tanh(.) * half_l - offset`` into an FMA,
  which moves a value by an ulp, and so can move it onto or off a tie. (Compilers
  for the accelerators make the same kind of choice, so the kernels on hardware can
  differ from the reference at such ulp-level ties.)

  Args:
    z: float32/bfloat16[N, d].
    levels: static tuple of d ints >= 2.
  Returns:
    ``(zhat float32[N, d], indices int32[N])``.
  """
  consts = FsqConstants(*(jnp.asarray(c)[None, :] for c in fsq_constants(levels)))
  zhat, weighted = fsq_values(z.astype(jnp.float32), consts)
  return zhat, jnp.sum(weighted, axis=-1)
