"""W8A8 matmul: TPU and GPU kernels (Pallas interpreter) against the XLA reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxquant.kernels.w8a8_matmul import w8a8_matmul
from jaxquant.kernels.w8a8_matmul.gpu import w8a8_matmul_gpu
from jaxquant.kernels.w8a8_matmul.reference import w8a8_matmul_reference
from jaxquant.kernels.w8a8_matmul.tpu import w8a8_matmul_tpu

K, N = 200, 130  # multiples of no block size: padding on every axis
SHAPES = [1, 5, 33]  # M
DTYPES = [jnp.float32, jnp.bfloat16]
TRITON = "__gpu$xla.gpu.triton"


def _operands(m, k=K, n=N, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
  w = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
  xs = jnp.asarray(rng.uniform(1e-3, 1.0, (m, 1)), jnp.float32)
  ws = jnp.asarray(rng.uniform(1e-3, 1.0, (1, n)), jnp.float32)
  return x, xs, w, ws


def _reference(args, out_dtype=jnp.float32):
  return np.asarray(w8a8_matmul_reference(*args, out_dtype=out_dtype))


def test_reference_matches_numpy():
  x, xs, w, ws = args = _operands(5)
  acc = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
  want = acc.astype(np.float32) * np.asarray(xs) * np.asarray(ws)
  np.testing.assert_array_equal(_reference(args), want)


# Same int32 sums and the same float32 ops in the same order: results are bit-equal.
@pytest.mark.parametrize("interpret", [True, pltpu.InterpretParams(random_seed=7)],
                         ids=["interpret", "shuffled-grid"])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("m", SHAPES)
def test_tpu_kernel_matches_reference(m, out_dtype, interpret):
  args = _operands(m)
  # Grid (2, 2, 2) for m=33: several M, N blocks and K steps.
  out = w8a8_matmul_tpu(*args, out_dtype=out_dtype, block_m=32, block_n=128,
                        block_k=128, interpret=interpret)
  assert out.shape == (m, N) and out.dtype == out_dtype
  np.testing.assert_array_equal(np.asarray(out), _reference(args, out_dtype))


def test_tpu_kernel_default_blocks():
  args = _operands(33, k=300, n=600)  # block_n = 512: two N blocks
  out = w8a8_matmul_tpu(*args, out_dtype=jnp.float32, interpret=True)
  np.testing.assert_array_equal(np.asarray(out), _reference(args))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("m", SHAPES)
def test_gpu_kernel_matches_reference(m, out_dtype):
  args = _operands(m)
  # Grid (<=3, 3) with a 4-step K loop.
  out = w8a8_matmul_gpu(*args, out_dtype=out_dtype, block_m=16, block_n=64,
                        block_k=64, num_warps=4, num_stages=2, interpret=True)
  assert out.shape == (m, N) and out.dtype == out_dtype
  np.testing.assert_array_equal(np.asarray(out), _reference(args, out_dtype))


def test_gpu_kernel_default_blocks():
  args = _operands(5)
  out = w8a8_matmul_gpu(*args, out_dtype=jnp.float32, interpret=True)
  np.testing.assert_array_equal(np.asarray(out), _reference(args))


def test_gpu_kernel_rejects_bad_block():
  with pytest.raises(ValueError, match=r"block_n=48; expected a power of two >= 16"):
    w8a8_matmul_gpu(*_operands(5), out_dtype=jnp.float32, block_n=48, interpret=True)


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_api_on_cpu_matches_reference(impl):
  args = _operands(5)
  want = _reference(args, jnp.bfloat16)
  fn = lambda *a: w8a8_matmul(*a, out_dtype=jnp.bfloat16, impl=impl)
  np.testing.assert_array_equal(np.asarray(fn(*args)), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(fn)(*args)), want)


def test_api_interpret_runs_tpu_kernel():
  args = _operands(5)
  out = w8a8_matmul(*args, impl="pallas", interpret=True)
  np.testing.assert_array_equal(np.asarray(out), _reference(args))


@pytest.mark.parametrize("platform,own,other", [
    ("tpu", "tpu_custom_call", TRITON),
    ("cuda", TRITON, "tpu_custom_call"),
])
def test_auto_lowers_to_platform_kernel(platform, own, other):
  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
  exported = jax.export.export(jax.jit(lambda *a: w8a8_matmul(*a)),
                               platforms=[platform], disabled_checks=checks)
  text = exported(*_operands(5)).mlir_module()
  assert own in text
  assert other not in text


def _replace(args, i, value):
  return tuple(value if j == i else a for j, a in enumerate(args))


@pytest.mark.parametrize("i,value,match", [
    (0, jnp.zeros((5, K), jnp.float32), r"x_codes has dtype float32 .*expected int8\[M, K\]"),
    (0, jnp.zeros((1, 5, K), jnp.int8), r"x_codes .*shape \(1, 5, 200\); expected int8\[M, K\]"),
    (2, jnp.zeros((K + 1, N), jnp.int8), r"w_codes .*shape \(201, 130\); expected int8\[K=200, N\]"),
    (2, jnp.zeros((K, N), jnp.uint8), r"w_codes has dtype uint8"),
    (1, jnp.ones((5,), jnp.float32), r"x_scale .*shape \(5,\); expected float32\[M=5, 1\]"),
    (1, jnp.ones((1, 5), jnp.float32), r"x_scale .*shape \(1, 5\); expected float32\[M=5, 1\]"),
    (3, jnp.ones((1, N), jnp.bfloat16), r"w_scale has dtype bfloat16 .*expected float32\[1, N=130\]"),
    (3, jnp.ones((N, 1), jnp.float32), r"w_scale .*shape \(130, 1\)"),
])
def test_bad_operands_raise(i, value, match):
  with pytest.raises(ValueError, match=match):
    w8a8_matmul(*_replace(_operands(5), i, value))


def test_bad_out_dtype_raises():
  with pytest.raises(ValueError, match=r"out_dtype=.*int32.*expected a floating dtype"):
    w8a8_matmul(*_operands(5), out_dtype=jnp.int32)


def test_bad_impl_raises():
  with pytest.raises(ValueError, match=r"impl='triton'; expected one of"):
    w8a8_matmul(*_operands(5), impl="triton")


def test_pallas_without_interpret_on_cpu_raises():
  with pytest.raises(ValueError, match=r"impl='pallas' needs a TPU or GPU"):
    w8a8_matmul(*_operands(5), impl="pallas")
