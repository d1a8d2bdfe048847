"""Randomized Hadamard rotations (QuaRot / QuIP#-style incoherence processing).

An orthogonal ``q [n, n]`` inserted between a layer and its input changes nothing
in float: ``(x @ q) @ (q.T @ w) == x @ w``. Chosen as a randomized Hadamard
matrix it spreads every outlier of ``w`` (and of ``x``) over all ``n``
coordinates, so the rotated weights and activations quantize with less error.

* `hadamard_matrix(n)`: a ±1 matrix with ``H @ H.T == n I`` for ``n = m 2^k``,
  ``m`` in {1, 12, 20}: Sylvester doubling ``H_2n = [[H, H], [H, -H]]`` of a core
  ``H_m`` (Paley's construction from the quadratic residues mod 11 or 19).
* `random_hadamard(n, key)`: ``q = diag(signs) H / sqrt(n)``, orthogonal, with
  ``signs = random_signs(n, key)``.
* `hadamard_transform(x, signs)`: ``x @ q`` in O(n log n): butterflies for the
  ``2^k`` factor, a ``[m, m]`` matmul for the core. This is the *online*
  rotation, for activations where no weight can absorb it (after a nonlinearity);
  `hadamard_transpose` applies ``q.T``, its inverse.
* `rotate_input`, `rotate_output`, `rotate_hessian`: fuse ``q`` into a Dense
  kernel ``w [in, out]`` (``y = x @ w + b``) or into the Hessian ``sum x^T x``.

The signs multiply ``x`` before ``H`` mixes it (``x @ q = (x * signs) @ H /
sqrt(n)``): in this row-vector convention ``q = H diag(signs)`` would only flip
signs after mixing, leaving magnitudes (and so the quantization error) as
without the randomization.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_CORES = (1, 12, 20)
_HIGHEST = jax.lax.Precision.HIGHEST


def _paley_core(m: int) -> np.ndarray:
  """int[m, m] Hadamard matrix of Paley's first construction, m = p + 1, p = 3 mod 4 prime.

  With the Jacobsthal matrix ``Q[i, j] = chi(j - i)`` (chi the quadratic
  character mod p, antisymmetric as p = 3 mod 4), ``H = I + [[0, 1^T], [-1, Q]]``.
  """
  p = m - 1
  residues = {(i * i) % p for i in range(1, p)}
  chi = np.array([0] + [1 if j in residues else -1 for j in range(1, p)])
  jacobsthal = chi[(np.arange(p)[None, :] - np.arange(p)[:, None]) % p]
  skew = np.zeros((m, m), np.int64)
  skew[0, 1:] = 1
  skew[1:, 0] = -1
  skew[1:, 1:] = jacobsthal
  return np.eye(m, dtype=np.int64) + skew


def _split(n) -> tuple[int, int]:
  """(m, 2^k) with n = m 2^k and m in {1, 12, 20}; ValueError naming `n` otherwise."""
  if isinstance(n, (int, np.integer)) and n >= 1:
    for m in _CORES:
      if n % m == 0 and (n // m) & (n // m - 1) == 0:
        return m, n // m
  raise ValueError(f"n={n!r}: a Hadamard matrix is built here for n = m * 2^k with m in "
                   f"{_CORES} (e.g. 64, 384 = 12 * 32, 640 = 20 * 32)")


@functools.lru_cache(maxsize=None)
def _core(m: int) -> np.ndarray:
  return np.ones((1, 1), np.int64) if m == 1 else _paley_core(m)


@functools.lru_cache(maxsize=32)
def _hadamard(n: int) -> np.ndarray:
  m, _ = _split(n)
  h = _core(m)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  h = h.astype(np.float32)
  h.setflags(write=False)
  return h


def hadamard_matrix(n: int) -> np.ndarray:
  """An unnormalized Hadamard matrix: entries ±1, ``H @ H.T == n I``.

  Args:
    n: the order, ``m * 2^k`` with m in {1, 12, 20}.
  Returns:
    float32[n, n] numpy array, ``kron(H_2^k, H_m)`` (Sylvester doubling of the core).
  Raises:
    ValueError: `n` is not of that form.

  Example:
    >>> h = jq.ptq.hadamard_matrix(384)  # 12 * 32
    >>> np.allclose(h @ h.T, 384 * np.eye(384))
    True
  """
  return np.array(_hadamard(n))


@functools.partial(jax.jit, static_argnames=("n",))
def random_signs(n: int, key: jax.Array) -> jax.Array:
  """float32[n] of ±1, each sign a fair coin flip of `key`."""
  return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("n",))
def random_hadamard(n: int, key: jax.Array) -> jax.Array:
  """The orthogonal matrix ``q = diag(signs) H / sqrt(n)``, signs = `random_signs(n, key)`.

  Args:
    n: the order (see `hadamard_matrix`).
    key: PRNG key for the signs.
  Returns:
    float32[n, n] with ``q @ q.T == I``; ``x @ q == hadamard_transform(x, signs)``.
  """
  h = jnp.asarray(_hadamard(n)) / np.float32(np.sqrt(n))
  return random_signs(n, key)[:, None] * h


def _walsh_hadamard(x: jax.Array, axis: int) -> jax.Array:
  """Unnormalized Sylvester transform (fast Walsh-Hadamard butterflies) along `axis`."""
  x = jnp.moveaxis(x, axis, -1)
  lead, n = x.shape[:-1], x.shape[-1]
  half = 1
  while half < n:
    pairs = x.reshape(*lead, n // (2 * half), 2, half)
    lo, hi = pairs[..., 0, :], pairs[..., 1, :]
    x = jnp.stack([lo + hi, lo - hi], axis=-2).reshape(*lead, n)
    half *= 2
  return jnp.moveaxis(x, -1, axis)


def _times_signs(x: jax.Array, signs: Optional[jax.Array]) -> jax.Array:
  """float32 x[..., n] times signs[n] along the last axis (x itself for None)."""
  if signs is None:
    return x
  n = x.shape[-1]
  if tuple(signs.shape) != (n,):
    raise ValueError(f"signs has shape {tuple(signs.shape)}; expected ({n},) for an "
                     f"input of shape {tuple(x.shape)}")
  return x * signs.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (n,))


@jax.jit
def hadamard_transform(x: jax.Array, signs: Optional[jax.Array] = None) -> jax.Array:
  """``x @ q`` along the last axis, ``q = diag(signs) H / sqrt(n)``, in O(n log n).

  Args:
    x: float[..., n], n = m * 2^k with m in {1, 12, 20}.
    signs: float[n] of ±1 (`random_signs`), or None for ``q = H / sqrt(n)``.
  Returns:
    float[..., n] of x's dtype (computed in float32). The inverse, ``y @ q.T``,
    is `hadamard_transpose`.
  Raises:
    ValueError: the last axis is not a supported order, or `signs` has the wrong shape.

  Example:
    >>> signs = jq.ptq.random_signs(384, jax.random.key(0))
    >>> y = jq.ptq.hadamard_transform(x, signs)  # x: bfloat16[tokens, 384]
  """
  n = x.shape[-1]
  m, power = _split(n)
  y = _times_signs(x.astype(jnp.float32), signs)
  y = y.reshape(*x.shape[:-1], power, m)  # index a * m + b: H = kron(H_2^k, H_m)
  if m > 1:
    y = jnp.matmul(y, jnp.asarray(_core(m), jnp.float32), precision=_HIGHEST)
  y = _walsh_hadamard(y, axis=-2) if power > 1 else y
  y = y.reshape(x.shape) * np.float32(1 / np.sqrt(n))
  return y.astype(x.dtype)


@jax.jit
def hadamard_transpose(y: jax.Array, signs: Optional[jax.Array] = None) -> jax.Array:
  """``y @ q.T``, the inverse of `hadamard_transform` with the same signs (O(n log n)).

  Args:
    y: float[..., n].
    signs: as for `hadamard_transform`.
  Returns:
    float[..., n] of y's dtype.
  """
  n = y.shape[-1]
  m, power = _split(n)
  x = y.astype(jnp.float32).reshape(*y.shape[:-1], power, m)
  x = _walsh_hadamard(x, axis=-2) if power > 1 else x  # H_2^k is symmetric
  if m > 1:
    x = jnp.matmul(x, jnp.asarray(_core(m).T, jnp.float32), precision=_HIGHEST)
  x = _times_signs(x.reshape(y.shape) * np.float32(1 / np.sqrt(n)), signs)
  return x.astype(y.dtype)


def _check_rotation(q, n: int, what: str):
  if q.ndim != 2 or q.shape[0] != q.shape[1] or q.shape[0] != n:
    raise ValueError(f"q has shape {tuple(q.shape)}; expected ({n}, {n}) to match {what}")


@jax.jit
def rotate_input(w: jax.Array, q: jax.Array) -> jax.Array:
  """``q.T @ w``: the kernel of a layer whose input is rotated, ``x -> x @ q``.

  ``(x @ q) @ rotate_input(w, q) == x @ w`` for orthogonal `q`.

  Args:
    w: float[in, out] Dense kernel.
    q: float[in, in] orthogonal (e.g. `random_hadamard`).
  Returns:
    float[in, out] of w's dtype (computed in float32).
  """
  _check_rotation(q, w.shape[0], f"axis 0 of w {tuple(w.shape)}")
  out = jnp.matmul(q.astype(jnp.float32).T, w.astype(jnp.float32), precision=_HIGHEST)
  return out.astype(w.dtype)


@jax.jit
def rotate_output(w: jax.Array, b: Optional[jax.Array], q: jax.Array
                  ) -> tuple[jax.Array, Optional[jax.Array]]:
  """``(w @ q, b @ q)``: a producing layer whose output comes out rotated.

  ``x @ w' + b' == (x @ w + b) @ q``.

  Args:
    w: float[in, out] Dense kernel.
    b: float[out] bias, or None.
    q: float[out, out] orthogonal.
  Returns:
    (float[in, out], float[out] or None) in the input dtypes.
  """
  _check_rotation(q, w.shape[1], f"axis 1 of w {tuple(w.shape)}")
  q32 = q.astype(jnp.float32)
  w_rot = jnp.matmul(w.astype(jnp.float32), q32, precision=_HIGHEST).astype(w.dtype)
  if b is None:
    return w_rot, None
  return w_rot, jnp.matmul(b.astype(jnp.float32), q32, precision=_HIGHEST).astype(b.dtype)


@jax.jit
def rotate_hessian(xtx: jax.Array, q: jax.Array) -> jax.Array:
  """``q.T @ xtx @ q``: ``sum x^T x`` of the rotated inputs ``x @ q``, for GPTQ.

  Args:
    xtx: float32[in, in].
    q: float[in, in] orthogonal.
  Returns:
    float32[in, in].
  """
  _check_rotation(q, xtx.shape[0], f"xtx {tuple(xtx.shape)}")
  q32 = q.astype(jnp.float32)
  left = jnp.matmul(q32.T, xtx.astype(jnp.float32), precision=_HIGHEST)
  return jnp.matmul(left, q32, precision=_HIGHEST)
