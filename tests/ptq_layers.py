"""Synthetic Dense layers for the PTQ tests: correlated inputs with outlier channels."""

import jax.numpy as jnp
import numpy as np

import jaxquant as jq

N_IN, N_OUT, TOKENS = 64, 32, 512


def outlier_inputs(seed: int, tokens: int = TOKENS) -> np.ndarray:
  """float32[tokens, N_IN]: a random low-rank mixing plus noise, 3 channels 20-50x larger."""
  rng = np.random.default_rng(seed)
  mixing = rng.normal(size=(8, N_IN))
  x = rng.normal(size=(tokens, 8)) @ mixing + 0.1 * rng.normal(size=(tokens, N_IN))
  x[:, [3, 17, 40]] *= np.array([20.0, 35.0, 50.0])
  return x.astype(np.float32)


def outlier_layer():
  """(x float32[TOKENS, N_IN], w float32[N_IN, N_OUT], LayerStats of x)."""
  x = outlier_inputs(0)
  w = np.random.default_rng(1).normal(size=(N_IN, N_OUT)).astype(np.float32)
  return x, jnp.asarray(w), jq.ptq.LayerStats.from_inputs(jnp.asarray(x))
