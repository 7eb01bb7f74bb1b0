"""Average pooling with a fake-quantized input (opt-in: ``QuantConfig(quantize_pooling=True)``).

The paper quantizes the inputs of GEMM-like layers (Section 4), so the output of a conv that feeds average
pooling stays float in lq's model. A deployment runtime runs a conv as an int8 kernel only when its output is
quantized (onnxruntime's ``QLinearConv``; TensorRT's int8 conv with an int8 output), which is why
onnxruntime's ``quantize_static`` and NVIDIA's pytorch-quantization (``QuantAvgPool2d``,
``QuantAdaptiveAvgPool2d``) put a quantizer on the pooling input. These layers do the same: the input is
fake-quantized per tensor by eq. 12 with an activation quantizer (``QuantConfig.activation``, calibrated with
the others), and the average is taken over ``Q(x)``, i.e. the step times the average of the grid integers
(``lq.convert`` computes it that way, ``lq.deploy.Int8AvgPool2d``). Max pooling needs no quantizer: it commutes
with it (``Q(max x) = max Q(x)``, ``lq.deploy.chain``).

Like the other quantized layers they are made by changing the class of the existing module (``lq.nn.swap``).
"""

from __future__ import annotations

import torch
from torch import nn

from lq.quant.config import QuantConfig
from lq.quant.quantizer import TensorQuantizer


class _QuantAvgPool:
    """What both quantized average poolings share: one per-tensor input quantizer, no weight."""

    float_class: type[nn.Module]

    def init_quantizers(self, config: QuantConfig, name: str) -> None:
        """Create the input quantizer (per tensor, ``config.activation``)."""
        self.input_quantizer = TensorQuantizer(config.activation, name=f"{name}.input")

    def quantizers(self) -> dict[str, TensorQuantizer]:
        """``{attribute name: quantizer}`` of this layer."""
        return {"input_quantizer": self.input_quantizer}

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """The float pooling of the fake-quantized input ``Q(input)`` (eq. 12)."""
        return super().forward(self.input_quantizer(input))


class QuantAvgPool2d(_QuantAvgPool, nn.AvgPool2d):
    """``nn.AvgPool2d`` on a per-tensor fake-quantized input."""

    float_class = nn.AvgPool2d


class QuantAdaptiveAvgPool2d(_QuantAvgPool, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` (global average pooling with ``output_size=1``) on a per-tensor fake-quantized
    input."""

    float_class = nn.AdaptiveAvgPool2d


#: quantized pooling classes (swapped only with ``QuantConfig(quantize_pooling=True)``)
QUANT_POOLING = (QuantAvgPool2d, QuantAdaptiveAvgPool2d)

__all__ = ["QUANT_POOLING", "QuantAdaptiveAvgPool2d", "QuantAvgPool2d"]
