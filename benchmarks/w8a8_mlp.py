"""A 3 x Dense(1024) Linen MLP at batch 64: float vs w8a8 vs weight-only int8.

Times, jitted, warm (compile excluded), `block_until_ready`, in one process:

* ``float32``: ``model.apply(variables, x)``, the baseline;
* ``w8a8``: `jq.linen.apply` with int8 per-output-channel kernels (QArrays) and
  int8 per-token dynamic activations: each Dense is an int8 x int8 -> int32
  `jax.lax.dot_general` with both scales applied once after it (the script
  checks the compiled HLO has the s8 dot);
* ``w8a8 static``: the same with static per-tensor activation scales, calibrated
  by `jq.linen.calibrate` (EMA of absmax over 8 batches): no per-token reduction;
* ``w8 (dequant)``: int8 kernels, float activations: dequantize then f32 dot
  (jaxquant's fallback);
* ``bfloat16``: the same model with ``dtype=param_dtype=bfloat16``, a float
  alternative;

and, to separate the matmul from the quantization around it, the three bare
[64, 1024] x [1024, 1024] dots: f32, bf16 (f32 accumulation) and s8 x s8 -> s32.

Rounds are interleaved (every variant once per round, the order rotating), each
round times `--inner` calls per variant; the figure is the median over rounds of
the per-call time, and the ratio is that median over float32's (< 1: faster).
Run on a quiet machine; other processes on a 2-core VM move every number.

Usage:
  python benchmarks/w8a8_mlp.py [--rounds 30] [--inner 20] [--json out.json]
  XLA_FLAGS=... python benchmarks/w8a8_mlp.py     # to try XLA:CPU options
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
import jaxquant.linen  # noqa: F401  (registers jq.linen)

BATCH, WIDTH, DEPTH = 64, 1024, 3


class MLP(nn.Module):
  """DEPTH x Dense(WIDTH), ReLU between."""

  dtype: object = None
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(DEPTH):
      x = nn.Dense(WIDTH, dtype=self.dtype, param_dtype=self.param_dtype)(x)
      if i < DEPTH - 1:
        x = nn.relu(x)
    return x


WEIGHT_RULES = [jq.Rule(r"params/.*/kernel", jq.QuantSpec("int8", channel_axes=(-1,)))]
ACTIVATION_RULES = [(r".*", jq.linen.ActivationQuant("int8", "per_token"))]
STATIC_RULES = [(r".*", jq.linen.ActivationQuant("int8", "static"))]


def variants() -> dict[str, tuple[Callable, tuple]]:
  """name -> (jitted function, its arguments)."""
  x = jax.random.normal(jax.random.key(0), (BATCH, WIDTH), jnp.float32)
  model = MLP()
  variables = model.init(jax.random.key(1), x)
  qvariables = jq.quantize_tree(variables, WEIGHT_RULES)
  calibration = [jax.random.normal(jax.random.key(10 + i), x.shape) for i in range(8)]
  calibrated = jq.linen.calibrate(model, qvariables, calibration,
                                  activation_rules=STATIC_RULES)
  bf16_model = MLP(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  bf16_variables = jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables)

  w = jax.random.normal(jax.random.key(2), (WIDTH, WIDTH), jnp.float32)
  xs8 = jax.random.randint(jax.random.key(3), (BATCH, WIDTH), -127, 128).astype(jnp.int8)
  ws8 = jax.random.randint(jax.random.key(4), (WIDTH, WIDTH), -127, 128).astype(jnp.int8)
  dims = (((1,), (0,)), ((), ()))
  return {
      "float32": (jax.jit(model.apply), (variables, x)),
      "w8a8": (jax.jit(lambda v, x: jq.linen.apply(model, v, x,
                                                   activation_rules=ACTIVATION_RULES)),
               (qvariables, x)),
      "w8a8 static": (jax.jit(lambda v, x: jq.linen.apply(model, v, x,
                                                          activation_rules=STATIC_RULES)),
                      (calibrated, x)),
      "w8 (dequant)": (jax.jit(lambda v, x: jq.linen.apply(model, v, x)), (qvariables, x)),
      "bfloat16": (jax.jit(bf16_model.apply), (bf16_variables, x.astype(jnp.bfloat16))),
      "dot f32": (jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims)), (x, w)),
      "dot bf16": (jax.jit(lambda a, b: jax.lax.dot_general(
          a, b, dims, preferred_element_type=jnp.float32)),
                   (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))),
      "dot s8->s32": (jax.jit(lambda a, b: jax.lax.dot_general(
          a, b, dims, preferred_element_type=jnp.int32)), (xs8, ws8)),
  }


def check_int8_dot(fn, args) -> bool:
  """Whether the compiled w8a8 function contains an s8 x s8 -> s32 dot."""
  hlo = fn.lower(*args).compile().as_text()
  return any(" s32[" in line and " dot(" in line for line in hlo.splitlines())


def errors(fns) -> dict[str, float]:
  """Max |variant - float32| / max |float32| of the model variants."""
  ref_fn, ref_args = fns["float32"]
  ref = np.asarray(ref_fn(*ref_args), np.float32)
  scale = float(np.max(np.abs(ref)))
  return {name: float(np.max(np.abs(np.asarray(fn(*args), np.float32) - ref))) / scale
          for name, (fn, args) in fns.items() if not name.startswith("dot")}


def time_interleaved(fns, rounds: int, inner: int) -> dict[str, list[float]]:
  """Per-call seconds of each variant, one figure per round, rounds interleaved."""
  names = list(fns)
  for fn, args in fns.values():  # compile and warm
    for _ in range(3):
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn, args = fns[name]
      start = time.perf_counter()
      for _ in range(inner):
        out = fn(*args)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / inner)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--inner", type=int, default=20)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  fns = variants()
  int_dot = check_int8_dot(*fns["w8a8"])
  errs = errors(fns)
  times = time_interleaved(fns, args.rounds, args.inner)
  medians = {name: statistics.median(t) for name, t in times.items()}
  base = {"model": medians["float32"], "dot": medians["dot f32"]}

  print(f"{DEPTH} x Dense({WIDTH}) MLP, batch {BATCH}; {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"w8a8 compiles to an s8 x s8 -> s32 dot: {int_dot}")
  print(f"{'variant':<14} {'median us':>10} {'p10 us':>9} {'p90 us':>9} "
        f"{'x float':>8} {'rel err':>8}")
  for name, t in times.items():
    ref = base["dot" if name.startswith("dot") else "model"]
    p10, p90 = np.percentile(t, [10, 90]) * 1e6
    err = f"{errs[name]:.4f}" if name in errs else "-"
    print(f"{name:<14} {medians[name] * 1e6:>10.1f} {p10:>9.1f} {p90:>9.1f} "
          f"{medians[name] / ref:>8.3f} {err:>8}")
  print("x float: median time / float32's median (dots: / 'dot f32'); < 1 is faster")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"medians_s": medians, "times_s": times, "rel_err": errs,
                 "int8_dot": int_dot, "xla_flags": os.environ.get("XLA_FLAGS", "")},
                f, indent=1)


if __name__ == "__main__":
  main()
