"""Lookup-free quantization (MAGVIT-v2) and binary spherical quantization (BSQ).

Both quantize each of the `d` channels to one bit: LFQ to ``sign(z) in {-1, +1}``,
BSQ to ``sign(u) / sqrt(d)`` for ``u = z / ||z||``. A code's index is
``sum_i 2^i [z_i > 0]`` (channel i is bit i), so `d` is at most 31. Zero counts
as negative. Gradients are straight-through.

Entropy loss. A sample z gets a soft assignment over the codes c,
``p(c | z) = softmax_c(-||z - s c||^2 / temperature)`` with ``s = code_scale``
(1 for LFQ, ``1/sqrt(d)`` for BSQ on u). The loss is ``mean_n H(p(. | z_n)) -
gamma * H(mean_n p(. | z_n))``: confident per sample, diverse over the batch.

`group_size` splits the d bits into groups of `group_size` and sums the
entropies of the groups' marginals (BSQ's factorization). Because ``-||z - s
c||^2`` is a sum over channels, p(c | z) factorizes over any grouping, so the
per-sample term is exact for every group size; the batch term becomes the sum of
the group marginals' entropies, an upper bound of the joint entropy, equal when
the groups are independent under the batch-mean distribution. ``group_size = d``
(or None) is the exact loss.

No N x 2^g table is built for a group of g bits: p(. | z) over the group is the
outer product of its distributions over the two halves of its bits (2^(g/2)
codes each), so the per-sample entropy is the sum of the halves' entropies and
the batch mean ``mean_n pl_n (x) ph_n`` is one [2^(g/2), N] x [N, 2^(g/2)]
matmul. Memory is O(N 2^(g/2) + 2^g): the exact loss over 2^16 codes at
32 x 1024 tokens and its gradient take about 0.4 GiB of temporaries under jit,
where one N x 2^16 float32 table alone is 8 GiB.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.vq import _common

_MAX_BITS = 31  # int32 indices
_HIGHEST = jax.lax.Precision.HIGHEST
_MAX_EXACT_BITS = 12  # group_size=None is accepted up to here; beyond, choose group_size


def _check_bits(z: jax.Array) -> jax.Array:
  z = _common.check_float("z", z)
  if z.shape[-1] > _MAX_BITS:
    raise ValueError(f"z has {z.shape[-1]} channels (bits); int32 indices allow at "
                     f"most {_MAX_BITS}")
  return z


def bits_to_indices(bits: jax.Array) -> jax.Array:
  """int32[...]: ``sum_i 2^i bits[..., i]`` for ``bits: bool/int[..., d]`` (d <= 31)."""
  bits = jnp.asarray(bits)
  if bits.ndim < 1 or bits.shape[-1] > _MAX_BITS:
    raise ValueError(f"bits has shape {bits.shape}; expected [..., d] with d <= {_MAX_BITS}")
  powers = jnp.asarray(2 ** np.arange(bits.shape[-1], dtype=np.int64), jnp.int32)
  return jnp.sum(bits.astype(jnp.int32) * _common.lift(powers, bits.ndim), axis=-1)


def indices_to_bits(indices: jax.Array, num_bits: int) -> jax.Array:
  """int32[..., num_bits] of 0/1: bit i of each index (the inverse of `bits_to_indices`)."""
  if not 1 <= num_bits <= _MAX_BITS:
    raise ValueError(f"num_bits={num_bits}; expected 1 <= num_bits <= {_MAX_BITS}")
  indices = jnp.asarray(indices, jnp.int32)[..., None]
  shifts = _common.lift(jnp.arange(num_bits, dtype=jnp.int32), indices.ndim)
  return (indices >> shifts) & 1


def lfq_indices_to_codes(indices: jax.Array, num_bits: int) -> jax.Array:
  """float32[..., num_bits]: the LFQ code (+1 / -1 per bit) of each index."""
  return indices_to_bits(indices, num_bits).astype(jnp.float32) * 2.0 - 1.0


def lfq(z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Lookup-free quantization: ``(zq, indices)`` with zq = +1 where z > 0, else -1.

  Args:
    z: float[..., d], d <= 31.
  Returns:
    zq: [..., d] of z's dtype in {-1, +1}; straight-through gradient (identity).
    indices: int32[...], ``sum_i 2^i [z_i > 0]``.
  """
  z = _check_bits(z)
  positive = z > 0
  codes = jnp.where(positive, 1.0, -1.0).astype(z.dtype)
  return _common.straight_through(z, codes), bits_to_indices(positive)


def bsq(z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Binary spherical quantization: ``zq = sign(u) / sqrt(d)``, ``u = z / ||z||``.

  Args:
    z: float[..., d], d <= 31.
  Returns:
    zq: [..., d] of z's dtype and unit norm, values ``±1/sqrt(d)``; the gradient
      is straight-through to u, then through the normalization to z.
    indices: int32[...], as for `lfq` (the signs of u are those of z).
  """
  z = _check_bits(z)
  z32 = z.astype(jnp.float32)
  u = z32 / jnp.maximum(jnp.sqrt(jnp.sum(z32 * z32, axis=-1, keepdims=True)), 1e-12)
  positive = u > 0
  codes = jnp.where(positive, 1.0, -1.0) / math.sqrt(z.shape[-1])
  zq = _common.straight_through(u, codes.astype(jnp.float32))
  return zq.astype(z.dtype), bits_to_indices(positive)


def _code_probs(groups: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
  """(probs, log_probs), float32[N, G, 2^b]: ``softmax_c(scale * z.c)`` over the
  LFQ codes c of b bits, for each group z of ``groups: float32[N, G, b]``.

  With ``scale = 2 s / temperature`` this is p(c | z): ``-||z - s c||^2 = 2 s z.c
  - ||z||^2 - s^2 b`` and only ``2 s z.c`` depends on c.
  """
  num_bits = groups.shape[-1]
  codes = lfq_indices_to_codes(jnp.arange(2**num_bits, dtype=jnp.int32), num_bits)
  dots = jnp.einsum("ngb,cb->ngc", groups, codes, precision=_HIGHEST)
  log_probs = jax.nn.log_softmax(dots * scale, axis=-1)
  return jnp.exp(log_probs), log_probs


def _entropy(probs: jax.Array) -> jax.Array:
  """Entropy in nats over the last axis (0 log 0 = 0)."""
  return -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)


def lfq_entropy_terms(z: jax.Array, *, temperature: float = 0.01,
                      group_size: Optional[int] = None, code_scale: float = 1.0,
                      axis_name: Optional[str] = None) -> tuple[jax.Array, jax.Array]:
  """float32 scalars ``(per_sample_entropy, codebook_entropy)`` of the LFQ loss.

  See `lfq_entropy_loss` and the module docstring for the definitions.
  """
  z = _check_bits(z)
  num_bits = z.shape[-1]
  if group_size is None:
    if num_bits > _MAX_EXACT_BITS:
      raise ValueError(f"group_size=None computes over all 2^{num_bits} codes; expected "
                       f"at most {_MAX_EXACT_BITS} bits, or pass group_size (e.g. 8; "
                       "group_size=d, up to 16, is the exact loss)")
    group_size = num_bits
  if not isinstance(group_size, int) or group_size < 1 or num_bits % group_size:
    raise ValueError(f"group_size={group_size!r} must be a positive int dividing the "
                     f"number of bits {num_bits}")
  if group_size > 16:
    raise ValueError(f"group_size={group_size} averages a distribution over "
                     f"2^{group_size} codes per group; expected at most 16")
  groups = z.astype(jnp.float32).reshape(-1, num_bits // group_size, group_size)
  num_samples, num_groups = groups.shape[:2]
  split = group_size // 2
  halves = [groups[..., :split], groups[..., split:]] if split else [groups]
  probs, per_sample = [], 0.0
  for half in halves:
    half_probs, half_log_probs = _code_probs(half, 2.0 * code_scale / temperature)
    probs.append(half_probs)
    per_sample = per_sample - jnp.sum(half_probs * half_log_probs, axis=(-2, -1))
  per_sample = jnp.mean(per_sample)
  if split:  # mean_n pl_n (x) ph_n, flattened to [G, 2^g]
    mean_probs = jnp.einsum("nga,ngb->gab", *probs, precision=_HIGHEST)
    mean_probs = mean_probs.reshape(num_groups, -1) / num_samples
  else:
    mean_probs = jnp.mean(probs[0], axis=0)
  if axis_name is not None:
    per_sample = jax.lax.pmean(per_sample, axis_name)
    mean_probs = jax.lax.pmean(mean_probs, axis_name)
  return per_sample, jnp.sum(_entropy(mean_probs))


def lfq_entropy_loss(z: jax.Array, *, temperature: float = 0.01, gamma: float = 1.0,
                     group_size: Optional[int] = None, code_scale: float = 1.0,
                     axis_name: Optional[str] = None) -> jax.Array:
  """float32[]: ``per_sample_entropy - gamma * codebook_entropy`` (MAGVIT-v2 / BSQ).

  Args:
    z: float[..., d], the unquantized LFQ input (or u for BSQ).
    temperature: softmax temperature of ``p(c | z)``.
    gamma: weight of the batch (codebook) entropy.
    group_size: bits per group; None is exact over all 2^d codes (d <= 12).
      Must divide d and be <= 16.
    code_scale: code magnitude, 1 for LFQ, ``1/sqrt(d)`` for BSQ.
    axis_name: a data-parallel axis over which both terms are averaged (the
      batch-mean distribution then covers the global batch).
  Raises:
    ValueError: group_size not dividing d or too large, or d > 12 with
      group_size=None.

  Example:
    >>> zq, idx = lfq(z)  # z: float32[batch, 18]
    >>> aux = 0.1 * lfq_entropy_loss(z, group_size=9)
  """
  per_sample, codebook = lfq_entropy_terms(
      z, temperature=temperature, group_size=group_size, code_scale=code_scale,
      axis_name=axis_name)
  return per_sample - gamma * codebook
