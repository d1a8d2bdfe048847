"""Optax optimizers with block-wise quantized (8-bit and 4-bit) state."""

from jaxquant.optim.state import StateQuantizer
from jaxquant.optim.state import block_axis
from jaxquant.optim.transforms import EIGHT_BIT
from jaxquant.optim.transforms import FOUR_BIT
from jaxquant.optim.transforms import ScaleByAdam8bitState
from jaxquant.optim.transforms import ScaleByAdemamix8bitState
from jaxquant.optim.transforms import ScaleByLion8bitState
from jaxquant.optim.transforms import Trace8bitState
from jaxquant.optim.transforms import adam_8bit
from jaxquant.optim.transforms import adamw_4bit
from jaxquant.optim.transforms import adamw_8bit
from jaxquant.optim.transforms import ademamix_8bit
from jaxquant.optim.transforms import lion_8bit
from jaxquant.optim.transforms import scale_by_adam_8bit
from jaxquant.optim.transforms import scale_by_ademamix_8bit
from jaxquant.optim.transforms import scale_by_lion_8bit
from jaxquant.optim.transforms import sgd_8bit
from jaxquant.optim.transforms import trace_8bit
