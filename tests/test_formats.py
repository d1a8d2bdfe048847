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
