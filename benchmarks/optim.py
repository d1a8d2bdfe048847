"""Step time and state memory of 8-bit AdamW against optax.adamw, in one process.

For pytrees of 16M and 64M float32 parameters (Dense-like 2-D leaves), times one
jitted `update` + `apply_updates` step (state and params donated, warm; the
optimizers' steps interleave round by round and the ratio is the median of the
per-round ratios, so load from other processes cancels) of `optax.adamw` and
`jaxquant.optim.adamw_8bit` (and `adamw_4bit`), and prints the ratio to optax (target <= 1.5x), the state bytes ratio (target
<= 0.26x) and the compiled step's scratch (temporary buffers, from XLA's memory
analysis). When bitsandbytes and torch are importable, it also times
bitsandbytes' 8-bit Adam on the CPU on the same sizes (target: jaxquant faster).

  python benchmarks/optim.py [--sizes 16 64] [--repeats 5] [--json out.json]
                             [--casts-for-codecs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from jaxquant import formats

STEP_RATIO_TARGET = 1.5
MEMORY_RATIO_TARGET = 0.26


def make_params(million: int) -> dict:
  """float32 Dense-like leaves [1024, 1024] adding up to `million` * 2^20 values."""
  keys = jax.random.split(jax.random.key(0), million)
  return {f"layer_{i}": jax.random.normal(k, (1024, 1024), jnp.float32) * 0.02
          for i, k in enumerate(keys)}


def state_nbytes(state) -> int:
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, jq.QArray))
  return sum(int(x.nbytes) for x in leaves)


class Stepper:
  """A donated, jitted optimizer step over its own copy of the params and state."""

  def __init__(self, optimizer, params, grads):

    def step(params, state, grads):
      updates, state = optimizer.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    with jax.numpy_dtype_promotion("standard"):  # optax's own code needs it
      self._step = jax.jit(step, donate_argnums=(0, 1))
      self.params = jax.tree.map(jnp.copy, params)
      self.state = optimizer.init(self.params)
      self.nbytes = state_nbytes(self.state)
      compiled = self._step.lower(self.params, self.state, grads).compile()
      self.scratch_nbytes = compiled.memory_analysis().temp_size_in_bytes
      self.grads = grads
      self()  # compile and warm up

  def __call__(self) -> float:
    """Runs one step; returns its wall time in seconds."""
    start = time.perf_counter()
    with jax.numpy_dtype_promotion("standard"):
      self.params, self.state = self._step(self.params, self.state, self.grads)
    jax.block_until_ready((self.params, self.state))
    return time.perf_counter() - start


def paired_times(steppers: dict, repeats: int) -> dict:
  """Median step time of each stepper, and the median of its per-round ratio to the
  first one (rounds interleave the steppers, so load from elsewhere cancels)."""
  times = {name: [] for name in steppers}
  for _ in range(repeats):
    for name, stepper in steppers.items():
      times[name].append(stepper())
  base = np.asarray(times[next(iter(steppers))])
  return {name: (float(np.median(t)), float(np.median(np.asarray(t) / base)))
          for name, t in times.items()}


@contextlib.contextmanager
def casts_for_codecs():
  """Traces with the state formats' encode/decode replaced by plain casts.

  The step computes wrong values but keeps its structure (passes, fusions,
  buffers), so its time is the floor that a free nearest-code search would reach
  on this backend.
  """
  encode, decode = formats.encode, formats.decode
  formats.encode = lambda fmt, y: (y * 100).astype(jnp.int32).astype(fmt.code_dtype)
  formats.decode = lambda fmt, codes: codes.astype(jnp.float32)
  try:
    yield
  finally:
    formats.encode, formats.decode = encode, decode


def time_bitsandbytes(params: dict, repeats: int) -> float | str:
  """Median seconds of bitsandbytes' 8-bit Adam step on CPU, or why it can't run."""
  try:
    import bitsandbytes as bnb  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return f"not installed ({e.name})"
  tensors = [torch.nn.Parameter(torch.from_numpy(np.asarray(p)).clone())
             for p in params.values()]
  for t in tensors:
    t.grad = torch.randn_like(t) * 1e-3
  try:
    optimizer = bnb.optim.Adam8bit(tensors, lr=1e-3)
    optimizer.step()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      optimizer.step()
      times.append(time.perf_counter() - start)
  except Exception as e:  # pylint: disable=broad-except
    return f"failed on CPU: {type(e).__name__}: {e}"[:120]
  return float(np.median(times))


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64],
                      help="parameter counts in units of 2^20")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--json", help="write the results to this file")
  parser.add_argument("--casts-for-codecs", action="store_true",
                      help="also time adamw_8bit with encode/decode replaced by casts "
                           "(wrong values, same structure: the floor of the step)")
  args = parser.parse_args(argv)
  optimizers = {"optax.adamw": optax.adamw(1e-3),
                "jq.optim.adamw_8bit": jq.optim.adamw_8bit(1e-3),
                "jq.optim.adamw_4bit": jq.optim.adamw_4bit(1e-3)}
  results = []
  print(f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}")
  print(f"{'params':>8}  {'optimizer':<22} {'step ms':>9} {'vs optax':>9} "
        f"{'state MB':>9} {'vs optax':>9} {'scratch MB':>10}")
  for million in args.sizes:
    params = make_params(million)
    grads = jax.tree.map(lambda p: p * 0.01, params)
    steppers = {name: Stepper(opt, params, grads) for name, opt in optimizers.items()}
    if args.casts_for_codecs:
      with casts_for_codecs():
        steppers["adamw_8bit, casts"] = Stepper(jq.optim.adamw_8bit(1e-3), params, grads)
    timings = paired_times(steppers, args.repeats)
    base_bytes = next(iter(steppers.values())).nbytes
    for name, stepper in steppers.items():
      seconds, ratio = timings[name]
      row = dict(params_m=million, optimizer=name, step_ms=seconds * 1e3,
                 step_ratio=ratio, state_mb=stepper.nbytes / 2**20,
                 state_ratio=stepper.nbytes / base_bytes,
                 scratch_mb=stepper.scratch_nbytes / 2**20)
      results.append(row)
      verdict = ""
      if name == "jq.optim.adamw_8bit":
        time_ok = row["step_ratio"] <= STEP_RATIO_TARGET
        memory_ok = row["state_ratio"] <= MEMORY_RATIO_TARGET
        verdict = (f"  time {'ok' if time_ok else 'MISS'} (<= {STEP_RATIO_TARGET}x), "
                   f"memory {'ok' if memory_ok else 'MISS'} (<= {MEMORY_RATIO_TARGET}x)")
      print(f"{million:>7}M  {name:<22} {row['step_ms']:9.1f} {row['step_ratio']:8.2f}x "
            f"{row['state_mb']:9.1f} {row['state_ratio']:8.3f}x {row['scratch_mb']:10.1f}"
            f"{verdict}")
    del steppers
    bnb_time = time_bitsandbytes(params, args.repeats)
    if isinstance(bnb_time, float):
      ours = next(r for r in results if r["params_m"] == million
                  and r["optimizer"] == "jq.optim.adamw_8bit")
      print(f"{million:>7}M  {'bitsandbytes Adam8bit':<22} {bnb_time * 1e3:9.1f}   "
            f"jaxquant is {bnb_time * 1e3 / ours['step_ms']:.2f}x faster")
      results.append(dict(params_m=million, optimizer="bitsandbytes.Adam8bit",
                          step_ms=bnb_time * 1e3))
    else:
      print(f"{million:>7}M  bitsandbytes Adam8bit: {bnb_time}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
