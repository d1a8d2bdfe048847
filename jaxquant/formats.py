"""Number formats: integer, float (fp8/fp6/fp4), codebook (nf4, dynamic8) and scale (e8m0).

A `Format` is a frozen, hashable description of a grid of representable values and of
how codes are stored. Two pure functions do the work:

* `encode(fmt, y)`: float32 `y`, already divided by its scale, -> codes in
  `fmt.code_dtype`, rounding to the nearest grid value and saturating to `±fmt.max`.
* `decode(fmt, codes)`: codes -> float32 grid values.

Rounding rules, by kind:

* ``int``/``uint``: round half to even, then clip to ``[fmt.min, fmt.max]``.
* ``float``: round to nearest, ties to even, bit-exact with ml_dtypes' casts
  (subnormals included); out-of-range values saturate to ``±fmt.max``.
* ``codebook``: nearest value of the table; a value exactly halfway between two
  entries goes to the larger one. ``binary`` is the codebook {-1, +1} (0 -> +1).

Storage: codes use the narrowest dtype XLA supports (``int2``, ``int4``, ``int8``,
``uint4``, ``float8_e4m3fn``, ``float4_e2m1fn``, ...). XLA has no 6-bit float type,
so fp6 codes are uint8 holding the 6-bit pattern (sign, exponent, mantissa).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

KINDS = ("int", "uint", "float", "codebook", "scale")


@dataclasses.dataclass(frozen=True, eq=False)
class Format:
  """A number format: its grid of values and how its codes are stored.

  Attributes:
    name: registry name, e.g. ``"int4"``.
    kind: one of ``"int"``, ``"uint"``, ``"float"``, ``"codebook"``, ``"scale"``.
    bits: bits per code (what `jaxquant.pack_codes` stores).
    max: largest finite value of the grid.
    min: smallest finite value of the grid (``-max`` for signed float formats).
    code_dtype: dtype codes are stored in (unpacked).
    ml_dtype: for float and scale formats, the ml_dtypes type the rounding matches.
    table: for codebook formats, the code values sorted ascending (float32).
    emax: exponent of the largest normal number (float formats; MX scale rule).
  """

  name: str
  kind: str
  bits: int
  max: float
  min: float
  code_dtype: jnp.dtype
  ml_dtype: Optional[type] = None
  table: Optional[tuple] = None
  emax: Optional[int] = None

  def __eq__(self, other):
    return isinstance(other, Format) and self.name == other.name

  def __hash__(self):
    return hash(("Format", self.name))

  def __repr__(self):
    return f"Format({self.name!r})"

  @property
  def signed(self) -> bool:
    return self.min < 0

  @functools.cached_property
  def values(self) -> Optional[np.ndarray]:
    """Sorted grid of finite values (float64 numpy), or None for > 256 values."""
    return _grid_values(self)


def _grid_values(fmt: Format) -> Optional[np.ndarray]:
  if fmt.kind in ("int", "uint"):
    return np.arange(fmt.min, fmt.max + 1, dtype=np.float64)
  if fmt.kind == "codebook":
    return np.asarray(fmt.table, dtype=np.float64)
  if fmt.bits > 8:
    return None
  values = _float_table(fmt).astype(np.float64)
  values = values[np.isfinite(values)]
  return np.unique(values)  # also merges +0 and -0


@functools.lru_cache(maxsize=None)
def _float_table_cached(name: str) -> np.ndarray:
  fmt = get_format(name)
  # ml_dtypes' sub-byte float types are stored one per byte, low bits used.
  patterns = np.arange(2**fmt.bits, dtype=np.uint8)
  return patterns.view(fmt.ml_dtype).astype(np.float32)


def _float_table(fmt: Format) -> np.ndarray:
  """float32 value of every bit pattern of a <= 8-bit float format, by pattern."""
  return _float_table_cached(fmt.name)


# ----------------------------------------------------------------------------
# Published code tables.

# NF4 values as published with QLoRA (Dettmers et al., 2023).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def dynamic_map(signed: bool = True, bits: int = 8) -> np.ndarray:
  """The dynamic-tree map of "8-bit Optimizers via Block-wise Quantization".

  For i = 0 .. bits - 2, take 2^i + 1 (signed) or 2^(i+1) + 1 (unsigned) evenly
  spaced points in [0.1, 1], keep the midpoints of neighbours scaled by
  10^(i - (bits - 2)), add their negatives (signed), then 0 and 1. With bits=8 this
  is the paper's map; fewer bits drop the smallest decades.

  Returns:
    float32[2**bits], sorted ascending.
  """
  positives = []
  for i in range(bits - 1):
    n = 2**i + 1 if signed else 2 ** (i + 1) + 1
    points = np.linspace(0.1, 1.0, n)
    positives.extend(((points[:-1] + points[1:]) / 2) * 10.0 ** (i - (bits - 2)))
  positives = np.asarray(positives)
  values = [positives, -positives] if signed else [positives]
  values = np.concatenate(values + [np.array([0.0, 1.0])])
  return np.sort(values).astype(np.float32)


def nonzero_unsigned_dynamic_map(bits: int) -> np.ndarray:
  """The unsigned dynamic map with 0 replaced by a tenth of its smallest positive.

  For 4-bit second moments: a code for exactly 0 would turn a small second moment
  into 0 and the Adam update m / (sqrt(v) + eps) into m / eps.
  """
  values = dynamic_map(signed=False, bits=bits)
  values[0] = values[1] / 10
  return values


# ----------------------------------------------------------------------------
# Registry.


def _int_format(bits: int, signed: bool) -> Format:
  if signed:
    name, lo, hi = f"int{bits}", -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    dtype = jnp.int2 if bits <= 2 else jnp.int4 if bits <= 4 else jnp.int8
  else:
    name, lo, hi = f"uint{bits}", 0, 2**bits - 1
    dtype = jnp.uint2 if bits <= 2 else jnp.uint4 if bits <= 4 else jnp.uint8
  return Format(name, "int" if signed else "uint", bits, float(hi), float(lo), dtype)


def _float_format(name: str, ml_type, code_dtype) -> Format:
  info = ml_dtypes.finfo(ml_type)
  bits = info.bits
  fmax = float(info.max)
  return Format(name, "float", bits, fmax, -fmax, code_dtype, ml_dtype=ml_type,
                emax=int(np.floor(np.log2(fmax))))


def _codebook_format(name: str, table, code_dtype, bits: int) -> Format:
  table = tuple(float(v) for v in np.sort(np.asarray(table, np.float32)))
  return Format(name, "codebook", bits, max(table), min(table), code_dtype,
                table=table)


def _build_registry() -> dict[str, Format]:
  formats = [_int_format(b, True) for b in range(2, 9)]
  formats += [_int_format(b, False) for b in range(1, 9)]
  formats += [
      _codebook_format("binary", (-1.0, 1.0), jnp.uint2, 1),
      Format("ternary", "int", 2, 1.0, -1.0, jnp.int2),
      _float_format("fp8_e4m3", ml_dtypes.float8_e4m3fn, jnp.float8_e4m3fn),
      _float_format("fp8_e5m2", ml_dtypes.float8_e5m2, jnp.float8_e5m2),
      _float_format("fp6_e2m3", ml_dtypes.float6_e2m3fn, jnp.uint8),
      _float_format("fp6_e3m2", ml_dtypes.float6_e3m2fn, jnp.uint8),
      _float_format("fp4_e2m1", ml_dtypes.float4_e2m1fn, jnp.float4_e2m1fn),
      _codebook_format("nf4", NF4_VALUES, jnp.uint4, 4),
      _codebook_format("dynamic8", dynamic_map(signed=True), jnp.uint8, 8),
      _codebook_format("udynamic8", dynamic_map(signed=False), jnp.uint8, 8),
      _codebook_format("dynamic4", dynamic_map(signed=True, bits=4), jnp.uint4, 4),
      _codebook_format("udynamic4_nonzero", nonzero_unsigned_dynamic_map(4), jnp.uint4, 4),
      Format("e8m0", "scale", 8, 2.0**127, 2.0**-127, jnp.float8_e8m0fnu,
             ml_dtype=ml_dtypes.float8_e8m0fnu, emax=127),
  ]
  return {f.name: f for f in formats}


_REGISTRY = _build_registry()


def list_formats() -> list[str]:
  """Names of all built-in formats, in registry order."""
  return list(_REGISTRY)


def get_format(name: "str | Format") -> Format:
  """The `Format` called `name` (a `Format` is returned as is).

  Raises:
    ValueError: unknown name; the message lists the known ones.
  """
  if isinstance(name, Format):
    return name
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(
        f"format={name!r} is not a known format; known formats: "
        f"{', '.join(_REGISTRY)}")
  return _REGISTRY[name]


# ----------------------------------------------------------------------------
# Rounding onto a grid.


def round_to_float_grid(fmt: Format, y: jax.Array) -> jax.Array:
  """Rounds float32 `y` to `fmt`'s float grid, RNE, saturating at ±max.

  Works by exponent arithmetic (exact in float32), so it covers formats XLA has no
  dtype for (fp6). Signed zeros are kept, as in ml_dtypes.

  Args:
    fmt: a ``float`` format.
    y: float32[...].
  Returns:
    float32[...] with values on the grid.
  """
  info = ml_dtypes.finfo(fmt.ml_dtype)
  mant_bits = info.nmant
  min_exp = int(info.minexp)
  magnitude = jnp.minimum(jnp.abs(y), fmt.max)
  _, exp = jnp.frexp(magnitude)  # magnitude = m * 2**exp, m in [0.5, 1)
  exp = jnp.maximum(exp - 1, min_exp)
  step = jnp.ldexp(jnp.ones_like(magnitude), exp - mant_bits)
  rounded = jnp.round(magnitude / step) * step  # jnp.round is half to even
  return jnp.copysign(rounded, y)


def _float_to_codes(fmt: Format, y: jax.Array) -> jax.Array:
  if fmt.name == "fp8_e4m3":
    return jax.lax.platform_dependent(y, cpu=_e4m3_codes_by_bits,
                                      default=functools.partial(_convert_codes, fmt))
  if fmt.code_dtype != jnp.uint8:
    return _convert_codes(fmt, y)
  rounded = round_to_float_grid(fmt, y)
  magnitudes = jnp.asarray(_float_table(fmt)[: 2 ** (fmt.bits - 1)])
  magnitude_bits = count_sorted(magnitudes, jnp.abs(rounded), inclusive=False)
  magnitude_bits = magnitude_bits.astype(jnp.uint8)
  sign_bit = jnp.signbit(rounded).astype(jnp.uint8) << (fmt.bits - 1)
  return sign_bit | magnitude_bits


def _convert_codes(fmt: Format, y: jax.Array) -> jax.Array:
  # XLA's convert rounds to nearest even; clipping first makes it saturate.
  return jnp.clip(y, -fmt.max, fmt.max).astype(fmt.code_dtype)


def _e4m3_codes_by_bits(y: jax.Array) -> jax.Array:
  """float32 -> float8_e4m3fn codes, bit-exact with the clip-and-convert above.

  Integer arithmetic on the float32 bits (RNE by adding a rounding bias; subnormal
  codes by adding 2^14, whose ulp is e4m3's subnormal step). XLA:CPU converts to
  and from fp8 one element at a time; this vectorizes.
  """
  bits = jax.lax.bitcast_convert_type(y, jnp.uint32)
  sign = (bits >> 24) & 0x80
  magnitude = jnp.minimum(jnp.abs(y), 448.0)  # saturate; NaN stays NaN
  m_bits = jax.lax.bitcast_convert_type(magnitude, jnp.uint32)
  normal = ((m_bits + 0x7FFFF + ((m_bits >> 20) & 1)) >> 20) - ((127 - 7) << 3)
  magic = np.float32(2.0**14)
  subnormal = (jax.lax.bitcast_convert_type(magnitude + magic, jnp.uint32)
               - magic.view(np.uint32))
  code = jnp.where(magnitude < 2.0**-6, subnormal, normal)
  code = jnp.where(jnp.isnan(magnitude), 0x7F, code) | sign
  return jax.lax.bitcast_convert_type(code.astype(jnp.uint8), jnp.float8_e4m3fn)


def _e4m3_values_by_bits(codes: jax.Array) -> jax.Array:
  """float8_e4m3fn codes -> float32, exact (subnormals, signed zeros, NaN)."""
  bits = jax.lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.uint32)
  magnitude = bits & 0x7F
  normal = (magnitude << 20) + ((127 - 7) << 23)
  subnormal = jax.lax.bitcast_convert_type(magnitude.astype(jnp.float32) * 2.0**-9,
                                           jnp.uint32)
  value = jnp.where(magnitude < 8, subnormal, normal)
  value = jnp.where(magnitude == 0x7F, 0x7FC00000, value) | ((bits & 0x80) << 24)
  return jax.lax.bitcast_convert_type(value, jnp.float32)


_SELECT_MAX = 32  # constant tables up to this size: compares and selects, no gathers


def select_lookup(table: np.ndarray, index: jax.Array) -> jax.Array:
  """``table[index]`` for a constant table of <= 32 entries, without a gather.

  A tree of selects on the bits of `index` (15 for 16 entries): elementwise, so it
  keeps `index`'s sharding, and a fused loop around it still vectorizes (a gather
  makes XLA:CPU emit it one element at a time).
  """
  values = list(np.asarray(table))
  values += values[-1:] * ((1 << (len(values) - 1).bit_length()) - len(values))
  bit = 0
  while len(values) > 1:
    odd = ((index >> bit) & 1) == 1
    values = [jnp.where(odd, values[i + 1], values[i]) for i in range(0, len(values), 2)]
    bit += 1
  return jnp.broadcast_to(jnp.asarray(values[0], table.dtype), index.shape)


def table_lookup(table, index: jax.Array) -> jax.Array:
  """``table[index]`` for a small constant table, sharded like `index`.

  Under an Explicit mesh a plain gather from an unsharded table cannot infer its
  output sharding; this names it (the index's), so lookups stay local.
  """
  table = jnp.asarray(table)
  return table.at[index].get(out_sharding=jax.typeof(index).sharding)


def count_sorted(table: jax.Array, y: jax.Array, *, inclusive: bool) -> jax.Array:
  """Number of entries of sorted `table` below `y` (``<= y`` if `inclusive`), int32.

  A branchless binary search: log2(len(table)) rounds of a small gather and a
  compare, elementwise in `y`, so it keeps `y`'s sharding (jnp.searchsorted does
  not under a mesh) and fuses into the surrounding elementwise code.
  """
  size = 1 << max(int(table.shape[0]), 1).bit_length()  # power of two > len(table)
  padded = jnp.concatenate([table, jnp.full((size - table.shape[0],), jnp.inf, table.dtype)])
  count = jnp.zeros(y.shape, jnp.int32)
  step = size // 2
  while step:
    probe = table_lookup(padded, count + (step - 1))
    below = probe <= y if inclusive else probe < y
    count = jnp.where(below, count + step, count)
    step //= 2
  return count


def _monotonic_key(y):
  """int32 keys ordered like the float32 values (bit trick; -0.0 sorts below +0.0)."""
  bits = y.view(np.int32) if isinstance(y, np.ndarray) else jax.lax.bitcast_convert_type(
      y, jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class _BucketedTable:
  """Nearest-entry search for a sorted table in O(1): bucket lookup + compare.

  Buckets split the float32 line by the top bits of its ordered integer keys
  (`shift` low bits dropped: 2^(23 - shift) buckets per octave). `first[b]` counts
  the midpoints below bucket b; at most `max_per_bucket` midpoints fall inside a
  bucket, so as many compare-and-step rounds finish the count exactly.
  """

  midpoints: np.ndarray  # float32[n - 1] and one +inf
  first: np.ndarray  # uint8/int32[buckets]
  key_offset: int
  shift: int
  max_per_bucket: int


@functools.lru_cache(maxsize=None)
def _bucketed_table(name: str) -> _BucketedTable:
  table = np.asarray(get_format(name).table, np.float32)
  midpoints = ((table[:-1].astype(np.float64) + table[1:]) / 2).astype(np.float32)
  mid_keys = _monotonic_key(midpoints).astype(np.int64)
  lo_key, hi_key = (int(k) for k in _monotonic_key(table[[0, -1]]).astype(np.int64))
  for shift in range(23, 8, -1):
    offset = lo_key >> shift
    starts = (np.arange(offset, (hi_key >> shift) + 1, dtype=np.int64) << shift)
    first = np.searchsorted(mid_keys, starts, side="left")
    per_bucket = np.diff(np.append(first, len(midpoints)))
    if per_bucket.max() <= 1 or len(starts) > 2**16:
      break
  dtype = np.uint8 if len(midpoints) < 256 else np.int32
  return _BucketedTable(np.append(midpoints, np.float32(np.inf)), first.astype(dtype),
                        offset, shift, int(per_bucket.max()))


def nearest_code(fmt: Format, y: jax.Array) -> jax.Array:
  """Index (int32) of the entry of `fmt.table` nearest to each element of `y`.

  Exactly-halfway values go to the larger entry. A bucket lookup plus one or two
  compares per element (the table decides), all elementwise gathers from small
  constant tables, so it keeps `y`'s sharding and fuses with its neighbours.
  """
  search = _bucketed_table(fmt.name)
  if len(fmt.table) <= _SELECT_MAX:
    return _count_midpoints_at_or_below(search.midpoints[:-1], y)
  y = jnp.clip(y, fmt.table[0], fmt.table[-1])
  bucket = (_monotonic_key(y) >> search.shift) - search.key_offset
  count = table_lookup(search.first, bucket).astype(jnp.int32)
  for _ in range(search.max_per_bucket):
    count = count + (table_lookup(search.midpoints, count) <= y).astype(jnp.int32)
  return count


def _count_midpoints_at_or_below(midpoints: np.ndarray, y: jax.Array) -> jax.Array:
  """Nearest code for a small table: one compare per midpoint, no gathers."""
  count = jnp.zeros(y.shape, jnp.int32)
  for m in midpoints:
    count = count + (y >= m).astype(jnp.int32)
  # NaN: as the bucketed search, +NaN -> the last code, -NaN -> midpoints below 0.
  nan_code = jnp.where(jnp.signbit(y), int(np.sum(midpoints < 0)), len(midpoints))
  return jnp.where(jnp.isnan(y), nan_code, count)


def encode(fmt: Format, y: jax.Array) -> jax.Array:
  """Codes of float32 `y` (already divided by its scale) in `fmt.code_dtype`."""
  y = y.astype(jnp.float32)
  if fmt.kind in ("int", "uint"):
    return jnp.clip(jnp.round(y), fmt.min, fmt.max).astype(fmt.code_dtype)
  if fmt.kind == "float":
    return _float_to_codes(fmt, y)
  if fmt.kind == "codebook":
    return nearest_code(fmt, y).astype(fmt.code_dtype)
  raise ValueError(f"format {fmt.name!r} is a scale format and holds no codes")


def decode(fmt: Format, codes: jax.Array) -> jax.Array:
  """float32 grid values of `codes` (inverse of `encode` on the grid)."""
  if fmt.kind == "codebook" or (fmt.kind == "float" and fmt.code_dtype == jnp.uint8):
    table = np.asarray(fmt.table, np.float32) if fmt.kind == "codebook" else _float_table(fmt)
    lookup = select_lookup if len(table) <= _SELECT_MAX else table_lookup
    return lookup(table, codes.astype(jnp.int32))
  if fmt.name == "fp8_e4m3":
    return jax.lax.platform_dependent(codes, cpu=_e4m3_values_by_bits,
                                      default=lambda c: c.astype(jnp.float32))
  return codes.astype(jnp.float32)


def stochastic_encode(fmt: Format, y: jax.Array, key: jax.Array) -> jax.Array:
  """Codes of `y`, rounded up or down at random so that E[decode(codes)] = y.

  The probability of rounding up is the distance to the lower neighbour divided by
  the gap between the two grid values enclosing `y` (saturating at the ends).
  """
  if fmt.values is None:
    raise ValueError(f"stochastic rounding needs a grid of <= 256 values; "
                     f"{fmt.name!r} has more")
  y = jnp.clip(y.astype(jnp.float32), fmt.min, fmt.max)
  grid = jnp.asarray(fmt.values, jnp.float32)
  upper = jnp.clip(count_sorted(grid, y, inclusive=False), 1, grid.size - 1)
  lo, hi = table_lookup(grid, upper - 1), table_lookup(grid, upper)
  p_up = (y - lo) / (hi - lo)
  u = jax.random.uniform(key, y.shape, jnp.float32)
  chosen = jnp.where(u < p_up, hi, lo)
  return encode(fmt, chosen)
