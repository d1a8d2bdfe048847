"""Quantization of arrays sharded over 8 CPU devices stays sharded, with no gathers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxquant as jq


@pytest.fixture(scope="module", params=["explicit", "auto"])
def mesh(request):
  assert jax.device_count() == 8
  axis_type = {"explicit": jax.sharding.AxisType.Explicit,
               "auto": jax.sharding.AxisType.Auto}[request.param]
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))


CASES = [
    ("per-channel int8", jq.QuantSpec("int8", channel_axes=(1,)), P(None, "model")),
    ("int4 g128, blocks sharded", jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 128}),
     P("data", "model")),
    ("nf4 g64", jq.QuantSpec("nf4", channel_axes=(1,), block_sizes={0: 64}), P("data", "model")),
    ("mxfp4", jq.get_preset("mxfp4"), P("data", "model")),
    ("fp8 per-tensor", jq.QuantSpec("fp8_e4m3"), P("data", "model")),
]


@pytest.mark.parametrize("name, spec, pspec", CASES, ids=[c[0] for c in CASES])
def test_quantize_sharded_input_without_gathering(mesh, name, spec, pspec):
  del name
  w = jax.random.normal(jax.random.key(0), (512, 256))
  sharding = NamedSharding(mesh, pspec)
  w_sharded = jax.device_put(w, sharding)
  round_trip = jax.jit(lambda x: jq.dequantize(jq.quantize(x, spec)))
  hlo = round_trip.lower(w_sharded).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  quantized = jax.jit(lambda x: jq.quantize(x, spec))(w_sharded)
  assert quantized.codes.sharding.is_equivalent_to(sharding, 2)
  np.testing.assert_array_equal(round_trip(w_sharded), round_trip(w))
  np.testing.assert_array_equal(np.asarray(quantized.codes.astype(jnp.float32)),
                                np.asarray(jq.quantize(w, spec).codes.astype(jnp.float32)))
