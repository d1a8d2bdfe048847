"""XLA reference of `nearest_code`; also its fallback where no kernel runs.

The kernels share `code_terms` and `distances` with the reference, so every
implementation ranks the codes by the same float32 formula.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

METRICS = ("l2", "cosine")

# Smallest squared norm used for a cosine code; an all-zero code scores 0 against any z.
_TINY = float(np.finfo(np.float32).tiny)


def dot_precision(dtype: jnp.dtype):
  """Full float32 products for float32 operands (no TF32 / bf16 passes); default else."""
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def code_terms(codebook: jax.Array, metric: str) -> jax.Array:
  """Per-code float32[K] term of the distance.

  Args:
    codebook: float32/bfloat16[K, D].
    metric: "l2" or "cosine".
  Returns:
    float32[K]: ``||c_k||^2`` for "l2"; ``1 / ||c_k||`` for "cosine".
  """
  c = codebook.astype(jnp.float32)
  sq = jnp.sum(c * c, axis=1)
  if metric == "l2":
    return sq
  return jax.lax.rsqrt(jnp.maximum(sq, _TINY))


def distances(dots: jax.Array, terms: jax.Array, metric: str) -> jax.Array:
  """float32 distances to minimize, from ``z . c_k`` and `code_terms` (broadcast).

  "l2": ``||c_k||^2 - 2 z.c_k`` (``||z - c_k||^2`` less the per-row ``||z||^2``);
  "cosine": ``-z.c_k / ||c_k||`` (the norm of z does not change the ranking).
  """
  if metric == "l2":
    return terms - 2.0 * dots
  return -(dots * terms)


def nearest_code_reference(z: jax.Array, codebook: jax.Array, *,
                           metric: str = "l2") -> jax.Array:
  """Index of the nearest code of each row of `z` (ties: the smallest index).

  Args:
    z: float32/bfloat16[N, D].
    codebook: [K, D], the dtype of `z`.
    metric: "l2" (smallest ``||z - c_k||``) or "cosine" (largest
      ``z.c_k / ||c_k||``).
  Returns:
    int32[N]. The N x K distance matrix is materialized (float32).
  """
  dots = jax.lax.dot_general(z, codebook, (((1,), (1,)), ((), ())),
                             precision=dot_precision(z.dtype),
                             preferred_element_type=jnp.float32)
  dist = distances(dots, code_terms(codebook, metric)[None, :], metric)
  return jnp.argmin(dist, axis=1).astype(jnp.int32)
