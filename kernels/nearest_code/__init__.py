"""Nearest codebook entry: fused distance matmul and running argmin, int32 codes out.

`nearest_code` (api.py) validates its operands and dispatches to the Mosaic TPU kernel
(tpu.py), the Triton GPU kernel (gpu.py) or the XLA reference (reference.py).
"""

from jaxquant.kernels.nearest_code.api import nearest_code

__all__ = ["nearest_code"]
