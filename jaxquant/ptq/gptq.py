"""GPTQ (Frantar et al., 2022) and round-to-nearest for Dense kernels ``w [in, out]``.

GPTQ quantizes the input rows of ``w`` one at a time and spreads each row's
rounding error over the rows not yet quantized, weighted by the inverse of the
Hessian ``H = X^T X`` of the layer's inputs, so that the layer's output error
``tr(D^T H D)`` (`output_error`) stays small. As in the reference
implementation:

* ``H`` is damped by ``damp`` times its mean diagonal; inputs that are always
  zero (zero diagonal) get ``H_ii = 1`` and zero weights;
* the rows are processed with the upper Cholesky factor ``U`` of ``H^-1``
  (``H^-1 = U^T U``): row ``i``'s error ``e = (w_i - q_i) / U_ii`` updates row
  ``j > i`` by ``-U_ij e``; within a block of ``block_size`` rows at once, the
  rows after the block lazily by one matmul per block;
* ``act_order`` processes rows by decreasing ``H_ii``;
* with groups along the input axis (``block_sizes={0: g}``), static groups
  (the default) fix every group's scale and zero point from the original
  weights, per original-index group, so act-order and groups combine into an
  ordinary grouped `QArray`; ``static_groups=False`` (no act-order) fixes each
  group's scale from the updated weights when GPTQ reaches the group.

Rows are quantized with the spec's format by rounding to its nearest grid value
with the fixed scale (and zero point), so every format of the core with a scale
works: int2..int8 (symmetric or not), nf4, fp4_e2m1, fp8, ...

Precision: float32 throughout, matmuls at ``Precision.HIGHEST``. If the damped
Hessian is not numerically positive definite, damping is raised tenfold, up to
three times (see `_inverse_cholesky`).
"""

from __future__ import annotations

import functools
import math
from typing import Union

import jax
import jax.numpy as jnp

from jaxquant.qarray import QArray
from jaxquant.quantize import QuantSpec
from jaxquant.quantize import _decode  # pylint: disable=protected-access
from jaxquant.quantize import _encode  # pylint: disable=protected-access
from jaxquant.quantize import expand_groups
from jaxquant.quantize import quantize

_HIGHEST = jax.lax.Precision.HIGHEST
_DAMP_TRIES = 4
_MIN_RETRY_DAMP = 1e-4


def as_spec(spec: Union[QuantSpec, str]) -> QuantSpec:
  """`spec` as a `QuantSpec` (a format name means per tensor)."""
  if isinstance(spec, str):
    return QuantSpec(spec)
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"spec must be a QuantSpec or a format name; got {type(spec).__name__}")
  return spec


def check_kernel(w, name: str = "w") -> None:
  """Raises unless `w` is a floating-point 2-D array ``[in, out]``."""
  if getattr(w, "ndim", None) != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"{name} must be a float kernel [in, out]; got "
                     f"{getattr(w, 'dtype', type(w).__name__)}{list(getattr(w, 'shape', []))}")


_rtn = jax.jit(quantize, static_argnums=1)


def rtn(w: jax.Array, spec: Union[QuantSpec, str]) -> QArray:
  """Round-to-nearest quantization of a kernel: the baseline GPTQ and AWQ improve on.

  Args:
    w: float[in, out].
    spec: e.g. ``QuantSpec("int4", channel_axes=(1,), block_sizes={0: 128})``.
  Returns:
    ``jq.quantize(w, spec)``.
  """
  check_kernel(w)
  return _rtn(w, as_spec(spec))


def _inverse_cholesky(h: jax.Array, damp: jax.Array) -> jax.Array:
  """float32[n, n] upper U with ``U^T U = (h + d mean(diag h) I)^-1``.

  With J the reversal permutation and ``J H J = C C^T`` (C lower), ``H = R R^T``
  for the upper ``R = J C J``, so ``U = R^-1 = J C^-1 J``: one Cholesky and one
  triangular solve, no explicit inverse. ``d = damp`` first; while U is not
  finite (the damped matrix is not numerically positive definite in float32),
  ``d = max(damp, 1e-4) * 10^k`` for k = 1, 2, 3.
  """
  n = h.shape[0]
  eye = jnp.eye(n, dtype=jnp.float32)
  mean_diag = jnp.mean(jnp.diagonal(h))
  reversed_h = h[::-1, ::-1]

  def failed(carry):
    tries, u = carry
    return (tries < _DAMP_TRIES) & ~jnp.all(jnp.isfinite(u))

  def factor(carry):
    tries, _ = carry
    retry_level = jnp.maximum(damp, _MIN_RETRY_DAMP) * jnp.power(10.0, tries.astype(jnp.float32))
    level = jnp.where(tries == 0, damp, retry_level)
    lower = jnp.linalg.cholesky(reversed_h + (level * mean_diag) * eye)
    inverse = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    return tries + 1, jnp.triu(inverse[::-1, ::-1])

  _, u = jax.lax.while_loop(failed, factor, (jnp.int32(0), jnp.full((n, n), jnp.nan)))
  return u


def check_gptq_args(w, xtx, spec: QuantSpec, *, block_size, damp, act_order,
                    static_groups) -> None:
  """Raises the ValueError `gptq` would raise for these arguments (shapes suffice)."""
  check_kernel(w)
  n = w.shape[0]
  if tuple(getattr(xtx, "shape", ())) != (n, n):
    raise ValueError(f"xtx must be float32[{n}, {n}] for w of shape {tuple(w.shape)}; "
                     f"got shape {tuple(getattr(xtx, 'shape', ()))}")
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size={block_size!r} must be a positive int")
  if isinstance(damp, (int, float)) and not damp >= 0:
    raise ValueError(f"damp={damp!r} must be >= 0 (a fraction of the mean Hessian diagonal)")
  if spec.rounding != "nearest":
    raise ValueError(f"GPTQ rounds to nearest; spec.rounding={spec.rounding!r}")
  _, blocks = spec.resolve(tuple(w.shape))
  if 0 in blocks and not static_groups:
    if act_order:
      raise ValueError("act_order=True with groups along the input axis needs "
                       "static_groups=True (group scales fixed per original-index group)")
    if spec.tensor_scale:
      raise ValueError("static_groups=False cannot share one tensor_scale across groups "
                       "fixed at different times; use static_groups=True")


def gptq(w: jax.Array, xtx: jax.Array, spec: Union[QuantSpec, str], *,
         block_size: int = 128, damp: float = 0.01, act_order: bool = False,
         static_groups: bool = True) -> QArray:
  """GPTQ-quantizes a Dense kernel given its inputs' ``X^T X``.

  Args:
    w: float[in, out], with ``y = x @ w``.
    xtx: float32[in, in], the sum of ``x x^T`` over calibration tokens
      (`LayerStats.xtx`); only its relative scale matters.
    spec: how to quantize, as for `jaxquant.quantize`: per channel
      ``channel_axes=(1,)``, groups of g inputs ``block_sizes={0: g}``.
    block_size: rows per lazy-update block (with dynamic groups, rounded to a
      multiple of the group size).
    damp: damping, a fraction of the mean diagonal of `xtx` added to it.
    act_order: process inputs by decreasing ``xtx_ii``.
    static_groups: fix group scales from the original weights (required with
      act_order and groups); False fixes each from the updated weights.
  Returns:
    QArray[in, out] with `spec`; ``jq.dequantize`` gives the quantized kernel.
  Raises:
    ValueError: bad shapes or arguments, stochastic rounding, or act_order with
      non-static groups.

  Example:
    >>> spec = jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 32})
    >>> q = jq.ptq.gptq(w, stats["Dense_0"].xtx, spec, act_order=True)
  """
  spec = as_spec(spec)
  check_gptq_args(w, xtx, spec, block_size=block_size, damp=damp, act_order=act_order,
                  static_groups=static_groups)
  dead, perm, u = _hessian_factor(xtx, jnp.asarray(damp, jnp.float32), act_order=act_order)
  return _gptq(w, dead, perm, u, spec=spec, block_size=block_size,
               static_groups=static_groups)


@functools.partial(jax.jit, static_argnames=("act_order",))
def _hessian_factor(xtx, damp, *, act_order: bool):
  """(dead bool[n], perm int32[n], u float32[n, n]): GPTQ's view of ``xtx``.

  Dead inputs (zero diagonal) get ``H_ii = 1``; `perm` is the processing order
  (by decreasing ``H_ii`` with act_order); `u` the inverse Cholesky factor of
  the permuted, damped Hessian. Separate from `_gptq` so that it compiles once
  per input size, whatever the spec.
  """
  h = xtx.astype(jnp.float32)
  dead = jnp.diagonal(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  perm = (jnp.argsort(-jnp.diagonal(h), stable=True).astype(jnp.int32) if act_order
          else jnp.arange(h.shape[0], dtype=jnp.int32))
  return dead, perm, _inverse_cholesky(h[perm][:, perm], damp)


def _quantized_rows(spec, rows, scale, zero_point, tensor_scale):
  """float32 values of `rows` rounded with fixed per-element scale / zero point."""
  codes = _encode(spec, rows, scale, zero_point, tensor_scale, None)
  return _decode(spec, codes, scale, zero_point, tensor_scale)


def _pad_rows(x, rows: int, value: float):
  return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)), constant_values=value)


@functools.partial(jax.jit, static_argnames=("spec", "block_size", "static_groups"))
def _gptq(w, dead, perm, u, *, spec: QuantSpec, block_size: int, static_groups: bool
          ) -> QArray:
  """GPTQ's row loop, given `_hessian_factor`'s outputs."""
  n, m = w.shape
  _, blocks = spec.resolve((n, m))
  group = blocks.get(0)
  dynamic = group is not None and not static_groups
  asymmetric = not spec.symmetric

  w32 = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))
  reference = quantize(w32, spec)  # the static scales, zero points, tensor scale
  tensor_scale = reference.tensor_scale

  if dynamic:
    block = min(max(group, block_size // group * group), n)
  else:
    block = min(block_size, n)
  n_blocks = -(-n // block)
  n_pad = n_blocks * block
  rows_per_group = group if dynamic else block
  eye = jnp.eye(n_pad, dtype=jnp.float32)
  u = eye.at[:n, :n].set(u)  # padded rows: identity, so they never touch real rows
  w32 = _pad_rows(w32[perm], n_pad, 0.0)
  row_scale = _pad_rows(expand_groups(reference.scale.astype(jnp.float32), spec, (n, m))[perm],
                        n_pad, 1.0)
  row_zero = None
  if asymmetric:
    row_zero = _pad_rows(expand_groups(reference.zero_point.astype(jnp.float32), spec,
                                       (n, m))[perm], n_pad, 0.0)
  group_spec = spec.replace(block_sizes={a: b for a, b in blocks.items() if a != 0})
  index = jnp.arange(block)

  def block_body(b, carry):
    w32, row_scale, row_zero = carry
    start = b * block
    w_blk = jax.lax.dynamic_slice_in_dim(w32, start, block)
    u_blk = jax.lax.dynamic_slice(u, (start, start), (block, block))
    s_blk = jax.lax.dynamic_slice_in_dim(row_scale, start, block)
    z_blk = None if row_zero is None else jax.lax.dynamic_slice_in_dim(row_zero, start, block)

    def row_body(i, carry):
      w_blk, err_blk, s_blk, z_blk = carry
      row = jax.lax.dynamic_slice_in_dim(w_blk, i, 1)
      scale = jax.lax.dynamic_slice_in_dim(s_blk, i, 1)
      zero = None if z_blk is None else jax.lax.dynamic_slice_in_dim(z_blk, i, 1)
      err = (row - _quantized_rows(spec, row, scale, zero, tensor_scale)) / u_blk[i, i]
      later = jnp.where(index > i, u_blk[i], 0.0)  # rows <= i keep their pre-rounding values
      w_blk = w_blk - later[:, None] * err
      return w_blk, jax.lax.dynamic_update_slice_in_dim(err_blk, err, i, 0), s_blk, z_blk

    def group_body(k, carry):
      w_blk, err_blk, s_blk, z_blk = carry
      first = k * rows_per_group
      if dynamic:  # this group's scale from its rows as they are now
        rows = jax.lax.dynamic_slice_in_dim(w_blk, first, group)
        q = quantize(rows, group_spec)
        s_blk = jax.lax.dynamic_update_slice_in_dim(
            s_blk, expand_groups(q.scale.astype(jnp.float32), group_spec, rows.shape), first, 0)
        if asymmetric:
          z_blk = jax.lax.dynamic_update_slice_in_dim(
              z_blk, expand_groups(q.zero_point.astype(jnp.float32), group_spec, rows.shape),
              first, 0)
      return jax.lax.fori_loop(first, first + rows_per_group, row_body,
                               (w_blk, err_blk, s_blk, z_blk))

    carry = (w_blk, jnp.zeros((block, m), jnp.float32), s_blk, z_blk)
    if block == rows_per_group:
      w_blk, err_blk, s_blk, z_blk = group_body(0, carry)
    else:
      w_blk, err_blk, s_blk, z_blk = jax.lax.fori_loop(0, block // rows_per_group,
                                                       group_body, carry)
    w32 = jax.lax.dynamic_update_slice_in_dim(w32, w_blk, start, 0)
    row_scale = jax.lax.dynamic_update_slice_in_dim(row_scale, s_blk, start, 0)
    if row_zero is not None:
      row_zero = jax.lax.dynamic_update_slice_in_dim(row_zero, z_blk, start, 0)
    # Lazy update of the rows after the block (U is upper triangular).
    u_rows = jax.lax.dynamic_slice_in_dim(u, start, block)
    update = jnp.matmul(u_rows.T, err_blk, precision=_HIGHEST)
    after = jnp.arange(n_pad) >= start + block
    return w32 - jnp.where(after[:, None], update, 0.0), row_scale, row_zero

  w32, row_scale, row_zero = jax.lax.fori_loop(0, n_blocks, block_body,
                                               (w32, row_scale, row_zero))
  inverse = jnp.argsort(perm)
  w32, row_scale = w32[:n][inverse], row_scale[:n][inverse]
  row_zero = None if row_zero is None else row_zero[:n][inverse]
  codes = _encode(spec, w32, row_scale, row_zero, tensor_scale, None)
  scale, zero_point = reference.scale, reference.zero_point
  if dynamic:
    step = m // math.prod(spec.scale_shape((n, m))[1:])
    scale = row_scale[::group, ::step].astype(reference.scale.dtype)
    if asymmetric:
      zero_point = row_zero[::group, ::step].astype(reference.zero_point.dtype)
  return QArray(codes=codes, scale=scale, zero_point=zero_point, tensor_scale=tensor_scale,
                spec=spec, dtype=w.dtype)
