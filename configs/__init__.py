"""Quantization recipes (TOML), installed as `jaxquant.configs`; read by `jaxquant.recipes`."""
