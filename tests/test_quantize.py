"""quantize / dequantize / fake_quant: granularity, calibration, scales, transforms."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq


def _weights(shape=(256, 64), seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def test_symmetric_int8_per_channel_maps_absmax_to_127():
  w = _weights()
  q = jq.quantize(w, jq.QuantSpec("int8", channel_axes=(1,)))
  absmax = np.abs(np.asarray(w)).max(axis=0, keepdims=True)
  np.testing.assert_allclose(q.scale, absmax / 127, rtol=1e-7)
  assert q.codes.dtype == jnp.int8 and q.zero_point is None
  codes = np.asarray(q.codes, np.int32)
  assert np.all(np.abs(codes).max(axis=0) == 127)
  error = np.abs(np.asarray(jq.dequantize(q)) - np.asarray(w))
  assert np.all(error <= np.asarray(q.scale) / 2 * (1 + 1e-6))


def test_int4_symmetric_range_and_full_range():
  w = jnp.array([[-7.0, 2.5, 3.5, 7.0]])
  q = jq.quantize(w, jq.QuantSpec("int4"))  # scale 1; ties to even: 2.5 -> 2, 3.5 -> 4
  np.testing.assert_array_equal(np.asarray(q.codes, np.int32), [[-7, 2, 4, 7]])
  q_full = jq.quantize(w * (8 / 7), jq.QuantSpec("int4", full_range=True))
  np.testing.assert_allclose(q_full.scale, 1.0)
  np.testing.assert_array_equal(np.asarray(q_full.codes, np.int32), [[-8, 3, 4, 7]])


@pytest.mark.parametrize("block", [32, 64, 128])
def test_group_quantization_scale_shape_and_values(block):
  w = _weights((256, 48))
  q = jq.quantize(w, jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: block}))
  assert q.scale.shape == (256 // block, 48)
  blocks = np.asarray(w).reshape(256 // block, block, 48)
  np.testing.assert_allclose(q.scale, np.abs(blocks).max(axis=1) / 7, rtol=1e-6)


def test_two_dimensional_blocks_and_per_tensor():
  w = _weights((128, 64))
  q = jq.quantize(w, jq.QuantSpec("int8", block_sizes={0: 32, 1: 16}))
  assert q.scale.shape == (4, 4)
  blocks = np.abs(np.asarray(w)).reshape(4, 32, 4, 16).max(axis=(1, 3))
  np.testing.assert_allclose(q.scale, blocks / 127, rtol=1e-6)
  per_tensor = jq.quantize(w, "int8")
  assert per_tensor.scale.shape == (1, 1)


def test_per_token_activations_with_negative_axes():
  x = _weights((2, 8, 32))
  q = jq.quantize(x, jq.QuantSpec("int8", channel_axes=(0, -2)))
  assert q.scale.shape == (2, 8, 1)
  np.testing.assert_allclose(q.scale[..., 0], np.abs(np.asarray(x)).max(-1) / 127,
                             rtol=1e-7)


def test_asymmetric_uint8_keeps_zero_exact_and_uses_full_range():
  x = jnp.array([[-1.0, 0.0, 0.25, 3.0]])
  q = jq.quantize(x, jq.QuantSpec("uint8", symmetric=False))
  scale = float(q.scale.reshape(()))
  np.testing.assert_allclose(scale, 4.0 / 255, rtol=1e-6)
  codes = np.asarray(q.codes, np.int32)
  assert codes.min() == 0 and codes.max() == 255
  x_hat = np.asarray(jq.dequantize(q))
  assert x_hat[0, 1] == 0.0
  assert np.all(np.abs(x_hat - np.asarray(x)) <= scale / 2 + 1e-6)
  assert q.zero_point.dtype == jnp.uint8


def test_asymmetric_signed_int4_per_channel():
  x = jax.random.uniform(jax.random.key(3), (64, 8), jnp.float32, -0.5, 2.0)
  q = jq.quantize(x, jq.QuantSpec("int4", symmetric=False, channel_axes=(1,)))
  assert q.zero_point.shape == (1, 8) and q.zero_point.dtype == jnp.int4
  error = np.abs(np.asarray(jq.dequantize(q)) - np.asarray(x))
  assert np.all(error <= np.asarray(q.scale) / 2 + 1e-6)


def test_percentile_calibration_uses_the_percentile_of_magnitudes():
  w = _weights((1000, 4))
  q = jq.quantize(w, jq.QuantSpec("int8", channel_axes=(1,), calibration="percentile:99"))
  expected = np.percentile(np.abs(np.asarray(w)), 99, axis=0) / 127
  np.testing.assert_allclose(q.scale[0], expected, rtol=1e-5)


def test_mse_calibration_never_worse_than_absmax_on_heavy_tails():
  w = jax.random.laplace(jax.random.key(0), (512, 16), jnp.float32)
  absmax = jq.QuantSpec("int3", channel_axes=(1,), block_sizes={0: 128})
  mse = absmax.replace(calibration="mse")
  err = lambda spec: np.sum((np.asarray(jq.fake_quant(w, spec)) - np.asarray(w)) ** 2
                            , axis=0)
  assert np.all(err(mse) <= err(absmax) * (1 + 1e-6))
  assert err(mse).sum() < 0.9 * err(absmax).sum()


def test_ternary_uses_absmean_scale_and_three_codes():
  w = _weights((64, 64))
  q = jq.quantize(w, jq.QuantSpec("ternary"))
  np.testing.assert_allclose(q.scale.reshape(()), np.abs(np.asarray(w)).mean(), rtol=1e-6)
  assert set(np.unique(np.asarray(q.codes, np.int32))) == {-1, 0, 1}
  assert q.spec.calibration == "absmean"


def test_binary_is_sign_times_mean_magnitude():
  w = _weights((32, 32))
  w_hat = np.asarray(jq.fake_quant(w, "binary"))
  expected = np.where(np.asarray(w) < 0, -1.0, 1.0) * np.abs(np.asarray(w)).mean()
  np.testing.assert_allclose(w_hat, expected, rtol=1e-5)


def test_mx_block_scale_follows_the_ocp_rule():
  w = _weights((128, 8)) * 3.0
  for name, element, emax in [("mxfp8", "fp8_e4m3", 8), ("mxfp6", "fp6_e2m3", 2),
                              ("mxfp4", "fp4_e2m1", 2)]:
    q = jq.quantize(w, jq.get_preset(name))
    assert q.scale.dtype == jnp.float8_e8m0fnu and q.scale.shape == (4, 8)
    blocks = np.asarray(w).reshape(4, 32, 8)
    amax = np.abs(blocks).max(axis=1)
    expected_scale = 2.0 ** (np.floor(np.log2(amax)) - emax)
    np.testing.assert_array_equal(np.asarray(q.scale, np.float32), expected_scale)
    fmt = jq.get_format(element)
    scaled = (blocks / expected_scale[:, None, :]).astype(np.float32)
    expected = np.clip(scaled, -fmt.max, fmt.max).astype(fmt.ml_dtype).astype(np.float32)
    got = np.asarray(jq.dequantize(q)).reshape(4, 32, 8) / expected_scale[:, None, :]
    np.testing.assert_array_equal(got, expected)


def test_mx_block_of_zeros_gets_the_smallest_scale():
  q = jq.quantize(jnp.zeros((32, 2)), jq.get_preset("mxfp4"))
  bits = np.asarray(jax.lax.bitcast_convert_type(q.scale, jnp.uint8))
  np.testing.assert_array_equal(bits, 0)  # e8m0 pattern 0 is 2^-127
  np.testing.assert_array_equal(jq.dequantize(q), 0.0)


def test_nvfp4_two_level_scales():
  w = _weights((64, 4))
  q = jq.quantize(w, jq.get_preset("nvfp4"))
  amax = np.abs(np.asarray(w)).max()
  tensor_scale = np.float32(amax / (6 * 448))
  np.testing.assert_allclose(q.tensor_scale, tensor_scale, rtol=1e-6)
  blocks = np.asarray(w).reshape(4, 16, 4)
  block_amax = np.abs(blocks).max(axis=1)
  expected_scale = (block_amax / 6 / tensor_scale).astype(np.float32).astype(
      ml_dtypes.float8_e4m3fn)
  np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint8),
                                expected_scale.view(np.uint8))
  effective = expected_scale.astype(np.float32) * tensor_scale
  expected = np.clip(blocks / effective[:, None, :], -6, 6).astype(ml_dtypes.float4_e2m1fn)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(4, 16, 4).view(np.uint8),
                                expected.view(np.uint8))


@pytest.mark.parametrize("scale_dtype", [jnp.bfloat16, "fp8_e4m3", "e8m0"])
def test_codes_use_the_rounded_scale(scale_dtype):
  w = _weights((128, 8))
  spec = jq.QuantSpec("int8", channel_axes=(1,), scale_dtype=scale_dtype)
  q = jq.quantize(w, spec)
  scale = np.asarray(q.scale.astype(jnp.float32))
  expected = np.clip(np.round(np.asarray(w) / scale), -128, 127)
  np.testing.assert_array_equal(np.asarray(q.codes, np.int32), expected)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3", "fp4_e2m1", "nf4",
                                 "dynamic8", "fp6_e3m2", "ternary", "uint4"])
def test_bfloat16_inputs_round_trip_in_bfloat16(fmt):
  w = _weights((64, 32), dtype=jnp.bfloat16)
  spec = jq.QuantSpec(fmt, channel_axes=(1,))
  w_hat = jq.dequantize(jq.quantize(w, spec))
  assert w_hat.dtype == jnp.bfloat16
  w32_hat = jq.dequantize(jq.quantize(w.astype(jnp.float32), spec))
  np.testing.assert_array_equal(w_hat, w32_hat.astype(jnp.bfloat16))
  assert jq.dequantize(jq.quantize(w, spec), jnp.float32).dtype == jnp.float32


def test_stochastic_rounding_is_unbiased_and_needs_a_key():
  spec = jq.QuantSpec("int4", rounding="stochastic")
  x = jnp.full((4096,), 0.3).at[0].set(7.0)  # absmax 7 -> scale 1
  with pytest.raises(ValueError, match="needs a PRNG key"):
    jq.quantize(x, spec)
  q = jq.quantize(x, spec, key=jax.random.key(0))
  values = np.asarray(jq.dequantize(q))[1:]
  assert set(np.unique(values)) == {0.0, 1.0}
  np.testing.assert_allclose(values.mean(), 0.3, atol=0.03)


def test_jit_compiles_once_and_vmap_matches_a_loop():
  spec = jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 32})
  # A function of its own: jit caches are shared by every jax.jit(jq.quantize).
  quantize = jax.jit(lambda w, spec: jq.quantize(w, spec), static_argnums=1)
  q1 = quantize(_weights((64, 8), 1), spec)
  q2 = quantize(_weights((64, 8), 2), spec)
  assert quantize._cache_size() == 1
  stack = jnp.stack([_weights((64, 8), 1), _weights((64, 8), 2)])
  qv = jax.vmap(lambda w: jq.quantize(w, spec))(stack)
  for i, q in enumerate([q1, q2]):
    np.testing.assert_array_equal(np.asarray(qv.codes[i], np.int32), np.asarray(q.codes, np.int32))
    np.testing.assert_array_equal(qv.scale[i], q.scale)
  np.testing.assert_array_equal(jax.vmap(jq.dequantize)(qv)[0], jq.dequantize(q1))


def test_fake_quant_value_and_straight_through_gradient():
  w = _weights((64, 8))
  spec = jq.QuantSpec("int4", channel_axes=(1,))
  np.testing.assert_array_equal(jq.fake_quant(w, spec), jq.dequantize(jq.quantize(w, spec)))
  grad = jax.jit(jax.grad(lambda w: jnp.sum(jq.fake_quant(w, spec) * 3.0)))(w)
  np.testing.assert_array_equal(grad, jnp.full_like(w, 3.0))
  w16 = w.astype(jnp.bfloat16)
  assert jq.fake_quant(w16, spec).dtype == jnp.bfloat16


def test_nbytes_counts_packed_codes_and_scales():
  w = _weights((256, 64))
  q = jq.quantize(w, jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 128}))
  assert q.nbytes == 256 * 64 // 2 + 2 * 64 * 4
  q6 = jq.quantize(w, jq.get_preset("mxfp6"))
  assert q6.nbytes == 256 * 64 * 6 // 8 + 8 * 64
  qb = jq.quantize(w, "binary")
  assert qb.nbytes == 256 * 64 // 8 + 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(format="int4", block_sizes={0: 100}), "does not divide axis 0"),
    (dict(format="int4", channel_axes=(2,)), "out of range"),
    (dict(format="int4", channel_axes=(0,), block_sizes={0: 32}), "both in channel_axes"),
])
def test_bad_granularity_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    jq.quantize(_weights((128, 8)), jq.QuantSpec(**kwargs))


@pytest.mark.parametrize("kwargs, message", [
    (dict(format="fp8_e4m3", symmetric=False), "needs an integer format"),
    (dict(format="int4", calibration="max"), "calibration='max'"),
    (dict(format="int4", calibration="percentile:120"), "percentile"),
    (dict(format="int4", scale_dtype=jnp.int8), "scale_dtype"),
    (dict(format="int4", rounding="up"), "rounding='up'"),
    (dict(format="int4", block_sizes={0: 0}), "blocks must be >= 1"),
    (dict(format="e8m0"), "scale format"),
    (dict(format="int9"), "not a known format"),
])
def test_bad_spec_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    jq.QuantSpec(**kwargs)


def test_non_float_input_is_rejected():
  with pytest.raises(TypeError, match="floating-point"):
    jq.quantize(jnp.arange(8), "int8")


def test_spec_is_hashable_and_normalized():
  a = jq.QuantSpec("int4", block_sizes={0: 128}, scale_dtype=jnp.bfloat16)
  b = jq.QuantSpec(jq.get_format("int4"), block_sizes=((0, 128),), scale_dtype="bfloat16")
  assert a == b and hash(a) == hash(b)
  assert a.block_size_dict == {0: 128}


@pytest.mark.parametrize("fmt", ["udynamic4_nonzero", "binary", "int8", "nf4"])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16", "fp8_e4m3"])
def test_a_group_of_zeros_dequantizes_to_exact_zeros(fmt, scale_dtype):
  x = jnp.zeros((64, 4)).at[:, 1].set(jnp.linspace(0.1, 1.0, 64))
  q = jq.quantize(x, jq.QuantSpec(fmt, channel_axes=(1,), scale_dtype=scale_dtype))
  x_hat = np.asarray(jq.dequantize(q))
  np.testing.assert_array_equal(x_hat[:, [0, 2, 3]], 0.0)
  assert np.abs(x_hat[:, 1]).max() > 0.5


def test_mse_calibration_is_the_same_eager_and_jitted():
  w = jax.random.laplace(jax.random.key(5), (64, 4096), jnp.float32)  # many channels
  spec = jq.QuantSpec("int2", channel_axes=(1,), full_range=True, calibration="mse")
  eager = jq.quantize(w, spec)
  jitted = jax.jit(jq.quantize, static_argnums=1)(w, spec)
  np.testing.assert_array_equal(eager.scale, jitted.scale)
