"""Flax NNX modules for the tokenizer quantizers, over the pure functions of jaxquant.vq.

Each module's ``__call__(z, *, train=False)`` takes ``z: float[..., dim]`` and
returns a `VQOutput` ``(quantized, indices, loss)``: ``quantized`` has z's shape
and dtype, ``indices`` is int32 (with a trailing stage axis for residual
quantizers) and ``loss`` the float32 auxiliary loss to add to the task loss.

    >>> quantizer = jq.vq.VectorQuantizer(512, 64, kmeans_init=True, rngs=nnx.Rngs(0))
    >>> out = quantizer(z, train=True)    # k-means on the first batch, then EMA
    >>> loss = task_loss(out.quantized) + out.loss

State. A gradient-trained codebook (``ema_decay=None``) is an `nnx.Param`.
With EMA (``ema_decay`` a float) the codebook, its EMA statistics, the k-means
flag and the PRNG key of k-means and dead-code restarts are `CodebookState`
variables, which ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` never touches; they
change only when ``train=True``. The key is state (not drawn from `nnx.Rngs`), so
a step depends only on the module's state and its input, as in the Linen twins
(`jaxquant.vq.linen`), which share the framework-independent core at the end of
this file.

Data parallel: with ``axis_name``, run the module inside `jax.shard_map` over
that axis; EMA counts and sums, k-means and dead-code candidates then cover the
global batch, so every device holds the same codebook as one device would.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.kernels import _common as kernels_common
from jaxquant.vq import _common
from jaxquant.vq.binary import bsq, lfq, lfq_entropy_loss, lfq_indices_to_codes
from jaxquant.vq.codebook import EMACodebookState, ema_init, ema_update, kmeans_init
from jaxquant.vq.codebook import replace_dead_codes
from jaxquant.vq.scalar import BOUNDS, check_levels, fsq, fsq_indices_to_codes
from jaxquant.vq.scalar import residual_fsq, residual_fsq_scales
from jaxquant.vq.vector import GRADIENTS, METRICS, l2_normalize, vector_quantize

Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]
default_codebook_init: Initializer = jax.nn.initializers.normal(stddev=1.0)


class VQOutput(NamedTuple):
  """What every quantizer module returns."""

  quantized: jax.Array  # [..., dim], z's dtype
  indices: jax.Array  # int32[...], or int32[..., num_stages] for residual quantizers
  loss: jax.Array  # float32[]: auxiliary loss to add to the task loss (0 where none)


class CodebookState(nnx.Variable):
  """Codebook state learned without gradients: EMA codebook and statistics,
  k-means flag, PRNG key. Not an `nnx.Param`, so optimizers leave it alone."""


# ----------------------------------------------------------------------------
# Modules.


class FSQ(nnx.Module):
  """Finite scalar quantization (`jaxquant.vq.fsq`); no parameters, loss 0.

  Args:
    levels: d ints >= 2, one per channel of z.
    bound: "reference", "atanh" or "symmetric" (see `jaxquant.vq.scalar`).
    impl: "xla", "auto" or "pallas", as for `jaxquant.vq.fsq`.
  """

  def __init__(self, levels: Sequence[int], *, bound: str = "reference",
               impl: str = "xla"):
    self.levels = check_levels(levels)
    self.bound = _common.check_choice("bound", bound, BOUNDS)
    self.impl = _common.check_choice("impl", impl, kernels_common.IMPLS)

  @property
  def codebook_size(self) -> int:
    return math.prod(self.levels)

  def __call__(self, z: jax.Array, *, train: bool = False) -> VQOutput:
    del train  # FSQ behaves the same in training
    zhat, indices = fsq(z, self.levels, bound=self.bound, impl=self.impl)
    return VQOutput(zhat, indices, jnp.zeros((), jnp.float32))

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    """float32[..., d]: the code of each index ``int[...]``."""
    return fsq_indices_to_codes(indices, self.levels, bound=self.bound)


class ResidualFSQ(nnx.Module):
  """Residual FSQ (`jaxquant.vq.residual_fsq`) with quantizer dropout; loss 0.

  Args:
    levels: d ints >= 2, shared by the stages.
    num_stages: S >= 1.
    bound: as for `FSQ`.
    quantizer_dropout: probability that a training batch keeps only the first
      n stages, n uniform in [1, S] (later stages: no contribution, index -1).
    rngs: needed when ``quantizer_dropout > 0`` (stream "dropout" or default).
  """

  def __init__(self, levels: Sequence[int], num_stages: int, *,
               bound: str = "reference", quantizer_dropout: float = 0.0,
               rngs: Optional[nnx.Rngs] = None):
    self.levels = check_levels(levels)
    self.num_stages = check_int("num_stages", num_stages, 1)
    self.bound = _common.check_choice("bound", bound, BOUNDS)
    self.quantizer_dropout = check_rate(quantizer_dropout)
    self.rngs = _dropout_stream(rngs, self.quantizer_dropout)

  @property
  def codebook_size(self) -> int:
    """Codes per stage."""
    return math.prod(self.levels)

  def __call__(self, z: jax.Array, *, train: bool = False) -> VQOutput:
    num_active = None
    if train and self.quantizer_dropout > 0:
      num_active = draw_num_active(self.rngs(), self.num_stages, self.quantizer_dropout)
    zhat, indices = residual_fsq_active(z, self.levels, self.num_stages, num_active,
                                        bound=self.bound)
    return VQOutput(zhat, indices, jnp.zeros((), jnp.float32))

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    """float32[..., d]: the summed codes of ``indices: int[..., S]`` (-1: no code)."""
    return residual_fsq_codes(indices, self.levels, self.num_stages, bound=self.bound)


class VectorQuantizer(nnx.Module):
  """Vector quantization (`jaxquant.vq.vector_quantize`) with a learned codebook.

  Args:
    num_codes: K >= 1.
    dim: the last axis of z.
    codebook_dim: if given and not `dim`, z is projected to it by an
      `nnx.Linear` before the lookup and back after (factorized codes).
    metric: "l2" or "cosine" (l2-normalized z and codes).
    commitment_weight: beta of the commitment loss.
    ema_decay: None: the codebook is an `nnx.Param` trained by the codebook
      loss (added to ``loss``); a float in [0, 1): EMA updates when training.
    epsilon: Laplace smoothing of the EMA cluster sizes.
    kmeans_init: initialize the codebook by k-means on the first training batch.
    kmeans_iters: Lloyd iterations of that k-means.
    dead_code_threshold: with EMA, codes whose EMA cluster size falls below it
      are replaced by random vectors of the batch after each training step
      (their cluster size reset to the threshold, their sum to code * threshold).
    gradient: "ste" or "rotation" (the rotation trick).
    axis_name: data-parallel axis of `jax.shard_map` for the EMA, k-means and
      dead-code statistics.
    codebook_init: initializer of the [K, C] codebook.
    rngs: for the projections, the codebook and the state key.
  """

  def __init__(self, num_codes: int, dim: int, *, codebook_dim: Optional[int] = None,
               metric: str = "l2", commitment_weight: float = 0.25,
               ema_decay: Optional[float] = 0.99, epsilon: float = 1e-5,
               kmeans_init: bool = False, kmeans_iters: int = 10,
               dead_code_threshold: float = 0.0, gradient: str = "ste",
               axis_name: Optional[str] = None,
               codebook_init: Initializer = default_codebook_init, rngs: nnx.Rngs):
    config = CodebookConfig(
        num_codes=num_codes, dim=dim, codebook_dim=codebook_dim, metric=metric,
        commitment_weight=commitment_weight, ema_decay=ema_decay, epsilon=epsilon,
        kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
        dead_code_threshold=dead_code_threshold, gradient=gradient, axis_name=axis_name)
    self.config = config
    self.project_in, self.project_out = _nnx_projections(dim, config.code_dim, rngs)
    codebook = codebook_init(rngs.params(), (config.num_codes, config.code_dim),
                             jnp.float32)
    if config.ema_decay is None:
      self.embedding = nnx.Param(codebook)
      self.cluster_size = self.embed_sum = None
    else:
      ema = ema_init(codebook)
      self.embedding = CodebookState(ema.codebook)
      self.cluster_size = CodebookState(ema.cluster_size)
      self.embed_sum = CodebookState(ema.embed_sum)
    self.initialized = CodebookState(jnp.zeros((), jnp.bool_)) if kmeans_init else None
    self.key = (CodebookState(jax.random.key_data(rngs.params())) if config.uses_key
                else None)

  @property
  def codebook(self) -> jax.Array:
    """float32[K, C]: the current codebook (C = codebook_dim or dim)."""
    return self.embedding.get_value()

  def quantize(self, x: jax.Array, *, train: bool, active: Optional[jax.Array] = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`codebook_step` on ``x: float32[..., C]`` (already projected), updating state."""
    variables = [getattr(self, _ATTRS.get(name, name)) for name in CodebookVars._fields]
    state = CodebookVars(*(None if v is None else v.get_value() for v in variables))
    zq, indices, loss, new = codebook_step(self.config, state, x, train=train,
                                           active=active)
    for variable, old, value in zip(variables, state, new):
      if value is not old:  # only what the step changed (a Param only by k-means)
        variable.set_value(value)
    return zq, indices, loss

  def __call__(self, z: jax.Array, *, train: bool = False) -> VQOutput:
    x = project(self.project_in, check_input(z, self.config.dim))
    zq, indices, loss = self.quantize(x, train=train)
    return VQOutput(project(self.project_out, zq).astype(z.dtype), indices, loss)

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    """float32[..., dim]: what ``quantized`` is for these ``indices: int[...]``."""
    codes = codebook_lookup(self.config, self.codebook, indices)
    return project(self.project_out, codes)


class ResidualVQ(nnx.Module):
  """Residual VQ (as `jaxquant.vq.residual_vq`): S `VectorQuantizer` stages.

  Stage s quantizes what the earlier stages left; ``loss`` is the sum of the
  stages' losses. A ``codebook_dim`` projection is shared by all stages (the
  stages work in the projected space).

  Args:
    num_stages: S >= 1.
    num_codes, dim: as for `VectorQuantizer`.
    quantizer_dropout: probability that a training batch uses only the first n
      stages, n uniform in [1, S]; later stages add nothing, get index -1 and
      neither change nor count in the loss.
    codebook_dim: the shared projection (see `VectorQuantizer`).
    rngs: for the stages' parameters and state, and quantizer dropout.
    **kwargs: the other `VectorQuantizer` arguments, for every stage.
  """

  def __init__(self, num_stages: int, num_codes: int, dim: int, *,
               quantizer_dropout: float = 0.0, codebook_dim: Optional[int] = None,
               rngs: nnx.Rngs, **kwargs):
    self.num_stages = check_int("num_stages", num_stages, 1)
    self.dim = check_int("dim", dim, 1)
    self.quantizer_dropout = check_rate(quantizer_dropout)
    inner = dim if codebook_dim is None else check_int("codebook_dim", codebook_dim, 1)
    self.project_in, self.project_out = _nnx_projections(dim, inner, rngs)
    self.stages = nnx.List([VectorQuantizer(num_codes, inner, rngs=rngs, **kwargs)
                            for _ in range(num_stages)])
    self.rngs = _dropout_stream(rngs, self.quantizer_dropout)

  def __call__(self, z: jax.Array, *, train: bool = False) -> VQOutput:
    x = project(self.project_in, check_input(z, self.dim))
    num_active = None
    if train and self.quantizer_dropout > 0:
      num_active = draw_num_active(self.rngs(), self.num_stages, self.quantizer_dropout)
    return residual_output(self.stages, self.project_out, x, z.dtype, num_active,
                           train=train)

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    """float32[..., dim]: the summed stage codes of ``indices: int[..., S]``."""
    return residual_codes(self.stages, self.project_out, indices)


class _BinaryQuantizer(nnx.Module):
  """`LFQ` or `BSQ` (abstract: `spherical` is set by the subclass)."""

  spherical: bool

  def __init__(self, num_bits: int, *, entropy_weight: float = 0.1,
               commitment_weight: float = 0.25, diversity_gamma: float = 1.0,
               temperature: float = 0.01, group_size: Optional[int] = None,
               axis_name: Optional[str] = None, rngs: Optional[nnx.Rngs] = None):
    del rngs  # no randomness; accepted for a uniform signature
    self.config = BinaryConfig(
        num_bits=num_bits, entropy_weight=entropy_weight,
        commitment_weight=commitment_weight, diversity_gamma=diversity_gamma,
        temperature=temperature, group_size=group_size, axis_name=axis_name,
        spherical=self.spherical)

  @property
  def codebook_size(self) -> int:
    return 2**self.config.num_bits

  def __call__(self, z: jax.Array, *, train: bool = False) -> VQOutput:
    del train  # the same in training and evaluation
    return binary_output(self.config, z)

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    """float32[..., num_bits]: the code of each index."""
    return binary_codes(self.config, indices)


class LFQ(_BinaryQuantizer):
  """Lookup-free quantization (`jaxquant.vq.lfq`) with the entropy loss.

  ``loss = entropy_weight * lfq_entropy_loss + commitment_weight * mean((z -
  sg(zq))^2)``.

  Args:
    num_bits: d, the last axis of z (<= 31).
    entropy_weight, commitment_weight: loss weights.
    diversity_gamma: weight of the batch (codebook) entropy.
    temperature: of the soft code assignment.
    group_size: bits per entropy group (None: exact, d <= 12); see
      `jaxquant.vq.lfq_entropy_loss`.
    axis_name: data-parallel axis over which the entropy terms are averaged.
    rngs: unused (LFQ has no randomness); accepted for a uniform signature.
  """

  spherical = False


class BSQ(_BinaryQuantizer):
  """Binary spherical quantization (`jaxquant.vq.bsq`); arguments as for `LFQ`.

  The codes are ``±1/sqrt(d)``; the commitment and entropy losses are taken on
  ``u = z / ||z||``.
  """

  spherical = True


# ----------------------------------------------------------------------------
# Framework-independent core, shared with jaxquant.vq.linen.


def check_int(name: str, value: Any, minimum: int) -> int:
  """`value` as an int, after checking it is one and >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r}; expected an int >= {minimum}")
  return int(value)


def check_rate(quantizer_dropout: float) -> float:
  """`quantizer_dropout` as a float, after checking it is in [0, 1]."""
  if not 0.0 <= quantizer_dropout <= 1.0:
    raise ValueError(f"quantizer_dropout={quantizer_dropout!r}; expected a probability "
                     "in [0, 1]")
  return float(quantizer_dropout)


@dataclasses.dataclass(frozen=True)
class CodebookConfig:
  """The static settings of one VQ codebook (see `VectorQuantizer`)."""

  num_codes: int
  dim: int
  codebook_dim: Optional[int] = None
  metric: str = "l2"
  commitment_weight: float = 0.25
  ema_decay: Optional[float] = 0.99
  epsilon: float = 1e-5
  kmeans_init: bool = False
  kmeans_iters: int = 10
  dead_code_threshold: float = 0.0
  gradient: str = "ste"
  axis_name: Optional[str] = None

  def __post_init__(self):
    check_int("num_codes", self.num_codes, 1)
    check_int("dim", self.dim, 1)
    if self.codebook_dim is not None:
      check_int("codebook_dim", self.codebook_dim, 1)
    _common.check_choice("metric", self.metric, METRICS)
    _common.check_choice("gradient", self.gradient, GRADIENTS)
    if not self.commitment_weight >= 0:
      raise ValueError(f"commitment_weight={self.commitment_weight!r}; expected >= 0")
    if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ema_decay={self.ema_decay!r}; expected None (gradient-trained "
                       "codebook) or a float in [0, 1)")
    if not self.epsilon > 0:
      raise ValueError(f"epsilon={self.epsilon!r}; expected > 0")
    check_int("kmeans_iters", self.kmeans_iters, 0)
    if not self.dead_code_threshold >= 0:
      raise ValueError(f"dead_code_threshold={self.dead_code_threshold!r}; expected >= 0")
    if self.dead_code_threshold > 0 and self.ema_decay is None:
      raise ValueError(f"dead_code_threshold={self.dead_code_threshold} needs EMA cluster "
                       "sizes; expected ema_decay to be a float, not None")

  @property
  def code_dim(self) -> int:
    """C, the size of the codes: codebook_dim if given, else dim."""
    return self.dim if self.codebook_dim is None else self.codebook_dim

  @property
  def uses_key(self) -> bool:
    return self.kmeans_init or self.dead_code_threshold > 0


class CodebookVars(NamedTuple):
  """The arrays of one codebook; None where the configuration has none."""

  codebook: jax.Array  # float32[K, C]
  cluster_size: Optional[jax.Array]  # float32[K], EMA only
  embed_sum: Optional[jax.Array]  # float32[K, C], EMA only
  initialized: Optional[jax.Array]  # bool[], kmeans_init only
  key: Optional[jax.Array]  # uint32[2] or [4] key data, with k-means or dead codes


# Raw key data (what checkpoints and Flax collections hold) -> the PRNG it came
# from, told apart by its size. unsafe_rbg data, also uint32[4], continues as rbg.
_IMPL_OF_KEY_SIZE = {2: "threefry2x32", 4: "rbg"}


def _wrap_key(data: jax.Array) -> jax.Array:
  """The typed PRNG key whose raw data is `data` (uint32[2] or uint32[4])."""
  impl = _IMPL_OF_KEY_SIZE.get(data.shape[-1]) if data.ndim == 1 else None
  if impl is None:
    raise ValueError(f"restart key data of shape {data.shape}: expected uint32[2] "
                     "(threefry2x32) or uint32[4] (rbg, unsafe_rbg)")
  return jax.random.wrap_key_data(data, impl=impl)


_ATTRS = {"codebook": "embedding"}  # CodebookVars field -> module attribute


def check_input(z: jax.Array, dim: int, name: str = "dim") -> jax.Array:
  """float32 z, after checking ``z: float[..., dim]`` (`name`: the argument giving dim)."""
  z = _common.check_float("z", z)
  if z.shape[-1] != dim:
    raise ValueError(f"z has shape {z.shape}; expected a last axis of size {name}={dim}")
  return z.astype(jnp.float32)


def _search_points(config: CodebookConfig, x: jax.Array) -> jax.Array:
  """The vectors the codebook statistics see: x, l2-normalized for "cosine"."""
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  return l2_normalize(x) if config.metric == "cosine" else x


def _kmeans_once(config: CodebookConfig, state: CodebookVars, x: jax.Array,
                 key: jax.Array) -> CodebookVars:
  """`state` with a k-means codebook (and fresh EMA statistics) unless initialized."""
  def fit(state):
    codebook = kmeans_init(_search_points(config, x), config.num_codes, key,
                           config.kmeans_iters, config.axis_name)
    if config.ema_decay is None:
      return state._replace(codebook=codebook.astype(state.codebook.dtype))
    ema = ema_init(codebook)
    return state._replace(codebook=ema.codebook, cluster_size=ema.cluster_size,
                          embed_sum=ema.embed_sum)

  state = jax.lax.cond(state.initialized, lambda s: s, fit, state)
  return state._replace(initialized=jnp.ones((), jnp.bool_))


def _ema_step(config: CodebookConfig, state: CodebookVars, x: jax.Array,
              indices: jax.Array, keys: Sequence[jax.Array]) -> CodebookVars:
  """`ema_update`, then `replace_dead_codes` with their statistics reset."""
  points = _search_points(config, x)
  ema = ema_update(EMACodebookState(state.cluster_size, state.embed_sum, state.codebook),
                   points, indices, decay=config.ema_decay, eps=config.epsilon,
                   axis_name=config.axis_name)
  threshold = config.dead_code_threshold
  if threshold > 0:
    # Candidates: K random vectors of the global batch, the same on every device.
    candidates = kmeans_init(points, config.num_codes, keys[1], iters=0,
                             axis_name=config.axis_name)
    codebook = replace_dead_codes(ema.codebook, ema.cluster_size, candidates, keys[2],
                                  threshold)
    dead = ema.cluster_size < threshold
    ema = EMACodebookState(
        cluster_size=jnp.where(dead, threshold, ema.cluster_size),
        embed_sum=jnp.where(dead[:, None], codebook * threshold, ema.embed_sum),
        codebook=codebook)
  return state._replace(codebook=ema.codebook, cluster_size=ema.cluster_size,
                        embed_sum=ema.embed_sum)


def codebook_step(config: CodebookConfig, state: CodebookVars, x: jax.Array, *,
                  train: bool, active: Optional[jax.Array] = None):
  """One VQ lookup, and with `train` the codebook's update; pure.

  Order with `train`: k-means on the first batch (if configured), the lookup
  (`vector_quantize`) with that codebook, then the EMA step and dead-code
  restarts, so the outputs use the codebook from before the EMA step.

  Args:
    config: the codebook's settings.
    state: its arrays.
    x: float32[..., C].
    train: update the state (static).
    active: None, or a bool[] scalar: when False the outputs are masked as an
      inactive `residual_vq` stage (zeros, index -1, loss 0) and the state is
      returned unchanged.
  Returns:
    ``(zq float32[..., C], indices int32[...], loss float32[], new state)``;
    loss is the commitment loss, plus the codebook loss without EMA.
  """
  new = state
  keys = None
  if train and state.key is not None:
    key, *keys = jax.random.split(_wrap_key(state.key), 4)
    new = new._replace(key=jax.random.key_data(key))
  if train and config.kmeans_init:
    new = _kmeans_once(config, new, x, keys[0])
  zq, indices, losses = vector_quantize(
      x, new.codebook, metric=config.metric, gradient=config.gradient,
      commitment_weight=config.commitment_weight)
  loss = losses["commitment"]
  if config.ema_decay is None:
    loss = loss + losses["codebook"]
  if train and config.ema_decay is not None:
    new = _ema_step(config, new, x, indices, keys)
  if active is not None:
    zq = jnp.where(active, zq, 0.0)
    indices = jnp.where(active, indices, -1)
    loss = jnp.where(active, loss, 0.0)
    new = CodebookVars(*(n if n is o else jnp.where(active, n, o)
                         for n, o in zip(new, state)))
  return zq, indices, loss, new


def codebook_lookup(config: CodebookConfig, codebook: jax.Array, indices: jax.Array
                    ) -> jax.Array:
  """float32[..., C]: the codes of ``indices: int[...]`` (normalized for "cosine");
  zeros where an index is negative (an inactive residual stage)."""
  codebook = jnp.asarray(codebook, jnp.float32)
  if config.metric == "cosine":
    codebook = l2_normalize(codebook)
  indices = jnp.asarray(indices)
  valid = indices >= 0
  codes = jnp.take(codebook, jnp.where(valid, indices, 0), axis=0)
  return jnp.where(valid[..., None], codes, 0.0)


def draw_num_active(key: jax.Array, num_stages: int, rate: float) -> jax.Array:
  """int32[]: S, or with probability `rate` a number uniform in [1, S]."""
  drop_key, count_key = jax.random.split(key)
  count = jax.random.randint(count_key, (), 1, num_stages + 1, jnp.int32)
  return jnp.where(jax.random.bernoulli(drop_key, rate), count, num_stages)


def residual_step(stage_fns: Sequence[Callable], x: jax.Array,
                  num_active: Optional[jax.Array]):
  """Residual VQ over stages ``fn(residual, active) -> (zq, indices, loss)``.

  Returns ``(zq_sum float32[..., C], indices int32[..., S], loss float32[])``,
  computed as `jaxquant.vq.residual_vq` does (stage s active iff s < num_active).
  """
  residual, zq_sum = x, jnp.zeros_like(x)
  loss = jnp.zeros((), jnp.float32)
  all_indices = []
  for s, stage_fn in enumerate(stage_fns):
    active = None if num_active is None else s < num_active
    zq, indices, stage_loss = stage_fn(residual, active)
    residual, zq_sum = residual - zq, zq_sum + zq
    loss = loss + stage_loss
    all_indices.append(indices)
  return zq_sum, jnp.stack(all_indices, axis=-1), loss


def residual_output(stages: Sequence[Any], project_out, x: jax.Array, dtype,
                    num_active: Optional[jax.Array], *, train: bool) -> VQOutput:
  """`VQOutput` (in `dtype`) of `residual_step` over VectorQuantizer `stages`
  (NNX or Linen: anything with ``quantize``), projected out."""
  stage_fns = [lambda r, a, s=s: s.quantize(r, train=train, active=a) for s in stages]
  zq, indices, loss = residual_step(stage_fns, x, num_active)
  return VQOutput(project(project_out, zq).astype(dtype), indices, loss)


def residual_codes(stages: Sequence[Any], project_out, indices: jax.Array) -> jax.Array:
  """float32[..., dim]: the summed codes of `stages` for ``indices: int[..., S]``."""
  codes = sum(codebook_lookup(s.config, s.codebook, indices[..., i])
              for i, s in enumerate(stages))
  return project(project_out, codes)


def residual_fsq_active(z: jax.Array, levels: tuple[int, ...], num_stages: int,
                        num_active: Optional[jax.Array], *, bound: str):
  """`residual_fsq` of the first `num_active` (int32[] in [1, S]) stages.

  Returns ``(zhat [..., d] of z's dtype, indices int32[..., S])``, -1 for the
  stages left out; `lax.switch` runs one `residual_fsq` of the drawn depth.
  """
  if num_active is None:
    return residual_fsq(z, levels, num_stages, bound=bound)
  scales = residual_fsq_scales(levels, num_stages)

  def first(k):
    def run(z):
      zhat, indices = residual_fsq(z, levels, k, scales[:k], bound=bound)
      unused = jnp.full(indices.shape[:-1] + (num_stages - k,), -1, jnp.int32)
      return zhat, jnp.concatenate([indices, unused], axis=-1)
    return run

  branches = [first(k) for k in range(1, num_stages + 1)]
  return jax.lax.switch(num_active - 1, branches, z)


def residual_fsq_codes(indices: jax.Array, levels: tuple[int, ...], num_stages: int, *,
                       bound: str) -> jax.Array:
  """float32[..., d]: sum over stages of ``scale_s * code``; index -1 adds nothing."""
  indices = jnp.asarray(indices)
  if indices.ndim < 1 or indices.shape[-1] != num_stages:
    raise ValueError(f"indices has shape {indices.shape}; expected [..., {num_stages}]")
  scales = residual_fsq_scales(levels, num_stages)
  total = jnp.zeros(indices.shape[:-1] + (len(levels),), jnp.float32)
  for s in range(num_stages):
    idx = indices[..., s]
    codes = fsq_indices_to_codes(jnp.maximum(idx, 0), levels, bound=bound)
    scale = _common.lift(scales[s], codes.ndim)
    total = total + jnp.where((idx >= 0)[..., None], codes * scale, 0.0)
  return total


@dataclasses.dataclass(frozen=True)
class BinaryConfig:
  """The static settings of `LFQ` / `BSQ` (``spherical``)."""

  num_bits: int
  entropy_weight: float = 0.1
  commitment_weight: float = 0.25
  diversity_gamma: float = 1.0
  temperature: float = 0.01
  group_size: Optional[int] = None
  axis_name: Optional[str] = None
  spherical: bool = False

  def __post_init__(self):
    if check_int("num_bits", self.num_bits, 1) > 31:
      raise ValueError(f"num_bits={self.num_bits}; expected at most 31 (int32 indices)")
    if not self.temperature > 0:
      raise ValueError(f"temperature={self.temperature!r}; expected > 0")
    if self.group_size is not None:
      check_int("group_size", self.group_size, 1)


def binary_output(config: BinaryConfig, z: jax.Array) -> VQOutput:
  """`lfq` or `bsq` of ``z: float[..., num_bits]`` with the weighted losses."""
  x = check_input(z, config.num_bits, "num_bits")
  if config.spherical:
    zq, indices = bsq(z)
    x = l2_normalize(x)
  else:
    zq, indices = lfq(z)
  commitment = jnp.mean(jnp.square(x - jax.lax.stop_gradient(zq.astype(jnp.float32))))
  entropy = lfq_entropy_loss(
      x, temperature=config.temperature, gamma=config.diversity_gamma,
      group_size=config.group_size, axis_name=config.axis_name,
      code_scale=1.0 / math.sqrt(config.num_bits) if config.spherical else 1.0)
  loss = config.entropy_weight * entropy + config.commitment_weight * commitment
  return VQOutput(zq, indices, loss)


def binary_codes(config: BinaryConfig, indices: jax.Array) -> jax.Array:
  """float32[..., num_bits]: ±1 (LFQ) or ±1/sqrt(num_bits) (BSQ) codes of indices."""
  codes = lfq_indices_to_codes(indices, config.num_bits)
  return codes / math.sqrt(config.num_bits) if config.spherical else codes


def _nnx_projections(dim: int, code_dim: int, rngs: nnx.Rngs):
  if code_dim == dim:
    return None, None
  return nnx.Linear(dim, code_dim, rngs=rngs), nnx.Linear(code_dim, dim, rngs=rngs)


def project(layer, x: jax.Array) -> jax.Array:
  """`layer(x)`, or x when there is no projection (layer None)."""
  return x if layer is None else layer(x)


def _dropout_stream(rngs: Optional[nnx.Rngs], quantizer_dropout: float):
  """The RNG stream of quantizer dropout ("dropout", else default), or None."""
  if quantizer_dropout == 0:
    return None
  if rngs is None:
    raise ValueError(f"quantizer_dropout={quantizer_dropout} needs rngs; pass "
                     "rngs=nnx.Rngs(...) with a 'dropout' or default stream")
  try:
    return rngs["dropout"].fork()
  except KeyError:
    raise ValueError("rngs has no 'dropout' or default stream, which quantizer_dropout "
                     "needs") from None
