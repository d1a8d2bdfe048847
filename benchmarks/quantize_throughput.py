"""Throughput of quantize / dequantize over a weight pytree, against a same-process copy.

Builds a float32 pytree shaped like a small transformer's Dense kernels (default
>= 256 MiB), then times, jitted, warmed up (compile excluded), `block_until_ready`:

* ``copy``: `jnp.copy` of every leaf (XLA writes a new buffer of the same size):
  the memory-bound limit every other row is compared with, timed again right
  before every timed call;
* ``stream``: ``-x`` of every leaf, the fastest that an XLA loop fusion reading
  and writing every byte once runs (on CPU slower than the copy, a memcpy);
* ``roundtrip``: ``dequantize(quantize(x, spec))`` over the tree, one jit;
* ``quantize``: ``quantize(x, spec)`` only (codes and scales come back);
* ``dequantize``: ``dequantize(q)`` only, from a quantized tree;
* ``qwix rt``: if `qwix` is importable, Qwix's ``dequantize(quantize(...))`` of the
  same arrays at the same granularity (Qwix is never a dependency of jaxquant).

Every GB/s figure is *float32 input bytes / best time* (for ``dequantize``: the
bytes of the float tree it rebuilds), so the copy's figure counts the bytes read
only; its memory traffic is twice that. ``x copy`` is ``copy time / time``, the
median over the timed calls of that ratio for each call and the copy made just
before it (so that load from other processes, which on a 2-core VM halves every
throughput, cancels). The JSON also has ``ratio_of_best``, the run's best copy
time / best time, which is only meaningful on an idle machine.

Outputs are written into donated buffers from the previous call (``--no-donate``
allocates fresh ones): otherwise the kernel's page faults on new output memory
(up to ~2x the copy's time on a small VM) come and go with the allocator's state
and swamp the differences being measured.

Usage:
  python benchmarks/quantize_throughput.py [--mb 256] [--repeats 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

import jaxquant as jq

# name -> (jaxquant spec, qwix quantize kwargs, round-trip target: min x copy, or None)
SPECS = {
    "int8 per-channel": (
        jq.QuantSpec("int8", channel_axes=(1,)),
        dict(qtype=jnp.int8, channelwise_axes=(1,)), 0.5),
    "int4 group-128": (
        jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 128}),
        dict(qtype=jnp.int4, channelwise_axes=(1,), tiled_axes={0: 128}), None),
    "fp8_e4m3 per-channel": (
        jq.QuantSpec("fp8_e4m3", channel_axes=(1,)),
        dict(qtype=jnp.float8_e4m3fn, channelwise_axes=(1,)), 0.5),
    "nf4 block-64": (
        jq.QuantSpec("nf4", channel_axes=(1,), block_sizes={0: 64}),
        dict(qtype="nf4", channelwise_axes=(1,), tiled_axes={0: 64}), 0.25),
}
# Qwix rows timed by default (its nf4, a vmapped argmin, only with --qwix-nf4).
QWIX_DEFAULT = ("int8 per-channel", "int4 group-128", "fp8_e4m3 per-channel")


# ----------------------------------------------------------------------------
# The weights.


def layer_shapes(d_model: int) -> dict[str, tuple[int, int]]:
  """Dense kernels ``[in, out]`` of one transformer block (MLP ratio 4)."""
  d, f = d_model, 4 * d_model
  return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
          "mlp_up": (d, f), "mlp_down": (f, d)}


def layer_bytes(d_model: int) -> int:
  return sum(math.prod(s) for s in layer_shapes(d_model).values()) * 4


def pick_d_model(total_bytes: int, d_model: int) -> int:
  """Halves `d_model` (not below 128) until one block fits in `total_bytes`."""
  while d_model > 128 and layer_bytes(d_model) > total_bytes:
    d_model //= 2
  return d_model


def build_params(total_mb: float, d_model: int, seed: int = 0) -> dict:
  """float32 ``{"layer_i": {name: [in, out]}}`` of at least `total_mb` MiB.

  Values are N(0, 0.02^2), like freshly initialized Dense kernels.
  """
  total_bytes = int(total_mb * 2**20)
  d_model = pick_d_model(total_bytes, d_model)
  n_layers = max(1, -(-total_bytes // layer_bytes(d_model)))
  key = jax.random.key(seed)
  params = {}
  for i in range(n_layers):
    layer = {}
    for name, shape in layer_shapes(d_model).items():
      key, sub = jax.random.split(key)
      layer[name] = _normal(sub, shape)
    params[f"layer_{i}"] = layer
  return jax.block_until_ready(params)


@functools.partial(jax.jit, static_argnums=1)
def _normal(key, shape):
  return 0.02 * jax.random.normal(key, shape, jnp.float32)


def tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# The functions timed: tree -> tree, jitted by `Timer`.


def copy_tree(tree):
  """A copy of every leaf into a new buffer (an XLA copy: a memcpy on CPU)."""
  return jax.tree.map(jnp.copy, tree)


def stream_tree(tree):
  """``-x`` of every leaf: one XLA loop fusion reading and writing each byte."""
  return jax.tree.map(jnp.negative, tree)


def roundtrip(spec: jq.QuantSpec) -> Callable:
  return lambda tree: jax.tree.map(lambda x: jq.dequantize(jq.quantize(x, spec)), tree)


def quantize(spec: jq.QuantSpec) -> Callable:
  return lambda tree: jax.tree.map(lambda x: jq.quantize(x, spec), tree)


def dequantize(qtree):
  is_q = lambda x: isinstance(x, jq.QArray)
  return jax.tree.map(jq.dequantize, qtree, is_leaf=is_q)


def qwix_roundtrip(qwix, kwargs: dict) -> Callable:
  kwargs = dict(kwargs)
  qtype = kwargs.pop("qtype")
  return lambda tree: jax.tree.map(
      lambda x: qwix.dequantize(qwix.quantize(x, qtype, **kwargs)), tree)


def check_copy(tree, out) -> None:
  """Raises unless the copy wrote new buffers of the same shapes and dtypes."""
  for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
    if x.shape != y.shape or x.dtype != y.dtype:
      raise AssertionError(f"copy changed {x.shape}/{x.dtype} to {y.shape}/{y.dtype}")
    if x.unsafe_buffer_pointer() == y.unsafe_buffer_pointer():
      raise AssertionError("the jitted copy aliased its input; it measures nothing")


# ----------------------------------------------------------------------------
# Timing.


class Runner:
  """One tree -> tree function, jitted, writing into the buffers of its last output.

  With `donate`, each call donates the previous output as the buffers of the next
  one, so no call allocates (or page-faults) output memory.
  """

  def __init__(self, fn: Callable, arg, donate: bool = True):
    self.arg, self.donate = arg, donate
    if donate:
      self.jitted = jax.jit(lambda donor, x: fn(x), donate_argnums=0, keep_unused=True)
      self.out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, arg))
    else:
      self.jitted, self.out = jax.jit(fn), None

  def __call__(self) -> float:
    """Runs once; wall time in ms until the result is ready."""
    start = time.perf_counter()
    if self.donate:
      self.out = jax.block_until_ready(self.jitted(self.out, self.arg))
    else:
      jax.block_until_ready(self.jitted(self.arg))
    return (time.perf_counter() - start) * 1e3


class Timer:
  """Times functions, each timed call right after one call of the baseline (copy).

  The machine may be shared, and on a small VM another process halves the
  throughput of everything: so every call is paired with a copy call made just
  before it, and ratios are taken within pairs.
  """

  def __init__(self, baseline: Runner, repeats: int, donate: bool):
    self.baseline, self.repeats, self.donate = baseline, repeats, donate
    self.baseline_ms: list[float] = []

  def time(self, fn: Callable, arg) -> dict[str, Any]:
    """Wall times (ms) of `repeats` calls after a warm-up call, and of their copies."""
    runner = Runner(fn, arg, self.donate)
    first_ms = runner()
    times, copies = [], []
    for _ in range(self.repeats):
      copies.append(self.baseline())
      times.append(runner())
    self.baseline_ms += copies
    return dict(_summary(times), first_call_ms=first_ms, copy_times_ms=copies)

  def baseline_timing(self) -> dict[str, Any]:
    return dict(_summary(self.baseline_ms), copy_times_ms=self.baseline_ms)


def _summary(times: list[float]) -> dict[str, Any]:
  return dict(best_ms=min(times), median_ms=statistics.median(times), times_ms=times)


def make_row(op: str, spec: str, timing: dict, nbytes: int, copy_best_ms: float,
             target: Optional[float] = None) -> dict[str, Any]:
  """One result row.

  gb_per_s: nbytes / best time. ratio_to_copy: median over the calls of (time of
  the copy made just before / time of the call). ratio_of_best: best copy time of
  the whole run / best time.
  """
  best = timing["best_ms"]
  ratio = statistics.median(c / t for c, t in zip(timing["copy_times_ms"], timing["times_ms"]))
  row = dict(op=op, spec=spec, **timing, gb_per_s=nbytes / (best * 1e-3) / 1e9,
             ratio_to_copy=ratio, ratio_of_best=copy_best_ms / best, target=target)
  row["passed"] = None if target is None else ratio >= target
  return row


# ----------------------------------------------------------------------------
# Report.


def format_table(rows: list[dict]) -> str:
  header = (f"{'op':<11} {'spec':<21} {'best ms':>9} {'median ms':>10} "
            f"{'GB/s':>7} {'x copy':>7} {'target':>7}  result")
  lines = [header, "-" * len(header)]
  for r in rows:
    target = "" if r["target"] is None else f">={r['target']:.2f}"
    result = "" if r["passed"] is None else ("PASS" if r["passed"] else "FAIL")
    lines.append(
        f"{r['op']:<11} {r['spec']:<21} {r['best_ms']:9.1f} {r['median_ms']:10.1f} "
        f"{r['gb_per_s']:7.2f} {r['ratio_to_copy']:7.3f} {target:>7}  {result}")
  return "\n".join(lines)


def qwix_ratios(rows: list[dict]) -> dict[str, float]:
  """spec -> jaxquant round-trip speed / Qwix's (> 1: jaxquant faster).

  Taken as the ratio of their ``x copy`` figures, so that both are measured
  against copies made at the same moments (load cancels).
  """
  ours = {r["spec"]: r["ratio_to_copy"] for r in rows if r["op"] == "roundtrip"}
  return {r["spec"]: ours[r["spec"]] / r["ratio_to_copy"]
          for r in rows if r["op"] == "qwix rt" and r["spec"] in ours}


def format_qwix_ratios(ratios: dict[str, float]) -> str:
  lines = ["jaxquant/qwix round-trip speed (jaxquant x copy / qwix x copy, i.e. qwix "
           "time / jaxquant time; >1 means jaxquant is faster):"]
  lines += [f"  {name:<21} {ratio:.3f}" for name, ratio in ratios.items()]
  return "\n".join(lines)


def import_qwix():
  """(qwix module or None, its version or why it is missing)."""
  try:
    import qwix  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return None, f"not importable ({e}); `pip install qwix` to compare"
  return qwix, getattr(qwix, "__version__", "?")


# ----------------------------------------------------------------------------
# Main.


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mb", type=float, default=256.0,
                 help="minimum size of the float32 pytree in MiB (default 256)")
  p.add_argument("--d-model", type=int, default=1024,
                 help="model width; kernels are [d, d] x4, [d, 4d], [4d, d] per block")
  p.add_argument("--repeats", type=int, default=10,
                 help="timed calls per function after one warm-up call (default 10)")
  p.add_argument("--specs", nargs="+", default=list(SPECS), choices=list(SPECS),
                 metavar="SPEC", help=f"specs to run (default all: {list(SPECS)})")
  p.add_argument("--no-donate", action="store_true",
                 help="allocate every output afresh instead of reusing donated buffers")
  p.add_argument("--no-qwix", action="store_true", help="skip the Qwix comparison")
  p.add_argument("--qwix-nf4", action="store_true",
                 help="also time Qwix's nf4 (block 64) round trip")
  p.add_argument("--json", metavar="PATH", help="write all results as JSON to PATH")
  return p.parse_args(argv)


def run_specs(timer: Timer, params, names) -> list[tuple]:
  """(op, spec, timing, target) for round trip, quantize and dequantize of each spec."""
  roundtrips, quants, dequants = [], [], []
  for name in names:
    spec, _, target = SPECS[name]
    roundtrips.append(("roundtrip", name, timer.time(roundtrip(spec), params), target))
    quants.append(("quantize", name, timer.time(quantize(spec), params), None))
    qtree = jax.block_until_ready(jax.jit(quantize(spec))(params))
    dequants.append(("dequantize", name, timer.time(dequantize, qtree), None))
    del qtree
  return roundtrips + quants + dequants


def run_qwix(timer: Timer, qwix, params, names) -> list[tuple]:
  """(op, spec, timing, None) for Qwix's round trip of each spec."""
  return [("qwix rt", name, timer.time(qwix_roundtrip(qwix, SPECS[name][1]), params), None)
          for name in names]


def main(argv=None) -> dict:
  args = parse_args(argv)
  params = build_params(args.mb, args.d_model)
  nbytes = tree_bytes(params)
  shapes = sorted({x.shape for x in jax.tree.leaves(params)})
  donate = not args.no_donate
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.machine()}), "
        f"{len(jax.tree.leaves(params))} float32 leaves of shapes {shapes}, "
        f"{nbytes / 2**20:.0f} MiB; best of {args.repeats}, each call next to a copy; "
        f"outputs {'in donated buffers' if donate else 'freshly allocated'}")
  check_copy(params, jax.jit(copy_tree)(params))
  timer = Timer(Runner(copy_tree, params, donate), args.repeats, donate)
  load_before = os.getloadavg()[0]
  results = [("stream", "-x (loop fusion)", timer.time(stream_tree, params), None)]
  results += run_specs(timer, params, args.specs)

  qwix, qwix_info = (None, "skipped (--no-qwix)") if args.no_qwix else import_qwix()
  if qwix is not None:
    names = [n for n in args.specs
             if n in QWIX_DEFAULT or (args.qwix_nf4 and n.startswith("nf4"))]
    results += run_qwix(timer, qwix, params, names)

  copy_timing = timer.baseline_timing()
  copy_ms = copy_timing["best_ms"]
  rows = [make_row("copy", "jnp.copy (new buffer)", copy_timing, nbytes, copy_ms)]
  rows += [make_row(op, name, t, nbytes, copy_ms, target) for op, name, t, target in results]

  load, cores = (load_before, os.getloadavg()[0]), os.cpu_count() or 1
  print(f"load average {load[0]:.1f} -> {load[1]:.1f} on {cores} cores"
        + (" (busy machine: expect noise; rerun when idle)" if max(load) > cores else ""))
  print("GB/s = float32 input bytes / best time (copy: bytes read; its traffic is 2x).\n"
        "x copy = copy time / time: the median over the timed calls, each paired with "
        "a copy made just before it.")
  print(format_table(rows))
  ratios = qwix_ratios(rows)
  print(f"qwix: {qwix_info}")
  if ratios:
    print(format_qwix_ratios(ratios))
  failed = [f"{r['spec']} ({r['ratio_to_copy']:.3f} < {r['target']})"
            for r in rows if r["passed"] is False]
  print("targets (x copy): " + ("all pass" if not failed else "FAIL: " + ", ".join(failed)))

  result = dict(jax_version=jax.__version__, backend=jax.devices()[0].platform,
                total_bytes=nbytes, leaf_shapes=[list(s) for s in shapes],
                repeats=args.repeats, donated_outputs=donate, load_average=load,
                cpu_count=cores, gb_definition="float32 input bytes / best time",
                qwix=qwix_info, qwix_speed_ratios=ratios, rows=rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
