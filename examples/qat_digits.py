"""Quantization-aware training of a digits CNN: float vs PTQ vs QAT at W4A8 and W2A8.

The quality proof of `jq.qat`. A small Flax Linen CNN (3x3 convolutions with 16 and
32 channels, each followed by ReLU and 2x2 max pooling, Dense 64, Dense 10) is
trained in float on scikit-learn's 8x8 digits images with the fixed 75/25
train/test split of `jaxquant.demo`. Then, for each run (a weight format and a way
to train it):

* PTQ: every kernel is quantized per output channel (`jq.quantize_tree`; conv
  kernels [h, w, in, out] and dense kernels [in, out] both with channel_axes=(-1,)),
  biases stay float; the input of every layer after the first (all of them after a
  ReLU) is quantized to uint8 with a static range calibrated on a few training
  batches (`jq.qat.pact` with that range as its clip).
* QAT: the float model is fine-tuned with the quantizers in the loop: weights through
  `jq.qat.fake_quant_tree` (straight-through, the scale recalibrated from the weights
  each step) or `jq.qat.lsq` (the step sizes are ordinary parameters updated by the
  same Adam), optionally plus `jq.qat.dampening_loss`; activations through
  `jq.qat.pact`, its clip initialized at the calibrated range and learned.
* Conversion: the QAT weights become real QArrays (`jq.quantize_tree` with the same
  rules, `jq.qat.lsq_quantize` for LSQ weights), and the converted model's logits are
  compared with the fake-quantized model's: they must be equal, bit for bit.

Weight formats: int4 (absmax), int2 (all four codes -2..1, MSE-chosen clipping) and
ternary ({-1, 0, 1} times mean|w|). A control, the float model fine-tuned with the
QAT schedule and minibatches but no quantizers, shows what the extra training alone
does. The script prints test accuracy and test cross-entropy (mean ± std over
seeds) and checks:

* W4A8: QAT recovers at least 70% of what PTQ loses, recovery = (QAT - PTQ) /
  (float - PTQ), on accuracy (when PTQ loses at least one test image on average)
  and on test cross-entropy (PTQ loses there even when the argmax survives), both
  as is and against the control: 1 - (control - QAT) / (float - PTQ).
* W2A8: QAT beats PTQ in accuracy, for every 2-bit run.
* The converted models reproduce the fake-quantized logits exactly.

  python examples/qat_digits.py                  # ~3 min on 2 busy CPU cores
  python examples/qat_digits.py --quick          # a ~30 s smoke run (the test's)
  python examples/qat_digits.py --seeds 5 --json results.json --plot qat.png

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
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from jaxquant import demo

# Layer names in the order they run; every layer's input but the first one's (the
# images) is quantized.
LAYERS = ("conv0", "conv1", "dense0", "dense1")
QUANTIZED_INPUTS = LAYERS[1:]
TARGET_RECOVERY = 0.70  # W4A8: QAT recovers at least 70% of what PTQ loses
RECOVERY_ON = "W4A8"
# Accuracy recovery is only meaningful when PTQ loses something: at least one test
# image on average over the seeds.
MIN_ACCURACY_LOSS_IMAGES = 1.0


# ----------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Adam with a warmup + cosine schedule on random minibatches.

  Attributes:
    steps: optimizer steps.
    batch_size: images per step.
    learning_rate: peak learning rate (linear warmup from 0, cosine to 5% of it).
    warmup_steps: steps of linear warmup.
  """

  steps: int
  batch_size: int
  learning_rate: float
  warmup_steps: int


@dataclasses.dataclass(frozen=True)
class QuantRun:
  """One weight format, trained one way; activations are always uint8 (A8).

  Attributes:
    name: a short label, e.g. "W2A8 int2 LSQ".
    bits: weight bits.
    weight_spec: the per-output-channel spec of every kernel.
    method: "ste" (`jq.qat.fake_quant_tree`) or "lsq" (`jq.qat.lsq`, learned steps).
    dampening: weight of `jq.qat.dampening_loss` in the QAT loss (0: none).
  """

  name: str
  bits: int
  weight_spec: jq.QuantSpec
  method: str = "ste"
  dampening: float = 0.0


def _channel_spec(fmt: str, **kwargs) -> jq.QuantSpec:
  return jq.QuantSpec(fmt, channel_axes=(-1,), **kwargs)


INT4 = _channel_spec("int4")  # absmax: ±7 steps
# All four 2-bit codes, -2..1, with the clipping ratio of least squared error.
INT2 = _channel_spec("int2", full_range=True, calibration="mse")
TERNARY = _channel_spec("ternary")  # {-1, 0, 1} * mean|w| (BitNet b1.58)
RUNS = (
    QuantRun("W4A8", 4, INT4),
    QuantRun("W4A8 LSQ", 4, INT4, method="lsq"),
    QuantRun("W2A8 int2", 2, INT2),
    QuantRun("W2A8 int2 +damp", 2, INT2, dampening=1e-3),
    QuantRun("W2A8 int2 LSQ", 2, INT2, method="lsq"),
    QuantRun("W2A8 ternary", 2, TERNARY),
    QuantRun("W2A8 ternary LSQ", 2, TERNARY, method="lsq"),
)
QUICK_RUNS = ("W4A8", "W2A8 int2 LSQ", "W2A8 ternary")
ACT_BITS = 8


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run of the script depends on.

  Attributes:
    float_train: training of the float model from scratch.
    qat_train: QAT fine-tuning from the float model.
    calibration_batches: training batches (of `calibration_batch_size`) whose
      layer inputs set the static activation ranges.
    calibration_batch_size: images per calibration batch.
    act_calibration: "absmax" or "percentile:P" over the calibration inputs.
    runs: the `QuantRun`s.
  """

  float_train: TrainConfig
  qat_train: TrainConfig
  calibration_batches: int = 4
  calibration_batch_size: int = 128
  act_calibration: str = "absmax"
  runs: tuple[QuantRun, ...] = RUNS


FULL = Config(
    float_train=TrainConfig(steps=1000, batch_size=64, learning_rate=2e-3, warmup_steps=50),
    qat_train=TrainConfig(steps=400, batch_size=64, learning_rate=5e-4, warmup_steps=20))
QUICK = Config(
    float_train=TrainConfig(steps=400, batch_size=64, learning_rate=3e-3, warmup_steps=20),
    qat_train=TrainConfig(steps=200, batch_size=64, learning_rate=5e-4, warmup_steps=10),
    runs=tuple(r for r in RUNS if r.name in QUICK_RUNS))


# ----------------------------------------------------------------------------
# Model. Flax layers only, so nothing relies on implicit rank broadcasting.


InputQuantizer = Callable[[str, jax.Array], jax.Array]


class DigitsCNN(nn.Module):
  """3x3 conv + ReLU + 2x2 max pool per width, Dense + ReLU, Dense to 10 logits.

  Attributes:
    conv_features: channels of each 3x3 convolution.
    hidden: width of the hidden Dense layer.
  """

  conv_features: tuple[int, ...] = (16, 32)
  hidden: int = 64

  @nn.compact
  def __call__(self, images: jax.Array,
               quantize_input: Optional[InputQuantizer] = None) -> jax.Array:
    """float32[batch, 8, 8, 1] images in [0, 1] -> float32[batch, 10] logits.

    Args:
      images: the input images.
      quantize_input: ``(layer name, input) -> input``, applied to the input of
        every layer in QUANTIZED_INPUTS; None keeps activations in float. Every
        layer's input is also sown into the "intermediates" collection (for
        calibration).
    """
    def layer_input(name, x):
      self.sow("intermediates", f"{name}_input", x)
      if quantize_input is None or name not in QUANTIZED_INPUTS:
        return x
      return quantize_input(name, x)

    conv_names, dense_names = LAYERS[:len(self.conv_features)], LAYERS[len(self.conv_features):]
    x = images
    for name, features in zip(conv_names, self.conv_features):
      x = nn.Conv(features, (3, 3), name=name)(layer_input(name, x))
      # max, not average: nn.avg_pool divides by an int, which strict promotion refuses
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name=dense_names[0])(layer_input(dense_names[0], x)))
    return nn.Dense(demo.NUM_CLASSES, name=dense_names[1])(layer_input(dense_names[1], x))


MODEL = DigitsCNN()


def pact_inputs(clips: dict[str, jax.Array], bits: int = ACT_BITS) -> InputQuantizer:
  """Quantizes each (non-negative, post-ReLU) layer input to uint`bits` on [0, clip]."""
  return lambda name, x: jq.qat.pact(x, clips[name], bits)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy: logits float32[n, classes], labels int32[n] -> []."""
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  return jnp.mean(log_normalizer - picked)


def kernel_rules(spec: jq.QuantSpec) -> list[jq.Rule]:
  """Every conv and dense kernel with `spec`; biases (and everything else) stay float."""
  return [jq.Rule(r"params/.*/kernel", spec), jq.Rule(r".*", None)]


# ----------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class Data:
  """The digits split of `jaxquant.demo` as NHWC images."""

  train_images: jax.Array  # float32[1348, 8, 8, 1]
  train_labels: jax.Array  # int32[1348]
  test_images: jax.Array  # float32[449, 8, 8, 1]
  test_labels: jax.Array  # int32[449]


def load_data() -> Data:
  split = demo.load_digits_split()
  return Data(jnp.asarray(split.train_images).reshape(-1, 8, 8, 1),
              jnp.asarray(split.train_labels),
              jnp.asarray(split.test_images).reshape(-1, 8, 8, 1),
              jnp.asarray(split.test_labels))


# ----------------------------------------------------------------------------
# Training: Adam with a precomputed schedule, in jitted chunks of steps.


CHUNK_STEPS = 100  # steps per jitted training call; every chunk of a loss shares one compile


def learning_rates(train: TrainConfig) -> np.ndarray:
  """float32[steps]: linear warmup from 0 to the peak, then cosine decay to 5% of it."""
  step = np.arange(train.steps, dtype=np.float64)
  warmup = np.minimum((step + 1) / max(train.warmup_steps, 1), 1.0)
  progress = np.clip((step - train.warmup_steps) / max(train.steps - train.warmup_steps, 1),
                     0.0, 1.0)
  cosine = 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * progress))
  return (train.learning_rate * np.where(step < train.warmup_steps, warmup, cosine)
          ).astype(np.float32)


def batch_indices(seed: int, phase: int, train: TrainConfig, num_examples: int) -> np.ndarray:
  """int32[steps, batch_size] minibatch indices (with replacement), drawn with numpy.

  Drawn on the host so the training programs need no PRNG (threefry is slow to
  compile on CPU); `phase` separates the float training (0) from QAT (1).
  """
  rng = np.random.default_rng([seed, phase])
  return rng.integers(0, num_examples, (train.steps, train.batch_size)).astype(np.int32)


ADAM = optax.scale_by_adam()


@functools.lru_cache(maxsize=None)
def make_train_chunk(loss: Callable) -> Callable:
  """Jitted ``(trainable, adam_state, images, labels, batches, learning_rates) ->
  (trainable, adam_state, cross-entropies)``: one Adam step per row of `batches`.

  `loss(trainable, images, labels) -> (total, cross-entropy)`.
  """
  @jax.jit
  def train_chunk(trainable, state, images, labels, batches, rates):
    def step(carry, inputs):
      trainable, state = carry
      index, rate = inputs
      (_, ce), grads = jax.value_and_grad(loss, has_aux=True)(
          trainable, images[index], labels[index])
      # optax computes `decay ** count` (float ** int32): standard promotion here.
      with jax.numpy_dtype_promotion("standard"):
        direction, state = ADAM.update(grads, state)
      trainable = jax.tree.map(lambda p, d: p - rate * d, trainable, direction)
      return (trainable, state), ce

    (trainable, state), losses = jax.lax.scan(step, (trainable, state), (batches, rates))
    return trainable, state, losses

  return train_chunk


def fit(loss: Callable, train: TrainConfig, trainable, data: Data, batches: np.ndarray):
  """Adam on `loss` with `train`'s schedule; step i uses ``data.train_images[batches[i]]``.

  Returns:
    (trained pytree, float32[steps] minibatch cross-entropies).
  """
  train_chunk = make_train_chunk(loss)
  with jax.numpy_dtype_promotion("standard"):
    state = ADAM.init(trainable)
  rates, losses = learning_rates(train), []
  for start in range(0, train.steps, CHUNK_STEPS):
    chunk = slice(start, start + CHUNK_STEPS)
    trainable, state, chunk_losses = train_chunk(
        trainable, state, data.train_images, data.train_labels, batches[chunk], rates[chunk])
    losses.append(np.asarray(chunk_losses))
  return trainable, np.concatenate(losses)


def float_loss(variables, images, labels):
  ce = cross_entropy(MODEL.apply(variables, images), labels)
  return ce, ce


# ----------------------------------------------------------------------------
# Quantized forward passes.


def lsq_weights(variables, steps: dict[str, jax.Array], spec: jq.QuantSpec):
  """`variables` with each kernel replaced by ``jq.qat.lsq(kernel, steps[path], spec)``."""
  def leaf(path, value):
    name = jq.tree.path_to_str(path)
    return jq.qat.lsq(value, steps[name], spec) if name in steps else value
  return jax.tree_util.tree_map_with_path(leaf, variables)


def qat_weights(run: QuantRun, trainable):
  """The fake-quantized variables the QAT model runs with."""
  if run.method == "lsq":
    return lsq_weights(trainable["variables"], trainable["steps"], run.weight_spec)
  return jq.qat.fake_quant_tree(trainable["variables"], kernel_rules(run.weight_spec))


@functools.lru_cache(maxsize=None)
def make_qat_loss(run: QuantRun) -> Callable:
  """``(trainable, images, labels) -> (loss, cross-entropy)`` with quantizers in the loop."""
  rules = kernel_rules(run.weight_spec)

  def loss(trainable, images, labels):
    logits = MODEL.apply(qat_weights(run, trainable), images,
                         quantize_input=pact_inputs(trainable["clips"]))
    ce = cross_entropy(logits, labels)
    total = ce
    if run.dampening:
      total = ce + run.dampening * jq.qat.dampening_loss(trainable["variables"], rules)
    return total, ce

  return loss


@jax.jit
def evaluate(variables, clips, images, labels):
  """(accuracy, cross-entropy, logits) of the model; clips None: float activations."""
  quantize_input = None if clips is None else pact_inputs(clips)
  logits = MODEL.apply(variables, images, quantize_input=quantize_input)
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return accuracy, cross_entropy(logits, labels), logits


@jax.jit
def evaluate_qarrays(qvariables, clips, images, labels):
  """`evaluate` of a model whose kernels are QArrays (dequantized inside the jit)."""
  return evaluate(jq.dequantize_tree(qvariables), clips, images, labels)


@jax.jit
def layer_inputs(variables, images) -> dict[str, jax.Array]:
  """{layer name: its input} for each quantized input, from the "intermediates" sown."""
  _, state = MODEL.apply(variables, images, mutable=["intermediates"])
  return {name: state["intermediates"][f"{name}_input"][0] for name in QUANTIZED_INPUTS}


def calibrate_clips(variables, data: Data, config: Config, seed: int) -> dict[str, jax.Array]:
  """Static range (float32[]) of each quantized layer input over a few training batches.

  The range is the largest value ("absmax") or a percentile ("percentile:P") of the
  inputs seen; all of them follow a ReLU, so the range is [0, clip].
  """
  count = config.calibration_batches * config.calibration_batch_size
  index = np.random.default_rng([seed, 2]).permutation(data.train_labels.shape[0])[:count]
  inputs = jax.device_get(layer_inputs(variables, data.train_images[index]))
  method, _, percent = config.act_calibration.partition(":")
  if method == "absmax" and not percent:
    clips = {name: np.max(x) for name, x in inputs.items()}
  elif method == "percentile":
    clips = {name: np.percentile(x, float(percent)) for name, x in inputs.items()}
  else:
    raise ValueError(f"act_calibration={config.act_calibration!r}; expected 'absmax' or "
                     "'percentile:P'")
  return {name: jnp.asarray(clip, jnp.float32) for name, clip in clips.items()}


@jax.jit
def _init_variables(key: jax.Array) -> dict[str, Any]:
  return {"params": MODEL.init(key, jnp.zeros((1, 8, 8, 1), jnp.float32))["params"]}


def init_variables(seed: int) -> dict[str, Any]:
  """Fresh float32 variables ``{"params": {"conv0": ..., ..., "dense1": ...}}``.

  The key is an "rbg" key: Flax's initializers compile about 3x faster with it than
  with the default threefry key on CPU.
  """
  return _init_variables(jax.random.key(seed, impl="rbg"))


def _is_kernel(path) -> bool:
  return jq.tree.path_to_str(path).endswith("/kernel")


@functools.lru_cache(maxsize=None)
def make_ptq_evaluate(spec: jq.QuantSpec) -> Callable:
  """Jitted ``(variables, clips, images, labels) -> (accuracy, cross-entropy)`` after
  PTQ: every kernel quantized to a QArray by `jq.quantize_tree`, then dequantized."""
  def ptq_evaluate(variables, clips, images, labels):
    qvariables = jq.quantize_tree(variables, kernel_rules(spec))
    return evaluate(jq.dequantize_tree(qvariables), clips, images, labels)[:2]
  return jax.jit(ptq_evaluate)


@functools.lru_cache(maxsize=None)
def make_lsq_init(spec: jq.QuantSpec) -> Callable:
  """Jitted ``variables -> ({kernel path: jq.qat.lsq_init(kernel, spec)}, {kernel
  path: the PTQ scale})``."""
  def init(variables):
    kernels = {jq.tree.path_to_str(path): value for path, value in
               jax.tree_util.tree_leaves_with_path(variables) if _is_kernel(path)}
    return ({name: jq.qat.lsq_init(w, spec) for name, w in kernels.items()},
            {name: jq.quantize(w, spec).scale for name, w in kernels.items()})
  return jax.jit(init)


@functools.lru_cache(maxsize=None)
def make_convert(run: QuantRun) -> Callable:
  """Jitted ``trainable -> variables with QArray kernels``: the model one would serve.

  Converted under `jax.jit`, as the fake-quantized model runs: with
  calibration="mse", an eager `jq.quantize` can pick a scale one float32 ulp away
  from the jitted one (its candidate clipping ratios come from `jnp.linspace`,
  whose values differ in the last bit between eager and jitted code).
  """
  if run.method != "lsq":
    return jax.jit(lambda trainable: jq.quantize_tree(trainable["variables"],
                                                      kernel_rules(run.weight_spec)))

  def convert(trainable):
    steps = trainable["steps"]

    def leaf(path, value):
      name = jq.tree.path_to_str(path)
      return (jq.qat.lsq_quantize(value, steps[name], run.weight_spec) if name in steps
              else value)

    return jax.tree_util.tree_map_with_path(leaf, trainable["variables"])

  return jax.jit(convert)


@functools.lru_cache(maxsize=None)
def make_fake_weights(run: QuantRun) -> Callable:
  """Jitted ``trainable -> the fake-quantized variables`` the QAT model runs with."""
  return jax.jit(functools.partial(qat_weights, run))


@functools.lru_cache(maxsize=None)
def make_qat_evaluate(run: QuantRun) -> Callable:
  """Jitted `evaluate` of the QAT model (fake-quantized weights and activations)."""
  return jax.jit(lambda trainable, images, labels: evaluate(
      qat_weights(run, trainable), trainable["clips"], images, labels))


def max_abs_diff(a, b) -> float:
  """Largest |a - b| over the leaves of two pytrees of arrays, on the host."""
  diffs = [np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0)
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return float(max(diffs, default=0.0))


def _bits_per_weight(converted) -> float:
  """Bits per kernel element of the QArray kernels, scales included (codes packed)."""
  kernels = [x for x in jax.tree.leaves(converted, is_leaf=lambda x: isinstance(x, jq.QArray))
             if isinstance(x, jq.QArray)]
  return 8 * sum(q.nbytes for q in kernels) / sum(math.prod(q.shape) for q in kernels)


def _step_stats(initial: dict, final: dict, ptq_scales: dict) -> dict:
  """How LSQ's learned steps moved: final / initial, both against the PTQ scales."""
  ratio = lambda a, b: np.concatenate([np.asarray(a[n] / b[n]).ravel() for n in a])
  moved, init_vs_ptq = ratio(final, initial), ratio(initial, ptq_scales)
  return {"init_over_ptq_scale_median": float(np.median(init_vs_ptq)),
          "final_over_ptq_scale_median": float(np.median(ratio(final, ptq_scales))),
          "final_over_init_median": float(np.median(moved)),
          "final_over_init_min": float(moved.min()),
          "final_over_init_max": float(moved.max())}


# ----------------------------------------------------------------------------
# One seed.


def _metrics(acc, ce) -> dict:
  return {"accuracy": float(acc), "loss": float(ce)}


def run_seed(seed: int, config: Config, data: Data, log: Callable[[str], None]) -> dict:
  """Float training, calibration, then PTQ, QAT and conversion for each run.

  Every QAT run of a seed (and the float fine-tuning control) sees the same
  minibatches.
  """
  start = time.perf_counter()
  elapsed = lambda: f"[{time.perf_counter() - start:5.1f} s]"
  num_train = int(data.train_labels.shape[0])
  variables, _ = fit(float_loss, config.float_train, init_variables(seed), data,
                     batch_indices(seed, 0, config.float_train, num_train))
  qat_batches = batch_indices(seed, 1, config.qat_train, num_train)
  test = (data.test_images, data.test_labels)
  result = {"float": _metrics(*evaluate(variables, None, *test)[:2]), "runs": {}}
  # Control: the float model fine-tuned with the QAT schedule and batches, no quantizers.
  tuned, _ = fit(float_loss, config.qat_train, variables, data, qat_batches)
  result["float_finetuned"] = _metrics(*evaluate(tuned, None, *test)[:2])
  clips = calibrate_clips(variables, data, config, seed)
  result["float_a8"] = _metrics(*evaluate(variables, clips, *test)[:2])
  result["clips"] = {k: float(v) for k, v in clips.items()}
  log(f"  seed {seed}  float: accuracy {result['float']['accuracy']:.2%}, test loss "
      f"{result['float']['loss']:.4f}; fine-tuned {config.qat_train.steps} more steps: "
      f"{result['float_finetuned']['accuracy']:.2%}, {result['float_finetuned']['loss']:.4f}"
      f"  {elapsed()}")

  for run in config.runs:
    ptq = _metrics(*make_ptq_evaluate(run.weight_spec)(variables, clips, *test))
    trainable = {"variables": variables, "clips": clips}
    if run.method == "lsq":
      trainable["steps"], ptq_scales = make_lsq_init(run.weight_spec)(variables)
    initial_steps = trainable.get("steps")
    trainable, losses = fit(make_qat_loss(run), config.qat_train, trainable, data,
                            qat_batches)
    qat_acc, qat_ce, fake_logits = make_qat_evaluate(run)(trainable, *test)
    qat_acc, qat_ce = float(qat_acc), float(qat_ce)
    # Conversion: real QArrays, run through the same activations. Separate programs,
    # compared on the host, as a user would compare the served and the trained model.
    converted = make_convert(run)(trainable)
    _, _, real_logits = evaluate_qarrays(converted, trainable["clips"], *test)
    weight_diff = max_abs_diff(make_fake_weights(run)(trainable),
                               jax.jit(jq.dequantize_tree)(converted))
    logit_diff = max_abs_diff(fake_logits, real_logits)
    entry = {
        "ptq": ptq,
        "qat": {**_metrics(qat_acc, qat_ce),
                "final_train_loss": float(np.mean(np.asarray(losses)[-50:]))},
        "conversion": {"max_abs_weight_diff": weight_diff, "max_abs_logit_diff": logit_diff,
                       "exact": weight_diff == 0.0 and logit_diff == 0.0,
                       "bits_per_weight": _bits_per_weight(converted)},
        "clips_final_over_calibrated": {k: float(v / clips[k])
                                        for k, v in trainable["clips"].items()},
    }
    if initial_steps is not None:
      entry["lsq_steps"] = _step_stats(initial_steps, trainable["steps"], ptq_scales)
    result["runs"][run.name] = entry
    log(f"  seed {seed}  {run.name:17s} PTQ {ptq['accuracy']:7.2%} (loss "
        f"{ptq['loss']:.4f})  QAT {qat_acc:7.2%} (loss {qat_ce:.4f})  converted: "
        f"max |logit diff| {logit_diff:.1e}  {elapsed()}")
  result["seconds"] = time.perf_counter() - start
  return result


# ----------------------------------------------------------------------------
# Statistics and reporting.


def mean_std(values) -> dict:
  """{"mean", "std" (sample; 0 for one value), "seeds"}."""
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(values.mean()), "std": std, "seeds": values.tolist()}


def summarize(seed_results: list[dict], config: Config, test_size: int) -> dict:
  """Means over seeds, recovery ratios and target verdicts.

  Recovery of a metric m (accuracy, or minus the test loss) is (m_QAT - m_PTQ) /
  (m_float - m_PTQ); "matched" recovery measures QAT against the float model
  fine-tuned with the same schedule and batches instead (so QAT gets no credit for
  its extra training): 1 - (m_float_finetuned - m_QAT) / (m_float - m_PTQ).
  """
  models = ("float", "float_finetuned", "float_a8")
  summary = {name: {m: mean_std([r[name][m] for r in seed_results])
                    for m in ("accuracy", "loss")} for name in models}
  summary["runs"] = {}
  mean = lambda name, m: summary[name][m]["mean"]
  for run in config.runs:
    per_seed = [r["runs"][run.name] for r in seed_results]
    entry = {"bits": run.bits, "format": run.weight_spec.format.name,
             "calibration": run.weight_spec.calibration, "method": run.method,
             "dampening": run.dampening}
    for phase in ("ptq", "qat"):
      entry[phase] = {m: mean_std([s[phase][m] for s in per_seed])
                      for m in ("accuracy", "loss")}
    # Signed so that higher is better for both metrics.
    sign = {"accuracy": 1.0, "loss": -1.0}
    for m in ("accuracy", "loss"):
      ptq, qat = sign[m] * entry["ptq"][m]["mean"], sign[m] * entry["qat"][m]["mean"]
      reference, tuned = sign[m] * mean("float", m), sign[m] * mean("float_finetuned", m)
      lost = reference - ptq
      # round: a mean over seeds of whole images is not exact in float
      meaningful = (round(lost * test_size, 3) >= MIN_ACCURACY_LOSS_IMAGES
                    if m == "accuracy" else lost > 0)
      entry[f"ptq_{m}_lost"] = lost
      entry[f"recovery_{m}"] = (qat - ptq) / lost if meaningful else None
      entry[f"recovery_{m}_matched"] = 1 - (tuned - qat) / lost if meaningful else None
    entry["ptq_accuracy_lost_images"] = entry["ptq_accuracy_lost"] * test_size
    entry["qat_minus_ptq_accuracy"] = mean_std(
        [s["qat"]["accuracy"] - s["ptq"]["accuracy"] for s in per_seed])
    entry["conversion"] = {
        "exact": all(s["conversion"]["exact"] for s in per_seed),
        "max_abs_logit_diff": max(s["conversion"]["max_abs_logit_diff"] for s in per_seed),
        "max_abs_weight_diff": max(s["conversion"]["max_abs_weight_diff"] for s in per_seed),
        "bits_per_weight": per_seed[0]["conversion"]["bits_per_weight"]}
    if "lsq_steps" in per_seed[0]:
      entry["lsq_steps"] = {k: float(np.mean([s["lsq_steps"][k] for s in per_seed]))
                            for k in per_seed[0]["lsq_steps"]}
    summary["runs"][run.name] = entry
  summary["targets"] = targets(summary)
  return summary


def targets(summary: dict) -> dict:
  """The W4A8 recovery target, the 2-bit "QAT beats PTQ" target, exact conversion."""
  verdicts = {}
  w4 = summary["runs"].get(RECOVERY_ON)
  if w4 is not None:
    checks = {k: w4[k] for k in ("recovery_accuracy", "recovery_accuracy_matched",
                                 "recovery_loss", "recovery_loss_matched")}
    measured = [v for v in checks.values() if v is not None]
    verdicts["w4a8_recovery"] = {
        "run": RECOVERY_ON, "target": TARGET_RECOVERY,
        "ptq_accuracy_lost_images": w4["ptq_accuracy_lost_images"],
        "accuracy_meaningful": w4["recovery_accuracy"] is not None, **checks,
        "holds": bool(measured) and all(v >= TARGET_RECOVERY for v in measured)}
  two_bit = {name: e for name, e in summary["runs"].items() if e["bits"] == 2}
  if two_bit:
    per_run = {name: {"ptq": e["ptq"]["accuracy"]["mean"],
                      "qat": e["qat"]["accuracy"]["mean"],
                      "holds": e["qat"]["accuracy"]["mean"] > e["ptq"]["accuracy"]["mean"]}
               for name, e in two_bit.items()}
    verdicts["w2a8_qat_beats_ptq"] = {"runs": per_run,
                                      "holds": all(v["holds"] for v in per_run.values())}
  verdicts["conversion_exact"] = all(e["conversion"]["exact"]
                                     for e in summary["runs"].values())
  return verdicts


def _pm(stat: dict, scale: float = 1.0, fmt: str = ".2f") -> str:
  return f"{scale * stat['mean']:{fmt}} ± {scale * stat['std']:{fmt}}"


def _percent(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{value:.0%}"


def format_table(summary: dict, seeds: int) -> str:
  """The results as text lines: one row per model, then the target verdicts."""
  header = (f"{'model':24s} {'test acc %':>15s} {'test loss':>17s} {'bits/w':>6s} "
            f"{'QAT-PTQ acc pts':>16s} {'converted':>10s}")
  lines = [header, "-" * len(header)]
  row = lambda name, e, bits: (f"{name:24s} {_pm(e['accuracy'], 100):>15s} "
                               f"{_pm(e['loss'], 1, '.4f'):>17s} {bits:>6s}")
  lines.append(row("float", summary["float"], "32"))
  lines.append(row("float +fine-tune (ctrl)", summary["float_finetuned"], "32"))
  lines.append(row("float, A8", summary["float_a8"], "32"))
  for name, e in summary["runs"].items():
    bits = f"{e['conversion']['bits_per_weight']:.2f}"
    lines.append(row(f"{name} PTQ", e["ptq"], bits))
    exact = "exact" if e["conversion"]["exact"] else (
        f"{e['conversion']['max_abs_logit_diff']:.1e}")
    lines.append(row(f"{name} QAT", e["qat"], bits)
                 + f" {_pm(e['qat_minus_ptq_accuracy'], 100):>16s} {exact:>10s}")
  lines.append(f"({seeds} seed{'s' if seeds > 1 else ''}, mean ± std. Weights per output "
               "channel, biases float; bits/w counts the float32 scales. A8: every layer "
               "input after the first in uint8, static range. Control: the float model "
               "fine-tuned on the QAT schedule and batches.)")
  lines.append("")
  for name, e in summary["runs"].items():
    extra = ""
    if "lsq_steps" in e:
      s = e["lsq_steps"]
      extra = (f"; LSQ steps: init {s['init_over_ptq_scale_median']:.2f}x the PTQ scale, "
               f"final {s['final_over_init_median']:.2f}x init (median; "
               f"{s['final_over_init_min']:.2f}-{s['final_over_init_max']:.2f})")
    lines.append(f"  {name}: PTQ loses {e['ptq_accuracy_lost_images']:.1f} test images and "
                 f"{e['ptq_loss_lost']:+.4f} test loss; QAT recovers "
                 f"{_percent(e['recovery_accuracy'])} of the accuracy "
                 f"({_percent(e['recovery_accuracy_matched'])} vs the control), "
                 f"{_percent(e['recovery_loss'])} of the loss "
                 f"({_percent(e['recovery_loss_matched'])} vs the control)" + extra)
  t = summary["targets"]
  if "w4a8_recovery" in t:
    v = t["w4a8_recovery"]
    acc = (f"accuracy {_percent(v['recovery_accuracy'])} "
           f"({_percent(v['recovery_accuracy_matched'])} vs the control)"
           if v["accuracy_meaningful"] else
           f"accuracy not measurable (PTQ loses {v['ptq_accuracy_lost_images']:.1f} test "
           f"images on average, under {MIN_ACCURACY_LOSS_IMAGES:g})")
    lines.append(f"Target {v['run']}: QAT recovers >= {v['target']:.0%} of what PTQ loses: "
                 f"{acc}; test loss {_percent(v['recovery_loss'])} "
                 f"({_percent(v['recovery_loss_matched'])} vs the control): "
                 f"{'holds' if v['holds'] else 'MISSED'}")
  if "w2a8_qat_beats_ptq" in t:
    v = t["w2a8_qat_beats_ptq"]
    parts = ", ".join(f"{n} {100 * r['qat']:.2f}% vs {100 * r['ptq']:.2f}%"
                      for n, r in v["runs"].items())
    lines.append(f"Target W2A8: QAT beats PTQ in accuracy ({parts}): "
                 f"{'holds' if v['holds'] else 'MISSED'}")
  lines.append("Converted QArray model reproduces the fake-quant logits exactly: "
               + ("yes" if t["conversion_exact"] else "NO"))
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Plot.


def plot(summary: dict, path: pathlib.Path) -> bool:
  """Bars of test accuracy and test loss (float, PTQ, QAT per run); False without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed, so no plot was written; install it with: "
          "pip install matplotlib", file=sys.stderr)
    return False
  names = list(summary["runs"])
  x = np.arange(len(names))
  fig, axes = plt.subplots(2, 1, figsize=(max(6.5, 1.4 * len(names) + 2), 8), sharex=True)
  for ax, metric, scale, label in ((axes[0], "accuracy", 100, "test accuracy (%)"),
                                   (axes[1], "loss", 1, "test cross-entropy (log)")):
    for offset, phase, color in ((-0.2, "ptq", "tab:orange"), (0.2, "qat", "tab:green")):
      means = [scale * summary["runs"][n][phase][metric]["mean"] for n in names]
      stds = [scale * summary["runs"][n][phase][metric]["std"] for n in names]
      ax.bar(x + offset, means, 0.38, yerr=stds, color=color, label=phase.upper(),
             capsize=3)
      for xi, m in zip(x + offset, means):
        ax.annotate(f"{m:.1f}" if metric == "accuracy" else f"{m:.3f}", (xi, m),
                    xytext=(0, 4), textcoords="offset points", ha="center", fontsize=7)
    ax.axhline(scale * summary["float"][metric]["mean"], color="tab:blue", lw=1.2,
               label="float")
    ax.axhline(scale * summary["float_finetuned"][metric]["mean"], color="tab:blue", lw=1,
               ls="--", label="float, fine-tuned (control)")
    ax.set_ylabel(label)
    ax.grid(True, axis="y", alpha=0.3)
  axes[0].set_ylim(0, 122)
  axes[0].legend(fontsize=8, loc="upper center", ncol=4)
  axes[1].set_yscale("log")
  axes[1].set_xticks(x)
  axes[1].set_xticklabels(names, rotation=20, ha="right", fontsize=8)
  axes[0].set_title(f"Digits CNN, PTQ vs QAT: weights per output channel, activations "
                    f"uint8 ({summary['seeds']} seeds, mean ± std)", fontsize=10)
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
                      help=f"shorter training, 1 seed, runs {', '.join(QUICK_RUNS)}: a "
                           "~30 s smoke run")
  parser.add_argument("--seeds", type=int, default=None,
                      help="seeds (default: 3; 1 with --quick)")
  parser.add_argument("--runs", default=None,
                      help="comma-separated subset of: " + ", ".join(r.name for r in RUNS))
  parser.add_argument("--qat-steps", type=int, default=None,
                      help="QAT fine-tuning steps (default: 600; 200 with --quick)")
  parser.add_argument("--act-calibration", default=None,
                      help="static activation ranges: 'absmax' (default) or 'percentile:P'")
  parser.add_argument("--plot", type=pathlib.Path, default=None,
                      help="write bar charts of test accuracy and loss to this PNG")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the numbers as JSON to this path")
  args = parser.parse_args(argv)
  args.seeds = args.seeds or (1 if args.quick else 3)
  if args.seeds < 1 or (args.qat_steps is not None and args.qat_steps < 1):
    parser.error(f"--seeds={args.seeds} --qat-steps={args.qat_steps}: expected at least 1")
  config = QUICK if args.quick else FULL
  if args.runs is not None:
    by_name = {r.name: r for r in RUNS}
    names = [n.strip() for n in args.runs.split(",")]
    unknown = [n for n in names if n not in by_name]
    if unknown:
      parser.error(f"--runs={args.runs}: unknown {unknown}; expected some of "
                   f"{', '.join(by_name)}")
    config = dataclasses.replace(config, runs=tuple(by_name[n] for n in names))
  if args.qat_steps is not None:
    config = dataclasses.replace(config, qat_train=dataclasses.replace(
        config.qat_train, steps=args.qat_steps,
        warmup_steps=min(config.qat_train.warmup_steps, args.qat_steps // 10)))
  if args.act_calibration is not None:
    config = dataclasses.replace(config, act_calibration=args.act_calibration)
  args.config = config
  return args


def main(argv=None) -> dict:
  """Runs float training, PTQ, QAT and conversion; returns the summary (also --json)."""
  args = parse_args(argv)
  config = args.config
  log = functools.partial(print, flush=True)
  start = time.perf_counter()
  data = load_data()
  test_size = int(data.test_labels.shape[0])
  log(f"== Digits CNN conv{'-'.join(map(str, MODEL.conv_features))} + dense "
      f"{MODEL.hidden} ({data.train_labels.shape[0]} train / {test_size} test images); "
      f"float {config.float_train.steps} steps, QAT {config.qat_train.steps} steps, "
      f"{args.seeds} seed(s)")
  seed_results = [run_seed(seed, config, data, log) for seed in range(args.seeds)]
  summary = summarize(seed_results, config, test_size)
  seconds = time.perf_counter() - start
  summary.update(seconds=seconds, seeds=args.seeds, config=dataclasses.asdict(config),
                 per_seed=seed_results)
  print()
  print(format_table(summary, args.seeds))
  print(f"Total time {seconds:.0f} s ({jax.device_count()} {jax.default_backend()} device)")
  if args.plot and plot(summary, args.plot):
    print(f"Accuracy and loss chart written to {args.plot}")
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1, default=str))
    print(f"Numbers written to {args.json}")
  return summary


if __name__ == "__main__":
  main()
