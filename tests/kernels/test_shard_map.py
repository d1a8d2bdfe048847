"""Every kernel is reached from inside `jax.shard_map` (default check_vma): with
activations sharded over 8 CPU devices and replicated weights, the "auto" path
runs the XLA reference on CPU and equals the unsharded call, and lowers to the
platform's kernel for TPU and CUDA (lowering only: no device here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.kernels.fp8_matmul import fp8_matmul
from jaxquant.kernels.fsq import fsq_quantize
from jaxquant.kernels.nearest_code import nearest_code
from jaxquant.kernels.w8a8_matmul import w8a8_matmul
from jaxquant.kernels.weight_only_matmul import pack_halves, weight_only_matmul

M, K, N = 40, 128, 32  # 5 rows of activations per device
TRITON = "__gpu$xla.gpu.triton"
RNG = np.random.default_rng(0)
X_F32 = jnp.asarray(RNG.normal(size=(M, K)), jnp.float32)
X_SCALE = jnp.asarray(RNG.uniform(0.01, 0.1, (M, 1)), jnp.float32)
W_SCALE = jnp.asarray(RNG.uniform(0.01, 0.1, (1, N)), jnp.float32)
W_INT8 = jnp.asarray(RNG.integers(-128, 128, (K, N)), jnp.int8)

# (name, fn(*operands), operands)
CASES = [
    ("w8a8", w8a8_matmul,
     (jnp.asarray(RNG.integers(-128, 128, (M, K)), jnp.int8), X_SCALE, W_INT8, W_SCALE)),
    ("fp8", fp8_matmul,
     (X_F32.astype(jnp.float8_e4m3fn), X_SCALE, W_INT8.astype(jnp.float8_e4m3fn), W_SCALE)),
    ("int4_g32", lambda x, w, s: weight_only_matmul(x, w, s, fmt="int4", group_size=32),
     (X_F32, pack_halves(jnp.asarray(RNG.integers(0, 16, (K, N)), jnp.uint8)),
      jnp.asarray(RNG.uniform(0.01, 0.1, (K // 32, N)), jnp.float32))),
    ("nearest_code", nearest_code,
     (X_F32, jnp.asarray(RNG.normal(size=(50, K)), jnp.float32))),
    ("fsq", lambda z: fsq_quantize(z, (8, 5, 5, 5)),
     (jnp.asarray(RNG.normal(size=(M, 4)) * 2, jnp.float32),)),
]


def _sharded(fn, operands):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  # Per-row operands (activations, per-token scales) are sharded, the rest replicated.
  specs = tuple(jax.P("data") if x.shape[0] == M else jax.P() for x in operands)
  args = tuple(jax.device_put(x, jax.NamedSharding(mesh, spec))
               for x, spec in zip(operands, specs))
  return (jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=jax.P("data"))),
          args)


@pytest.mark.parametrize("name,fn,operands", CASES, ids=[c[0] for c in CASES])
def test_auto_inside_shard_map_equals_the_unsharded_call(name, fn, operands):
  del name
  sharded, args = _sharded(fn, operands)
  for got, want in zip(jax.tree.leaves(sharded(*args)), jax.tree.leaves(fn(*operands))):
    # Float dots of 5 rows and of 40 rows may sum in another order: ulp-level.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("platform,own", [("tpu", "tpu_custom_call"), ("cuda", TRITON)])
@pytest.mark.parametrize("name,fn,operands", CASES, ids=[c[0] for c in CASES])
def test_inside_shard_map_lowers_to_the_platform_kernel(name, fn, operands, platform, own):
  del name
  sharded, args = _sharded(fn, operands)
  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
  exported = jax.export.export(sharded, platforms=[platform], disabled_checks=checks)(*args)
  assert own in exported.mlir_module()
