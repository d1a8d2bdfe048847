"""jaxquant.vq: FSQ, VQ (+ EMA, k-means, dead codes), residual/grouped VQ, LFQ/BSQ, metrics."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxquant as jq
from jaxquant import vq

RECOMMENDED_LEVELS = [(8, 6, 5), (8, 5, 5, 5), (7, 5, 5, 5, 5), (8, 8, 8, 6, 5)]
BOUNDS = ["reference", "atanh", "symmetric"]


def normal(seed, shape, scale=1.0):
  return jax.random.normal(jax.random.key(seed), shape) * scale


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return jax.make_mesh((8,), ("data",))


def shard_batch(mesh, x):
  return jax.device_put(x, NamedSharding(mesh, P("data")))


def test_public_names_import():
  names = ["fsq", "fsq_bound", "fsq_codebook", "fsq_codes_to_indices", "fsq_indices_to_codes",
           "residual_fsq", "residual_fsq_scales", "nearest_code_xla", "vector_quantize",
           "rotate_to", "l2_normalize", "EMACodebookState", "ema_init", "ema_update",
           "cluster_stats", "kmeans_init", "replace_dead_codes", "residual_vq", "grouped_vq",
           "lfq", "bsq", "lfq_entropy_loss", "lfq_entropy_terms", "bits_to_indices",
           "indices_to_bits", "lfq_indices_to_codes", "codebook_usage"]
  assert [n for n in names if not hasattr(vq, n)] == []


# ----------------------------------------------------------------------------
# FSQ


def paper_fsq_numpy(z, levels):
  """The FSQ paper's appendix code, transcribed to float32 numpy."""
  levels_np = np.asarray(levels)
  eps = 1e-3
  half_l = ((levels_np - 1) * (1 - eps) / 2).astype(np.float32)  # numpy f64, then jnp f32
  offset = np.where(levels_np % 2 == 1, 0.0, 0.5).astype(np.float32)
  shift = np.tan(offset / half_l)
  bounded = np.tanh(z + shift) * half_l - offset
  half_width = (np.asarray(levels, np.int32) // 2).astype(np.float32)  # jnp: int -> f32
  zhat = np.round(bounded) / half_width
  basis = np.cumprod([1] + list(levels[:-1])).astype(np.float32)
  shifted = zhat * half_width + half_width
  indices = (shifted * basis).sum(axis=-1).astype(np.uint32)  # truncates, as the paper
  return zhat.astype(np.float32), indices


@pytest.mark.parametrize("levels", RECOMMENDED_LEVELS)
def test_fsq_reference_matches_paper_code(levels):
  z = np.asarray(normal(len(levels), (512, len(levels)), 2.0))
  zhat, indices = vq.fsq(jnp.asarray(z), levels)
  want_zhat, want_indices = paper_fsq_numpy(z, levels)
  np.testing.assert_array_equal(np.asarray(zhat), want_zhat)
  np.testing.assert_array_equal(np.asarray(indices), want_indices.astype(np.int32))
  assert indices.dtype == jnp.int32 and zhat.dtype == jnp.float32


def test_fsq_atanh_centres_zero_and_reference_does_not():
  levels = (8, 6, 5)
  zero = jnp.zeros((1, 3))
  np.testing.assert_allclose(np.asarray(vq.fsq_bound(zero, levels, bound="atanh")), 0.0,
                             atol=1e-6)
  reference = np.asarray(vq.fsq_bound(zero, levels))
  assert abs(reference[0, 0]) > 1e-5 and reference[0, 2] == 0.0  # tan slip on even L only


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("levels", RECOMMENDED_LEVELS)
def test_fsq_indices_codes_bijection(levels, bound):
  size = math.prod(levels)
  codebook = vq.fsq_codebook(levels, bound=bound)
  assert codebook.shape == (size, len(levels))
  indices = vq.fsq_codes_to_indices(codebook, levels, bound=bound)
  np.testing.assert_array_equal(np.asarray(indices), np.arange(size))
  assert len(np.unique(np.asarray(codebook), axis=0)) == size
  # fsq outputs are codebook rows, at their own index.
  zhat, idx = vq.fsq(normal(1, (256, len(levels)), 2.0), levels, bound=bound)
  np.testing.assert_array_equal(np.asarray(vq.fsq_indices_to_codes(idx, levels, bound=bound)),
                                np.asarray(zhat))
  assert int(idx.min()) >= 0 and int(idx.max()) < size


@pytest.mark.parametrize("levels", [(2, 3, 4, 5, 6, 7, 8)])
def test_symmetric_fsq_codes_are_symmetric_and_even(levels):
  codebook = np.asarray(vq.fsq_codebook(levels, bound="symmetric"))
  for i, level in enumerate(levels):
    values = np.unique(codebook[:, i])
    want = np.linspace(-1.0, 1.0, level)
    assert len(values) == level
    np.testing.assert_allclose(values, want, atol=1e-6)
    np.testing.assert_array_equal(values, -values[::-1])
  # Every value is reached, and the quantizer is odd off the decision boundaries.
  sweep = jnp.tile(jnp.linspace(-4.0, 4.0, 4001)[:, None], (1, len(levels)))
  zhat, _ = vq.fsq(sweep, levels, bound="symmetric")
  for i, level in enumerate(levels):
    assert len(np.unique(np.asarray(zhat[:, i]))) == level
  z = normal(2, (256, len(levels)), 2.0)
  np.testing.assert_array_equal(np.asarray(vq.fsq(-z, levels, bound="symmetric")[0]),
                                -np.asarray(vq.fsq(z, levels, bound="symmetric")[0]))


@pytest.mark.parametrize("bound", BOUNDS)
def test_fsq_gradient_is_straight_through(bound):
  levels = (8, 5, 4)
  z = normal(3, (16, 3), 1.5)
  c = normal(4, (16, 3))
  grad = jax.grad(lambda z: jnp.sum(vq.fsq(z, levels, bound=bound)[0] * c))(z)
  # d zhat/dz = d bound/dz / scale, with d bound/dz from autodiff of the bound.
  bound_grad = jax.grad(lambda z: jnp.sum(vq.fsq_bound(z, levels, bound=bound) * c))(z)
  scale = np.asarray([4.0, 2.0, 2.0] if bound != "symmetric" else [3.5, 2.0, 1.5], np.float32)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(bound_grad) / scale, rtol=1e-6)
  # ... and the closed form of the bound's derivative.
  levels_np = np.asarray(levels)
  offset = np.where(levels_np % 2 == 0, 0.5, 0.0).astype(np.float32)
  half_l = ((levels_np - 1) * (1 - 1e-3) / 2).astype(np.float32)
  shift = {"reference": np.tan, "atanh": np.arctanh}.get(bound, np.zeros_like)(offset / half_l)
  if bound == "symmetric":
    half_l = (levels_np - 1) / np.float32(2)
  want = np.asarray(c) * (1 - np.tanh(np.asarray(z) + shift) ** 2) * half_l / scale
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-6)


def test_fsq_under_jit_and_vmap():
  levels = (8, 6, 5)
  z = normal(5, (4, 32, 3), 2.0)
  jitted = jax.jit(vq.fsq, static_argnums=1)
  want_zhat, want_idx = vq.fsq(z, levels)
  got_zhat, got_idx = jitted(z, levels)
  np.testing.assert_array_equal(np.asarray(got_zhat), np.asarray(want_zhat))
  np.testing.assert_array_equal(np.asarray(got_idx), np.asarray(want_idx))
  jitted(z + 1.0, levels)
  assert jitted._cache_size() == 1
  vm_zhat, vm_idx = jax.vmap(lambda x: vq.fsq(x, levels))(z)
  np.testing.assert_array_equal(np.asarray(vm_zhat), np.asarray(want_zhat))
  np.testing.assert_array_equal(np.asarray(vm_idx), np.asarray(want_idx))


def test_fsq_bfloat16_input_keeps_dtype():
  zhat, idx = vq.fsq(normal(6, (8, 3)).astype(jnp.bfloat16), (8, 6, 5))
  assert zhat.dtype == jnp.bfloat16 and idx.dtype == jnp.int32


@pytest.mark.parametrize("levels, match", [
    ((), "levels"), ((8, 1, 5), "levels"), ((8.0, 5, 5), "levels"), ((8, 5), "levels=\\(8, 5\\)"),
    ((2**16, 2**16), "int32"),
])
def test_fsq_rejects_bad_levels(levels, match):
  with pytest.raises(ValueError, match=match):
    vq.fsq(jnp.zeros((2, 3)), levels)


def test_fsq_rejects_unknown_bound():
  with pytest.raises(ValueError, match="bound='tan'"):
    vq.fsq(jnp.zeros((2, 3)), (8, 6, 5), bound="tan")


def test_residual_fsq():
  levels = (8, 5, 5, 5)
  z = jax.random.uniform(jax.random.key(7), (1024, 4), minval=-0.9, maxval=0.9)
  first, first_idx = vq.fsq(z, levels)
  errors = []
  for stages in (1, 2, 3):
    zhat, idx = vq.residual_fsq(z, levels, stages)
    assert idx.shape == (1024, stages) and idx.dtype == jnp.int32
    scales = np.asarray(vq.residual_fsq_scales(levels, stages))
    decoded = sum(np.asarray(vq.fsq_indices_to_codes(idx[:, s], levels)) * scales[s]
                  for s in range(stages))
    np.testing.assert_allclose(np.asarray(zhat), decoded, atol=1e-6)
    errors.append(float(jnp.mean(jnp.square(z - zhat))))
  np.testing.assert_array_equal(np.asarray(idx[:, 0]), np.asarray(first_idx))
  assert errors[0] > errors[1] > errors[2]
  np.testing.assert_allclose(scales[1], 1.0 / (np.asarray(levels) - 1.0), rtol=1e-6)
  with pytest.raises(ValueError, match="scales has shape"):
    vq.residual_fsq(z, levels, 2, scales=jnp.ones((3,)))


# ----------------------------------------------------------------------------
# VQ: nearest code, gradients, losses


def numpy_nearest(z, codebook, metric):
  z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
  codebook = np.asarray(codebook, np.float64)
  if metric == "cosine":
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    codebook = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
    return np.argmax(z @ codebook.T, axis=-1)
  dist = ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
  return np.argmin(dist, axis=-1)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("chunk_size", [4096, 64])
def test_nearest_code_matches_brute_force(metric, chunk_size):
  z = normal(8, (3, 50, 8))
  codebook = normal(9, (300, 8))  # 300 = 4 chunks of 64 + 44: the last chunk is padded
  got = jax.jit(vq.nearest_code_xla, static_argnums=2,
                static_argnames="chunk_size")(z, codebook, metric, chunk_size=chunk_size)
  assert got.shape == (3, 50) and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got).reshape(-1), numpy_nearest(z, codebook, metric))


def test_nearest_code_ties_go_to_the_first_code_in_every_chunk():
  codebook = jnp.concatenate([jnp.ones((5, 2)), jnp.zeros((10, 2)), jnp.ones((5, 2))])
  z = jnp.ones((3, 2))
  for chunk in (4096, 3):
    np.testing.assert_array_equal(np.asarray(vq.nearest_code_xla(z, codebook, chunk_size=chunk)),
                                  [0, 0, 0])


def test_vector_quantize_ste_values_gradients_and_losses():
  z = normal(10, (4, 16, 6))
  codebook = normal(11, (32, 6))
  zq, idx, losses = jax.jit(lambda z, cb: vq.vector_quantize(z, cb, commitment_weight=0.5))(
      z, codebook)
  np.testing.assert_array_equal(np.asarray(zq), np.asarray(codebook)[np.asarray(idx)])
  np.testing.assert_array_equal(np.asarray(idx).reshape(-1), numpy_nearest(z, codebook, "l2"))
  mse = np.mean((np.asarray(z) - np.asarray(zq)) ** 2)
  np.testing.assert_allclose(float(losses["commitment"]), 0.5 * mse, rtol=1e-5)
  np.testing.assert_allclose(float(losses["codebook"]), mse, rtol=1e-5)
  c = normal(12, z.shape)
  def objectives(z, cb):
    zq, _, losses = vq.vector_quantize(z, cb)
    return jnp.stack([jnp.sum(zq * c), losses["commitment"], losses["codebook"]])

  jac_z, jac_cb = jax.jit(jax.jacrev(objectives, argnums=(0, 1)))(z, codebook)
  np.testing.assert_array_equal(np.asarray(jac_z[0]), np.asarray(c))  # straight-through
  # zq and the commitment loss do not train the codebook; the codebook loss does not train z.
  assert not np.any(np.asarray(jac_cb[:2])) and np.any(np.asarray(jac_cb[2]))
  assert np.any(np.asarray(jac_z[1])) and not np.any(np.asarray(jac_z[2]))


def test_rotation_trick_forward_and_jacobian():
  z = jnp.asarray([0.3, -1.2, 0.5, 2.0])
  codebook = normal(13, (8, 4))

  def quantize(z):
    return vq.vector_quantize(z, codebook, gradient="rotation")[0]

  zq, idx, _ = jax.jit(lambda z: vq.vector_quantize(z, codebook, gradient="rotation"))(z)
  q = np.asarray(codebook, np.float64)[int(idx)]
  np.testing.assert_array_equal(np.asarray(zq), np.asarray(codebook)[int(idx)])
  jacobian = np.asarray(jax.jit(jax.jacfwd(quantize))(z), np.float64)
  zn = np.asarray(z, np.float64)
  z_hat, q_hat = zn / np.linalg.norm(zn), q / np.linalg.norm(q)
  r = (z_hat + q_hat) / np.linalg.norm(z_hat + q_hat)
  rotation = np.eye(4) - 2 * np.outer(r, r) + 2 * np.outer(q_hat, z_hat)
  want = np.linalg.norm(q) / np.linalg.norm(zn) * rotation
  np.testing.assert_allclose(jacobian, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rotation @ rotation.T, np.eye(4), atol=1e-12)  # a rotation
  np.testing.assert_allclose(rotation @ z_hat, q_hat, atol=1e-12)
  assert np.abs(jacobian - np.eye(4)).max() > 0.1  # not the straight-through Jacobian
  np.testing.assert_allclose(np.asarray(jax.jit(jax.jacrev(quantize))(z)), jacobian, rtol=1e-5,
                             atol=1e-6)


def test_rotation_trick_batched_matches_per_vector():
  z = normal(14, (6, 4))
  codebook = normal(15, (8, 4))
  c = normal(16, (6, 4))
  loss = lambda z, c: jnp.sum(vq.vector_quantize(z, codebook, gradient="rotation")[0] * c)
  grad = jax.jit(jax.grad(loss))(z, c)
  single = jax.jit(jax.vmap(jax.grad(loss)))(z, c)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(single), rtol=1e-6)
  at_zero = jax.jit(jax.grad(loss))(jnp.zeros((2, 4)), jnp.ones((2, 4)))
  assert np.all(np.isfinite(np.asarray(at_zero)))


def test_vector_quantize_cosine_and_custom_nearest():
  z = normal(17, (10, 5), 3.0)
  codebook = normal(18, (12, 5), 2.0)
  zq, idx, _ = jax.jit(lambda z, cb: vq.vector_quantize(z, cb, metric="cosine"))(z, codebook)
  np.testing.assert_array_equal(np.asarray(idx), numpy_nearest(z, codebook, "cosine"))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(zq), axis=-1), 1.0, rtol=1e-6)
  calls = []

  def first_code(z, codebook, *, metric):  # the contract of kernels' nearest_code
    calls.append((z.shape, z.dtype, codebook.shape, metric))
    return jnp.zeros(z.shape[:1], jnp.int32)

  z3 = z.reshape(2, 5, 5)
  zq, idx, _ = vq.vector_quantize(z3, codebook, nearest=first_code)
  assert calls == [((10, 5), jnp.float32, (12, 5), "l2")]
  assert idx.shape == (2, 5) and not np.any(np.asarray(idx))
  np.testing.assert_array_equal(np.asarray(zq), np.broadcast_to(np.asarray(codebook[0]), z3.shape))


@pytest.mark.parametrize("kwargs, match", [
    ({"metric": "dot"}, "metric='dot'"), ({"gradient": "gumbel"}, "gradient='gumbel'"),
])
def test_vector_quantize_rejects_unknown_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    vq.vector_quantize(jnp.zeros((2, 4)), jnp.zeros((3, 4)), **kwargs)


def test_vector_quantize_rejects_mismatched_dims():
  with pytest.raises(ValueError, match=r"codebook has shape \(3, 5\)"):
    vq.vector_quantize(jnp.zeros((2, 4)), jnp.zeros((3, 5)))


# ----------------------------------------------------------------------------
# Codebook learning: EMA, k-means, dead codes


def numpy_ema(state, z, idx, decay, eps):
  cs, es = np.asarray(state.cluster_size, np.float64), np.asarray(state.embed_sum, np.float64)
  z = np.asarray(z, np.float64).reshape(-1, es.shape[1])
  onehot = np.eye(len(cs))[np.asarray(idx).reshape(-1)]
  cs = decay * cs + (1 - decay) * onehot.sum(0)
  es = decay * es + (1 - decay) * onehot.T @ z
  n = cs.sum()
  smoothed = (cs + eps) / (n + len(cs) * eps) * n
  return cs, es, es / smoothed[:, None]


def test_ema_state_can_be_donated_to_a_jitted_step():
  codebook = jax.random.normal(jax.random.key(0), (16, 4))
  z = jax.random.normal(jax.random.key(1), (32, 4))
  step = jax.jit(lambda state, z: jq.vq.ema_update(state, z, jq.vq.nearest_code(z, state.codebook),
                                                   decay=0.9),
                 donate_argnums=0)
  want = jq.vq.ema_update(jq.vq.ema_init(codebook), z, jq.vq.nearest_code(z, codebook),
                          decay=0.9)
  got = step(jq.vq.ema_init(codebook), z)  # raised "donate the same buffer twice" before
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_ema_update_matches_numpy():
  codebook = normal(19, (16, 4))
  state = vq.ema_init(codebook)
  for step in range(3):
    z = normal(20 + step, (2, 32, 4))
    idx = vq.nearest_code_xla(z, state.codebook)
    want = numpy_ema(state, z, idx, 0.9, 1e-5)
    state = jax.jit(lambda s, z, i: vq.ema_update(s, z, i, decay=0.9))(state, z, idx)
    for got, expected in zip(state, want):
      np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_ema_update_under_shard_map_equals_full_batch(mesh):
  state = vq.ema_init(normal(30, (16, 4)))
  z = normal(31, (64, 4))
  idx = vq.nearest_code_xla(z, state.codebook)
  sharded = jax.jit(jax.shard_map(
      lambda s, z, i: vq.ema_update(s, z, i, axis_name="data"), mesh=mesh,
      in_specs=(P(), P("data"), P("data")), out_specs=P()))
  got = sharded(state, shard_batch(mesh, z), shard_batch(mesh, idx))
  want = vq.ema_update(state, z, idx)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


@jax.jit
def _distortion(z, codebook):
  idx = vq.nearest_code_xla(z, codebook)
  return jnp.mean(jnp.sum(jnp.square(z - codebook[idx]), axis=-1))


def distortion(z, codebook):
  return float(_distortion(z, codebook))


def test_kmeans_reduces_distortion_and_shards(mesh):
  centres = normal(32, (8, 4), 4.0)
  z = centres[jax.random.randint(jax.random.key(33), (256,), 0, 8)] + normal(34, (256, 4), 0.3)
  key = jax.random.key(35)
  start = jax.jit(lambda z: vq.kmeans_init(z, 8, key, iters=0))(z)
  fitted = jax.jit(lambda z: vq.kmeans_init(z, 8, key, iters=10))(z)
  assert distortion(z, fitted) < 0.8 * distortion(z, start)
  assert distortion(z, fitted) < 0.5  # near the noise's 4 * 0.3^2 = 0.36
  sharded = jax.jit(jax.shard_map(
      lambda z: vq.kmeans_init(z, 8, key, iters=10, axis_name="data"), mesh=mesh,
      in_specs=P("data"), out_specs=P()))(shard_batch(mesh, z))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(fitted), rtol=1e-5, atol=1e-5)


def test_replace_dead_codes():
  codebook = normal(36, (10, 3)) + 100.0
  cluster_size = jnp.asarray([5.0, 0.0, 2.0, 0.5, 1.0, 0.0, 3.0, 0.99, 7.0, 1.0])
  z = normal(37, (4, 8, 3))
  new = np.asarray(vq.replace_dead_codes(codebook, cluster_size, z, jax.random.key(38)))
  dead = np.asarray(cluster_size) < 1.0
  np.testing.assert_array_equal(new[~dead], np.asarray(codebook)[~dead])
  rows = np.asarray(z).reshape(-1, 3)
  for row in new[dead]:
    assert np.any(np.all(rows == row, axis=-1))


# ----------------------------------------------------------------------------
# Residual and grouped VQ


def cumulative_errors(z, codebooks, indices):
  """float64[S + 1, N]: ||z - (codes of the first s stages)|| for s = 0..S."""
  z, codebooks, indices = np.asarray(z), np.asarray(codebooks), np.asarray(indices)
  partial = np.cumsum([codebooks[s][indices[:, s]] for s in range(len(codebooks))], axis=0)
  return np.linalg.norm(np.concatenate([z[None], z[None] - partial]), axis=-1)


def test_residual_vq_error_never_increases():
  z = normal(40, (128, 6))
  # A zero code in every stage: the nearest code can always keep the residual.
  codebooks = normal(41, (4, 16, 6)) * (0.5 ** jnp.arange(4.0))[:, None, None]
  codebooks = codebooks.at[:, 0].set(0.0)
  zq, idx, losses = jax.jit(vq.residual_vq)(z, codebooks)
  assert idx.shape == (128, 4) and losses["commitment"].shape == (4,)
  errors = cumulative_errors(z, codebooks, idx)
  np.testing.assert_allclose(errors[-1], np.linalg.norm(np.asarray(z - zq), axis=-1), atol=1e-5)
  assert np.all(np.diff(errors, axis=0) <= 1e-6)
  # With stages fitted by k-means on successive residuals, the error falls each stage.
  fit = jax.jit(lambda r, key: vq.kmeans_init(r, 16, key))
  residual, fitted = z, []
  for s in range(3):
    fitted.append(fit(residual, jax.random.key(50 + s)))
    residual = residual - fitted[-1][vq.nearest_code_xla(residual, fitted[-1])]
  zq, idx, _ = jax.jit(vq.residual_vq)(z, jnp.stack(fitted))
  np.testing.assert_allclose(np.asarray(zq), np.asarray(z - residual), atol=1e-5)
  mean_sq = (cumulative_errors(z, jnp.stack(fitted), idx) ** 2).mean(-1)
  assert np.all(np.diff(mean_sq) < 0)


def test_residual_vq_num_active_masks_stages_with_one_compile():
  z = normal(42, (32, 4))
  codebooks = normal(43, (3, 8, 4))
  run = jax.jit(lambda z, k: vq.residual_vq(z, codebooks, num_active=k))
  full_zq, full_idx, full_losses = run(z, jnp.int32(3))
  for k in range(4):
    zq, idx, losses = run(z, jnp.int32(k))
    # The first k stages are those of the full run; the rest are masked.
    np.testing.assert_array_equal(np.asarray(idx[:, :k]), np.asarray(full_idx[:, :k]))
    assert np.all(np.asarray(idx[:, k:]) == -1)
    want = sum((np.asarray(codebooks[s])[np.asarray(full_idx[:, s])] for s in range(k)),
               np.zeros((32, 4), np.float32))
    np.testing.assert_allclose(np.asarray(zq), want, atol=1e-6)
    for name in ("commitment", "codebook"):
      np.testing.assert_array_equal(np.asarray(losses[name][:k]), np.asarray(full_losses[name][:k]))
      assert not np.any(np.asarray(losses[name][k:]))
  assert run._cache_size() == 1
  grad = jax.jit(jax.grad(lambda z: jnp.sum(vq.residual_vq(z, codebooks)[0])))(z)
  np.testing.assert_allclose(np.asarray(grad), 1.0)  # straight-through through all stages


def test_grouped_vq_equals_per_group_nearest():
  z = normal(44, (2, 20, 12))
  codebooks = normal(45, (3, 16, 4))
  zq, idx, losses = jax.jit(vq.grouped_vq)(z, codebooks)
  assert zq.shape == z.shape and idx.shape == (2, 20, 3)
  z_np, zq_np, idx_np, cb_np = map(np.asarray, (z, zq, idx, codebooks))
  for g in range(3):
    part = z_np[..., 4 * g:4 * g + 4]
    np.testing.assert_array_equal(idx_np[..., g].reshape(-1), numpy_nearest(part, cb_np[g], "l2"))
    np.testing.assert_array_equal(zq_np[..., 4 * g:4 * g + 4], cb_np[g][idx_np[..., g]])
  mse = np.mean((np.asarray(z) - np.asarray(zq)) ** 2)
  np.testing.assert_allclose(float(losses["codebook"]), mse, rtol=1e-5)
  with pytest.raises(ValueError, match="G dividing D=12"):
    vq.grouped_vq(z, normal(46, (5, 16, 2)))


# ----------------------------------------------------------------------------
# LFQ and BSQ


def test_lfq_values_indices_and_gradient():
  z = normal(47, (64, 10))
  zq, idx = vq.lfq(z)
  np.testing.assert_array_equal(np.asarray(zq), np.where(np.asarray(z) > 0, 1.0, -1.0))
  want = (np.asarray(z) > 0).astype(np.int64) @ (2 ** np.arange(10))
  np.testing.assert_array_equal(np.asarray(idx), want)
  np.testing.assert_array_equal(np.asarray(vq.lfq_indices_to_codes(idx, 10)), np.asarray(zq))
  all_idx = jnp.arange(2**10, dtype=jnp.int32)
  np.testing.assert_array_equal(np.asarray(vq.bits_to_indices(vq.indices_to_bits(all_idx, 10))),
                                np.asarray(all_idx))
  c = normal(48, z.shape)
  grad = jax.jit(jax.grad(lambda z: jnp.sum(vq.lfq(z)[0] * c)))(z)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(c))
  assert int(vq.lfq(jnp.zeros((1, 3)))[1][0]) == 0  # zero counts as negative


def test_bsq_values_indices_and_gradient():
  z = normal(49, (32, 9), 3.0)
  zq, idx = vq.bsq(z)
  np.testing.assert_allclose(np.asarray(zq), np.where(np.asarray(z) > 0, 1, -1) / 3.0, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(vq.lfq(z)[1]))
  c = normal(50, z.shape)
  grad = jax.jit(jax.grad(lambda z: jnp.sum(vq.bsq(z)[0] * c)))(z)
  grad_of_u = jax.jit(jax.grad(lambda z: jnp.sum(vq.l2_normalize(z) * c)))(z)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_of_u), rtol=1e-6)


def numpy_entropy_terms(z, temperature, code_scale=1.0):
  z = np.asarray(z, np.float64)
  bits = z.shape[-1]
  codes = np.array(list(itertools.product([0, 1], repeat=bits)))[:, ::-1]  # row i: bits of i
  codes = (codes * 2.0 - 1.0) * code_scale
  logits = -((z[:, None, :] - codes[None]) ** 2).sum(-1) / temperature
  logits -= logits.max(-1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ent = lambda p: -(p * np.log(np.maximum(p, 1e-30))).sum(-1)
  return ent(probs).mean(), ent(probs.mean(0))


def test_lfq_entropy_exact_and_grouped():
  z = normal(51, (96, 6), 0.1)
  terms = jax.jit(lambda z, group_size=None: vq.lfq_entropy_terms(
      z, temperature=0.05, group_size=group_size), static_argnums=1)
  per_sample, codebook = terms(z)
  want = numpy_entropy_terms(z, 0.05)
  np.testing.assert_allclose([float(per_sample), float(codebook)], want, rtol=1e-4)
  loss = vq.lfq_entropy_loss(z, temperature=0.05, gamma=0.5)
  np.testing.assert_allclose(float(loss), want[0] - 0.5 * want[1], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(terms(z, 6)), np.asarray(terms(z)), rtol=1e-6)
  for group_size in (1, 2, 3):
    g_per_sample, g_codebook = terms(z, group_size)
    np.testing.assert_allclose(float(g_per_sample), want[0], rtol=1e-4)  # exact: p factorizes
    assert float(g_codebook) >= want[1] - 1e-5  # sum of marginal entropies bounds the joint


def test_lfq_entropy_grouped_is_exact_for_independent_groups():
  # Batch = every pairing of 8 patterns of bits 0-2 with 8 of bits 3-5: under the
  # batch mean the two groups are independent, so the grouped value is exact.
  left, right = normal(52, (8, 3), 0.1), normal(53, (8, 3), 0.1)
  z = jnp.concatenate([jnp.repeat(left, 8, axis=0), jnp.tile(right, (8, 1))], axis=-1)
  exact = vq.lfq_entropy_terms(z, temperature=0.05)
  grouped = vq.lfq_entropy_terms(z, temperature=0.05, group_size=3)
  np.testing.assert_allclose(np.asarray(grouped), np.asarray(exact), rtol=1e-5)


def test_lfq_entropy_16_bits_stays_bounded_under_jit():
  z = normal(54, (32 * 1024, 16), 0.1)
  loss_fn = jax.jit(lambda z: vq.lfq_entropy_loss(z, group_size=4))
  compiled = loss_fn.lower(z).compile()
  memory = compiled.memory_analysis()
  if memory is not None:  # the exact table would be 32768 * 65536 * 4 bytes = 8 GiB
    assert memory.temp_size_in_bytes < 2**26  # 16 MiB here: 32768 x 4 groups x 16 x 4 bytes x 2
  assert np.isfinite(float(compiled(z)))
  grad = jax.jit(jax.grad(lambda z: vq.lfq_entropy_loss(z, group_size=8)))(z[:1024])
  assert np.all(np.isfinite(np.asarray(grad)))


def test_lfq_entropy_rejects_bad_groups():
  with pytest.raises(ValueError, match="group_size=4"):
    vq.lfq_entropy_loss(jnp.zeros((2, 6)), group_size=4)
  with pytest.raises(ValueError, match="group_size=None"):
    vq.lfq_entropy_loss(jnp.zeros((2, 16)))


# ----------------------------------------------------------------------------
# Metrics


def test_codebook_usage_matches_numpy():
  idx = jax.random.randint(jax.random.key(55), (4, 50), 0, 12)
  idx = idx.at[0, :3].set(-1)  # e.g. inactive residual stages: not counted
  usage = jax.jit(vq.codebook_usage, static_argnums=1)(idx, 16)
  valid = np.asarray(idx)[np.asarray(idx) >= 0]
  counts = np.bincount(valid, minlength=16)
  freqs = counts / counts.sum()
  entropy = -(freqs[freqs > 0] * np.log(freqs[freqs > 0])).sum()
  np.testing.assert_array_equal(np.asarray(usage["counts"]), counts)
  assert usage["counts"].dtype == jnp.int32
  np.testing.assert_allclose(float(usage["usage_fraction"]), (counts > 0).mean())
  np.testing.assert_allclose(float(usage["perplexity"]), np.exp(entropy), rtol=1e-5)
  uniform = vq.codebook_usage(jnp.arange(8, dtype=jnp.int32), 8)
  np.testing.assert_allclose(float(uniform["perplexity"]), 8.0, rtol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_code_by_kernel_equals_the_xla_search(metric):
  codebook = jax.random.normal(jax.random.key(3), (40, 16))
  picks = jax.random.randint(jax.random.key(4), (3, 7), 0, 40)
  z = codebook[picks] + 0.01 * jax.random.normal(jax.random.key(5), (3, 7, 16))
  expected = jq.vq.nearest_code_xla(z, codebook, metric)
  np.testing.assert_array_equal(expected, picks)
  for kwargs in (dict(), dict(impl="xla"), dict(impl="pallas", interpret=True)):
    np.testing.assert_array_equal(jq.vq.nearest_code(z, codebook, metric, **kwargs), expected)
  f = lambda z: jq.vq.nearest_code(z, codebook, metric)
  tpu = jax.export.export(jax.jit(f), platforms=["tpu"])(z).mlir_module()
  assert "tpu_custom_call" in tpu
