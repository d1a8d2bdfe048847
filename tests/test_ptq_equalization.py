"""Cross-layer equalization and bias correction (Nagel et al. 2019): outputs preserved,
ranges equalized, scales as the paper defines them, zero-mean output error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import ptq


_fake_quant = jax.jit(lambda w, spec: jq.dequantize(jq.quantize(w, spec)), static_argnums=1)


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _chain(widths, seed=0):
  """Dense layers with wildly different per-channel scales (what equalization fixes)."""
  rng = np.random.default_rng(seed)
  layers = []
  for fan_in, fan_out in zip(widths[:-1], widths[1:]):
    col_scale = np.exp(rng.uniform(-3, 3, fan_out))
    w = rng.standard_normal((fan_in, fan_out)) * col_scale / np.sqrt(fan_in)
    b = 0.1 * rng.standard_normal(fan_out) * col_scale
    layers.append((jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)))
  return layers


@jax.jit
def _forward(layers, x):
  for i, (w, b) in enumerate(layers):
    x = x @ w + b[None]
    if i < len(layers) - 1:
      x = jax.nn.relu(x)
  return x


def test_pair_equalization_matches_the_paper_and_preserves_outputs():
  (w1, b1), (w2, b2) = _chain([16, 24, 8])
  w1n, b1n, w2n, s = ptq.cross_layer_equalize(w1, b1, w2)
  r1 = np.max(np.abs(np.asarray(w1, np.float64)), axis=0)  # output channel i of w1
  r2 = np.max(np.abs(np.asarray(w2, np.float64)), axis=1)  # input channel i of w2
  np.testing.assert_allclose(s, np.sqrt(r1 * r2) / r2, rtol=1e-6)
  np.testing.assert_allclose(w1n, np.asarray(w1) / np.asarray(s)[None], rtol=1e-6)
  np.testing.assert_allclose(b1n, np.asarray(b1) / np.asarray(s), rtol=1e-6)
  np.testing.assert_allclose(w2n, np.asarray(w2) * np.asarray(s)[:, None], rtol=1e-6)
  # Both ranges become sqrt(r1 r2).
  np.testing.assert_allclose(np.max(np.abs(w1n), axis=0), np.sqrt(r1 * r2), rtol=1e-5)
  np.testing.assert_allclose(np.max(np.abs(w2n), axis=1), np.sqrt(r1 * r2), rtol=1e-5)
  x = _normal((64, 16), 1)
  np.testing.assert_allclose(_forward([(w1n, b1n), (w2n, b2)], x),
                             _forward([(w1, b1), (w2, b2)], x), rtol=1e-5, atol=1e-5)


def test_zero_channel_keeps_unit_scale():
  w1 = jnp.array([[1.0, 0.0], [2.0, 0.0]])
  w2 = jnp.array([[4.0], [3.0]])
  s0 = np.sqrt(2.0 * 4.0) / 4.0  # r1 = 2, r2 = 4
  w1n, b1n, w2n, s = ptq.cross_layer_equalize(w1, None, w2)
  np.testing.assert_allclose(s, [s0, 1.0], rtol=1e-6)  # channel 1 is zero in w1
  assert b1n is None and np.all(np.isfinite(w1n)) and np.all(np.isfinite(w2n))
  np.testing.assert_allclose(ptq.equalization_scales(w1 + jnp.array([[0.0, 1.0]] * 2), w2),
                             [s0, np.sqrt(1.0 * 3.0) / 3.0], rtol=1e-6)


def test_chain_equalization_preserves_outputs_and_converges():
  layers = _chain([12, 32, 24, 16, 4], seed=2)
  equalized, scales = ptq.equalize_chain(layers)  # 20 sweeps: log-imbalance ~1e-6
  x = _normal((128, 12), 3)
  np.testing.assert_allclose(_forward(equalized, x), _forward(layers, x), rtol=2e-5, atol=2e-4)
  for (w1, _), (w2, _) in zip(equalized[:-1], equalized[1:]):
    np.testing.assert_allclose(np.max(np.abs(w1), axis=0), np.max(np.abs(w2), axis=1),
                               rtol=1e-3)  # converged: every junction balanced
  # The returned scales reproduce the equalized kernels.
  w_mid = scales[0][:, None] * layers[1][0] / scales[1][None, :]
  np.testing.assert_allclose(equalized[1][0], w_mid, rtol=1e-5)
  with pytest.raises(ValueError, match="at least 2"):
    ptq.equalize_chain(layers[:1])


def test_equalization_lowers_per_tensor_quantization_error():
  (w1, b1), _ = _chain([16, 48, 8], seed=4)  # channels of w1 spread over e^-3 .. e^3
  w2, b2 = _normal((48, 8), 10) / np.float32(np.sqrt(48)), jnp.zeros((8,))
  layers = [(w1, b1), (w2, b2)]
  w1n, b1n, w2n, _ = ptq.cross_layer_equalize(w1, b1, w2)
  x = _normal((256, 16), 5)
  ref = _forward(layers, x)
  fq = lambda w: _fake_quant(w, jq.QuantSpec("int8"))  # per tensor, as in the paper
  err_plain = jnp.mean((_forward([(fq(w1), b1), (fq(w2), b2)], x) - ref) ** 2)
  err_eq = jnp.mean((_forward([(fq(w1n), b1n), (fq(w2n), b2)], x) - ref) ** 2)
  assert err_eq < 0.5 * err_plain, (float(err_plain), float(err_eq))


def test_bias_correction_makes_the_output_error_zero_mean():
  rng = np.random.default_rng(6)
  x = jnp.asarray(np.maximum(rng.normal(0.5, 1.0, (512, 64)), 0.0), jnp.float32)  # ReLU inputs
  w = _normal((64, 32), 7) / 8
  b = 0.1 * _normal((32,), 8)
  wq = _fake_quant(w, jq.QuantSpec("int3", channel_axes=(1,)))
  x_mean = jnp.mean(x, axis=0)
  b_new = ptq.bias_correction(w, wq, b, x_mean)
  np.testing.assert_allclose(b_new, np.asarray(b) + np.asarray(x_mean) @ np.asarray(w - wq),
                             rtol=1e-5, atol=1e-6)
  before = jnp.mean((x @ w + b[None]) - (x @ wq + b[None]), axis=0)
  after = jnp.mean((x @ w + b[None]) - (x @ wq + b_new[None]), axis=0)
  assert float(jnp.max(jnp.abs(before))) > 1e-2
  np.testing.assert_allclose(after, 0.0, atol=1e-5)
  # Held-out inputs from the same distribution: the mean error shrinks too.
  x_new = jnp.asarray(np.maximum(rng.normal(0.5, 1.0, (512, 64)), 0.0), jnp.float32)
  held = jnp.mean((x_new @ w + b[None]) - (x_new @ wq + b_new[None]), axis=0)
  before_held = jnp.mean(x_new @ (w - wq), axis=0)
  assert jnp.mean(held**2) < 0.1 * jnp.mean(before_held**2)
  with pytest.raises(ValueError, match="x_mean has shape"):
    ptq.bias_correction(w, wq, b, x_mean[:10])


def test_expected_relu_matches_monte_carlo_for_data_free_correction():
  mean = jnp.array([-1.0, 0.0, 0.5, 2.0, 1.0])
  std = jnp.array([1.0, 2.0, 0.5, 1.0, 0.0])
  z = np.random.default_rng(9).standard_normal((400_000, 5)) * np.asarray(std) + np.asarray(mean)
  np.testing.assert_allclose(ptq.expected_relu(mean, std), np.maximum(z, 0).mean(axis=0),
                             atol=5e-3)
