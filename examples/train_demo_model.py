"""Trains the demo MLP on scikit-learn's digits images and saves its float params.

The saved directory is a jaxquant checkpoint of the float variables
``{"params": {"Dense_0": {"kernel": float32[64, 512], "bias": float32[512]}, ...}}``,
ready for the quantize command:

  python examples/train_demo_model.py ./demo_mlp
  jaxquant quantize --checkpoint ./demo_mlp --recipe int4-g128

Needs scikit-learn: pip install 'jaxquant[demo]'.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax

from jaxquant import checkpoint
from jaxquant import demo


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("path", nargs="?", type=pathlib.Path,
                      default=pathlib.Path("demo_mlp"),
                      help="checkpoint directory to write (default: ./demo_mlp)")
  parser.add_argument("--steps", type=int, default=demo.DEFAULT_STEPS,
                      help=f"Adam steps (default: {demo.DEFAULT_STEPS})")
  parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a checkpoint already at PATH")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  start = time.perf_counter()
  params = demo.train_demo_model(seed=args.seed, steps=args.steps)
  jax.block_until_ready(params)
  print(f"Trained the demo MLP for {args.steps} steps in "
        f"{time.perf_counter() - start:.1f} s")
  print(f"Test accuracy: {demo.accuracy_on_test_split(params):.2%}")
  checkpoint.save(args.path, params, overwrite=args.overwrite)
  print(f"Saved the float params to {args.path}; quantize them with:\n"
        f"  jaxquant quantize --checkpoint {args.path}")


if __name__ == "__main__":
  main()
