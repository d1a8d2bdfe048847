"""FSQ: TPU and GPU kernels (Pallas interpreter) against the XLA reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from jaxquant.kernels.fsq import fsq_quantize
from jaxquant.kernels.fsq.gpu import fsq_quantize_gpu
from jaxquant.kernels.fsq.reference import (fsq_constants, fsq_quantize_reference,
                                            round_half_to_even)
from jaxquant.kernels.fsq.tpu import fsq_quantize_tpu

LEVELS = [(8, 5, 5, 5), (8, 6, 5), (7, 5, 5, 5, 5)]
SHAPES = [1, 37, 300]  # N
TRITON = "__gpu$xla.gpu.triton"
KERNELS = {
    # Blocks of 128 (TPU) and 64 (GPU) rows: several blocks and row padding.
    "tpu": functools.partial(fsq_quantize_tpu, block_n=128, interpret=True),
    "tpu-shuffled-grid": functools.partial(
        fsq_quantize_tpu, block_n=128, interpret=pltpu.InterpretParams(random_seed=5)),
    "gpu": functools.partial(fsq_quantize_gpu, block_n=64, num_warps=4, interpret=True),
}


def _z(n, d, seed=0, dtype=jnp.float32):
  return jnp.asarray(2.0 * np.random.default_rng(seed).normal(size=(n, d)), dtype)


def _assert_bit_equal(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype and got.shape == want.shape
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0.0 too


def _assert_outputs_equal(got, want):
  _assert_bit_equal(got[0], want[0])
  _assert_bit_equal(got[1], want[1])


@pytest.mark.parametrize("levels", LEVELS, ids=str)
def test_reference_matches_numpy(levels):
  z = _z(300, len(levels))
  zhat, idx = map(np.asarray, fsq_quantize_reference(z, levels))
  lv = np.asarray(levels, np.float64)
  half_l, offset = (lv - 1) * (1 - 1e-3) / 2, np.where(lv % 2 == 0, 0.5, 0.0)
  bounded = np.tanh(np.asarray(z, np.float64) + np.tan(offset / half_l)) * half_l - offset
  r = np.round(bounded)
  clear = np.abs(np.abs(bounded - np.floor(bounded)) - 0.5) > 1e-4  # not near a tie
  assert clear.all(axis=1).mean() > 0.95
  width = np.asarray(levels) // 2
  np.testing.assert_array_equal(zhat[clear], (r / width).astype(np.float32)[clear])
  basis = np.cumprod([1, *levels[:-1]])
  rows = clear.all(axis=1)
  np.testing.assert_array_equal(idx[rows], ((r + width) @ basis)[rows])
  # Every index decodes back to zhat, digit by digit.
  digits = (idx[:, None] // basis) % np.asarray(levels)
  np.testing.assert_array_equal(digits - width, np.rint(zhat * width))
  assert idx.dtype == np.int32 and zhat.dtype == np.float32


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("n", SHAPES)
@pytest.mark.parametrize("levels", LEVELS, ids=str)
def test_kernel_matches_reference(levels, n, kernel):
  z = _z(n, len(levels), seed=n)
  _assert_outputs_equal(KERNELS[kernel](z, levels), fsq_quantize_reference(z, levels))


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_kernel_bfloat16_input(kernel):
  z = _z(37, 4, dtype=jnp.bfloat16)
  _assert_outputs_equal(KERNELS[kernel](z, (8, 5, 5, 5)),
                        fsq_quantize_reference(z, (8, 5, 5, 5)))


def _exact_half_inputs(levels):
  """Rows of z whose bounded values land exactly on k + 0.5, found by ulp search."""
  consts = fsq_constants(levels)
  columns = []
  for j, level in enumerate(levels):
    half_l, offset, shift = consts.half_l[j], consts.offset[j], consts.shift[j]
    targets = np.arange(-level, level) + 0.5
    targets = targets[np.abs(targets + offset) < half_l]
    z0 = (np.arctanh((targets + offset) / half_l) - shift).astype(np.float32)
    candidates = (z0.view(np.int32)[:, None] + np.arange(-64, 65)).view(np.float32)
    # Jitted as the reference is (one fusion, where XLA contracts to an FMA).
    bounded = jax.jit(lambda z: jnp.tanh(z + shift) * half_l - offset)(candidates)
    hits = candidates[np.asarray(bounded) == targets[:, None].astype(np.float32)]
    columns.append(hits)
  rows = max(len(c) for c in columns)
  assert min(len(c) for c in columns) > 0
  return np.stack([np.resize(c, rows) for c in columns], axis=1), sum(map(len, columns))


@pytest.mark.parametrize("levels", LEVELS, ids=str)
def test_kernels_round_exact_halves_to_even(levels):
  z, hits = _exact_half_inputs(levels)
  assert hits >= 10
  want = fsq_quantize_reference(jnp.asarray(z), levels)
  r = np.rint(np.asarray(want[0]) * (np.asarray(levels) // 2))
  assert (r % 2 == 0).all()  # every entry was a tie, and went to the even neighbour
  for kernel in KERNELS.values():
    _assert_outputs_equal(kernel(jnp.asarray(z), levels), want)


def _round_kernel(x_ref, o_ref):
  o_ref[...] = round_half_to_even(x_ref[...])


def test_round_half_to_even_in_triton_interpreter():
  ulp = lambda x: np.spacing(np.float32(x))
  values = np.concatenate([
      np.arange(-8, 8) + 0.5,                                    # exact halves
      [0.5 + 2.0**-24, 0.5 - 2.0**-25, -0.5 + 2.0**-26, -0.5 - 2.0**-24,
       1.5 - ulp(1.5), 1.5 + ulp(1.5), 2.5 - ulp(2.5), 2.5 + ulp(2.5),
       -2.5 + ulp(2.5), -2.5 - ulp(2.5), 2.0**22 + 0.5, 2.0**22 + 1.5,
       2.0**23 - 0.5, 2.0**23 + 1, -(2.0**23) + 0.5, 1e30, -1e30,
       0.0, -0.0, 0.3, -0.3, -2.0**-30, 2.0**-30, 0.7, -0.7, 3.0, -3.0],
  ]).astype(np.float32)
  x = np.zeros(64, np.float32)
  x[:values.size] = values
  out = pl.pallas_call(
      _round_kernel, out_shape=jax.ShapeDtypeStruct((64,), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
      interpret=True)(jnp.asarray(x))
  _assert_bit_equal(out, np.round(x))
  _assert_bit_equal(round_half_to_even(jnp.asarray(x)), np.round(x))


def test_default_blocks():
  z = _z(1500, 3)  # TPU: two blocks of 1024; GPU: three of 512
  want = fsq_quantize_reference(z, (8, 6, 5))
  for fn in (fsq_quantize_tpu, fsq_quantize_gpu):
    _assert_outputs_equal(fn(z, (8, 6, 5), interpret=True), want)


def test_bad_blocks_raise():
  with pytest.raises(ValueError, match=r"block_n=12; expected a positive multiple of 8"):
    fsq_quantize_tpu(_z(5, 3), (8, 6, 5), block_n=12, interpret=True)
  with pytest.raises(ValueError, match=r"block_n=24; expected a power of two >= 16"):
    fsq_quantize_gpu(_z(5, 3), (8, 6, 5), block_n=24, interpret=True)


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_api_on_cpu_matches_reference(impl):
  z = _z(37, 4)
  want = fsq_quantize_reference(z, (8, 5, 5, 5))
  fn = lambda z: fsq_quantize(z, [8, 5, 5, 5], impl=impl)  # a list is fine
  _assert_outputs_equal(fn(z), want)
  _assert_outputs_equal(jax.jit(fn)(z), want)


def test_api_interpret_runs_tpu_kernel():
  z = _z(37, 4)
  _assert_outputs_equal(fsq_quantize(z, (8, 5, 5, 5), impl="pallas", interpret=True,
                                     block_n=16),
                        fsq_quantize_reference(z, (8, 5, 5, 5)))


def test_api_empty_z():
  zhat, idx = fsq_quantize(jnp.zeros((0, 3), jnp.float32), (8, 6, 5))
  assert zhat.shape == (0, 3) and idx.shape == (0,) and idx.dtype == jnp.int32


@pytest.mark.parametrize("platform,own,other", [
    ("tpu", "tpu_custom_call", TRITON),
    ("cuda", TRITON, "tpu_custom_call"),
])
def test_auto_lowers_to_platform_kernel(platform, own, other):
  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
  exported = jax.export.export(jax.jit(lambda z: fsq_quantize(z, (7, 5, 5, 5, 5))),
                               platforms=[platform], disabled_checks=checks)
  text = exported(_z(300, 5, dtype=jnp.bfloat16)).mlir_module()
  assert own in text
  assert other not in text


@pytest.mark.parametrize("levels,match", [
    ((8, 5, 5), r"levels=\(8, 5, 5\) has length 3; expected one level per dimension "
                r"of z \(d=4\)"),
    ((8, 5, 5, 5, 5), r"has length 5; expected .*\(d=4\)"),
    ((8, 1, 5, 5), r"levels\[1\]=1; expected an int >= 2"),
    ((8, 5, 0, 5), r"levels\[2\]=0; expected an int >= 2"),
    ((8, 5, 5.0, 5), r"levels\[2\]=5.0; expected an int >= 2"),
    ((8, 5, True, 5), r"levels\[2\]=True; expected an int >= 2"),
    (8, r"levels=8; expected a sequence of ints >= 2"),
    ((2**16, 2**16, 2, 2), r"make 17179869184 codes; expected at most 2\*\*31"),
])
def test_bad_levels_raise(levels, match):
  with pytest.raises(ValueError, match=match):
    fsq_quantize(_z(5, 4), levels)


@pytest.mark.parametrize("z,match", [
    (jnp.zeros((5, 4), jnp.float16), r"z has dtype float16 and shape \(5, 4\); "
                                     r"expected float32 or bfloat16\[N, d\]"),
    (jnp.zeros((2, 5, 4), jnp.float32), r"z .*shape \(2, 5, 4\); expected"),
])
def test_bad_z_raises(z, match):
  with pytest.raises(ValueError, match=match):
    fsq_quantize(z, (8, 5, 5, 5))


def test_bad_impl_raises():
  with pytest.raises(ValueError, match=r"impl='triton'; expected one of"):
    fsq_quantize(_z(5, 4), (8, 5, 5, 5), impl="triton")


def test_pallas_without_interpret_on_cpu_raises():
  with pytest.raises(ValueError, match=r"impl='pallas' needs a TPU or GPU"):
    fsq_quantize(_z(5, 4), (8, 5, 5, 5), impl="pallas")
