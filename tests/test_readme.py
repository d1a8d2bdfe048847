"""The README's quickstart runs as written, and its first block holds the two commands."""

import pathlib
import re

import jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _code_blocks(text):
  return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def test_first_block_is_the_two_setup_commands():
  language, body = _code_blocks(README.read_text())[0]
  lines = body.strip().splitlines()
  assert len(lines) == 2
  assert "jaxquant quantize" in lines[0] and "pip install" in lines[0]
  assert "pytest" in lines[1] and "pip install" in lines[1]


def test_every_python_block_runs_in_order(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  blocks = [body for language, body in _code_blocks(README.read_text())
            if language == "python"]
  assert len(blocks) >= 4
  namespace = {}
  # A user runs the README under JAX's default settings, not the suite's strict ones
  # (optax itself needs standard dtype promotion).
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    for body in blocks:
      exec(compile(body, str(README), "exec"), namespace)  # noqa: S102
  output = capsys.readouterr().out
  assert "int4" in output and "Dense_0/kernel" in output and "SQNR" in output
  assert namespace["q"].scale.shape == (8, 512)
