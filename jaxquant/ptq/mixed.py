"""Mixed precision: per-layer sensitivity and the bit allocation that meets a budget.

Sensitivity. Quantizing a Dense kernel ``w [in, out]`` to ``w_q`` changes the
layer's outputs on the calibration inputs ``X`` by ``X (w - w_q)``; its squared
norm is ``tr(D^T H D)``, ``D = w - w_q``, ``H = X^T X`` (`layer_sensitivity`),
the output-error proxy of layer-wise PTQ (GPTQ's objective; OBQ/HAWQ-style
Hessian traces weight the same error by a Hessian).

Allocation. Given, per layer, the sensitivity of each candidate bit width and
the layer's number of weights, `allocate_bits` picks one width per layer so that
the size-weighted mean cost in bits per weight (codes plus scale overhead, see
`storage_bits_per_weight`) is within the budget and the summed sensitivity is minimal.
This is a multiple-choice knapsack; it is solved exactly, with no discretization
of the budget, by dynamic programming over Pareto frontiers: after each layer
only the allocations of the layers so far that no other beats in both cost and
sensitivity are kept.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.ptq.calibration import output_error
from jaxquant.quantize import QuantSpec, dequantize, quantize


@functools.partial(jax.jit, static_argnames=("spec",))
def layer_sensitivity(w: jax.Array, xtx: jax.Array, spec: QuantSpec) -> jax.Array:
  """float32[]: ``tr(D^T xtx D)``, ``D = w - dequantize(quantize(w, spec))``.

  With ``xtx = sum_n x_n^T x_n`` over calibration inputs, this is the summed
  squared output error ``sum_n ||x_n @ D||^2`` the quantization causes.

  Args:
    w: float[in, out] Dense kernel.
    xtx: float32[in, in] input second moments (``LayerStats.xtx``).
    spec: how `w` would be quantized (static under jit).
  Raises:
    ValueError: shapes that do not match.

  Example:
    >>> jq.ptq.layer_sensitivity(w, stats.xtx, jq.QuantSpec("int3", channel_axes=(1,)))
  """
  if w.ndim != 2 or tuple(xtx.shape) != (w.shape[0],) * 2:
    raise ValueError(f"xtx has shape {tuple(xtx.shape)}; expected ({w.shape[0]}, "
                     f"{w.shape[0]}) for w of shape {tuple(w.shape)}")
  return output_error(w, dequantize(quantize(w, spec), jnp.float32), xtx)


def storage_bits_per_weight(spec: QuantSpec, shape: Sequence[int]) -> float:
  """Storage bits per element of an array of `shape` quantized by `spec`.

  Codes at ``format.bits`` plus scales, zero points and tensor scales (as
  `QArray.nbytes` counts them), divided by the number of elements; e.g. int4
  in groups of 128 with float32 scales: 4 + 32/128 = 4.25.
  """
  shape = tuple(int(n) for n in shape)
  q = jax.eval_shape(lambda: quantize(jnp.zeros(shape, jnp.float32), spec))
  return 8 * q.nbytes / math.prod(shape)


def _frontier(cost: np.ndarray, sens: np.ndarray) -> np.ndarray:
  """Indices of the Pareto-optimal points (no other point both cheaper-or-equal and
  strictly less sensitive, or equal in both and earlier), sorted by cost."""
  order = np.lexsort((sens, cost))  # by cost, then sensitivity
  best_before = np.minimum.accumulate(np.concatenate([[np.inf], sens[order][:-1]]))
  return order[sens[order] < best_before]


def allocate_bits(sensitivity: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
                  budget_bits: float, *,
                  bits_per_weight: Optional[Mapping[int, float]] = None) -> dict[str, int]:
  """The bit width per layer of least total sensitivity within a bits-per-weight budget.

  Minimizes ``sum_l sensitivity[l][bits_l]`` subject to
  ``sum_l sizes[l] * cost(bits_l) <= budget_bits * sum_l sizes[l]``, where
  ``cost(b) = bits_per_weight[b]`` (default: b itself). Exact.

  Args:
    sensitivity: ``{layer: {bits: sensitivity}}``, the candidate widths of each
      layer and their sensitivities (e.g. `layer_sensitivity` per spec).
    sizes: ``{layer: number of weights}``, the same layers.
    budget_bits: the largest allowed size-weighted mean bits per weight.
    bits_per_weight: ``{bits: cost in bits per weight}`` including scale
      overhead (`storage_bits_per_weight` of each option's spec); must cover
      every option.
  Returns:
    ``{layer: bits}`` in the order of `sensitivity`.
  Raises:
    ValueError: mismatched layer names, a layer without options, non-positive
      sizes, an option missing from `bits_per_weight`, non-finite sensitivities,
      or a budget below the cheapest allocation (the message gives its cost).

  Example:
    >>> sens = {name: {b: float(jq.ptq.layer_sensitivity(w, xtx[name], specs[b]))
    ...                for b in (2, 3, 4)} for name, w in kernels.items()}
    >>> jq.ptq.allocate_bits(sens, {n: w.size for n, w in kernels.items()}, 3.0)
  """
  names = list(sensitivity)
  if set(names) != set(sizes):
    raise ValueError(f"sizes has layers {sorted(sizes)}; expected the layers of "
                     f"sensitivity {sorted(names)}")
  options, costs, sens = [], [], []
  for name in names:
    opts = list(sensitivity[name])
    if not opts:
      raise ValueError(f"sensitivity[{name!r}] has no bit widths to choose from")
    if sizes[name] <= 0:
      raise ValueError(f"sizes[{name!r}]={sizes[name]}; expected a positive count")
    cost_of = {b: b for b in opts} if bits_per_weight is None else bits_per_weight
    missing = [b for b in opts if b not in cost_of]
    if missing:
      raise ValueError(f"bits_per_weight has no cost for bits {missing} of layer {name!r}")
    values = np.array([float(sensitivity[name][b]) for b in opts])
    if not np.all(np.isfinite(values)):
      raise ValueError(f"sensitivity[{name!r}] = {dict(sensitivity[name])} is not finite")
    options.append(opts)
    costs.append(np.array([sizes[name] * float(cost_of[b]) for b in opts]))
    sens.append(values)

  total = float(sum(sizes[name] for name in names))
  limit = budget_bits * total
  # Frontier over the layers so far: cost, sensitivity, and back-pointers per layer.
  # A partial allocation stays only if the cheapest completion fits the budget.
  rest = np.concatenate([np.cumsum([c.min() for c in costs[::-1]])[::-1][1:], [0.0]])
  cost, sen = np.zeros(1), np.zeros(1)
  parents, choices = [], []
  for layer_costs, layer_sens, rest_cost in zip(costs, sens, rest):
    cand_cost = (cost[:, None] + layer_costs[None, :]).ravel()
    cand_sens = (sen[:, None] + layer_sens[None, :]).ravel()
    within = np.flatnonzero(cand_cost + rest_cost <= limit)
    keep = within[_frontier(cand_cost[within], cand_sens[within])]
    parent, choice = np.divmod(keep, len(layer_costs))
    parents.append(parent)
    choices.append(choice)
    cost, sen = cand_cost[keep], cand_sens[keep]

  if not sen.size:
    cheapest = sum(float(c.min()) for c in costs)
    raise ValueError(f"budget_bits={budget_bits} is infeasible: the cheapest allocation "
                     f"needs {cheapest / total:.6g} bits per weight")
  index = int(np.argmin(sen))
  picked = [0] * len(names)
  for layer in reversed(range(len(names))):
    picked[layer] = int(choices[layer][index])
    index = int(parents[layer][index])
  return {name: options[i][picked[i]] for i, name in enumerate(names)}
