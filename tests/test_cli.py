"""Tests of the `jaxquant` command (in-process, plus one run of the console script)."""

import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import checkpoint
from jaxquant import cli
from jaxquant import demo

TRAIN_STEPS = 300  # enough for ~98% test accuracy, and quick
EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "train_demo_model.py"
_ACCURACY = re.compile(r"Test accuracy (before|after) \((.+?)\):\s+([\d.]+)%")


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
  """A cache directory holding the demo model, trained once per session."""
  root = tmp_path_factory.mktemp("xdg_cache")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("XDG_CACHE_HOME", str(root))
    demo.load_or_train_demo_params(steps=TRAIN_STEPS, verbose=False)
  return root


@pytest.fixture
def cached(monkeypatch, demo_cache):
  monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
  return demo_cache


def accuracies(output: str) -> dict[str, float]:
  """{"before": percent, "after": percent} from the command's output."""
  return {when: float(value) for when, _, value in _ACCURACY.findall(output)}


def test_quantize_default_recipe(cached, tmp_path, capsys):
  out = tmp_path / "int8"
  assert cli.main(["quantize", "--out", str(out)]) == 0
  output = capsys.readouterr().out
  assert "Recipe int8:" in output
  assert "params/Dense_1/kernel" in output and "SQNR dB" in output  # the report
  assert "Test accuracy after (int8):" in output
  assert f"Saved the quantized checkpoint to {out}" in output
  acc = accuracies(output)
  assert acc["before"] > 95
  assert abs(acc["after"] - acc["before"]) <= 1.0

  restored = checkpoint.restore(out)
  kernel = restored["params"]["Dense_1"]["kernel"]
  assert isinstance(kernel, jq.QArray) and kernel.format.name == "int8"
  assert restored["params"]["Dense_1"]["bias"].dtype == jnp.float32
  data = demo.load_digits_split()
  after = demo.accuracy(jq.dequantize_tree(restored), data.test_images, data.test_labels)
  assert 100 * after == pytest.approx(acc["after"], abs=0.01)

  assert cli.main(["quantize", "--out", str(out)]) == 0  # replaces its own output
  assert "Saved" in capsys.readouterr().out


def test_quantize_int4_g128(cached, tmp_path, capsys):
  out = tmp_path / "int4"
  assert cli.main(["quantize", "--recipe", "int4-g128", "--out", str(out)]) == 0
  output = capsys.readouterr().out
  assert "Recipe int4-g128:" in output and "params/Dense_0/kernel" in output
  acc = accuracies(output)
  assert acc["before"] > 95 and acc["after"] > 90
  assert re.search(r"Size: [\d,]+ -> [\d,]+ bytes \(\d\.\d\dx smaller\)", output)
  restored = checkpoint.restore(out)["params"]
  assert restored["Dense_0"]["kernel"].scale.shape == (1, 512)  # per channel
  assert restored["Dense_1"]["kernel"].scale.shape == (4, 256)  # groups of 128
  assert restored["Dense_1"]["kernel"].format.name == "int4"


def _error_line(capsys) -> str:
  captured = capsys.readouterr()
  assert "Traceback" not in captured.err
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1, captured.err
  return lines[0]


def test_unknown_recipe_exits_2(cached, tmp_path, capsys):
  assert cli.main(["quantize", "--recipe", "int3", "--out", str(tmp_path / "o")]) == 2
  line = _error_line(capsys)
  assert "'int3' is not known" in line and "int8" in line
  assert not (tmp_path / "o").exists()


def test_bad_recipe_file_and_missing_checkpoint_exit_2(cached, tmp_path, capsys):
  bad = tmp_path / "bad.toml"
  bad.write_text('name = "bad"\n[[rules]]\npattern = ".*kernel"\nformat = "int8"\n'
                 'channel_axis = [1]\n')
  assert cli.main(["quantize", "--recipe", str(bad)]) == 2
  assert "unknown key 'channel_axis'" in _error_line(capsys)

  assert cli.main(["quantize", "--checkpoint", str(tmp_path / "nope")]) == 2
  assert "no such directory" in _error_line(capsys)

  assert cli.main(["quantize", "--out", str(tmp_path)]) == 2  # not a checkpoint
  assert "refusing to overwrite" in _error_line(capsys)


def test_quantize_a_checkpoint_of_another_model(cached, tmp_path, capsys):
  params = {"params": {"encoder": {"kernel": jnp.asarray(
      np.random.default_rng(0).normal(size=(128, 64)), jnp.float32)}}}
  checkpoint.save(tmp_path / "other", params)
  out = tmp_path / "q"
  assert cli.main(["quantize", "--checkpoint", str(tmp_path / "other"),
                   "--recipe", "nf4", "--out", str(out)]) == 0
  output = capsys.readouterr().out
  assert "params/encoder/kernel" in output and "nf4" in output
  assert "needs the demo model's architecture" in output
  assert not accuracies(output)
  assert isinstance(checkpoint.restore(out)["params"]["encoder"]["kernel"], jq.QArray)

  assert cli.main(["quantize", "--checkpoint", str(out)]) == 2  # already quantized
  assert "holds quantized arrays already" in _error_line(capsys)


def test_example_trains_a_checkpoint_the_command_quantizes(cached, tmp_path, capsys):
  path = tmp_path / "demo_mlp"
  runpy.run_path(str(EXAMPLE), run_name="example")["main"]([str(path), "--steps", "50"])
  assert "Test accuracy:" in capsys.readouterr().out
  assert demo.is_demo_params(checkpoint.restore(path))

  assert cli.main(["quantize", "--checkpoint", str(path), "--recipe", "fp8_e4m3",
                   "--out", str(tmp_path / "fp8")]) == 0
  acc = accuracies(capsys.readouterr().out)
  assert set(acc) == {"before", "after"}


def test_recipes_and_formats_commands(capsys):
  assert cli.main(["recipes"]) == 0
  output = capsys.readouterr().out
  for name in ("int8 (default)", "int4-g128", "nf4", "fp8_e4m3", "mxfp4", "nvfp4"):
    assert name in output
  assert cli.main(["formats"]) == 0
  assert re.search(r"fp8_e4m3\s+float\s+8\s+448", capsys.readouterr().out)
  assert cli.main([]) == 2  # a command is required


def _console_script() -> str:
  script = pathlib.Path(sys.executable).parent / "jaxquant"
  found = str(script) if script.exists() else shutil.which("jaxquant")
  assert found, "the `jaxquant` console script is not installed: pip install -e ."
  return found


def test_console_script_quantizes(demo_cache, tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, XDG_CACHE_HOME=str(demo_cache), JAX_PLATFORMS="cpu")
  result = subprocess.run([_console_script(), "quantize", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr
  assert "Test accuracy after (int8):" in result.stdout
  assert "Training" not in result.stdout  # the cached model was used
  assert (out / checkpoint.METADATA_FILE).exists()


def test_missing_scikit_learn_says_how_to_install_it(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty_cache"))
  monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail
  demo.load_digits_split.cache_clear()
  try:
    assert cli.main(["quantize", "--out", str(tmp_path / "o")]) == 2
  finally:
    demo.load_digits_split.cache_clear()
  assert "pip install 'jaxquant[demo]'" in _error_line(capsys)


def test_tokenizer_command_is_listed_with_its_configs(capsys):
  assert cli.main(["--help"]) == 0
  assert re.search(r"tokenizer\s+train a VQ/FSQ image tokenizer", capsys.readouterr().out)
  assert cli.main(["tokenizer", "train", "--help"]) == 0
  usage = " ".join(capsys.readouterr().out.split())
  assert "--config NAME_OR_PATH" in usage and "--steps N" in usage and "--out DIR" in usage
  for name in ("fsq_1k", "fsq_16k", "vq_1k", "vq_16k", "vq_plain_1k"):
    assert re.search(rf"\b{name}\b", usage)
