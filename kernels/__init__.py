"""Pallas kernels of jaxquant, installed as `jaxquant.kernels`.

One folder per op (api.py, reference.py, tpu.py, gpu.py); the library reaches them
only through this package. The low-bit matmul and VQ kernels land here.
"""
