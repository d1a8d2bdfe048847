"""jaxquant.nnx: unmodified NNX models run with QArray params and quantized inputs."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant import nnx as jqn

INT8_KERNELS = [jq.Rule(r"(.*/)?kernel", jq.QuantSpec("int8", channel_axes=(-1,)))]
PER_TOKEN = jqn.ActivationQuant("int8", "per_token")
PER_TENSOR = jqn.ActivationQuant("int8", "per_tensor")
STATIC = jqn.ActivationQuant("int8", "static")


class Wrapped(nnx.Module):
  """A user's model holding one layer at path ``layer``."""

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    return self.layer(x)


def _rngs():
  return nnx.Rngs(0)


# name -> (layer factory given dtype, input shape, contracted input axes)
LAYERS = {
    "linear": (lambda dt: nnx.Linear(16, 12, dtype=dt, rngs=_rngs()), (2, 3, 16), (-1,)),
    "linear_general": (lambda dt: nnx.LinearGeneral((6, 8), (3, 4), axis=(-2, -1), dtype=dt,
                                                    rngs=_rngs()), (5, 6, 8), (-2, -1)),
    "linear_general_batch": (lambda dt: nnx.LinearGeneral(8, 7, axis=-1, batch_axis={0: 3},
                                                          dtype=dt, rngs=_rngs()),
                             (3, 5, 8), (-1,)),
    "einsum": (lambda dt: nnx.Einsum("...c,cde->...de", (8, 4, 6), (4, 6), dtype=dt,
                                     rngs=_rngs()), (2, 5, 8), (-1,)),
    "conv": (lambda dt: nnx.Conv(4, 6, (3, 3), strides=(2, 1), dtype=dt, rngs=_rngs()),
             (2, 9, 7, 4), (-1,)),
    "conv_circular_dilated_groups": (
        lambda dt: nnx.Conv(4, 6, (3,), padding="CIRCULAR", kernel_dilation=2,
                            feature_group_count=2, dtype=dt, rngs=_rngs()), (2, 11, 4), (-1,)),
    "conv_causal_explicit_batch": (
        lambda dt: nnx.Conv(4, 5, 3, padding="CAUSAL", dtype=dt, rngs=_rngs()),
        (2, 3, 6, 4), (-1,)),
}
# dtype -> (dtype, tolerance vs dequantize-then-apply, vs fake-quant reference),
# relative to the output's max: float rounding of that dtype.
DTYPES = {"float32": (jnp.float32, 1e-6, 1e-5), "bfloat16": (jnp.bfloat16, 4e-3, 2e-2)}


def _setup(name, dtype):
  make, shape, contract = LAYERS[name]
  model = Wrapped(make(dtype))
  params = nnx.state(model, nnx.Param)
  # Non-zero biases, so that their shape and broadcasting are checked too.
  nnx.update(model, jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.key(7), a.shape, a.dtype), params))
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
  return model, x, contract


def _dequantized_copy(model, float_model):
  """`float_model` with `model`'s params dequantized (the reference path)."""
  reference = nnx.clone(float_model)
  nnx.update(reference, jq.dequantize_tree(nnx.state(model, nnx.Param)))
  return reference


def _close(actual, expected, rtol):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert actual.shape == expected.shape
  scale = max(float(np.max(np.abs(expected))), 1e-6)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def _per_token_spec(x, contract):
  contract = {a % x.ndim for a in contract}
  return jq.QuantSpec("int8", channel_axes=tuple(a for a in range(x.ndim) if a not in contract))


def _int_dots(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("preferred_element_type=int32")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", LAYERS)
def test_weight_only_equals_dequantize_then_apply(name, dtype_name):
  dtype, rtol, _ = DTYPES[dtype_name]
  model, x, _ = _setup(name, dtype)
  float_model = nnx.clone(model)
  out = jqn.quantize_model(model, INT8_KERNELS)
  assert out is model
  assert isinstance(model.layer.kernel.get_value(), jq.QArray)
  assert type(model.layer).__name__ == "Quantized" + type(float_model.layer).__name__
  assert isinstance(model.layer, type(float_model.layer))
  expected = _dequantized_copy(model, float_model)(x)
  actual = nnx.jit(lambda m, x: m(x))(model, x)
  assert actual.dtype == expected.dtype
  _close(actual, expected, rtol)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", ["linear", "linear_general", "linear_general_batch", "einsum"])
def test_w8a8_int_path_matches_fake_quant_reference(name, dtype_name):
  dtype, _, rtol = DTYPES[dtype_name]
  model, x, contract = _setup(name, dtype)
  float_model = nnx.clone(model)
  jqn.quantize_model(model, INT8_KERNELS, [(r"layer", PER_TOKEN)])
  graphdef, state = nnx.split(model)
  run = lambda state, x: nnx.merge(graphdef, state)(x)
  assert _int_dots(run, state, x) == 1
  actual = jax.jit(run)(state, x)
  expected = _dequantized_copy(model, float_model)(jq.fake_quant(x, _per_token_spec(x, contract)))
  _close(actual, expected, rtol)
  _close(actual, float_model(x), 0.05)


@pytest.mark.parametrize("name", ["conv", "conv_circular_dilated_groups"])
def test_w8a8_conv_int_path_per_tensor(name):
  model, x, _ = _setup(name, jnp.float32)
  float_model = nnx.clone(model)
  jqn.quantize_model(model, INT8_KERNELS, [(r".*", PER_TENSOR)])
  assert _int_dots(lambda x: model(x), x) == 1
  expected = _dequantized_copy(model, float_model)(jq.fake_quant(x, "int8"))
  _close(model(x), expected, 1e-5)


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 32, rngs=rngs),
                            nnx.Linear(32, 8, rngs=rngs)])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


def _mlp():
  return MLP(_rngs()), jax.random.normal(jax.random.key(0), (4, 16))


def test_paths_and_rules_with_none_keep_layers_float():
  model, x = _mlp()
  expected = model(x)
  weight_rules = [jq.Rule(r"layers/1/kernel", None)] + INT8_KERNELS
  jqn.quantize_model(model, weight_rules, [(r"layers/2", None), (r"layers/\d", PER_TOKEN)])
  assert isinstance(model.layers[0].kernel.get_value(), jq.QArray)
  assert not isinstance(model.layers[1].kernel.get_value(), jq.QArray)
  assert [jqn.is_quantized(layer) for layer in model.layers] == [True, True, True]
  assert [layer.quant_activation for layer in model.layers] == [PER_TOKEN, PER_TOKEN, None]
  assert _int_dots(lambda x: model(x), x) == 1
  _close(model(x), expected, 0.05)
  # A layer with neither a QArray nor an activation rule is left alone.
  other, _ = _mlp()
  jqn.quantize_model(other, [jq.Rule(r"layers/0/kernel", "int8")])
  assert [jqn.is_quantized(layer) for layer in other.layers] == [True, False, False]


def test_jit_split_merge_clone_and_no_recompile():
  model, x = _mlp()
  jqn.quantize_model(model, INT8_KERNELS, [(r".*", PER_TOKEN)])
  traces = []

  @nnx.jit
  def run(model, x):
    traces.append(1)
    return model(x)

  first = run(model, x)
  run(model, x + 1.0)
  assert len(traces) == 1
  graphdef, state = nnx.split(model)
  merged = nnx.merge(graphdef, state)
  assert type(merged.layers[0]) is jqn.QuantizedLinear
  _close(merged(x), first, 1e-6)
  _close(nnx.clone(model)(x), first, 1e-6)
  # The quantized twins of Flax's classes are importable by name.
  assert pickle.loads(pickle.dumps(jqn.QuantizedLinear)) is jqn.QuantizedLinear


def test_calibration_stores_observer_stats_and_static_path():
  model, x = _mlp()
  expected = model(x)
  jqn.quantize_model(model, INT8_KERNELS, [(r"layers/0", STATIC), (r"layers/1", jqn.ActivationQuant(
      "int8", "static", observer=jqn.Observer("percentile:99", average="max")))])
  stats = nnx.state(model, jqn.QuantStats)
  assert float(stats["layers"][0]["input_count"].get_value()) == 0
  jqn.calibrate(model, [x, 2.0 * x])
  layer0 = model.layers[0]
  amax = float(jnp.max(jnp.abs(x)))
  np.testing.assert_allclose(layer0.input_amax.get_value(), 0.9 * amax + 0.1 * 2 * amax,
                             rtol=1e-6)
  assert int(layer0.input_count.get_value()) == 2
  assert float(model.layers[1].input_amax.get_value()) > 0
  assert not hasattr(model.layers[2], "input_amax")
  assert not any(layer.quant_calibrating for layer in model.layers)
  assert _int_dots(lambda x: model(x), x) == 2
  _close(nnx.jit(lambda m, x: m(x))(model, x), expected, 0.05)


def test_calibrate_without_static_layers_is_an_error():
  model, x = _mlp()
  jqn.quantize_model(model, INT8_KERNELS, [(r".*", PER_TOKEN)])
  with pytest.raises(ValueError, match="static"):
    jqn.calibrate(model, [x])


class WithEmbed(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 8, rngs=rngs)
    self.out = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, ids):
    return self.out(self.embed(ids))


def test_qarray_in_an_unsupported_layer_is_a_clear_error_and_changes_nothing():
  model = WithEmbed(_rngs())
  ids = jnp.arange(3)
  expected = model(ids)
  with pytest.raises(TypeError, match=r"embed/embedding would be a QArray.*Embed"):
    jqn.quantize_model(model, [jq.Rule(r".*", "int8")])
  assert not isinstance(model.out.kernel.get_value(), jq.QArray)
  assert not jqn.is_quantized(model.out)
  np.testing.assert_array_equal(model(ids), expected)
  jqn.quantize_model(model, [jq.Rule(r"embed/.*", None), jq.Rule(r".*", "int8")])
  _close(model(ids), expected, 0.05)


class ScaledLinear(nnx.Linear):
  """A subclass with its own __call__: not supported."""

  def __call__(self, x):
    return 2.0 * super().__call__(x)


class MyLinear(nnx.Linear):
  """A subclass that keeps Linear's __call__: supported."""


def test_subclasses():
  x = jnp.ones((2, 5))
  model = Wrapped(MyLinear(5, 3, rngs=_rngs()))
  expected = model(x)
  jqn.quantize_model(model, INT8_KERNELS)
  assert type(model.layer).__name__ == "QuantizedMyLinear"
  assert jqn.unquantized_class(model.layer) is MyLinear
  _close(model(x), expected, 0.05)
  with pytest.raises(TypeError, match="ScaledLinear"):
    jqn.quantize_model(Wrapped(ScaledLinear(5, 3, rngs=_rngs())), INT8_KERNELS)


def test_custom_contraction_is_an_error():
  layer = nnx.Linear(5, 3, dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k),
                     rngs=_rngs())
  with pytest.raises(ValueError, match="custom dot_general"):
    jqn.quantize_model(Wrapped(layer), INT8_KERNELS)


def test_library_model_attention_runs_w8a8_unmodified():
  """Flax's own attention (LinearGeneral projections), not written for jaxquant."""
  model = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=16, out_features=8,
                                 decode=False, rngs=_rngs())
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  expected = model(x)
  jqn.quantize_model(model, INT8_KERNELS, [(r".*", PER_TOKEN)])
  assert _int_dots(lambda x: model(x), x) == 4  # query, key, value, out
  _close(nnx.jit(lambda m, x: m(x))(model, x), expected, 0.05)


def test_static_quantization_of_a_float_weight_layer():
  model, x = _mlp()
  expected = model(x)
  jqn.quantize_model(model, activation_rules=[(r"layers/0", STATIC)])
  assert jqn.is_quantized(model.layers[0]) and not jqn.is_quantized(model.layers[1])
  jqn.calibrate(model, [x], jit=False)
  amax = model.layers[0].input_amax.get_value()
  np.testing.assert_allclose(amax, jnp.max(jnp.abs(x)), rtol=1e-6)
  _close(model(x), expected, 0.05)
