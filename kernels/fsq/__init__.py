"""Finite scalar quantization (FSQ): bound, round and index in one pass.

`fsq_quantize` (api.py) validates its operands and dispatches to the Mosaic TPU kernel
(tpu.py), the Triton GPU kernel (gpu.py) or the XLA reference (reference.py).
"""

from jaxquant.kernels.fsq.api import fsq_quantize

__all__ = ["fsq_quantize"]
