"""Tests for jaxquant.checkpoint: exact round trips without a target, and errors."""

import json
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant import checkpoint

SPECS = {
    "int8_per_channel": jq.QuantSpec("int8", channel_axes=(1,)),
    "int8_bf16_scale_percentile": jq.QuantSpec(
        "int8", channel_axes=(1,), calibration="percentile:99.9",
        scale_dtype=jnp.bfloat16, full_range=True),
    "int4_group128": jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 128}),
    "nf4_group64": jq.QuantSpec("nf4", channel_axes=(1,), block_sizes={0: 64}),
    "fp8_e4m3": jq.QuantSpec("fp8_e4m3", channel_axes=(1,)),
    "fp6_e2m3": jq.QuantSpec("fp6_e2m3", channel_axes=(1,), block_sizes={0: 32}),
    "ternary": jq.QuantSpec("ternary", channel_axes=(1,)),
    "binary": jq.QuantSpec("binary", channel_axes=(1,)),
    "uint4_asymmetric": jq.QuantSpec("uint4", channel_axes=(1,), symmetric=False),
    "int2_asymmetric_tensor": jq.QuantSpec("int2", symmetric=False),
    "mxfp4": jq.get_preset("mxfp4"),
    "nvfp4": jq.get_preset("nvfp4"),
}


class MLP(nn.Module):
  features: Sequence[int] = (128, 64)

  @nn.compact
  def __call__(self, x):
    for i, features in enumerate(self.features):
      x = nn.Dense(features)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


def _linen_params():
  return MLP().init(jax.random.key(0), jnp.ones((1, 256), jnp.float32))


def _bit_patterns(x) -> np.ndarray:
  x = np.asarray(x)
  return x.view(np.dtype(f"uint{8 * x.dtype.itemsize}"))


def _assert_arrays_identical(restored, original):
  assert isinstance(restored, jax.Array)
  assert restored.dtype == original.dtype
  assert restored.shape == original.shape
  np.testing.assert_array_equal(_bit_patterns(restored), _bit_patterns(original))


def _assert_qarrays_identical(restored, original):
  assert isinstance(restored, jq.QArray)
  assert restored.spec == original.spec
  assert restored.dtype == original.dtype
  _assert_arrays_identical(restored.codes, original.codes)
  _assert_arrays_identical(restored.scale, original.scale)
  for name in ("zero_point", "tensor_scale"):
    if getattr(original, name) is None:
      assert getattr(restored, name) is None
    else:
      _assert_arrays_identical(getattr(restored, name), getattr(original, name))
  _assert_arrays_identical(jq.dequantize(restored), jq.dequantize(original))


def _assert_trees_identical(restored, original):
  is_qarray = lambda x: isinstance(x, jq.QArray)
  assert jax.tree.structure(restored, is_leaf=is_qarray) == jax.tree.structure(
      original, is_leaf=is_qarray)
  for r, o in zip(jax.tree.leaves(restored, is_leaf=is_qarray),
                  jax.tree.leaves(original, is_leaf=is_qarray)):
    if is_qarray(o):
      _assert_qarrays_identical(r, o)
    else:
      _assert_arrays_identical(r, jnp.asarray(o))


@pytest.mark.parametrize("name", list(SPECS))
def test_linen_mlp_round_trip(tmp_path, name):
  params = _linen_params()
  qparams = jq.quantize_tree(params, [jq.Rule(r"params/Dense_\d+/kernel", SPECS[name])])
  checkpoint.save(tmp_path / "ckpt", qparams)
  restored = checkpoint.restore(tmp_path / "ckpt")

  kernel = restored["params"]["Dense_0"]["kernel"]
  assert kernel.codes.dtype == SPECS[name].format.code_dtype
  assert kernel.spec.format.name == SPECS[name].format.name
  _assert_trees_identical(restored, qparams)


def test_mixed_specs_and_bfloat16_leaves(tmp_path):
  params = _linen_params()
  params = {"params": {**params["params"], "Dense_1": jax.tree.map(
      lambda x: x.astype(jnp.bfloat16), params["params"]["Dense_1"])}}
  rules = [jq.Rule("params/Dense_0/kernel", SPECS["uint4_asymmetric"]),
           jq.Rule("params/Dense_1/kernel", SPECS["int4_group128"])]
  qparams = jq.quantize_tree(params, rules)
  checkpoint.save(str(tmp_path / "ckpt"), qparams)
  restored = checkpoint.restore(str(tmp_path / "ckpt"))

  _assert_trees_identical(restored, qparams)
  dense_1 = restored["params"]["Dense_1"]
  assert dense_1["bias"].dtype == jnp.bfloat16
  assert dense_1["kernel"].dtype == jnp.bfloat16
  assert jq.dequantize(dense_1["kernel"]).dtype == jnp.bfloat16


@pytest.mark.parametrize("fmt", ["int4", "int2", "uint4", "nf4", "fp6_e3m2", "fp4_e2m1",
                                 "binary", "ternary", "int3", "dynamic8"])
def test_sizes_not_a_multiple_of_the_packing_group(tmp_path, fmt):
  x = jax.random.normal(jax.random.key(1), (3, 5), jnp.float32)
  q = jq.quantize(x, jq.QuantSpec(fmt, channel_axes=(0,)))
  checkpoint.save(tmp_path / "ckpt", {"w": q})
  _assert_qarrays_identical(checkpoint.restore(tmp_path / "ckpt")["w"], q)


def test_plain_arrays_of_exotic_dtypes(tmp_path):
  values = jnp.linspace(-3.0, 3.0, 24, dtype=jnp.float32).reshape(4, 6)
  tree = {name: values.astype(dtype) for name, dtype in [
      ("bf16", jnp.bfloat16), ("f16", jnp.float16), ("fp8", jnp.float8_e4m3fn),
      ("fp8_e5m2", jnp.float8_e5m2), ("fp4", jnp.float4_e2m1fn), ("int4", jnp.int4),
      ("int2", jnp.int2), ("int8", jnp.int8), ("bool", jnp.bool_)]}
  tree["uint4"] = jnp.arange(24, dtype=jnp.uint8).reshape(4, 6).astype(jnp.uint4)
  tree["uint2"] = (jnp.arange(24, dtype=jnp.uint8) % 4).astype(jnp.uint2)
  tree["e8m0"] = jnp.exp2(values).astype(jnp.float8_e8m0fnu)
  tree["numpy"] = np.arange(5, dtype=np.int16)
  tree["scalar"] = jnp.float32(2.5)
  checkpoint.save(tmp_path / "ckpt", tree)
  _assert_trees_identical(checkpoint.restore(tmp_path / "ckpt"), tree)


class NNXModel(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.first = nnx.Linear(256, 128, rngs=rngs)
    self.second = nnx.Linear(128, 32, rngs=rngs)
    self.layers = nnx.Sequential(nnx.Linear(32, 32, rngs=rngs))

  def __call__(self, x):
    return self.layers(self.second(jax.nn.relu(self.first(x))))


def test_nnx_state_round_trip(tmp_path):
  model = NNXModel(nnx.Rngs(0))
  rules = [jq.Rule("first/kernel", SPECS["int4_group128"]),
           jq.Rule("second/kernel", SPECS["nvfp4"]),
           jq.Rule(r"layers/.*/kernel", SPECS["int8_per_channel"])]
  qstate = jq.quantize_tree(nnx.state(model), rules)
  nnx.update(model, jq.dequantize_tree(qstate))
  checkpoint.save(tmp_path / "ckpt", qstate)

  restored = checkpoint.restore(tmp_path / "ckpt")
  _assert_trees_identical(restored, nnx.to_pure_dict(qstate))
  other = NNXModel(nnx.Rngs(1))
  state = nnx.state(other)
  nnx.replace_by_pure_dict(state, restored)
  assert isinstance(state["first"]["kernel"].get_value(), jq.QArray)
  nnx.update(other, jq.dequantize_tree(state))

  x = jax.random.normal(jax.random.key(2), (4, 256), jnp.float32)
  np.testing.assert_array_equal(np.asarray(other(x)), np.asarray(model(x)))


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto,
                                       jax.sharding.AxisType.Explicit])
def test_sharded_leaves_round_trip(tmp_path, axis_type):
  mesh = jax.make_mesh((8,), ("model",), axis_types=(axis_type,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
  w = jax.random.normal(jax.random.key(3), (256, 64), jnp.float32)
  w = jax.device_put(w, sharding)
  tree = {"w": w, "q": jq.quantize(w, SPECS["int4_group128"])}
  checkpoint.save(tmp_path / "ckpt", tree)
  restored = checkpoint.restore(tmp_path / "ckpt")
  _assert_trees_identical(restored, tree)
  assert restored["w"].sharding.is_equivalent_to(sharding, 2)


def test_python_values_and_containers(tmp_path):
  tree = {"int": 3, "big": 2**70, "float": 0.1, "inf": float("inf"), "bool": True,
          "str": "hello", "none": None, 7: "int key",
          "nested": [1, (2.5, "x", [None, ()]), [], {}],
          "tuple": (jnp.arange(3, dtype=jnp.int32), {"k": "v"})}
  checkpoint.save(tmp_path / "ckpt", tree)
  restored = checkpoint.restore(tmp_path / "ckpt")

  array = restored["tuple"][0]
  np.testing.assert_array_equal(np.asarray(array), np.arange(3))
  assert isinstance(array, jax.Array) and array.dtype == jnp.int32
  restored["tuple"] = (None, restored["tuple"][1])
  tree["tuple"] = (None, tree["tuple"][1])
  assert restored == tree
  assert type(restored["nested"][1]) is tuple and type(restored["nested"][1][2]) is list
  assert type(restored["big"]) is int and type(restored["bool"]) is bool


def test_tree_without_arrays_and_overwrite(tmp_path):
  path = tmp_path / "ckpt"
  checkpoint.save(path, {"w": jnp.ones((2,), jnp.float32)})
  checkpoint.save(path, ["only", "values"], overwrite=True)
  assert checkpoint.restore(path) == ["only", "values"]
  assert not (path / checkpoint.ARRAYS_DIR).exists()
  checkpoint.save(path, {"w": jnp.zeros((3,), jnp.bfloat16)}, overwrite=True)
  _assert_arrays_identical(checkpoint.restore(path)["w"], jnp.zeros((3,), jnp.bfloat16))


def test_metadata_records_versions_and_specs(tmp_path):
  q = jq.quantize(jnp.ones((64, 8), jnp.float32), SPECS["mxfp4"])
  checkpoint.save(tmp_path / "ckpt", {"w": q})
  metadata = json.loads((tmp_path / "ckpt" / "jaxquant.json").read_text())
  assert metadata["format_version"] == checkpoint.FORMAT_VERSION == 1
  assert metadata["jaxquant_version"] == jq.__version__
  leaf = metadata["tree"]["items"][0][1]
  assert leaf["kind"] == "qarray"
  assert leaf["spec"]["format"] == "fp4_e2m1"
  assert leaf["spec"]["scale_dtype"] == "e8m0"
  assert leaf["codes"] == {"key": ["leaf_0", "codes"], "dtype": "float4_e2m1fn",
                           "shape": [64, 8], "packed_bits": 4}


def test_restore_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such directory") as info:
    checkpoint.restore(tmp_path / "missing")
  assert str(tmp_path / "missing") in str(info.value)


def test_restore_directory_without_metadata(tmp_path):
  (tmp_path / "other").mkdir()
  with pytest.raises(ValueError, match="is not a jaxquant checkpoint: it has no "
                     "jaxquant.json") as info:
    checkpoint.restore(tmp_path / "other")
  assert str(tmp_path / "other") in str(info.value)


def test_restore_other_format_version(tmp_path):
  path = tmp_path / "ckpt"
  checkpoint.save(path, {"w": jnp.ones((2,), jnp.float32)})
  metadata_path = path / "jaxquant.json"
  metadata = json.loads(metadata_path.read_text())
  metadata["format_version"] = 99
  metadata_path.write_text(json.dumps(metadata))
  with pytest.raises(ValueError, match=r"written by an incompatible version of "
                     r"jaxquant \(0\.1\.0\): checkpoint format version expected 1, "
                     r"found 99") as info:
    checkpoint.restore(path)
  assert str(path) in str(info.value)


def test_save_over_existing_path(tmp_path):
  path = tmp_path / "ckpt"
  checkpoint.save(path, {"w": jnp.ones((2,), jnp.float32)})
  with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
    checkpoint.save(path, {"w": jnp.zeros((2,), jnp.float32)})
  np.testing.assert_array_equal(np.asarray(checkpoint.restore(path)["w"]), np.ones(2))


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
  (tmp_path / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="is not a jaxquant checkpoint"):
    checkpoint.save(tmp_path, {"w": jnp.ones((2,), jnp.float32)}, overwrite=True)
  assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_unsupported_nodes_name_their_path(tmp_path):
  with pytest.raises(TypeError, match=r"cannot checkpoint the set at <root>/a/0"):
    checkpoint.save(tmp_path / "a", {"a": [{1, 2}]})
  with pytest.raises(TypeError, match=r"key \(1, 2\) \(tuple\) of the dict at <root>/b"):
    checkpoint.save(tmp_path / "b", {"b": {(1, 2): 3}})
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
