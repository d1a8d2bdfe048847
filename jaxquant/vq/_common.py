"""Helpers shared by the vq modules: straight-through rounding/sign, argument checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.quantize import straight_through  # re-used by the vq modules


def round_ste(x: jax.Array) -> jax.Array:
  """``jnp.round(x)`` (half to even) with an identity gradient."""
  return straight_through(x, jnp.round(jax.lax.stop_gradient(x)))


def check_float(name: str, x: jax.Array) -> jax.Array:
  """`x` as an array, after checking it is floating point with at least one axis."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")
  if x.ndim < 1:
    raise ValueError(f"{name} must have a last (feature) axis; got shape {x.shape}")
  return x


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
  if value not in choices:
    expected = ", ".join(repr(c) for c in choices)
    raise ValueError(f"{name}={value!r} is not supported; expected one of {expected}")
  return value


def lift(x: jax.Array, ndim: int) -> jax.Array:
  """`x` with leading axes of size 1 added up to rank `ndim` (explicit broadcasting)."""
  return jnp.reshape(x, (1,) * (ndim - jnp.ndim(x)) + jnp.shape(x))
