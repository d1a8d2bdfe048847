"""Training-step time of jaxquant's tokenizer quantizers against vector-quantize-pytorch.

One row per quantizer. Each side runs one training step on the CPU: forward, the
loss ``mean(zq^2) + auxiliary losses``, backward to the input z and, for VQ, the
EMA codebook update. Ours is one jitted pure function (state donated); the peer
is vector-quantize-pytorch's module in training mode with its defaults, torch
using as many threads as JAX has cores (``--torch-threads`` to change it: on a
loaded machine torch's threads can slow its small ops by 10-100x). Rounds
alternate the two sides; ``ratio`` is the median over rounds of peer time / our
time (> 1: jaxquant is faster), ``best`` the ratio of the sides' best rounds.

The same work on both sides (vector-quantize-pytorch 1.32 defaults):

* ``fsq``: FSQ levels (8, 5, 5, 5), ``jq.vq.fsq(bound="atanh")`` against ``FSQ``.
  vqp bounds with ``half_l = (L - 1)(1 + eps)/2`` where the paper (and jaxquant)
  use ``(1 - eps)``: codes differ only for inputs within that margin of a
  rounding boundary.
* ``vq``: 1024 codes of dim 256, l2, rotation-trick gradient, commitment weight
  1, EMA update with decay 0.8 and eps 1e-5: ``jq.vq.vector_quantize`` +
  ``jq.vq.ema_update`` against ``VectorQuantize(dim, codebook_size)``.
* ``rvq``: 8 such stages, each with its EMA update: ``jq.vq.residual_vq`` +
  ``ema_update`` per stage against ``ResidualVQ``. Forward values, indices, losses
  and EMA updates agree; the gradient conventions differ: vqp detaches each
  stage's code from the next residual, jaxquant subtracts the rotated code (as
  EnCodec does with straight-through). The work is the same.
* ``lfq``: 2^16 codes (16 bits), entropy loss weight 0.1, gamma 1, temperature
  0.01, exact over all 2^16 codes on both sides (``group_size=16``): ``jq.vq.lfq``
  + ``lfq_entropy_loss`` against ``LFQ(codebook_size=2**16)``, on 32 x 16 tokens,
  where vqp's N x 2^16 tables fit. vqp numbers bits from the most significant
  (its index is ours bit-reversed) and clamps probabilities at 1e-5 inside its
  entropy logs.
* ``lfq-full``: the same exact loss at 32 x 1024 tokens. jaxquant never builds
  the N x 2^16 table (see `jaxquant.vq.binary`); vqp needs about
  ``PEER_LFQ_TABLES`` of them (its measured RSS growth), 56 GiB here, so it runs
  only when that fits ``--peer-max-gib``.

For LFQ rows the compiled step's memory (``memory_analysis()``: arguments +
outputs + temporaries) is printed beside the N x 2^16 float32 table. Target:
ratio >= 2 on every row; LFQ with 2^16 codes at batch 32 x 1024 in bounded memory.

  python benchmarks/vq.py [--small] [--rows fsq vq rvq lfq lfq-full] [--repeats 5]
      [--min-time 0.2] [--peer-max-gib 4] [--torch-threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq

RATIO_TARGET = 2.0
PEER_LFQ_TABLES = 7  # RSS growth of one vqp LFQ step, in N x 2^16 float32 tables
ROWS = ("fsq", "vq", "rvq", "lfq", "lfq-full")


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark row: the quantizer and its input z: float32[batch, length, dim]."""

  name: str
  batch: int
  length: int
  dim: int
  levels: tuple[int, ...] = ()  # fsq
  num_codes: int = 0  # vq, rvq
  num_stages: int = 1  # rvq
  group_size: Optional[int] = None  # lfq: bits per entropy group (all: exact)
  decay: float = 0.8  # vq, rvq: vqp's default EMA decay
  eps: float = 1e-5
  commitment_weight: float = 1.0  # vq, rvq
  entropy_weight: float = 0.1  # lfq
  temperature: float = 0.01  # lfq: vqp's inv_temperature = 100

  @property
  def tokens(self) -> int:
    return self.batch * self.length

  @property
  def shape(self) -> str:
    what = {"fsq": f"levels {','.join(map(str, self.levels))}",
            "vq": f"{self.num_codes} codes x {self.dim}",
            "rvq": f"{self.num_stages} x {self.num_codes} codes x {self.dim}",
            "lfq": f"2^{self.dim} codes, exact entropy",
            "lfq-full": f"2^{self.dim} codes, exact entropy"}[self.name]
    return f"{self.batch}x{self.length} tokens, {what}"

  @property
  def table_bytes(self) -> int:
    """Bytes of one float32 [tokens, 2^dim] table (LFQ rows)."""
    return self.tokens * 2**self.dim * 4


def make_cases(small: bool = False) -> dict[str, Case]:
  """name -> Case: the issue's shapes, or tiny ones (``small``) for tests."""
  if small:
    return {"fsq": Case("fsq", 2, 32, 4, levels=(8, 5, 5, 5)),
            "vq": Case("vq", 2, 32, 16, num_codes=64),
            "rvq": Case("rvq", 2, 32, 16, num_codes=64, num_stages=3),
            "lfq": Case("lfq", 2, 16, 10, group_size=10),
            "lfq-full": Case("lfq-full", 2, 64, 10, group_size=10)}
  return {"fsq": Case("fsq", 32, 1024, 4, levels=(8, 5, 5, 5)),
          "vq": Case("vq", 32, 1024, 256, num_codes=1024),
          "rvq": Case("rvq", 32, 1024, 256, num_codes=1024, num_stages=8),
          "lfq": Case("lfq", 32, 16, 16, group_size=16),
          "lfq-full": Case("lfq-full", 32, 1024, 16, group_size=16)}


def make_inputs(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
  """float32 numpy inputs shared by both sides: ``z`` ~ N(0, 1) and, for VQ rows,
  ``codebooks`` [S, K, D] ~ N(0, 4^-s) for stage s (later residuals are smaller)."""
  rng = np.random.default_rng(seed)
  inputs = {"z": rng.standard_normal((case.batch, case.length, case.dim), np.float32)}
  if case.name in ("vq", "rvq"):
    scales = 0.5 ** np.arange(case.num_stages, dtype=np.float32)[:, None, None]
    inputs["codebooks"] = (rng.standard_normal(
        (case.num_stages, case.num_codes, case.dim), np.float32) * scales)
  return inputs


# ----------------------------------------------------------------------------
# jaxquant


def _quantize(case: Case, state: Any, z: jax.Array) -> tuple:
  """(zq, indices, auxiliary loss) of the row's quantizer, as vqp computes them."""
  if case.name == "fsq":
    return (*jq.vq.fsq(z, case.levels, bound="atanh"), 0.0)
  if case.name == "vq":
    zq, indices, losses = jq.vq.vector_quantize(
        z, state.codebook, gradient="rotation", commitment_weight=case.commitment_weight)
    return zq, indices, losses["commitment"]
  if case.name == "rvq":
    zq, indices, losses = jq.vq.residual_vq(
        z, state.codebook, gradient="rotation", commitment_weight=case.commitment_weight)
    return zq, indices, jnp.sum(losses["commitment"])
  zq, indices = jq.vq.lfq(z)
  entropy = jq.vq.lfq_entropy_loss(z, temperature=case.temperature,
                                   group_size=case.group_size)
  return zq, indices, case.entropy_weight * entropy


def ema_update_stages(state: jq.vq.EMACodebookState, z: jax.Array, indices: jax.Array,
                      *, decay: float, eps: float) -> jq.vq.EMACodebookState:
  """`ema_update` of each stage of `residual_vq` on the residual that stage quantized.

  Args:
    state: `EMACodebookState` with a leading stage axis S (codebook float32[S, K, D]).
    z: float[..., D], the input of `residual_vq`.
    indices: int32[..., S], its indices.
  """

  def stage(residual, state_and_indices):
    stage_state, stage_indices = state_and_indices
    new_state = jq.vq.ema_update(stage_state, residual, stage_indices, decay=decay, eps=eps)
    return residual - jnp.take(stage_state.codebook, stage_indices, axis=0), new_state

  _, state = jax.lax.scan(stage, z.astype(jnp.float32), (state, jnp.moveaxis(indices, -1, 0)))
  return state


def ours_step(case: Case) -> Callable:
  """``step(state, z) -> (state, loss, indices, dloss/dz)``, jitted, `state` donated.

  ``loss = mean(zq^2) + aux``. `state` is an `EMACodebookState` (vq), one with a
  leading stage axis (rvq), or None (fsq, lfq); VQ rows update it by EMA.
  """

  def step(state, z):

    def loss_fn(z):
      zq, indices, aux = _quantize(case, state, z)
      return jnp.mean(jnp.square(zq)) + aux, indices

    (loss, indices), grad = jax.value_and_grad(loss_fn, has_aux=True)(z)
    if case.name == "vq":
      state = jq.vq.ema_update(state, z, indices, decay=case.decay, eps=case.eps)
    elif case.name == "rvq":
      state = ema_update_stages(state, z, indices, decay=case.decay, eps=case.eps)
    return state, loss, indices, grad

  return jax.jit(step, donate_argnums=0)


def ours_state(case: Case, codebooks: Optional[Any]) -> Any:
  """The initial state of `ours_step` from ``codebooks: float32[S, K, D]`` (vq, rvq),
  its leaves in distinct buffers (for donation)."""
  if case.name == "vq":
    return jax.tree.map(jnp.copy, jq.vq.ema_init(codebooks[0]))
  if case.name == "rvq":
    return jax.tree.map(jnp.copy, jax.vmap(jq.vq.ema_init)(codebooks))
  return None


@functools.lru_cache(maxsize=None)
def compiled_step(case: Case) -> jax.stages.Compiled:
  """`ours_step(case)` compiled for the row's shapes (once per case)."""
  codebooks = jax.ShapeDtypeStruct((case.num_stages, case.num_codes, case.dim), jnp.float32)
  state = jax.eval_shape(functools.partial(ours_state, case), codebooks)
  z = jax.ShapeDtypeStruct((case.batch, case.length, case.dim), jnp.float32)
  return ours_step(case).lower(state, z).compile()


class Ours:
  """Our compiled step on its own state, timed like `Peer`."""

  def __init__(self, case: Case, inputs: dict):
    self.case = case
    self.step_fn = compiled_step(case)
    self.state = ours_state(case, inputs.get("codebooks"))
    self.z = jnp.asarray(inputs["z"])
    memory = self.step_fn.memory_analysis()
    self.peak_bytes = None if memory is None else int(
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        + memory.temp_size_in_bytes - memory.alias_size_in_bytes)

  def step(self) -> tuple:
    """Runs one step; returns (loss, indices, grad) as numpy arrays."""
    self.state, loss, indices, grad = self.step_fn(self.state, self.z)
    return np.asarray(loss), np.asarray(indices), np.asarray(grad)

  def __call__(self, inner: int = 1) -> float:
    """Seconds per step over `inner` back-to-back steps."""
    start = time.perf_counter()
    for _ in range(inner):
      self.state, *outputs = self.step_fn(self.state, self.z)
    jax.block_until_ready((self.state, outputs))
    return (time.perf_counter() - start) / inner


# ----------------------------------------------------------------------------
# vector-quantize-pytorch


def peer_version() -> Optional[str]:
  """vector-quantize-pytorch's version, or None when it (or torch) is missing."""
  try:
    import vector_quantize_pytorch  # pylint: disable=g-import-not-at-top,unused-import
    from importlib import metadata  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return metadata.version("vector-quantize-pytorch")


def peer_bytes(case: Case) -> int:
  """Estimated peak bytes of the peer's step (LFQ rows: its N x 2^16 tables)."""
  return PEER_LFQ_TABLES * case.table_bytes if case.name.startswith("lfq") else 0


class Peer:
  """vector-quantize-pytorch's module for `case` in training mode, on `inputs`."""

  def __init__(self, case: Case, inputs: dict):
    import torch  # pylint: disable=g-import-not-at-top
    import vector_quantize_pytorch as vqp  # pylint: disable=g-import-not-at-top
    if case.name == "fsq":
      self.module = vqp.FSQ(levels=list(case.levels))
    elif case.name == "vq":
      self.module = vqp.VectorQuantize(dim=case.dim, codebook_size=case.num_codes)
    elif case.name == "rvq":
      self.module = vqp.ResidualVQ(dim=case.dim, num_quantizers=case.num_stages,
                                   codebook_size=case.num_codes)
    else:
      self.module = vqp.LFQ(codebook_size=2**case.dim)
    self.module.train()
    if case.name in ("vq", "rvq"):  # our codebooks, and the EMA state ema_init makes
      layers = [self.module] if case.name == "vq" else list(self.module.layers)
      for layer, codebook in zip(layers, inputs["codebooks"]):
        codebook = torch.from_numpy(np.array(codebook))[None]
        layer._codebook.embed.copy_(codebook)  # pylint: disable=protected-access
        layer._codebook.embed_avg.copy_(codebook)  # pylint: disable=protected-access
        layer._codebook.cluster_size.fill_(1.0)  # pylint: disable=protected-access
    self.z = torch.from_numpy(np.array(inputs["z"])).requires_grad_()
    self.case = case

  def _run(self):
    self.z.grad = None
    out = self.module(self.z)
    zq, indices = out[0], out[1]
    aux = 0.0 if self.case.name == "fsq" else out[2].sum()
    loss = zq.pow(2).mean() + aux
    loss.backward()
    return loss, indices

  def step(self) -> tuple:
    """Runs one step; returns (loss, indices, grad) as numpy arrays."""
    loss, indices = self._run()
    return loss.detach().numpy(), indices.numpy(), self.z.grad.numpy().copy()

  def codebooks(self) -> np.ndarray:
    """float32[S, K, D]: the current codebooks (vq, rvq)."""
    layers = [self.module] if self.case.name == "vq" else list(self.module.layers)
    return np.stack([layer.codebook.detach().numpy() for layer in layers])

  def __call__(self, inner: int = 1) -> float:
    """Seconds per step over `inner` back-to-back steps."""
    start = time.perf_counter()
    for _ in range(inner):
      self._run()
    return (time.perf_counter() - start) / inner


# ----------------------------------------------------------------------------
# timing and report


def paired_times(ours: Ours, peer: Optional[Peer], repeats: int, min_time: float) -> dict:
  """Median milliseconds per step of each side, the median per-round ratio peer / ours
  and the ratio of the sides' best rounds (less sensitive to bursts of load).

  Each side runs twice untimed (warm-up; the second run sets how many steps one
  measurement takes to last `min_time` seconds), then `repeats` rounds alternate
  the sides, the order flipping each round, so load from other processes cancels.
  """
  sides = {"ours": ours} if peer is None else {"ours": ours, "peer": peer}
  inner = {}
  for name, side in sides.items():
    side()
    inner[name] = max(1, min(1000, math.ceil(min_time / max(side(), 1e-7))))
  times = {name: [] for name in sides}
  for r in range(repeats):
    for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
      times[name].append(sides[name](inner[name]))
  result = {f"{name}_ms": float(np.median(t)) * 1e3 for name, t in times.items()}
  if peer is not None:
    result["ratio"] = float(np.median(np.asarray(times["peer"]) / np.asarray(times["ours"])))
    result["ratio_best"] = float(np.min(times["peer"]) / np.min(times["ours"]))
  return result


def _gib(nbytes: float) -> str:
  return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def run_case(case: Case, version: Optional[str], repeats: int, min_time: float,
             peer_max_bytes: float) -> dict:
  """One row: timings, ratio, and for LFQ rows the memory figures."""
  inputs = make_inputs(case)
  ours = Ours(case, inputs)
  row = dict(name=case.name, shape=case.shape, tokens=case.tokens, ours_ms=None,
             peer_ms=None, ratio=None, ratio_best=None, target_met=None, note="")
  peer = None
  if version is None:
    row["note"] = "vector-quantize-pytorch not installed"
  elif peer_bytes(case) > peer_max_bytes:
    row["note"] = (f"vqp not run: needs ~{_gib(peer_bytes(case))} > --peer-max-gib")
  else:
    peer = Peer(case, inputs)
  row.update(paired_times(ours, peer, repeats, min_time))
  if row["ratio"] is not None:
    row["target_met"] = row["ratio"] >= RATIO_TARGET
  if case.name.startswith("lfq"):
    row.update(ours_peak_bytes=ours.peak_bytes, table_bytes=case.table_bytes,
               peer_bytes_estimate=peer_bytes(case))
  return row


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="tiny shapes (tests)")
  parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--min-time", type=float, default=0.2,
                      help="seconds one measurement lasts at least (steps repeat)")
  parser.add_argument("--peer-max-gib", type=float, default=4.0,
                      help="skip peer rows estimated to need more memory")
  parser.add_argument("--torch-threads", type=int,
                      help="torch threads (default: the cores JAX uses)")
  parser.add_argument("--json", help="write the results to this file")
  args = parser.parse_args(argv)
  threads = len(os.sched_getaffinity(0))
  version, torch_threads = peer_version(), None
  if version is not None:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.torch_threads or threads)
    torch_threads = torch.get_num_threads()
    peer_name = (f"vector-quantize-pytorch {version} (torch {torch.__version__}, "
                 f"{torch_threads} threads)")
  else:
    peer_name = "vector-quantize-pytorch not installed: our timings only"
  print(f"{jax.devices()[0].platform}, {threads} cores, jax {jax.__version__}; {peer_name}")
  print(f"{'row':<9} {'shape':<44} {'jaxquant ms':>11} {'vqp ms':>9} {'ratio':>7} "
        f"{'best':>7}")
  cases = make_cases(args.small)
  rows = []
  for name in args.rows:
    row = run_case(cases[name], version, args.repeats, args.min_time,
                   args.peer_max_gib * 2**30)
    rows.append(row)
    peer_ms = "n/a" if row["peer_ms"] is None else f"{row['peer_ms']:.2f}"
    ratio, best = ("n/a" if row[k] is None else f"{row[k]:.2f}x" for k in ("ratio", "ratio_best"))
    verdict = ("" if row["target_met"] is None else
               f"  {'ok' if row['target_met'] else 'MISS'} (>= {RATIO_TARGET:g}x)")
    print(f"{name:<9} {row['shape']:<44} {row['ours_ms']:11.2f} {peer_ms:>9} "
          f"{ratio:>7} {best:>7}{verdict}{'  ' + row['note'] if row['note'] else ''}")
    if "table_bytes" in row and row["ours_peak_bytes"] is not None:
      print(f"{'':<9} memory: jaxquant step {_gib(row['ours_peak_bytes'])} vs one "
            f"{row['tokens']} x 2^{cases[name].dim} float32 table "
            f"{_gib(row['table_bytes'])} (vqp ~{_gib(row['peer_bytes_estimate'])})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(platform=jax.devices()[0].platform, threads=threads,
                     torch_threads=torch_threads, jax=jax.__version__, peer=version,
                     rows=rows), f, indent=2)
  return rows


if __name__ == "__main__":
  main()
