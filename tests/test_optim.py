"""8-bit (and 4-bit) optimizer states: exact maps, parity with optax, sizes, masks, jit,
sharding and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxquant as jq
from jaxquant.optim import state as state_lib


def _with_standard_promotion(fn):
  """optax's own code relies on standard dtype promotion; ours runs strict."""
  def wrapped(*args):
    with jax.numpy_dtype_promotion("standard"):
      return fn(*args)
  return wrapped


def _params():
  keys = jax.random.split(jax.random.key(0), 3)
  return {"dense": {"kernel": jax.random.normal(keys[0], (256, 512)),
                    "bias": jnp.zeros((512,))},
          "embed": jax.random.normal(keys[1], (1000, 64))}


def _grads(step, params):
  key = jax.random.fold_in(jax.random.key(1), step)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, p.shape)
                                      for k, p in zip(keys, leaves)])


def test_state_leaf_codes_are_the_nearest_dynamic_map_entries():
  value = jax.random.normal(jax.random.key(0), (64, 512)) ** 3
  quantizer = jq.optim.EIGHT_BIT
  q = state_lib.store(value.reshape(64, 2, 256), quantizer.zeros(value, signed=True))
  assert q.codes.dtype == jnp.uint8 and q.scale.shape == (64, 2)
  blocks = np.asarray(value).reshape(64, 2, 256)
  absmax = np.abs(blocks).max(axis=-1, keepdims=True)
  np.testing.assert_allclose(q.scale.reshape(64, 2, 1), absmax, rtol=1e-7)
  table = jq.get_format("dynamic8").values
  normalized = (blocks / absmax).reshape(-1)
  nearest = np.abs(normalized[:, None] - table[None, :]).min(axis=1)
  codes = np.asarray(q.codes).reshape(-1).astype(np.int64)
  chosen = np.abs(normalized - table[codes])
  np.testing.assert_allclose(chosen, nearest, atol=1e-7)


def test_block_placement():
  assert state_lib.block_axis((256, 512), 256) == (1, 256)
  assert state_lib.block_axis((512, 100), 256) == (0, 256)
  assert state_lib.block_axis((96, 100), 256) == (0, 32)
  assert state_lib.block_axis((7, 9), 256) is None


def test_state_sizes_dtypes_and_memory_ratio():
  params = _params()
  state = jq.optim.adamw_8bit(1e-3).init(params)[0]
  assert isinstance(state.mu["dense"]["kernel"], jq.QArray)
  assert state.mu["dense"]["kernel"].format.name == "dynamic8"
  assert state.nu["dense"]["kernel"].format.name == "udynamic8"
  assert state.mu["dense"]["bias"].dtype == jnp.float32  # 512 < 4096 elements
  # Sizes from shapes alone (jax.eval_shape): no 16M-element state is built.
  big = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
  ours = jax.eval_shape(jq.optim.adamw_8bit(1e-3).init, big)
  reference = jax.eval_shape(optax.adamw(1e-3).init, big)
  nbytes = lambda tree: sum(
      x.nbytes if isinstance(x, jq.QArray) else x.size * x.dtype.itemsize
      for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jq.QArray)))
  assert nbytes(reference) >= 2 * 4096 * 4096 * 4
  assert nbytes(ours) / nbytes(reference) <= 0.26
  four = jax.eval_shape(jq.optim.adamw_4bit(1e-3).init, big)
  assert nbytes(four) / nbytes(reference) <= 0.14


@pytest.mark.parametrize("make", [  # lion and sgd run the same `state.step`
    lambda: jq.optim.adamw_8bit(1e-3), lambda: jq.optim.adamw_4bit(1e-3),
    lambda: jq.optim.ademamix_8bit(1e-3)], ids=["adamw_8bit", "adamw_4bit", "ademamix_8bit"])
def test_a_step_stores_no_float32_moment(make):
  # The compiled step's scratch stays within 1.5x the quantized state (at most a
  # copy of the old codes); one float32 moment alone would be 4x the 8-bit state.
  optimizer = make()
  params = {"w": jnp.ones((512, 256)), "v": jnp.ones((96, 64, 3))}

  def train_step(params, state, grads):
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  with jax.numpy_dtype_promotion("standard"):
    state = optimizer.init(params)
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        params, state, params).compile()
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert compiled.memory_analysis().temp_size_in_bytes <= 1.5 * state_bytes


def test_step_lowers_for_gpu_and_tpu():
  optimizer = jq.optim.adamw_8bit(1e-3)
  params = {"w": jnp.ones((512, 256))}

  def train_step(params, state, grads):
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  with jax.numpy_dtype_promotion("standard"):
    state = optimizer.init(params)
    exported = jax.export.export(jax.jit(train_step), platforms=["cuda", "tpu"])(
        params, state, params)
  assert exported.platforms == ("cuda", "tpu")
  assert "custom_call" not in exported.mlir_module()  # plain XLA ops only


@pytest.mark.parametrize("name", ["adamw", "adam", "lion", "sgd", "adamw_4bit", "ademamix"])
def test_matches_the_optax_twin_within_quantization_error(name):
  ours, reference, tolerance = {
      "adamw": (jq.optim.adamw_8bit(1e-3), optax.adamw(1e-3), 0.05),
      "adam": (jq.optim.adam_8bit(1e-3, nesterov=True), optax.adam(1e-3, nesterov=True), 0.05),
      "lion": (jq.optim.lion_8bit(1e-3), optax.lion(1e-3), 0.05),
      "sgd": (jq.optim.sgd_8bit(1e-2, momentum=0.9), optax.sgd(1e-2, momentum=0.9), 0.05),
      "adamw_4bit": (jq.optim.adamw_4bit(1e-3), optax.adamw(1e-3), 0.3),
      "ademamix": (jq.optim.ademamix_8bit(1e-3, weight_decay=1e-2),
                   optax.contrib.ademamix(1e-3, weight_decay=1e-2), 0.05),
  }[name]
  params = _params()
  step_ours = jax.jit(ours.update)
  step_ref = _with_standard_promotion(jax.jit(reference.update))
  state_ours, state_ref = ours.init(params), reference.init(params)
  for step in range(10):
    grads = _grads(step, params)
    u_ours, state_ours = step_ours(grads, state_ours, params)
    u_ref, state_ref = step_ref(grads, state_ref, params)
    if step == 0:  # first step: state was zeros, so both agree almost exactly
      for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref)):
        np.testing.assert_allclose(a, b, atol=1e-3 * float(jnp.abs(b).max()))
  for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref)):
    mean_error = float(jnp.mean(jnp.abs(a - b)) / jnp.mean(jnp.abs(b)))
    assert mean_error < tolerance, name
  assert step_ours._cache_size() == 1


def _b3_schedule(count):
  return 0.99 + 0.001 * count.astype(jnp.float32)


def _dequantized(tree):
  return jax.tree.map(lambda x: jq.dequantize(x) if isinstance(x, jq.QArray) else x, tree,
                      is_leaf=lambda x: isinstance(x, jq.QArray))


@pytest.mark.parametrize("name", ["adamw", "nadam", "lion", "sgd", "ademamix"])
def test_one_step_equals_optax_from_the_dequantized_state(name):
  """From any state, a step is optax's step from the dequantized state, requantized."""
  ours, reference = {
      "adamw": (jq.optim.adamw_8bit(1e-3), optax.adamw(1e-3)),
      "nadam": (jq.optim.adam_8bit(1e-3, nesterov=True), optax.adam(1e-3, nesterov=True)),
      "lion": (jq.optim.lion_8bit(1e-3), optax.lion(1e-3)),
      "sgd": (jq.optim.sgd_8bit(1e-2, momentum=0.9), optax.sgd(1e-2, momentum=0.9)),
      "ademamix": (jq.optim.ademamix_8bit(1e-3, b3=_b3_schedule, alpha=4.0),
                   optax.contrib.ademamix(1e-3, b3=_b3_schedule, alpha=4.0)),
  }[name]
  params = _params()
  state = ours.init(params)
  for step in range(3):
    _, state = jax.jit(ours.update)(_grads(step, params), state, params)
  # The optax state with the same values, dequantized (same NamedTuple fields).
  ref_state = reference.init(params)
  ref_state = jax.tree.unflatten(jax.tree.structure(ref_state),
                                 jax.tree.leaves(_dequantized(state)))
  grads = _grads(3, params)
  u_ours, next_ours = jax.jit(ours.update)(grads, state, params)
  u_ref, next_ref = _with_standard_promotion(jax.jit(reference.update))(grads, ref_state, params)
  for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7 * float(jnp.abs(b).max()))
  # The new state is the optax state, quantized with the same specs.
  quantized = jax.tree.map(
      lambda old, new: jq.quantize(new, old.spec) if isinstance(old, jq.QArray) else new,
      state, jax.tree.unflatten(jax.tree.structure(state, is_leaf=lambda x: isinstance(x, jq.QArray)),
                                jax.tree.leaves(next_ref)),
      is_leaf=lambda x: isinstance(x, jq.QArray))
  for a, b in zip(jax.tree.leaves(_dequantized(next_ours)), jax.tree.leaves(_dequantized(quantized))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


def test_masking_keeps_embeddings_in_float32_state():
  params = _params()
  labels = {"dense": {"kernel": "8bit", "bias": "8bit"}, "embed": "float"}
  optimizer = optax.partition({"8bit": jq.optim.adamw_8bit(1e-3),
                               "float": optax.adamw(1e-3)}, labels)
  state = optimizer.init(params)
  update = _with_standard_promotion(jax.jit(optimizer.update))
  updates, state = update(_grads(0, params), state, params)
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, jq.QArray))
  quantized = [x for x in leaves if isinstance(x, jq.QArray)]
  assert len(quantized) == 2  # mu and nu of the dense kernel only
  assert updates["embed"].shape == (1000, 64)


def test_state_is_sharded_like_its_param():
  mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = NamedSharding(mesh, P(None, "model"))
  params = {"w": jax.device_put(jnp.ones((512, 2048)), sharding)}
  optimizer = jq.optim.adamw_8bit(1e-3)
  state = jax.jit(optimizer.init)(params)
  grads = {"w": jax.device_put(jnp.full((512, 2048), 0.1), sharding)}
  step = jax.jit(optimizer.update)
  hlo = step.lower(grads, state, params).compile().as_text()
  assert "all-gather" not in hlo
  _, state = step(grads, state, params)
  mu = state[0].mu["w"]
  assert mu.codes.sharding.is_equivalent_to(sharding, 2)


def test_checkpoint_round_trip_resumes_bit_identically(tmp_path):
  params = _params()
  optimizer = jq.optim.adamw_8bit(1e-3)
  step = jax.jit(optimizer.update)
  state = optimizer.init(params)
  for i in range(3):
    _, state = step(_grads(i, params), state, params)
  jq.checkpoint.save(tmp_path / "opt", {"params": params, "opt_state": state})
  restored = jq.checkpoint.restore(tmp_path / "opt")["opt_state"]
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  u_a, state_a = step(_grads(3, params), state, params)
  u_b, state_b = step(_grads(3, params), restored, params)
  for a, b in zip(jax.tree.leaves((u_a, state_a)), jax.tree.leaves((u_b, state_b))):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                  np.asarray(b.astype(jnp.float32)))


def test_bad_quantizer_settings():
  with pytest.raises(ValueError, match="power of two"):
    jq.optim.adamw_8bit(1e-3, block_size=100)


@pytest.mark.parametrize("quantizer", [jq.optim.EIGHT_BIT, jq.optim.FOUR_BIT])
@pytest.mark.parametrize("shape", [(512, 96), (8, 1024), (96, 64, 3)])
def test_store_in_the_blocked_view_equals_quantize(quantizer, shape):
  value = jax.random.normal(jax.random.key(2), shape) ** 3
  value = value.at[0].set(0.0)  # a block of zeros keeps scale 0
  for signed in (True, False):
    v = value if signed else value * value
    previous = quantizer.zeros(v, signed=signed)
    stored = state_lib.store(state_lib.view(v, previous), previous)
    expected = jq.quantize(v, previous.spec)
    np.testing.assert_array_equal(stored.codes, expected.codes)
    np.testing.assert_array_equal(stored.scale, expected.scale)
    np.testing.assert_array_equal(state_lib.load(stored).reshape(shape),
                                  jq.dequantize(expected))
