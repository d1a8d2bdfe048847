"""Quantization-aware training: custom_vjp quantizers for optax loops."""

from jaxquant.qat.ops import dampening_loss
from jaxquant.qat.ops import fake_quant
from jaxquant.qat.ops import fake_quant_tree
from jaxquant.qat.ops import lsq
from jaxquant.qat.ops import lsq_init
from jaxquant.qat.ops import lsq_plus
from jaxquant.qat.ops import lsq_quantize
from jaxquant.qat.ops import pact
