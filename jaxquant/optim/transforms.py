"""Optax transformations whose state is stored block-wise quantized.

Each building block mirrors its optax twin (`optax.scale_by_adam`,
`optax.scale_by_lion`, `optax.trace`) with the same hyperparameters and update
rule; only the state differs: every moment leaf of at least `min_size` elements is
a `QArray` (dynamic-tree 8-bit codes in blocks, a float32 absmax per block),
dequantized, updated and requantized inside the step (`jaxquant.optim.state.step`)
with no float32 copy of a moment stored. Smaller leaves keep float32 state. The
optimizers (`adamw_8bit`, ...) chain a building block with optax's weight decay
and learning rate exactly as optax's own aliases do. ``mu_dtype`` has no
counterpart: the state format is set by the `StateQuantizer`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from jaxquant.optim.state import StateQuantizer, is_state_leaf, step

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]

EIGHT_BIT = StateQuantizer("dynamic8", "udynamic8", block_size=256, min_size=4096)
FOUR_BIT = StateQuantizer("dynamic4", "udynamic4_nonzero", block_size=128, min_size=4096)


def _unzip(updates, results, count: int):
  """Splits a tree of `count`-tuples (one per leaf of `updates`) into `count` trees."""
  return tuple(jax.tree.map(lambda _, r, i=i: r[i], updates, results)
               for i in range(count))


def _bias_correction(decay: float, count: jax.Array) -> jax.Array:
  return 1 - decay ** count.astype(jnp.float32)


class ScaleByAdam8bitState(NamedTuple):
  """State of `scale_by_adam_8bit`."""

  count: jax.Array  # int32[]
  mu: optax.Updates  # per leaf: QArray (signed map) or float32[*param.shape]
  nu: optax.Updates  # per leaf: QArray (unsigned map) or float32[*param.shape]


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    nesterov: bool = False,
    quantizer: StateQuantizer = EIGHT_BIT,
) -> optax.GradientTransformation:
  """Adam's rescaling (`optax.scale_by_adam`) with block-wise quantized moments.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the second moment inside the square root.
    nesterov: Nesterov momentum (NAdam), as in optax.
    quantizer: how the moments are stored (8-bit dynamic maps in blocks of 256).
  Returns:
    An `optax.GradientTransformation` with state `ScaleByAdam8bitState`.
  """

  def init_fn(params):
    mu = jax.tree.map(lambda p: quantizer.zeros(p, signed=True), params)
    nu = jax.tree.map(lambda p: quantizer.zeros(p, signed=False), params)
    return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), mu, nu)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    correction1 = _bias_correction(b1, count)
    correction2 = _bias_correction(b2, count)
    next_correction1 = _bias_correction(b1, optax.safe_increment(count))

    def moments(g32, mu, nu):
      return b1 * mu + (1 - b1) * g32, b2 * nu + (1 - b2) * g32 * g32

    def leaf(g, mu_leaf, nu_leaf):  # mu_leaf and nu_leaf share one blocked view
      g32, _, (mu, nu), new_leaves = step(g, (mu_leaf, nu_leaf), moments)
      if nesterov:
        mu_hat = b1 * mu / next_correction1 + (1 - b1) * g32 / correction1
      else:
        mu_hat = mu / correction1
      update = mu_hat / (jnp.sqrt(nu / correction2 + eps_root) + eps)
      return (update.reshape(g.shape).astype(g.dtype), *new_leaves)

    results = jax.tree.map(leaf, updates, state.mu, state.nu, is_leaf=is_state_leaf)
    new_updates, mu, nu = _unzip(updates, results, 3)
    return new_updates, ScaleByAdam8bitState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdemamix8bitState(NamedTuple):
  """State of `scale_by_ademamix_8bit` (the fields of optax's AdEMAMix state)."""

  count: jax.Array  # int32[]
  count_m2: jax.Array  # int32[]
  m1: optax.Updates  # fast EMA; per leaf: QArray (signed map) or float32
  m2: optax.Updates  # slow EMA; per leaf: QArray (signed map) or float32
  nu: optax.Updates  # second moment; per leaf: QArray (unsigned map) or float32


def scale_by_ademamix_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 6.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    quantizer: StateQuantizer = EIGHT_BIT,
) -> optax.GradientTransformation:
  """AdEMAMix's rescaling (`optax.contrib.scale_by_ademamix`) with quantized moments.

  ``update = (m1 / (1 - b1^t) + alpha * m2) / (sqrt(nu / (1 - b2^t) + eps_root) + eps)``
  with a fast EMA `m1` (decay `b1`), a slow EMA `m2` (decay `b3`, no bias
  correction) and the second moment `nu`; `b3` and `alpha` may be schedules of
  the step count, as in optax.
  """

  def init_fn(params):
    signed = lambda p: quantizer.zeros(p, signed=True)
    return ScaleByAdemamix8bitState(
        jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32),
        jax.tree.map(signed, params), jax.tree.map(signed, params),
        jax.tree.map(lambda p: quantizer.zeros(p, signed=False), params))

  def update_fn(updates, state, params=None):
    del params
    c_b3 = b3(state.count_m2) if callable(b3) else b3
    c_alpha = alpha(state.count_m2) if callable(alpha) else alpha
    count = optax.safe_increment(state.count)
    correction1 = _bias_correction(b1, count)
    correction2 = _bias_correction(b2, count)

    def moments(g32, m1, m2, nu):
      return (b1 * m1 + (1 - b1) * g32, c_b3 * m2 + (1 - c_b3) * g32,
              b2 * nu + (1 - b2) * g32 * g32)

    def leaf(g, m1_leaf, m2_leaf, nu_leaf):  # the three share one blocked view
      _, _, (m1, m2, nu), new_leaves = step(g, (m1_leaf, m2_leaf, nu_leaf), moments)
      update = ((m1 / correction1 + c_alpha * m2) /
                (jnp.sqrt(nu / correction2 + eps_root) + eps))
      return (update.reshape(g.shape).astype(g.dtype), *new_leaves)

    results = jax.tree.map(leaf, updates, state.m1, state.m2, state.nu,
                           is_leaf=is_state_leaf)
    new_updates, m1, m2, nu = _unzip(updates, results, 4)
    return new_updates, ScaleByAdemamix8bitState(
        count, optax.safe_increment(state.count_m2), m1, m2, nu)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByLion8bitState(NamedTuple):
  """State of `scale_by_lion_8bit`."""

  count: jax.Array  # int32[]
  mu: optax.Updates  # per leaf: QArray (signed map) or float32[*param.shape]


def scale_by_lion_8bit(
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    quantizer: StateQuantizer = EIGHT_BIT,
) -> optax.GradientTransformation:
  """Lion's rescaling (`optax.scale_by_lion`) with a block-wise quantized moment.

  ``update = sign(b1 * mu + (1 - b1) * g)``; ``mu <- b2 * mu + (1 - b2) * g``.
  """

  def init_fn(params):
    mu = jax.tree.map(lambda p: quantizer.zeros(p, signed=True), params)
    return ScaleByLion8bitState(jnp.zeros([], jnp.int32), mu)

  def update_fn(updates, state, params=None):
    del params

    def moments(g32, mu):
      return (b2 * mu + (1 - b2) * g32,)

    def leaf(g, mu_leaf):
      g32, (mu,), _, (new_leaf,) = step(g, (mu_leaf,), moments)
      update = jnp.sign(b1 * mu + (1 - b1) * g32)
      return update.reshape(g.shape).astype(g.dtype), new_leaf

    results = jax.tree.map(leaf, updates, state.mu, is_leaf=is_state_leaf)
    new_updates, mu = _unzip(updates, results, 2)
    return new_updates, ScaleByLion8bitState(optax.safe_increment(state.count), mu)

  return optax.GradientTransformation(init_fn, update_fn)


class Trace8bitState(NamedTuple):
  """State of `trace_8bit`."""

  trace: optax.Params  # per leaf: QArray (signed map) or float32[*param.shape]


def trace_8bit(
    decay: float,
    nesterov: bool = False,
    *,
    quantizer: StateQuantizer = EIGHT_BIT,
) -> optax.GradientTransformation:
  """Momentum (`optax.trace`) with a block-wise quantized trace.

  ``trace <- g + decay * trace``; the update is the trace, or
  ``g + decay * trace`` with Nesterov momentum.
  """

  def init_fn(params):
    return Trace8bitState(jax.tree.map(lambda p: quantizer.zeros(p, signed=True), params))

  def update_fn(updates, state, params=None):
    del params

    def moments(g32, trace):
      return (g32 + decay * trace,)

    def leaf(g, trace_leaf):
      g32, _, (trace,), (new_leaf,) = step(g, (trace_leaf,), moments)
      update = g32 + decay * trace if nesterov else trace
      return update.reshape(g.shape).astype(g.dtype), new_leaf

    results = jax.tree.map(leaf, updates, state.trace, is_leaf=is_state_leaf)
    new_updates, trace = _unzip(updates, results, 2)
    return new_updates, Trace8bitState(trace)

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------
# Optimizers, chained as optax's aliases are.


def _quantizer(default: StateQuantizer, block_size: Optional[int],
               min_size: Optional[int]) -> StateQuantizer:
  return StateQuantizer(default.signed_format, default.unsigned_format,
                        block_size or default.block_size,
                        default.min_size if min_size is None else min_size)


def adam_8bit(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, eps_root: float = 0.0, *, nesterov: bool = False,
              block_size: int = 256, min_size: int = 4096
              ) -> optax.GradientTransformationExtraArgs:
  """`optax.adam` with 8-bit block-wise moments (blocks of `block_size`).

  Example:
    >>> optimizer = jq.optim.adam_8bit(1e-3)
    >>> state = optimizer.init(params)
    >>> updates, state = optimizer.update(grads, state, params)
  """
  quantizer = _quantizer(EIGHT_BIT, block_size, min_size)
  return optax.chain(
      scale_by_adam_8bit(b1, b2, eps, eps_root, nesterov=nesterov, quantizer=quantizer),
      optax.scale_by_learning_rate(learning_rate))


def adamw_8bit(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, eps_root: float = 0.0, weight_decay: float = 1e-4,
               mask: Optional[Any] = None, *, nesterov: bool = False,
               block_size: int = 256, min_size: int = 4096
               ) -> optax.GradientTransformationExtraArgs:
  """`optax.adamw` with 8-bit block-wise moments (decoupled weight decay)."""
  return _adamw(_quantizer(EIGHT_BIT, block_size, min_size), learning_rate, b1, b2,
                eps, eps_root, weight_decay, mask, nesterov)


def adamw_4bit(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, eps_root: float = 0.0, weight_decay: float = 1e-4,
               mask: Optional[Any] = None, *, nesterov: bool = False,
               block_size: int = 128, min_size: int = 4096
               ) -> optax.GradientTransformationExtraArgs:
  """`optax.adamw` with 4-bit block-wise moments (blocks of 128).

  First moments use the 4-bit signed dynamic map; second moments the 4-bit
  unsigned map without zero, so a small second moment never rounds to 0 and
  blows up the update (the zero-point problem of 4-bit optimizer states).
  """
  return _adamw(_quantizer(FOUR_BIT, block_size, min_size), learning_rate, b1, b2,
                eps, eps_root, weight_decay, mask, nesterov)


def _adamw(quantizer, learning_rate, b1, b2, eps, eps_root, weight_decay, mask,
           nesterov) -> optax.GradientTransformationExtraArgs:
  return optax.chain(
      scale_by_adam_8bit(b1, b2, eps, eps_root, nesterov=nesterov, quantizer=quantizer),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def ademamix_8bit(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
                  b3: ScalarOrSchedule = 0.9999, alpha: ScalarOrSchedule = 5.0,
                  eps: float = 1e-8, eps_root: float = 0.0, weight_decay: float = 0.0,
                  mask: Optional[Any] = None, *, block_size: int = 256,
                  min_size: int = 4096) -> optax.GradientTransformationExtraArgs:
  """`optax.contrib.ademamix` with 8-bit block-wise moments (both EMAs and nu)."""
  quantizer = _quantizer(EIGHT_BIT, block_size, min_size)
  return optax.chain(
      scale_by_ademamix_8bit(b1, b2, b3, alpha, eps, eps_root, quantizer=quantizer),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def lion_8bit(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99,
              weight_decay: float = 1e-3, mask: Optional[Any] = None, *,
              block_size: int = 256, min_size: int = 4096
              ) -> optax.GradientTransformationExtraArgs:
  """`optax.lion` with an 8-bit block-wise momentum."""
  quantizer = _quantizer(EIGHT_BIT, block_size, min_size)
  return optax.chain(
      scale_by_lion_8bit(b1, b2, quantizer=quantizer),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def sgd_8bit(learning_rate: ScalarOrSchedule, momentum: Optional[float] = None,
             nesterov: bool = False, *, block_size: int = 256, min_size: int = 4096
             ) -> optax.GradientTransformationExtraArgs:
  """`optax.sgd` with an 8-bit block-wise momentum (plain SGD when momentum is None)."""
  quantizer = _quantizer(EIGHT_BIT, block_size, min_size)
  momentum_transform = (optax.identity() if momentum is None else
                        trace_8bit(momentum, nesterov, quantizer=quantizer))
  return optax.chain(momentum_transform, optax.scale_by_learning_rate(learning_rate))
