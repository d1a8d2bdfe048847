"""Nearest code: TPU and GPU kernels (Pallas interpreter) against the XLA reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxquant.kernels.nearest_code import nearest_code
from jaxquant.kernels.nearest_code.gpu import nearest_code_gpu
from jaxquant.kernels.nearest_code.reference import nearest_code_reference
from jaxquant.kernels.nearest_code.tpu import nearest_code_tpu

# (N, K, D): every N in {1, 37, 200}, K in {5, 130, 300} and D in {8, 64}; with the
# blocks below, padding on every axis, and for the last case several N blocks and K
# steps in both kernels.
CASES = [(1, 130, 8), (37, 5, 64), (200, 300, 64)]
METRICS = ["l2", "cosine"]
DTYPES = [jnp.float32, jnp.bfloat16]
TRITON = "__gpu$xla.gpu.triton"


def _operands(n, k, d, dtype=jnp.float32, seed=0):
  """Rows of z near known codes, so every argmin is unambiguous; and their codes."""
  rng = np.random.default_rng(seed)
  codebook = rng.normal(size=(k, d))
  idx = rng.integers(0, k, n)
  z = codebook[idx] + 0.01 * rng.normal(size=(n, d))
  return jnp.asarray(z, dtype), jnp.asarray(codebook, dtype), idx


def _reference(z, codebook, metric):
  return np.asarray(nearest_code_reference(z, codebook, metric=metric))


@pytest.mark.parametrize("metric", METRICS)
def test_reference_matches_numpy(metric):
  z, codebook, idx = _operands(37, 130, 8)
  zz, cc = np.asarray(z, np.float64), np.asarray(codebook, np.float64)
  if metric == "l2":
    want = np.argmin(((zz[:, None, :] - cc[None]) ** 2).sum(-1), axis=1)
  else:
    want = np.argmax(zz @ cc.T / np.linalg.norm(cc, axis=1), axis=1)
  got = _reference(z, codebook, metric)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got, idx)


@pytest.mark.parametrize("interpret", [True, pltpu.InterpretParams(random_seed=7)],
                         ids=["interpret", "shuffled-grid"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,k,d", CASES)
def test_tpu_kernel_matches_reference(n, k, d, metric, dtype, interpret):
  z, codebook, _ = _operands(n, k, d, dtype)
  out = nearest_code_tpu(z, codebook, metric=metric, block_n=128, block_k=128,
                         interpret=interpret)
  assert out.shape == (n,) and out.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out), _reference(z, codebook, metric))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,k,d", CASES)
def test_gpu_kernel_matches_reference(n, k, d, metric, dtype):
  z, codebook, _ = _operands(n, k, d, dtype)
  out = nearest_code_gpu(z, codebook, metric=metric, block_n=16, block_k=64,
                         num_warps=4, num_stages=2, interpret=True)
  assert out.shape == (n,) and out.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out), _reference(z, codebook, metric))


@pytest.mark.parametrize("metric", METRICS)
def test_default_blocks(metric):
  z, codebook, _ = _operands(150, 600, 16)  # TPU: 3 K steps of 256; GPU: 10 of 64
  want = _reference(z, codebook, metric)
  for fn in (nearest_code_tpu, nearest_code_gpu):
    np.testing.assert_array_equal(
        np.asarray(fn(z, codebook, metric=metric, interpret=True)), want)


def _tie_operands():
  """Integer codes (exact distances) with duplicates in one block and across blocks."""
  rng = np.random.default_rng(3)
  codebook = rng.integers(-3, 4, (300, 8)).astype(np.float32)
  codebook[[140, 260]] = codebook[5]  # three K blocks of 128, five of 64
  codebook[9] = codebook[8]           # same block
  z = codebook[[5, 140, 260, 9, 8]]
  return jnp.asarray(z), jnp.asarray(codebook), np.array([5, 5, 5, 8, 8])


@pytest.mark.parametrize("metric", METRICS)
def test_ties_pick_smallest_index(metric):
  z, codebook, want = _tie_operands()
  np.testing.assert_array_equal(_reference(z, codebook, metric), want)
  outs = [
      nearest_code_tpu(z, codebook, metric=metric, block_n=128, block_k=128,
                       interpret=True),
      nearest_code_tpu(z, codebook, metric=metric, block_n=128, block_k=128,
                       interpret=pltpu.InterpretParams(random_seed=1)),
      nearest_code_gpu(z, codebook, metric=metric, block_n=16, block_k=64,
                       interpret=True),
  ]
  for out in outs:
    np.testing.assert_array_equal(np.asarray(out), want)


def test_bad_blocks_raise():
  z, codebook, _ = _operands(5, 20, 8)
  with pytest.raises(ValueError, match=r"block_n=64; expected a positive multiple of 128"):
    nearest_code_tpu(z, codebook, block_n=64, interpret=True)
  with pytest.raises(ValueError, match=r"block_k=8; expected a positive multiple of 16"):
    nearest_code_tpu(z.astype(jnp.bfloat16), codebook.astype(jnp.bfloat16),
                     block_k=8, interpret=True)
  with pytest.raises(ValueError, match=r"block_k=48; expected a power of two >= 16"):
    nearest_code_gpu(z, codebook, block_k=48, interpret=True)


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_api_on_cpu_matches_reference(impl):
  z, codebook, idx = _operands(37, 130, 8)
  fn = lambda z, c: nearest_code(z, c, metric="cosine", impl=impl)
  np.testing.assert_array_equal(np.asarray(fn(z, codebook)), idx)
  np.testing.assert_array_equal(np.asarray(jax.jit(fn)(z, codebook)), idx)


def test_api_interpret_runs_tpu_kernel():
  z, codebook, idx = _operands(37, 130, 8)
  out = nearest_code(z, codebook, impl="pallas", interpret=True, block_n=128,
                     block_k=64)
  np.testing.assert_array_equal(np.asarray(out), idx)


def test_api_empty_z():
  z, codebook, _ = _operands(0, 5, 8)
  out = nearest_code(z, codebook)
  assert out.shape == (0,) and out.dtype == jnp.int32


@pytest.mark.parametrize("platform,own,other", [
    ("tpu", "tpu_custom_call", TRITON),
    ("cuda", TRITON, "tpu_custom_call"),
])
@pytest.mark.parametrize("metric", METRICS)
def test_auto_lowers_to_platform_kernel(platform, own, other, metric):
  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
  exported = jax.export.export(jax.jit(lambda z, c: nearest_code(z, c, metric=metric)),
                               platforms=[platform], disabled_checks=checks)
  z, codebook, _ = _operands(37, 300, 64, jnp.bfloat16)
  text = exported(z, codebook).mlir_module()
  assert own in text
  assert other not in text


@pytest.mark.parametrize("z,codebook,match", [
    (jnp.zeros((5, 8), jnp.float16), jnp.zeros((4, 8), jnp.float16),
     r"z has dtype float16 and shape \(5, 8\); expected float32 or bfloat16\[N, D\]"),
    (jnp.zeros((5,), jnp.float32), jnp.zeros((4, 8), jnp.float32),
     r"z .*shape \(5,\); expected"),
    (jnp.zeros((5, 8), jnp.float32), jnp.zeros((4, 9), jnp.float32),
     r"codebook .*shape \(4, 9\); expected float32\[K, D=8\]"),
    (jnp.zeros((5, 8), jnp.float32), jnp.zeros((4, 8), jnp.bfloat16),
     r"codebook has dtype bfloat16 .*expected float32\[K, D=8\]"),
    (jnp.zeros((5, 8), jnp.float32), jnp.zeros((0, 8), jnp.float32),
     r"codebook .*shape \(0, 8\); .*K >= 1"),
])
def test_bad_operands_raise(z, codebook, match):
  with pytest.raises(ValueError, match=match):
    nearest_code(z, codebook)


def test_bad_metric_raises():
  z, codebook, _ = _operands(5, 20, 8)
  with pytest.raises(ValueError, match=r"metric='dot'; expected one of \('l2', 'cosine'\)"):
    nearest_code(z, codebook, metric="dot")


def test_bad_impl_raises():
  z, codebook, _ = _operands(5, 20, 8)
  with pytest.raises(ValueError, match=r"impl='triton'; expected one of"):
    nearest_code(z, codebook, impl="triton")


def test_pallas_without_interpret_on_cpu_raises():
  z, codebook, _ = _operands(5, 20, 8)
  with pytest.raises(ValueError, match=r"impl='pallas' needs a TPU or GPU"):
    nearest_code(z, codebook, impl="pallas")

