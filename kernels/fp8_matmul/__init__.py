"""fp8 (float8_e4m3fn) matmul with float32 accumulation and per-row/column scales."""

from jaxquant.kernels.fp8_matmul.api import fp8_matmul

__all__ = ["fp8_matmul"]
