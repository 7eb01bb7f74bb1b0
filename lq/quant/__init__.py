"""Quantization math (eq. 1-8, 12, 13), the TensorQuantizer module, and the config dataclasses."""

from lq.quant.config import QuantConfig, QuantSpec
from lq.quant.functional import (
    affine_params,
    dequantize,
    fake_quant,
    fake_quant_affine,
    fake_quant_learned_range,
    qmax,
    quantize,
    scale_from_amax,
)
from lq.quant.quantizer import TensorQuantizer

__all__ = [
    "QuantConfig",
    "QuantSpec",
    "TensorQuantizer",
    "affine_params",
    "dequantize",
    "fake_quant",
    "fake_quant_affine",
    "fake_quant_learned_range",
    "qmax",
    "quantize",
    "scale_from_amax",
]
