"""LoRA on a frozen QArray base (QLoRA) trained with optax, and the LQ-LoRA split."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant as jq
from jaxquant import ptq

NF4_G64 = jq.QuantSpec("nf4", channel_axes=(1,), block_sizes={0: 64})
_quantize = jax.jit(jq.quantize, static_argnums=1)  # one compilation, not one per op
_dequantize = jax.jit(jq.dequantize)


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_init_starts_at_the_base_and_apply_matches_its_definition():
  w = _normal((128, 32)) / np.float32(np.sqrt(128))
  base = _quantize(w, NF4_G64)
  lora = ptq.lora_init(jax.random.key(0), w.shape, rank=4, alpha=8.0)
  assert lora.a.shape == (128, 4) and lora.b.shape == (4, 32) and lora.scale == 2.0
  assert np.all(np.abs(lora.a) <= 1 / np.sqrt(128)) and np.all(lora.b == 0)
  x = _normal((16, 128), 1)
  y0 = ptq.lora_apply(x, base, lora.a, lora.b, lora.scale)
  np.testing.assert_allclose(y0, x @ _dequantize(base), rtol=1e-5, atol=1e-5)
  b = _normal((4, 32), 2)
  y = ptq.lora_apply(x, base, lora.a, b, lora.scale)
  np.testing.assert_allclose(y, x @ _dequantize(base) + 2.0 * (x @ lora.a) @ b,
                             rtol=1e-5, atol=1e-5)
  assert ptq.lora_apply(x.astype(jnp.bfloat16), base, lora.a, b, 2.0).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="rank=0"):
    ptq.lora_init(jax.random.key(0), w.shape, rank=0)
  with pytest.raises(ValueError, match="do not chain"):
    ptq.lora_apply(x, base, lora.a.T, b, 1.0)


def test_qlora_training_fits_a_target_and_leaves_the_base_frozen():
  """Base: nf4 g64 of w0. Target: w0 + a rank-2 change. Only the adapters learn."""
  n_in, n_out, rank = 128, 64, 4
  w0 = _normal((n_in, n_out), 3) / np.float32(np.sqrt(n_in))
  delta = 0.5 * (_normal((n_in, 2), 4) @ _normal((2, n_out), 5)) / np.float32(np.sqrt(n_in))
  base = _quantize(w0, NF4_G64)
  codes_before = np.asarray(base.codes).copy()
  x = _normal((256, n_in), 6)
  target = x @ (w0 + delta)
  lora = ptq.lora_init(jax.random.key(1), (n_in, n_out), rank, alpha=8.0)
  opt = optax.adam(1e-2)
  state = opt.init(lora)
  # The optimizer state holds moments for a and b only: the base is not a parameter.
  assert {leaf.shape for leaf in jax.tree.leaves(state) if leaf.ndim == 2} == {
      (n_in, rank), (rank, n_out)}

  def loss_fn(lora):
    return jnp.mean((ptq.lora_apply(x, base, lora.a, lora.b, lora.scale) - target) ** 2)

  @jax.jit
  def train(lora, state):
    def step(carry, _):
      lora, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(lora)
      with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int/float
        updates, state = opt.update(grads, state, lora)
      return (optax.apply_updates(lora, updates), state), loss
    return jax.lax.scan(step, (lora, state), None, length=300)

  (trained, _), losses = train(lora, state)
  floor = float(jnp.mean((x @ (w0 - _dequantize(base))) ** 2))  # nf4 error of the base
  assert losses[-1] < 0.05 * losses[0], (float(losses[0]), float(losses[-1]))  # 0.418 -> 0.0073
  assert losses[-1] < losses[0] - 0.9 * (losses[0] - floor)
  np.testing.assert_array_equal(base.codes, codes_before)
  # The learned update is the target's low-rank change, up to the base's error.
  learned = trained.scale * trained.a @ trained.b
  rel = jnp.linalg.norm(learned - delta) / jnp.linalg.norm(delta)
  assert rel < 0.15, float(rel)  # measured 0.05


def test_lq_lora_beats_rtn_and_improves_with_iterations():
  rng = np.random.default_rng(7)
  # Low-rank structure plus noise, as in pretrained weights: the SVD part has work to do.
  w = (rng.standard_normal((128, 4)) @ rng.standard_normal((4, 64)) * 0.5
       + rng.standard_normal((128, 64)) * 0.2)
  w = jnp.asarray(w / np.sqrt(128), jnp.float32)
  rtn_err = float(jnp.linalg.norm(w - _dequantize(_quantize(w, NF4_G64))))
  errors = []
  for iters in (1, 2, 4, 8):
    q, a, b = ptq.lq_lora_init(w, NF4_G64, 8, iters)
    errors.append(float(jnp.linalg.norm(w - _dequantize(q) - a @ b)))
  assert errors[0] < 0.9 * rtn_err, (rtn_err, errors)  # measured 0.534 vs 0.683
  assert all(e1 <= e0 for e0, e1 in zip(errors, errors[1:])), errors
  assert errors[-1] < 0.95 * errors[0], errors  # measured 0.462 after 8
  assert q.spec == NF4_G64 and a.shape == (128, 8) and b.shape == (8, 64)
  with pytest.raises(ValueError, match="iters=0"):
    ptq.lq_lora_init(w, NF4_G64, 8, 0)
