"""The demo model of `jaxquant quantize`: an MLP classifier of 8x8 digit images.

The data is scikit-learn's bundled digits set (1,797 grayscale 8x8 images of the
digits 0-9, shipped with scikit-learn, no download), flattened to 64 features scaled
to [0, 1] and split 75% train / 25% test with a fixed seed. The model is a Flax Linen
MLP 64 -> 512 -> 256 -> 10 with ReLU, trained with Adam in one jitted loop (a few
seconds on a CPU; about 97-98% test accuracy).

scikit-learn is an optional dependency: ``pip install 'jaxquant[demo]'``.

Example:
  >>> params = demo.load_or_train_demo_params()        # trained and cached on first use
  >>> data = demo.load_digits_split()
  >>> demo.accuracy(params, data.test_images, data.test_labels)
  0.9777...
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxquant import tree as tree_lib

NUM_FEATURES = 64
NUM_CLASSES = 10
HIDDEN = (512, 256)
SPLIT_SEED = 0
TEST_FRACTION = 0.25
DEFAULT_STEPS = 1000
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
CACHE_NAME = "demo_mlp"


class DemoMLP(nn.Module):
  """MLP classifier: Dense + ReLU for each hidden width, then Dense to the logits.

  Attributes:
    hidden: widths of the hidden layers.
    num_classes: number of logits.
  """

  hidden: tuple[int, ...] = HIDDEN
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """float32[batch, 64] images in [0, 1] -> float32[batch, num_classes] logits."""
    x = images
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
  """The fixed train/test split of the digits images (read-only numpy arrays).

  Attributes:
    train_images: float32[1348, 64] in [0, 1].
    train_labels: int32[1348] in 0..9.
    test_images: float32[449, 64] in [0, 1].
    test_labels: int32[449] in 0..9.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def _sklearn_datasets():
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "the demo model trains on scikit-learn's digits images, and scikit-learn "
        "is not installed; install it with: pip install 'jaxquant[demo]'") from e
  return datasets


def _read_only(x: np.ndarray) -> np.ndarray:
  x.flags.writeable = False
  return x


@functools.lru_cache(maxsize=1)
def load_digits_split() -> DigitsSplit:
  """The digits images, scaled to [0, 1], split 75/25 with a fixed permutation.

  Returns:
    A `DigitsSplit`; the same one on every call.
  Raises:
    ImportError: scikit-learn is not installed (the message says how to install it).
  """
  digits = _sklearn_datasets().load_digits()
  images = (np.asarray(digits.data, np.float32) / 16.0).astype(np.float32)
  labels = np.asarray(digits.target, np.int32)
  order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
  n_test = int(round(TEST_FRACTION * len(labels)))
  test, train = order[:n_test], order[n_test:]
  return DigitsSplit(*(_read_only(np.ascontiguousarray(a)) for a in
                       (images[train], labels[train], images[test], labels[test])))


def init_params(seed: int = 0) -> dict[str, Any]:
  """Freshly initialized demo variables ``{"params": {"Dense_0": ..., ...}}`` (float32)."""
  return DemoMLP().init(jax.random.key(seed), jnp.zeros((1, NUM_FEATURES), jnp.float32))


def _loss(params, images, labels):
  logits = DemoMLP().apply(params, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnames=("steps", "batch_size", "learning_rate"))
def _train(params, images, labels, key, *, steps, batch_size, learning_rate):
  """Adam on random minibatches (drawn with replacement), all steps in one jit."""
  optimizer = optax.adam(learning_rate)

  def step(i, carry):
    params, opt_state = carry
    index = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0,
                               labels.shape[0])
    grads = jax.grad(_loss)(params, images[index], labels[index])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, optimizer.init(params)))
  return params


def train_demo_model(seed: int = 0, steps: int = DEFAULT_STEPS, *,
                     batch_size: int = BATCH_SIZE,
                     learning_rate: float = LEARNING_RATE) -> dict[str, Any]:
  """Trains the demo MLP on the training split of the digits images.

  Args:
    seed: seeds the initialization and the minibatch draws.
    steps: Adam steps; the default takes a few seconds on a CPU.
    batch_size: images per step.
    learning_rate: Adam's learning rate.
  Returns:
    The float32 variables ``{"params": {"Dense_0": {"kernel": [64, 512], "bias":
    [512]}, "Dense_1": ..., "Dense_2": ...}}``.
  Raises:
    ValueError: steps or batch_size < 1.
    ImportError: scikit-learn is not installed.
  """
  if steps < 1:
    raise ValueError(f"steps={steps}; expected at least 1")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; expected at least 1")
  data = load_digits_split()
  # optax's Adam computes `decay**count` (float ** int32): allow that promotion here
  # even when a user (or our tests) runs with jax_numpy_dtype_promotion="strict".
  with jax.numpy_dtype_promotion("standard"):
    return _train(init_params(seed), jnp.asarray(data.train_images),
                  jnp.asarray(data.train_labels), jax.random.key(seed + 1),
                  steps=int(steps), batch_size=int(batch_size),
                  learning_rate=float(learning_rate))


@jax.jit
def _predict(params, images):
  return jnp.argmax(DemoMLP().apply(params, images), axis=-1).astype(jnp.int32)


def accuracy(params: Any, images: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of `images` the demo MLP with `params` classifies as `labels`.

  Args:
    params: demo variables in float (QArray leaves are dequantized first, so
      `jq.dequantize_tree(qparams)` and `qparams` itself both work).
    images: float32[n, 64] in [0, 1].
    labels: int[n] in 0..9.
  Returns:
    Accuracy in [0, 1].
  """
  predictions = np.asarray(_predict(tree_lib.dequantize_tree(params), jnp.asarray(images)))
  return float(np.mean(predictions == np.asarray(labels)))


def accuracy_on_test_split(params: Any) -> float:
  """`accuracy` on the test split of the digits images."""
  data = load_digits_split()
  return accuracy(params, data.test_images, data.test_labels)


def is_demo_params(params: Any) -> bool:
  """Whether `params` has the demo MLP's structure and shapes (float leaves)."""
  expected = jax.eval_shape(init_params)
  if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(expected):
    return False
  pairs = zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected))
  return all(getattr(p, "shape", None) == e.shape
             and jnp.issubdtype(getattr(p, "dtype", np.int32), jnp.floating)
             for p, e in pairs)


def cache_dir(seed: int = 0) -> pathlib.Path:
  """Where the trained demo params are cached.

  ``$XDG_CACHE_HOME/jaxquant/demo_mlp`` (``~/.cache/jaxquant/demo_mlp`` when
  XDG_CACHE_HOME is unset), with a ``_seed{N}`` suffix for seeds other than 0.
  """
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  name = CACHE_NAME if seed == 0 else f"{CACHE_NAME}_seed{seed}"
  return pathlib.Path(root) / "jaxquant" / name


def load_or_train_demo_params(seed: int = 0, *, steps: int = DEFAULT_STEPS,
                              verbose: bool = True) -> dict[str, Any]:
  """The trained demo variables: read from the cache, or trained and cached first.

  Args:
    seed: training seed; each seed has its own cache entry (see `cache_dir`).
    steps: training steps when the model has to be trained.
    verbose: print what happens when training (and when a bad cache is replaced).
  Returns:
    The float32 demo variables, as `train_demo_model` returns them.
  Raises:
    ImportError: scikit-learn is not installed and the model has to be trained.
  """
  from jaxquant import checkpoint  # pylint: disable=g-import-not-at-top

  say = print if verbose else (lambda *args, **kwargs: None)
  path = cache_dir(seed)
  if path.exists():
    try:
      params = checkpoint.restore(path)
    except Exception as e:  # pylint: disable=broad-except  (our own cache: retrain)
      params, reason = None, f"it cannot be read ({type(e).__name__}: {e})"
    else:
      reason = "it does not hold the demo model's parameters"
    if params is not None and is_demo_params(params):
      return params
    say(f"Replacing the demo model cache at {path}: {reason}.")
  load_digits_split()  # fails first if scikit-learn is missing
  say(f"Training the demo model (first use): MLP {NUM_FEATURES}-"
      f"{'-'.join(map(str, HIDDEN))}-{NUM_CLASSES} on scikit-learn's digits, "
      f"{steps} Adam steps, seed {seed} ...", flush=True)
  start = time.perf_counter()
  params = train_demo_model(seed, steps)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  checkpoint.save(path, params, overwrite=path.exists())
  say(f"Trained in {seconds:.1f} s, test accuracy {accuracy_on_test_split(params):.2%}; "
      f"cached at {path}")
  return params
