"""Trains a digits CNN and a character-level transformer with float and 8-bit AdamW.

The quality proof of `jq.optim`: each task is trained with `optax.adamw` (float32
moments), `jq.optim.adamw_8bit` and `jq.optim.adamw_4bit` (block-wise quantized
moments) from the same seeds, on the same minibatches, with the same
hyperparameters; only the optimizer state differs. The script prints the final
train and held-out losses (and test accuracy for digits) as mean ± std over seeds,
the difference of each quantized optimizer from the float one, and whether it is
within 1% relative or within the seed-to-seed spread (the sample standard
deviation of the float runs), plus the optimizer state bytes and the fraction of
state elements stored quantized.

Tasks:
  digits: a Flax Linen CNN (two 3x3 convolutions, 32 and 64 channels, 2x2 max
    pooling, Dense 128, Dense 10) on scikit-learn's 8x8 digits images with the
    fixed 75/25 train/test split of `jaxquant.demo`.
  text: a pre-LayerNorm character-level transformer language model (2 layers,
    d_model 128, 4 heads, context 64) on Python's own documentation
    (`pydoc_data.topics`, ships with CPython), split 90/10 into train/validation
    (the last 10% of the text is the validation split).

  python examples/optim_quality.py                     # 5 seeds, ~8 min on 2 CPU cores
  python examples/optim_quality.py --quick             # a ~30 s smoke run (the test's)
  python examples/optim_quality.py --seeds 3 --json results.json --plot curves.png

Needs scikit-learn (pip install 'jaxquant[demo]'); matplotlib for the plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import textwrap
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from jaxquant import demo

DEFAULT_PLOT = pathlib.Path(__file__).parent / "optim_quality.png"
OPTIMIZERS = ("adamw", "adamw_8bit", "adamw_4bit")
REFERENCE = "adamw"
# The target: a quantized optimizer's final loss within 1% of the float one, or
# within the seed-to-seed spread (sample std) of the float runs.
TARGET_RELATIVE = 0.01
TEXT_VAL_FRACTION = 0.1  # the last 10% of the text is the validation split


# ----------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyperparameters of one task, shared by every optimizer.

  Attributes:
    steps: optimizer steps.
    batch_size: examples (images or context windows) per step.
    learning_rate: peak learning rate of a linear warmup + cosine decay schedule.
    warmup_steps: steps of linear warmup from 0.
    weight_decay: AdamW's decoupled weight decay.
    eval_every: steps between held-out evaluations and progress lines.
  """

  steps: int
  batch_size: int
  learning_rate: float
  warmup_steps: int
  weight_decay: float
  eval_every: int


@dataclasses.dataclass(frozen=True)
class CnnConfig:
  """Digits CNN widths: ``conv_features`` per 3x3 conv layer, then a hidden Dense."""

  conv_features: tuple[int, ...] = (32, 64)
  hidden: int = 128


@dataclasses.dataclass(frozen=True)
class LmConfig:
  """Character transformer sizes (the vocabulary comes from the corpus)."""

  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 2
  context: int = 64
  eval_windows: int = 96


FULL = dict(
    digits=(CnnConfig(), TrainConfig(steps=400, batch_size=64, learning_rate=1e-3,
                                     warmup_steps=20, weight_decay=1e-4, eval_every=50)),
    text=(LmConfig(), TrainConfig(steps=400, batch_size=32, learning_rate=3e-3,
                                  warmup_steps=40, weight_decay=1e-2, eval_every=50)),
)
QUICK = dict(
    digits=(CnnConfig((16, 32), 64), TrainConfig(steps=100, batch_size=32,
                                                 learning_rate=2e-3, warmup_steps=10,
                                                 weight_decay=1e-4, eval_every=50)),
    text=(LmConfig(d_model=64, num_heads=2, num_layers=1, context=32, eval_windows=32),
          TrainConfig(steps=100, batch_size=16, learning_rate=3e-3, warmup_steps=10,
                      weight_decay=1e-2, eval_every=50)),
)


# ----------------------------------------------------------------------------
# Models. Flax layers only, so nothing relies on implicit rank broadcasting.


class DigitsCNN(nn.Module):
  """3x3 conv + ReLU per width, 2x2 max pooling, Dense + ReLU, Dense to 10 logits."""

  config: CnnConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """float32[batch, 8, 8, 1] images in [0, 1] -> float32[batch, 10] logits."""
    x = images
    for features in self.config.conv_features:
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      # max, not average: nn.avg_pool divides by an int, which strict promotion refuses
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.config.hidden)(x))
    return nn.Dense(demo.NUM_CLASSES)(x)


class TransformerBlock(nn.Module):
  """Pre-LayerNorm block: causal self-attention, then a 4x GELU MLP, both residual."""

  config: LmConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """float32[batch, time, d_model] -> the same shape; mask: bool[batch, 1, time, time]."""
    d_model = self.config.d_model
    x = x + nn.MultiHeadDotProductAttention(self.config.num_heads)(
        nn.LayerNorm()(x), mask=mask)
    h = nn.gelu(nn.Dense(4 * d_model)(nn.LayerNorm()(x)))
    return x + nn.Dense(d_model)(h)


class CharTransformer(nn.Module):
  """Character language model: token + position embeddings, blocks, LayerNorm, logits."""

  config: LmConfig
  vocab_size: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """int32[batch, time] tokens -> float32[batch, time, vocab_size] next-token logits."""
    cfg = self.config
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    x = (nn.Embed(self.vocab_size, cfg.d_model)(tokens)
         + nn.Embed(cfg.context, cfg.d_model, name="position")(positions))
    mask = nn.make_causal_mask(tokens)
    for _ in range(cfg.num_layers):
      x = TransformerBlock(cfg)(x, mask)
    return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy: logits float32[..., classes], labels int32[...] -> []."""
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return jnp.mean(log_normalizer - picked)


# ----------------------------------------------------------------------------
# Tasks: data, model, loss and held-out evaluation behind one interface.


@dataclasses.dataclass(frozen=True)
class Task:
  """A training problem, the same for every optimizer.

  Attributes:
    name: short name ("digits", "text").
    title: one line describing model and data.
    heldout: name of the held-out split ("test", "val").
    train: the hyperparameters.
    init: PRNG key -> float32 variables.
    loss: (variables, batch) -> float32[] mean loss.
    sample: PRNG key -> a training minibatch.
    eval_batches: split name ("train" and `heldout`) -> a fixed batch.
    accuracy: (variables, batch) -> float32[] accuracy, or None.
  """

  name: str
  title: str
  heldout: str
  train: TrainConfig
  init: Callable[[jax.Array], Any]
  loss: Callable[[Any, Any], jax.Array]
  sample: Callable[[jax.Array], Any]
  eval_batches: dict[str, Any]
  accuracy: Optional[Callable[[Any, Any], jax.Array]] = None


def digits_task(config: CnnConfig, train: TrainConfig) -> Task:
  """The digits CNN task on `demo.load_digits_split()` (images reshaped to 8x8x1)."""
  data = demo.load_digits_split()
  train_images = jnp.asarray(data.train_images).reshape(-1, 8, 8, 1)
  train_labels = jnp.asarray(data.train_labels)
  model = DigitsCNN(config)

  def loss(variables, batch):
    images, labels = batch
    return cross_entropy(model.apply(variables, images), labels)

  def sample(key):
    index = jax.random.randint(key, (train.batch_size,), 0, train_labels.shape[0])
    return train_images[index], train_labels[index]

  def accuracy(variables, batch):
    images, labels = batch
    predictions = jnp.argmax(model.apply(variables, images), axis=-1)
    return jnp.mean((predictions == labels).astype(jnp.float32))

  test = (jnp.asarray(data.test_images).reshape(-1, 8, 8, 1), jnp.asarray(data.test_labels))
  return Task(
      name="digits",
      title=(f"CNN conv{'-'.join(map(str, config.conv_features))} + dense "
             f"{config.hidden} on digits 8x8 ({train_labels.shape[0]} train / "
             f"{test[1].shape[0]} test images)"),
      heldout="test", train=train,
      init=lambda key: model.init(key, jnp.zeros((1, 8, 8, 1), jnp.float32)),
      loss=loss, sample=sample,
      eval_batches={"train": (train_images, train_labels), "test": test},
      accuracy=accuracy)


@functools.lru_cache(maxsize=1)
def load_text() -> tuple[str, str]:
  """(train, validation) text: Python's pydoc topics, sorted by topic, split 90/10."""
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top  (stdlib data)

  topics = pydoc_data.topics.topics
  text = "\n\n".join(topics[name] for name in sorted(topics))
  split = int(round(len(text) * (1 - TEXT_VAL_FRACTION)))
  return text[:split], text[split:]


def _windows(tokens: np.ndarray, count: int, length: int) -> np.ndarray:
  """int32[count, length]: `count` windows of `tokens` at evenly spaced starts."""
  starts = np.linspace(0, len(tokens) - length, count).astype(np.int64)
  return np.stack([tokens[s:s + length] for s in starts])


def text_task(config: LmConfig, train: TrainConfig) -> Task:
  """The character language model task on `load_text()`."""
  train_text, val_text = load_text()
  vocab = sorted(set(train_text) | set(val_text))
  code = {ch: i for i, ch in enumerate(vocab)}
  encode = lambda s: np.fromiter((code[ch] for ch in s), np.int32, len(s))
  train_tokens, val_tokens = encode(train_text), encode(val_text)
  model = CharTransformer(config, len(vocab))
  window = config.context + 1
  train_device = jnp.asarray(train_tokens)

  def loss(variables, windows):
    return cross_entropy(model.apply(variables, windows[:, :-1]), windows[:, 1:])

  def sample(key):
    starts = jax.random.randint(key, (train.batch_size,), 0, len(train_tokens) - window)
    return jax.vmap(lambda s: jax.lax.dynamic_slice(train_device, (s,), (window,)))(starts)

  return Task(
      name="text",
      title=(f"char transformer {config.num_layers} layers, d_model {config.d_model}, "
             f"{config.num_heads} heads, context {config.context}, vocab {len(vocab)} "
             f"on pydoc topics ({len(train_tokens):,} train / {len(val_tokens):,} val chars)"),
      heldout="val", train=train,
      init=lambda key: model.init(key, jnp.zeros((1, config.context), jnp.int32)),
      loss=loss, sample=sample,
      eval_batches={
          "train": jnp.asarray(_windows(train_tokens, config.eval_windows, window)),
          "val": jnp.asarray(_windows(val_tokens, config.eval_windows, window))})


# ----------------------------------------------------------------------------
# Optimizers and their state.


def make_optimizer(name: str, train: TrainConfig) -> optax.GradientTransformation:
  """`name` (one of OPTIMIZERS) with the task's schedule and weight decay."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, train.learning_rate, train.warmup_steps, train.steps,
      end_value=0.1 * train.learning_rate)
  factory = {"adamw": optax.adamw, "adamw_8bit": jq.optim.adamw_8bit,
             "adamw_4bit": jq.optim.adamw_4bit}[name]
  return factory(_standard_promotion(schedule), b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=train.weight_decay)


def _standard_promotion(fn: Callable) -> Callable:
  """`fn` traced with standard dtype promotion (optax's schedules mix float and int32)."""
  def wrapped(*args):
    with jax.numpy_dtype_promotion("standard"):
      return fn(*args)
  return wrapped


def _is_qarray(x) -> bool:
  return isinstance(x, jq.QArray)


def state_bytes(state) -> int:
  """Bytes of an optimizer state, QArrays counted with their codes packed."""
  return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(state, is_leaf=_is_qarray))


def quantized_fraction(state) -> float:
  """Fraction of the state's tensor elements (moments; not step counts) held in QArrays."""
  leaves = [x for x in jax.tree.leaves(state, is_leaf=_is_qarray) if len(x.shape) >= 1]
  total = sum(math.prod(x.shape) for x in leaves)
  return sum(math.prod(x.shape) for x in leaves if _is_qarray(x)) / max(total, 1)


def float_state_params(state) -> list[str]:
  """Parameter paths whose (non-scalar) moments stayed float32, in tree order."""
  names = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_qarray):
    if _is_qarray(leaf) or len(leaf.shape) < 1:
      continue
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    name = "/".join(k for k in keys if k != "params")
    if name not in names:
      names.append(name)
  return names


# ----------------------------------------------------------------------------
# Training.


@dataclasses.dataclass
class Run:
  """One training run.

  Attributes:
    step_losses: float32[steps] minibatch losses.
    eval_steps: steps at which the fixed splits were evaluated (0 first).
    evals: split name -> losses at `eval_steps`.
    accuracy: held-out accuracy at the end (None for tasks without one).
    seconds: wall time including compilation.
  """

  step_losses: np.ndarray
  eval_steps: list[int]
  evals: dict[str, list[float]]
  accuracy: Optional[float]
  seconds: float


class Trainer:
  """Jitted init, training chunks and evaluation of one task with one optimizer."""

  def __init__(self, task: Task, optimizer_name: str):
    self.task = task
    self.name = optimizer_name
    self.optimizer = make_optimizer(optimizer_name, task.train)
    # optax's own code computes `decay ** count` (float ** int32) and needs standard
    # dtype promotion; our 8-bit transforms run under strict promotion as they are.
    self.promotion = "standard" if optimizer_name == REFERENCE else None
    self.init = jax.jit(self._init)
    self.train_chunk = jax.jit(self._train_chunk, static_argnames="length")
    self.evaluate = jax.jit(self._evaluate)

  def _update(self, grads, state, params):
    if self.promotion is None:
      return self.optimizer.update(grads, state, params)
    with jax.numpy_dtype_promotion(self.promotion):
      return self.optimizer.update(grads, state, params)

  def _init(self, key):
    params = self.task.init(key)
    return params, self.optimizer.init(params)

  def _train_chunk(self, params, state, key, start, *, length):
    """`length` steps from step `start`; minibatch i is drawn from fold_in(key, i)."""
    def step(carry, i):
      params, state = carry
      batch = self.task.sample(jax.random.fold_in(key, i))
      loss, grads = jax.value_and_grad(self.task.loss)(params, batch)
      updates, state = self._update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    steps = start + jnp.arange(length, dtype=jnp.int32)
    (params, state), losses = jax.lax.scan(step, (params, state), steps)
    return params, state, losses

  def _evaluate(self, params):
    losses = {split: self.task.loss(params, batch)
              for split, batch in self.task.eval_batches.items()}
    accuracy = (None if self.task.accuracy is None else
                self.task.accuracy(params, self.task.eval_batches[self.task.heldout]))
    return losses, accuracy

  def run(self, seed: int, log: Callable[[str], None]) -> Run:
    """Trains from `seed` (init key `key(seed)`, batch key `key(seed + 1000)`)."""
    start_time = time.perf_counter()
    train = self.task.train
    params, state = self.init(jax.random.key(seed))
    key = jax.random.key(seed + 1000)
    step_losses, eval_steps, evals = [], [], {s: [] for s in self.task.eval_batches}
    step = 0
    while True:
      losses, accuracy = jax.device_get(self.evaluate(params))
      eval_steps.append(step)
      for split, value in losses.items():
        evals[split].append(float(value))
      if step == train.steps:
        break
      length = min(train.eval_every, train.steps - step)
      params, state, chunk = self.train_chunk(params, state, key, jnp.int32(step),
                                              length=length)
      step_losses.append(np.asarray(chunk))
      step += length
      log(f"  {self.task.name:6s} {self.name:10s} seed {seed}  step {step:5d}/"
          f"{train.steps}  batch loss {float(np.mean(step_losses[-1])):.4f}  "
          f"[{time.perf_counter() - start_time:5.1f} s]")
    seconds = time.perf_counter() - start_time
    heldout = evals[self.task.heldout][-1]
    log(f"  {self.task.name:6s} {self.name:10s} seed {seed}  done: train loss "
        f"{evals['train'][-1]:.4f}, {self.task.heldout} loss {heldout:.4f}"
        + ("" if accuracy is None else f", accuracy {float(accuracy):.2%}")
        + f"  [{seconds:.1f} s]")
    return Run(np.concatenate(step_losses), eval_steps, evals,
               None if accuracy is None else float(accuracy), seconds)

  def state_summary(self) -> dict[str, Any]:
    """Bytes, quantized fraction and float32 leaves of this optimizer's state."""
    _, state = self.init(jax.random.key(0))
    return {"state_bytes": state_bytes(state),
            "quantized_fraction": quantized_fraction(state),
            "float32_params": float_state_params(state) if self.name != REFERENCE else []}


# ----------------------------------------------------------------------------
# Statistics and reporting.


def mean_std(values) -> tuple[float, float]:
  """(mean, sample standard deviation; 0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(task: Task, runs: dict[str, list[Run]], states: dict[str, dict]) -> dict:
  """Per optimizer: final losses (mean, std, per seed), curves, state; comparisons."""
  summary = {"title": task.title, "heldout": task.heldout,
             "config": dataclasses.asdict(task.train), "optimizers": {}}
  for name, seed_runs in runs.items():
    entry = dict(states[name])
    for split in task.eval_batches:
      finals = [r.evals[split][-1] for r in seed_runs]
      entry[f"{split}_loss"] = dict(zip(("mean", "std"), mean_std(finals)), seeds=finals)
    if seed_runs[0].accuracy is not None:
      accs = [r.accuracy for r in seed_runs]
      entry["accuracy"] = dict(zip(("mean", "std"), mean_std(accs)), seeds=accs)
    entry["seconds"] = sum(r.seconds for r in seed_runs)
    entry["curves"] = {
        "eval_steps": seed_runs[0].eval_steps,
        **{split: np.mean([r.evals[split] for r in seed_runs], axis=0).tolist()
           for split in task.eval_batches},
        "step_loss": np.mean([r.step_losses for r in seed_runs], axis=0).tolist()}
    summary["optimizers"][name] = entry
  summary["comparisons"] = compare(summary, task)
  return summary


def compare(summary: dict, task: Task) -> dict:
  """For each quantized optimizer and split: relative diff, spread, target verdict."""
  reference = summary["optimizers"].get(REFERENCE)
  if reference is None:
    return {}
  comparisons = {}
  for name, entry in summary["optimizers"].items():
    if name == REFERENCE:
      continue
    comparisons[name] = {}
    for split in task.eval_batches:
      ref, ours = reference[f"{split}_loss"], entry[f"{split}_loss"]
      diff = ours["mean"] - ref["mean"]
      paired = np.subtract(ours["seeds"], ref["seeds"])
      within_1pct = abs(diff) <= TARGET_RELATIVE * abs(ref["mean"])
      within_spread = abs(diff) <= ref["std"]
      comparisons[name][split] = {
          "diff": diff, "relative": diff / ref["mean"], "spread": ref["std"],
          "paired_diff_std": mean_std(paired)[1],
          "within_1pct": bool(within_1pct), "within_spread": bool(within_spread),
          "holds": bool(within_1pct or within_spread)}
  return comparisons


def _pm(stat: dict, fmt: str = ".4f") -> str:
  return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"


def format_table(summary: dict, seeds: int) -> str:
  """The results of one task as text lines."""
  heldout = summary["heldout"]
  cfg = summary["config"]
  has_accuracy = "accuracy" in next(iter(summary["optimizers"].values()))
  lines = [f"{summary['title']}",
           f"{cfg['steps']} steps, batch {cfg['batch_size']}, peak lr "
           f"{cfg['learning_rate']:g}, weight decay {cfg['weight_decay']:g}, "
           f"{seeds} seeds (mean ± std)",
           f"{'optimizer':11s} {'train loss':>17s} {heldout + ' loss':>17s}"
           + (f" {heldout + ' acc %':>15s}" if has_accuracy else "")
           + f" {'state bytes':>12s} {'quantized':>9s} {'time s':>7s}"]
  for name, entry in summary["optimizers"].items():
    acc = ""
    if has_accuracy:
      acc = " " + _pm({k: 100 * entry["accuracy"][k] for k in ("mean", "std")}, ".2f").rjust(15)
    lines.append(f"{name:11s} {_pm(entry['train_loss']):>17s} "
                 f"{_pm(entry[heldout + '_loss']):>17s}{acc} {entry['state_bytes']:>12,d} "
                 f"{entry['quantized_fraction']:>9.1%} {entry['seconds']:>7.1f}")
  for name, by_split in summary["comparisons"].items():
    for split, c in by_split.items():
      direction = "lower" if c["diff"] < 0 else "higher"
      verdict = ("holds" if c["holds"] else "MISSED") + " (" + ", ".join(
          [w for w, ok in (("within 1%", c["within_1pct"]),
                           ("within seed spread", c["within_spread"])) if ok]
          or [f"{direction} than {REFERENCE} by more than 1% and more than the seed "
              f"spread"]) + ")"
      lines.append(f"  {name} vs {REFERENCE}, final {split} loss: {c['relative']:+.2%} "
                   f"relative (diff {c['diff']:+.4f}, seed std {c['spread']:.4f}, "
                   f"paired-diff std {c['paired_diff_std']:.4f}): target {verdict}")
  for name, entry in summary["optimizers"].items():
    if entry["float32_params"]:
      lines.append(f"  {name}: float32 moments kept for {len(entry['float32_params'])} "
                   f"leaves under min_size elements ({1 - entry['quantized_fraction']:.1%} "
                   f"of the state): {describe_params(entry['float32_params'])}")
  return "\n".join(lines)


def describe_params(names: list[str]) -> str:
  """A short description of parameter paths: LayerNorm and bias leaves counted."""
  layer_norm = [n for n in names if "LayerNorm" in n]
  biases = [n for n in names if n.endswith("/bias") and n not in layer_norm]
  others = [n for n in names if n not in layer_norm and n not in biases]
  counted = [f"{len(biases)} biases" if biases else "",
             f"{len(layer_norm)} LayerNorm scales/biases" if layer_norm else ""]
  return ", ".join(others + [c for c in counted if c])


# ----------------------------------------------------------------------------
# Plot.


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average (shorter windows at the start)."""
  cumulative = np.cumsum(np.concatenate([[0.0], values]))
  index = np.arange(1, len(values) + 1)
  lo = np.maximum(index - window, 0)
  return (cumulative[index] - cumulative[lo]) / (index - lo)


def _minor_label(value: float, _) -> str:
  """Labels minor log ticks at 2, 3 and 5 times a power of ten (the rest stay unlabelled)."""
  leading = value / 10 ** math.floor(math.log10(value) + 1e-9)
  return f"{value:g}" if round(leading) in (2, 3, 5) else ""


def plot(results: dict, path: pathlib.Path) -> bool:
  """Writes the loss curves of every task to `path`; False when matplotlib is missing."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed, so no plot was written; install it with: "
          "pip install matplotlib", file=sys.stderr)
    return False
  tasks = list(results)
  fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 8.5), squeeze=False,
                           gridspec_kw={"height_ratios": [2, 1]})
  colors = dict(zip(OPTIMIZERS, ("tab:blue", "tab:orange", "tab:green")))
  for column, task_name in enumerate(tasks):
    summary = results[task_name]
    heldout = summary["heldout"]
    top, bottom = axes[0][column], axes[1][column]
    reference = summary["optimizers"].get(REFERENCE)
    for name, entry in summary["optimizers"].items():
      curves, color = entry["curves"], colors.get(name)
      step_loss = np.asarray(curves["step_loss"])
      window = max(len(step_loss) // 30, 1)
      top.plot(np.arange(1, len(step_loss) + 1), _smooth(step_loss, window), color=color,
               alpha=0.45, lw=1, label=f"{name}: train batches (moving avg of {window})")
      top.plot(curves["eval_steps"], curves[heldout], color=color, marker="o", ms=3,
               lw=1.8, label=f"{name}: {heldout} split")
      if reference is not None and name != REFERENCE:
        ref = np.asarray(reference["curves"][heldout])
        bottom.plot(curves["eval_steps"], 100 * (np.asarray(curves[heldout]) - ref) / ref,
                    color=color, marker="o", ms=3, label=name)
    top.set_yscale("log")
    top.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    top.yaxis.set_minor_formatter(ticker.FuncFormatter(_minor_label))
    top.tick_params(axis="y", which="minor", labelsize=7)
    top.set_title(textwrap.fill(f"{task_name}: {summary['title']}", 70), fontsize=9)
    top.set_ylabel("cross-entropy (mean over seeds)")
    top.grid(True, which="both", alpha=0.3)
    top.legend(fontsize=8)
    bottom.axhspan(-100 * TARGET_RELATIVE, 100 * TARGET_RELATIVE, color="gray", alpha=0.2,
                   label="±1%")
    bottom.axhline(0, color=colors[REFERENCE], lw=1)
    bottom.set_xlabel("step")
    bottom.set_ylabel(f"{heldout} loss vs {REFERENCE} (%)")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=8)
  fig.suptitle("Float32 vs block-wise quantized AdamW moments: same seeds, same batches")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


# ----------------------------------------------------------------------------
# Command line.


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny models, 100 steps, 2 seeds, no 4-bit: a ~30 s smoke run")
  parser.add_argument("--steps", type=int, default=None,
                      help="steps per task (default: 400; 100 with --quick)")
  parser.add_argument("--seeds", type=int, default=None,
                      help="seeds per optimizer (default: 5; 2 with --quick)")
  parser.add_argument("--optimizers", default=None,
                      help=f"comma-separated subset of {','.join(OPTIMIZERS)} (default: "
                           f"all; adamw,adamw_8bit with --quick)")
  parser.add_argument("--tasks", default="digits,text",
                      help="comma-separated subset of digits,text (default: both)")
  parser.add_argument("--plot", type=pathlib.Path, default=DEFAULT_PLOT,
                      help=f"PNG of the loss curves (default: {DEFAULT_PLOT})")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the numbers (and mean curves) as JSON to this path")
  args = parser.parse_args(argv)
  args.seeds = args.seeds or (2 if args.quick else 5)
  args.optimizers = (args.optimizers or ("adamw,adamw_8bit" if args.quick
                                         else ",".join(OPTIMIZERS))).split(",")
  args.tasks = args.tasks.split(",")
  for value, allowed, flag in ((args.optimizers, OPTIMIZERS, "--optimizers"),
                               (args.tasks, ("digits", "text"), "--tasks")):
    unknown = [v for v in value if v not in allowed]
    if unknown:
      parser.error(f"{flag}={','.join(value)}: unknown {unknown}; expected some of "
                   f"{','.join(allowed)}")
  if args.seeds < 1 or (args.steps is not None and args.steps < 1):
    parser.error(f"--seeds={args.seeds} --steps={args.steps}: expected at least 1")
  return args


def build_task(name: str, args: argparse.Namespace) -> Task:
  """The task `name` with the sizes of the full or the quick run (and --steps)."""
  model_config, train = (QUICK if args.quick else FULL)[name]
  if args.steps is not None:
    train = dataclasses.replace(train, steps=args.steps,
                                warmup_steps=min(train.warmup_steps, args.steps // 10))
  return (digits_task if name == "digits" else text_task)(model_config, train)


def main(argv=None) -> dict:
  """Runs the comparison; returns {task: summary} (also written with --json)."""
  args = parse_args(argv)
  log = functools.partial(print, flush=True)
  start = time.perf_counter()
  results = {}
  for task_name in args.tasks:
    task = build_task(task_name, args)
    log(f"== {task_name}: {task.title}")
    runs, states = {}, {}
    for name in args.optimizers:
      trainer = Trainer(task, name)
      states[name] = trainer.state_summary()
      log(f"  {name}: optimizer state {states[name]['state_bytes']:,} bytes, "
          f"{states[name]['quantized_fraction']:.1%} of state elements quantized")
      runs[name] = [trainer.run(seed, log) for seed in range(args.seeds)]
    results[task_name] = summarize(task, runs, states)
  seconds = time.perf_counter() - start
  print()
  for summary in results.values():
    print(format_table(summary, args.seeds), end="\n\n")
  print(f"Total time {seconds:.0f} s ({jax.device_count()} {jax.default_backend()} device)")
  if args.plot and plot(results, args.plot):
    print(f"Loss curves written to {args.plot}")
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"seconds": seconds, "seeds": args.seeds,
                                     "tasks": results}, indent=1))
    print(f"Numbers written to {args.json}")
  return results


if __name__ == "__main__":
  main()
