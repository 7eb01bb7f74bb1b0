"""Deployment (paper Section 3.2-3.3, eq. 10): int8 inference layers and ONNX Q/DQ export.

    lq.quantize(model); lq.calibrate(model, data)
    lq.deploy.export_onnx(model, example, "m.onnx")   # the fake-quant model -> ONNX Q/DQ (TensorRT)
    model = lq.deploy.convert(model)                  # int8 weights, integer kernels, int8 chains

Export first: ``convert`` replaces the fake-quant layers that ``export_onnx`` reads.
"""

from lq.deploy.chain import Int8Sequential
from lq.deploy.convert import convert
from lq.deploy.int8_layers import (
    Int8ConvNd,
    Int8ConvTranspose2d,
    Int8Linear,
    Int8Matmul,
    Int8Module,
)
from lq.deploy.int8_pool import Int8AdaptiveAvgPool2d, Int8AvgPool2d
from lq.deploy.kernels import onednn_mode
from lq.deploy.onnx_export import count_qdq, export_onnx

__all__ = [
    "Int8AdaptiveAvgPool2d",
    "Int8AvgPool2d",
    "Int8ConvNd",
    "Int8ConvTranspose2d",
    "Int8Linear",
    "Int8Matmul",
    "Int8Module",
    "Int8Sequential",
    "convert",
    "count_qdq",
    "export_onnx",
    "onednn_mode",
]
