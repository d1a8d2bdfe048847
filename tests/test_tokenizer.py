"""Tests of jaxquant.tokenizer, examples/train_tokenizer.py and `jaxquant tokenizer train`."""

import contextlib
import copy
import io
import json
import math
import pathlib
import re
import sys
import textwrap
import tomllib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from example_harness import load_example

from jaxquant import cli
from jaxquant import recipes
from jaxquant import tokenizer

# A tokenizer small enough to train in a second: FSQ with 5*4*3 = 60 codes on the
# digits, one stage (a token per 2x2 pixels, 16 per image).
TINY = {
    "name": "tiny",
    "description": "test config",
    "data": {"dataset": "digits", "patch_size": 8},
    "model": {"channels": [8], "latent_dim": 3},
    "quantizer": {"kind": "fsq", "levels": [5, 4, 3]},
    "train": {"steps": 4, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 1},
}
TINY_TOML = """
name = "tiny"
description = "test config"
min_usage = 0.5

[data]
dataset = "digits"
patch_size = 8

[model]
channels = [8]
latent_dim = 3

[quantizer]
kind = "fsq"
levels = [5, 4, 3]

[train]
steps = 4
batch_size = 16
learning_rate = 3e-3
warmup_steps = 1
"""
NUM_DIGITS = 1797


@pytest.fixture
def tiny_toml(tmp_path) -> pathlib.Path:
  path = tmp_path / "tiny.toml"
  path.write_text(TINY_TOML)
  return path


@pytest.fixture(scope="module")
def tiny_run():
  """(config, data, TrainResult) of the tiny config, trained once."""
  config = tokenizer.parse_config(TINY)
  data = tokenizer.load_data(config.data)
  return config, data, tokenizer.train(config, data, progress=False)


# ----------------------------------------------------------------------------
# Configs.


def test_shipped_configs_compare_fsq_and_vq_at_2_10_and_2_14():
  names = tokenizer.list_configs()
  expected = {"fsq_1k": 1000, "vq_1k": 1024, "vq_plain_1k": 1024,
              "fsq_16k": 15360, "vq_16k": 16384, "fsq_digits": 240, "vq_digits": 256,
              "vq_plain_digits": 256}
  assert set(expected) <= set(names)
  for name in names:
    config = tokenizer.load_config(name)
    assert config.name == name
    q = config.quantizer
    if name in expected:
      assert q.codebook_size == expected[name]
      assert config.data.dihedral == (config.data.dataset == "photos")
    if q.kind == "fsq":
      assert config.min_usage == 0.95 and len(q.levels) == config.model.latent_dim
    elif "plain" in name:  # the contrast: none of the usage remedies
      assert (q.codebook_learning, q.kmeans_init, q.dead_code_threshold) == ("gradient", False, 0)
      assert config.min_usage is None
    else:
      assert q.codebook_learning == "ema" and q.kmeans_init and q.dead_code_threshold > 0
      assert config.min_usage == 0.80
  # Same data and autoencoder within each size, so the quantizer is the only change.
  for size in ("1k", "digits"):
    a, b = (tokenizer.load_config(f"{k}_{size}") for k in ("vq", "vq_plain"))
    assert (a.data, a.model, a.train) == (b.data, b.model, b.train)
  for size in ("1k", "16k", "digits"):
    a, b = (tokenizer.load_config(f"{k}_{size}") for k in ("fsq", "vq"))
    assert a.data == b.data and a.model.channels == b.model.channels
  assert tokenizer.load_config("tokenizer_fsq_1k") == tokenizer.load_config("fsq_1k")
  assert not any(r.startswith("tokenizer") for r in recipes.list_recipes())


def test_load_config_from_a_file(tiny_toml):
  config = tokenizer.load_config(tiny_toml)
  assert config == tokenizer.load_config(str(tiny_toml))
  assert config.quantizer.levels == (5, 4, 3) and config.model.channels == (8,)
  assert config.min_usage == 0.5 and config.data.holdout == 0.25
  assert config.model.downsampling == 2 and config.quantizer.codebook_size == 60


def test_the_documented_config_format_parses():
  block = tokenizer.__doc__.split("::\n", 1)[1].split("\n\n``run(", 1)[0]
  config = tokenizer.parse_config(tomllib.loads(textwrap.dedent(block)), "docstring")
  assert config.name == "fsq_1k" and config.data.dihedral and config.min_usage == 0.95
  assert config.quantizer.codebook_size == 1000 and config.model.downsampling == 4


def _mutated(path: str, value, delete: bool = False) -> dict:
  data = copy.deepcopy(TINY)
  *parents, key = path.split(".")
  table = data
  for parent in parents:
    table = table[parent]
  if delete:
    del table[key]
  else:
    table[key] = value
  return data


@pytest.mark.parametrize("path, value, message", [
    ("colour", 1, "unknown top-level key 'colour'"),
    ("data.patch", 8, "[data] unknown key 'patch'; expected keys: dataset, patch_size"),
    ("train.steps", "10", '[train] steps = "10"; expected an integer'),
    ("train.steps", True, "[train] steps = true; expected an integer"),
    ("train.steps", 0, "[train] steps=0, batch_size=16; expected positive integers"),
    ("model.channels", [8, "16"], "[model] channels = [8, \"16\"]; expected a list of integers"),
    ("model.latent_dim", 4, "levels=[5, 4, 3] has 3 entries but latent_dim=4"),
    ("quantizer.num_codes", 64, '[quantizer] num_codes is only for kind = "vq"'),
    ("quantizer.levels", [5, 1, 3], "[quantizer] levels=(5, 1, 3) must be"),
    ("quantizer.kind", "lfq", "[quantizer] kind='lfq'; expected one of 'fsq', 'vq'"),
    ("data.dataset", "faces", "[data] dataset='faces'; expected one of 'photos', 'digits'"),
    ("data.patch_size", 16, "[data] patch_size=16; expected 8 for dataset='digits'"),
    ("data.holdout_fraction", 0.1, "[data] holdout_fraction=0.1; expected nothing"),
    ("min_usage", 1.5, "min_usage=1.5; expected a fraction in [0, 1]"),
    ("train.learning_rate", -1, "learning_rate=-1.0; expected a positive number"),
])
def test_config_errors_name_the_key(path, value, message):
  with pytest.raises(ValueError) as error:
    tokenizer.parse_config(_mutated(path, value), "my.toml")
  assert str(error.value).startswith("tokenizer config my.toml: ")
  assert message in str(error.value)


def test_config_errors_of_vq_and_model():
  vq = dict(TINY, quantizer={"kind": "vq", "num_codes": 64, "codebook_learning": "gradient",
                             "ema_decay": 0.9})
  with pytest.raises(ValueError, match='ema_decay is only for codebook_learning = "ema"'):
    tokenizer.parse_config(vq)
  vq["quantizer"] = {"kind": "vq", "num_codes": 64, "levels": [4, 4]}
  with pytest.raises(ValueError, match='levels is only for kind = "fsq"'):
    tokenizer.parse_config(vq)
  vq["quantizer"] = {"kind": "vq", "num_codes": 64, "codebook_learning": "gradient",
                     "dead_code_threshold": 0.1}
  with pytest.raises(ValueError, match="dead_code_threshold=0.1; expected 0 with"):
    tokenizer.parse_config(vq)
  vq["quantizer"] = {"kind": "vq", "num_codes": 64, "metric": "dot"}
  with pytest.raises(ValueError, match="metric='dot'; expected one of 'l2', 'cosine'"):
    tokenizer.parse_config(vq)
  deep = dict(TINY, model={"channels": [8, 8, 8, 8], "latent_dim": 3})
  with pytest.raises(ValueError, match="patch_size=8 is not a multiple of the downsampling "
                     r"factor 16 \(2 \*\* len\(channels=\[8, 8, 8, 8\]\)\)"):
    tokenizer.parse_config(deep)
  with pytest.raises(ValueError, match=r"missing the \[train\] table"):
    tokenizer.parse_config(_mutated("train", None, delete=True))
  with pytest.raises(ValueError, match="missing name"):
    tokenizer.parse_config(_mutated("name", None, delete=True))


def test_load_config_errors(tmp_path):
  with pytest.raises(ValueError, match="'fsq_3k' is not known; known configs: .*fsq_16k"):
    tokenizer.load_config("fsq_3k")
  with pytest.raises(ValueError, match="does not exist"):
    tokenizer.load_config(tmp_path / "nope.toml")
  bad = tmp_path / "bad.toml"
  bad.write_text("name = \n")
  with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
    tokenizer.load_config(bad)


# ----------------------------------------------------------------------------
# Pieces: PSNR, patches, crops, symmetries, the model.


def test_psnr_matches_the_numpy_formula():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(3, 8, 8, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(scale=0.05, size=x.shape), 0, 1).astype(np.float32)
  mse = np.mean((x.astype(np.float64) - y) ** 2)
  np.testing.assert_allclose(float(tokenizer.psnr(x, y)), 10 * np.log10(1 / mse), rtol=1e-5)
  np.testing.assert_allclose(float(jax.jit(tokenizer.psnr)(x, y)), 10 * np.log10(1 / mse),
                             rtol=1e-5)
  x255, y255 = 255 * x, 255 * y
  np.testing.assert_allclose(float(tokenizer.psnr(x255, y255, 255.0)),
                             10 * np.log10(255.0**2 / np.mean((x255 - y255) ** 2.0)), rtol=1e-5)
  assert float(tokenizer.psnr(x, x)) == math.inf
  with pytest.raises(ValueError, match="expected the same shape"):
    tokenizer.psnr(x, y[:2])
  with pytest.raises(ValueError, match="max_value=0"):
    tokenizer.psnr(x, y, 0)


def test_tile_patches_against_loops():
  images = np.arange(2 * 11 * 13 * 2, dtype=np.float32).reshape(2, 11, 13, 2)
  for offset in ((0, 0), (1, 3)):
    patches = tokenizer.tile_patches(images, 4, offset)
    expected = [images[s, y:y + 4, x:x + 4] for s in range(2)
                for y in range(offset[0], 11 - 3, 4) for x in range(offset[1], 13 - 3, 4)]
    np.testing.assert_array_equal(patches, np.stack(expected))


def test_dihedral_gives_the_8_symmetries_and_crops_apply_them():
  square = np.arange(3 * 3, dtype=np.float32).reshape(1, 3, 3, 1)
  variants = {tokenizer.dihedral(square, k).tobytes() for k in range(8)}
  assert len(variants) == 8
  np.testing.assert_array_equal(tokenizer.dihedral(square, 5)[0, :, :, 0],
                                np.fliplr(square[0, :, :, 0].T))
  images = np.random.default_rng(1).uniform(size=(2, 9, 10, 3)).astype(np.float32)
  crops = np.array([[0, 0, 0, 0], [1, 5, 6, 3], [0, 2, 1, 6], [1, 1, 2, 7]], np.int32)
  got = jax.jit(tokenizer._gather_crops, static_argnums=2)(jnp.asarray(images), crops, 4)  # pylint: disable=protected-access
  for row, (s, y, x, k) in enumerate(crops):
    np.testing.assert_array_equal(got[row], tokenizer.dihedral(images[s, y:y + 4, x:x + 4], k))


def test_photo_data_split_by_columns():
  data = tokenizer.load_data(tokenizer.DataConfig(patch_size=16, dihedral=True))
  assert data.full.shape == (2, 427, 640, 3) and data.symmetries == 8
  assert data.train.shape == (2, 427, 512, 3)  # 640 - 128 held-out columns
  assert data.holdout.shape == (2 * 26 * 8, 16, 16, 3)
  np.testing.assert_array_equal(data.holdout[0], data.full[0, :16, 512:528])
  np.testing.assert_array_equal(data.train[1], data.full[1, :, :512])
  assert 0 <= data.full.min() and data.full.max() <= 1
  crops = tokenizer.random_crops(data, np.random.default_rng(0), (1000,))
  assert crops[:, 2].max() <= 512 - 16 and crops[:, 1].max() <= 427 - 16
  assert set(crops[:, 3]) == set(range(8))


@pytest.mark.parametrize("quantizer, latent_dim", [
    ({"kind": "fsq", "levels": [8, 5, 5, 5]}, 4),
    ({"kind": "vq", "num_codes": 32, "kmeans_init": True, "dead_code_threshold": 0.1}, 6),
])
def test_model_shapes(quantizer, latent_dim):
  config = tokenizer.parse_config(dict(
      TINY, data={"dataset": "photos", "patch_size": 16},
      model={"channels": [8, 8], "latent_dim": latent_dim}, quantizer=quantizer))
  model = tokenizer.Tokenizer(config, 3, rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)), jnp.float32)
  recon, out = nnx.jit(lambda model, x: model(x, train=True))(model, images)
  assert recon.shape == images.shape and recon.dtype == jnp.float32
  assert out.indices.shape == (2, 4, 4) and out.indices.dtype == jnp.int32
  assert 0 <= int(out.indices.min()) and int(out.indices.max()) < config.quantizer.codebook_size


# ----------------------------------------------------------------------------
# Training and evaluation.


def test_evaluate_counts_every_token_and_matches_a_recomputation(tiny_run):
  config, data, result = tiny_run
  assert result.mse.shape == (4,) and np.all(np.isfinite(result.mse))
  assert np.all(result.quantizer_loss == 0)  # FSQ has no auxiliary loss
  evaluation = tokenizer.evaluate(result.model, config, data)
  assert evaluation.num_tokens == NUM_DIGITS * 16
  encode = nnx.jit(lambda model, x: model.encode(x).indices)
  indices = np.asarray(encode(result.model, jnp.asarray(data.full)))
  np.testing.assert_array_equal(evaluation.counts, np.bincount(indices.ravel(), minlength=60))
  frequencies = evaluation.counts / evaluation.counts.sum()
  used = frequencies[frequencies > 0]
  assert evaluation.usage_fraction == pytest.approx(used.size / 60)
  assert evaluation.perplexity == pytest.approx(np.exp(-np.sum(used * np.log(used))), rel=1e-4)
  recon = np.clip(np.asarray(nnx.jit(lambda model, x: model(x)[0])(
      result.model, jnp.asarray(data.holdout))), 0, 1)
  mse = np.mean((recon.astype(np.float64) - data.holdout) ** 2)
  assert evaluation.psnr_db == pytest.approx(-10 * np.log10(mse), abs=1e-3)


@pytest.mark.parametrize("quantizer", [
    TINY["quantizer"],
    {"kind": "vq", "num_codes": 16, "kmeans_init": True, "dead_code_threshold": 0.5}],
    ids=["fsq", "vq_ema"])
def test_a_saved_tokenizer_loads_back_whole(quantizer, tmp_path):
  config = tokenizer.parse_config({**TINY, "quantizer": quantizer})
  data = tokenizer.load_data(config.data)
  trained = tokenizer.train(config, data, progress=False).model
  tokenizer.save(trained, config, tmp_path / "tok")
  model, loaded_config = tokenizer.load(tmp_path / "tok")
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)),
               nnx.to_pure_dict(nnx.state(trained)))
  images = jnp.asarray(data.holdout[:32])
  jax.tree.map(np.testing.assert_array_equal, model(images), trained(images))


def test_load_errors(tiny_run, tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tokenizer.load(tmp_path)
  config, _, result = tiny_run
  tokenizer.save(result.model, config, tmp_path / "tok")
  described = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
  described["channels"] = 3  # a photo model's shapes
  (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(described))
  with pytest.raises(ValueError, match="does not fit the model"):
    tokenizer.load(tmp_path / "tok")
  del described["config"]["model"]  # written by something else
  (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(described))
  with pytest.raises(ValueError, match="does not describe a tokenizer"):
    tokenizer.load(tmp_path / "tok")
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="exists and is not a directory"):
    tokenizer.save(result.model, config, tmp_path / "file")


def test_cli_trains_and_writes_the_png_and_summary(tiny_toml, tmp_path, capsys):
  out = tmp_path / "out"
  assert cli.main(["tokenizer", "train", "--config", str(tiny_toml), "--steps", "3",
                   "--out", str(out)]) == 0
  output = capsys.readouterr().out
  assert "Tokenizer tiny: FSQ levels [5, 4, 3] on digits, 3 steps" in output
  summary = json.loads((out / "summary.json").read_text())
  assert summary["steps"] == 3 and summary["codebook_size"] == 60
  assert summary["eval_tokens"] == NUM_DIGITS * 16
  assert 0 < summary["usage_fraction"] <= 1 and 1 <= summary["perplexity"] <= 60
  assert summary["target_holds"] == (summary["usage_fraction"] >= 0.5)
  assert (f"holdout PSNR {summary['psnr_db']:.2f} dB, codebook usage "
          f"{summary['usage_fraction']:.1%} of 60 codes") in output
  assert (out / "tokenizer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  model, config = tokenizer.load(out)  # the trained model is saved beside them
  assert config.name == "tiny" and config.train.steps == 3


def _error_line(capsys) -> str:
  captured = capsys.readouterr()
  assert "Traceback" not in captured.err
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1, captured.err
  return lines[-1]


def test_cli_errors_exit_2(tiny_toml, tmp_path, capsys):
  assert cli.main(["tokenizer", "train", "--config", "fsq_3k"]) == 2
  assert re.search("'fsq_3k' is not known; known configs: .*vq_plain_digits", _error_line(capsys))
  assert cli.main(["tokenizer", "train", "--config", str(tiny_toml), "--steps", "0"]) == 2
  assert "--steps 0: expected a positive number" in _error_line(capsys)
  blocker = tmp_path / "file"
  blocker.write_text("")
  assert cli.main(["tokenizer", "train", "--config", str(tiny_toml), "--out",
                   str(blocker)]) == 2
  assert "exists and is not a directory" in _error_line(capsys)
  assert cli.main(["tokenizer", "train"]) == 2  # --config is required
  assert cli.main(["tokenizer"]) == 2


def test_example_runs_configs_and_writes_the_table(tiny_toml, tmp_path):
  example = load_example("train_tokenizer.py", "train_tokenizer_example")
  printed = io.StringIO()
  try:
    with contextlib.redirect_stdout(printed):
      summaries = example.main(["--configs", f"{tiny_toml},{tiny_toml}", "--steps", "2",
                                "--out", str(tmp_path), "--no-progress"])
    vq = lambda name, learning, usage, size=1024: {
        "name": name, "quantizer": "vq", "dataset": "photos", "codebook_size": size,
        "usage_fraction": usage, "config": {"quantizer": {"codebook_learning": learning}}}
    lines = example.contrast_lines([vq("ema", "ema", 0.9), vq("plain", "gradient", 0.2),
                                    vq("plain_big", "gradient", 0.95, 16384),
                                    vq("ema_big", "ema", 0.9, 16384), summaries[0]])
  finally:
    del sys.modules["train_tokenizer_example"]
  assert lines == [
      "Plain VQ uses fewer codes than EMA + k-means + dead-code VQ: plain 20.0% vs ema "
      "90.0%: holds",
      "Plain VQ uses fewer codes than EMA + k-means + dead-code VQ: plain_big 95.0% vs "
      "ema_big 90.0%: MISSED"]
  output = printed.getvalue()
  assert [s["steps"] for s in summaries] == [2, 2]
  assert re.search(r"tiny\s+digits fsq\s+60\s+[\d.]+\s+[\d.]+%", output)
  assert json.loads((tmp_path / "summary.json").read_text()) == summaries
  assert (tmp_path / "tokenizers.png").read_bytes()[:4] == b"\x89PNG"
  assert (tmp_path / "tiny" / "tokenizer.png").exists()


@pytest.mark.slow
def test_fsq_uses_its_codebook_after_training():
  """FSQ on the digits: the usage the shipped config promises, reached in a short run."""
  config = tokenizer.load_config("fsq_digits")
  summary, evaluation = tokenizer.run(config, progress=False)
  assert summary["usage_fraction"] >= config.min_usage
  assert evaluation.perplexity > 0.5 * config.quantizer.codebook_size
  assert summary["psnr_db"] > 20
