"""AWQ and SmoothQuant: scale searches, fold helpers, output preservation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from ptq_layers import N_IN, N_OUT, outlier_layer
import jaxquant.ptq  # noqa: F401  (registers jq.ptq)

INT4 = jq.QuantSpec("int4", channel_axes=(1,))
INT3_G32 = jq.QuantSpec("int3", channel_axes=(1,), block_sizes={0: 32})



@pytest.fixture(scope="module")
def layer():
  return outlier_layer()


def error(stats, w, w_hat) -> float:
  return float(jq.ptq.output_error(w, w_hat, stats.xtx))


@pytest.mark.parametrize("spec, duo_scaling", [(INT4, False), (INT3_G32, False),
                                                (INT4, True)])
def test_awq_never_worse_than_rtn_and_better_on_outliers(layer, spec, duo_scaling):
  _, w, stats = layer
  result = jq.ptq.awq(w, stats, spec, grid=10, duo_scaling=duo_scaling)
  rtn_error = error(stats, w, jq.dequantize(jq.ptq.rtn(w, spec)))
  awq_error = error(stats, w, result.dequantize())
  assert awq_error <= rtn_error
  assert awq_error < 0.5 * rtn_error
  expected = jq.dequantize(result.qweight) / result.scales[:, None]
  np.testing.assert_array_equal(result.dequantize(), expected)
  np.testing.assert_array_equal(
      result.qweight.codes, jq.quantize(jq.ptq.apply_input_scales(w, result.scales), spec).codes)


def test_awq_scales_are_the_brute_force_best_of_the_grid(layer):
  """The search's choice equals a brute-force loop over the same candidates."""
  _, w, stats = layer
  grid = 10
  result = jq.ptq.awq(w, stats, INT4, grid=grid)
  mean_abs = np.asarray(stats.abs_sum, np.float64) / int(stats.count)
  best, best_error = np.ones(N_IN), error(stats, w, jq.dequantize(jq.ptq.rtn(w, INT4)))
  for k in range(grid):
    s = np.maximum(mean_abs ** (k / grid), 1e-4)
    s = s / np.sqrt(s.max() * s.min())
    s32 = jnp.asarray(s, jnp.float32)
    candidate = jq.dequantize(jq.quantize(jq.ptq.apply_input_scales(w, s32), INT4))
    err = error(stats, w, candidate / s32[:, None])
    if err < best_error:
      best, best_error = s, err
  np.testing.assert_allclose(result.scales, best, rtol=1e-5)
  np.testing.assert_allclose(error(stats, w, result.dequantize()), best_error, rtol=1e-5)


def test_awq_with_zero_activation_keeps_rtn(layer):
  """All-zero inputs: every candidate has zero error, none beats s = 1 (RTN)."""
  _, w, _ = layer
  stats = jq.ptq.LayerStats.from_inputs(jnp.zeros((4, N_IN)))
  result = jq.ptq.awq(w, stats, INT4, grid=10)
  np.testing.assert_array_equal(result.scales, np.ones(N_IN))
  np.testing.assert_array_equal(result.qweight.codes, jq.ptq.rtn(w, INT4).codes)


def test_smoothquant_scales_formula_and_balance(layer):
  x, w, stats = layer
  w2 = 3.0 * w[:, :8]
  s = jq.ptq.smoothquant_scales(stats.absmax, [w, w2], alpha=0.5)
  act = np.abs(x.astype(np.float64)).max(0)
  weight = np.maximum(np.abs(np.asarray(w, np.float64)).max(1),
                      np.abs(np.asarray(w2, np.float64)).max(1))
  np.testing.assert_allclose(s, np.sqrt(act) / np.sqrt(weight), rtol=1e-5)
  # alpha = 0.5 equalizes the ranges: max|x_j / s_j| == max_k |s_j W_jk| over all kernels.
  smoothed = np.maximum(np.abs(jq.ptq.apply_input_scales(w, s)).max(1),
                        np.abs(jq.ptq.apply_input_scales(w2, s)).max(1))
  np.testing.assert_allclose(act / np.asarray(s, np.float64), smoothed, rtol=1e-5)
  np.testing.assert_allclose(jq.ptq.smoothquant_scales(stats.absmax, w, alpha=1.0),
                             act, rtol=1e-6)
  zero = jq.ptq.smoothquant_scales(jnp.zeros(N_IN), w, alpha=0.5)
  np.testing.assert_array_equal(zero, np.full(N_IN, 1e-5, np.float32))


class NormDense(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(N_OUT, name="dense")(nn.LayerNorm(name="norm")(x))


apply_norm_dense = jax.jit(NormDense().apply)


def _fold(variables, s, kernel):
  params = variables["params"]
  norm_scale, norm_bias = jq.ptq.fold_scales_into_layernorm(
      params["norm"]["scale"], params["norm"]["bias"], s)
  return {"params": {"norm": {"scale": norm_scale, "bias": norm_bias},
                     "dense": {"kernel": kernel, "bias": params["dense"]["bias"]}}}


def norm_dense_variables(seed: int):
  rng = np.random.default_rng(seed)
  ln = rng.uniform(0.5, 2.0, N_IN).astype(np.float32)
  kernel = rng.normal(size=(N_IN, N_OUT)).astype(np.float32) / 8
  return {"params": {"norm": {"scale": jnp.asarray(ln), "bias": jnp.asarray(0.1 * ln)},
                     "dense": {"kernel": jnp.asarray(kernel),
                               "bias": jnp.asarray(rng.normal(size=N_OUT), jnp.float32)}}}


def test_smoothquant_fold_preserves_layernorm_dense_outputs(layer):
  x, _, _ = layer
  model = NormDense()
  variables = norm_dense_variables(3)
  params = variables["params"]
  stats = jq.ptq.capture_linen(model, variables, [x], progress=False)
  s = jq.ptq.smoothquant_scales(stats["dense"].absmax, params["dense"]["kernel"], alpha=0.8)
  assert float(jnp.max(s) / jnp.min(s)) > 10  # a real transform, not near identity
  smoothed = _fold(variables, s, jq.ptq.apply_input_scales(params["dense"]["kernel"], s))
  np.testing.assert_allclose(apply_norm_dense(smoothed, x), apply_norm_dense(variables, x),
                             rtol=1e-4, atol=1e-4)
  # float64: x diag(1/s) diag(s) W == x W to rounding.
  x64, w64, s64 = (np.asarray(a, np.float64) for a in (x, params["dense"]["kernel"], s))
  np.testing.assert_allclose((x64 / s64) @ (s64[:, None] * w64), x64 @ w64,
                             rtol=1e-12, atol=1e-9)


def test_smoothquant_one_call_equals_scales_then_apply(layer):
  x, w, stats = layer
  smoothed, s = jq.ptq.smoothquant(w, stats.absmax, alpha=0.7)
  np.testing.assert_array_equal(s, jq.ptq.smoothquant_scales(stats.absmax, w, alpha=0.7))
  np.testing.assert_array_equal(smoothed, jq.ptq.apply_input_scales(w, s))
  pair, s_pair = jq.ptq.smoothquant([w, 2 * w], stats.absmax, alpha=0.7)
  np.testing.assert_array_equal(
      s_pair, jq.ptq.smoothquant_scales(stats.absmax, [w, 2 * w], alpha=0.7))
  np.testing.assert_allclose((x / np.asarray(s_pair)) @ np.asarray(pair[1]), x @ (2 * w),
                             rtol=1e-4, atol=1e-3)


def test_awq_folded_into_layernorm_equals_explicit_scales(layer):
  x, _, _ = layer
  model = NormDense()
  variables = norm_dense_variables(4)
  stats = jq.ptq.capture_linen(model, variables, [x], progress=False)
  kernel = variables["params"]["dense"]["kernel"]
  result = jq.ptq.awq(kernel, stats["dense"], INT4, grid=10)
  folded = _fold(variables, result.scales, jq.dequantize(result.qweight))
  explicit = _fold(variables, jnp.ones(N_IN), result.dequantize())
  np.testing.assert_allclose(apply_norm_dense(folded, x), apply_norm_dense(explicit, x),
                             rtol=1e-4, atol=1e-4)


def test_fold_into_previous_linear_preserves_outputs(layer):
  x, w, _ = layer
  rng = np.random.default_rng(4)
  prev_w = jnp.asarray(rng.normal(size=(N_IN, N_IN)), jnp.float32)
  prev_b = jnp.asarray(rng.normal(size=(N_IN,)), jnp.float32)
  s = jnp.asarray(rng.uniform(0.1, 10.0, N_IN), jnp.float32)
  new_w, new_b = jq.ptq.fold_scales_into_linear(prev_w, prev_b, s)
  reference = (x @ prev_w + prev_b[None]) @ w
  folded = (x @ new_w + new_b[None]) @ jq.ptq.apply_input_scales(w, s)
  np.testing.assert_allclose(folded, reference, rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(reference).max()))
  kept = jq.ptq.fold_scales_into_layernorm(prev_b.astype(jnp.bfloat16), None, s)
  assert kept[0].dtype == jnp.bfloat16 and kept[1] is None


def test_awq_and_smoothquant_reject_bad_input(layer):
  _, w, stats = layer
  with pytest.raises(ValueError, match="alpha"):
    jq.ptq.smoothquant_scales(stats.absmax, w, alpha=1.5)
  with pytest.raises(ValueError, match=r"w\[0\] must be a kernel \[64, ...\]"):
    jq.ptq.smoothquant_scales(stats.absmax, w.T)
  with pytest.raises(ValueError, match="s must be a vector"):
    jq.ptq.apply_input_scales(w, jnp.ones(3))
  with pytest.raises(ValueError, match="grid"):
    jq.ptq.awq(w, stats, INT4, grid=0)
  with pytest.raises(ValueError, match="stats are for 64 inputs; w has 32"):
    jq.ptq.awq(w.T, stats, INT4)
  with pytest.raises(TypeError, match="stats must be a LayerStats"):
    jq.ptq.awq(w, stats.xtx, INT4)
