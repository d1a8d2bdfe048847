"""quantize_tree / dequantize_tree / tree_report on Linen variables and NNX state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq

INT8_KERNELS = jq.Rule(r".*/kernel", jq.QuantSpec("int8", channel_axes=(-1,)))


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(256)(x))
    x = nn.LayerNorm()(x)
    return nn.Dense(10)(x)


class NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(128, 256, rngs=rngs)
    self.out = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def _linen_params():
  return LinenMLP().init(jax.random.key(0), jnp.ones((1, 128)))


def test_linen_paths_first_match_wins_and_none_keeps_float():
  params = _linen_params()
  rules = [jq.Rule(r"params/Dense_1/kernel", None),
           jq.Rule(r".*/kernel", jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 128})),
           jq.Rule(r".*", "int8")]
  qp = jq.quantize_tree(params, rules)
  dense0 = qp["params"]["Dense_0"]
  assert isinstance(dense0["kernel"], jq.QArray) and dense0["kernel"].format.name == "int4"
  assert isinstance(dense0["bias"], jq.QArray) and dense0["bias"].format.name == "int8"
  assert not isinstance(qp["params"]["Dense_1"]["kernel"], jq.QArray)
  assert qp["params"]["Dense_1"]["kernel"] is params["params"]["Dense_1"]["kernel"]


def test_linen_model_runs_on_dequantized_params_within_rounding():
  params = _linen_params()
  x = jax.random.normal(jax.random.key(1), (4, 128))
  qp = jq.quantize_tree(params, INT8_KERNELS)
  y = LinenMLP().apply(params, x)
  y_q = LinenMLP().apply(jq.dequantize_tree(qp), x)
  np.testing.assert_allclose(y_q, y, atol=0.05 * float(jnp.abs(y).max()))


def test_nnx_state_quantize_update_and_run():
  model = NNXMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 128))
  y = model(x)
  state = nnx.state(model, nnx.Param)
  qstate = jq.quantize_tree(state, [jq.Rule(r"hidden/kernel", jq.QuantSpec("int8", channel_axes=(1,))),
                                    jq.Rule(r"out/kernel", jq.QuantSpec("int4", channel_axes=(1,)))])
  assert isinstance(qstate["hidden"]["kernel"].get_value(), jq.QArray)
  assert isinstance(qstate["out"]["bias"].get_value(), jax.Array)
  nnx.update(model, jq.dequantize_tree(qstate))
  w1 = jq.dequantize(qstate["hidden"]["kernel"].get_value())
  w2 = jq.dequantize(qstate["out"]["kernel"].get_value())
  by_hand = (jax.nn.relu(x @ w1 + state["hidden"]["bias"][...][None]) @ w2
             + state["out"]["bias"][...][None])
  np.testing.assert_allclose(model(x), by_hand, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model(x), y, atol=0.25 * float(jnp.abs(y).max()))


def test_integer_and_non_array_leaves_pass_through():
  tree = {"w": jnp.ones((8, 8)), "step": jnp.array(3), "ids": np.arange(4), "name": "x",
          "lr": 0.1, "nothing": None}
  qt = jq.quantize_tree(tree, jq.Rule(".*", "int8"))
  assert isinstance(qt["w"], jq.QArray)
  for key in ("step", "ids", "name", "lr", "nothing"):
    assert qt[key] is tree[key]


def test_error_names_the_leaf_path():
  params = _linen_params()
  rules = jq.Rule(r".*/kernel", jq.QuantSpec("int4", block_sizes={0: 100}))
  with pytest.raises(ValueError, match=r"params/Dense_0/kernel \(shape \(128, 256\)\).*"
                                       r"does not divide axis 0"):
    jq.quantize_tree(params, rules)


def test_quantize_tree_under_jit_with_static_rules():
  params = _linen_params()
  rules = (INT8_KERNELS,)
  qp = jax.jit(jq.quantize_tree, static_argnums=1)(params, rules)
  eager = jq.quantize_tree(params, rules)
  np.testing.assert_array_equal(qp["params"]["Dense_0"]["kernel"].codes,
                                eager["params"]["Dense_0"]["kernel"].codes)


def test_report_rows_totals_and_table():
  params = _linen_params()
  qp = jq.quantize_tree(params, INT8_KERNELS)
  report = jq.tree_report(params, qp)
  rows = {r.path: r for r in report.leaves}
  kernel = rows["params/Dense_0/kernel"]
  assert kernel.format == "int8" and kernel.shape == (128, 256)
  assert kernel.bytes_before == 128 * 256 * 4
  assert kernel.bytes_after == 128 * 256 + 256 * 4
  assert kernel.bits_per_weight == pytest.approx(8 + 32 / 128)
  w = np.asarray(params["params"]["Dense_0"]["kernel"])
  w_hat = np.asarray(jq.dequantize(qp["params"]["Dense_0"]["kernel"]))
  expected_sqnr = 10 * np.log10(np.sum(w**2) / np.sum((w - w_hat) ** 2))
  assert kernel.sqnr_db == pytest.approx(expected_sqnr, rel=1e-4)
  assert 35 < kernel.sqnr_db < 50
  assert rows["params/Dense_0/bias"].sqnr_db is None
  assert report.bytes_before == sum(r.bytes_before for r in report.leaves)
  table = str(report)
  assert "params/Dense_0/kernel" in table and "SQNR dB" in table and "total" in table
