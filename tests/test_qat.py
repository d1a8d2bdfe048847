"""QAT ops: values, gradients against their definitions, masks at the boundaries,
finite differences of the surrogates, jit and vmap."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant as jq
from jaxquant.quantize import clip_range

INT4_CHANNEL = jq.QuantSpec("int4", channel_axes=(1,))


def _weights(shape=(64, 8), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_fake_quant_value_and_masked_gradient():
  x = jnp.array([[-2.0, -0.3, 0.2, 1.0, 3.0]]).T  # one channel, absmax 3
  spec = jq.QuantSpec("int4", calibration="percentile:50")  # clips the extremes
  y = jq.qat.fake_quant(x, spec)
  np.testing.assert_array_equal(y, jq.fake_quant(x, spec))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jq.qat.fake_quant(x, spec) * 2.0)))(x)
  q = jq.quantize(x, spec)
  lo, hi = (np.asarray(a) for a in clip_range(q))
  expected = np.where((np.asarray(x) >= lo) & (np.asarray(x) <= hi), 2.0, 0.0)
  np.testing.assert_array_equal(grad, expected)
  assert 0 < np.sum(expected == 0) < x.size  # some clipped, some not


def test_fake_quant_gradient_is_identity_without_clipping():
  x = _weights()
  grad = jax.grad(lambda x: jnp.sum(jq.qat.fake_quant(x, INT4_CHANNEL)))(x)
  np.testing.assert_array_equal(grad, jnp.ones_like(x))  # absmax never clips


def test_fake_quant_under_vmap():
  xs = jnp.stack([_weights(seed=1), _weights(seed=2)])
  f = jax.vmap(jax.grad(lambda x: jnp.sum(jq.qat.fake_quant(x, INT4_CHANNEL) ** 2)))
  grads = f(xs)
  for i in range(2):
    expected = 2 * jq.fake_quant(xs[i], INT4_CHANNEL)
    np.testing.assert_allclose(grads[i], expected, rtol=1e-6)


def _lsq_reference_grads(x, s, q_n, q_p, group_size, upstream):
  """The LSQ paper's gradients, per element, in numpy (one step for all)."""
  u = x / s
  inside = (u >= -q_n) & (u <= q_p)
  d_x = np.where(inside, upstream, 0.0)
  d_s = np.where(inside, np.round(u) - u, np.where(u < -q_n, -q_n, q_p))
  return d_x, np.sum(upstream * d_s) / math.sqrt(group_size * q_p)


def test_lsq_value_and_gradients_match_the_paper():
  x = jnp.linspace(-1.2, 1.4, 37)[:, None]
  step = jnp.array([[0.1]])  # int4 symmetric: Q_N = Q_P = 7, range [-0.7, 0.7]
  upstream = jnp.cos(jnp.arange(37.0))[:, None]
  spec = jq.QuantSpec("int4")
  y = jq.qat.lsq(x, step, spec)
  np.testing.assert_allclose(y, np.clip(np.round(np.asarray(x) / 0.1), -7, 7) * 0.1,
                             rtol=1e-6)
  grad_x, grad_s = jax.jit(jax.grad(lambda x, s: jnp.sum(jq.qat.lsq(x, s, spec) * upstream),
                                    argnums=(0, 1)))(x, step)
  ref_x, ref_s = _lsq_reference_grads(np.asarray(x), 0.1, 7, 7, 37, np.asarray(upstream))
  np.testing.assert_allclose(grad_x, ref_x, rtol=1e-6)
  np.testing.assert_allclose(grad_s[0, 0], ref_s, rtol=1e-5)


def test_lsq_step_gradient_equals_finite_differences_of_the_surrogate():
  """Away from rounding boundaries the surrogate's derivative in s is exact."""
  spec = jq.QuantSpec("int4", channel_axes=(1,))
  x = _weights((32, 4), seed=3)
  step = jq.qat.lsq_init(x, spec)
  upstream = _weights((32, 4), seed=4)
  # The STE surrogate: round(u) is replaced by round(u0) + (u - u0), u0 = x / s0.
  x64, s0 = np.asarray(x, np.float64), np.asarray(step, np.float64)
  u0 = x64 / s0
  frozen = np.round(np.clip(u0, -7, 7))
  inside = np.abs(u0) <= 7

  def surrogate(s):
    u = x64 / s
    value = np.where(inside, (frozen + u - u0) * s, np.sign(u0) * 7 * s)
    return np.sum(value * np.asarray(upstream, np.float64), axis=0)

  eps = 1e-6
  numeric = (surrogate(s0 + eps) - surrogate(s0 - eps)) / (2 * eps)
  grad = jax.grad(lambda s: jnp.sum(jq.qat.lsq(x, s, spec) * upstream))(step)
  np.testing.assert_allclose(np.asarray(grad)[0], numeric / math.sqrt(32 * 7),
                             rtol=1e-3, atol=1e-6)


def test_lsq_plus_offset_gradient_is_one_outside():
  x = jnp.array([[-3.0], [0.05], [0.3], [5.0]])
  spec = jq.QuantSpec("uint4", symmetric=False)  # Q_N = 0, Q_P = 15
  step, offset = jnp.array([[0.1]]), jnp.array([[0.0]])
  grad_b = jax.grad(lambda b: jnp.sum(jq.qat.lsq_plus(x, step, b, spec)))(offset)
  # x = -3 (below) and x = 5 (above) saturate; group of 4, Q_P = 15.
  np.testing.assert_allclose(grad_b[0, 0], 2 / math.sqrt(4 * 15), rtol=1e-6)


def test_lsq_quantize_reproduces_lsq_exactly():
  spec = jq.QuantSpec("int3", channel_axes=(1,), block_sizes={0: 16})
  x = _weights((64, 8), seed=5)
  step = jq.qat.lsq_init(x, spec) * 1.3
  q = jq.qat.lsq_quantize(x, step, spec)
  np.testing.assert_array_equal(jq.dequantize(q), jq.qat.lsq(x, step, spec))
  assert q.codes.dtype == jnp.int4


def test_lsq_rejects_a_step_of_the_wrong_shape():
  with pytest.raises(ValueError, match=r"step has shape \(1, 1\).*must be \(1, 8\)"):
    jq.qat.lsq(_weights(), jnp.ones((1, 1)), INT4_CHANNEL)


def test_lsq_under_vmap_and_jit():
  spec = jq.QuantSpec("int4")
  xs = jnp.stack([_weights((16, 2), seed=i) for i in range(3)])
  steps = jnp.full((3, 1, 1), 0.2)
  f = jax.jit(jax.vmap(jax.grad(lambda x, s: jnp.sum(jq.qat.lsq(x, s, spec) ** 2),
                                argnums=1)))
  grads = f(xs, steps)
  for i in range(3):
    single = jax.grad(lambda s: jnp.sum(jq.qat.lsq(xs[i], s, spec) ** 2))(steps[i])
    np.testing.assert_allclose(grads[i], single, rtol=1e-6)


def test_pact_value_and_gradients():
  x = jnp.array([-1.0, 0.2, 0.7, 1.5, 3.0])
  alpha = jnp.array(1.0)
  y = jq.qat.pact(x, alpha, 2)  # levels at 0, 1/3, 2/3, 1
  np.testing.assert_allclose(y, [0.0, 1 / 3, 2 / 3, 1.0, 1.0], rtol=1e-6)
  grad_x, grad_alpha = jax.grad(lambda x, a: jnp.sum(jq.qat.pact(x, a, 2)),
                                argnums=(0, 1))(x, alpha)
  np.testing.assert_array_equal(grad_x, [0.0, 1.0, 1.0, 0.0, 0.0])
  assert float(grad_alpha) == 2.0  # two inputs at or above alpha


def test_pact_per_channel_alpha():
  x = jnp.array([[0.5, 2.0], [1.5, 0.1]])
  alpha = jnp.array([[1.0, 1.0]])
  grad_alpha = jax.grad(lambda a: jnp.sum(jq.qat.pact(x, a, 4)))(alpha)
  np.testing.assert_array_equal(grad_alpha, [[1.0, 1.0]])


def test_fake_quant_tree_and_qat_in_an_optax_loop():
  params = {"w": _weights((16, 4), seed=6), "b": jnp.zeros((4,))}
  rules = [jq.Rule("w", jq.QuantSpec("int4", channel_axes=(1,))), jq.Rule(".*", None)]
  x = _weights((32, 16), seed=7)
  target = x @ _weights((16, 4), seed=8)

  def loss(p):
    p = jq.qat.fake_quant_tree(p, rules)
    return jnp.mean((x @ p["w"] + p["b"][None] - target) ** 2)

  optimizer = optax.sgd(0.05)
  state = optimizer.init(params)
  step = jax.jit(lambda p, s: (lambda g: optimizer.update(g, s))(jax.grad(loss)(p)))
  first = float(loss(params))
  for _ in range(50):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 0.5 * first
  converted = jq.quantize_tree(params, rules)
  np.testing.assert_array_equal(jq.dequantize(converted["w"]),
                                jq.qat.fake_quant_tree(params, rules)["w"])


def test_dampening_loss_pulls_weights_to_their_grid_points():
  params = {"w": _weights((16, 4), seed=9)}
  rules = [jq.Rule("w", jq.QuantSpec("int2", channel_axes=(1,)))]
  value = jq.qat.dampening_loss(params, rules)
  w_q = jq.fake_quant(params["w"], rules[0].spec)
  np.testing.assert_allclose(value, jnp.sum((params["w"] - w_q) ** 2), rtol=1e-6)
  grad = jax.grad(jq.qat.dampening_loss)(params, rules)["w"]
  np.testing.assert_allclose(grad, 2 * (params["w"] - w_q), rtol=1e-5, atol=1e-6)
