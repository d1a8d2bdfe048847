"""`jq.matmul` on quantized weights against the bf16 XLA dot, decode and prefill shapes.

For each shape ``x[M, K] @ w[K, N]`` (bfloat16 activations, output bfloat16)
times, jitted, warm (compile excluded), `block_until_ready`, in one process:

* ``bf16``: ``x_bf16 @ w_bf16``, the XLA dot every other row is compared with;
* ``w8a8``: int8 weights per channel, ``lhs_quant="int8"`` (per-token dynamic
  int8 activations);
* ``fp8``: fp8_e4m3 weights per channel, ``lhs_quant="fp8_e4m3"``;
* ``w8a16``: weight-only int8 per channel;
* ``w4a16``: weight-only int4 in groups of 128 along K;
* ``nf4``: weight-only nf4 in groups of 64; ``fp4``: fp4_e2m1 in groups of 32.

Each timed function is ``jax.jit(lambda x, w: jq.matmul(x, w, ...))`` with ``w`` a
`jq.QArray` quantized once beforehand, by default ``impl="auto"``: the Pallas kernels on
TPU and CUDA GPUs, the XLA reference paths elsewhere (CPU). Every call takes the
next of several copies of its weights (together >= ``--rotate-mb``), so that a
small weight is not served from cache. Rounds interleave the variants (the order
rotating); each round times ``inner`` back-to-back calls per variant (enough for
``--min-time``); ``ms`` is the median per-call time, ``speedup`` the median over
rounds of bf16 time / path time in that round, so load from other processes cancels.

``GB/s`` counts the bytes of weight codes (packed) + scales + bf16 activations +
bf16 output once; ``TFLOP/s`` is 2*M*K*N per call. ``% peak`` is against the
device's HBM bandwidth and its dense bf16 (int8 for w8a8, fp8 for fp8) peak when
`jax.devices()[0].device_kind` is in `PEAKS`, else "n/a". On H100/H200 the
issue's targets are checked: w4a16 decode >= 3x bf16 and >= 70% of HBM
bandwidth, w8a8 and fp8 prefill >= 1.5x bf16. Small decode calls on a GPU can be
bound by the host's per-call dispatch (a few microseconds), which is counted.

Shapes: decode M = 1, 8, 16 with K = N = 4096 and 8192; prefill M = 2048,
K = N = 4096. On a 2-core CPU the full run takes about two minutes (the XLA
reference paths dequantize the whole weight every call); ``--quick`` (K = N = 1024,
M = 1, 16 and 256) about ten seconds.

  python benchmarks/matmul.py [--quick] [--shapes decode|prefill|all]
      [--paths w8a8 fp8 w8a16 w4a16 nf4 fp4] [--repeats 5] [--impl auto|xla|pallas]
      [--kn K] [--min-time 0.02] [--rotate-mb 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq

# name -> (weight spec, lhs_quant, peak FLOP/s key).
PATHS = {
    "w8a8": (jq.QuantSpec("int8", channel_axes=(1,)), "int8", "int8"),
    "fp8": (jq.QuantSpec("fp8_e4m3", channel_axes=(1,)), "fp8_e4m3", "fp8"),
    "w8a16": (jq.QuantSpec("int8", channel_axes=(1,)), None, "bf16"),
    "w4a16": (jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 128}), None, "bf16"),
    "nf4": (jq.QuantSpec("nf4", channel_axes=(1,), block_sizes={0: 64}), None, "bf16"),
    "fp4": (jq.QuantSpec("fp4_e2m1", channel_axes=(1,), block_sizes={0: 32}), None, "bf16"),
}

# device_kind -> HBM bytes/s and dense FLOP/s (no sparsity). TPU v5e/v6e have no
# fp8 MXU path; their fp8 rows are compared with the bf16 peak.
PEAKS = {
    "NVIDIA H100 80GB HBM3": dict(bw=3.35e12, bf16=989e12, int8=1979e12, fp8=1979e12),
    "NVIDIA H200": dict(bw=4.8e12, bf16=989e12, int8=1979e12, fp8=1979e12),
    "TPU v5 lite": dict(bw=819e9, bf16=197e12, int8=394e12, fp8=197e12),
    "TPU v6 lite": dict(bw=1.64e12, bf16=918e12, int8=1836e12, fp8=918e12),
}
TARGET_GPUS = ("NVIDIA H100 80GB HBM3", "NVIDIA H200")
W4_DECODE_SPEEDUP, W4_DECODE_BW, PREFILL_SPEEDUP = 3.0, 0.70, 1.5

FULL_SHAPES = {"decode": [(m, kn) for kn in (4096, 8192) for m in (1, 8, 16)],
               "prefill": [(2048, 4096)]}
QUICK_SHAPES = {"decode": [(1, 1024), (16, 1024)], "prefill": [(256, 1024)]}


class Variant:
  """A jitted ``x @ w`` over rotating copies of its weights, with its traffic and work."""

  def __init__(self, fn, x, w, copies: int, flops_key: str):
    self.fn, self.x, self.flops_key = fn, x, flops_key
    self.ws = [w] + [jax.tree.map(jnp.copy, w) for _ in range(copies - 1)]
    w_bytes = w.nbytes if isinstance(w, jq.QArray) else w.size * w.dtype.itemsize
    m, k = x.shape
    n = w.shape[1]
    self.bytes = w_bytes + (m * k + m * n) * jnp.dtype(jnp.bfloat16).itemsize
    self.flops = 2 * m * k * n
    self.calls, self.inner = 0, 1

  def call(self):
    out = self.fn(self.x, self.ws[self.calls % len(self.ws)])
    self.calls += 1
    return out

  def warm_up(self, min_time: float):
    """Compiles, then picks `inner` calls per measurement to last `min_time`."""
    out = jax.block_until_ready(self.call())
    self.inner = 1
    seconds = self.time()
    self.inner = max(1, min(1000, math.ceil(min_time / max(seconds, 1e-7))))
    return out

  def time(self) -> float:
    """Seconds per call over `inner` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(self.inner):
      out = self.call()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / self.inner


def make_variants(m: int, kn: int, paths, impl: str, rotate_bytes: int, min_time: float):
  """name -> warm Variant (bf16 first), and each path's error relative to the f32 dot."""
  x = jax.random.normal(jax.random.key(0), (m, kn), jnp.float32).astype(jnp.bfloat16)
  w = (jax.random.normal(jax.random.key(1), (kn, kn), jnp.float32) * 0.02).astype(jnp.bfloat16)
  ref = np.asarray(jnp.dot(x, w, preferred_element_type=jnp.float32))

  def copies(nbytes):
    return max(1, min(64, math.ceil(rotate_bytes / nbytes)))

  variants = {"bf16": Variant(jax.jit(lambda x, w: x @ w), x, w,
                              copies(w.size * w.dtype.itemsize), "bf16")}
  for name in paths:
    spec, lhs_quant, flops_key = PATHS[name]
    q = jq.quantize(w, spec)
    fn = jax.jit(lambda x, w, lhs_quant=lhs_quant: jq.matmul(
        x, w, lhs_quant=lhs_quant, impl=impl))
    variants[name] = Variant(fn, x, q, copies(q.nbytes), flops_key)
  errors = {}
  for name, variant in variants.items():
    out = np.asarray(variant.warm_up(min_time), np.float32)
    errors[name] = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
  return variants, errors


def paired_times(variants: dict, repeats: int) -> dict:
  """name -> (median seconds per call, median over rounds of bf16 time / its time)."""
  names = list(variants)
  times = {name: [] for name in names}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name].append(variants[name].time())
  base = np.asarray(times["bf16"])
  return {name: (float(np.median(t)), float(np.median(base / np.asarray(t))))
          for name, t in times.items()}


def _fraction(value: float, peak) -> str:
  return f"{100 * value / peak:5.1f}%" if peak else "  n/a"


def _verdicts(row: dict, on_target_gpu: bool) -> str:
  """ok/MISS against the issue's targets, for the rows they apply to on H100/H200."""
  if not on_target_gpu:
    return ""
  checks = []
  if row["path"] == "w4a16" and row["kind"] == "decode":
    checks = [(row["speedup"] >= W4_DECODE_SPEEDUP, f">={W4_DECODE_SPEEDUP:g}x"),
              (row["bw_fraction"] >= W4_DECODE_BW, f">={W4_DECODE_BW:.0%} BW")]
  elif row["path"] in ("w8a8", "fp8") and row["kind"] == "prefill":
    checks = [(row["speedup"] >= PREFILL_SPEEDUP, f">={PREFILL_SPEEDUP:g}x")]
  if not checks:
    return ""
  return "  " + ", ".join(f"{'ok' if ok else 'MISS'} ({what})" for ok, what in checks)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="K = N = 1024, M = 1, 16 (decode) and 256 (prefill)")
  parser.add_argument("--shapes", choices=["decode", "prefill", "all"], default="all")
  parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--impl", choices=["auto", "xla", "pallas"], default="auto")
  parser.add_argument("--min-time", type=float, default=0.02,
                      help="seconds each variant's measurement in a round lasts at least")
  parser.add_argument("--rotate-mb", type=float, default=256,
                      help="weight copies that calls cycle through, in MiB (max 64 copies)")
  parser.add_argument("--kn", type=int, help="K = N for every shape instead of the defaults")
  parser.add_argument("--json", help="write the results to this file")
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  peaks = PEAKS.get(device.device_kind, {})
  on_target_gpu = device.device_kind in TARGET_GPUS
  table = QUICK_SHAPES if args.quick else FULL_SHAPES
  kinds = ["decode", "prefill"] if args.shapes == "all" else [args.shapes]
  print(f"{device.platform} {device.device_kind} x{jax.device_count()}, "
        f"jax {jax.__version__}, impl={args.impl}, repeats={args.repeats}")
  print(f"{'shape (M x K x N)':<22} {'path':<6} {'ms':>9} {'bf16 ms':>9} {'speedup':>8} "
        f"{'GB/s':>8} {'%BW':>6} {'TFLOP/s':>8} {'%peak':>6}")
  results = []
  for kind in kinds:
    for m, kn in table[kind]:
      kn = args.kn or kn
      variants, errors = make_variants(m, kn, args.paths, args.impl,
                                       int(args.rotate_mb * 2**20), args.min_time)
      timings = paired_times(variants, args.repeats)
      shape = f"{kind} {m}x{kn}x{kn}"
      for name, variant in variants.items():
        seconds, speedup = timings[name]
        bandwidth, flop_rate = variant.bytes / seconds, variant.flops / seconds
        row = dict(kind=kind, m=m, k=kn, n=kn, path=name, ms=seconds * 1e3,
                   bf16_ms=timings["bf16"][0] * 1e3, speedup=speedup,
                   gb_per_s=bandwidth / 1e9, tflop_per_s=flop_rate / 1e12,
                   bw_fraction=bandwidth / peaks["bw"] if peaks else None,
                   flop_fraction=(flop_rate / peaks[variant.flops_key]
                                  if peaks else None),
                   bytes=variant.bytes, rel_err=errors[name], inner=variant.inner,
                   weight_copies=len(variant.ws))
        results.append(row)
        print(f"{shape:<22} {name:<6} {row['ms']:9.3f} {row['bf16_ms']:9.3f} "
              f"{speedup:7.2f}x {row['gb_per_s']:8.1f} {_fraction(bandwidth, peaks.get('bw'))} "
              f"{row['tflop_per_s']:8.3f} "
              f"{_fraction(flop_rate, peaks.get(variant.flops_key))}"
              f"{_verdicts(row, on_target_gpu)}")
      del variants
  if on_target_gpu:
    print(f"targets: w4a16 decode >= {W4_DECODE_SPEEDUP:g}x bf16 and >= "
          f"{W4_DECODE_BW:.0%} of HBM bandwidth; w8a8, fp8 prefill >= "
          f"{PREFILL_SPEEDUP:g}x bf16")
  else:
    measured = "Pallas TPU kernels" if device.platform == "tpu" else "XLA reference paths"
    print(f"measured: the {measured} on {device.platform}, no targets checked; they are "
          f"for H100/H200 GPUs:\n  w4a16 decode >= {W4_DECODE_SPEEDUP:g}x bf16 and >= "
          f"{W4_DECODE_BW:.0%} of HBM bandwidth, w8a8/fp8 prefill >= {PREFILL_SPEEDUP:g}x bf16")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=device.device_kind, platform=device.platform,
                     jax=jax.__version__, impl=args.impl, peaks=peaks, rows=results),
                f, indent=1)
  return results


if __name__ == "__main__":
  main()
