"""Codebook learning without gradients: EMA updates, k-means init, dead-code restarts.

All three take an optional ``axis_name``: inside `jax.shard_map` (or pmap) over
a data-parallel axis, the per-batch counts and sums are psum'ed across it, so
every device computes the same codebook as one device would on the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxquant.vq import _common
from jaxquant.vq.vector import nearest_code_xla


class EMACodebookState(NamedTuple):
  """Exponential-moving-average codebook state (VQ-VAE-2 style)."""

  cluster_size: jax.Array  # float32[K]: EMA of how many vectors chose each code
  embed_sum: jax.Array  # float32[K, D]: EMA of the sum of those vectors
  codebook: jax.Array  # float32[K, D]: embed_sum / Laplace-smoothed cluster_size


def ema_init(codebook: jax.Array) -> EMACodebookState:
  """An `EMACodebookState` holding `codebook` (float[K, D]) with counts of one.

  ``embed_sum = codebook`` and ``cluster_size = 1`` keep the invariant
  ``codebook == embed_sum / smoothed(cluster_size)`` from the start.
  """
  codebook = jnp.asarray(codebook, jnp.float32)
  if codebook.ndim != 2:
    raise ValueError(f"codebook has shape {codebook.shape}; expected [K, D]")
  # Two buffers, so the state can be donated to a jitted step.
  return EMACodebookState(cluster_size=jnp.ones(codebook.shape[:1], jnp.float32),
                          embed_sum=codebook, codebook=jnp.array(codebook, copy=True))


def _psum(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _flatten(z: jax.Array, dim: int) -> jax.Array:
  """float32[N, D] stop-gradient view of ``z: float[..., D]``."""
  z = _common.check_float("z", z)
  if z.shape[-1] != dim:
    raise ValueError(f"z has last axis of size {z.shape[-1]}; expected {dim} to match "
                     "the codebook")
  return jax.lax.stop_gradient(z).reshape(-1, dim).astype(jnp.float32)


def cluster_stats(z: jax.Array, indices: jax.Array, num_codes: int,
                  axis_name: Optional[str] = None) -> tuple[jax.Array, jax.Array]:
  """(counts float32[K], sums float32[K, D]) of the vectors assigned to each code.

  Uses segment sums, so no [N, K] one-hot is built. Indices outside [0, K) are
  ignored.
  """
  flat = _flatten(z, z.shape[-1])
  ids = jnp.asarray(indices).reshape(-1).astype(jnp.int32)
  if ids.shape[0] != flat.shape[0]:
    raise ValueError(f"indices has shape {jnp.shape(indices)}; expected {z.shape[:-1]} "
                     f"to match z of shape {z.shape}")
  valid = (ids >= 0) & (ids < num_codes)
  safe_ids = jnp.where(valid, ids, 0)
  weights = valid.astype(jnp.float32)
  counts = jax.ops.segment_sum(weights, safe_ids, num_segments=num_codes)
  sums = jax.ops.segment_sum(flat * weights[:, None], safe_ids, num_segments=num_codes)
  return _psum(counts, axis_name), _psum(sums, axis_name)


def ema_update(state: EMACodebookState, z: jax.Array, indices: jax.Array, *,
               decay: float = 0.99, eps: float = 1e-5, axis_name: Optional[str] = None
               ) -> EMACodebookState:
  """One EMA step of the codebook towards the means of its assigned vectors.

  ``cluster_size <- decay * cluster_size + (1 - decay) * counts``,
  ``embed_sum <- decay * embed_sum + (1 - decay) * sums``, and ``codebook =
  embed_sum / smoothed`` with Laplace smoothing ``smoothed = (cluster_size + eps)
  / (n + K * eps) * n``, ``n = sum(cluster_size)``.

  Args:
    state: the current `EMACodebookState` (K codes of size D).
    z: float[..., D], the encoder outputs (gradients are stopped).
    indices: int[...], the code each vector chose.
    decay: EMA decay in [0, 1).
    eps: Laplace smoothing constant.
    axis_name: a data-parallel axis to psum counts and sums over.
  Returns:
    the new `EMACodebookState`.
  """
  if isinstance(decay, (int, float)) and not 0.0 <= decay < 1.0:
    raise ValueError(f"decay={decay}; expected 0 <= decay < 1")
  num_codes, dim = state.codebook.shape
  _flatten(z, dim)  # checks z against the codebook
  counts, sums = cluster_stats(z, indices, num_codes, axis_name)
  cluster_size = decay * state.cluster_size + (1.0 - decay) * counts
  embed_sum = decay * state.embed_sum + (1.0 - decay) * sums
  total = jnp.sum(cluster_size)
  smoothed = (cluster_size + eps) / (total + num_codes * eps) * total
  return EMACodebookState(cluster_size=cluster_size, embed_sum=embed_sum,
                          codebook=embed_sum / smoothed[:, None])


def _gather_global_rows(flat: jax.Array, rows: jax.Array, axis_name: Optional[str]
                        ) -> jax.Array:
  """float32[len(rows), D]: rows of the batch concatenated over `axis_name`.

  `rows` index the global batch (device-major order); each device contributes
  the rows it holds and a psum assembles them, so no batch is all-gathered.
  """
  if axis_name is None:
    return jnp.take(flat, rows, axis=0)
  local_n = flat.shape[0]
  owner, local_row = rows // local_n, rows % local_n
  mine = (owner == jax.lax.axis_index(axis_name))[:, None]
  return jax.lax.psum(jnp.where(mine, jnp.take(flat, local_row, axis=0), 0.0), axis_name)


def _global_size(flat: jax.Array, axis_name: Optional[str]) -> int:
  n = flat.shape[0]
  return n if axis_name is None else n * jax.lax.axis_size(axis_name)


def kmeans_init(z: jax.Array, num_codes: int, key: jax.Array, iters: int = 10,
                axis_name: Optional[str] = None) -> jax.Array:
  """float32[num_codes, D]: a codebook from Lloyd's k-means (l2) on `z`.

  Starts from `num_codes` distinct vectors of the batch drawn at random (with
  replacement when the batch is smaller), then runs `iters` assignment/mean
  steps; a code that attracts no vector keeps its position. With `axis_name`
  the batch is the concatenation of the per-device batches (device-major) and
  the result equals single-device k-means on it, replicated on every device.

  Args:
    z: float[..., D].
    num_codes: K >= 1 (static).
    key: PRNG key, the same on every device.
    iters: Lloyd iterations (static, >= 0).
    axis_name: a data-parallel axis.
  """
  if num_codes < 1 or iters < 0:
    raise ValueError(f"num_codes={num_codes}, iters={iters}; expected num_codes >= 1 "
                     "and iters >= 0")
  flat = _flatten(z, z.shape[-1])
  global_n = _global_size(flat, axis_name)
  if global_n >= num_codes:
    rows = jax.random.permutation(key, global_n)[:num_codes]
  else:
    rows = jax.random.randint(key, (num_codes,), 0, global_n)
  codebook = _gather_global_rows(flat, rows.astype(jnp.int32), axis_name)

  def lloyd_step(_, codebook):
    indices = nearest_code_xla(flat, codebook)
    counts, sums = cluster_stats(flat, indices, num_codes, axis_name)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where((counts > 0)[:, None], means, codebook)

  return jax.lax.fori_loop(0, iters, lloyd_step, codebook)


def replace_dead_codes(codebook: jax.Array, cluster_size: jax.Array, z: jax.Array,
                       key: jax.Array, threshold: float = 1.0) -> jax.Array:
  """float[K, D]: `codebook` with codes used less than `threshold` re-drawn from `z`.

  Args:
    codebook: float[K, D].
    cluster_size: float[K], usage per code (e.g. `EMACodebookState.cluster_size`).
    z: float[..., D], the current batch; dead codes become random vectors of it.
    key: PRNG key.
    threshold: codes with ``cluster_size < threshold`` are dead.
  Returns:
    the codebook, with live codes unchanged, in codebook's dtype. (With EMA, also
    reset that state's `embed_sum` and `cluster_size` for the replaced codes,
    e.g. ``ema_init`` on the result.)
  """
  codebook = jnp.asarray(codebook)
  num_codes, dim = codebook.shape
  if jnp.shape(cluster_size) != (num_codes,):
    raise ValueError(f"cluster_size has shape {jnp.shape(cluster_size)}; expected "
                     f"({num_codes},) to match codebook of shape {codebook.shape}")
  flat = _flatten(z, dim)
  rows = jax.random.randint(key, (num_codes,), 0, flat.shape[0])
  replacement = jnp.take(flat, rows, axis=0).astype(codebook.dtype)
  dead = (jnp.asarray(cluster_size) < threshold)[:, None]
  return jnp.where(dead, replacement, codebook)
