"""jaxquant: quantization for JAX and Flax — formats, quantizers, pytrees, checkpoints."""

from jaxquant.formats import Format
from jaxquant.formats import get_format
from jaxquant.formats import list_formats
from jaxquant.matmul import dot_general
from jaxquant.matmul import matmul
from jaxquant.presets import get_preset
from jaxquant.presets import list_presets
from jaxquant.qarray import QArray
from jaxquant.qarray import pack_codes
from jaxquant.qarray import unpack_codes
from jaxquant.quantize import QuantSpec
from jaxquant.quantize import dequantize
from jaxquant.quantize import fake_quant
from jaxquant.quantize import quantize
from jaxquant.tree import LeafReport
from jaxquant.tree import Rule
from jaxquant.tree import TreeReport
from jaxquant.tree import dequantize_tree
from jaxquant.tree import quantize_tree
from jaxquant.tree import tree_report
from jaxquant import checkpoint
from jaxquant import optim
from jaxquant import qat
from jaxquant import linen
from jaxquant import nnx
from jaxquant import vq
from jaxquant import ptq

__version__ = "0.1.0"
