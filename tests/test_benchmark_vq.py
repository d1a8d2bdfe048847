"""benchmarks/vq.py runs at tiny shapes, and both sides of each row do the same math."""

import importlib.util
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "vq.py"


@pytest.fixture(scope="module")
def benchmark():
  spec = importlib.util.spec_from_file_location("benchmark_vq", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up here
  spec.loader.exec_module(module)
  yield module
  del sys.modules[spec.name]


@pytest.fixture(scope="module")
def cases(benchmark):
  return benchmark.make_cases(small=True)


def run_both(benchmark, case):
  """(inputs, our (loss, indices, grad), the peer's, ours, peer) after one training
  step of each side from the same inputs."""
  inputs = benchmark.make_inputs(case)
  ours, peer = benchmark.Ours(case, inputs), benchmark.Peer(case, inputs)
  return inputs, ours.step(), peer.step(), ours, peer


def test_small_run_prints_every_row_and_writes_json(benchmark, tmp_path, capsys):
  out = tmp_path / "vq.json"
  rows = benchmark.main(["--small", "--repeats", "1", "--min-time", "0", "--json",
                         str(out)])
  printed = capsys.readouterr().out
  assert [r["name"] for r in rows] == list(benchmark.ROWS)
  assert benchmark.peer_version() is not None  # installed in the dev environment
  for row in rows:
    assert row["ours_ms"] > 0 and row["peer_ms"] > 0 and row["ratio"] > 0
    assert row["ratio_best"] > 0
    assert row["target_met"] == (row["ratio"] >= benchmark.RATIO_TARGET)
    assert row["name"] in printed and row["shape"] in printed
  for row in rows[3:]:  # lfq rows report memory
    assert row["table_bytes"] == row["tokens"] * 2**10 * 4
    assert 0 < row["ours_peak_bytes"] and row["peer_bytes_estimate"] > row["table_bytes"]
  assert rows[-1]["ours_peak_bytes"] < rows[-1]["table_bytes"]  # no N x 2^d table
  assert printed.count("memory: jaxquant step") == 2
  written = json.loads(out.read_text())
  assert written["rows"] == rows and written["peer"] == benchmark.peer_version()
  assert written["torch_threads"] >= 1


def test_peer_rows_over_the_memory_budget_are_skipped(benchmark, capsys):
  rows = benchmark.main(["--small", "--rows", "vq", "lfq-full", "--repeats", "1",
                         "--min-time", "0", "--peer-max-gib", "1e-4"])
  printed = capsys.readouterr().out
  assert rows[0]["ratio"] > 0  # VQ needs no N x 2^d table
  assert rows[1]["peer_ms"] is None and rows[1]["ratio"] is None
  assert rows[1]["ours_ms"] > 0 and "vqp not run" in printed


def test_missing_peer_prints_our_timings(benchmark, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "vector_quantize_pytorch", None)  # import fails
  rows = benchmark.main(["--small", "--rows", "fsq", "--repeats", "1", "--min-time", "0"])
  printed = capsys.readouterr().out
  assert rows[0]["ours_ms"] > 0 and rows[0]["peer_ms"] is None
  assert "vector-quantize-pytorch not installed" in printed


def test_exact_lfq_step_at_batch_32x1024_fits_in_a_small_fraction_of_the_table(benchmark):
  case = benchmark.make_cases()["lfq-full"]
  assert (case.tokens, case.dim, case.group_size) == (32 * 1024, 16, 16)  # exact, 2^16
  memory = benchmark.compiled_step(case).memory_analysis()  # compiled, not run
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  assert peak < case.table_bytes / 16  # 8 GiB for one 32768 x 2^16 float32 table


def test_fsq_codes_equal_peer_away_from_its_eps_margin(benchmark, cases):
  case = cases["fsq"]
  inputs, (_, ours_idx, ours_grad), (_, peer_idx, peer_grad), _, _ = run_both(
      benchmark, case)
  # vqp scales by (L-1)(1+eps)/2 where we use (1-eps): values within 0.01 of a
  # rounding boundary may round differently; every other code must be equal.
  bounded = np.asarray(jq.vq.fsq_bound(jnp.asarray(inputs["z"]), case.levels,
                                       bound="atanh"))
  safe = np.all(np.abs(bounded - np.floor(bounded) - 0.5) > 0.01, axis=-1)
  assert safe.mean() > 0.8
  np.testing.assert_array_equal(ours_idx[safe], peer_idx[safe])
  np.testing.assert_allclose(ours_grad[safe], peer_grad[safe], rtol=0.01, atol=1e-7)


def test_vq_step_equals_peer(benchmark, cases):
  _, (ours_loss, ours_idx, ours_grad), (peer_loss, peer_idx, peer_grad), ours, peer = (
      run_both(benchmark, cases["vq"]))
  assert len(np.unique(ours_idx)) > 10
  np.testing.assert_array_equal(ours_idx, peer_idx)
  np.testing.assert_allclose(ours_loss, peer_loss, rtol=1e-5)
  np.testing.assert_allclose(ours_grad, peer_grad, rtol=1e-4, atol=1e-8)
  # the EMA update moved the codebook the same way
  np.testing.assert_allclose(np.asarray(ours.state.codebook)[None], peer.codebooks(),
                             rtol=1e-5, atol=1e-5)


def test_rvq_forward_and_ema_equal_peer(benchmark, cases):
  case = cases["rvq"]
  inputs, (ours_loss, ours_idx, _), (peer_loss, peer_idx, _), ours, peer = run_both(
      benchmark, case)
  np.testing.assert_array_equal(ours_idx, peer_idx)
  np.testing.assert_allclose(ours_loss, peer_loss, rtol=1e-5)
  new_codebooks = np.asarray(ours.state.codebook)
  assert np.all(np.abs(new_codebooks - inputs["codebooks"]).max(axis=(1, 2)) > 1e-3)
  np.testing.assert_allclose(new_codebooks, peer.codebooks(), rtol=1e-5, atol=1e-5)  # per stage


def test_lfq_indices_and_exact_entropy_loss_equal_peer(benchmark, cases):
  case = cases["lfq"]
  _, (ours_loss, ours_idx, _), (peer_loss, peer_idx, _), _, _ = run_both(benchmark, case)
  # vqp's first channel is its most significant bit; ours is the least.
  peer_bits = (peer_idx[..., None] >> np.arange(case.dim)[::-1]) & 1
  np.testing.assert_array_equal(ours_idx, (peer_bits << np.arange(case.dim)).sum(-1))
  # same loss up to vqp's 1e-5 clamp inside the per-sample entropy's log
  np.testing.assert_allclose(ours_loss, peer_loss, rtol=1e-4)
