"""lq: int8 quantization (Wu et al. 2020) and int8 training (Zhu et al. 2020) for PyTorch Lightning.

    import lq
    lq.quantize(model, lq.QuantConfig(skip=["head.*"]))
    lq.calibrate(model, train_loader, num_samples=1024)
    report = lq.sensitivity(model, evaluate)
    lq.partial_quantize(model, evaluate, target=0.01)
"""

from lq.bias_correction import correct_bias
from lq.checkpoint import load_from_checkpoint
from lq.deploy import convert, export_onnx
from lq.equalize import equalize
from lq.nn.fold_bn import fold_bn
from lq.nn.swap import quantization_report, quantize, quantized_layers
from lq.smoothing import smooth_quant
from lq.quant.config import QuantConfig, QuantSpec
from lq.workflow import (
    calibrate,
    choose_calibration,
    enabled_layers,
    partial_quantize,
    quantization_disabled,
    quantizers,
    sensitivity,
    set_quantization,
)

__version__ = "0.1.0"

__all__ = [
    "QuantConfig",
    "QuantSpec",
    "calibrate",
    "choose_calibration",
    "convert",
    "correct_bias",
    "enabled_layers",
    "equalize",
    "export_onnx",
    "fold_bn",
    "load_from_checkpoint",
    "partial_quantize",
    "quantization_disabled",
    "quantization_report",
    "quantize",
    "quantized_layers",
    "quantizers",
    "sensitivity",
    "set_quantization",
    "smooth_quant",
]
