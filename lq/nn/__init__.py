"""Quantized layers, layer swapping, BN folding, GELU10, the per-channel clamp of cross-layer equalization."""

from lq.nn.channel_clamp import ChannelClamp
from lq.nn.fold_bn import fold_bn
from lq.nn.gelu10 import GELU10
from lq.nn.matmul import Matmul, QuantMatmul
from lq.nn.mixin import QuantMixin
from lq.nn.quant_conv import QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose2d
from lq.nn.quant_linear import QuantLinear
from lq.nn.quant_pool import QuantAdaptiveAvgPool2d, QuantAvgPool2d
from lq.nn.swap import (
    POOLING_MODULES,
    QUANT_MODULES,
    QuantizationReport,
    is_quantized,
    quantization_report,
    quantize,
    quantized_layers,
    restore,
    swap,
)

__all__ = [
    "ChannelClamp",
    "GELU10",
    "Matmul",
    "POOLING_MODULES",
    "QUANT_MODULES",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantAdaptiveAvgPool2d",
    "QuantAvgPool2d",
    "QuantConvTranspose2d",
    "QuantLinear",
    "QuantMatmul",
    "QuantMixin",
    "QuantizationReport",
    "fold_bn",
    "is_quantized",
    "quantization_report",
    "quantize",
    "quantized_layers",
    "restore",
    "swap",
]
