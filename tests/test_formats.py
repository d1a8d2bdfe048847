"""Formats: registry, published tables, and float rounding bit-exact with ml_dtypes."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import formats as F

FLOAT_FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1"]
ML_TYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
MAXES = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp6_e2m3": 7.5, "fp6_e3m2": 28.0,
         "fp4_e2m1": 6.0}


def test_registry_lists_every_format_of_the_contract():
  names = jq.list_formats()
  expected = ([f"int{b}" for b in range(2, 9)] + [f"uint{b}" for b in range(1, 9)] +
              ["binary", "ternary", *FLOAT_FORMATS, "nf4", "dynamic8", "udynamic8",
               "dynamic4", "udynamic4_nonzero", "e8m0"])
  assert sorted(names) == sorted(expected)
  for name in names:
    assert jq.get_format(name).name == name


def test_unknown_format_error_lists_known_names():
  with pytest.raises(ValueError, match="int5") as info:
    jq.get_format("int42")
  assert "int42" in str(info.value) and "nf4" in str(info.value)


@pytest.mark.parametrize("bits", range(2, 9))
def test_signed_int_grid(bits):
  fmt = jq.get_format(f"int{bits}")
  assert (fmt.bits, fmt.max, fmt.min) == (bits, 2 ** (bits - 1) - 1, -(2 ** (bits - 1)))
  np.testing.assert_array_equal(fmt.values, np.arange(fmt.min, fmt.max + 1))


@pytest.mark.parametrize("bits", range(1, 9))
def test_unsigned_int_grid(bits):
  fmt = jq.get_format(f"uint{bits}")
  assert (fmt.max, fmt.min) == (2**bits - 1, 0)
  assert fmt.values.size == 2**bits


def test_binary_and_ternary_grids():
  np.testing.assert_array_equal(jq.get_format("binary").values, [-1, 1])
  np.testing.assert_array_equal(jq.get_format("ternary").values, [-1, 0, 1])
  assert jq.get_format("binary").bits == 1 and jq.get_format("ternary").bits == 2


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_float_format_max_and_values_match_ml_dtypes(name):
  fmt = jq.get_format(name)
  assert fmt.max == MAXES[name]
  assert fmt.bits == ml_dtypes.finfo(ML_TYPES[name]).bits
  patterns = np.arange(2**fmt.bits, dtype=np.uint8).view(ML_TYPES[name])
  finite = np.unique(patterns.astype(np.float64)[np.isfinite(patterns.astype(np.float64))])
  np.testing.assert_array_equal(fmt.values, finite)


def test_fp4_values_are_the_published_ones():
  positives = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
  expected = sorted(set(positives + [-v for v in positives]))
  np.testing.assert_array_equal(jq.get_format("fp4_e2m1").values, expected)


def test_nf4_table_is_the_published_qlora_table():
  published = [
      -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
      -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
      0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
      0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
      0.7229568362236023, 1.0]
  np.testing.assert_array_equal(jq.get_format("nf4").values,
                                np.asarray(published, np.float32).astype(np.float64))


def test_dynamic_maps_follow_the_paper_construction():
  signed = jq.get_format("dynamic8").values
  unsigned = jq.get_format("udynamic8").values
  for table in (signed, unsigned):
    assert table.size == 256 and np.all(np.diff(table) > 0)
    assert table[-1] == 1.0 and 0.0 in table
  # Largest magnitude below 1: last midpoint of 65 points in [0.1, 1] -> 1 - 0.9/128.
  np.testing.assert_allclose(signed[0], -(1 - 0.9 / 128), rtol=1e-6)
  np.testing.assert_allclose(signed[-2], 1 - 0.9 / 128, rtol=1e-6)
  # Smallest magnitude: midpoint of {0.1, 1} scaled by 1e-6.
  np.testing.assert_allclose(signed[signed > 0][0], 0.55e-6, rtol=1e-6)
  assert unsigned[0] == 0.0 and np.all(unsigned >= 0)
  # Unsigned: the first decade has 2 midpoints of {0.1, 0.55, 1}, scaled by 1e-6.
  np.testing.assert_allclose(unsigned[1:3], [0.325e-6, 0.775e-6], rtol=1e-6)
  np.testing.assert_allclose(unsigned[-2], 1 - 0.9 / 256, rtol=1e-6)  # 129 points


def test_four_bit_dynamic_maps():
  signed = jq.get_format("dynamic4").values
  assert signed.size == 16 and signed[-1] == 1.0 and 0.0 in signed
  # Decades i = 0, 1, 2: 1 + 2 + 4 midpoints each side, the largest 1 - 0.9 / 8.
  np.testing.assert_allclose(signed[-2], 1 - 0.9 / 8, rtol=1e-6)
  np.testing.assert_allclose(signed[signed > 0][0], 0.55e-2, rtol=1e-6)
  nonzero = jq.get_format("udynamic4_nonzero").values
  assert nonzero.size == 16 and np.all(nonzero > 0)
  np.testing.assert_allclose(nonzero[:2], [0.325e-3, 0.325e-2], rtol=1e-6)


def test_e8m0_is_powers_of_two():
  values = jq.get_format("e8m0").values
  assert values.size == 255
  np.testing.assert_array_equal(values, 2.0 ** np.arange(-127, 128))


def _rounding_inputs(name, rng):
  """All bfloat16 values, random float32, exact midpoints and their neighbours."""
  all_bf16 = (np.arange(2**16, dtype=np.uint32) << 16).view(np.float32)
  all_bf16 = all_bf16[np.isfinite(all_bf16)]
  grid = jq.get_format(name).values.astype(np.float32)
  mids = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
  near = np.concatenate([np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
  fmax = jq.get_format(name).max
  randoms = rng.standard_normal(20000).astype(np.float32) * np.float32(fmax / 4)
  tiny = rng.standard_normal(5000).astype(np.float32) * np.float32(2.0**-8)
  edges = np.array([0.0, -0.0, fmax, -fmax, 1e30, -1e30], np.float32)
  return np.concatenate([all_bf16, randoms, tiny, mids, near, edges])


def _ml_dtypes_bits(name, x):
  fmax = np.float32(jq.get_format(name).max)
  return np.clip(x, -fmax, fmax).astype(ML_TYPES[name]).view(np.uint8)


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_encode_is_bit_exact_with_ml_dtypes(name):
  x = _rounding_inputs(name, np.random.default_rng(0))
  codes = np.asarray(jax.jit(lambda y: F.encode(jq.get_format(name), y))(x))
  bits = codes if codes.dtype == np.uint8 else codes.view(np.uint8)
  np.testing.assert_array_equal(bits, _ml_dtypes_bits(name, x))


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_exponent_arithmetic_rounding_is_bit_exact_with_ml_dtypes(name):
  """The dtype-free path (used for fp6) agrees with ml_dtypes on every format."""
  x = _rounding_inputs(name, np.random.default_rng(1))
  rounded = np.asarray(jax.jit(lambda y: F.round_to_float_grid(jq.get_format(name), y))(x))
  expected = np.clip(x, -MAXES[name], MAXES[name]).astype(ML_TYPES[name]).astype(np.float32)
  np.testing.assert_array_equal(rounded.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_decode_inverts_encode_on_the_grid(name):
  fmt = jq.get_format(name)
  grid = jnp.asarray(fmt.values, jnp.float32)
  np.testing.assert_array_equal(F.decode(fmt, F.encode(fmt, grid)), grid)


@pytest.mark.parametrize("name", ["nf4", "dynamic8", "udynamic8", "binary"])
def test_codebook_encode_is_the_nearest_value(name):
  fmt = jq.get_format(name)
  table = fmt.values.astype(np.float32)
  rng = np.random.default_rng(2)
  x = rng.uniform(table[0] - 0.1, table[-1] + 0.1, 20000).astype(np.float32)
  codes = np.asarray(F.encode(fmt, jnp.asarray(x))).astype(np.int64)
  distances = np.abs(x[:, None].astype(np.float64) - table[None, :])
  best = distances.min(axis=1)
  np.testing.assert_array_equal(distances[np.arange(x.size), codes], best)


def test_codebook_ties_go_to_the_larger_value():
  fmt = jq.get_format("nf4")
  table = np.asarray(fmt.table, np.float32)
  mids = (table[:-1] + table[1:]) / 2
  codes = np.asarray(F.encode(fmt, jnp.asarray(mids)))
  np.testing.assert_array_equal(codes, np.arange(1, 16))


def test_integer_encode_rounds_half_to_even_and_clips():
  fmt = jq.get_format("int4")
  codes = F.encode(fmt, jnp.array([0.5, 1.5, 2.5, -0.5, -2.5, 7.6, -9.0]))
  np.testing.assert_array_equal(codes.astype(jnp.int32), [0, 2, 2, 0, -2, 7, -8])
  assert codes.dtype == jnp.int4


def test_code_dtypes_are_the_narrowest_native_ones():
  expected = {"int2": jnp.int2, "int3": jnp.int4, "int4": jnp.int4, "int5": jnp.int8,
              "uint2": jnp.uint2, "uint4": jnp.uint4, "uint8": jnp.uint8,
              "ternary": jnp.int2, "binary": jnp.uint2, "nf4": jnp.uint4,
              "dynamic8": jnp.uint8, "fp8_e4m3": jnp.float8_e4m3fn,
              "fp8_e5m2": jnp.float8_e5m2, "fp4_e2m1": jnp.float4_e2m1fn,
              "fp6_e2m3": jnp.uint8}
  for name, dtype in expected.items():
    assert jnp.dtype(jq.get_format(name).code_dtype) == jnp.dtype(dtype), name


@pytest.mark.parametrize("name", ["int4", "fp4_e2m1", "nf4", "fp6_e2m3", "dynamic8"])
def test_stochastic_rounding_is_unbiased_and_picks_neighbours(name):
  fmt = jq.get_format(name)
  grid = fmt.values
  x = jnp.full((20000,), (grid[3] * 0.7 + grid[4] * 0.3), jnp.float32)
  codes = F.stochastic_encode(fmt, x, jax.random.key(0))
  values = np.asarray(F.decode(fmt, codes))
  assert set(np.unique(values)) <= {np.float32(grid[3]), np.float32(grid[4])}
  np.testing.assert_allclose(values.mean(), float(x[0]), atol=0.02 * (grid[4] - grid[3]))


def test_fp8_e4m3_bit_arithmetic_path_equals_xla_convert():
  """The CPU path (integer arithmetic on float32 bits) against XLA's convert."""
  fmt = jq.get_format("fp8_e4m3")
  x = _rounding_inputs("fp8_e4m3", np.random.default_rng(3))
  by_bits = np.asarray(jax.jit(F._e4m3_codes_by_bits)(x)).view(np.uint8)
  converted = np.asarray(jax.jit(lambda y: F._convert_codes(fmt, y))(x)).view(np.uint8)
  np.testing.assert_array_equal(by_bits, converted)
  codes = jnp.asarray(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn))
  values = np.asarray(jax.jit(F._e4m3_values_by_bits)(codes))
  expected = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
  np.testing.assert_array_equal(np.isnan(values), np.isnan(expected))
  finite = ~np.isnan(expected)
  np.testing.assert_array_equal(values[finite].view(np.uint32), expected[finite].view(np.uint32))


@pytest.mark.parametrize("name", ["nf4", "binary", "dynamic4", "fp6_e2m3", "dynamic8"])
def test_decode_of_every_code_is_the_table_value(name):
  fmt = jq.get_format(name)
  n = 2 ** fmt.bits
  codes = jnp.arange(n, dtype=jnp.int32).astype(fmt.code_dtype)
  values = np.asarray(jax.jit(lambda c: F.decode(fmt, c))(codes))
  if fmt.kind == "codebook":
    np.testing.assert_array_equal(values, np.asarray(fmt.table, np.float32)[:n])
  else:
    expected = np.arange(n, dtype=np.uint8).view(fmt.ml_dtype).astype(np.float32)
    np.testing.assert_array_equal(values.view(np.uint32), expected.view(np.uint32))


# ----------------------------------------------------------------------------
# Dynamic-tree maps: arithmetic encode/decode (`_dynamic_encode`, `_dynamic_decode`;
# `encode`/`decode` use them for the 8-bit maps) against the table and the gather
# path (`nearest_code`, `table_lookup`), which stay the reference.

DYNAMIC_FORMATS = ["dynamic8", "udynamic8", "dynamic4", "udynamic4_nonzero"]


def _paper_dynamic_map(signed, bits):
  """The paper's construction in float64 (linspace midpoints), rounded to float32."""
  positives = []
  for i in range(bits - 1):
    points = np.linspace(0.1, 1.0, (2**i if signed else 2 ** (i + 1)) + 1)
    positives.extend((points[:-1] + points[1:]) / 2 * 10.0 ** (i - (bits - 2)))
  values = [np.asarray(positives)] + ([-np.asarray(positives)] if signed else [])
  return np.sort(np.concatenate(values + [np.array([0.0, 1.0])])).astype(np.float32)


@pytest.mark.parametrize("signed,bits", [(True, 8), (False, 8), (True, 4), (False, 4)])
def test_dynamic_maps_are_float32_products_within_an_ulp_of_the_paper(signed, bits):
  table = F.dynamic_map(signed=signed, bits=bits)
  assert table.dtype == np.float32 and table.size == 2**bits
  ulps = table.view(np.int32).astype(np.int64) - _paper_dynamic_map(signed, bits).view(
      np.int32)
  assert np.abs(ulps).max() <= 1
  # Each positive entry is float32(A) * float32(C_i), A = 2 n + 9 (2k + 1).
  scales = F.dynamic_scales(bits, signed)
  expected = []
  for i, scale in enumerate(scales):
    n = 2 ** (i if signed else i + 1)
    expected.append((2 * n + 9 * (2 * np.arange(n) + 1)).astype(np.float32) * scale)
  positives = table[(table > 0) & (table < 1)]
  np.testing.assert_array_equal(positives.view(np.int32),
                                np.concatenate(expected).view(np.int32))


def test_nonzero_map_code_zero_is_a_float32_tenth():
  table = np.asarray(jq.get_format("udynamic4_nonzero").table, np.float32)
  assert table[0] == table[1] / np.float32(10)
  np.testing.assert_array_equal(table[1:], F.dynamic_map(signed=False, bits=4)[1:])


@pytest.mark.parametrize("name", DYNAMIC_FORMATS)
def test_dynamic_decode_is_the_table_bit_for_bit(name):
  fmt = jq.get_format(name)
  assert fmt.dynamic is not None
  table = np.asarray(fmt.table, np.float32)
  codes = jnp.arange(2**fmt.bits, dtype=jnp.int32).astype(fmt.code_dtype)
  gathered = np.asarray(jax.jit(lambda c: F.table_lookup(table, c.astype(jnp.int32)))(codes))
  np.testing.assert_array_equal(gathered.view(np.uint32), table.view(np.uint32))
  for decode in (F._dynamic_decode, F.decode):  # decode: arithmetic or selects
    values = np.asarray(jax.jit(lambda c, decode=decode: decode(fmt, c))(codes))
    np.testing.assert_array_equal(values.view(np.uint32), table.view(np.uint32))
    assert "gather" not in jax.jit(lambda c, decode=decode: decode(fmt, c)).lower(
        codes).as_text()
  assert F._by_arithmetic(fmt) == (fmt.bits == 8)


def _dynamic_encode_inputs(name, rng):
  """Entries, midpoints and their float32 neighbours (both signs), edges, random
  values over every decade, and normal data divided by its absmax."""
  table = np.asarray(jq.get_format(name).table, np.float32)
  mids = ((table[:-1].astype(np.float64) + table[1:]) / 2).astype(np.float32)
  points = np.concatenate([table, mids, np.nextafter(mids, np.float32(np.inf)),
                           np.nextafter(mids, np.float32(-np.inf)),
                           np.nextafter(table, np.float32(np.inf)),
                           np.nextafter(table, np.float32(-np.inf))])
  edges = np.array([0.0, 1.0, np.nextafter(np.float32(1), np.float32(2)), 1.5, 3e38,
                    1e-30, 1e-45, np.inf], np.float32)
  sign = rng.choice(np.array([-1.0, 1.0], np.float32), 10**6)
  spread = sign * (10.0 ** rng.uniform(-9, 0, 10**6)).astype(np.float32)
  normal = rng.standard_normal(2**16).astype(np.float32)
  normal = normal / np.abs(normal).max()
  magnitudes = np.concatenate([points, edges])
  return np.concatenate([magnitudes, -magnitudes, spread, normal])


@pytest.mark.parametrize("name", DYNAMIC_FORMATS)
def test_dynamic_encode_is_the_gather_based_nearest_code(name):
  fmt = jq.get_format(name)
  x = _dynamic_encode_inputs(name, np.random.default_rng(4))
  expected = np.asarray(jax.jit(lambda y: F.nearest_code(fmt, y))(x))
  codes = np.asarray(jax.jit(lambda y: F._dynamic_encode(fmt, y))(x))
  assert codes.dtype == np.int32
  np.testing.assert_array_equal(codes, expected)
  codes = jax.jit(lambda y: F.encode(fmt, y))(x)
  assert codes.dtype == jnp.dtype(fmt.code_dtype)
  np.testing.assert_array_equal(np.asarray(codes).astype(np.int32), expected)
  for encode in (F._dynamic_encode, F.encode):
    assert "gather" not in jax.jit(lambda y, encode=encode: encode(fmt, y)).lower(
        x).as_text()


@pytest.mark.parametrize("name", DYNAMIC_FORMATS)
def test_dynamic_encode_matches_on_a_sweep_of_all_float32_bit_patterns(name):
  """Every 256th float32 bit pattern (2^24 values: both signs, all exponents,
  subnormals and infinities), compared on the device.

  Two exceptions, where the gather path's answer depends on how XLA compiles it:
  NaNs (tested below), and negative subnormals in unsigned maps, where XLA:CPU's
  denormals-are-zero can leave the clip in `nearest_code` a negative key and send
  them to the last code (1.0); the arithmetic path gives code 0.
  """
  fmt = jq.get_format(name)

  @jax.jit
  def mismatches():
    bits = (jnp.arange(2**24, dtype=jnp.uint32) << 8) | 0x5A  # mantissa bits set
    y = jax.lax.bitcast_convert_type(bits, jnp.float32)
    codes = F._dynamic_encode(fmt, y)
    expected = F.nearest_code(fmt, y)
    if not fmt.signed:  # bit tests: float compares see subnormals as zeros here
      negative_subnormal = (bits >> 23) == 0x100
      expected = jnp.where(negative_subnormal, 0, expected)
    return jnp.sum(((codes != expected) & ~jnp.isnan(y)).astype(jnp.int32))

  assert int(mismatches()) == 0


@pytest.mark.parametrize("name", DYNAMIC_FORMATS)
def test_dynamic_encode_of_nan_and_infinities(name):
  """+NaN gets the last code, -NaN the code of magnitude 0, whatever the payload."""
  fmt = jq.get_format(name)
  zero_code = fmt.dynamic.zero_code
  nans = np.array([0x7FC00000, 0x7F800001, 0x7FFFFFFF], np.uint32)
  x = np.concatenate([np.array([np.inf, -np.inf], np.float32), nans.view(np.float32),
                      (nans | 0x80000000).view(np.float32)])
  codes = np.asarray(jax.jit(lambda y: F._dynamic_encode(fmt, y))(x))
  last = 2**fmt.bits - 1
  np.testing.assert_array_equal(codes, [last, 0, last, last, last] + [zero_code] * 3)
