"""Residual VQ (stages quantize what the previous ones left) and grouped (product) VQ."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxquant.vq import _common
from jaxquant.vq.vector import vector_quantize


def _check_codebooks(name: str, codebooks: jax.Array, dim: int, what: str) -> jax.Array:
  codebooks = jnp.asarray(codebooks)
  if codebooks.ndim != 3 or codebooks.shape[-1] != dim:
    raise ValueError(f"{name} has shape {codebooks.shape}; expected {what}")
  return codebooks


def residual_vq(z: jax.Array, codebooks: jax.Array, *, num_active=None,
                metric: str = "l2", gradient: str = "ste",
                commitment_weight: float = 0.25,
                nearest: Optional[Callable[..., jax.Array]] = None
                ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Residual VQ: stage s quantizes ``z - (codes of stages < s)`` with codebooks[s].

  Stages run in a `lax.scan`, each a `vector_quantize` call. With `num_active`
  (quantizer dropout, as in SoundStream) only the first `num_active` stages count:
  later stages add nothing to zq, get index -1 and zero losses. With the "ste"
  gradient ``d zq_sum / dz = I``.

  Args:
    z: float[..., D].
    codebooks: float[S, K, D].
    num_active: None (all S stages) or an int / int32[] scalar in [0, S]; may be
      traced (e.g. drawn at random per step).
    metric, gradient, commitment_weight, nearest: as for `vector_quantize`.
  Returns:
    zq_sum: float32[..., D].
    indices: int32[..., S]; -1 for inactive stages.
    losses: ``commitment`` and ``codebook``, float32[S] per stage (0 when inactive).
  Raises:
    ValueError: codebooks not [S, K, D] with D matching z.
  """
  z = _common.check_float("z", z)
  codebooks = _check_codebooks("codebooks", codebooks, z.shape[-1],
                               f"[S, K, {z.shape[-1]}] to match z of shape {z.shape}")
  num_stages = codebooks.shape[0]
  active_count = num_stages if num_active is None else num_active
  active_count = jnp.asarray(active_count, jnp.int32)

  def stage(carry, stage_input):
    residual, zq_sum = carry
    codebook, s = stage_input
    zq, indices, losses = vector_quantize(
        residual, codebook, metric=metric, gradient=gradient,
        commitment_weight=commitment_weight, nearest=nearest)
    active = s < active_count
    zq = jnp.where(active, zq, 0.0)
    indices = jnp.where(active, indices, -1)
    losses = {k: jnp.where(active, v, 0.0) for k, v in losses.items()}
    return (residual - zq, zq_sum + zq), (indices, losses)

  z32 = z.astype(jnp.float32)
  stages = jnp.arange(num_stages, dtype=jnp.int32)
  (_, zq_sum), (indices, losses) = jax.lax.scan(
      stage, (z32, jnp.zeros_like(z32)), (codebooks, stages))
  return zq_sum, jnp.moveaxis(indices, 0, -1), losses


def grouped_vq(z: jax.Array, codebooks: jax.Array, *, metric: str = "l2",
               gradient: str = "ste", commitment_weight: float = 0.25,
               nearest: Optional[Callable[..., jax.Array]] = None
               ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Product VQ: the last axis is split into G groups, each with its own codebook.

  Args:
    z: float[..., D] with D divisible by G.
    codebooks: float[G, K, D // G]; group g quantizes ``z[..., g*D/G:(g+1)*D/G]``.
    metric, gradient, commitment_weight, nearest: as for `vector_quantize`.
  Returns:
    zq: float32[..., D].
    indices: int32[..., G].
    losses: ``commitment`` and ``codebook``, float32 scalars averaged over groups
      (equal to the losses over all D channels).
  Raises:
    ValueError: codebooks not [G, K, D // G].
  """
  z = _common.check_float("z", z)
  codebooks = jnp.asarray(codebooks)
  num_groups = codebooks.shape[0] if codebooks.ndim == 3 else 0
  if num_groups == 0 or z.shape[-1] % num_groups:
    raise ValueError(f"codebooks has shape {codebooks.shape}; expected [G, K, D // G] "
                     f"with G dividing D={z.shape[-1]}")
  group_dim = z.shape[-1] // num_groups
  codebooks = _check_codebooks("codebooks", codebooks, group_dim,
                               f"[G, K, {group_dim}] for D={z.shape[-1]}, G={num_groups}")
  groups = jnp.moveaxis(z.reshape(*z.shape[:-1], num_groups, group_dim), -2, 0)

  def quantize_group(z_group, codebook):
    return vector_quantize(z_group, codebook, metric=metric, gradient=gradient,
                           commitment_weight=commitment_weight, nearest=nearest)

  zq, indices, losses = jax.vmap(quantize_group)(groups, codebooks)
  zq = jnp.moveaxis(zq, 0, -2).reshape(*z.shape[:-1], z.shape[-1])
  losses = {k: jnp.mean(v) for k, v in losses.items()}
  return zq, jnp.moveaxis(indices, 0, -1), losses
