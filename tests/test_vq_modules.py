"""jaxquant.vq modules (NNX) and their Linen twins, and jq.vq.fsq's kernel path."""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxquant as jq
from jaxquant import vq
from jaxquant.vq import linen as vql


# Test data and checks are numpy: every eager jax op would be one more compilation.


def normal(seed, shape, scale=1.0):
  return np.random.default_rng(seed).standard_normal(shape, np.float32) * np.float32(scale)


def clustered(seed, n, dim, num_clusters=4, spread=0.1):
  """float32[n, dim]: points around `num_clusters` well-separated centres."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_clusters, dim), np.float32) * np.float32(3.0)
  noise = rng.standard_normal((n, dim), np.float32) * np.float32(spread)
  return centres[rng.integers(0, num_clusters, n)] + noise


@nnx.jit(static_argnums=2)
def run_module(model, z, train):
  """``model(z, train=train)``, one compilation per configuration and shape."""
  return model(z, train=train)


def mean_square(x):
  return float(np.mean(np.square(np.asarray(x, np.float64))))


def assert_equal(got, want):
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def pure_state(model, kind=vq.CodebookState):
  return nnx.to_pure_dict(nnx.state(model, kind))


def state_dict(model, kind=vq.CodebookState):
  return jax.tree.map(np.asarray, pure_state(model, kind))


def linen_variables(model):
  """The Linen twin's variables holding the NNX model's parameters and state."""
  def rename(tree):
    if not isinstance(tree, dict):
      return tree
    out = {}
    for k, v in tree.items():
      if k == "stages":
        out.update({f"stages_{i}": rename(s) for i, s in v.items()})
      else:
        out[k] = rename(v)
    return out
  variables = {"params": rename(pure_state(model, nnx.Param)),
               "vq_stats": rename(pure_state(model))}
  return {k: v for k, v in variables.items() if v}


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return jax.make_mesh((8,), ("data",))


def test_public_names():
  names = ["VQOutput", "CodebookState", "FSQ", "ResidualFSQ", "VectorQuantizer",
           "ResidualVQ", "LFQ", "BSQ"]
  assert [n for n in names if not hasattr(jq.vq, n)] == []
  assert [n for n in names[2:] if not hasattr(vql, n)] == []
  assert jq.vq.linen is vql


# ----------------------------------------------------------------------------
# jq.vq.fsq on the Pallas kernel (interpret mode on CPU).


@pytest.mark.parametrize("levels, dtype", [((8, 6, 5), jnp.float32),
                                           ((8, 5, 5, 5), jnp.bfloat16)])
def test_fsq_kernel_path_equals_xla_with_straight_through_gradient(levels, dtype):
  z = jnp.asarray(normal(len(levels), (3, 40, len(levels)), 2.0), dtype)
  c = normal(9, z.shape)

  @jax.jit
  def run(z, c):
    outs = []
    for kw in (dict(), dict(impl="pallas", interpret=True)):
      zhat, idx = vq.fsq(z, levels, **kw)
      grad = jax.grad(lambda z: jnp.sum(vq.fsq(z, levels, **kw)[0].astype(jnp.float32) * c))(z)
      outs.append((zhat, idx, grad))
    return outs

  (want_zhat, want_idx, want_grad), (zhat, idx, grad) = run(z, c)
  assert zhat.dtype == dtype and idx.dtype == jnp.int32
  assert_equal(zhat, want_zhat)
  assert_equal(idx, want_idx)
  assert_equal(grad, want_grad)
  assert np.count_nonzero(np.asarray(grad, np.float32)) > grad.size // 2


def test_fsq_auto_lowers_to_the_kernel_for_tpu():
  z = normal(8, (16, 3), 2.0)
  grad = jax.value_and_grad(lambda z: jnp.sum(vq.fsq(z, (8, 6, 5), impl="auto")[0]))
  exported = jax.export.export(jax.jit(grad), platforms=["tpu"])(z)
  assert "tpu_custom_call" in exported.mlir_module()  # lowering only: not run on a TPU


@pytest.mark.parametrize("platform,own", [("tpu", "tpu_custom_call"),
                                          ("cuda", "__gpu$xla.gpu.triton")])
def test_vector_quantizer_step_lowers_to_the_nearest_code_kernel(platform, own):
  quantizer = vq.VectorQuantizer(64, 16, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(quantizer)
  z = normal(9, (4, 32, 16))

  def step(state, z):
    out = nnx.merge(graphdef, state)(z, train=True)
    return jax.grad(lambda z: jnp.sum(nnx.merge(graphdef, state)(z).quantized))(z), out

  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = jax.export.export(jax.jit(step), platforms=[platform],
                               disabled_checks=checks)(state, z)
  assert own in exported.mlir_module()  # lowering only: not run on a device


def test_fsq_auto_is_the_xla_path_on_cpu_or_where_the_kernel_does_not_apply():
  z = normal(8, (16, 3), 2.0)
  run = jax.jit(lambda z: [(vq.fsq(z, (8, 6, 5), bound=b, impl="auto"),
                            vq.fsq(z, (8, 6, 5), bound=b)) for b in ("reference", "atanh")])
  for auto, xla in run(z):
    assert_equal(auto[0], xla[0])
    assert_equal(auto[1], xla[1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(impl="triton"), "impl='triton'"),
    (dict(impl="pallas", bound="symmetric", interpret=True), "bound='symmetric'"),
    (dict(impl="pallas"), "interpret=True"),
])
def test_fsq_impl_rejects_bad_choices(kwargs, match):
  with pytest.raises(ValueError, match=match):
    vq.fsq(np.zeros((2, 3), np.float32), (8, 6, 5), **kwargs)


# ----------------------------------------------------------------------------
# FSQ modules.


def test_fsq_module_equals_fsq():
  levels = (8, 5, 5, 5)
  z = jnp.asarray(normal(1, (2, 16, 4), 2.0), jnp.bfloat16)
  modules = vq.FSQ(levels, bound="symmetric"), vql.FSQ(levels, bound="symmetric")

  @jax.jit
  def run(z):
    outs = modules[0](z), modules[1].apply({}, z, train=True)
    codes = [m.indices_to_codes(o.indices) for m, o in zip(modules, outs)]
    return vq.fsq(z, levels, bound="symmetric"), outs, codes

  (want_zhat, want_idx), outs, codes = run(z)
  for module, out, code in zip(modules, outs, codes):
    assert_equal(out.quantized, want_zhat)
    assert_equal(out.indices, want_idx)
    assert out.quantized.dtype == jnp.bfloat16 and out.loss.dtype == jnp.float32
    assert float(out.loss) == 0.0
    assert module.codebook_size == 1000
    assert code.dtype == jnp.float32
    assert_equal(np.asarray(code).astype(jnp.bfloat16), out.quantized)


def test_residual_fsq_module_and_quantizer_dropout():
  levels, stages = (8, 5, 5), 3
  z = normal(2, (64, 3), 2.0)
  model = vq.ResidualFSQ(levels, stages, quantizer_dropout=1.0, rngs=nnx.Rngs(0))
  full_zhat, full_idx = vq.residual_fsq(z, levels, stages)
  out = run_module(model, z, False)  # evaluation: every stage
  assert_equal(out.quantized, full_zhat)
  assert_equal(out.indices, full_idx)
  to_codes = jax.jit(model.indices_to_codes)
  np.testing.assert_allclose(np.asarray(to_codes(out.indices)), np.asarray(full_zhat),
                             atol=1e-6)
  seen = set()
  for _ in range(8):
    out = run_module(model, z, True)
    idx = np.asarray(out.indices)
    active = int((idx[0] >= 0).sum())
    seen.add(active)
    # The first stages are those of the full run; the others are dropped.
    assert_equal(idx[:, :active], np.asarray(full_idx)[:, :active])
    assert np.all(idx[:, active:] == -1)
    np.testing.assert_allclose(np.asarray(out.quantized), np.asarray(to_codes(out.indices)),
                               atol=1e-6)
  assert seen == {1, 2, 3}


# ----------------------------------------------------------------------------
# VectorQuantizer.


@pytest.mark.parametrize("metric, ema_decay, gradient", [("l2", 0.9, "ste"),
                                                         ("cosine", None, "rotation")])
def test_vector_quantizer_and_twin_equal_vector_quantize(metric, ema_decay, gradient):
  z = normal(3, (2, 24, 6))
  kwargs = dict(metric=metric, ema_decay=ema_decay, gradient=gradient)
  model = vq.VectorQuantizer(16, 6, rngs=nnx.Rngs(1), **kwargs)
  twin = vql.VectorQuantizer(16, 6, **kwargs)

  @nnx.jit
  def run(model, z):
    pure = vq.vector_quantize(z, model.codebook, metric=metric, gradient=gradient)
    out = model(z)
    return out, pure, model.indices_to_codes(out.indices), twin.apply(linen_variables(model), z)

  out, (zq, idx, losses), codes, twin_out = run(model, z)
  assert_equal(out.quantized, zq)
  assert_equal(out.indices, idx)
  want_loss = losses["commitment"] + (losses["codebook"] if ema_decay is None else 0.0)
  np.testing.assert_allclose(float(out.loss), float(want_loss), rtol=1e-6)
  assert out.indices.dtype == jnp.int32 and out.loss.shape == ()
  assert_equal(codes, zq)
  assert isinstance(model.embedding, nnx.Param) == (ema_decay is None)
  for a, b in zip(twin_out, out):
    assert_equal(a, b)


class Autoencoder(nnx.Module):
  def __init__(self, rngs):
    self.encoder = nnx.Linear(5, 6, rngs=rngs)
    self.vq = vq.VectorQuantizer(16, 6, ema_decay=0.9, rngs=rngs)
    self.decoder = nnx.Linear(6, 5, rngs=rngs)

  def __call__(self, x, train):
    out = self.vq(self.encoder(x), train=train)
    return jnp.mean(jnp.square(self.decoder(out.quantized) - x)) + out.loss


def test_nnx_training_step_leaves_codebook_to_ema():
  model = Autoencoder(nnx.Rngs(3))
  x = normal(5, (48, 5))
  params, stats = state_dict(model, nnx.Param), state_dict(model.vq)
  assert "vq" not in params  # the EMA codebook is CodebookState, not a Param
  with jax.numpy_dtype_promotion("standard"):
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x):
      encoded = model.encoder(x)
      grads = nnx.grad(lambda m: m(x, train=True))(model)
      optimizer.update(model, grads)
      return encoded

    encoded = train_step(model, optimizer, x)
  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_leaves_with_path(pure_state(optimizer, nnx.Variable))]
  assert any("encoder" in p for p in paths) and not any("vq" in p for p in paths)
  # Adam moved every parameter; the codebook moved by the EMA step alone.
  for old, new in zip(jax.tree.leaves(params), jax.tree.leaves(state_dict(model, nnx.Param))):
    assert not np.allclose(old, new)
  start = vq.EMACodebookState(stats["cluster_size"], stats["embed_sum"], stats["embedding"])
  want = jax.jit(lambda s, z: vq.ema_update(s, z, vq.nearest_code_xla(z, s.codebook),
                                            decay=0.9))(start, encoded)
  np.testing.assert_allclose(np.asarray(model.vq.codebook), want.codebook, rtol=1e-5,
                             atol=1e-6)


def test_kmeans_once_then_ema_and_nothing_changes_without_train():
  model = vq.VectorQuantizer(16, 6, ema_decay=0.8, epsilon=1e-3, kmeans_init=True,
                             rngs=nnx.Rngs(4))
  z1 = clustered(10, 48, 6, spread=0.05)
  before = state_dict(model)
  random_error = mean_square(run_module(model, z1, False).quantized - z1)
  jax.tree.map(np.testing.assert_array_equal, state_dict(model), before)
  assert not bool(model.initialized.get_value())
  out = run_module(model, z1, True)
  assert bool(model.initialized.get_value())
  # The first batch was quantized by a k-means codebook: each code used is the
  # mean of the vectors it quantized (Lloyd's fixed point).
  idx, zq, rows = np.asarray(out.indices), np.asarray(out.quantized), np.asarray(z1)
  for k in np.unique(idx):
    np.testing.assert_allclose(zq[idx == k][0], rows[idx == k].mean(0), atol=1e-5)
  assert mean_square(out.quantized - z1) < 0.1 * random_error
  # Later batches, even far away ones, only move the codebook by EMA steps.
  reference = jax.jit(lambda s, z: (vq.nearest_code_xla(z, s.codebook), vq.ema_update(
      s, z, vq.nearest_code_xla(z, s.codebook), decay=0.8, eps=1e-3)))
  for seed in (20, 21):
    stats = state_dict(model)
    z = clustered(seed, 48, 6) + 50.0
    out = run_module(model, z, True)
    start = vq.EMACodebookState(stats["cluster_size"], stats["embed_sum"],
                                stats["embedding"])
    indices, want = reference(start, z)
    assert_equal(out.indices, indices)
    after = state_dict(model)
    np.testing.assert_allclose(after["cluster_size"], want.cluster_size, rtol=1e-6)
    np.testing.assert_allclose(after["embed_sum"], want.embed_sum, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(after["embedding"], want.codebook, rtol=1e-6, atol=1e-5)
    assert not np.allclose(after["embedding"], stats["embedding"])


def test_dead_codes_are_replaced_with_statistics_reset():
  def far_init(key, shape, dtype):  # code 0 at the origin, the rest far away
    del key
    codebook = normal(60, shape) + np.float32(100.0)
    codebook[0] = 0.0
    return jnp.asarray(codebook, dtype)

  z = normal(6, (48, 6))
  model = vq.VectorQuantizer(16, 6, ema_decay=0.5, dead_code_threshold=0.9,
                             codebook_init=far_init, rngs=nnx.Rngs(5))
  before = state_dict(model)
  out = run_module(model, z, True)
  assert np.all(np.asarray(out.indices) == 0)  # every vector chose code 0
  after = state_dict(model)
  want = vq.ema_update(vq.EMACodebookState(before["cluster_size"], before["embed_sum"],
                                           before["embedding"]), z, out.indices, decay=0.5)
  np.testing.assert_allclose(after["embedding"][0], want.codebook[0], rtol=1e-6)
  rows = np.asarray(z)
  for k in range(1, 16):  # cluster size 0.5 < 0.9: replaced by vectors of the batch
    assert np.any(np.all(rows == after["embedding"][k], axis=-1))
    assert after["cluster_size"][k] == np.float32(0.9)
    np.testing.assert_allclose(after["embed_sum"][k], after["embedding"][k] * np.float32(0.9))
  assert after["cluster_size"][0] > 0.9
  assert mean_square(run_module(model, z, False).quantized - z) < 0.7 * mean_square(z)


def test_factorized_codes_shapes_and_lookup():
  z = normal(7, (2, 10, 12))
  model = vq.VectorQuantizer(16, 12, codebook_dim=4, rngs=nnx.Rngs(6))

  @nnx.jit
  def run(model, z):
    out = model(z)
    nearest = vq.nearest_code_xla(model.project_in(z), model.codebook)
    return out, model.indices_to_codes(out.indices), nearest

  out, codes, nearest = run(model, z)
  assert model.codebook.shape == (16, 4) and model.project_in.kernel.shape == (12, 4)
  assert out.quantized.shape == (2, 10, 12) and out.indices.shape == (2, 10)
  assert_equal(out.indices, nearest)
  np.testing.assert_allclose(np.asarray(codes), np.asarray(out.quantized), rtol=1e-6,
                             atol=1e-6)


def test_straight_through_gradient_reaches_the_encoder():
  x = normal(8, (48, 5))
  w = normal(9, (5, 6))
  c = normal(10, (48, 6))
  model = vq.VectorQuantizer(16, 6, commitment_weight=0.3, rngs=nnx.Rngs(8))

  @nnx.jit
  def run(model, w):
    def loss_fn(w):
      out = model(x @ w)
      return jnp.sum(c * out.quantized) + out.loss
    return jax.grad(loss_fn)(w), model(x @ w).indices

  grad, indices = run(model, w)
  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  q = np.asarray(model.codebook, np.float64)[np.asarray(indices)]
  # d/dz [sum(c * zq) + 0.3 * mean((z - sg(q))^2)] = c + 0.6 (z - q) / z.size
  want = np.asarray(x, np.float64).T @ (np.asarray(c, np.float64) + 0.6 * (z - q) / z.size)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# ResidualVQ.


def test_residual_vq_module_equals_residual_vq_and_drops_stages():
  z = normal(11, (48, 6))
  model = vq.ResidualVQ(3, 16, 6, quantizer_dropout=1.0, ema_decay=0.9, rngs=nnx.Rngs(9))
  reference = jax.jit(lambda z, cbs, k: vq.residual_vq(z, cbs, num_active=k))
  seen = set()
  for train in (False,) + (True,) * 6:
    codebooks = np.stack([s.codebook for s in model.stages])
    out = run_module(model, z, train)
    active = int((np.asarray(out.indices)[0] >= 0).sum())
    seen.add(active)
    zq, idx, losses = reference(z, codebooks, np.int32(active))
    assert_equal(out.quantized, zq)
    assert_equal(out.indices, idx)
    np.testing.assert_allclose(float(out.loss), np.sum(np.asarray(losses["commitment"])),
                               rtol=1e-6)
    for s, stage in enumerate(model.stages):  # only active stages learn
      unchanged = np.array_equal(np.asarray(stage.codebook), np.asarray(codebooks[s]))
      assert unchanged == (not train or s >= active)
  assert seen == {1, 2, 3}


# ----------------------------------------------------------------------------
# LFQ and BSQ.


@pytest.mark.parametrize("spherical", [False, True])
def test_binary_modules_equal_the_functions(spherical):
  z = normal(12, (4, 16, 6))
  kwargs = dict(entropy_weight=0.2, commitment_weight=0.5, diversity_gamma=0.7,
                temperature=0.05, group_size=3)
  model = (vq.BSQ if spherical else vq.LFQ)(6, **kwargs)
  twin = (vql.BSQ if spherical else vql.LFQ)(6, **kwargs)
  code_scale = 1 / math.sqrt(6) if spherical else 1.0

  @jax.jit
  def run(z, u):
    out = model(z)
    entropy = vq.lfq_entropy_loss(u, temperature=0.05, gamma=0.7, group_size=3,
                                  code_scale=code_scale)
    return (out, (vq.bsq if spherical else vq.lfq)(z), entropy,
            model.indices_to_codes(out.indices), twin.apply({}, z, train=True))

  u = np.asarray(z, np.float64)
  if spherical:
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
  out, (zq, idx), entropy, codes, twin_out = run(z, u.astype(np.float32))
  assert_equal(out.quantized, zq)
  assert_equal(out.indices, idx)
  commitment = np.mean((u - np.asarray(zq, np.float64)) ** 2)
  np.testing.assert_allclose(float(out.loss), 0.2 * float(entropy) + 0.5 * commitment,
                             rtol=1e-5)
  assert_equal(codes, zq)
  assert model.codebook_size == twin.codebook_size == 64
  for a, b in zip(twin_out, out):
    assert_equal(a, b)


# ----------------------------------------------------------------------------
# Linen twins.


TRAINING = dict(ema_decay=0.9, kmeans_init=True, kmeans_iters=2, dead_code_threshold=1.5)


def test_linen_vector_quantizer_is_a_twin_in_training():
  kwargs = TRAINING
  z = clustered(30, 48, 6)
  model = vq.VectorQuantizer(16, 6, rngs=nnx.Rngs(10), **kwargs)
  twin = vql.VectorQuantizer(16, 6, **kwargs)
  variables = linen_variables(model)
  shapes = jax.eval_shape(lambda: twin.init(jax.random.key(0), z))
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(lambda s: s.shape, shapes)
  apply = jax.jit(lambda v, z: twin.apply(v, z, train=True, mutable=["vq_stats"]))
  for seed in (31, 32):
    z = clustered(seed, 48, 6)
    twin_out, updates = apply(variables, z)
    out = run_module(model, z, True)
    for a, b in zip(twin_out, out):
      assert_equal(a, b)
    variables = {**variables, **updates}
    jax.tree.map(np.testing.assert_array_equal, variables, linen_variables(model))
  assert_equal(twin.bind(variables).codebook, model.codebook)


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_restart_keys_of_any_prng_implementation(impl):
  # The restart key is kept as raw key data; it must come back as a key of the
  # implementation it was drawn from (rbg data is uint32[4], threefry's [2]).
  z = clustered(33, 48, 6)
  model = vq.VectorQuantizer(16, 6, rngs=nnx.Rngs(jax.random.key(3, impl=impl)),
                             **TRAINING)
  assert model.key.get_value().shape == jax.random.key_data(
      jax.random.key(0, impl=impl)).shape
  out = run_module(model, z, True)
  assert bool(model.initialized.get_value())
  assert mean_square(out.quantized - z) < 0.5 * mean_square(z)
  twin = vql.VectorQuantizer(16, 6, **TRAINING)
  variables = twin.init(jax.random.key(3, impl=impl), z)
  _, updates = twin.apply(variables, z, train=True, mutable=["vq_stats"])
  assert bool(updates["vq_stats"]["initialized"])


def test_linen_residual_twins():
  z = normal(13, (2, 12, 6))
  model = vq.ResidualVQ(2, 8, 6, codebook_dim=3, ema_decay=0.9, rngs=nnx.Rngs(11))
  twin = vql.ResidualVQ(2, 8, 6, codebook_dim=3, ema_decay=0.9)
  variables = linen_variables(model)
  shapes = jax.eval_shape(lambda: twin.init(jax.random.key(0), z))
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(lambda s: s.shape, shapes)

  @jax.jit
  def linen_steps(variables, z):
    eval_out, same = twin.apply(variables, z, mutable=["vq_stats"])
    codes = twin.apply(variables, eval_out.indices, method=vql.ResidualVQ.indices_to_codes)
    return eval_out, same, codes, twin.apply(variables, z, train=True, mutable=["vq_stats"])

  eval_out, same, codes, (twin_out, updates) = linen_steps(variables, z)
  np.testing.assert_allclose(np.asarray(codes), np.asarray(eval_out.quantized), rtol=1e-5,
                             atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, same["vq_stats"], variables["vq_stats"])
  out = run_module(model, z, True)
  assert out.quantized.shape == (2, 12, 6) and out.indices.shape == (2, 12, 2)
  assert [s.codebook.shape for s in model.stages] == [(8, 3)] * 2
  for a, b, c in zip(twin_out, out, eval_out):
    assert_equal(a, b)
    assert_equal(a, c)  # the outputs use the codebooks from before the update
  jax.tree.map(np.testing.assert_array_equal, updates["vq_stats"],
               linen_variables(model)["vq_stats"])
  assert not np.array_equal(updates["vq_stats"]["stages_1"]["embedding"],
                            variables["vq_stats"]["stages_1"]["embedding"])
  # Quantizer dropout draws from the "dropout" stream.
  dropping = vql.ResidualFSQ((5, 5), 2, quantizer_dropout=1.0)
  run = jax.jit(lambda key: dropping.apply({}, z[..., :2], train=True, rngs={"dropout": key}))
  counts = {int((np.asarray(run(jax.random.key(i)).indices)[0, 0] >= 0).sum())
            for i in range(6)}
  assert counts == {1, 2}


# ----------------------------------------------------------------------------
# Data parallel.


def test_data_parallel_ema_equals_full_batch(mesh):
  kwargs = TRAINING
  full = vq.VectorQuantizer(16, 6, rngs=nnx.Rngs(12), **kwargs)
  graphdef, state = nnx.split(vq.VectorQuantizer(16, 6, axis_name="data",
                                                 rngs=nnx.Rngs(12), **kwargs))

  def step(state, z):
    model = nnx.merge(graphdef, state)
    out = model(z, train=True)
    return nnx.state(model), out.quantized, out.indices

  sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")),
                                  out_specs=(P(), P("data"), P("data"))))
  for seed in (40, 41):  # k-means on the first batch, EMA and restarts on both
    z = clustered(seed, 48, 6)
    state, quantized, indices = sharded(state, jax.device_put(z, NamedSharding(mesh, P("data"))))
    out = run_module(full, z, True)
    assert_equal(indices, out.indices)
    np.testing.assert_allclose(np.asarray(quantized), np.asarray(out.quantized), atol=1e-5)
    got = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 got, state_dict(full))
  assert np.any(got["cluster_size"] == np.float32(1.5))  # some codes were restarted


# ----------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize("make, match", [
    (lambda r: vq.VectorQuantizer(0, 4, rngs=r), "num_codes=0"),
    (lambda r: vq.VectorQuantizer(8, 4, metric="dot", rngs=r), "metric='dot'"),
    (lambda r: vq.VectorQuantizer(8, 4, gradient="gumbel", rngs=r), "gradient='gumbel'"),
    (lambda r: vq.VectorQuantizer(8, 4, ema_decay=1.0, rngs=r), "ema_decay=1.0"),
    (lambda r: vq.VectorQuantizer(8, 4, codebook_dim=0, rngs=r), "codebook_dim=0"),
    (lambda r: vq.VectorQuantizer(8, 4, kmeans_iters=-1, rngs=r), "kmeans_iters=-1"),
    (lambda r: vq.VectorQuantizer(8, 4, ema_decay=None, dead_code_threshold=1.0, rngs=r),
     "dead_code_threshold=1.0"),
    (lambda r: vq.ResidualVQ(0, 8, 4, rngs=r), "num_stages=0"),
    (lambda r: vq.ResidualVQ(2, 8, 4, quantizer_dropout=1.5, rngs=r), "quantizer_dropout=1.5"),
    (lambda r: vq.ResidualFSQ((8, 5), 2, quantizer_dropout=0.5), "needs rngs"),
    (lambda r: vq.ResidualFSQ((8, 5), 2, quantizer_dropout=0.5, rngs=nnx.Rngs(params=0)),
     "'dropout'"),
    (lambda r: vq.FSQ((8, 1)), "levels"),
    (lambda r: vq.FSQ((8, 5), bound="tan"), "bound='tan'"),
    (lambda r: vq.FSQ((8, 5), impl="cuda"), "impl='cuda'"),
    (lambda r: vq.LFQ(32), "num_bits=32"),
    (lambda r: vq.BSQ(8, temperature=0.0), "temperature=0.0"),
    (lambda r: vql.VectorQuantizer(8, 4, metric="dot"), "metric='dot'"),
    (lambda r: vql.ResidualVQ(2, 8, 4, quantizer_dropout=-0.1), "quantizer_dropout=-0.1"),
    (lambda r: vql.FSQ((8, 5), bound="tan"), "bound='tan'"),
    (lambda r: vql.LFQ(0), "num_bits=0"),
])
def test_bad_arguments_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make(nnx.Rngs(0))


def test_input_of_the_wrong_size_raises():
  z = np.zeros((2, 5), np.float32)
  for model, name in [(vq.VectorQuantizer(8, 4, rngs=nnx.Rngs(0)), "dim"),
                      (vq.ResidualVQ(2, 8, 4, rngs=nnx.Rngs(0)), "dim"),
                      (vq.BSQ(4), "num_bits"), (vql.LFQ(4), "num_bits")]:
    with pytest.raises(ValueError, match=f"z has shape \\(2, 5\\).*size {name}=4"):
      model(z) if isinstance(model, nnx.Module) else model.apply({}, z)
  with pytest.raises(ValueError, match="levels"):
    vq.FSQ((8, 5, 5, 5))(z)
