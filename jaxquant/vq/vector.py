"""Vector quantization: nearest-code search and the quantizer with its gradients.

`nearest_code_xla` is the pure-JAX search (the oracle and fallback for the Pallas
kernel in ``kernels/nearest_code``). `vector_quantize` looks up the nearest code
and returns it with a gradient estimator and the VQ-VAE losses:

* ``gradient="ste"``: straight-through, ``d zq / dz = I``.
* ``gradient="rotation"``: the rotation trick (Fifty et al. 2024, "Restructuring
  Vector Quantization with the Rotation Trick"). ``zq = sg(lambda * R) z`` with
  ``lambda = ||q|| / ||z||`` and ``R = I - 2 r r^T + 2 q_hat z_hat^T``, where
  ``z_hat = z/||z||``, ``q_hat = q/||q||`` and ``r = (z_hat + q_hat) /
  ||z_hat + q_hat||``: the rotation in the plane of z and q taking z_hat to
  q_hat. Forward it is q; backward the gradient is rotated and rescaled,
  ``dL/dz = lambda R^T dL/dzq``. R is applied as two rank-1 updates, never built.

Metrics: ``"l2"`` (squared Euclidean distance) and ``"cosine"`` (z and codes are
l2-normalized first; `vector_quantize` then works with the normalized vectors,
so zq is a unit-norm code).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jaxquant.kernels import _common as kernels_common
from jaxquant.kernels.nearest_code.gpu import nearest_code_gpu
from jaxquant.kernels.nearest_code.tpu import nearest_code_tpu
from jaxquant.vq import _common

METRICS = ("l2", "cosine")
GRADIENTS = ("ste", "rotation")
_HIGHEST = jax.lax.Precision.HIGHEST
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """float32 x / ||x|| along `axis` (zero vectors stay zero)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, _NORM_EPS)


def _check_codebook(z: jax.Array, codebook: jax.Array) -> jax.Array:
  codebook = jnp.asarray(codebook)
  if codebook.ndim != 2 or codebook.shape[-1] != z.shape[-1]:
    raise ValueError(f"codebook has shape {codebook.shape}; expected [K, {z.shape[-1]}] "
                     f"to match z of shape {z.shape}")
  return codebook


def _scores(z: jax.Array, codebook: jax.Array, metric: str) -> jax.Array:
  """float32[N, K], smaller is nearer: ``||c||^2 - 2 z.c`` (l2) or ``-z.c`` (cosine).

  For cosine both inputs must already be normalized. The l2 score omits
  ``||z||^2``, which is the same for every code.
  """
  dots = jnp.matmul(z, codebook.T, precision=_HIGHEST)
  if metric == "cosine":
    return -dots
  sq_norms = jnp.sum(codebook * codebook, axis=-1)
  return sq_norms[None, :] - 2.0 * dots


def _argmin_chunked(z: jax.Array, codebook: jax.Array, metric: str, chunk_size: int
                    ) -> jax.Array:
  """int32[N]: argmin of `_scores` over chunks of `chunk_size` codes (lax.scan).

  Memory is O(N * chunk_size). Padded codes score +inf; ties keep the first code,
  as `jnp.argmin` does.
  """
  num_codes, dim = codebook.shape
  num_chunks = -(-num_codes // chunk_size)
  padded = jnp.pad(codebook, ((0, num_chunks * chunk_size - num_codes), (0, 0)))
  chunks = padded.reshape(num_chunks, chunk_size, dim)
  starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size

  def step(carry, chunk_and_start):
    best_score, best_index = carry
    chunk, start = chunk_and_start
    scores = _scores(z, chunk, metric)
    code_ids = start + jnp.arange(chunk_size, dtype=jnp.int32)
    scores = jnp.where(code_ids[None, :] < num_codes, scores, jnp.inf)
    local = jnp.argmin(scores, axis=-1).astype(jnp.int32)
    score = jnp.min(scores, axis=-1)
    better = score < best_score
    return (jnp.where(better, score, best_score),
            jnp.where(better, start + local, best_index)), None

  n = z.shape[0]
  init = (jnp.full((n,), jnp.inf, jnp.float32), jnp.zeros((n,), jnp.int32))
  (_, best_index), _ = jax.lax.scan(step, init, (chunks, starts))
  return best_index


def nearest_code_xla(z: jax.Array, codebook: jax.Array, metric: str = "l2", *,
                     chunk_size: int = 4096) -> jax.Array:
  """int32[...]: the index of the code nearest to each vector of `z`.

  Args:
    z: float[..., D].
    codebook: float[K, D].
    metric: "l2" (squared distance) or "cosine" (largest cosine similarity).
    chunk_size: codebooks with more than this many codes are searched in chunks
      of this many rows with a running argmin, so memory is O(N * chunk_size)
      rather than O(N * K).
  Returns:
    int32[...] in [0, K); ties go to the lowest index.
  Raises:
    ValueError: unknown metric, mismatched D, or ``chunk_size < 1``.
  """
  z = _common.check_float("z", z)
  codebook = _check_codebook(z, codebook)
  _common.check_choice("metric", metric, METRICS)
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}; expected an int >= 1")
  flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  if metric == "cosine":
    flat, codebook = l2_normalize(flat), l2_normalize(codebook)
  if codebook.shape[0] > chunk_size:
    indices = _argmin_chunked(flat, codebook, metric, chunk_size)
  else:
    indices = jnp.argmin(_scores(flat, codebook, metric), axis=-1).astype(jnp.int32)
  return indices.reshape(z.shape[:-1])


def rotate_to(z: jax.Array, q: jax.Array) -> jax.Array:
  """float32[..., D]: q forward; gradient ``lambda R^T`` (the rotation trick).

  ``lambda`` and ``R`` (see the module docstring) are computed from
  stop-gradient copies of z and q, so only z receives gradient. A zero z gets
  ``lambda = 1`` (and R is then a reflection); antipodal z and q need no special
  case, since ``r = 0`` still maps z_hat to q_hat.
  """
  z = z.astype(jnp.float32)
  z_const, q_const = jax.lax.stop_gradient(z), jax.lax.stop_gradient(q.astype(jnp.float32))
  norm_z = jnp.sqrt(jnp.sum(z_const * z_const, axis=-1, keepdims=True))
  norm_q = jnp.sqrt(jnp.sum(q_const * q_const, axis=-1, keepdims=True))
  scale = jnp.where(norm_z > 0, norm_q / jnp.maximum(norm_z, _NORM_EPS), 1.0)
  z_hat, q_hat = l2_normalize(z_const), l2_normalize(q_const)
  r = l2_normalize(z_hat + q_hat)
  dot = lambda a, b: jnp.sum(a * b, axis=-1, keepdims=True)
  rotated = z - 2.0 * r * dot(r, z) + 2.0 * q_hat * dot(z_hat, z)
  return _common.straight_through(scale * rotated, q_const)


def vector_quantize(z: jax.Array, codebook: jax.Array, *, metric: str = "l2",
                    gradient: str = "ste", commitment_weight: float = 0.25,
                    nearest: Optional[Callable[..., jax.Array]] = None
                    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Replaces each vector of `z` by its nearest code; returns ``(zq, indices, losses)``.

  Args:
    z: float[..., D].
    codebook: float[K, D]; receives gradient only through ``losses["codebook"]``.
    metric: "l2" or "cosine" (z and the codebook are l2-normalized first).
    gradient: "ste" (straight-through) or "rotation" (the rotation trick).
    commitment_weight: beta of ``losses["commitment"]``.
    nearest: ``nearest(z: float32[N, D], codebook: float32[K, D], *, metric)
      -> int[N]``; the default is `nearest_code` with ``impl="auto"`` (the
      Pallas kernel on TPU and GPU, `nearest_code_xla` elsewhere, chosen at
      lowering time). It gets z flattened to rows, and
      stop-gradient (normalized, for cosine) inputs.
  Returns:
    zq: float32[..., D], equal to the selected (normalized, for cosine) codes.
    indices: int32[...].
    losses: float32 scalars ``commitment = beta * mean((z - sg(q))^2)`` (trains
      the encoder) and ``codebook = mean((sg(z) - q)^2)`` (trains the codebook;
      ignore it when the codebook is updated by `ema_update`).
  Raises:
    ValueError: unknown metric or gradient, or mismatched D.

  Example:
    >>> zq, idx, losses = vector_quantize(z, codebook, gradient="rotation")
    >>> loss = task_loss(zq) + losses["commitment"] + losses["codebook"]
  """
  z = _common.check_float("z", z)
  codebook = _check_codebook(z, codebook)
  _common.check_choice("metric", metric, METRICS)
  _common.check_choice("gradient", gradient, GRADIENTS)
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  if metric == "cosine":
    z, codebook = l2_normalize(z), l2_normalize(codebook)
  search = nearest_code if nearest is None else nearest
  rows = jax.lax.stop_gradient(z).reshape(-1, z.shape[-1])
  indices = search(rows, jax.lax.stop_gradient(codebook), metric=metric)
  indices = indices.astype(jnp.int32).reshape(z.shape[:-1])
  q = jnp.take(codebook, indices, axis=0)
  losses = {
      "commitment": commitment_weight * jnp.mean(jnp.square(z - jax.lax.stop_gradient(q))),
      "codebook": jnp.mean(jnp.square(jax.lax.stop_gradient(z) - q)),
  }
  if gradient == "ste":
    zq = _common.straight_through(z, jax.lax.stop_gradient(q))
  else:
    zq = rotate_to(z, q)
  return zq, indices, losses


def nearest_code(z: jax.Array, codebook: jax.Array, metric: str = "l2", *,
                 impl: str = "auto", interpret: Any = False) -> jax.Array:
  """int32[...]: the index of the code nearest to each vector of `z`, by kernel.

  The implementation is chosen per platform when the computation is lowered (as
  `jq.dot_general` does): the fused Pallas kernel (distance matmul and running
  argmin over codebook blocks, no N x K matrix in memory) on TPU and CUDA GPUs,
  `nearest_code_xla` (chunked over the codebook) elsewhere.

  Args:
    z: float32/bfloat16[..., D].
    codebook: [K, D].
    metric: "l2" or "cosine".
    impl: "auto", "xla" or "pallas" (a kernel; on a CPU only with `interpret`).
    interpret: True or `pltpu.InterpretParams()` runs the TPU kernel in the
      Pallas interpreter.
  Returns:
    int32[...] in [0, K); ties go to the lowest index.
  """
  z = _common.check_float("z", z)
  codebook = _check_codebook(z, codebook)
  _common.check_choice("metric", metric, METRICS)
  dtype = jnp.bfloat16 if z.dtype == codebook.dtype == jnp.bfloat16 else jnp.float32
  flat = z.reshape(-1, z.shape[-1]).astype(dtype)
  kernel_options = dict(metric=metric, block_n=None, block_k=None)
  run = kernels_common.dispatch(
      impl, interpret,
      tpu=functools.partial(nearest_code_tpu, **kernel_options),
      gpu=functools.partial(nearest_code_gpu, **kernel_options),
      xla=functools.partial(nearest_code_xla, metric=metric), op="jq.vq.nearest_code")
  return run(flat, codebook.astype(dtype)).reshape(z.shape[:-1])
