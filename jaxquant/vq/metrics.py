"""Codebook usage statistics for VQ/FSQ/LFQ indices."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def codebook_usage(indices: jax.Array, num_codes: int, *,
                   axis_name: Optional[str] = None) -> dict[str, jax.Array]:
  """How the codes of a codebook are used by a batch of indices.

  Args:
    indices: int[...]; values outside [0, num_codes) (e.g. -1 for an inactive
      residual stage) are not counted.
    num_codes: K (static).
    axis_name: a data-parallel axis to sum the counts over.
  Returns:
    counts: int32[K], uses of each code.
    usage_fraction: float32[], the fraction of codes used at least once.
    perplexity: float32[], ``exp(entropy)`` of the code frequencies in nats: K
      for uniform use, 1 when one code takes everything (or nothing is counted).
  """
  if not isinstance(num_codes, int) or num_codes < 1:
    raise ValueError(f"num_codes={num_codes!r}; expected an int >= 1")
  ids = jnp.asarray(indices).reshape(-1)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"indices must be an integer array; got dtype {ids.dtype}")
  ids = ids.astype(jnp.int32)
  valid = (ids >= 0) & (ids < num_codes)
  counts = jax.ops.segment_sum(valid.astype(jnp.int32), jnp.where(valid, ids, 0),
                               num_segments=num_codes)
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
  total = jnp.maximum(jnp.sum(counts), 1).astype(jnp.float32)
  freqs = counts.astype(jnp.float32) / total
  entropy = -jnp.sum(freqs * jnp.log(jnp.maximum(freqs, 1e-30)))
  return {
      "counts": counts,
      "usage_fraction": jnp.mean((counts > 0).astype(jnp.float32)),
      "perplexity": jnp.exp(entropy),
  }
