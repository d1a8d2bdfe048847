"""Weight-only matmul: packing, the reference against numpy, kernels (Pallas interpreter)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxquant import formats
from jaxquant.kernels.weight_only_matmul import pack_halves, unpack_halves, weight_only_matmul
from jaxquant.kernels.weight_only_matmul.gpu import weight_only_matmul_gpu
from jaxquant.kernels.weight_only_matmul.reference import weight_only_matmul_reference
from jaxquant.kernels.weight_only_matmul.tpu import weight_only_matmul_tpu

FORMATS = ["int8", "int4", "nf4", "fp4_e2m1"]
TRITON = "__gpu$xla.gpu.triton"
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX spec, codes 0..7; 8..15 negate


def _operands(fmt, m, k, n, group_size, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  if fmt == "int8":
    codes = np.asarray(rng.integers(-128, 128, (k, n)), np.int8)
  else:
    codes = np.asarray(rng.integers(0, 16, (k, n)), np.uint8)
  scale = jnp.asarray(rng.uniform(0.01, 0.1, (k // group_size, n)), jnp.float32)
  w_codes = jnp.asarray(codes) if fmt == "int8" else pack_halves(jnp.asarray(codes))
  return (x, w_codes, scale), codes


def _numpy_weights(fmt, codes, scale, group_size):
  """float64[K, N] from the published tables."""
  values = {
      "int8": lambda c: c.astype(np.float64),
      "int4": lambda c: np.where(c >= 8, c.astype(np.float64) - 16, c),
      "nf4": lambda c: np.asarray(formats.NF4_VALUES)[c],
      "fp4_e2m1": lambda c: np.asarray(E2M1 + [-v for v in E2M1])[c],
  }[fmt](codes)
  return values * np.repeat(np.asarray(scale, np.float64), group_size, axis=0)


def _assert_close(out, want, out_dtype):
  out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
  rtol = 1e-5 if out_dtype == jnp.float32 else 1e-2  # bf16 keeps 8 bits
  np.testing.assert_allclose(out, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_pack_halves_round_trip_and_layout():
  codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, (8, 5)), jnp.uint8)
  packed = pack_halves(codes)
  assert packed.shape == (4, 5) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(packed & 0xF, codes[:4])
  np.testing.assert_array_equal(packed >> 4, codes[4:])
  np.testing.assert_array_equal(unpack_halves(packed), codes)
  with pytest.raises(ValueError, match=r"K even"):
    pack_halves(codes[:7])


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_matches_numpy(fmt):
  (x, w_codes, scale), codes = _operands(fmt, 5, 128, 24, 32)
  want = np.asarray(x, np.float64) @ _numpy_weights(fmt, codes, scale, 32)
  out = weight_only_matmul_reference(x, w_codes, scale, fmt=fmt, group_size=32)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


# Each format runs every group size (K = per channel) and both x dtypes; odd M and
# N and small blocks give several M, N and K steps and padding on every axis.
CASES = [  # m, k, n, group_size, x dtype, out dtype
    (1, 256, 130, 32, jnp.bfloat16, jnp.bfloat16),
    (7, 512, 130, 64, jnp.float32, jnp.float32),
    (33, 512, 200, 128, jnp.bfloat16, jnp.float32),
    (7, 512, 130, 512, jnp.float32, jnp.bfloat16),
]
INTERPRET = [True, pltpu.InterpretParams(random_seed=3)]  # in order / shuffled grid


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("fmt", FORMATS)
def test_tpu_kernel_matches_reference(fmt, case):
  m, k, n, group_size, dtype, out_dtype = CASES[case]
  args, _ = _operands(fmt, m, k, n, group_size, dtype, seed=case)
  out = weight_only_matmul_tpu(*args, fmt=fmt, group_size=group_size, out_dtype=out_dtype,
                               block_m=16, block_n=128, block_k=128,
                               interpret=INTERPRET[case % 2])
  assert out.shape == (m, n) and out.dtype == out_dtype
  want = weight_only_matmul_reference(*args, fmt=fmt, group_size=group_size,
                                      out_dtype=out_dtype)
  _assert_close(out, want, out_dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_api_interpret_runs_tpu_kernel_with_default_blocks(fmt):
  args, _ = _operands(fmt, 5, 384, 130, 64, jnp.bfloat16)
  out = weight_only_matmul(*args, fmt=fmt, group_size=64, impl="pallas", interpret=True)
  _assert_close(out, weight_only_matmul_reference(*args, fmt=fmt, group_size=64),
                jnp.bfloat16)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_kernel_matches_reference(fmt, case):
  m, k, n, group_size, dtype, out_dtype = CASES[case]
  args, _ = _operands(fmt, m, k, n, group_size, dtype, seed=case)
  out = weight_only_matmul_gpu(*args, fmt=fmt, group_size=group_size, out_dtype=out_dtype,
                               block_m=16, block_n=64, block_k=32, num_stages=2,
                               interpret=True)
  assert out.shape == (m, n) and out.dtype == out_dtype
  want = weight_only_matmul_reference(*args, fmt=fmt, group_size=group_size,
                                      out_dtype=out_dtype)
  _assert_close(out, want, out_dtype)


def test_gpu_kernel_default_blocks():
  args, _ = _operands("nf4", 5, 256, 130, 256, jnp.bfloat16)  # per channel
  out = weight_only_matmul_gpu(*args, fmt="nf4", group_size=256, interpret=True)
  _assert_close(out, weight_only_matmul_reference(*args, fmt="nf4", group_size=256),
                jnp.bfloat16)


def test_api_on_cpu_matches_reference():
  args, _ = _operands("int4", 5, 256, 130, 32)
  fn = jax.jit(lambda *a: weight_only_matmul(*a, fmt="int4", group_size=32))
  np.testing.assert_array_equal(
      fn(*args), weight_only_matmul_reference(*args, fmt="int4", group_size=32))


@pytest.mark.parametrize("platform,own,other", [
    ("tpu", "tpu_custom_call", TRITON),
    ("cuda", TRITON, "tpu_custom_call"),
])
@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_lowers_to_platform_kernel(fmt, platform, own, other):
  args, _ = _operands(fmt, 5, 256, 130, 64, jnp.bfloat16)
  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
  fn = jax.jit(lambda *a: weight_only_matmul(*a, fmt=fmt, group_size=64))
  text = jax.export.export(fn, platforms=[platform], disabled_checks=checks)(
      *args).mlir_module()
  assert own in text
  assert other not in text


def _bad(fmt="nf4", k=256, group_size=64, **kwargs):
  (x, w_codes, scale), _ = _operands(fmt, 5, k, 130, group_size)
  kwargs = {"x": x, "w_codes": w_codes, "w_scale": scale, **kwargs}
  return lambda **kw: weight_only_matmul(**kwargs, group_size=group_size,
                                         **{"fmt": fmt, **kw})


@pytest.mark.parametrize("call,match", [
    (lambda: _bad()(fmt="int3"), r"fmt='int3'; expected one of"),
    (lambda: _bad(group_size=48)(),
     r"group_size=48; expected one of \(32, 64, 128\) or K=256"),
    (lambda: _bad(k=96, group_size=32)(), r"group_size=32; expected a divisor of K // 2=48"),
    (lambda: _bad("int8", k=96, group_size=64)(),
     r"group_size=64; expected a divisor of K=96"),
    (lambda: _bad(x=jnp.zeros((5, 255), jnp.float32))(),
     r"x.shape\[1\]=255; expected an even K for fmt='nf4'"),
    (lambda: _bad(x=jnp.zeros((5, 256), jnp.float16))(),
     r"x=float16\[5,256\]; expected float32"),
    (lambda: _bad("int8", w_codes=jnp.zeros((256, 130), jnp.uint8))(),
     r"w_codes=uint8\[256,130\]; expected int8\[256, N\]"),
    (lambda: _bad(w_scale=jnp.ones((8, 130), jnp.float32))(),
     r"w_scale=float32\[8,130\]; expected float32\[4, 130\]"),
    (lambda: _bad()(out_dtype=jnp.int32), r"out_dtype=int32; expected a float dtype"),
    (lambda: _bad()(impl="triton"), r"impl='triton'; expected one of"),
    (lambda: _bad()(impl="pallas"), r"impl='pallas' needs a TPU or GPU"),
], ids=["fmt", "group", "group-half", "group-k", "k-odd", "x-dtype", "codes", "scale",
        "out-dtype", "impl", "pallas-on-cpu"])
def test_bad_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
