"""Block-wise quantized optimizer state ("8-bit Optimizers via Block-wise Quantization").

A state leaf (a moment of one parameter) is stored as a `QArray`: blocks of
`block_size` consecutive elements along one axis, each with its own float32
absmax, and codes in the dynamic-tree map (signed for first moments, unsigned for
second moments). Blocks run along a single axis of the parameter's own shape and
every other axis keeps a scale per index, so the state is sharded like its
parameter and a block never straddles a shard whose size along that axis is a
multiple of the block. Leaves smaller than `min_size` elements keep float32 state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxquant.qarray import QArray
from jaxquant import formats
from jaxquant.quantize import QuantSpec, quantize

_SMALLEST_BLOCK = 32


def block_axis(shape: tuple[int, ...], block_size: int) -> Optional[tuple[int, int]]:
  """(axis, block) for a state leaf of `shape`, or None when nothing fits.

  The last axis whose length `block_size` divides wins; failing that, the axis
  with the largest power-of-two divisor between 32 and `block_size`.
  """
  for axis in reversed(range(len(shape))):
    if shape[axis] % block_size == 0:
      return axis, block_size
  best = None
  for axis in reversed(range(len(shape))):
    block = block_size
    while block >= _SMALLEST_BLOCK and shape[axis] % block:
      block //= 2
    if block >= _SMALLEST_BLOCK and (best is None or block > best[1]):
      best = (axis, block)
  return best


@dataclasses.dataclass(frozen=True)
class StateQuantizer:
  """How optimizer state leaves are stored.

  Attributes:
    signed_format: format of signed moments (first moments, momentum).
    unsigned_format: format of non-negative moments (second moments).
    block_size: elements per block along the chosen axis.
    min_size: leaves with fewer elements keep float32 state.
  """

  signed_format: str = "dynamic8"
  unsigned_format: str = "udynamic8"
  block_size: int = 256
  min_size: int = 4096

  def __post_init__(self):
    if self.block_size < 1 or self.block_size & (self.block_size - 1):
      raise ValueError(f"block_size={self.block_size} must be a power of two")
    if self.min_size < 0:
      raise ValueError(f"min_size={self.min_size} must be >= 0")

  def spec(self, shape: tuple[int, ...], *, signed: bool) -> Optional[QuantSpec]:
    """The spec of a state leaf of `shape`, or None to keep it in float32."""
    if math.prod(shape) < self.min_size or not shape:
      return None
    placement = block_axis(tuple(shape), self.block_size)
    if placement is None:
      return None
    axis, block = placement
    fmt = self.signed_format if signed else self.unsigned_format
    others = tuple(a for a in range(len(shape)) if a != axis)
    return QuantSpec(fmt, channel_axes=others, block_sizes={axis: block})

  def zeros(self, param: jax.Array, *, signed: bool):
    """A zero state leaf for `param`: a QArray, or float32 zeros."""
    zeros = jnp.zeros(param.shape, jnp.float32)
    spec = self.spec(param.shape, signed=signed)
    return zeros if spec is None else quantize(zeros, spec)


# ----------------------------------------------------------------------------
# A step works on each state leaf in its *blocked view*: the leaf's shape with its
# block axis split into [n_blocks, block] (a float32 leaf's view is its own shape).
# Decoding, the update and re-encoding then share one layout.
#
# The new moments are computed twice, and never stored in float32: once, on slices
# of the inputs, for each block's absmax, and once, whole, where the codes and the
# update are computed (XLA fuses that copy into each consumer). A reduction over the
# whole new moment would make XLA materialize it: on XLA:CPU, which fuses no
# producer into a reduction, that is 4 bytes per moment and parameter of scratch
# in every step, more than the quantized state itself.

_ABSMAX_SLICES = 16


def _block(leaf: QArray) -> tuple[int, int]:
  """(axis, block) of a quantized state leaf."""
  ((axis, block),) = leaf.spec.block_size_dict.items()
  return axis, block


def view(x: jax.Array, leaf) -> jax.Array:
  """`x` (shaped like the parameter) in the blocked view of state `leaf`."""
  if not isinstance(leaf, QArray):
    return x
  axis, block = _block(leaf)
  shape = x.shape
  return x.reshape(shape[:axis] + (shape[axis] // block, block) + shape[axis + 1:])


def _decode(leaf: QArray, codes: jax.Array, scale: jax.Array) -> jax.Array:
  """float32 values of `codes` (blocked view, or a slice of it) with per-block `scale`."""
  axis, _ = _block(leaf)
  values = formats.decode(leaf.format, codes)
  return values * jnp.expand_dims(scale.astype(jnp.float32), axis + 1)


def load(leaf) -> jax.Array:
  """A state leaf as float32, in its blocked view (dequantized when a QArray)."""
  if not isinstance(leaf, QArray):
    return leaf.astype(jnp.float32)
  return _decode(leaf, view(leaf.codes, leaf), leaf.scale)


def _magnitude_bits(x: jax.Array) -> jax.Array:
  """int32 bit patterns of |x|: they order as the magnitudes do (NaN above inf)."""
  return jax.lax.bitcast_convert_type(x, jnp.int32) & 0x7FFFFFFF


def block_absmax(moments: Callable[..., Sequence[jax.Array]], g32: jax.Array,
                 leaves: Sequence[QArray]) -> list[jax.Array]:
  """Per-block max |m| of each new moment m = moments(g32, *loaded leaves)[i].

  Computed on `_ABSMAX_SLICES` slices of every block, each slice's moments
  recomputed from the slice's gradient and codes, and combined with an elementwise
  integer max of magnitude bits, which XLA fuses into one pass; only a
  [..., n_blocks, block / slices] array is stored before the last reduction.

  Args:
    moments: elementwise (g32, *old values) -> new moments, float32.
    g32: float32 gradient in the leaves' blocked view.
    leaves: QArrays sharing one block placement.
  Returns:
    float32 absmax per block, shaped like each leaf's scale in the blocked view.
  """
  axis, block = _block(leaves[0])
  slices = min(_ABSMAX_SLICES, block)
  split = lambda x: x.reshape(x.shape[:axis + 1] + (slices, block // slices)
                              + x.shape[axis + 2:])
  g_split = split(g32)
  codes_split = [split(view(leaf.codes, leaf)) for leaf in leaves]
  widest = None
  for k in range(slices):
    take = lambda x: jax.lax.index_in_dim(x, k, axis + 1, keepdims=False)
    olds = [_decode(leaf, take(codes), leaf.scale)
            for leaf, codes in zip(leaves, codes_split)]
    bits = [_magnitude_bits(m) for m in moments(take(g_split), *olds)]
    widest = bits if widest is None else [jnp.maximum(a, b) for a, b in zip(widest, bits)]
  return [jnp.max(jax.lax.bitcast_convert_type(b, jnp.float32), axis=axis + 1)
          for b in widest]


def store(value: jax.Array, previous, absmax: Optional[jax.Array] = None):
  """float32 `value` (in the blocked view) stored the way `previous` was.

  For a QArray, the same codes and scales as ``quantize(value, previous.spec)``:
  each block's absmax over the format's largest magnitude is its scale. `absmax`,
  when given, is that per-block absmax (from `block_absmax`).
  """
  if not isinstance(previous, QArray):
    return value.astype(jnp.float32)
  axis, _ = _block(previous)
  fmt = previous.format
  if absmax is None:
    absmax = jnp.max(jnp.abs(value), axis=axis + 1)
  scale = jnp.expand_dims(absmax, axis + 1) / fmt.max
  codes = formats.encode(fmt, value / jnp.where(scale > 0, scale, 1.0))
  return QArray(codes=codes.reshape(previous.shape),
                scale=scale.reshape(previous.scale.shape), zero_point=None,
                tensor_scale=None, spec=previous.spec, dtype=jnp.float32)


def step(g: jax.Array, leaves: Sequence, moments: Callable[..., Sequence[jax.Array]]):
  """New moments of one parameter and the state leaves that store them.

  Args:
    g: the parameter's gradient.
    leaves: its state leaves: QArrays sharing one block placement, or float32.
    moments: elementwise (g32, *old values) -> new moments, all float32.
  Returns:
    (g32, olds, news, new_leaves): the float32 gradient, old and new moments (all
    in the blocked view, for the caller's update) and the new state leaves.
  """
  g32 = view(g, leaves[0]).astype(jnp.float32)
  olds = [load(leaf) for leaf in leaves]
  news = list(moments(g32, *olds))
  if isinstance(leaves[0], QArray):
    absmaxes = block_absmax(moments, g32, leaves)
  else:
    absmaxes = [None] * len(leaves)
  new_leaves = [store(m, leaf, a) for m, leaf, a in zip(news, leaves, absmaxes)]
  return g32, olds, news, new_leaves


def is_state_leaf(x) -> bool:
  return isinstance(x, QArray)
