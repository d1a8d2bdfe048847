"""Weight-only quantized matmul: float activations times low-bit weights.

``weight_only_matmul(x, w_codes, w_scale, fmt=..., group_size=...)`` computes
``x @ W`` with ``W[k, n] = decode(code[k, n]) * w_scale[k // group_size, n]``,
dequantizing W tile by tile inside the kernel (w8a16, w4a16, nf4, fp4).

Weight layout:

* ``x``: float32 or bfloat16[M, K].
* ``w_codes`` for fmt "int8": int8[K, N], the codes themselves.
* ``w_codes`` for the 4-bit formats: uint8[K // 2, N], packed along K in halves
  (`pack_halves`): byte ``[r, n]`` holds code ``[r, n]`` in its low nibble and
  code ``[r + K // 2, n]`` in its high nibble. A K step of a kernel multiplies
  ``x[:, kb]`` by the low nibbles of rows ``kb`` and ``x[:, K // 2 + kb]`` by the
  high ones, so rows are never interleaved. Codes: "int4" two's complement
  nibbles (value = nibble - 16 if nibble >= 8); "nf4" indices 0..15 into the
  QLoRA NF4 table (``formats.get_format("nf4").table``); "fp4_e2m1" E2M1 bit
  patterns (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6
  and their negatives).
* ``w_scale``: float32[K // group_size, N]; group_size is 32, 64, 128 or K (per
  channel). For the 4-bit formats K // 2 must be a multiple of it (unless per
  channel), so each half of K holds whole groups.
"""

from jaxquant.kernels.weight_only_matmul.api import weight_only_matmul
from jaxquant.kernels.weight_only_matmul.reference import pack_halves
from jaxquant.kernels.weight_only_matmul.reference import unpack_halves

__all__ = ["weight_only_matmul", "pack_halves", "unpack_halves"]
