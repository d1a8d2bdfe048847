"""Post-training quantization: calibration capture, GPTQ, AWQ, SmoothQuant, Hadamard
rotations, cross-layer equalization and bias correction, HQQ-style weight fitting,
mixed-precision bit allocation, and LoRA on a quantized base."""

from jaxquant.ptq.awq import AWQResult
from jaxquant.ptq.awq import awq
from jaxquant.ptq.calibration import LayerStats
from jaxquant.ptq.calibration import capture_linen
from jaxquant.ptq.calibration import capture_nnx
from jaxquant.ptq.calibration import output_error
from jaxquant.ptq.driver import AWQ
from jaxquant.ptq.driver import GPTQ
from jaxquant.ptq.driver import RTN
from jaxquant.ptq.driver import Rule
from jaxquant.ptq.driver import dequantize_params
from jaxquant.ptq.driver import quantize_params
from jaxquant.ptq.equalization import bias_correction
from jaxquant.ptq.equalization import cross_layer_equalize
from jaxquant.ptq.equalization import equalization_scales
from jaxquant.ptq.equalization import equalize_chain
from jaxquant.ptq.equalization import expected_relu
from jaxquant.ptq.gptq import gptq
from jaxquant.ptq.gptq import rtn
from jaxquant.ptq.hqq import hqq
from jaxquant.ptq.hqq import lp_error
from jaxquant.ptq.hqq import mse_fit
from jaxquant.ptq.hqq import shrink_lp
from jaxquant.ptq.lora import LoRA
from jaxquant.ptq.lora import lora_apply
from jaxquant.ptq.lora import lora_init
from jaxquant.ptq.lora import lq_lora_init
from jaxquant.ptq.mixed import allocate_bits
from jaxquant.ptq.mixed import layer_sensitivity
from jaxquant.ptq.mixed import storage_bits_per_weight
from jaxquant.ptq.rotation import hadamard_matrix
from jaxquant.ptq.rotation import hadamard_transform
from jaxquant.ptq.rotation import hadamard_transpose
from jaxquant.ptq.rotation import random_hadamard
from jaxquant.ptq.rotation import random_signs
from jaxquant.ptq.rotation import rotate_hessian
from jaxquant.ptq.rotation import rotate_input
from jaxquant.ptq.rotation import rotate_output
from jaxquant.ptq.smoothquant import apply_input_scales
from jaxquant.ptq.smoothquant import fold_scales_into_layernorm
from jaxquant.ptq.smoothquant import fold_scales_into_linear
from jaxquant.ptq.smoothquant import smoothquant
from jaxquant.ptq.smoothquant import smoothquant_scales
