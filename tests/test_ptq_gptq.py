"""GPTQ and RTN on synthetic layers with correlated, outlier-heavy inputs."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from ptq_layers import outlier_inputs, outlier_layer
import jaxquant.ptq  # noqa: F401  (registers jq.ptq)

INT4_G32 = jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 32})
ASYM_G16 = jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 16}, symmetric=False)
gptq_under_jit = jax.jit(jq.ptq.gptq, static_argnames=("spec", "block_size", "act_order",
                                                       "static_groups"))



@pytest.fixture(scope="module")
def layer():
  return outlier_layer()


def activation_error(x, w, w_hat) -> float:
  """float64 sum of squared output errors over the tokens of x."""
  delta = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
  return float(np.sum((np.asarray(x, np.float64) @ delta) ** 2))


def test_output_error_equals_error_on_activations(layer):
  x, w, stats = layer
  w_hat = jq.dequantize(jq.ptq.rtn(w, INT4_G32))
  expected = activation_error(x, w, w_hat)
  np.testing.assert_allclose(float(jq.ptq.output_error(w, w_hat, stats.xtx)), expected,
                             rtol=1e-4)


@pytest.mark.parametrize("spec, act_order, static_groups", [
    (jq.QuantSpec("int4", channel_axes=(1,)), False, True),
    (jq.QuantSpec("int4", channel_axes=(1,)), True, True),
    (INT4_G32, False, True),
    (INT4_G32, True, True),
    (jq.QuantSpec("int3", channel_axes=(1,), block_sizes={0: 32}), False, False),
    (jq.QuantSpec("int3", channel_axes=(1,), block_sizes={0: 32}), True, True),
    (ASYM_G16, True, True),
    (jq.QuantSpec("nf4", channel_axes=(1,), block_sizes={0: 32}), True, True),
])
def test_gptq_output_error_below_rtn(layer, spec, act_order, static_groups):
  x, w, stats = layer
  run = gptq_under_jit if spec == ASYM_G16 else jq.ptq.gptq
  q = run(w, stats.xtx, spec, block_size=24, act_order=act_order, static_groups=static_groups)
  assert q.shape == w.shape and q.spec == spec
  assert q.scale.shape == spec.scale_shape(w.shape)
  gptq_error = activation_error(x, w, jq.dequantize(q))
  rtn_error = activation_error(x, w, jq.dequantize(jq.ptq.rtn(w, spec)))
  assert gptq_error < 0.5 * rtn_error


def reference_gptq(w, xtx, spec, *, damp, act_order, static_groups):
  """float64 numpy transcription of GPTQ, one column at a time (no lazy blocks).

  Scales come from jq.quantize (the code under test is the error feedback);
  returns the dequantized kernel.
  """
  fmt = spec.format
  w = np.asarray(w, np.float64).copy()
  h = np.asarray(xtx, np.float64).copy()
  n, m = w.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  group = dict(spec.block_sizes).get(0, n)

  def scales_of(rows_spec, rows):
    q = jq.quantize(jnp.asarray(rows, jnp.float32), rows_spec)
    zero = 0.0 if q.zero_point is None else np.asarray(q.zero_point, np.float64)
    return np.asarray(q.scale, np.float64), zero

  static_scale, static_zero = scales_of(spec, w)
  perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
  h = h[perm][:, perm]
  h += damp * np.mean(np.diag(h)) * np.eye(n)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  w = w[perm]
  result = np.zeros_like(w)
  row_spec = spec.replace(block_sizes={})
  scale = zero = None
  for i in range(n):
    original = perm[i]
    if static_groups:
      scale = static_scale[original // group]
      zero = static_zero if np.isscalar(static_zero) else static_zero[original // group]
    elif i % group == 0:
      scale, zero = scales_of(row_spec, w[i:i + group])
      scale, zero = scale[0], (zero if np.isscalar(zero) else zero[0])
    y = np.round(w[i] / np.where(scale > 0, scale, 1.0)) + zero
    result[i] = (np.clip(y, fmt.min, fmt.max) - zero) * scale
    err = (w[i] - result[i]) / u[i, i]
    w[i + 1:] -= np.outer(u[i, i + 1:], err)
  unpermuted = np.empty_like(result)
  unpermuted[perm] = result
  return unpermuted


@pytest.mark.parametrize("spec, act_order, static_groups, jit", [
    (INT4_G32, True, True, False),
    (jq.QuantSpec("int3", channel_axes=(1,), block_sizes={0: 32}), False, False, False),
    (ASYM_G16, True, True, True),
])
def test_gptq_matches_numpy_reference(layer, spec, act_order, static_groups, jit):
  """Blocked, lazy float32 GPTQ (eager or under jit) == the column-at-a-time float64 one.

  float32 rounding could flip a code where a value sits almost exactly between
  two grid points (none do here); allow 1% of the codes to differ.
  """
  x, w, stats = layer
  run = gptq_under_jit if jit else jq.ptq.gptq
  q = run(w, stats.xtx, spec, block_size=24, act_order=act_order, static_groups=static_groups)
  expected = reference_gptq(w, stats.xtx, spec, damp=0.01, act_order=act_order,
                            static_groups=static_groups)
  got = np.asarray(jq.dequantize(q), np.float64)
  same = np.isclose(got, expected, rtol=1e-5, atol=1e-6)
  assert same.mean() >= 0.99, same.mean()
  np.testing.assert_allclose(activation_error(x, w, got), activation_error(x, w, expected),
                             rtol=1e-3)


def test_gptq_with_diagonal_hessian_is_rtn(layer):
  """No correlation between inputs: no error feedback, so GPTQ rounds to nearest."""
  _, w, stats = layer
  diagonal = jnp.diag(jnp.diagonal(stats.xtx))
  q = jq.ptq.gptq(w, diagonal, INT4_G32, block_size=24, act_order=True)
  r = jq.ptq.rtn(w, INT4_G32)
  np.testing.assert_array_equal(np.asarray(q.codes, np.int32), np.asarray(r.codes, np.int32))
  np.testing.assert_array_equal(q.scale, r.scale)
  # Another Hessian and damping of the same size reuse the compiled function.
  compiled = sys.modules["jaxquant.ptq.gptq"]._gptq._cache_size()
  jq.ptq.gptq(w, 2.0 * diagonal, INT4_G32, block_size=24, damp=0.05, act_order=True)
  assert sys.modules["jaxquant.ptq.gptq"]._gptq._cache_size() == compiled


def test_gptq_dead_inputs_and_rank_deficient_hessian(layer):
  """Fewer tokens than inputs and zero channels: damp=0 fails in float32 and is retried."""
  _, w, _ = layer
  x = outlier_inputs(2, tokens=40)
  x[:, [5, 9]] = 0.0
  xtx = jq.ptq.LayerStats.from_inputs(jnp.asarray(x)).xtx
  q = jq.ptq.gptq(w, xtx, INT4_G32, block_size=24, damp=0.0, act_order=True)
  w_hat = np.asarray(jq.dequantize(q))
  assert np.all(np.isfinite(w_hat))
  np.testing.assert_array_equal(w_hat[[5, 9]], 0.0)  # dead inputs get zero weights
  rtn_error = activation_error(x, w, jq.dequantize(jq.ptq.rtn(w, INT4_G32)))
  assert activation_error(x, w, w_hat) < 0.5 * rtn_error


def test_gptq_keeps_the_kernel_dtype(layer):
  _, w, stats = layer
  as_bf16 = jax.eval_shape(lambda w, h: jq.ptq.gptq(w, h, INT4_G32, block_size=24),
                           w.astype(jnp.bfloat16), stats.xtx)
  assert as_bf16.dtype == jnp.bfloat16 and as_bf16.codes.dtype == jnp.int4


def test_gptq_rejects_bad_arguments(layer):
  _, w, stats = layer
  with pytest.raises(ValueError, match="xtx must be"):
    jq.ptq.gptq(w, stats.xtx[:10, :10], INT4_G32)
  with pytest.raises(ValueError, match=r"w must be a float kernel \[in, out\]"):
    jq.ptq.gptq(w[0], stats.xtx, INT4_G32)
  with pytest.raises(ValueError, match="static_groups=True"):
    jq.ptq.gptq(w, stats.xtx, INT4_G32, act_order=True, static_groups=False)
  with pytest.raises(ValueError, match="block_size"):
    jq.ptq.gptq(w, stats.xtx, INT4_G32, block_size=0)
  with pytest.raises(ValueError, match="damp"):
    jq.ptq.gptq(w, stats.xtx, INT4_G32, damp=-0.1)
  with pytest.raises(ValueError, match="rounds to nearest"):
    jq.ptq.gptq(w, stats.xtx, INT4_G32.replace(rounding="stochastic"))
  with pytest.raises(ValueError, match="does not divide"):
    jq.ptq.gptq(w, stats.xtx, jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 48}))
  with pytest.raises(TypeError, match="spec must be"):
    jq.ptq.gptq(w, stats.xtx, 4)
