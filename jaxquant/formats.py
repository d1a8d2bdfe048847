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
  No path gathers from the table: tables of <= 32 entries (nf4, the 4-bit
  dynamic maps) use compares and selects; the 8-bit dynamic-tree maps
  (``dynamic8``, ``udynamic8``) elementwise arithmetic, with the same codes and
  values bit for bit, as their tables are defined by that arithmetic (see
  `dynamic_map`).

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
    dynamic: for the dynamic-tree codebooks, the `DynamicMap` their table is
      computed from (`encode` and `decode` use it for tables > 32 entries).
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
  dynamic: Optional["DynamicMap"] = None

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


@dataclasses.dataclass(frozen=True)
class DynamicMap:
  """Parameters of a dynamic-tree map: enough to compute any entry arithmetically.

  Attributes:
    bits: bits per code (2**bits entries).
    signed: entries of both signs (first moments) or only >= 0 (second moments).
    nonzero: (unsigned only) code 0 is a tenth of the smallest positive entry
      instead of 0.
  """

  bits: int
  signed: bool
  nonzero: bool = False

  @property
  def shift(self) -> int:
    """u: decade i holds n_i = 2^(i + u) entries per sign (0 signed, 1 unsigned)."""
    return 0 if self.signed else 1

  @property
  def zero_code(self) -> int:
    """Code of magnitude index 0: the entry 0 (or the nonzero variant's tenth)."""
    return 2 ** (self.bits - 1) - 1 if self.signed else 0

  @property
  def one(self) -> int:
    """Magnitude index of 1.0: N + 1, N the entries strictly between 0 and 1."""
    return 2 ** (self.bits - 1) if self.signed else 2**self.bits - 1


def dynamic_scales(bits: int, signed: bool) -> np.ndarray:
  """C_i = 10^(i - bits + 2) / (20 n_i) for each decade i of a dynamic map.

  n_i = 2^i (signed) or 2^(i+1) (unsigned) is the number of entries in decade i.

  Returns:
    float32[bits - 1]: computed in float64, then rounded to float32.
  """
  shift = 0 if signed else 1
  return np.array([10.0 ** (i - bits + 2) / (20.0 * 2 ** (i + shift))
                   for i in range(bits - 1)], np.float32)


def dynamic_map(signed: bool = True, bits: int = 8) -> np.ndarray:
  """The dynamic-tree map of "8-bit Optimizers via Block-wise Quantization".

  Decade i = 0 .. bits - 2 holds n_i = 2^i (signed) or 2^(i+1) (unsigned)
  positive values, the midpoints of n_i + 1 evenly spaced points in [0.1, 1]
  scaled by 10^(i - (bits - 2)):

    v_{i,k} = (0.1 + (k + 0.5) * 0.9 / n_i) * 10^(i - (bits - 2)) = A * C_i,
    A = 2 n_i + 9 (2k + 1),  C_i = 10^(i - bits + 2) / (20 n_i),  k < n_i.

  Signed maps add the negatives, and all add 0 and 1. With bits=8 this is the
  paper's map; fewer bits drop the smallest decades. Each value is computed as
  ``float32(A) * float32(C_i)`` (A an exact integer, C_i computed in float64 and
  rounded to float32; see `dynamic_scales`): one correctly rounded float32
  multiply, which `decode` repeats bit for bit on any backend. The values are
  within 1 ulp of the paper's float64 construction rounded to float32.

  Returns:
    float32[2**bits], sorted ascending.
  """
  shift = 0 if signed else 1
  scales = dynamic_scales(bits, signed)
  positives = []
  for i in range(bits - 1):
    n = 2 ** (i + shift)
    a = (2 * n + 9 * (2 * np.arange(n) + 1)).astype(np.float32)
    positives.append(a * scales[i])
  positives = np.concatenate(positives)
  values = [positives, -positives] if signed else [positives]
  values = np.concatenate(values + [np.array([0.0, 1.0], np.float32)])
  return np.sort(values)


def nonzero_unsigned_dynamic_map(bits: int) -> np.ndarray:
  """The unsigned dynamic map with 0 replaced by a tenth of its smallest positive.

  For 4-bit second moments: a code for exactly 0 would turn a small second moment
  into 0 and the Adam update m / (sqrt(v) + eps) into m / eps. The tenth is one
  float32 division, ``table[1] / float32(10)``.

  Returns:
    float32[2**bits], sorted ascending, all > 0.
  """
  values = dynamic_map(signed=False, bits=bits)
  values[0] = values[1] / np.float32(10)
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


def _codebook_format(name: str, table, code_dtype, bits: int,
                     dynamic: Optional[DynamicMap] = None) -> Format:
  table = tuple(float(v) for v in np.sort(np.asarray(table, np.float32)))
  return Format(name, "codebook", bits, max(table), min(table), code_dtype,
                table=table, dynamic=dynamic)


def _dynamic_format(name: str, code_dtype, bits: int, signed: bool,
                    nonzero: bool = False) -> Format:
  table = (nonzero_unsigned_dynamic_map(bits) if nonzero else
           dynamic_map(signed=signed, bits=bits))
  return _codebook_format(name, table, code_dtype, bits,
                          DynamicMap(bits, signed, nonzero))


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
      _dynamic_format("dynamic8", jnp.uint8, 8, signed=True),
      _dynamic_format("udynamic8", jnp.uint8, 8, signed=False),
      _dynamic_format("dynamic4", jnp.uint4, 4, signed=True),
      _dynamic_format("udynamic4_nonzero", jnp.uint4, 4, signed=False, nonzero=True),
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
  `encode` uses gather-free arithmetic for the dynamic-tree maps instead
  (`_dynamic_encode`, the same codes); this stays the generic path and their
  reference.
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


# ----------------------------------------------------------------------------
# Dynamic-tree maps by arithmetic: no gathers, so XLA fuses and vectorizes them.
#
# Magnitude index t = 0 .. N + 1 (N entries strictly between 0 and 1): t = 0 is 0
# (or the nonzero variant's tenth), t = N + 1 = `DynamicMap.one` is 1.0, and entry
# k of decade i is t = n_i + k - u, n_i = 2^(i + u) (u = `DynamicMap.shift`). With
# q = t + u: n_i = 2^floor(log2 q), k = q - n_i, A = 2 n_i + 9 (2k + 1) =
# 18 q - 16 n_i + 9. Codes: unsigned maps store t; signed maps zero_code + t, and
# zero_code - t for the negative entries (there is no -1.0).


@dataclasses.dataclass(frozen=True)
class _DynamicConstants:
  """Per-format constants of the arithmetic encode and decode (numpy scalars).

  `bounds`, `bottom` and `top` are int32 bit patterns of float32 midpoints of the
  table (float32 ``(a + b) / 2``, as `_bucketed_table` computes them): positive
  floats order like their bit patterns.
  """

  scales: np.ndarray  # float32[bits - 1]: C_i
  slopes: np.ndarray  # float32[bits - 1]: ~1 / (18 C_i)
  bounds: np.ndarray  # int32[bits - 2]: midpoint below decade i = 1 .. bits - 2
  bottom: np.int32  # midpoint between the smallest magnitude and decade 0
  top: np.int32  # midpoint between the largest entry below 1 and 1
  smallest: np.float32  # magnitude of t = 0: 0, or the nonzero variant's tenth


@functools.lru_cache(maxsize=None)
def _dynamic_constants(name: str) -> _DynamicConstants:
  fmt = get_format(name)
  d, u = fmt.dynamic, fmt.dynamic.shift
  table = np.asarray(fmt.table, np.float32)
  magnitudes = table[d.zero_code:]  # t = 0 .. N + 1
  mids = ((magnitudes[:-1].astype(np.float64) + magnitudes[1:]) / 2).astype(np.float32)
  keys = mids.view(np.int32)
  starts = [2 ** (i + u) - u for i in range(1, d.bits - 1)]  # t of each decade's k = 0
  scales = dynamic_scales(d.bits, d.signed)
  slopes = (1 / (18 * scales.astype(np.float64))).astype(np.float32)
  return _DynamicConstants(scales, slopes,
                           keys[np.subtract(starts, 1)], keys[0], keys[-1],
                           magnitudes[0])


def _dynamic_decode(fmt: Format, codes: jax.Array) -> jax.Array:
  """`fmt.table[codes]` for a dynamic-tree map, by arithmetic (bit-exact).

  Each entry is ``float32(A) * float32(C_i)`` exactly as `dynamic_map` computes
  it; the decade comes from compares, 2^floor(log2 q) from the float exponent.

  Args:
    fmt: a format with ``fmt.dynamic``.
    codes: integer[...] codes in ``[0, 2**fmt.bits)``.
  Returns:
    float32[...].
  """
  d, consts = fmt.dynamic, _dynamic_constants(fmt.name)
  u = d.shift
  codes = codes.astype(jnp.int32)
  t = jnp.abs(codes - d.zero_code) if d.signed else codes
  q = t + u
  q_float = q.astype(jnp.float32)
  n = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(q_float, jnp.int32) & 0x7F800000, jnp.float32)
  scale = jnp.full(q.shape, consts.scales[0])
  for i in range(1, d.bits - 1):
    scale = jnp.where(q >= 2 ** (i + u), consts.scales[i], scale)
  value = (18 * q_float - 16 * n + 9) * scale  # A * C_i, one rounding
  value = jnp.where(t == 0, consts.smallest, value)
  value = jnp.where(t == d.one, np.float32(1), value)
  return jnp.where(codes < d.zero_code, -value, value) if d.signed else value


def _rounded_product(x: jax.Array, y: jax.Array) -> jax.Array:
  """float32 ``x * y``, rounded before any use, even one by an add.

  XLA may rewrite ``x * c + y * c`` as ``(x + y) * c`` and LLVM may contract a
  multiply and an add into an FMA, which skips the product's rounding. An integer
  ``min`` with the largest finite float's bits (the identity on everything but
  +inf and NaN) between them hides the multiply from both.
  """
  bits = jax.lax.bitcast_convert_type(x * y, jnp.int32)
  return jax.lax.bitcast_convert_type(jnp.minimum(bits, 0x7F7FFFFF), jnp.float32)


def _dynamic_magnitude_index(d: DynamicMap, consts: _DynamicConstants,
                             magnitude: jax.Array, key: jax.Array) -> jax.Array:
  """Magnitude index t (int32) of the entry nearest to `magnitude`.

  Args:
    d: the map.
    consts: its `_dynamic_constants`.
    magnitude: float32[...] >= 0 (anything else is decided by `key` alone).
    key: int32[...], the bit pattern of `magnitude`, or one less to send exact
      midpoints to the smaller entry; < 0 for t = 0.
  Returns:
    int32[...] in [0, N + 1].
  """
  u = d.shift
  # The decade: exact compares against the midpoints between decades.
  scale = jnp.full(key.shape, consts.scales[0])
  slope = jnp.full(key.shape, consts.slopes[0])
  n = jnp.full(key.shape, np.float32(2**u))
  for i in range(1, d.bits - 1):
    above = key >= consts.bounds[i - 1]
    scale = jnp.where(above, consts.scales[i], scale)
    slope = jnp.where(above, consts.slopes[i], slope)
    n = jnp.where(above, np.float32(2 ** (i + u)), n)
  # Entry k of the decade is A_k C_i with A_k = 2n + 9 + 18k, so the midpoints
  # are near (2n + 18 + 18j) C_i: j, the nearest one, is floor((a / C_i - 2n - 9)
  # / 18), computed roughly (the others are half a step away). Within [-1, n - 2]
  # it is a true midpoint or, for j = -1, one below the decade. k is j, plus one
  # when `magnitude` is at or above midpoint j, float32 (v_j + v_{j+1}) / 2 as in
  # the table.
  j = jnp.floor(magnitude * slope - (n * np.float32(1 / 9) + 0.5))
  j = jnp.where(j > n - 2, n - 2, j)
  a = 2 * n + 9 + 18 * j
  midpoint = (_rounded_product(a, scale) + _rounded_product(a + 18, scale)) * 0.5
  at_or_above = key >= jax.lax.bitcast_convert_type(midpoint, jnp.int32)
  t = n + j + at_or_above.astype(jnp.float32) - u  # exact small integer
  # float -> int32 by the bits of t + 2^23: no saturating conversion.
  t = jax.lax.bitcast_convert_type(t + np.float32(2**23), jnp.int32) - 0x4B000000
  t = jnp.where(key < consts.bottom, 0, t)
  return jnp.where(key >= consts.top, d.one, t)


def _dynamic_encode(fmt: Format, y: jax.Array) -> jax.Array:
  """`nearest_code(fmt, y)` for a dynamic-tree map, by arithmetic (no gathers).

  The same codes, exactly: the nearest entry, exactly-halfway values to the
  larger one; values beyond the table saturate; +NaN gets the last code, -NaN
  the code of the smallest magnitude (0 or the nonzero variant's tenth).

  Args:
    fmt: a format with ``fmt.dynamic``.
    y: float32[...].
  Returns:
    int32[...] codes.
  """
  d, consts = fmt.dynamic, _dynamic_constants(fmt.name)
  bits = jax.lax.bitcast_convert_type(y, jnp.int32)
  if not d.signed:  # y <= -0.0 and -NaN have bits < 0: code 0
    return _dynamic_magnitude_index(d, consts, y, bits)
  negative = bits < 0
  magnitude_bits = bits & 0x7FFFFFFF
  magnitude = jax.lax.bitcast_convert_type(magnitude_bits, jnp.float32)
  # |y| > m <=> pred(|y|) >= m: a negative y halfway goes to the smaller magnitude.
  key = magnitude_bits - negative.astype(jnp.int32)
  t = _dynamic_magnitude_index(d, consts, magnitude, key)
  # No -1.0: below -max(|entry| < 1), saturate at the most negative entry.
  codes = jnp.where(negative, d.zero_code - jnp.minimum(t, d.one - 1), d.zero_code + t)
  return jnp.where(negative & (magnitude_bits > 0x7F800000), d.zero_code, codes)


def _by_arithmetic(fmt: Format) -> bool:
  """Whether `encode`/`decode` use the dynamic-map arithmetic for `fmt`.

  Only above `_SELECT_MAX` entries: smaller tables already avoid gathers with
  compares and selects, which cost fewer instructions, and that matters where XLA
  cannot vectorize (e.g. loops that write uint4 codes, as 4-bit optimizer states
  do: the arithmetic made adamw_4bit's step ~1.7x slower on XLA:CPU).
  """
  return fmt.dynamic is not None and len(fmt.table) > _SELECT_MAX


def encode(fmt: Format, y: jax.Array) -> jax.Array:
  """Codes of float32 `y` (already divided by its scale) in `fmt.code_dtype`."""
  y = y.astype(jnp.float32)
  if fmt.kind in ("int", "uint"):
    return jnp.clip(jnp.round(y), fmt.min, fmt.max).astype(fmt.code_dtype)
  if fmt.kind == "float":
    return _float_to_codes(fmt, y)
  if _by_arithmetic(fmt):
    return _dynamic_encode(fmt, y).astype(fmt.code_dtype)
  if fmt.kind == "codebook":
    return nearest_code(fmt, y).astype(fmt.code_dtype)
  raise ValueError(f"format {fmt.name!r} is a scale format and holds no codes")


def decode(fmt: Format, codes: jax.Array) -> jax.Array:
  """float32 grid values of `codes` (inverse of `encode` on the grid)."""
  if _by_arithmetic(fmt):
    return _dynamic_decode(fmt, codes)
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
