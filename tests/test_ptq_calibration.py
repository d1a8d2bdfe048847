"""Calibration capture (Linen and NNX) and the PTQ driver over a model's params."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
import jaxquant.ptq  # noqa: F401  (registers jq.ptq)

D_IN, D_HIDDEN, D_OUT = 24, 64, 32
INT4_G32 = jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 32})


class Block(nn.Module):
  """Dense then DenseGeneral with 2-D features (a [64, 4, 8] kernel, 2-D in effect)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(D_HIDDEN, name="up")(x))
    return nn.DenseGeneral((4, 8), name="out")(h)


class LinenModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    return Block(name="block")(x)


class NNXModel(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(D_IN, D_HIDDEN, rngs=rngs),
                            nnx.Linear(D_HIDDEN, D_OUT, rngs=rngs)])

  def __call__(self, x):
    return self.layers[1](nnx.relu(self.layers[0](x)))


def batches():
  """Three batches of [2, 5, D_IN] tokens with a few large channels."""
  rng = np.random.default_rng(0)
  scale = np.ones(D_IN, np.float32)
  scale[[2, 11]] = 30.0
  return [jnp.asarray(rng.normal(size=(2, 5, D_IN)).astype(np.float32) * scale)
          for _ in range(3)]


def numpy_stats(x):
  """xtx, absmax, abs_sum, x_sum, count of float64 inputs [tokens, d]."""
  return x.T @ x, np.abs(x).max(0), np.abs(x).sum(0), x.sum(0), x.shape[0]


def assert_stats_equal(stats, x):
  xtx, absmax, abs_sum, x_sum, count = numpy_stats(x)
  np.testing.assert_allclose(stats.xtx, xtx, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(stats.absmax, absmax, rtol=1e-6)
  np.testing.assert_allclose(stats.abs_sum, abs_sum, rtol=1e-5)
  np.testing.assert_allclose(stats.x_sum, x_sum, rtol=1e-5, atol=1e-4)
  assert int(stats.count) == count and stats.count.dtype == jnp.int32
  np.testing.assert_allclose(stats.mean_abs, abs_sum / count, rtol=1e-5)


@pytest.fixture(scope="module")
def linen_setup():
  model = LinenModel()
  variables = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, D_IN)))
  stats = jq.ptq.capture_linen(model, variables, batches(), progress=False)
  return model, variables, stats


def test_capture_linen_equals_numpy_on_concatenated_activations(linen_setup):
  model, variables, stats = linen_setup
  assert sorted(stats) == ["block/out", "block/up"]
  params = variables["params"]["block"]
  x = np.concatenate([np.asarray(b, np.float64).reshape(-1, D_IN) for b in batches()])
  hidden = np.maximum(x @ np.asarray(params["up"]["kernel"], np.float64)
                      + np.asarray(params["up"]["bias"], np.float64), 0.0)
  assert_stats_equal(stats["block/up"], x)
  assert_stats_equal(stats["block/out"], hidden)
  only_up = jq.ptq.capture_linen(model, variables, batches()[:1], pattern=r".*/up",
                                 progress=False)
  assert list(only_up) == ["block/up"]


def test_capture_nnx_equals_numpy_and_leaves_the_model_alone():
  model = NNXModel(nnx.Rngs(0))
  dot_general = model.layers[0].dot_general
  stats = jq.ptq.capture_nnx(model, batches(), progress=False)
  assert sorted(stats) == ["layers/0", "layers/1"]
  assert model.layers[0].dot_general is dot_general
  x = np.concatenate([np.asarray(b, np.float64).reshape(-1, D_IN) for b in batches()])
  layer = model.layers[0]
  hidden = np.maximum(x @ np.asarray(layer.kernel[...], np.float64)
                      + np.asarray(layer.bias[...], np.float64), 0.0)
  assert_stats_equal(stats["layers/0"], x)
  assert_stats_equal(stats["layers/1"], hidden)
  only_second = jq.ptq.capture_nnx(model, batches()[:1], pattern="layers/1", progress=False)
  assert list(only_second) == ["layers/1"]


def test_capture_rejects_bad_input(linen_setup):
  model, variables, _ = linen_setup
  with pytest.raises(ValueError, match="batches is empty"):
    jq.ptq.capture_linen(model, variables, [], progress=False)
  with pytest.raises(ValueError, match="pattern"):
    jq.ptq.capture_linen(model, variables, batches(), pattern="(", progress=False)
  quantized = jq.nnx.quantize_model(NNXModel(nnx.Rngs(0)), [
      jq.Rule(r"layers/0/kernel", jq.QuantSpec("int8", channel_axes=(1,)))])
  with pytest.raises(ValueError, match="layers/0 runs quantized"):
    jq.ptq.capture_nnx(quantized, batches(), progress=False)


def test_driver_quantizes_linen_model_by_rules(linen_setup):
  """AWQ on the [64, 4, 8] DenseGeneral kernel (quantized as [64, 32]), RTN on the Dense."""
  model, variables, stats = linen_setup
  awq = jq.ptq.AWQ(jq.QuantSpec("int4", channel_axes=(1,)), grid=10)
  qvars = jq.ptq.quantize_params(variables, stats, [
      (r"params/block/out/kernel", awq),
      jq.ptq.Rule(r"params/block/up/kernel", jq.ptq.RTN("int8")),
      jq.ptq.Rule(r".*", None)], progress=False)
  params, qparams = variables["params"]["block"], qvars["params"]["block"]
  out = qparams["out"]["kernel"]
  assert isinstance(out, jq.ptq.AWQResult) and out.qweight.shape == (D_HIDDEN, 4, 8)
  direct = jq.ptq.awq(params["out"]["kernel"].reshape(D_HIDDEN, -1), stats["block/out"],
                      awq.spec, grid=10)
  np.testing.assert_array_equal(out.scales, direct.scales)
  np.testing.assert_array_equal(out.dequantize().reshape(D_HIDDEN, -1), direct.dequantize())
  assert isinstance(qparams["up"]["kernel"], jq.QArray)
  assert qparams["up"]["bias"] is params["up"]["bias"]
  x = batches()[0]
  apply = jax.jit(model.apply)
  y = apply(variables, x)
  y_q = apply(jq.ptq.dequantize_params(qvars), x)
  assert float(jnp.linalg.norm(y_q - y)) < 0.1 * float(jnp.linalg.norm(y))


def test_driver_gptq_qarrays_run_through_jq_linen_and_jq_rules_mean_rtn(linen_setup):
  model, variables, stats = linen_setup
  qvars = jq.ptq.quantize_params(variables, stats, [
      jq.ptq.Rule(r".*/out/kernel", jq.ptq.GPTQ(INT4_G32, block_size=24)),
      jq.Rule(r".*/up/kernel", jq.QuantSpec("int8", channel_axes=(1,)))], progress=False)
  params, qparams = variables["params"]["block"], qvars["params"]["block"]
  out = qparams["out"]["kernel"]
  assert isinstance(out, jq.QArray) and out.shape == (D_HIDDEN, 4, 8)
  direct = jq.ptq.gptq(params["out"]["kernel"].reshape(D_HIDDEN, -1), stats["block/out"].xtx,
                       INT4_G32, block_size=24, act_order=True)
  np.testing.assert_array_equal(jq.dequantize(out).reshape(D_HIDDEN, -1), jq.dequantize(direct))
  up = qparams["up"]["kernel"]
  np.testing.assert_array_equal(up.codes, jq.quantize(params["up"]["kernel"], up.spec).codes)
  x = batches()[1]
  np.testing.assert_allclose(jq.linen.apply(model, qvars, x),
                             model.apply(jq.ptq.dequantize_params(qvars), x),
                             rtol=1e-5, atol=1e-4)


def test_driver_nnx_state_paths():
  model = NNXModel(nnx.Rngs(0))
  stats = jq.ptq.capture_nnx(model, batches(), progress=False)
  state = nnx.state(model, nnx.Param)
  qstate = jq.ptq.quantize_params(state, stats, [
      jq.ptq.Rule(r"layers/1/kernel", jq.ptq.GPTQ(INT4_G32, block_size=24))], progress=False)
  flat = dict(jax.tree_util.tree_flatten_with_path(
      qstate, is_leaf=lambda l: isinstance(l, jq.QArray))[0])
  quantized = [v for v in flat.values() if isinstance(v, jq.QArray)]
  expected = jq.ptq.gptq(model.layers[1].kernel[...], stats["layers/1"].xtx, INT4_G32,
                         block_size=24, act_order=True)
  assert len(quantized) == 1
  np.testing.assert_array_equal(jq.dequantize(quantized[0]), jq.dequantize(expected))


def test_driver_rejects_bad_input(linen_setup):
  model, variables, stats = linen_setup
  del model
  gptq = jq.ptq.GPTQ(INT4_G32, block_size=24)
  with pytest.raises(ValueError, match=r"params/block/up/kernel: GPTQ needs calibration "
                     r"statistics of layer 'params/block/up'"):
    jq.ptq.quantize_params(variables, {"block/out": stats["block/out"]},
                           [(r".*/kernel", gptq)], progress=False)
  with pytest.raises(ValueError, match="restrict the rule's pattern to kernels"):
    jq.ptq.quantize_params(variables, stats, [(r".*/up/.*", jq.ptq.RTN("int8"))],
                           progress=False)
  with pytest.raises(ValueError, match=r"cannot quantize params/block/out/kernel .* blocks "
                     "the output axis"):
    jq.ptq.quantize_params(variables, stats, [(r".*/out/kernel", jq.ptq.RTN(
        jq.QuantSpec("int8", block_sizes={1: 8})))], progress=False)
  with pytest.raises(ValueError, match=r"cannot quantize params/block/up/kernel .* xtx must be"):
    jq.ptq.quantize_params(variables, {"block/up": stats["block/out"]},
                           [(r".*/up/kernel", gptq)], progress=False)
  with pytest.raises(TypeError, match="Rule algorithm must be"):
    jq.ptq.Rule(".*", INT4_G32)
