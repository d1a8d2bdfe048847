"""`dot_general` and `matmul` over QArrays: Pallas kernels where they apply, XLA elsewhere.

`dot_general` is a drop-in for `jax.lax.dot_general` whose operands may be
`QArray`s. A 2-D weight QArray contracted on its first axis by the last axis of
the activations (``x @ w``) runs a fused kernel from `jaxquant.kernels`:

============================  ======================================  ===========
weight (rhs)                  activations (lhs)                       kernel
============================  ======================================  ===========
int8, per channel or tensor   int8 QArray per token, or float with    w8a8
                              ``lhs_quant="int8"`` (dynamic per token)
fp8_e4m3, per channel/tensor  fp8_e4m3 QArray per token, or float     fp8
                              with ``lhs_quant="fp8_e4m3"``
int8/int4/nf4/fp4_e2m1, per   float32 / bfloat16                      weight-only
channel or groups of 32/64/
128 along K (incl. MXFP4)
============================  ======================================  ===========

The kernel is chosen per platform when the computation is lowered
(`jax.lax.platform_dependent`): the Mosaic kernel on TPU, the Triton kernel on
CUDA GPUs, the XLA reference elsewhere; so `jax.export` of a function calling
`dot_general` for ``platforms=["tpu"]`` or ``["cuda"]`` embeds that platform's
kernel, from any machine. Everything else takes the XLA path: int8 x int8 ->
int32 when both operands' scales factor out of the contraction, otherwise the
operands are dequantized and contracted in float.

Gradients flow to float operands: through the kernels by a custom VJP (the
activation gradient is ``g @ dequantize(w).T``; quantizing activations on the
fly is straight-through), through the XLA path by ordinary autodiff. QArray
operands are constants (a frozen quantized base, as in QLoRA).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum

from jaxquant.kernels import fp8_matmul as fp8_kernel
from jaxquant.kernels import w8a8_matmul as w8a8_kernel
from jaxquant.kernels import weight_only_matmul as weight_only_kernel
from jaxquant.qarray import QArray
from jaxquant.quantize import QuantSpec, dequantize, quantize

LHS_QUANT_FORMATS = ("int8", "fp8_e4m3")
_WEIGHT_ONLY_FORMATS = ("int8", "int4", "nf4", "fp4_e2m1")
_GROUP_SIZES = (32, 64, 128)


# ----------------------------------------------------------------------------
# Quantized contractions: integer codes when the scales factor out, else float.


def as_float(a, dtype) -> jax.Array:
  """A QArray dequantized in its own dtype, then cast; an array cast to `dtype`."""
  if isinstance(a, QArray):
    a = dequantize(a)
  return jnp.asarray(a).astype(dtype)


def _shape(a) -> tuple[int, ...]:
  return tuple(a.shape)


def _int_codes(q: QArray) -> jax.Array:
  return q.codes.astype(jnp.int8)


def _factors(q, letters: Sequence[str], out_letters: Sequence[str]) -> bool:
  """Whether q's scale factors out of a contraction.

  True for symmetric integer codes of <= 8 bits whose scale is constant along
  every reduced axis and per index (or shared) along every kept axis: no
  blocks, zero points or second-level scales.
  """
  if not isinstance(q, QArray):
    return False
  fmt = q.format
  if (fmt.kind != "int" or fmt.bits > 8 or q.zero_point is not None
      or q.tensor_scale is not None or len(set(letters)) != len(letters)):
    return False
  return all(n == 1 or (c in out_letters and n == size)
             for n, size, c in zip(q.scale.shape, q.shape, letters))


def _scale_in_output(q: QArray, letters: Sequence[str], out_letters: Sequence[str]
                     ) -> jax.Array:
  """q's float32 scale laid out like the output: its kept axes in place, 1 elsewhere."""
  scale = q.scale.astype(jnp.float32)
  kept = [c for c in out_letters if c in letters]
  dropped = [i for i, c in enumerate(letters) if c not in out_letters]
  scale = jnp.transpose(scale, [letters.index(c) for c in kept] + dropped)
  sizes = dict(zip(kept, scale.shape))
  return jnp.reshape(scale, [sizes.get(c, 1) for c in out_letters])


def _int_contraction(lhs: QArray, rhs: QArray, letters, contract: Callable,
                     out_dtype) -> jax.Array:
  """``contract(lhs codes, rhs codes)`` in int32, both scales applied once, in float32."""
  lhs_letters, rhs_letters, out_letters = letters
  acc = contract(_int_codes(lhs), _int_codes(rhs))
  out = acc.astype(jnp.float32) * _scale_in_output(lhs, lhs_letters, out_letters)
  out = out * _scale_in_output(rhs, rhs_letters, out_letters)
  return out.astype(out_dtype)


def int_path_applies(lhs, rhs, letters) -> bool:
  """Whether a contraction with these operands takes the int8 x int8 -> int32 path."""
  lhs_letters, rhs_letters, out_letters = letters
  return (_factors(lhs, lhs_letters, out_letters)
          and _factors(rhs, rhs_letters, out_letters))


def _dot_letters(lhs_ndim: int, rhs_ndim: int, dimension_numbers):
  """Axis labels of a dot_general: (lhs, rhs, out), shared labels for batch/contract."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs = [f"l{i}" for i in range(lhs_ndim)]
  rhs = [f"r{i}" for i in range(rhs_ndim)]
  for n, (a, b) in enumerate(zip(lhs_contract, rhs_contract)):
    lhs[a] = rhs[b] = f"c{n}"
  for n, (a, b) in enumerate(zip(lhs_batch, rhs_batch)):
    lhs[a] = rhs[b] = f"b{n}"
  out = ([f"b{n}" for n in range(len(lhs_batch))]
         + [c for c in lhs if c.startswith("l")] + [c for c in rhs if c.startswith("r")])
  return lhs, rhs, out


def _sharding_kwargs(out_sharding) -> dict:
  return {} if out_sharding is None else {"out_sharding": out_sharding}


def quantized_dot_general(lhs, rhs, dimension_numbers, *, dtype, precision=None,
                          preferred_element_type=None, out_sharding=None) -> jax.Array:
  """`jax.lax.dot_general` over arrays or QArrays.

  Args:
    lhs, rhs: float arrays or QArrays.
    dimension_numbers: as for `jax.lax.dot_general`.
    dtype: the compute dtype floats are cast to (the layer's promoted dtype).
    precision, preferred_element_type, out_sharding: as for `jax.lax.dot_general`
      on the float path; the int path returns `preferred_element_type` or `dtype`.
  Returns:
    The contraction; int8 x int8 -> int32 with scales applied after the dot when
    `int_path_applies`, else dequantize-then-dot.
  """
  lhs_ndim, rhs_ndim = len(_shape(lhs)), len(_shape(rhs))
  letters = _dot_letters(lhs_ndim, rhs_ndim, dimension_numbers)
  if int_path_applies(lhs, rhs, letters):
    contract = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers,
                                 preferred_element_type=jnp.int32,
                                 **_sharding_kwargs(out_sharding))
    return _int_contraction(lhs, rhs, letters, contract, preferred_element_type or dtype)
  return jax.lax.dot_general(as_float(lhs, dtype), as_float(rhs, dtype),
                             dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type,
                             **_sharding_kwargs(out_sharding))


def explicit_einsum(equation: str, lhs_shape, rhs_shape) -> tuple[str, str, str]:
  """(lhs, rhs, out) subscripts of a two-operand einsum, ellipses spelled out."""
  equation = equation.replace(" ", "")
  if "->" not in equation or equation.count(",") != 1:
    raise ValueError(f"einsum equation {equation!r} must be explicit ('->') with "
                     "exactly two operands")
  operands = (jax.ShapeDtypeStruct(tuple(lhs_shape), jnp.float32),
              jax.ShapeDtypeStruct(tuple(rhs_shape), jnp.float32))
  inputs, out, _ = opt_einsum.parser.parse_einsum_input((equation, *operands))
  lhs, rhs = inputs.split(",")
  return lhs, rhs, out


def quantized_einsum(equation: str, lhs, rhs, *, dtype, precision=None,
                     preferred_element_type=None, out_sharding=None) -> jax.Array:
  """`jnp.einsum` of two operands, arrays or QArrays (int path as for dot_general)."""
  lhs_letters, rhs_letters, out_letters = explicit_einsum(
      equation, _shape(lhs), _shape(rhs))
  explicit = f"{lhs_letters},{rhs_letters}->{out_letters}"
  letters = (list(lhs_letters), list(rhs_letters), list(out_letters))
  if int_path_applies(lhs, rhs, letters):
    contract = functools.partial(jnp.einsum, explicit, preferred_element_type=jnp.int32,
                                 **_sharding_kwargs(out_sharding))
    return _int_contraction(lhs, rhs, letters, contract, preferred_element_type or dtype)
  return jnp.einsum(explicit, as_float(lhs, dtype), as_float(rhs, dtype),
                    precision=precision, preferred_element_type=preferred_element_type,
                    **_sharding_kwargs(out_sharding))


def _conv_letters(ndim: int, dimension_numbers):
  """Axis labels of a convolution; the output's spatial axes are its own labels."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  lhs, rhs, out = [""] * ndim, [""] * ndim, [""] * ndim
  lhs[lhs_spec[0]], lhs[lhs_spec[1]] = "n", "c"
  rhs[rhs_spec[0]], rhs[rhs_spec[1]] = "o", "c"
  out[out_spec[0]], out[out_spec[1]] = "n", "o"
  for i in range(2, ndim):
    lhs[lhs_spec[i]], rhs[rhs_spec[i]], out[out_spec[i]] = f"s{i}", f"k{i}", f"p{i}"
  return lhs, rhs, out


def quantized_conv(lhs, rhs, window_strides, padding, *, dimension_numbers, dtype,
                   lhs_dilation=None, rhs_dilation=None, feature_group_count=1,
                   precision=None, preferred_element_type=None, out_sharding=None
                   ) -> jax.Array:
  """`jax.lax.conv_general_dilated` over arrays or QArrays.

  The int path needs activation scales constant over the spatial and feature
  axes (per tensor or per example) and kernel scales per output feature.
  """
  dn = jax.lax.conv_dimension_numbers(_shape(lhs), _shape(rhs), dimension_numbers)
  conv = functools.partial(
      jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dn,
      feature_group_count=feature_group_count, **_sharding_kwargs(out_sharding))
  letters = _conv_letters(len(_shape(lhs)), dn)
  if int_path_applies(lhs, rhs, letters):
    contract = functools.partial(conv, preferred_element_type=jnp.int32)
    return _int_contraction(lhs, rhs, letters, contract, preferred_element_type or dtype)
  return conv(as_float(lhs, dtype), as_float(rhs, dtype), precision=precision,
              preferred_element_type=preferred_element_type)


# ----------------------------------------------------------------------------
# Kernel paths: which kernel a contraction can use, and running it.


@dataclasses.dataclass(frozen=True)
class _Plan:
  """A contraction ``lhs[M, K] @ rhs[K, N]`` that a kernel runs (static, hashable)."""

  kernel: str  # "w8a8", "fp8" or "weight_only"
  lhs_quant: Optional[str]  # quantize a float lhs per token to this format first
  group_size: int  # weight-only: rows of K per scale (K for per channel)
  x_dtype: Any  # dtype of a float lhs (the gradient's dtype)
  out_dtype: Any
  impl: str
  interpret: Any


def _is_matmul(lhs_ndim: int, rhs_ndim: int, dimension_numbers) -> bool:
  """Whether the contraction is ``lhs[..., K] @ rhs[K, N]``."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  return (rhs_ndim == 2 and lhs_ndim >= 1 and not lhs_batch and not rhs_batch
          and tuple(lhs_contract) == (lhs_ndim - 1,) and tuple(rhs_contract) == (0,))


def _weight_groups(w: QArray) -> Optional[int]:
  """Rows of K per scale of a symmetric [K, N] weight scaled per column (or tensor)
  and in groups along K; None for any other layout."""
  if w.zero_point is not None:
    return None
  (k, n), (rows, cols) = w.shape, w.scale.shape
  if cols not in (1, n) or k % rows:
    return None
  return k // rows


def _per_token(x: QArray) -> bool:
  """Whether an activation QArray has one scale per row (or one in all)."""
  return (x.zero_point is None and x.tensor_scale is None
          and x.scale.shape[-1] == 1 and x.scale.shape[:-1] in (x.shape[:-1], (1,) * (x.ndim - 1)))


def _plan(lhs, rhs, dimension_numbers, lhs_quant, out_dtype, impl, interpret
          ) -> Optional[_Plan]:
  """The kernel that runs this contraction, or None for the XLA path."""
  if not isinstance(rhs, QArray) or not _is_matmul(lhs.ndim, rhs.ndim, dimension_numbers):
    return None
  group = _weight_groups(rhs)
  fmt = rhs.format.name
  if group is None:
    return None
  plan = functools.partial(_Plan, group_size=group, out_dtype=out_dtype, impl=impl,
                           interpret=interpret)
  per_channel = group == rhs.shape[0]
  if fmt in LHS_QUANT_FORMATS and per_channel and rhs.tensor_scale is None:
    kernel = "w8a8" if fmt == "int8" else "fp8"
    if isinstance(lhs, QArray):
      if lhs.format.name == fmt and _per_token(lhs):
        return plan(kernel, None, x_dtype=lhs.dtype)
    elif lhs_quant == fmt:
      return plan(kernel, fmt, x_dtype=lhs.dtype)
  if (isinstance(lhs, QArray) or lhs_quant is not None
      or lhs.dtype not in (jnp.float32, jnp.bfloat16) or fmt not in _WEIGHT_ONLY_FORMATS):
    return None
  k = rhs.shape[0]
  if fmt != "int8" and (k % 2 or not (per_channel or (k // 2) % group == 0)):
    return None  # 4-bit codes pack two halves of K into a byte
  if not (per_channel or group in _GROUP_SIZES):
    return None
  return plan("weight_only", None, x_dtype=lhs.dtype)


def _column_scale(q: QArray, rows: int) -> jax.Array:
  """float32[rows, N] scale of a [K, N] weight (tensor scale folded in)."""
  scale = q.scale.astype(jnp.float32)
  if q.tensor_scale is not None:
    scale = scale * q.tensor_scale
  return jnp.broadcast_to(scale, (rows, q.shape[1]))


def _nibbles(q: QArray) -> jax.Array:
  """uint8[K, N] 4-bit patterns of a 4-bit weight's codes."""
  codes = q.codes
  if codes.dtype == jnp.int4:
    return codes.astype(jnp.int8).astype(jnp.uint8) & jnp.uint8(0xF)
  if codes.dtype != jnp.uint4:  # fp4_e2m1
    codes = jax.lax.bitcast_convert_type(codes, jnp.uint4)
  return codes.astype(jnp.uint8)


def _token_quantized(x, fmt: Optional[str]) -> QArray:
  """`x` as a per-token QArray: quantized now (`fmt`) or already one."""
  if fmt is None:
    return x
  return quantize(x, QuantSpec(fmt, channel_axes=(0,)))


def _run(plan: _Plan, x, w: QArray) -> jax.Array:
  """``x[M, K] @ w[K, N]`` by the plan's kernel."""
  options = dict(out_dtype=plan.out_dtype, impl=plan.impl, interpret=plan.interpret)
  if plan.kernel == "weight_only":
    fmt = w.format.name
    codes = w.codes if fmt == "int8" else weight_only_kernel.pack_halves(_nibbles(w))
    return weight_only_kernel.weight_only_matmul(
        x, codes, _column_scale(w, w.shape[0] // plan.group_size), fmt=fmt,
        group_size=plan.group_size, **options)
  xq = _token_quantized(x, plan.lhs_quant)
  x_scale = jnp.broadcast_to(xq.scale.astype(jnp.float32), (xq.shape[0], 1))
  w_scale = _column_scale(w, 1)
  kernel = w8a8_kernel.w8a8_matmul if plan.kernel == "w8a8" else fp8_kernel.fp8_matmul
  return kernel(xq.codes, x_scale, w.codes, w_scale, **options)


def _zero_cotangent(tree):
  """Zero cotangents for a pytree of arrays (float0 for integer leaves)."""
  def zero(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
      return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)
  return jax.tree.map(zero, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_matmul(plan: _Plan, x, w: QArray) -> jax.Array:
  return _run(plan, x, w)


def _kernel_matmul_fwd(plan, x, w):
  return _run(plan, x, w), (x, w)


def _kernel_matmul_bwd(plan, residuals, g):
  x, w = residuals
  if isinstance(x, QArray):
    return _zero_cotangent(x), _zero_cotangent(w)
  grad_x = jax.lax.dot_general(g.astype(jnp.float32), dequantize(w, jnp.float32),
                               (((1,), (1,)), ((), ())))
  return grad_x.astype(plan.x_dtype), _zero_cotangent(w)


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


# ----------------------------------------------------------------------------
# Public functions.


def _straight_through_token_quant(x: jax.Array, fmt: str) -> jax.Array:
  """`x` rounded through per-token `fmt` codes, with the identity as its gradient."""
  spec = QuantSpec(fmt, channel_axes=tuple(range(x.ndim - 1)))
  rounded = dequantize(quantize(jax.lax.stop_gradient(x), spec))
  return x + jax.lax.stop_gradient(rounded - x)


def _result_dtype(lhs, rhs):
  """A float operand's dtype (a QArray adopts it); of two QArrays, their promoted
  original dtypes; of two floats, their promotion."""
  if isinstance(lhs, QArray) != isinstance(rhs, QArray):
    return rhs.dtype if isinstance(lhs, QArray) else lhs.dtype
  return jnp.promote_types(lhs.dtype, rhs.dtype)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                *, lhs_quant: Optional[str] = None, impl: str = "auto",
                interpret: Any = False, out_sharding=None) -> jax.Array:
  """`jax.lax.dot_general` where either operand may be a `QArray`.

  Args:
    lhs, rhs: float arrays or QArrays.
    dimension_numbers: ``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))``.
    precision: as for `jax.lax.dot_general` (XLA float path only).
    preferred_element_type: the result dtype; default: the float operand's dtype
      (a QArray adopts it: bfloat16 activations times an int4 weight give
      bfloat16), or the promoted original dtypes of two QArrays.
    lhs_quant: None, "int8" or "fp8_e4m3": quantize a float `lhs` per token
      (one scale for each index of its non-contracted axes) on the fly, for
      w8a8 / fp8 matmuls; the gradient passes straight through.
    impl: "auto" (the platform's kernel where one applies, else XLA), "xla", or
      "pallas" (a kernel, or a ValueError when none applies).
    interpret: True or `pltpu.InterpretParams()` runs the TPU kernel in the Pallas
      interpreter (on any machine).
    out_sharding: as for `jax.lax.dot_general` (XLA path).
  Returns:
    The contraction: equal to ``jax.lax.dot_general`` of the dequantized
    operands, up to the rounding of the output dtype.
  Raises:
    ValueError: an unknown `impl` or `lhs_quant`, `lhs_quant` with a QArray lhs,
      or ``impl="pallas"`` for a contraction no kernel runs.

  Example:
    >>> w = jq.quantize(w_f32, jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 128}))
    >>> y = jq.dot_general(x, w, (((1,), (0,)), ((), ())))  # x: bfloat16[M, K]
  """
  if impl not in ("auto", "xla", "pallas"):
    raise ValueError(f"impl={impl!r}; expected 'auto', 'xla' or 'pallas'")
  if lhs_quant is not None:
    if lhs_quant not in LHS_QUANT_FORMATS:
      raise ValueError(f"lhs_quant={lhs_quant!r}; expected None or one of {LHS_QUANT_FORMATS}")
    if isinstance(lhs, QArray):
      raise ValueError("lhs_quant quantizes a float lhs; this lhs is already a QArray")
  out_dtype = preferred_element_type or _result_dtype(lhs, rhs)
  plan = _plan(lhs, rhs, dimension_numbers, lhs_quant, out_dtype, impl, interpret)
  if plan is not None:
    # [..., K] -> [M, K] (a QArray's codes and per-token scales alike).
    flat = jax.tree.map(lambda a: a.reshape(-1, a.shape[-1]), lhs)
    out = _kernel_matmul(plan, flat, rhs)
    return out.reshape(*lhs.shape[:-1], rhs.shape[1])
  if impl == "pallas":
    raise ValueError(
        "impl='pallas': no kernel runs this contraction; kernels take x[..., K] @ "
        "w[K, N] with w an int8/int4/nf4/fp4_e2m1/fp8_e4m3 QArray scaled per column "
        f"or in groups along K (got lhs {_describe(lhs)}, rhs {_describe(rhs)}, "
        f"dimension_numbers={dimension_numbers}, lhs_quant={lhs_quant!r})")
  if lhs_quant is not None:
    lhs = _straight_through_token_quant(lhs, lhs_quant)
  return quantized_dot_general(lhs, rhs, dimension_numbers, dtype=_result_dtype(lhs, rhs),
                               precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding)


def _describe(a) -> str:
  if isinstance(a, QArray):
    return f"QArray[{a.format.name}]{tuple(a.shape)} scale{tuple(a.scale.shape)}"
  return f"{a.dtype}{tuple(a.shape)}"


def matmul(x, w, **kwargs) -> jax.Array:
  """``x @ w`` for ``x[..., K]`` and ``w[K, N]``, either a QArray; see `dot_general`."""
  return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), **kwargs)
