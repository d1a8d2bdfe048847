"""Low-rank adapters on a quantized base (QLoRA) and low-rank-plus-quantized init (LQ-LoRA).

QLoRA (Dettmers et al. 2023): a Dense kernel is stored as a frozen QArray
(nf4 in blocks of 64 in the paper) and fine-tuned through a low-rank update,

    y = x @ dequantize(base) + scale * (x @ a) @ b,   a [in, r], b [r, out],

with ``scale = alpha / r``, ``a`` random and ``b`` zero so training starts from
the base model. Only ``a`` and ``b`` are trained: the `LoRA` pytree holds them
(``scale`` is static metadata), so an optax optimizer over it updates nothing
else, and the base is a constant of the loss.

LQ-LoRA (Guo et al. 2023): instead of a zero update, split ``w`` into a
quantized part and a low-rank part, ``w ~ dequantize(Q) + a @ b``, by
alternating ``Q = quantize(w - a @ b)`` and ``a @ b = SVD_r(w - dequantize(Q))``
(`lq_lora_init`); the adapters then start from what quantization lost.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxquant.matmul import matmul
from jaxquant.qarray import QArray
from jaxquant.quantize import QuantSpec, dequantize, quantize

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA:
  """Trainable low-rank adapters of one Dense kernel.

  Attributes:
    a: float[in, rank], random at init.
    b: float[rank, out], zero at init.
    scale: ``alpha / rank`` (static: not a leaf, so optimizers never touch it).
  """

  a: jax.Array
  b: jax.Array
  scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))


def lora_init(key: jax.Array, w_shape: Sequence[int], rank: int, *,
              alpha: Optional[float] = None, dtype: Any = jnp.float32) -> LoRA:
  """Adapters for a ``[in, out]`` kernel that start as the zero update.

  ``a`` is uniform in ``±1/sqrt(in)`` (the Kaiming-uniform bound of a Dense
  layer with ``in`` inputs), ``b`` is zero, ``scale = alpha / rank``.

  Args:
    key: PRNG key for ``a``.
    w_shape: (in, out) of the base kernel.
    rank: the adapter rank, 1 <= rank <= min(in, out).
    alpha: the LoRA alpha; None for ``alpha = rank`` (scale 1).
    dtype: dtype of ``a`` and ``b``.
  Returns:
    `LoRA` with a dtype[in, rank], b dtype[rank, out].
  Raises:
    ValueError: `w_shape` is not 2-D or `rank` is out of range.

  Example:
    >>> lora = jq.ptq.lora_init(jax.random.key(0), w.shape, rank=8, alpha=16)
  """
  if len(w_shape) != 2:
    raise ValueError(f"w_shape={tuple(w_shape)}; expected a Dense kernel shape (in, out)")
  fan_in, fan_out = (int(n) for n in w_shape)
  if not 1 <= rank <= min(fan_in, fan_out):
    raise ValueError(f"rank={rank}; expected 1 <= rank <= {min(fan_in, fan_out)} for "
                     f"w_shape={tuple(w_shape)}")
  bound = 1 / math.sqrt(fan_in)
  a = jax.random.uniform(key, (fan_in, rank), dtype, -bound, bound)
  b = jnp.zeros((rank, fan_out), dtype)
  return LoRA(a=a, b=b, scale=float(rank if alpha is None else alpha) / rank)


@jax.jit
def lora_apply(x: jax.Array, qbase, a: jax.Array, b: jax.Array, scale: float = 1.0
               ) -> jax.Array:
  """``x @ dequantize(qbase) + scale * (x @ a) @ b``.

  The base product goes through `jaxquant.matmul` (a fused weight-only kernel
  where one applies); its gradient reaches ``x``, ``a`` and ``b``, never the base.

  Args:
    x: float[..., in].
    qbase: QArray (or float array) [in, out].
    a: float[in, rank]; b: float[rank, out].
    scale: the adapter scale (``LoRA.scale``).
  Returns:
    float[..., out] of x's dtype.
  Raises:
    ValueError: shapes that do not chain.

  Example:
    >>> y = jq.ptq.lora_apply(x, qbase, lora.a, lora.b, lora.scale)
  """
  k, n = qbase.shape
  if x.shape[-1] != k or a.shape[0] != k or tuple(b.shape) != (a.shape[1], n):
    raise ValueError(f"x {tuple(x.shape)}, qbase {(k, n)}, a {tuple(a.shape)}, b "
                     f"{tuple(b.shape)} do not chain as x[..., in] @ [in, out] and "
                     "x @ a[in, r] @ b[r, out]")
  base = matmul(x, qbase if isinstance(qbase, QArray) else qbase.astype(x.dtype))
  update = jnp.matmul(jnp.matmul(x, a.astype(x.dtype)), b.astype(x.dtype))
  return base + (update * scale).astype(x.dtype)


def _truncated_svd(r: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """(a, b) with ``a @ b`` the best rank-`rank` approximation of r; singular values
  split evenly (``a = U sqrt(S)``, ``b = sqrt(S) V^T``)."""
  u, s, vt = jnp.linalg.svd(r, full_matrices=False)
  root = jnp.sqrt(s[:rank])
  return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def lq_lora_init(w: jax.Array, spec: QuantSpec, rank: int, iters: int = 5
                 ) -> tuple[QArray, jax.Array, jax.Array]:
  """Splits ``w ~ dequantize(Q) + a @ b`` (LQ-LoRA), quantized plus low rank.

  Alternates, `iters` times: ``Q = quantize(w - a @ b, spec)``, then ``(a, b)`` the
  truncated SVD of ``w - dequantize(Q)``, starting from ``a @ b = 0`` (so the first
  Q is round-to-nearest and the first ``(a, b)`` already lowers its error), and
  returns the alternation's lowest-error ``(Q, a, b)``: the alternation usually,
  but not always, improves (RTN is not the best Q for a given ``a @ b``), and
  keeping the best makes the error non-increasing in `iters`.

  Args:
    w: float[in, out] kernel.
    spec: how the base is quantized (static), e.g. nf4 in blocks of 64.
    rank: rank of the low-rank part (static).
    iters: alternations, >= 1 (may be traced; then values below 1 act as 1).
  Returns:
    (Q, a float32[in, rank], b float32[rank, out]) from the same alternation,
    ``a @ b`` the best rank-`rank` fit of ``w - dequantize(Q)``; for `lora_apply`
    with scale 1 (or ``LoRA(a, b / scale, scale)``).
  Raises:
    ValueError: `w` not 2-D, `rank` out of range, or `iters` < 1.

  Example:
    >>> spec = jq.QuantSpec("nf4", channel_axes=(1,), block_sizes={0: 64})
    >>> q, a, b = jq.ptq.lq_lora_init(w, spec, rank=16)
  """
  if w.ndim != 2:
    raise ValueError(f"w has shape {tuple(w.shape)}; expected a Dense kernel [in, out]")
  if not 1 <= rank <= min(w.shape):
    raise ValueError(f"rank={rank}; expected 1 <= rank <= {min(w.shape)} for w of shape "
                     f"{tuple(w.shape)}")
  if isinstance(iters, int) and iters < 1:
    raise ValueError(f"iters={iters}; expected >= 1")
  return _lq_lora(w, spec, rank, iters)


@functools.partial(jax.jit, static_argnames=("spec", "rank"))
def _lq_lora(w, spec, rank, iters):
  w32 = w.astype(jnp.float32)

  def alternate(a, b):
    low_rank = jnp.matmul(a, b, precision=_HIGHEST)
    q = quantize((w32 - low_rank).astype(w.dtype), spec)
    residual = w32 - dequantize(q, jnp.float32)
    a, b = _truncated_svd(residual, rank)
    err = jnp.sum((residual - jnp.matmul(a, b, precision=_HIGHEST)) ** 2)
    return q, a, b, err

  def step(_, carry):
    current, best = carry
    new = alternate(*current[1:3])
    better = new[3] < best[3]
    best = jax.tree.map(lambda n, o: jnp.where(better, n, o), new, best)
    return new, best

  first = alternate(jnp.zeros((w.shape[0], rank), jnp.float32),
                    jnp.zeros((rank, w.shape[1]), jnp.float32))
  _, (q, a, b, _) = jax.lax.fori_loop(1, jnp.maximum(iters, 1), step, (first, first))
  return q, a, b
