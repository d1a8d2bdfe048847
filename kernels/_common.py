"""What every kernel folder shares: implementation choice and padding.

`dispatch` picks the implementation of an op at lowering time, per platform, with
`jax.lax.platform_dependent`: a function that calls an op with ``impl="auto"`` and is
exported with ``jax.export(..., platforms=["tpu"])`` lowers to the TPU kernel, with
``["cuda"]`` to the GPU kernel, and anywhere else to the XLA reference, whatever
machine traces it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "pallas")


def dispatch(impl: str, interpret: Any, *, tpu: Callable, gpu: Callable,
             xla: Callable, op: str) -> Callable:
  """The function that runs `op` for `impl`.

  Args:
    impl: "auto" (the platform's kernel on TPU and CUDA, `xla` elsewhere), "xla",
      or "pallas" (a kernel; on a CPU only with `interpret`).
    interpret: falsy, or True / `pltpu.InterpretParams()` to run the TPU kernel in
      the Pallas interpreter (any platform; tests use it on CPU).
    tpu, gpu, xla: ``fn(*operands)`` for each implementation; `tpu` and `gpu` take
      the keyword argument ``interpret``.
    op: the op's name, for error messages.
  Returns:
    ``fn(*operands)``.
  Raises:
    ValueError: an unknown `impl`, or "pallas" without a TPU or GPU and without
      `interpret`.
  """
  if impl not in IMPLS:
    raise ValueError(f"{op}: impl={impl!r}; expected one of {IMPLS}")
  if impl == "xla":
    return xla
  if interpret:
    return lambda *args: tpu(*args, interpret=interpret)
  if impl == "pallas" and jax.default_backend() not in ("tpu", "gpu"):
    raise ValueError(
        f"{op}: impl='pallas' needs a TPU or GPU (this is {jax.default_backend()!r}); "
        "pass interpret=True to run the kernel in the Pallas interpreter, or "
        "impl='auto' to fall back to XLA")
  return lambda *args: jax.lax.platform_dependent(
      *args, tpu=lambda *a: tpu(*a, interpret=False),
      cuda=lambda *a: gpu(*a, interpret=False), default=xla)


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= `n`."""
  return -(-n // multiple) * multiple


def pad_to(x: jax.Array, multiples: tuple[int, ...]) -> jax.Array:
  """`x` zero-padded at the end of each axis to a multiple of `multiples[axis]`."""
  widths = [(0, round_up(n, m) - n) for n, m in zip(x.shape, multiples)]
  if not any(hi for _, hi in widths):
    return x
  return jnp.pad(x, widths)


def out_struct(shape: tuple[int, ...], dtype, *operands: jax.Array) -> jax.ShapeDtypeStruct:
  """`jax.ShapeDtypeStruct` of a kernel output computed from `operands`.

  Inside `jax.shard_map` (default ``check_vma=True``) `pl.pallas_call` must be told
  over which manual mesh axes its outputs vary: every axis any operand varies
  over. Outside shard_map that set is empty.
  """
  mats = [jax.typeof(x).mat for x in operands]
  varying = frozenset().union(*(m.varying for m in mats))
  mat = mats[0] if varying == mats[0].varying else mats[0].update(varying=varying)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
