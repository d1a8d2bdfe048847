"""Hadamard rotations: exact orthogonality, the fast transform against the matrix,
float equivalence of a rotated residual MLP, and lower quantization error (incoherence)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import ptq



def _normal(shape, seed=0):
  """float32 test data from numpy (no per-shape compilation of jax.random)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 24, 40, 384, 1536])
def test_hadamard_matrix_is_hadamard(n):
  h = ptq.hadamard_matrix(n)
  assert h.shape == (n, n) and set(np.unique(h)) <= {-1.0, 1.0}
  np.testing.assert_array_equal(h.astype(np.float64) @ h.T, n * np.eye(n))  # exact sums


def test_hadamard_matrix_is_sylvester_doubling_of_the_paley_core():
  h12 = ptq.hadamard_matrix(12)
  # Paley I: first row all ones, first column 1 then -1, rest I + Jacobsthal(11).
  assert np.all(h12[0] == 1) and np.all(h12[1:, 0] == -1)
  residues = {(i * i) % 11 for i in range(1, 11)}
  for i in range(11):
    for j in range(11):
      chi = 0 if i == j else (1 if (j - i) % 11 in residues else -1)
      assert h12[1 + i, 1 + j] == (1 if i == j else chi)
  h48 = ptq.hadamard_matrix(48)
  np.testing.assert_array_equal(h48, np.kron(ptq.hadamard_matrix(4), h12))


@pytest.mark.parametrize("n", [0, 3, 28, 36, 96 + 1, 2.0])
def test_hadamard_matrix_rejects_other_orders(n):
  with pytest.raises(ValueError, match="n="):
    ptq.hadamard_matrix(n)


@pytest.mark.parametrize("n", [16, 48, 80])
def test_fast_transform_equals_the_random_hadamard_matrix(n):
  key = jax.random.key(n)
  q = ptq.random_hadamard(n, key)
  np.testing.assert_allclose(np.asarray(q, np.float64) @ np.asarray(q, np.float64).T,
                             np.eye(n), atol=1e-6)
  x = _normal((2, 3, n))
  signs = ptq.random_signs(n, key)
  expected = np.asarray(x, np.float64) @ np.asarray(q, np.float64)
  transform = ptq.hadamard_transform
  np.testing.assert_allclose(transform(x, signs), expected, atol=2e-6)
  np.testing.assert_allclose(ptq.hadamard_transpose(transform(x, signs), signs), x, atol=2e-6)
  plain = np.asarray(x, np.float64) @ ptq.hadamard_matrix(n) / np.sqrt(n)
  np.testing.assert_allclose(ptq.hadamard_transform(x), plain, atol=2e-6)


def test_transform_keeps_bfloat16_and_works_under_vmap():
  x = _normal((4, 24)).astype(jnp.bfloat16)
  y = ptq.hadamard_transform(x)
  assert y.dtype == jnp.bfloat16
  stacked = jax.vmap(ptq.hadamard_transform)(x[:, None, :])[:, 0]
  np.testing.assert_array_equal(stacked, y)
  with pytest.raises(ValueError, match="signs has shape"):
    ptq.hadamard_transform(x, jnp.ones((12,)))


def _mlp(params, x):
  """embed -> residual block (up, relu, down) -> head; `rot` inserts the online transform."""
  h = x @ params["embed_w"] + params["embed_b"][None]
  u = jax.nn.relu(h @ params["up_w"] + params["up_b"][None])
  if "down_signs" in params:
    u = ptq.hadamard_transform(u, params["down_signs"])
  h = h + u @ params["down_w"] + params["down_b"][None]
  return h @ params["head_w"] + params["head_b"][None]


def test_rotated_residual_mlp_equals_the_original():
  d_in, d, hidden, d_out = 16, 48, 80, 8  # 48 = 12 * 4, 80 = 20 * 4: both Paley cores
  dense = lambda m, n, seed: _normal((m, n), seed) / np.float32(np.sqrt(m))
  params = dict(embed_w=dense(d_in, d, 1), embed_b=0.1 * _normal((d,), 2),
                up_w=dense(d, hidden, 3), up_b=0.1 * _normal((hidden,), 4),
                down_w=dense(hidden, d, 5), down_b=0.1 * _normal((d,), 6),
                head_w=dense(d, d_out, 7), head_b=0.1 * _normal((d_out,), 8))
  q = ptq.random_hadamard(d, jax.random.key(0))  # the residual stream's, fused everywhere
  signs = ptq.random_signs(hidden, jax.random.key(1))  # online, after the ReLU
  q_hidden = ptq.random_hadamard(hidden, jax.random.key(1))
  rotated = dict(params)
  rotated["embed_w"], rotated["embed_b"] = ptq.rotate_output(params["embed_w"],
                                                             params["embed_b"], q)
  rotated["up_w"] = ptq.rotate_input(params["up_w"], q)
  down_w = ptq.rotate_input(params["down_w"], q_hidden)
  rotated["down_w"], rotated["down_b"] = ptq.rotate_output(down_w, params["down_b"], q)
  rotated["down_signs"] = signs
  rotated["head_w"] = ptq.rotate_input(params["head_w"], q)
  x = _normal((32, d_in), 9)
  expected = jax.jit(_mlp)(params, x)
  np.testing.assert_allclose(jax.jit(_mlp)(rotated, x), expected, rtol=1e-5, atol=1e-5)
  # The residual stream really is rotated: same norms, different coordinates.
  h = x @ rotated["embed_w"] + rotated["embed_b"][None]
  h0 = x @ params["embed_w"] + params["embed_b"][None]
  np.testing.assert_allclose(h, h0 @ q, atol=1e-5)
  assert np.max(np.abs(h - h0)) > 0.1


def test_rotate_hessian_is_the_hessian_of_rotated_inputs():
  x = _normal((64, 24))
  q = ptq.random_hadamard(24, jax.random.key(1))
  np.testing.assert_allclose(ptq.rotate_hessian(x.T @ x, q), (x @ q).T @ (x @ q),
                             rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="q has shape"):
    ptq.rotate_input(jnp.ones((12, 3)), q)


def test_rotation_lowers_quantization_error_of_outlier_weights():
  """Incoherence: outliers spread over the group, so the step shrinks."""
  n_in, n_out = 384, 64
  w = 0.02 * _normal((n_in, n_out))
  outliers = jnp.asarray(np.random.default_rng(1).random((n_in, n_out)) < 0.005)
  w = jnp.where(outliers, 0.5 * jnp.sign(w), w)
  k3 = jax.random.key(3)
  q = ptq.random_hadamard(n_in, k3)
  w_rot = ptq.rotate_input(w, q)

  @jax.jit
  def errors(w, w_rot, q):
    out = []
    for fmt in ("int3", "int4"):
      spec = jq.QuantSpec(fmt, channel_axes=(1,), block_sizes={0: 128})
      plain = jnp.sum((w - jq.dequantize(jq.quantize(w, spec))) ** 2)
      back = q @ jq.dequantize(jq.quantize(w_rot, spec))  # back in the original basis
      out.append((plain, jnp.sum((w - back) ** 2)))
    return out

  for plain, rotated in errors(w, w_rot, q):
    assert rotated < 0.5 * plain, (float(plain), float(rotated))
