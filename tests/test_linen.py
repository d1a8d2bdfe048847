"""jaxquant.linen: unmodified Linen models run with QArray params and quantized inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import linen as jql

INT8_KERNELS = [jq.Rule(r"params/(.*/)?kernel", jq.QuantSpec("int8", channel_axes=(-1,)))]
PER_TOKEN = jql.ActivationQuant("int8", "per_token")
PER_TENSOR = jql.ActivationQuant("int8", "per_tensor")


class Wrapped(nn.Module):
  """A user's model: one layer inside, called as the user wrote it."""

  make_layer: object

  @nn.compact
  def __call__(self, x):
    return self.make_layer()(x)


# name -> (layer factory given dtype, input shape, kernel rule spec, contracted input axes)
LAYERS = {
    "dense": (lambda dt: nn.Dense(12, dtype=dt), (2, 3, 16), (-1,)),
    "dense_general": (lambda dt: nn.DenseGeneral((3, 4), axis=(-2, -1), dtype=dt),
                      (5, 6, 8), (-2, -1)),
    "dense_general_batch": (lambda dt: nn.DenseGeneral(7, axis=-1, batch_dims=(0,), dtype=dt),
                            (3, 5, 8), (-1,)),
    "einsum": (lambda dt: nn.Einsum((8, 4, 6), "...c,cde->...de", dtype=dt), (2, 5, 8), (-1,)),
    "conv": (lambda dt: nn.Conv(6, (3, 3), strides=(2, 1), padding="SAME", dtype=dt),
             (2, 9, 7, 4), (-1,)),
    "conv_circular_dilated_groups": (
        lambda dt: nn.Conv(6, (3,), padding="CIRCULAR", kernel_dilation=2,
                           feature_group_count=2, dtype=dt), (2, 11, 4), (-1,)),
    "conv_causal_explicit_batch": (
        lambda dt: nn.Conv(5, 3, padding="CAUSAL", kernel_dilation=2, dtype=dt),
        (2, 3, 6, 4), (-1,)),
    "conv_pairs_input_dilation_unbatched": (
        lambda dt: nn.Conv(5, (2, 3), padding=((1, 0), (2, 1)), input_dilation=(2, 1),
                           dtype=dt), (6, 7, 3), (-1,)),
}
# dtype -> (dtype, tolerance vs dequantize-then-apply, vs fake-quant reference),
# relative to the output's max: float rounding of that dtype.
DTYPES = {"float32": (jnp.float32, 1e-6, 1e-5), "bfloat16": (jnp.bfloat16, 4e-3, 2e-2)}


def _setup(name, dtype, seed=0):
  make, shape, contract = LAYERS[name]
  model = Wrapped(lambda: make(dtype))
  x = jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)
  variables = model.init(jax.random.key(seed + 1), x)
  # Non-zero biases, so that their shape and broadcasting are checked too.
  variables = jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.key(7), a.shape, a.dtype), variables)
  return model, variables, x, contract


def _close(actual, expected, rtol):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert actual.shape == expected.shape
  scale = max(float(np.max(np.abs(expected))), 1e-6)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def _per_token_spec(x, contract):
  ndim = x.ndim
  contract = {a % ndim for a in contract}
  return jq.QuantSpec("int8", channel_axes=tuple(a for a in range(ndim) if a not in contract))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", LAYERS)
def test_weight_only_equals_dequantize_then_apply(name, dtype_name):
  dtype, rtol, _ = DTYPES[dtype_name]
  model, variables, x, _ = _setup(name, dtype)
  qvariables = jq.quantize_tree(variables, INT8_KERNELS)
  assert any(isinstance(v, jq.QArray) for v in jax.tree.leaves(
      qvariables, is_leaf=lambda v: isinstance(v, jq.QArray)))
  expected = model.apply(jq.dequantize_tree(qvariables), x)
  actual = jax.jit(lambda v, x: jql.apply(model, v, x))(qvariables, x)
  assert actual.dtype == expected.dtype
  _close(actual, expected, rtol)


def test_quantized_params_break_the_unintercepted_layer():
  """Why the interceptor computes the output itself: Flax's layer cannot use a QArray."""
  model, variables, x, _ = _setup("dense", jnp.float32)
  qvariables = jq.quantize_tree(variables, INT8_KERNELS)
  with pytest.raises(TypeError):
    model.apply(qvariables, x)


def _int_dots(fn, *args) -> int:
  jaxpr = str(jax.make_jaxpr(fn)(*args))
  return jaxpr.count("preferred_element_type=int32")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", ["dense", "dense_general", "dense_general_batch", "einsum"])
def test_w8a8_int_path_matches_fake_quant_reference(name, dtype_name):
  dtype, _, rtol = DTYPES[dtype_name]
  model, variables, x, contract = _setup(name, dtype)
  qvariables = jq.quantize_tree(variables, INT8_KERNELS)
  run = lambda v, x: jql.apply(model, v, x, activation_rules=[(r".*", PER_TOKEN)])
  assert _int_dots(run, qvariables, x) == 1
  actual = jax.jit(run)(qvariables, x)
  x_fake = jq.fake_quant(x, _per_token_spec(x, contract))
  expected = model.apply(jq.dequantize_tree(qvariables), x_fake)
  _close(actual, expected, rtol)
  # ... and the float model within int8 error.
  _close(actual, model.apply(variables, x), 0.05)


@pytest.mark.parametrize("name", ["conv", "conv_circular_dilated_groups",
                                  "conv_causal_explicit_batch"])
def test_w8a8_conv_int_path_per_tensor(name):
  model, variables, x, _ = _setup(name, jnp.float32)
  qvariables = jq.quantize_tree(variables, INT8_KERNELS)
  run = lambda v, x: jql.apply(model, v, x, activation_rules=[(r".*", PER_TENSOR)])
  assert _int_dots(run, qvariables, x) == 1
  actual = jax.jit(run)(qvariables, x)
  expected = model.apply(jq.dequantize_tree(qvariables), jq.fake_quant(x, "int8"))
  _close(actual, expected, 1e-5)
  _close(actual, model.apply(variables, x), 0.05)


def test_per_token_conv_is_simulated_not_integer():
  """Per-pixel scales do not factor out of a convolution: fake-quant, float conv."""
  model, variables, x, _ = _setup("conv", jnp.float32)
  qvariables = jq.quantize_tree(variables, INT8_KERNELS)
  run = lambda v, x: jql.apply(model, v, x, activation_rules=[(r".*", PER_TOKEN)])
  assert _int_dots(run, qvariables, x) == 0
  expected = model.apply(jq.dequantize_tree(qvariables),
                         jq.fake_quant(x, jq.QuantSpec("int8", channel_axes=(0, 1, 2))))
  _close(run(qvariables, x), expected, 1e-6)


def test_activation_only_on_float_weights():
  model, variables, x, contract = _setup("dense", jnp.float32)
  actual = jql.apply(model, variables, x, activation_rules=[(r".*", PER_TOKEN)])
  expected = model.apply(variables, jq.fake_quant(x, _per_token_spec(x, contract)))
  _close(actual, expected, 1e-6)


def test_weight_rules_quantize_on_the_fly_and_group_wise_falls_back():
  model, variables, x, _ = _setup("dense", jnp.float32)
  rules = [jq.Rule(r"params/.*/kernel",
                   jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 8}))]
  run = lambda v, x: jql.apply(model, v, x, weight_rules=rules,
                               activation_rules=[(r".*", PER_TOKEN)])
  assert _int_dots(run, variables, x) == 0  # int4 blocks along the contraction
  x_fake = jq.fake_quant(x, _per_token_spec(x, (-1,)))
  expected = model.apply(jq.dequantize_tree(jq.quantize_tree(variables, rules)), x_fake)
  _close(run(variables, x), expected, 1e-6)


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(8)(x)


def _mlp():
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (4, 16))
  return model, model.init(jax.random.key(1), x), x


def test_rules_with_none_keep_layers_float():
  model, variables, x = _mlp()
  weight_rules = [jq.Rule(r"params/Dense_1/kernel", None)] + INT8_KERNELS
  qvariables = jq.quantize_tree(variables, weight_rules)
  assert not isinstance(qvariables["params"]["Dense_1"]["kernel"], jq.QArray)
  assert isinstance(qvariables["params"]["Dense_2"]["kernel"], jq.QArray)
  act_rules = [(r"Dense_2", None), (r"Dense_\d", PER_TOKEN)]
  run = lambda v, x: jql.apply(model, v, x, activation_rules=act_rules)
  assert _int_dots(run, qvariables, x) == 1  # Dense_0 only: Dense_1 float, Dense_2 float input
  _close(run(qvariables, x), model.apply(variables, x), 0.05)
  jaxpr = str(jax.make_jaxpr(run)(qvariables, x))
  assert jaxpr.count("dot_general") == 3


def test_jit_and_no_recompile():
  model, variables, x = _mlp()
  qvariables = jq.quantize_tree(variables, INT8_KERNELS)
  traces = []

  @jax.jit
  def run(v, x):
    traces.append(1)
    return jql.apply(model, v, x, activation_rules=[(r".*", PER_TOKEN)])

  first = run(qvariables, x)
  second = run(qvariables, x + 1.0)
  assert len(traces) == 1
  assert first.shape == second.shape == (4, 8)


def test_intercept_context_with_the_users_own_apply():
  model, variables, x = _mlp()
  qvariables = jq.quantize_tree(variables, INT8_KERNELS)
  with jql.intercept([(r".*", PER_TOKEN)]):
    inside = jax.jit(model.apply)(qvariables, x)
  _close(inside, jql.apply(model, qvariables, x, activation_rules=[(r".*", PER_TOKEN)]), 1e-6)


STATIC = jql.ActivationQuant("int8", "static")


def test_calibration_stores_observer_stats_and_static_path():
  model, variables, x = _mlp()
  qvariables = jq.quantize_tree(variables, INT8_KERNELS)
  rules = [(r"Dense_0", STATIC), (r"Dense_1", jql.ActivationQuant(
      "int8", "static", observer=jql.Observer("percentile:99", average="max")))]
  calibrated = jql.calibrate(model, qvariables, [x, 2.0 * x], activation_rules=rules)
  stats = calibrated["quant_stats"]
  assert set(stats) == {"Dense_0", "Dense_1"}
  amax = float(jnp.max(jnp.abs(x)))
  np.testing.assert_allclose(stats["Dense_0"]["input_amax"], 0.9 * amax + 0.1 * 2 * amax,
                             rtol=1e-6)
  assert int(stats["Dense_0"]["input_count"]) == 2
  assert stats["Dense_0"]["input_amax"].dtype == jnp.float32
  assert stats["Dense_1"]["input_amax"] > 0

  run = jax.jit(lambda v, x: jql.apply(model, v, x, activation_rules=rules))
  assert _int_dots(run, calibrated, x) == 2
  out = run(calibrated, x)
  _close(out, model.apply(variables, x), 0.05)
  # Layer 0's static scale: the calibrated range over 127.
  spec_scale = stats["Dense_0"]["input_amax"] / 127.0
  codes = jnp.clip(jnp.round(x / spec_scale), -127, 127)
  layer0 = jql.quantize_static(x, jq.get_format("int8"), stats["Dense_0"]["input_amax"])
  np.testing.assert_array_equal(layer0.codes, codes.astype(jnp.int8))


def test_static_rule_without_calibration_is_a_clear_error():
  model, variables, x = _mlp()
  with pytest.raises(ValueError, match="Dense_0.*calibrate"):
    jql.apply(model, variables, x, activation_rules=[(r".*", STATIC)])


def test_observers():
  x = jnp.arange(1.0, 101.0)
  amax, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
  mean = jql.Observer("absmax", average="mean")
  amax, count = jql.observe(amax, count, x, mean)
  amax, count = jql.observe(amax, count, 3.0 * x, mean)
  np.testing.assert_allclose(amax, 200.0)
  assert int(count) == 2
  np.testing.assert_allclose(jql.batch_statistic(x, jql.Observer("percentile:50")), 50.5)
  with pytest.raises(ValueError, match="statistic"):
    jql.Observer("median")


class WithEmbed(nn.Module):

  @nn.compact
  def __call__(self, ids):
    return nn.Dense(4)(nn.Embed(10, 8)(ids))


def test_qarray_in_an_unsupported_layer_is_a_clear_error():
  model = WithEmbed()
  ids = jnp.arange(3)
  variables = model.init(jax.random.key(0), ids)
  qvariables = jq.quantize_tree(variables, [jq.Rule(r"params/.*", "int8")])
  with pytest.raises(TypeError, match=r"params/Embed_0/embedding is a QArray.*Embed"):
    jql.apply(model, qvariables, ids)
  # Keeping it float, as the message suggests, works.
  rules = [jq.Rule(r"params/Embed_0/embedding", None), jq.Rule(r"params/.*", "int8")]
  jql.apply(model, jq.quantize_tree(variables, rules), ids)


class MyDense(nn.Dense):
  """A subclass that keeps Dense's __call__ (supported)."""


class ScaledDense(nn.Dense):
  """A subclass with its own __call__ (not supported: its math is unknown)."""

  @nn.compact
  def __call__(self, x):
    return 2.0 * super().__call__(x)


def test_subclasses():
  x = jnp.ones((2, 5))
  for cls, ok in ((MyDense, True), (ScaledDense, False)):
    model = cls(3)
    variables = model.init(jax.random.key(0), x)
    qvariables = jq.quantize_tree(variables, INT8_KERNELS)
    assert isinstance(qvariables["params"]["kernel"], jq.QArray)
    if ok:
      _close(jql.apply(model, qvariables, x), model.apply(jq.dequantize_tree(qvariables), x),
             1e-6)
    else:
      with pytest.raises(TypeError, match="ScaledDense"):
        jql.apply(model, qvariables, x)


def test_library_model_attention_runs_w8a8_unmodified():
  """Flax's own attention (DenseGeneral projections), not written for jaxquant."""
  model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, out_features=8)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  variables = model.init(jax.random.key(1), x)
  qvariables = jq.quantize_tree(variables, INT8_KERNELS)
  run = lambda v, x: jql.apply(model, v, x, activation_rules=[(r".*", PER_TOKEN)])
  assert _int_dots(run, qvariables, x) == 4  # query, key, value, out
  _close(jax.jit(run)(qvariables, x), model.apply(variables, x), 0.05)


def test_activation_rule_values():
  rules = jql.as_activation_rules([jq.Rule("a", "int8"), ("b", jq.QuantSpec("int8")),
                                   ("c", PER_TOKEN), ("d", None)])
  assert rules[0][1].granularity == "spec" and rules[0][1].spec == jq.QuantSpec("int8")
  assert rules[2][1] is PER_TOKEN and rules[3][1] is None
  assert jql.activation_for("c", rules) is PER_TOKEN
  assert jql.activation_for("zzz", rules) is None
  with pytest.raises(TypeError, match="activation rule"):
    jql.as_activation_rules([("a", 3)])
  with pytest.raises(ValueError, match="granularity"):
    jql.ActivationQuant("int8", "per_row")


def test_sharded_w8a8_dense_stays_sharded_without_gathers():
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model, variables, x, _ = _setup("dense", jnp.float32)
  x = jnp.concatenate([x] * 4, axis=0)  # batch 8
  qvariables = jq.quantize_tree(variables, INT8_KERNELS)
  shard = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  kernel = qvariables["params"]["Dense_0"]["kernel"]
  kernel = jq.QArray(codes=jax.device_put(kernel.codes, shard(None, "model")),
                     scale=jax.device_put(kernel.scale, shard(None, "model")),
                     spec=kernel.spec, dtype=kernel.dtype)
  qvariables = {"params": {"Dense_0": {"kernel": kernel, "bias": jax.device_put(
      qvariables["params"]["Dense_0"]["bias"], shard("model"))}}}
  x_sharded = jax.device_put(x, shard("data", None, None))
  run = jax.jit(lambda v, x: jql.apply(model, v, x, activation_rules=[(r".*", PER_TOKEN)]))
  hlo = run.lower(qvariables, x_sharded).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  out = run(qvariables, x_sharded)
  assert out.sharding.is_equivalent_to(shard("data", None, "model"), 3)
  _close(out, run(jax.device_get(qvariables), x), 1e-6)


def test_blocks_along_the_output_axis_fall_back_to_dequantize():
  model, variables, x, contract = _setup("dense", jnp.float32)
  rules = [jq.Rule(r"params/(.*/)?kernel", jq.QuantSpec("int8", block_sizes={1: 4}))]
  qvariables = jq.quantize_tree(variables, rules)
  run = lambda v, x: jql.apply(model, v, x, activation_rules=[(r".*", PER_TOKEN)])
  assert _int_dots(run, qvariables, x) == 0
  x_fake = jq.fake_quant(x, _per_token_spec(x, contract))
  _close(run(qvariables, x), model.apply(jq.dequantize_tree(qvariables), x_fake), 1e-6)
