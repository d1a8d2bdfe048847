"""Train FSQ and VQ image tokenizers on real images; compare PSNR and codebook usage.

Each shipped tokenizer config (``configs/tokenizer_*.toml``; `jaxquant.tokenizer`
has the format) trains a small conv autoencoder with a `jq.vq.FSQ` or
`jq.vq.VectorQuantizer` bottleneck on scikit-learn's two sample photographs
(16x16 patches, a token per 4x4 pixels; the right-most 20% of each photo held
out) or on its 8x8 digits, and is then measured: holdout PSNR, the fraction of
the codebook used and the perplexity of the code frequencies. The codebooks are
of comparable size: FSQ [8, 5, 5, 5] = 1,000 vs VQ 1,024 codes (2^10), and FSQ
[8, 8, 8, 6, 5] = 15,360 vs VQ 16,384 codes (2^14). The targets, as the FSQ
paper reports them: FSQ uses >= 95% of its codes, VQ with EMA + k-means init +
dead-code replacement >= 80%; plain VQ (gradient-trained codebook, none of
those) uses fewer, shown for contrast.

  python examples/train_tokenizer.py                  # every shipped config, ~11 min
                                                      # on 2 CPU cores (4 of them the
                                                      # VQ lookups evaluating vq_16k)
  python examples/train_tokenizer.py --configs fsq_1k,vq_1k,vq_plain_1k
  python examples/train_tokenizer.py --steps 200      # a quick look (targets missed)

It prints a table, writes tokenizers.png (per config: holdout originals over
reconstructions, and the code-usage histogram) and summary.json to --out, plus
each config's own summary.json, tokenizer.png and trained model in --out/<config>/
(`jaxquant.tokenizer.load` reads it), exactly what
``jaxquant tokenizer train --config NAME`` writes. Needs scikit-learn, matplotlib
and tqdm (pip install 'jaxquant[examples]').
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

from jaxquant import tokenizer


def default_configs() -> list[str]:
  """The shipped configs, grouped by data and codebook size (2^8, 2^10, 2^14), FSQ first."""
  def key(name):
    c = tokenizer.load_config(name)
    return (c.data.dataset, round(math.log2(c.quantizer.codebook_size)), c.quantizer.kind,
            c.quantizer.kind == "vq" and c.quantizer.codebook_learning == "gradient")
  return sorted(tokenizer.list_configs(), key=key)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(default_configs()),
                      help="comma-separated config names or .toml paths (default: all "
                      "shipped: %(default)s)")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps for every config (default: each config's)")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tokenizer_out"),
                      help="output directory (default: %(default)s)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  if args.steps is not None and args.steps < 1:
    parser.error(f"--steps={args.steps}: expected a positive number of steps")
  try:
    args.configs = [tokenizer.load_config(c.strip()) for c in args.configs.split(",")]
  except ValueError as e:
    parser.error(str(e))
  if args.steps is not None:
    args.configs = [dataclasses.replace(c, train=dataclasses.replace(c.train, steps=args.steps))
                    for c in args.configs]
  return args


def format_table(summaries: list[dict]) -> str:
  """The summaries as a fixed-width table, one row per config."""
  width = max(len("config"), *(len(s["name"]) for s in summaries))
  header = (f"{'config':<{width}}  {'data':<6} {'quantizer':<9} {'codes':>6} {'PSNR dB':>8} "
            f"{'usage':>7} {'perplexity':>10} {'steps':>6} {'train s':>7} {'eval s':>6}  "
            "usage target")
  lines = [header, "-" * len(header)]
  for s in summaries:
    target = "-"
    if s["min_usage"] is not None:
      target = f">= {s['min_usage']:.0%}: {'holds' if s['target_holds'] else 'MISSED'}"
    lines.append(f"{s['name']:<{width}}  {s['dataset']:<6} {s['quantizer']:<9} "
                 f"{s['codebook_size']:>6} {s['psnr_db']:>8.2f} {s['usage_fraction']:>7.1%} "
                 f"{s['perplexity']:>10.1f} {s['steps']:>6} {s['train_seconds']:>7.0f} "
                 f"{s['eval_seconds']:>6.0f}  {target}")
  return "\n".join(lines)


def contrast_lines(summaries: list[dict]) -> list[str]:
  """For each plain VQ run, its usage against the EMA + k-means + dead-code VQ run of the
  same data and codebook size (when both ran)."""
  learning = lambda s: s["config"]["quantizer"]["codebook_learning"]
  lines = []
  for plain in summaries:
    if plain["quantizer"] != "vq" or learning(plain) != "gradient":
      continue
    for other in summaries:
      if (other["quantizer"] == "vq" and learning(other) == "ema"
          and (other["dataset"], other["codebook_size"]) == (plain["dataset"],
                                                             plain["codebook_size"])):
        lower = plain["usage_fraction"] < other["usage_fraction"]
        lines.append(f"Plain VQ uses fewer codes than EMA + k-means + dead-code VQ: "
                     f"{plain['name']} {plain['usage_fraction']:.1%} vs {other['name']} "
                     f"{other['usage_fraction']:.1%}: {'holds' if lower else 'MISSED'}")
  return lines


def main(argv=None) -> list[dict]:
  """Trains and evaluates each config; returns their summaries (also in summary.json)."""
  args = parse_args(argv)
  start = time.perf_counter()
  runs = []
  for config in args.configs:
    summary, evaluation = tokenizer.run(config, args.out / config.name,
                                        progress=not args.no_progress)
    print(tokenizer.describe(summary), flush=True)
    runs.append((summary, evaluation))
  summaries = [summary for summary, _ in runs]
  print()
  print(format_table(summaries))
  for line in contrast_lines(summaries):
    print(line)
  print(f"Total {time.perf_counter() - start:.0f} s. Usage and perplexity count the tokens "
        "of every patch at every token-grid offset of the photos (and of their 8 flips and "
        "rotations with dihedral = true), or of every digit image.")
  tokenizer.plot(runs, args.out / "tokenizers.png")
  (args.out / "summary.json").write_text(json.dumps(summaries, indent=1) + "\n")
  print(f"Wrote {args.out / 'tokenizers.png'} and {args.out / 'summary.json'}")
  return summaries


if __name__ == "__main__":
  main(sys.argv[1:])
