"""Flax Linen twins of the quantizer modules of `jaxquant.vq.modules`.

Same class names, arguments (less ``rngs``) and outputs (`VQOutput`); the math is
the NNX modules' framework-independent core, so for the same weights and state
both give identical results.

    >>> from jaxquant.vq import linen as vql
    >>> model = vql.VectorQuantizer(512, 64, kmeans_init=True)
    >>> variables = model.init(jax.random.key(0), z)
    >>> out, updates = model.apply(variables, z, train=True, mutable=["vq_stats"])
    >>> variables = {**variables, **updates}

Variables. Projections, and a gradient-trained codebook (``ema_decay=None``),
are in "params"; the EMA codebook, its statistics, the k-means flag and the
PRNG key of k-means and dead-code restarts are in the "vq_stats" collection
(`STATS`), changed only by ``apply(..., train=True, mutable=["vq_stats"])``
(nothing changes while `init` runs). A gradient-trained codebook with
``kmeans_init=True`` is written by its first training step, so that step needs
``mutable=["params", "vq_stats"]``. Randomness: stream "params" at init,
"dropout" for quantizer dropout.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.kernels import _common as kernels_common
from jaxquant.vq import _common
from jaxquant.vq.codebook import ema_init
from jaxquant.vq.modules import (BinaryConfig, CodebookConfig, CodebookVars, Initializer,
                                 VQOutput, binary_codes, binary_output, check_input,
                                 codebook_lookup, codebook_step, default_codebook_init,
                                 check_int, check_rate, draw_num_active, project,
                                 residual_codes, residual_fsq_active, residual_fsq_codes,
                                 residual_output)
from jaxquant.vq.scalar import BOUNDS, check_levels, fsq, fsq_indices_to_codes

STATS = "vq_stats"


class FSQ(nn.Module):
  """Finite scalar quantization; see `jaxquant.vq.modules.FSQ`."""

  levels: Sequence[int]
  bound: str = "reference"
  impl: str = "xla"

  def __post_init__(self):
    check_levels(self.levels)
    _common.check_choice("bound", self.bound, BOUNDS)
    _common.check_choice("impl", self.impl, kernels_common.IMPLS)
    super().__post_init__()

  @property
  def codebook_size(self) -> int:
    return math.prod(self.levels)

  def __call__(self, z: jax.Array, *, train: bool = False) -> VQOutput:
    del train  # FSQ behaves the same in training
    zhat, indices = fsq(z, self.levels, bound=self.bound, impl=self.impl)
    return VQOutput(zhat, indices, jnp.zeros((), jnp.float32))

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    return fsq_indices_to_codes(indices, self.levels, bound=self.bound)


class ResidualFSQ(nn.Module):
  """Residual FSQ with quantizer dropout (rng "dropout"); see
  `jaxquant.vq.modules.ResidualFSQ`."""

  levels: Sequence[int]
  num_stages: int
  bound: str = "reference"
  quantizer_dropout: float = 0.0

  def __post_init__(self):
    check_levels(self.levels)
    check_int("num_stages", self.num_stages, 1)
    _common.check_choice("bound", self.bound, BOUNDS)
    check_rate(self.quantizer_dropout)
    super().__post_init__()

  @property
  def codebook_size(self) -> int:
    return math.prod(self.levels)

  def __call__(self, z: jax.Array, *, train: bool = False) -> VQOutput:
    levels = check_levels(self.levels)
    num_active = None
    if train and self.quantizer_dropout > 0:
      num_active = draw_num_active(self.make_rng("dropout"), self.num_stages,
                                   self.quantizer_dropout)
    zhat, indices = residual_fsq_active(z, levels, self.num_stages, num_active,
                                        bound=self.bound)
    return VQOutput(zhat, indices, jnp.zeros((), jnp.float32))

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    return residual_fsq_codes(indices, check_levels(self.levels), self.num_stages,
                              bound=self.bound)


class VectorQuantizer(nn.Module):
  """Vector quantization with a learned codebook; arguments and behaviour as
  `jaxquant.vq.modules.VectorQuantizer` (variables: see the module docstring)."""

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
  codebook_init: Initializer = default_codebook_init

  def __post_init__(self):
    self.config  # validates the arguments
    super().__post_init__()

  @property
  def config(self) -> CodebookConfig:
    return CodebookConfig(
        num_codes=self.num_codes, dim=self.dim, codebook_dim=self.codebook_dim,
        metric=self.metric, commitment_weight=self.commitment_weight,
        ema_decay=self.ema_decay, epsilon=self.epsilon, kmeans_init=self.kmeans_init,
        kmeans_iters=self.kmeans_iters, dead_code_threshold=self.dead_code_threshold,
        gradient=self.gradient, axis_name=self.axis_name)

  def setup(self):
    config = self.config
    self.project_in, self.project_out = _linen_projections(self.dim, config.code_dim)
    shape = (config.num_codes, config.code_dim)
    init = lambda: self.codebook_init(self.make_rng("params"), shape, jnp.float32)
    if config.ema_decay is None:
      self.embedding = self.variable("params", "embedding", init)
      self.cluster_size = self.embed_sum = None
    else:
      self.embedding = self.variable(STATS, "embedding", init)
      start = lambda: ema_init(self.embedding.value)
      self.cluster_size = self.variable(STATS, "cluster_size", lambda: start().cluster_size)
      self.embed_sum = self.variable(STATS, "embed_sum", lambda: start().embed_sum)
    self.initialized = (self.variable(STATS, "initialized", jnp.zeros, (), jnp.bool_)
                        if config.kmeans_init else None)
    self.key = (self.variable(STATS, "key",
                              lambda: jax.random.key_data(self.make_rng("params")))
                if config.uses_key else None)

  @property
  def codebook(self) -> jax.Array:
    """float32[K, C]: the current codebook (on a bound module)."""
    return self.embedding.value

  def quantize(self, x: jax.Array, *, train: bool, active: Optional[jax.Array] = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`codebook_step` on ``x: float32[..., C]`` (already projected), updating state."""
    variables = [self.embedding, self.cluster_size, self.embed_sum, self.initialized,
                 self.key]
    state = CodebookVars(*(None if v is None else v.value for v in variables))
    update = train and not self.is_initializing()
    zq, indices, loss, new = codebook_step(self.config, state, x, train=update,
                                           active=active)
    for variable, old, value in zip(variables, state, new):
      if value is not old:
        variable.value = value
    return zq, indices, loss

  def __call__(self, z: jax.Array, *, train: bool = False) -> VQOutput:
    x = project(self.project_in, check_input(z, self.dim))
    zq, indices, loss = self.quantize(x, train=train)
    return VQOutput(project(self.project_out, zq).astype(z.dtype), indices, loss)

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    codes = codebook_lookup(self.config, self.codebook, indices)
    return project(self.project_out, codes)


class ResidualVQ(nn.Module):
  """Residual VQ of `VectorQuantizer` stages (``stages_0``, ...); see
  `jaxquant.vq.modules.ResidualVQ`. Quantizer dropout uses rng "dropout"."""

  num_stages: int
  num_codes: int
  dim: int
  quantizer_dropout: float = 0.0
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
  codebook_init: Initializer = default_codebook_init

  def __post_init__(self):
    check_int("num_stages", self.num_stages, 1)
    check_rate(self.quantizer_dropout)
    if self.codebook_dim is not None:
      check_int("codebook_dim", self.codebook_dim, 1)
    super().__post_init__()

  def setup(self):
    inner = self.dim if self.codebook_dim is None else self.codebook_dim
    self.project_in, self.project_out = _linen_projections(self.dim, inner)
    self.stages = [VectorQuantizer(
        self.num_codes, inner, metric=self.metric,
        commitment_weight=self.commitment_weight, ema_decay=self.ema_decay,
        epsilon=self.epsilon, kmeans_init=self.kmeans_init,
        kmeans_iters=self.kmeans_iters, dead_code_threshold=self.dead_code_threshold,
        gradient=self.gradient, axis_name=self.axis_name,
        codebook_init=self.codebook_init) for _ in range(self.num_stages)]

  def __call__(self, z: jax.Array, *, train: bool = False) -> VQOutput:
    x = project(self.project_in, check_input(z, self.dim))
    num_active = None
    if train and self.quantizer_dropout > 0:
      num_active = draw_num_active(self.make_rng("dropout"), self.num_stages,
                                   self.quantizer_dropout)
    return residual_output(self.stages, self.project_out, x, z.dtype, num_active,
                           train=train)

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    return residual_codes(self.stages, self.project_out, indices)


class _BinaryQuantizer(nn.Module):
  """`LFQ` or `BSQ` (abstract: `spherical` is set by the subclass)."""

  num_bits: int
  entropy_weight: float = 0.1
  commitment_weight: float = 0.25
  diversity_gamma: float = 1.0
  temperature: float = 0.01
  group_size: Optional[int] = None
  axis_name: Optional[str] = None

  def __post_init__(self):
    self.config  # validates the arguments
    super().__post_init__()

  @property
  def config(self) -> BinaryConfig:
    return BinaryConfig(
        num_bits=self.num_bits, entropy_weight=self.entropy_weight,
        commitment_weight=self.commitment_weight, diversity_gamma=self.diversity_gamma,
        temperature=self.temperature, group_size=self.group_size,
        axis_name=self.axis_name, spherical=self.spherical)

  @property
  def codebook_size(self) -> int:
    return 2**self.num_bits

  def __call__(self, z: jax.Array, *, train: bool = False) -> VQOutput:
    del train  # the same in training and evaluation
    return binary_output(self.config, z)

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    return binary_codes(self.config, indices)


class LFQ(_BinaryQuantizer):
  """Lookup-free quantization; see `jaxquant.vq.modules.LFQ`."""

  spherical = False


class BSQ(_BinaryQuantizer):
  """Binary spherical quantization; see `jaxquant.vq.modules.BSQ`."""

  spherical = True


def _linen_projections(dim: int, code_dim: int):
  if code_dim == dim:
    return None, None
  return nn.Dense(code_dim), nn.Dense(dim)
