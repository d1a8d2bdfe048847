"""W8A8 matmul: int8 activations x int8 weights, int32 accumulation, dequantized output.

`w8a8_matmul` (api.py) validates its operands and dispatches to the Mosaic TPU kernel
(tpu.py), the Triton GPU kernel (gpu.py) or the XLA reference (reference.py).
"""

from jaxquant.kernels.w8a8_matmul.api import w8a8_matmul

__all__ = ["w8a8_matmul"]
