"""fp8_matmul: TPU and Triton kernels (Pallas interpreter) vs the XLA reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxquant.kernels.fp8_matmul import fp8_matmul
from jaxquant.kernels.fp8_matmul.gpu import fp8_matmul_gpu
from jaxquant.kernels.fp8_matmul.reference import fp8_matmul_reference
from jaxquant.kernels.fp8_matmul.tpu import fp8_matmul_tpu

FP8 = jnp.float8_e4m3fn
K, N = 200, 130


def _operands(m, *, per_row, integer=True, seed=0):
  """fp8 x [m, K], w [K, N] and float32 scales.

  `integer` draws integers in [-16, 16] (exact in e4m3), so every float32 partial
  sum is exact and any accumulation order gives the reference's bits.
  """
  kx, kw, ks, kt = jax.random.split(jax.random.key(seed), 4)
  if integer:
    x = jax.random.randint(kx, (m, K), -16, 17).astype(FP8)
    w = jax.random.randint(kw, (K, N), -16, 17).astype(FP8)
  else:
    x = (4 * jax.random.normal(kx, (m, K))).astype(FP8)
    w = (4 * jax.random.normal(kw, (K, N))).astype(FP8)
  x_scale = jax.random.uniform(ks, (m, 1) if per_row else (1, 1), minval=0.5,
                               maxval=2.0)
  w_scale = jax.random.uniform(kt, (1, N) if per_row else (1, 1), minval=0.5,
                               maxval=2.0)
  return x, x_scale, w, w_scale


CASES = [(1, False, jnp.bfloat16), (5, True, jnp.float32),
         (33, True, jnp.bfloat16), (33, False, jnp.float32)]


@pytest.mark.parametrize("m, per_row, out_dtype", CASES)
def test_tpu_kernel_matches_reference(m, per_row, out_dtype):
  ops = _operands(m, per_row=per_row, seed=m)
  ref = fp8_matmul_reference(*ops, out_dtype=out_dtype)
  out = fp8_matmul_tpu(*ops, out_dtype=out_dtype, block_m=32, block_n=128,
                       block_k=128,
                       interpret=pltpu.InterpretParams(random_seed=m))
  assert out.dtype == out_dtype and out.shape == (m, N)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(ref, np.float32))


@pytest.mark.parametrize("m, per_row, out_dtype", CASES[::3])
def test_gpu_kernel_matches_reference(m, per_row, out_dtype):
  ops = _operands(m, per_row=per_row, seed=m)
  ref = fp8_matmul_reference(*ops, out_dtype=out_dtype)
  out = fp8_matmul_gpu(*ops, out_dtype=out_dtype, block_m=16, block_n=64,
                       block_k=64, interpret=True)
  assert out.dtype == out_dtype and out.shape == (m, N)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(ref, np.float32))


def test_kernels_on_fractional_values():
  ops = _operands(33, per_row=True, integer=False)
  ref = fp8_matmul_reference(*ops, out_dtype=jnp.float32)
  tol = dict(rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
  np.testing.assert_allclose(
      fp8_matmul(*ops, impl="pallas", interpret=True), ref, **tol)
  np.testing.assert_allclose(
      fp8_matmul_gpu(*ops, out_dtype=jnp.float32, interpret=True), ref, **tol)


def _export(platform, **kwargs):
  ops = _operands(5, per_row=True)
  fn = jax.jit(lambda *a: fp8_matmul(*a, out_dtype=jnp.bfloat16))
  return jax.export.export(fn, platforms=[platform], **kwargs)(*ops).mlir_module()


def test_auto_lowers_to_tpu_kernel():
  text = _export("tpu")
  assert "tpu_custom_call" in text and "triton" not in text


def test_auto_lowers_to_triton_kernel():
  triton = "__gpu$xla.gpu.triton"
  text = _export("cuda", disabled_checks=[
      jax.export.DisabledSafetyCheck.custom_call(triton)])
  assert triton in text and "tpu_custom_call" not in text


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_cpu_falls_back_to_reference(impl):
  ops = _operands(33, per_row=True, integer=False)
  np.testing.assert_array_equal(
      fp8_matmul(*ops, out_dtype=jnp.bfloat16, impl=impl),
      fp8_matmul_reference(*ops, out_dtype=jnp.bfloat16))


def _bad(**changes):
  ops = dict(zip(("x", "x_scale", "w", "w_scale"), _operands(5, per_row=True)))
  return {**ops, **changes}


@pytest.mark.parametrize("kwargs, match", [
    (_bad(x=jnp.zeros((5, K), jnp.bfloat16)), r"x\.dtype is bfloat16"),
    (_bad(w=jnp.zeros((K, N), jnp.float8_e5m2)), r"w\.dtype is float8_e5m2"),
    (_bad(x_scale=jnp.ones((5, 1), jnp.bfloat16)), r"x_scale\.dtype"),
    (_bad(x=jnp.zeros((1, 5, K), FP8)), r"x\.ndim is 3; expected 2"),
    (_bad(w=jnp.zeros((K + 1, N), FP8)), r"w\.shape is \(201, 130\)"),
    (_bad(x_scale=jnp.ones((1, 5))), r"x_scale\.shape is \(1, 5\)"),
    (_bad(w_scale=jnp.ones((N, 1))), r"w_scale\.shape is \(130, 1\); expected"),
])
def test_bad_operands(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fp8_matmul(**kwargs)


def test_bad_impl():
  with pytest.raises(ValueError, match="impl='mosaic'"):
    fp8_matmul(**_bad(), impl="mosaic")
  with pytest.raises(ValueError, match="needs a TPU or GPU"):
    fp8_matmul(**_bad(), impl="pallas")


def test_bad_blocks():
  with pytest.raises(ValueError, match="block_m=48; expected a positive multiple "
                     "of 32"):
    fp8_matmul_tpu(*_operands(5, per_row=True), out_dtype=jnp.float32,
                   block_m=48)
  with pytest.raises(ValueError, match="block_k=96; expected a power of two"):
    fp8_matmul_gpu(*_operands(5, per_row=True), out_dtype=jnp.float32,
                   block_k=96)
