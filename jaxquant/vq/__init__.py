"""Tokenizer quantizers as pure functions: FSQ, VQ (with EMA and k-means), residual
and grouped VQ, LFQ and BSQ, and codebook usage metrics; and as Flax NNX modules
(`FSQ`, `VectorQuantizer`, ...) with Linen twins in `jaxquant.vq.linen`."""

from jaxquant.vq.binary import bits_to_indices
from jaxquant.vq.binary import bsq
from jaxquant.vq.binary import indices_to_bits
from jaxquant.vq.binary import lfq
from jaxquant.vq.binary import lfq_entropy_loss
from jaxquant.vq.binary import lfq_entropy_terms
from jaxquant.vq.binary import lfq_indices_to_codes
from jaxquant.vq.codebook import EMACodebookState
from jaxquant.vq.codebook import cluster_stats
from jaxquant.vq.codebook import ema_init
from jaxquant.vq.codebook import ema_update
from jaxquant.vq.codebook import kmeans_init
from jaxquant.vq.codebook import replace_dead_codes
from jaxquant.vq.metrics import codebook_usage
from jaxquant.vq.modules import BSQ
from jaxquant.vq.modules import CodebookState
from jaxquant.vq.modules import FSQ
from jaxquant.vq.modules import LFQ
from jaxquant.vq.modules import ResidualFSQ
from jaxquant.vq.modules import ResidualVQ
from jaxquant.vq.modules import VQOutput
from jaxquant.vq.modules import VectorQuantizer
from jaxquant.vq.residual import grouped_vq
from jaxquant.vq.residual import residual_vq
from jaxquant.vq.scalar import fsq
from jaxquant.vq.scalar import fsq_bound
from jaxquant.vq.scalar import fsq_codebook
from jaxquant.vq.scalar import fsq_codes_to_indices
from jaxquant.vq.scalar import fsq_indices_to_codes
from jaxquant.vq.scalar import residual_fsq
from jaxquant.vq.scalar import residual_fsq_scales
from jaxquant.vq.vector import l2_normalize
from jaxquant.vq.vector import nearest_code
from jaxquant.vq.vector import nearest_code_xla
from jaxquant.vq.vector import rotate_to
from jaxquant.vq.vector import vector_quantize
from jaxquant.vq import linen
