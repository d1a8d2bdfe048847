"""The `jaxquant` command.

  jaxquant quantize [--recipe NAME_OR_PATH] [--checkpoint DIR] [--out DIR] [--seed N]
  jaxquant recipes      # the shipped recipes and what they do
  jaxquant formats      # the number formats, with bits and largest value
  jaxquant tokenizer train --config NAME_OR_PATH [--steps N] [--out DIR]

``jaxquant quantize`` with no arguments quantizes the built-in demo model (an MLP
classifier of scikit-learn's digits images, trained and cached on first use) with
the default recipe (int8), prints the per-leaf report and the test accuracy before
and after, and writes the quantized checkpoint to ``./jaxquant_out/<recipe>``.
``--checkpoint DIR`` quantizes float params saved with `jaxquant.checkpoint.save`
instead. ``jaxquant tokenizer train`` trains a small VQ/FSQ image tokenizer on
scikit-learn's sample photographs or digits (see `jaxquant.tokenizer`), prints
its holdout PSNR and codebook usage, and writes ``summary.json``,
``tokenizer.png`` and the trained model (``jaxquant.tokenizer.load`` reads it) to
``./jaxquant_out/tokenizer_<name>``. Errors print one line to stderr and exit with
status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import textwrap
from typing import Any, Optional, Sequence

import jax

import jaxquant as jq
from jaxquant import recipes as recipes_lib

EXIT_OK = 0
EXIT_ERROR = 2
_WIDTH = 88


class CommandError(Exception):
  """A user error: printed as one line to stderr, exit status 2."""


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxquant", description="Quantize JAX/Flax parameter pytrees.")
  parser.add_argument("--version", action="version", version=f"jaxquant {jq.__version__}")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  quantize = commands.add_parser(
      "quantize", help="quantize the demo model or a checkpoint with a recipe",
      description="Quantize float params with a recipe; report sizes, errors and "
      "(for the demo model) test accuracy; save the quantized checkpoint.")
  quantize.add_argument(
      "--recipe", default=recipes_lib.DEFAULT_RECIPE, metavar="NAME_OR_PATH",
      help="a shipped recipe (see `jaxquant recipes`) or a .toml file "
      f"(default: {recipes_lib.DEFAULT_RECIPE})")
  quantize.add_argument(
      "--checkpoint", type=pathlib.Path, metavar="DIR",
      help="float params saved with jaxquant.checkpoint.save (default: the demo "
      "model, trained and cached on first use)")
  quantize.add_argument(
      "--out", type=pathlib.Path, metavar="DIR",
      help="where to save the quantized checkpoint (default: "
      "./jaxquant_out/<recipe name>; a previous checkpoint there is replaced)")
  quantize.add_argument(
      "--seed", type=int, metavar="N",
      help="training seed of the demo model (default: 0; each seed is cached)")
  quantize.set_defaults(run=_quantize_command)

  commands.add_parser("recipes", help="list the shipped recipes").set_defaults(
      run=_recipes_command)
  commands.add_parser("formats", help="list the number formats").set_defaults(
      run=_formats_command)

  tokenizer = commands.add_parser(
      "tokenizer", help="train a VQ/FSQ image tokenizer on offline images",
      description="Train a small VQ/FSQ image tokenizer (jaxquant.tokenizer).")
  tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True,
                                                metavar="COMMAND")
  train = tokenizer_commands.add_parser(
      "train", help="train and evaluate a tokenizer config",
      description="Train a tokenizer config, print its holdout PSNR and codebook usage, "
      "and write summary.json, tokenizer.png and the trained model.")
  train.add_argument(
      "--config", required=True, metavar="NAME_OR_PATH",
      help="a shipped config (one of: " + ", ".join(_tokenizer_configs()) + ") or a "
      ".toml file (the format is described in jaxquant/tokenizer.py)")
  train.add_argument("--steps", type=int, metavar="N",
                     help="training steps (default: the config's)")
  train.add_argument(
      "--out", type=pathlib.Path, metavar="DIR",
      help="where to write summary.json, tokenizer.png and the model (tokenizer.json, "
      "model/) (default: ./jaxquant_out/tokenizer_<config name>)")
  train.set_defaults(run=_tokenizer_train_command)
  return parser


# ----------------------------------------------------------------------------
# jaxquant quantize


def _has_qarrays(tree: Any) -> bool:
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, jq.QArray))
  return any(isinstance(leaf, jq.QArray) for leaf in leaves)


def _restore_float_params(directory: pathlib.Path) -> Any:
  """Float params from a jaxquant checkpoint directory."""
  from jaxquant import checkpoint  # pylint: disable=g-import-not-at-top
  if not directory.is_dir():
    raise CommandError(f"--checkpoint {directory}: no such directory")
  params = checkpoint.restore(directory)
  if _has_qarrays(params):
    raise CommandError(f"--checkpoint {directory} holds quantized arrays already; "
                       "give a checkpoint of float params")
  return params


def _as_demo_variables(params: Any) -> Optional[Any]:
  """`params` as demo variables ``{"params": ...}`` if it has the demo's shapes."""
  from jaxquant import demo  # pylint: disable=g-import-not-at-top
  for candidate in (params, {"params": params}):
    if demo.is_demo_params(candidate):
      return candidate
  return None


def _load_params(args: argparse.Namespace) -> tuple[Any, Optional[Any], str]:
  """(params to quantize, the same as demo variables or None, a line saying what)."""
  from jaxquant import demo  # pylint: disable=g-import-not-at-top
  if args.checkpoint is None:
    seed = 0 if args.seed is None else args.seed
    params = demo.load_or_train_demo_params(seed)
    what = (f"Model: the demo MLP {demo.NUM_FEATURES}-"
            f"{'-'.join(map(str, demo.HIDDEN))}-{demo.NUM_CLASSES} on scikit-learn's "
            f"digits (seed {seed}, cached at {demo.cache_dir(seed)})")
    return params, params, what
  if args.seed is not None:
    raise CommandError("--seed picks the demo model's training seed; it has no "
                       "effect with --checkpoint")
  params = _restore_float_params(args.checkpoint)
  return params, _as_demo_variables(params), f"Model: float params from {args.checkpoint}"


def _accuracy_lines(variables: Any, qvariables: Any, recipe_name: str) -> list[str]:
  from jaxquant import demo  # pylint: disable=g-import-not-at-top
  before = demo.accuracy_on_test_split(variables)
  after = demo.accuracy_on_test_split(jq.dequantize_tree(qvariables))
  labels = ("Test accuracy before (float):", f"Test accuracy after ({recipe_name}):")
  width = max(map(len, labels))
  return [f"{labels[0]:<{width}} {before:7.2%}",
          f"{labels[1]:<{width}} {after:7.2%}  ({100 * (after - before):+.2f} points)"]


def _check_out(out: pathlib.Path) -> None:
  """Fails early unless `out` is new, empty, or a checkpoint that may be replaced."""
  from jaxquant import checkpoint  # pylint: disable=g-import-not-at-top
  if not out.exists():
    return
  if not out.is_dir() or not ((out / checkpoint.METADATA_FILE).exists()
                              or not any(out.iterdir())):
    raise CommandError(f"--out {out} exists and is not a jaxquant checkpoint nor an "
                       "empty directory; refusing to overwrite it")


def _quantize_command(args: argparse.Namespace) -> int:
  from jaxquant import checkpoint  # pylint: disable=g-import-not-at-top
  recipe = recipes_lib.load_recipe(args.recipe)  # first: bad arguments fail fast
  out = args.out if args.out is not None else pathlib.Path("jaxquant_out") / recipe.name
  _check_out(out)
  params, variables, what = _load_params(args)
  try:
    qparams = jq.quantize_tree(params, recipe.rules)
  except (ValueError, TypeError) as e:
    raise CommandError(f"recipe {recipe.name} does not apply: {e}") from e
  report = jq.tree_report(params, qparams)

  print(what)
  print(recipe)
  print()
  print(report)
  print()
  if not _has_qarrays(qparams):
    print(f"Note: no rule of recipe {recipe.name} matched a float leaf; nothing was "
          "quantized.")
  if variables is not None:
    qvariables = qparams if variables is params else {"params": qparams}
    print("\n".join(_accuracy_lines(variables, qvariables, recipe.name)))
  else:
    print("Accuracy: not evaluated; it needs the demo model's architecture "
          "(these params have another structure).")
  print(f"Size: {report.bytes_before:,} -> {report.bytes_after:,} bytes "
        f"({report.compression:.2f}x smaller)")
  checkpoint.save(out, qparams, overwrite=True)
  print(f"Saved the quantized checkpoint to {out} "
        "(load it with jaxquant.checkpoint.restore)")
  return EXIT_OK


# ----------------------------------------------------------------------------
# jaxquant recipes / formats


def _recipes_command(args: argparse.Namespace) -> int:
  del args
  for name in recipes_lib.list_recipes():
    recipe = recipes_lib.load_recipe(name)
    default = " (default)" if name == recipes_lib.DEFAULT_RECIPE else ""
    print(f"{name}{default}")
    print(textwrap.fill(recipe.description, width=_WIDTH, initial_indent="    ",
                        subsequent_indent="    "))
  print("\nUse one with `jaxquant quantize --recipe NAME`, or write your own .toml\n"
        "(the format is described in jaxquant/recipes.py) and pass its path.")
  return EXIT_OK


def _formats_command(args: argparse.Namespace) -> int:
  del args
  rows = [("name", "kind", "bits", "max")]
  for name in jq.list_formats():
    fmt = jq.get_format(name)
    rows.append((fmt.name, fmt.kind, str(fmt.bits), f"{fmt.max:g}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  for row in rows:
    print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  "
          f"{row[3]:>{widths[3]}}")
  return EXIT_OK


# ----------------------------------------------------------------------------
# jaxquant tokenizer train


def _tokenizer_configs() -> list[str]:
  from jaxquant import tokenizer  # pylint: disable=g-import-not-at-top
  return tokenizer.list_configs()


def _tokenizer_train_command(args: argparse.Namespace) -> int:
  from jaxquant import tokenizer  # pylint: disable=g-import-not-at-top
  config = tokenizer.load_config(args.config)
  if args.steps is not None:
    if args.steps < 1:
      raise CommandError(f"--steps {args.steps}: expected a positive number of steps")
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, steps=args.steps))
  out = args.out if args.out is not None else (
      pathlib.Path("jaxquant_out") / f"{tokenizer.CONFIG_PREFIX}{config.name}")
  quantizer = config.quantizer
  what = (f"FSQ levels {list(quantizer.levels)}" if quantizer.kind == "fsq" else
          f"VQ {quantizer.num_codes} codes ({quantizer.codebook_learning} codebook)")
  print(f"Tokenizer {config.name}: {what} on {config.data.dataset}, "
        f"{config.train.steps} steps")
  summary, _ = tokenizer.run(config, out)
  print(tokenizer.describe(summary))
  print(f"Wrote {out / tokenizer.SUMMARY_FILE}, {out / tokenizer.PLOT_FILE} and the "
        f"model ({out / tokenizer.MODEL_FILE}, {out / tokenizer.MODEL_DIR})")
  return EXIT_OK


# ----------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the `jaxquant` command.

  Args:
    argv: the arguments after the program name (default: ``sys.argv[1:]``).
  Returns:
    The exit status: 0 on success, 2 on a usage or input error (bad recipe,
    missing checkpoint, ...), after printing one line to stderr.
  """
  parser = _build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # --help, --version, or argparse's own usage errors
    return e.code if isinstance(e.code, int) else EXIT_ERROR
  try:
    return args.run(args)
  except (CommandError, ValueError, TypeError, OSError, ImportError) as e:
    sys.stdout.flush()
    print(f"jaxquant {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
  sys.exit(main())
