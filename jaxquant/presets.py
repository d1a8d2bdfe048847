"""Named block-format presets: MXFP8, MXFP6, MXFP4 (OCP Microscaling) and NVFP4.

Each preset is a function of the axis the blocks run along, which should be the
contracting axis of the matmul the array feeds (axis 0 of a Dense kernel
``[in, out]``, the last axis of activations ``[tokens, d]``).
"""

from __future__ import annotations

from jaxquant.quantize import QuantSpec

MX_BLOCK = 32
NVFP4_BLOCK = 16

_MX_ELEMENTS = {
    "mxfp8": "fp8_e4m3",
    "mxfp8_e5m2": "fp8_e5m2",
    "mxfp6": "fp6_e2m3",
    "mxfp6_e3m2": "fp6_e3m2",
    "mxfp4": "fp4_e2m1",
}


def _other_axes(axis: int, ndim: int) -> tuple[int, ...]:
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis={axis} is out of range for ndim={ndim}")
  return tuple(a for a in range(ndim) if a != axis % ndim)


def mx(element_format: str, axis: int = 0, ndim: int = 2) -> QuantSpec:
  """OCP MX: 1-D blocks of 32 along `axis`, one e8m0 scale each (OCP MX v1.0 rule).

  Args:
    element_format: fp8_e4m3, fp8_e5m2, fp6_e2m3, fp6_e3m2 or fp4_e2m1.
    axis: the axis the blocks run along.
    ndim: rank of the arrays; every other axis keeps a scale per index.
  """
  return QuantSpec(element_format, channel_axes=_other_axes(axis, ndim),
                   block_sizes={axis % ndim: MX_BLOCK}, scale_dtype="e8m0")


def nvfp4(axis: int = 0, ndim: int = 2) -> QuantSpec:
  """NVFP4: fp4_e2m1 in 1-D blocks of 16, fp8_e4m3 block scales, fp32 tensor scale."""
  return QuantSpec("fp4_e2m1", channel_axes=_other_axes(axis, ndim),
                   block_sizes={axis % ndim: NVFP4_BLOCK}, scale_dtype="fp8_e4m3",
                   tensor_scale=True)


def list_presets() -> list[str]:
  """Names accepted by `get_preset`."""
  return [*_MX_ELEMENTS, "nvfp4"]


def get_preset(name: str, axis: int = 0, ndim: int = 2) -> QuantSpec:
  """The `QuantSpec` of a named block format, blocks along `axis` of rank-`ndim` arrays.

  Raises:
    ValueError: unknown name; the message lists the known ones.
  """
  if name == "nvfp4":
    return nvfp4(axis, ndim)
  if name in _MX_ELEMENTS:
    return mx(_MX_ELEMENTS[name], axis, ndim)
  raise ValueError(f"preset {name!r} is not known; known presets: "
                   f"{', '.join(list_presets())}")
