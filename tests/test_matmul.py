"""jq.dot_general / jq.matmul: kernel choice, equality with the dequantized dot,
jit / vmap / grad, sharding, and lowering to each platform's kernel."""

import re
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxquant as jq
from jaxquant.matmul import _plan as kernel_plan  # pylint: disable=protected-access

K, N = 256, 130
TRITON = "__gpu$xla.gpu.triton"
WEIGHT_ONLY = {  # name: (format, group along K or None for per channel)
    "int8": ("int8", None),
    "int4_g128": ("int4", 128),
    "int4_channel": ("int4", None),
    "nf4_g64": ("nf4", 64),
    "fp4_g32": ("fp4_e2m1", 32),
}


def _weight(fmt, group=None, shape=(K, N)):
  w = jax.random.normal(jax.random.key(1), shape) * 0.1
  blocks = {} if group is None else {0: group}
  return jq.quantize(w, jq.QuantSpec(fmt, channel_axes=(1,), block_sizes=blocks))


def _x(shape=(3, 5, K), dtype=jnp.float32):
  return jax.random.normal(jax.random.key(0), shape).astype(dtype)


def _dequantized_dot(x, w):
  return jnp.einsum("...k,kn->...n", x.astype(jnp.float32), jq.dequantize(w, jnp.float32))


def _kernel(x, w, **kwargs):
  dn = (((x.ndim - 1,), (0,)), ((), ()))
  plan = kernel_plan(x, w, dn, kwargs.get("lhs_quant"), jnp.float32, "auto", False)
  return None if plan is None else plan.kernel


@pytest.mark.parametrize("name", sorted(WEIGHT_ONLY))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weight_only_equals_the_dequantized_dot(name, dtype):
  w = _weight(*WEIGHT_ONLY[name])
  x = _x(dtype=dtype)
  assert _kernel(x, w) == "weight_only"
  expected = _dequantized_dot(x, w)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for kwargs in (dict(impl="auto"), dict(impl="xla"),
                 dict(impl="pallas", interpret=pltpu.InterpretParams(random_seed=1))):
    y = jq.matmul(x, w, **kwargs)
    assert y.dtype == dtype and y.shape == (3, 5, N)
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(y.astype(jnp.float32), expected, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("fmt,kernel", [("int8", "w8a8"), ("fp8_e4m3", "fp8")])
def test_activations_quantized_per_token_on_the_fly(fmt, kernel):
  w = _weight(fmt)
  x = _x()
  assert _kernel(x, w, lhs_quant=fmt) == kernel
  x_rounded = jq.dequantize(jq.quantize(x, jq.QuantSpec(fmt, channel_axes=(0, 1))))
  expected = _dequantized_dot(x_rounded, w)
  for kwargs in (dict(impl="auto"), dict(impl="pallas", interpret=True)):
    y = jq.matmul(x, w, lhs_quant=fmt, **kwargs)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))
  # A QArray lhs quantized per token takes the same kernel, with the same result.
  xq = jq.quantize(x, jq.QuantSpec(fmt, channel_axes=(0, 1)))
  assert _kernel(xq, w) == kernel
  np.testing.assert_allclose(jq.matmul(xq, w), jq.matmul(x, w, lhs_quant=fmt), rtol=1e-6)


def test_other_layouts_take_the_xla_path_and_still_match():
  x = _x()
  cases = [
      jq.quantize(jax.random.normal(jax.random.key(2), (K, N)), jq.QuantSpec(
          "int4", channel_axes=(0,), block_sizes={1: 10})),  # groups along N
      jq.quantize(jax.random.normal(jax.random.key(2), (K, N)), jq.QuantSpec(
          "uint8", channel_axes=(1,), symmetric=False)),  # zero points
      _weight("int4", 16),  # no kernel for groups of 16
  ]
  for w in cases:
    assert _kernel(x, w) is None
    np.testing.assert_allclose(jq.matmul(x, w), _dequantized_dot(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no kernel runs this contraction"):
      jq.matmul(x, w, impl="pallas", interpret=True)
  # A general dot_general (batch dims, float operands) is jax.lax.dot_general.
  a, b = _x((4, 6, 8)), _x((4, 8, 3))
  dn = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_allclose(jq.dot_general(a, b, dn), jax.lax.dot_general(a, b, dn),
                             rtol=1e-6)


def test_int8_qarrays_on_both_sides_contract_in_int32_on_the_xla_path():
  w = _weight("int8")
  xq = jq.quantize(_x((4, K)), jq.QuantSpec("int8"))  # per tensor
  hlo = jax.jit(lambda a, b: jq.dot_general(a, b, (((1,), (0,)), ((), ())))).lower(
      xq, w).as_text()
  assert re.search(r"dot_general.*i8.*i8.*-> tensor<4x130xi32>", hlo)


def test_jit_vmap_and_grad():
  w = _weight("int4", 128)
  x = _x((2, 4, K))
  f = jax.jit(lambda x, w: jq.matmul(x, w))
  np.testing.assert_allclose(f(x, w), jq.matmul(x, w), rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(lambda xi: jq.matmul(xi, w))(x), f(x, w), rtol=1e-6)
  cotangent = _x((2, 4, N))
  loss = lambda x: jnp.sum(jq.matmul(x, w) * cotangent)
  expected = jnp.einsum("bmn,kn->bmk", cotangent, jq.dequantize(w))
  np.testing.assert_allclose(jax.grad(loss)(x), expected, rtol=1e-5, atol=1e-6)
  # Finite differences along a random direction agree with the custom VJP.
  direction = _x((2, 4, K)) * 1e-2
  numeric = (loss(x + direction) - loss(x - direction)) / 2
  np.testing.assert_allclose(jnp.vdot(jax.grad(loss)(x), direction), numeric, rtol=1e-3)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_on_the_fly_activation_quantization_is_straight_through(fmt):
  w = _weight(fmt)
  x = _x((4, K))
  cotangent = _x((4, N))
  grad = jax.grad(lambda x: jnp.sum(jq.matmul(x, w, lhs_quant=fmt) * cotangent))(x)
  np.testing.assert_allclose(grad, cotangent @ jq.dequantize(w).T, rtol=1e-5, atol=1e-6)


def test_grad_flows_to_a_float_rhs_on_the_xla_path():
  xq = jq.quantize(_x((4, K)), jq.QuantSpec("int8", channel_axes=(0,)))
  w = _x((K, N))
  grad = jax.grad(lambda w: jnp.sum(jq.matmul(xq, w)))(w)
  expected = jnp.broadcast_to(jq.dequantize(xq).sum(0)[:, None], (K, N))
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)


def test_sharded_operands_stay_sharded():
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  w = _weight("int8", None, (K, 256))
  x = _x((16, K))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  w_sharded = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "model"))), w)
  f = jax.jit(lambda x, w: jq.matmul(x, w, lhs_quant="int8"))
  hlo = f.lower(x_sharded, w_sharded).compile().as_text()
  assert "all-gather" not in hlo
  y = f(x_sharded, w_sharded)
  assert y.sharding.spec == P("data", "model")
  np.testing.assert_allclose(y, jq.matmul(x, w, lhs_quant="int8"), rtol=1e-6)


def _export(f, *args, platform):
  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)] if platform == "cuda" else []
  return jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(
      *args).mlir_module()


@pytest.mark.parametrize("case", ["w8a8", "fp8", "int4_g128", "nf4_g64", "fp4_g32", "int8"])
def test_lowers_to_the_platform_kernel(case):
  """Lowering (not compiling on a device): each platform's export holds its kernel only."""
  if case in ("w8a8", "fp8"):
    fmt = "int8" if case == "w8a8" else "fp8_e4m3"
    w, kwargs = _weight(fmt), dict(lhs_quant=fmt)
  else:
    w, kwargs = _weight(*WEIGHT_ONLY[case]), {}
  x = _x((4, K), jnp.bfloat16)
  f = lambda x, w: jq.matmul(x, w, **kwargs)
  tpu = _export(f, x, w, platform="tpu")
  assert "tpu_custom_call" in tpu and TRITON not in tpu
  cuda = _export(f, x, w, platform="cuda")
  assert TRITON in cuda and "tpu_custom_call" not in cuda
  cpu = _export(f, x, w, platform="cpu")
  assert "tpu_custom_call" not in cpu and TRITON not in cpu


def test_bad_arguments_raise():
  w, x = _weight("int8"), _x((4, K))
  with pytest.raises(ValueError, match="impl='cuda'"):
    jq.matmul(x, w, impl="cuda")
  with pytest.raises(ValueError, match="lhs_quant='int4'"):
    jq.matmul(x, w, lhs_quant="int4")
  with pytest.raises(ValueError, match="already a QArray"):
    jq.matmul(jq.quantize(x, "int8"), w, lhs_quant="int8")
  with pytest.raises(ValueError, match="needs a TPU or GPU"):
    jq.matmul(x, w, impl="pallas")


def test_every_kernel_folder_is_an_installed_package():
  root = Path(__file__).resolve().parents[1]
  packages = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
      "packages"]
  folders = {f"jaxquant.kernels.{p.parent.name}" for p in (root / "kernels").glob("*/__init__.py")}
  assert folders and folders <= set(packages)
