"""Train a small convolutional VQ/FSQ image tokenizer on real images, offline.

A tokenizer is a conv encoder (each stage halves the resolution), a quantizer
(`jq.vq.FSQ` or `jq.vq.VectorQuantizer`) on every position of the latent grid,
and a mirrored conv decoder, trained with Adam on the squared reconstruction
error plus the quantizer's loss. The images ship with scikit-learn (no
download): its two sample photographs (china.jpg and flower.jpg, 427 x 640 RGB),
cut into random P x P crops, and its 8 x 8 digits.

After training it reports the holdout PSNR and how the codebook is used:

* photos: the right-most `holdout_fraction` of each photograph's columns is held
  out; training crops come from the rest. PSNR is measured on the held-out
  region tiled into P x P patches. Usage and perplexity count the codes of every
  patch of both whole photographs, tiled at each of the f x f offsets of the
  token grid (f = the downsampling factor), so each f x f block of pixels is seen
  at every alignment: about 0.5M tokens, and 8 times that with ``dihedral``
  (the photos' flips and 90-degree rotations, which training crops use too).
* digits: the fixed 75/25 split of `jaxquant.demo`; PSNR on its test images,
  usage over all 1,797 images.

Configs are TOML files; the shipped ones are ``configs/tokenizer_<name>.toml``
(the package `jaxquant.configs`), loaded by name (``load_config("fsq_1k")``)::

  name = "fsq_1k"
  description = "FSQ with 2^10 codes on photo patches."
  min_usage = 0.95            # optional target: the summary says if it holds

  [data]
  dataset = "photos"          # "photos" or "digits"
  patch_size = 16             # digits: 8
  holdout_fraction = 0.2      # photos only (digits: the demo's 25% test split)
  dihedral = true             # also the 8 flips/rotations (default false)

  [model]
  channels = [32, 64]         # one stage per entry, each halves the resolution
  latent_dim = 4              # FSQ: len(levels)

  [quantizer]
  kind = "fsq"
  levels = [8, 5, 5, 5]
  # kind = "vq": num_codes, codebook_dim, metric ("l2" | "cosine"),
  # commitment_weight, codebook_learning ("ema" | "gradient"), ema_decay (ema
  # only), kmeans_init, dead_code_threshold, gradient ("ste" | "rotation")

  [train]
  steps = 2000
  batch_size = 32
  learning_rate = 2e-3        # peak: linear warmup, then cosine to 5% of it
  warmup_steps = 100
  seed = 0

``run(load_config("fsq_1k"), "out/")`` trains, evaluates and writes
``out/summary.json``, ``out/tokenizer.png`` and the trained model, which
``load("out/")`` rebuilds; so does ``jaxquant tokenizer train --config fsq_1k``.
Needs scikit-learn, matplotlib and (for the progress bar) tqdm: ``pip install
'jaxquant[examples]'``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import time
import tomllib
from typing import Any, Callable, Optional, Sequence, Union

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from jaxquant import recipes as recipes_lib
from jaxquant.vq import metrics as metrics_lib
from jaxquant.vq import scalar as scalar_lib
from jaxquant.vq import vector as vector_lib

CONFIG_PREFIX = "tokenizer_"
DATASETS = ("photos", "digits")
KINDS = ("fsq", "vq")
CODEBOOK_LEARNING = ("ema", "gradient")
SUMMARY_FILE = "summary.json"
PLOT_FILE = "tokenizer.png"
MODEL_FILE = "tokenizer.json"  # what rebuilds a saved model: its config and channels
MODEL_DIR = "model"  # its parameters and codebook state, a `jq.checkpoint`
_DEFAULT_HOLDOUT = {"photos": 0.2, "digits": 0.25}
_EVAL_BATCH = 256  # patches per evaluation call (the last batch is padded)
_PLOT_SAMPLES = 8


# ----------------------------------------------------------------------------
# Configuration.


def _fail(field: str, value: Any, expected: str) -> ValueError:
  return ValueError(f"{field}={value!r}; expected {expected}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which images, cut how.

  Attributes:
    dataset: "photos" (scikit-learn's two sample photographs, RGB) or "digits"
      (its 8 x 8 digits, grayscale).
    patch_size: side P of the square training crops and evaluation patches
      (digits: 8, the whole image).
    holdout_fraction: photos: the fraction of each photograph's columns (at the
      right) held out; None: 0.2. Digits use `jaxquant.demo`'s 25% test split.
    dihedral: also use the 8 flips and 90-degree rotations of the images: each
      training crop gets a random one, and codebook usage counts the tokens of
      all 8 (8x the tokens; the holdout PSNR stays on the images as they are).
  """

  dataset: str = "photos"
  patch_size: int = 16
  holdout_fraction: Optional[float] = None
  dihedral: bool = False

  def __post_init__(self):
    if self.dataset not in DATASETS:
      raise _fail("dataset", self.dataset, f"one of {', '.join(map(repr, DATASETS))}")
    if self.patch_size < 1:
      raise _fail("patch_size", self.patch_size, "a positive integer")
    if self.dataset == "digits":
      if self.patch_size != 8:
        raise _fail("patch_size", self.patch_size, "8 for dataset='digits' (whole images)")
      if self.holdout_fraction not in (None, _DEFAULT_HOLDOUT["digits"]):
        raise _fail("holdout_fraction", self.holdout_fraction, "nothing for dataset="
                    "'digits' (it uses jaxquant.demo's fixed 25% test split)")
    elif self.holdout_fraction is not None and not 0 < self.holdout_fraction < 1:
      raise _fail("holdout_fraction", self.holdout_fraction, "a fraction in (0, 1)")

  @property
  def holdout(self) -> float:
    """The holdout fraction, the dataset's default filled in."""
    if self.holdout_fraction is None:
      return _DEFAULT_HOLDOUT[self.dataset]
    return self.holdout_fraction


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The conv encoder/decoder.

  Attributes:
    channels: the width of each encoder stage; every stage halves the
      resolution, so the downsampling factor is ``2 ** len(channels)``. The
      decoder mirrors it.
    latent_dim: channels of the latent grid the quantizer sees.
  """

  channels: tuple[int, ...] = (32, 64)
  latent_dim: int = 4

  def __post_init__(self):
    if not self.channels or any(c < 1 for c in self.channels):
      raise _fail("channels", list(self.channels), "a non-empty list of positive widths")
    if self.latent_dim < 1:
      raise _fail("latent_dim", self.latent_dim, "a positive integer")

  @property
  def downsampling(self) -> int:
    """f: each token covers f x f pixels."""
    return 2 ** len(self.channels)


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
  """The quantizer and its arguments (see `jq.vq.FSQ` and `jq.vq.VectorQuantizer`).

  Attributes:
    kind: "fsq" (uses `levels`) or "vq" (uses the other fields).
    levels: FSQ levels per latent channel; prod(levels) codes.
    num_codes: VQ codebook size K.
    codebook_dim: VQ lookup dimension (None: latent_dim).
    metric: "l2" or "cosine".
    commitment_weight: beta of the commitment loss.
    codebook_learning: "ema" (exponential moving averages, `ema_decay`) or
      "gradient" (the codebook is a parameter trained by the codebook loss).
    ema_decay: EMA decay in (0, 1).
    kmeans_init: initialize the codebook by k-means on the first training batch.
    dead_code_threshold: codes whose EMA count falls below it are re-drawn from
      the batch (0: never).
    gradient: "ste" (straight-through) or "rotation" (the rotation trick).
  """

  kind: str = "fsq"
  levels: tuple[int, ...] = ()
  num_codes: int = 0
  codebook_dim: Optional[int] = None
  metric: str = "l2"
  commitment_weight: float = 0.25
  codebook_learning: str = "ema"
  ema_decay: float = 0.99
  kmeans_init: bool = False
  dead_code_threshold: float = 0.0
  gradient: str = "ste"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise _fail("kind", self.kind, f"one of {', '.join(map(repr, KINDS))}")
    # A field the quantizer would ignore is an error, not a no-op.
    if self.kind == "fsq":
      for field in dataclasses.fields(self):
        if (field.name not in ("kind", "levels")
            and getattr(self, field.name) != field.default):
          raise ValueError(f'{field.name} is only for kind = "vq"')
      object.__setattr__(self, "levels", scalar_lib.check_levels(self.levels))
      return
    if self.levels:
      raise ValueError('levels is only for kind = "fsq"')
    if self.codebook_learning == "gradient" and self.ema_decay != QuantizerConfig.ema_decay:
      raise ValueError('ema_decay is only for codebook_learning = "ema"')
    if self.num_codes < 2:
      raise _fail("num_codes", self.num_codes, "at least 2 for kind='vq'")
    if self.codebook_dim is not None and self.codebook_dim < 1:
      raise _fail("codebook_dim", self.codebook_dim, "a positive integer")
    for name, choices in (("metric", vector_lib.METRICS), ("gradient", vector_lib.GRADIENTS),
                          ("codebook_learning", CODEBOOK_LEARNING)):
      if getattr(self, name) not in choices:
        raise _fail(name, getattr(self, name), f"one of {', '.join(map(repr, choices))}")
    if not 0 < self.ema_decay < 1:
      raise _fail("ema_decay", self.ema_decay, "a decay in (0, 1)")
    if self.commitment_weight < 0 or self.dead_code_threshold < 0:
      raise ValueError(f"commitment_weight={self.commitment_weight}, dead_code_threshold="
                       f"{self.dead_code_threshold}; expected values >= 0")
    if self.dead_code_threshold > 0 and self.codebook_learning != "ema":
      raise _fail("dead_code_threshold", self.dead_code_threshold, "0 with "
                  "codebook_learning='gradient' (dead codes are found by EMA counts)")

  @property
  def codebook_size(self) -> int:
    """The number of codes: prod(levels) for FSQ, num_codes for VQ."""
    return math.prod(self.levels) if self.kind == "fsq" else self.num_codes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Adam on random crops, linear warmup then cosine decay to 5% of the peak.

  Attributes:
    steps: optimizer steps.
    batch_size: crops per step.
    learning_rate: peak learning rate.
    warmup_steps: steps of linear warmup from 0.
    seed: seeds the initialization and the crops.
  """

  steps: int = 2000
  batch_size: int = 32
  learning_rate: float = 2e-3
  warmup_steps: int = 100
  seed: int = 0

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 1:
      raise ValueError(f"steps={self.steps}, batch_size={self.batch_size}; expected "
                       "positive integers")
    if not self.learning_rate > 0:
      raise _fail("learning_rate", self.learning_rate, "a positive number")
    if self.warmup_steps < 0:
      raise _fail("warmup_steps", self.warmup_steps, "an integer >= 0")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """A whole tokenizer run: data, model, quantizer, training, and a usage target.

  Attributes:
    name: a short name (used for output folders).
    description: what the run shows.
    data, model, quantizer, train: the sections.
    min_usage: the codebook usage fraction the run is expected to reach (None: no
      target); the summary says whether it holds.
  """

  name: str
  description: str = ""
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  quantizer: QuantizerConfig = QuantizerConfig(levels=(8, 5, 5, 5))
  train: TrainConfig = TrainConfig()
  min_usage: Optional[float] = None

  def __post_init__(self):
    if not self.name:
      raise _fail("name", self.name, "a non-empty string")
    if self.quantizer.kind == "fsq" and len(self.quantizer.levels) != self.model.latent_dim:
      raise ValueError(f"levels={list(self.quantizer.levels)} has {len(self.quantizer.levels)} "
                       f"entries but latent_dim={self.model.latent_dim}; FSQ needs one "
                       "level per latent channel")
    if self.data.patch_size % self.model.downsampling:
      raise ValueError(f"patch_size={self.data.patch_size} is not a multiple of the "
                       f"downsampling factor {self.model.downsampling} (2 ** "
                       f"len(channels={list(self.model.channels)}))")
    if self.min_usage is not None and not 0 <= self.min_usage <= 1:
      raise _fail("min_usage", self.min_usage, "a fraction in [0, 1]")


# ----------------------------------------------------------------------------
# Reading configs from TOML.


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "quantizer": QuantizerConfig,
             "train": TrainConfig}
_TOP_KEYS = ("name", "description", "min_usage", *_SECTIONS)
_KINDS = {  # field annotation -> (TOML check, conversion, what the message expects)
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), int, "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), float,
              "a number"),
    "bool": (lambda v: isinstance(v, bool), bool, "true or false"),
    "str": (lambda v: isinstance(v, str), str, "a string"),
    "tuple[int, ...]": (lambda v: isinstance(v, list) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in v), tuple,
                        "a list of integers"),
}
_KINDS.update({f"Optional[{k}]": _KINDS[k] for k in ("int", "float")})  # TOML has no null


def _value(where: str, key: str, value: Any, annotation: str) -> Any:
  """The TOML `value` of a field annotated `annotation`, checked and converted."""
  check, convert, expected = _KINDS[annotation]
  if not check(value):
    raise ValueError(f"{where}{key} = {recipes_lib._toml(value)}; expected {expected}")  # pylint: disable=protected-access
  return convert(value)


def _section(cls, table: Any, where: str):
  if not isinstance(table, dict):
    raise ValueError(f"{where}expected a table, got {recipes_lib._toml(table)}")  # pylint: disable=protected-access
  fields = {field.name: field.type for field in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in table.items():
    if key not in fields:
      raise ValueError(f"{where}unknown key {key!r}; expected keys: {', '.join(fields)}")
    kwargs[key] = _value(where, key, value, fields[key])
  try:
    return cls(**kwargs)
  except ValueError as e:
    raise ValueError(f"{where}{e}") from None


def parse_config(data: dict[str, Any], source: str = "<dict>") -> TokenizerConfig:
  """A `TokenizerConfig` from parsed TOML (a dict: top-level keys and the sections).

  Raises:
    ValueError: unknown or mistyped keys, keys the quantizer kind does not use,
      bad values; the message names `source`, the section and the key.
  """
  where = f"tokenizer config {source}: "
  unknown = [key for key in data if key not in _TOP_KEYS]
  if unknown:
    raise ValueError(f"{where}unknown top-level key {unknown[0]!r}; expected "
                     f"{', '.join(_TOP_KEYS)}")
  if "name" not in data:
    raise ValueError(f"{where}missing name (a short name for the run)")
  top = {"name": _value(where, "name", data["name"], "str")}
  if "description" in data:
    top["description"] = " ".join(_value(where, "description", data["description"],
                                         "str").split())
  if "min_usage" in data:
    top["min_usage"] = _value(where, "min_usage", data["min_usage"], "float")
  sections = {}
  for name, cls in _SECTIONS.items():
    if name not in data:
      raise ValueError(f"{where}missing the [{name}] table")
    sections[name] = _section(cls, data[name], f"{where}[{name}] ")
  try:
    return TokenizerConfig(**top, **sections)
  except ValueError as e:
    raise ValueError(f"{where}{e}") from None


def _shipped_configs() -> dict[str, Any]:
  """{name: Traversable} of ``tokenizer_<name>.toml`` in `jaxquant.configs`."""
  return {name[len(CONFIG_PREFIX):]: entry
          for name, entry in recipes_lib._shipped_files().items()  # pylint: disable=protected-access
          if name.startswith(CONFIG_PREFIX)}


def list_configs() -> list[str]:
  """Names of the tokenizer configs shipped with jaxquant, sorted."""
  return sorted(_shipped_configs())


def load_config(name_or_path: Union[str, os.PathLike]) -> TokenizerConfig:
  """The shipped tokenizer config `name` (see `list_configs`), or one read from a file.

  Args:
    name_or_path: a shipped name such as "fsq_1k" (``tokenizer_fsq_1k`` works
      too), or a path: any `os.PathLike`, or a string ending in ``.toml`` or
      holding a path separator.
  Raises:
    ValueError: an unknown name (the message lists the shipped ones), a missing
      file, invalid TOML or an invalid config.
  """
  if isinstance(name_or_path, os.PathLike) or recipes_lib._looks_like_path(  # pylint: disable=protected-access
      str(name_or_path)):
    path = pathlib.Path(name_or_path)
    if not path.is_file():
      raise ValueError(f"tokenizer config file {str(path)!r} does not exist")
    text, source = path.read_text(encoding="utf-8"), str(path)
  else:
    if not isinstance(name_or_path, str):
      raise TypeError(f"name_or_path must be a str or a path; got "
                      f"{type(name_or_path).__name__}")
    name = name_or_path.removeprefix(CONFIG_PREFIX)
    shipped = _shipped_configs()
    if name not in shipped:
      raise ValueError(f"tokenizer config {name_or_path!r} is not known; known configs: "
                       f"{', '.join(sorted(shipped))} (or give a path to a .toml file)")
    text = shipped[name].read_text(encoding="utf-8")
    source = f"{name} ({recipes_lib.CONFIGS_PACKAGE}/{CONFIG_PREFIX}{name}.toml)"
  try:
    data = tomllib.loads(text)
  except tomllib.TOMLDecodeError as e:
    raise ValueError(f"tokenizer config {source}: not valid TOML: {e}") from e
  return parse_config(data, source)


# ----------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class TokenizerData:
  """Images in [0, 1], NHWC float32 (read-only numpy arrays).

  Attributes:
    train: float32[S, H, W, C]; training crops of P x P are drawn from these.
    holdout: float32[N, P, P, C]; held-out patches, for PSNR.
    full: float32[S', H', W', C]; every image whole, for codebook usage.
    patch_size: P.
    symmetries: 8 with `DataConfig.dihedral` (see `dihedral`), else 1.
  """

  train: np.ndarray
  holdout: np.ndarray
  full: np.ndarray
  patch_size: int
  symmetries: int = 1


def _sample_images() -> list[np.ndarray]:
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the tokenizer trains on scikit-learn's sample images, and "
                      "scikit-learn is not installed; install it with: pip install "
                      "'jaxquant[examples]'") from e
  return [np.asarray(image, np.float32) / np.float32(255) for image in
          datasets.load_sample_images().images]


def tile_patches(images: np.ndarray, patch_size: int, offset: tuple[int, int] = (0, 0)
                 ) -> np.ndarray:
  """float32[N, P, P, C]: the P x P patches tiling ``images[:, dy:, dx:]`` row by row.

  Args:
    images: float32[S, H, W, C].
    patch_size: P.
    offset: (dy, dx), where the tiling starts; incomplete patches are dropped.
  """
  dy, dx = offset
  sources, height, width, channels = images.shape
  rows, cols = (height - dy) // patch_size, (width - dx) // patch_size
  grid = images[:, dy:dy + rows * patch_size, dx:dx + cols * patch_size]
  grid = grid.reshape(sources, rows, patch_size, cols, patch_size, channels)
  return grid.transpose(0, 1, 3, 2, 4, 5).reshape(-1, patch_size, patch_size, channels)


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  for array in arrays:
    array.flags.writeable = False
  return arrays


@functools.lru_cache(maxsize=4)
def load_data(config: DataConfig) -> TokenizerData:
  """The images of `config`, split into training sources and holdout patches.

  Raises:
    ImportError: scikit-learn is not installed.
  """
  patch = config.patch_size
  symmetries = 8 if config.dihedral else 1
  if config.dataset == "digits":
    from jaxquant import demo  # pylint: disable=g-import-not-at-top
    split = demo.load_digits_split()
    train = split.train_images.reshape(-1, 8, 8, 1)
    holdout = split.test_images.reshape(-1, 8, 8, 1)
    return TokenizerData(*_read_only(train, holdout,
                                     np.concatenate([train, holdout])), patch, symmetries)
  photos = np.stack(_sample_images())
  width = photos.shape[2]
  holdout_width = (round(width * config.holdout) // patch) * patch
  if holdout_width < patch or width - holdout_width < patch:
    raise ValueError(f"holdout_fraction={config.holdout} with patch_size={patch} leaves "
                     f"fewer than {patch} columns of the {width} for training or holdout")
  train = np.ascontiguousarray(photos[:, :, :width - holdout_width])
  holdout = tile_patches(photos[:, :, width - holdout_width:], patch)
  return TokenizerData(*_read_only(train, holdout, photos), patch, symmetries)


def dihedral(images, k: int):
  """`images` [..., H, W, C] (numpy or jax) under symmetry k in [0, 8) of the square.

  Bit 0 of k flips left-right, bit 1 flips top-bottom, bit 2 swaps H and W
  (applied first); k = 0 is the identity.
  """
  if k & 4:
    images = images.swapaxes(-3, -2)
  if k & 2:
    images = images[..., ::-1, :, :]
  if k & 1:
    images = images[..., :, ::-1, :]
  return images


def random_crops(data: TokenizerData, rng: np.random.Generator, shape: tuple[int, ...]
                 ) -> np.ndarray:
  """int32[*shape, 4]: (source, top, left, symmetry) of random crops of ``data.train``."""
  sources, height, width, _ = data.train.shape
  patch = data.patch_size
  return np.stack([rng.integers(0, sources, shape), rng.integers(0, height - patch + 1, shape),
                   rng.integers(0, width - patch + 1, shape),
                   rng.integers(0, data.symmetries, shape)], axis=-1).astype(np.int32)


def _gather_crops(images: jax.Array, crops: jax.Array, patch: int) -> jax.Array:
  """float32[B, P, P, C]: ``dihedral(images[s, y:y+P, x:x+P], k)`` per row (s, y, x, k)."""
  branches = [functools.partial(dihedral, k=k) for k in range(8)]

  def crop(corner):
    start = (corner[0], corner[1], corner[2], jnp.zeros((), jnp.int32))
    window = jax.lax.dynamic_slice(images, start, (1, patch, patch, images.shape[-1]))[0]
    return jax.lax.switch(corner[3], branches, window)

  return jax.vmap(crop)(crops)


# ----------------------------------------------------------------------------
# Model.


class Encoder(nnx.Module):
  """float32[B, H, W, C] -> float32[B, H/f, W/f, latent_dim], f = 2 ** len(channels).

  Each stage is a 4x4 stride-2 conv and a residual 3x3 conv; a 1x1 conv makes
  the latents. No conv runs at full resolution, which keeps CPU training quick.
  """

  def __init__(self, in_channels: int, config: ModelConfig, *, rngs: nnx.Rngs):
    widths = config.channels
    self.down = nnx.List([nnx.Conv(a, b, (4, 4), strides=2, rngs=rngs)
                          for a, b in zip((in_channels,) + widths[:-1], widths)])
    self.mix = nnx.List([nnx.Conv(w, w, (3, 3), rngs=rngs) for w in widths])
    self.head = nnx.Conv(widths[-1], config.latent_dim, (1, 1), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for down, mix in zip(self.down, self.mix):
      x = nnx.relu(down(x))
      x = x + nnx.relu(mix(x))
    return self.head(x)


def _depth_to_space(x: jax.Array) -> jax.Array:
  """float[B, h, w, 4c] -> float[B, 2h, 2w, c]: each 2x2 block from 4 channels."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height, width, 2, 2, channels // 4)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, 2 * height, 2 * width, channels // 4)


class Decoder(nnx.Module):
  """float32[B, h, w, latent_dim] -> float32[B, h*f, w*f, C]; mirrors `Encoder`.

  A 3x3 conv from the latents, then per stage a residual 3x3 conv and an
  upsampling 3x3 conv to 4x the next width shuffled depth-to-space (the last
  one straight to pixels). A transposed conv would do the same job, but its
  gradient is far slower on CPUs.
  """

  def __init__(self, out_channels: int, config: ModelConfig, *, rngs: nnx.Rngs):
    widths = config.channels[::-1]
    self.stem = nnx.Conv(config.latent_dim, widths[0], (3, 3), rngs=rngs)
    self.mix = nnx.List([nnx.Conv(w, w, (3, 3), rngs=rngs) for w in widths])
    self.up = nnx.List([nnx.Conv(a, 4 * b, (3, 3), rngs=rngs)
                        for a, b in zip(widths, widths[1:] + (out_channels,))])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem(x))
    for i, (mix, up) in enumerate(zip(self.mix, self.up)):
      x = x + nnx.relu(mix(x))
      x = _depth_to_space(up(x))
      if i + 1 < len(self.up):
        x = nnx.relu(x)
    return x


def make_quantizer(config: QuantizerConfig, latent_dim: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The `jq.vq.FSQ` or `jq.vq.VectorQuantizer` module `config` describes."""
  if config.kind == "fsq":
    return jq.vq.FSQ(config.levels)
  return jq.vq.VectorQuantizer(
      config.num_codes, latent_dim, codebook_dim=config.codebook_dim, metric=config.metric,
      commitment_weight=config.commitment_weight,
      ema_decay=config.ema_decay if config.codebook_learning == "ema" else None,
      kmeans_init=config.kmeans_init, dead_code_threshold=config.dead_code_threshold,
      gradient=config.gradient, rngs=rngs)


class Tokenizer(nnx.Module):
  """Encoder, quantizer, decoder: images -> codes -> reconstructions."""

  def __init__(self, config: TokenizerConfig, channels: int, *, rngs: nnx.Rngs):
    self.encoder = Encoder(channels, config.model, rngs=rngs)
    self.quantizer = make_quantizer(config.quantizer, config.model.latent_dim, rngs=rngs)
    self.decoder = Decoder(channels, config.model, rngs=rngs)

  def encode(self, images: jax.Array, *, train: bool = False):
    """`jq.vq.VQOutput` of float32[B, H, W, C] images: indices int32[B, H/f, W/f]."""
    return self.quantizer(self.encoder(images), train=train)

  def __call__(self, images: jax.Array, *, train: bool = False):
    """(reconstructions float32[B, H, W, C], the `jq.vq.VQOutput`)."""
    out = self.encode(images, train=train)
    return self.decoder(out.quantized), out


# ----------------------------------------------------------------------------
# Training.


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """A trained tokenizer and its training curve.

  Attributes:
    model: the trained `Tokenizer`.
    mse: float32[steps], the minibatch reconstruction error of each step.
    quantizer_loss: float32[steps], the quantizer's loss of each step.
    seconds: wall time of the training (compilation included).
  """

  model: Tokenizer
  mse: np.ndarray
  quantizer_loss: np.ndarray
  seconds: float


@functools.partial(jax.jit, static_argnames=("graphdef", "patch"))
def _train_step(graphdef, state, images, crops, *, patch):
  """One Adam step on the crops int32[B, 4] of images; returns (state, mse, qloss).

  One jitted call per step: XLA on CPU runs convolutions inside `lax.scan` many
  times slower than at top level.
  """
  model, optimizer = nnx.merge(graphdef, state)
  batch = _gather_crops(images, crops, patch)

  def loss_fn(model):
    recon, out = model(batch, train=True)
    mse = jnp.mean(jnp.square(recon - batch))
    return mse + out.loss, (mse, out.loss)

  (_, (mse, qloss)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  with jax.numpy_dtype_promotion("standard"):  # optax: float ** int32 step counts
    optimizer.update(model, grads)
  return nnx.state((model, optimizer)), mse, qloss


class _NoBar:
  """Stands in for a tqdm bar when there is none."""

  def update(self, n: int) -> None:
    del n

  def set_postfix(self, **values: Any) -> None:
    del values

  def close(self) -> None:
    pass


def _progress_bar(total: int, description: str, enabled: bool, unit: str = "step"):
  """A tqdm bar; a `_NoBar` when disabled or tqdm is not installed."""
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _NoBar()
  if not enabled:
    return _NoBar()
  return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True)


def train(config: TokenizerConfig, data: TokenizerData, *, progress: bool = True
          ) -> TrainResult:
  """Trains a `Tokenizer` on random crops of ``data.train``.

  Args:
    config: the run; ``config.train`` sets steps, batch size, schedule and seed.
    data: from ``load_data(config.data)``.
    progress: show a tqdm progress bar.
  Returns:
    The `TrainResult`.
  """
  start = time.perf_counter()
  schedule = config.train
  model = Tokenizer(config, data.train.shape[-1], rngs=nnx.Rngs(schedule.seed))
  learning_rate = optax.warmup_cosine_decay_schedule(
      0.0, schedule.learning_rate, min(schedule.warmup_steps, schedule.steps - 1),
      schedule.steps, end_value=0.05 * schedule.learning_rate)
  with jax.numpy_dtype_promotion("standard"):
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  images = jnp.asarray(data.train)
  crops = random_crops(data, np.random.default_rng([schedule.seed, 1]),
                       (schedule.steps, schedule.batch_size))
  bar = _progress_bar(schedule.steps, config.name, progress)
  losses = []
  try:
    for step in range(schedule.steps):
      state, mse, qloss = _train_step(graphdef, state, images, crops[step],
                                      patch=data.patch_size)
      losses.append((mse, qloss))
      bar.update(1)
      if step % 50 == 49:
        bar.set_postfix(mse=f"{float(mse):.5f}")
  finally:
    bar.close()
  mse, qloss = np.asarray(jax.device_get(losses), np.float32).T
  model, _ = nnx.merge(graphdef, state)
  return TrainResult(model, mse, qloss, time.perf_counter() - start)


# ----------------------------------------------------------------------------
# Saving and loading.


def save(model: Tokenizer, config: TokenizerConfig, path: Union[str, os.PathLike]) -> None:
  """Writes a trained `model` to the directory `path` (created if needed).

  ``tokenizer.json`` holds the config and image channels; ``model/`` the
  parameters and codebook state (EMA statistics, k-means flag, restart key) as a
  `jq.checkpoint`, replaced if it exists.
  """
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise ValueError(f"path={str(path)!r} exists and is not a directory")
  path.mkdir(parents=True, exist_ok=True)
  jq.checkpoint.save(path / MODEL_DIR, nnx.to_pure_dict(nnx.state(model)), overwrite=True)
  description = {"config": dataclasses.asdict(config),
                 "channels": model.encoder.down[0].in_features}
  (path / MODEL_FILE).write_text(json.dumps(description, indent=1) + "\n")


def _config_from_dict(data: dict[str, Any]) -> TokenizerConfig:
  """Inverse of ``dataclasses.asdict`` on a `TokenizerConfig` (JSON lists -> tuples)."""
  section = lambda cls, table: cls(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in table.items()})
  return TokenizerConfig(
      name=data["name"], description=data["description"], min_usage=data["min_usage"],
      **{name: section(cls, data[name]) for name, cls in _SECTIONS.items()})


def load(path: Union[str, os.PathLike]) -> tuple[Tokenizer, TokenizerConfig]:
  """The tokenizer `save` (or `run` with `out`) wrote to `path`, and its config.

  Example:
    >>> from jaxquant import tokenizer
    >>> model, config = tokenizer.load("jaxquant_out/tokenizer_fsq_1k")
    >>> indices = model.encode(images).indices  # images: float32[B, H, W, C] in [0, 1]
  Raises:
    FileNotFoundError: `path` holds no saved tokenizer.
    ValueError: its tokenizer.json is not a tokenizer description, or the saved
      state does not fit the config it describes.
  """
  path = pathlib.Path(path)
  if not (path / MODEL_FILE).is_file():
    raise FileNotFoundError(f"{str(path)!r} holds no saved tokenizer: no {MODEL_FILE}")
  try:
    description = json.loads((path / MODEL_FILE).read_text())
    config = _config_from_dict(description["config"])
    channels = int(description["channels"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{str(path / MODEL_FILE)!r} does not describe a tokenizer "
                     f"({type(e).__name__}: {e})") from e
  model = Tokenizer(config, channels, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  saved = jq.checkpoint.restore(path / MODEL_DIR)  # a pure dict
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  if shapes(saved) != shapes(nnx.to_pure_dict(state)):
    raise ValueError(f"the state saved in {str(path / MODEL_DIR)!r} does not fit the model "
                     f"its {MODEL_FILE} describes")
  nnx.replace_by_pure_dict(state, saved)
  nnx.update(model, state)
  return model, config


# ----------------------------------------------------------------------------
# Evaluation.


def psnr(reference: jax.Array, reconstruction: jax.Array, max_value: float = 1.0
         ) -> jax.Array:
  """float32[]: peak signal-to-noise ratio in dB, ``10 log10(max_value^2 / MSE)``.

  The MSE is the mean over all elements (so over every image of a batch at once,
  not an average of per-image PSNRs); identical inputs give inf.

  Args:
    reference, reconstruction: float[...] of the same shape.
    max_value: the largest possible value (1.0 for images in [0, 1]).
  """
  reference, reconstruction = jnp.asarray(reference), jnp.asarray(reconstruction)
  if reference.shape != reconstruction.shape:
    raise ValueError(f"reference has shape {reference.shape} but reconstruction has "
                     f"{reconstruction.shape}; expected the same shape")
  if not max_value > 0:
    raise _fail("max_value", max_value, "a positive number")
  error = reference.astype(jnp.float32) - reconstruction.astype(jnp.float32)
  mse = jnp.mean(jnp.square(error))
  return jnp.float32(20 * math.log10(max_value)) - 10 * jnp.log10(mse)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """How well a trained tokenizer reconstructs and uses its codebook.

  Attributes:
    psnr_db: PSNR of the holdout patches (reconstructions clipped to [0, 1]).
    usage_fraction: fraction of the codes used by the evaluation tokens.
    perplexity: exp(entropy) of the code frequencies (the codebook size at best).
    counts: int32[K], uses of each code.
    num_tokens: how many tokens were counted.
    originals: float32[n, P, P, C], sample holdout patches (for the plot).
    reconstructions: float32[n, P, P, C], their reconstructions.
  """

  psnr_db: float
  usage_fraction: float
  perplexity: float
  counts: np.ndarray
  num_tokens: int
  originals: np.ndarray
  reconstructions: np.ndarray


@functools.partial(jax.jit, static_argnames="graphdef")
def _reconstruct(graphdef, state, patches):
  return jnp.clip(nnx.merge(graphdef, state)(patches)[0], 0.0, 1.0)


@functools.partial(jax.jit, static_argnames="graphdef")
def _encode(graphdef, state, patches):
  return nnx.merge(graphdef, state).encode(patches).indices


def _batched(fn: Callable, graphdef, state, patches: np.ndarray) -> np.ndarray:
  """`fn` on `patches` in batches of _EVAL_BATCH (the last one padded), concatenated."""
  outputs = []
  for start in range(0, len(patches), _EVAL_BATCH):
    batch = patches[start:start + _EVAL_BATCH]
    padded = np.concatenate([batch, np.zeros((_EVAL_BATCH - len(batch), *batch.shape[1:]),
                                             batch.dtype)])
    outputs.append(np.asarray(fn(graphdef, state, jnp.asarray(padded)))[:len(batch)])
  return np.concatenate(outputs)


def evaluate(model: Tokenizer, config: TokenizerConfig, data: TokenizerData, *,
             progress: bool = False) -> Evaluation:
  """Holdout PSNR and codebook usage of a trained tokenizer (see the module docstring).

  Args:
    model: the trained `Tokenizer`.
    config: its config.
    data: from ``load_data(config.data)``.
    progress: show a progress bar over the (symmetry, offset) tilings.
  """
  graphdef, state = nnx.split(model)
  recon = _batched(_reconstruct, graphdef, state, data.holdout)
  factor = config.model.downsampling
  tilings = [(k, (dy, dx)) for k in range(data.symmetries)
             for dy in range(factor) for dx in range(factor)]
  bar = _progress_bar(len(tilings), f"{config.name} eval", progress, unit="tiling")
  indices = []
  try:
    for k, offset in tilings:
      patches = tile_patches(np.ascontiguousarray(dihedral(data.full, k)), data.patch_size,
                             offset)
      if len(patches):
        indices.append(_batched(_encode, graphdef, state, patches).reshape(-1))
      bar.update(1)
  finally:
    bar.close()
  indices = np.concatenate(indices)
  usage = metrics_lib.codebook_usage(jnp.asarray(indices), config.quantizer.codebook_size)
  # Samples for the plot: from the smoothest to the most textured holdout patch.
  texture = np.argsort(data.holdout.std(axis=(1, 2, 3)), kind="stable")
  samples = texture[np.linspace(0, len(recon) - 1, _PLOT_SAMPLES).round().astype(int)]
  return Evaluation(psnr_db=float(psnr(data.holdout, recon)),
                    usage_fraction=float(usage["usage_fraction"]),
                    perplexity=float(usage["perplexity"]),
                    counts=np.asarray(usage["counts"]), num_tokens=len(indices),
                    originals=data.holdout[samples], reconstructions=recon[samples])


# ----------------------------------------------------------------------------
# Plot, summary and the whole run.


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the tokenizer's figure needs matplotlib, which is not installed; "
                      "install it with: pip install 'jaxquant[examples]'") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _strip(patches: np.ndarray) -> np.ndarray:
  """float32[P, n*(P+1)-1, C]: patches side by side with 1-pixel white gaps."""
  size, channels = patches.shape[1], patches.shape[-1]
  gap = np.ones((size, 1, channels), np.float32)
  return np.concatenate([x for p in patches for x in (p, gap)][:-1], axis=1)


def plot(runs: Sequence[tuple[dict[str, Any], Evaluation]], path: Union[str, os.PathLike]
         ) -> None:
  """Writes a PNG: per run, holdout originals over reconstructions, and code usage.

  Args:
    runs: (summary from `summarize`, `Evaluation`) per tokenizer, one row each.
    path: the PNG file.
  """
  plt = _pyplot()
  fig, axes = plt.subplots(len(runs), 2, figsize=(13, 2.6 * len(runs)), squeeze=False,
                           gridspec_kw={"width_ratios": [1.6, 1]})
  for (summary, evaluation), (left, right) in zip(runs, axes):
    top, bottom = _strip(evaluation.originals), _strip(evaluation.reconstructions)
    picture = np.concatenate([top, np.ones_like(top[:1]), bottom], axis=0)
    gray = picture.shape[-1] == 1
    left.imshow(picture[..., 0] if gray else picture, cmap="gray" if gray else None,
                vmin=0, vmax=1, interpolation="nearest")
    left.set_axis_off()
    left.set_title(f"{summary['name']}: holdout originals (top), reconstructions "
                   f"(bottom); PSNR {summary['psnr_db']:.2f} dB", fontsize=9)
    counts = np.sort(evaluation.counts)[::-1]
    right.fill_between(np.arange(1, len(counts) + 1), np.maximum(counts, 0.5), 0.5,
                       step="post", color="tab:blue", alpha=0.7)
    right.set_yscale("log")
    right.set_xlim(1, len(counts))
    right.set_ylim(0.5, None)
    right.set_xlabel("codes, most used first", fontsize=8)
    right.set_ylabel("uses", fontsize=8)
    right.set_title(f"used {int(np.sum(counts > 0))}/{len(counts)} codes "
                    f"({summary['usage_fraction']:.1%}), perplexity "
                    f"{summary['perplexity']:.0f}", fontsize=9)
    right.tick_params(labelsize=7)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summarize(config: TokenizerConfig, result: TrainResult, evaluation: Evaluation,
              eval_seconds: float) -> dict[str, Any]:
  """The numbers of a run as a JSON-ready dict (also the config, as dicts)."""
  return {
      "name": config.name,
      "dataset": config.data.dataset,
      "quantizer": config.quantizer.kind,
      "codebook_size": config.quantizer.codebook_size,
      "steps": config.train.steps,
      "train_seconds": round(result.seconds, 1),
      "eval_seconds": round(eval_seconds, 1),
      "psnr_db": round(evaluation.psnr_db, 3),
      "usage_fraction": round(evaluation.usage_fraction, 5),
      "perplexity": round(evaluation.perplexity, 1),
      "eval_tokens": evaluation.num_tokens,
      "final_train_mse": float(np.mean(result.mse[-max(1, len(result.mse) // 20):])),
      "min_usage": config.min_usage,
      "target_holds": (None if config.min_usage is None
                       else evaluation.usage_fraction >= config.min_usage),
      "config": json.loads(json.dumps(dataclasses.asdict(config))),  # lists, as in JSON
  }


def describe(summary: dict[str, Any]) -> str:
  """One line of a summary: PSNR, usage, perplexity, and whether the target holds."""
  target = ""
  if summary["min_usage"] is not None:
    verdict = "holds" if summary["target_holds"] else "MISSED"
    target = f"; target usage >= {summary['min_usage']:.0%}: {verdict}"
  return (f"{summary['name']}: holdout PSNR {summary['psnr_db']:.2f} dB, codebook usage "
          f"{summary['usage_fraction']:.1%} of {summary['codebook_size']} codes, perplexity "
          f"{summary['perplexity']:.1f} ({summary['eval_tokens']:,} tokens; "
          f"{summary['steps']} steps in {summary['train_seconds']:.0f} s, evaluation "
          f"{summary['eval_seconds']:.0f} s){target}")


def run(config: TokenizerConfig, out: Union[str, os.PathLike, None] = None, *,
        progress: bool = True) -> tuple[dict[str, Any], Evaluation]:
  """Trains and evaluates one tokenizer; writes ``summary.json`` and the PNG to `out`.

  Args:
    config: the run (``dataclasses.replace(config, train=...)`` to change steps).
    out: a directory for ``summary.json``, ``tokenizer.png`` and the trained model
      (`save`; `load` reads it back); None: write nothing.
    progress: show a tqdm progress bar.
  Returns:
    (the summary dict of `summarize`, the `Evaluation`).
  Raises:
    ImportError: scikit-learn, or matplotlib when `out` is given, is missing.
    ValueError: `out` exists and is not a directory.
  """
  if out is not None:
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
      raise ValueError(f"out={str(out)!r} exists and is not a directory")
    _pyplot()  # fail before training, not after
  data = load_data(config.data)
  result = train(config, data, progress=progress)
  start = time.perf_counter()
  evaluation = evaluate(result.model, config, data, progress=progress)
  summary = summarize(config, result, evaluation, time.perf_counter() - start)
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    plot([(summary, evaluation)], out / PLOT_FILE)
    save(result.model, config, out)
  return summary, evaluation
