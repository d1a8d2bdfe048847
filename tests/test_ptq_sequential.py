"""Sequential PTQ: each layer quantized from statistics of the partly quantized model."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
import jaxquant.ptq  # noqa: F401  (registers jq.ptq)

WIDTHS = (32, 48, 48, 16)
INT3_G16 = jq.QuantSpec("int3", channel_axes=(1,), block_sizes={0: 16})
RULES = [jq.ptq.Rule(r".*kernel", jq.ptq.GPTQ(INT3_G16, block_size=16))]


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(WIDTHS[1:]):
      x = nn.Dense(width, name=f"dense_{i}")(x)
      x = nn.gelu(x) if i + 2 < len(WIDTHS) else x
    return x


class NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(WIDTHS[:-1], WIDTHS[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      x = nnx.gelu(x) if i + 1 < len(self.layers) else x
    return x


def calibration():
  """Four batches of [64, 32] correlated inputs with two outlier channels."""
  rng = np.random.default_rng(0)
  mixing = rng.normal(size=(6, WIDTHS[0]))
  scale = np.ones(WIDTHS[0], np.float32)
  scale[[5, 20]] = 15.0
  return [jnp.asarray(((rng.normal(size=(64, 6)) @ mixing
                        + 0.2 * rng.normal(size=(64, WIDTHS[0]))) * scale).astype(np.float32))
          for _ in range(4)]


@pytest.fixture(scope="module")
def linen_model():
  model = MLP()
  return model, model.init(jax.random.key(0), calibration()[0])


def output_error(model, variables, qvars):
  x = jnp.concatenate(calibration())
  y, y_q = model.apply(variables, x), model.apply(jq.ptq.dequantize_params(qvars), x)
  return float(jnp.sum(jnp.square(y_q - y)))


def test_each_layer_uses_the_statistics_of_the_partly_quantized_model(linen_model):
  model, variables = linen_model
  batches = calibration()
  qvars = jq.ptq.quantize_linen_sequential(model, variables, batches, RULES,
                                           progress=False)
  current = variables
  for i in range(len(WIDTHS) - 1):
    name = f"dense_{i}"
    stats = jq.ptq.capture_linen(model, current, batches, progress=False)[name]
    kernel = variables["params"][name]["kernel"]
    expected = jq.ptq.gptq(kernel, stats.xtx, INT3_G16, block_size=16, act_order=True)
    got = qvars["params"][name]["kernel"]
    np.testing.assert_array_equal(got.codes, expected.codes)
    np.testing.assert_array_equal(got.scale, expected.scale)
    current = jax.tree.map(lambda v: v, current)  # a copy to edit
    current["params"][name]["kernel"] = jq.dequantize(got)
  # The first layer sees the float model's inputs either way.
  stats = jq.ptq.capture_linen(model, variables, batches, progress=False)
  once = jq.ptq.quantize_params(variables, stats, RULES, progress=False)
  np.testing.assert_array_equal(once["params"]["dense_0"]["kernel"].codes,
                                qvars["params"]["dense_0"]["kernel"].codes)


def test_sequential_beats_float_statistics_at_3_bits(linen_model):
  model, variables = linen_model
  batches = calibration()
  stats = jq.ptq.capture_linen(model, variables, batches, progress=False)
  once = jq.ptq.quantize_params(variables, stats, RULES, progress=False)
  sequential = jq.ptq.quantize_linen_sequential(model, variables, batches, RULES,
                                                progress=False)
  assert output_error(model, variables, sequential) < 0.95 * output_error(
      model, variables, once)


def test_nnx_twin_and_rtn_layers_in_order():
  model = NNXMLP(nnx.Rngs(1))
  batches = calibration()
  rules = [jq.ptq.Rule(r"layers/1/kernel", jq.ptq.RTN(INT3_G16))] + RULES
  qstate = jq.ptq.quantize_nnx_sequential(model, batches, rules, progress=False)
  leaves = lambda tree: dict(jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda l: isinstance(l, jq.QArray))[0])
  quantized = {jax.tree_util.keystr(k): v for k, v in leaves(qstate).items()
               if isinstance(v, jq.QArray)}
  assert len(quantized) == 3
  # layers/2 is quantized from inputs through the RTN-quantized layers/1.
  copy = nnx.merge(*nnx.split(model))
  for i in (0, 1):
    copy.layers[i].kernel[...] = jq.dequantize(
        next(v for k, v in quantized.items() if f"[{i}]" in k and "kernel" in k))
  stats = jq.ptq.capture_nnx(copy, batches, progress=False)["layers/2"]
  expected = jq.ptq.gptq(model.layers[2].kernel[...], stats.xtx, INT3_G16, block_size=16,
                         act_order=True)
  got = next(v for k, v in quantized.items() if "[2]" in k)
  np.testing.assert_array_equal(got.codes, expected.codes)


def test_sequential_rejects_what_quantize_params_rejects(linen_model):
  model, variables = linen_model
  with pytest.raises(ValueError, match="batches is empty"):
    jq.ptq.quantize_linen_sequential(model, variables, [], RULES, progress=False)
  with pytest.raises(ValueError, match="restrict the rule's pattern to kernels"):
    jq.ptq.quantize_linen_sequential(
        model, variables, calibration(),
        [jq.ptq.Rule(r".*bias", jq.ptq.RTN("int8"))], progress=False)


class SharedInput(nn.Module):
  """Three Dense layers reading one tensor (as query, key, value), then one more."""

  @nn.compact
  def __call__(self, x):
    h = sum(nn.gelu(nn.Dense(48, name=name)(x)) for name in ("q", "k", "v"))
    return nn.Dense(16, name="out")(h)


def test_layers_reading_one_input_share_a_capture():
  model = SharedInput()
  batches = calibration()
  variables = model.init(jax.random.key(2), batches[0])
  run = jq.ptq.calibration.Capture(jq.ptq.calibration.linen_step(model, None, ".*", {}))
  captures = []

  def capture(v):
    captures.append(1)
    return run(v, batches=batches)

  qvars = jq.ptq.quantize_sequential(variables, capture, RULES, progress=False)
  assert len(captures) == 2  # q, k, v from the float model; out after them
  stats = capture(variables)
  assert list(stats) == ["q", "k", "v", "out"]  # the order they ran, not sorted
  assert list(jq.ptq.capture_linen(model, variables, batches, progress=False)) == list(stats)
  for name in ("q", "k", "v"):
    expected = jq.ptq.gptq(variables["params"][name]["kernel"], stats[name].xtx, INT3_G16,
                           block_size=16, act_order=True)
    np.testing.assert_array_equal(qvars["params"][name]["kernel"].codes, expected.codes)
  current = jq.ptq.dequantize_params({"params": {
      **variables["params"], **{n: qvars["params"][n] for n in ("q", "k", "v")}}})
  out_stats = capture(current)["out"]
  expected = jq.ptq.gptq(variables["params"]["out"]["kernel"], out_stats.xtx, INT3_G16,
                         block_size=16, act_order=True)
  np.testing.assert_array_equal(qvars["params"]["out"]["kernel"].codes, expected.codes)
