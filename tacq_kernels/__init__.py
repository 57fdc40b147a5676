"""tacq_kernels: fused 2/3-bit dequantize-and-multiply kernels with sparse fp16 outliers.

The runtime half of the project: checkpoint format v1 (:mod:`tacq_kernels.format`), bit-plane
packing (:mod:`tacq_kernels.packing`), the pure-PyTorch reference (:mod:`tacq_kernels.reference`),
torch custom ops (:mod:`tacq_kernels.ops`) and the ``QuantLinear`` module.
"""

from .format import (
    FORMAT_VERSION,
    QUANT_METHOD,
    CheckpointError,
    LayerSpec,
    PackedLayer,
    SegmentData,
    SegmentSpec,
    build_layer,
    load_layers,
    make_quantization_config,
    parse_quantization_config,
    save_layers,
    slice_layer,
    slice_problem,
    validate_layer,
)
from .hf import load, quantized_layers, register_with_transformers, replace_linear
from .module import QuantLinear
from .ops import warmup

# `import tacq_kernels` is what makes AutoModelForCausalLM.from_pretrained understand our checkpoints.
register_with_transformers()

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "CheckpointError",
    "LayerSpec",
    "PackedLayer",
    "QuantLinear",
    "SegmentData",
    "SegmentSpec",
    "build_layer",
    "load",
    "load_layers",
    "make_quantization_config",
    "parse_quantization_config",
    "quantized_layers",
    "register_with_transformers",
    "replace_linear",
    "save_layers",
    "slice_layer",
    "slice_problem",
    "validate_layer",
    "warmup",
]
