"""What every quantized layer shares: an input quantizer per input and a weight quantizer.

Quantized layers *subclass* the float layer and are made by changing the class of the existing module
(``lq.nn.swap``), so ``weight`` and ``bias`` stay the very same Parameters: optimizer state, DDP buckets and
``torch.nn.utils.prune`` (which re-registers ``weight``) keep working. Inputs and weights are quantized; the
output stays in float (paper Section 4: the next layer quantizes its own input).
"""

from __future__ import annotations

import torch
from torch import nn

from lq.quant.config import QuantConfig
from lq.quant.quantizer import TensorQuantizer


class QuantMixin:
    """Adds ``input_quantizer`` and ``weight_quantizer`` to a float layer whose class was swapped."""

    #: the float class this quantized class stands for (set by each subclass)
    float_class: type[nn.Module]
    #: axis of the weight that indexes output channels (0 for Linear/Conv, 1 for ConvTranspose)
    weight_channel_axis: int = 0

    def init_quantizers(self, config: QuantConfig, name: str) -> None:
        """Create the input (per tensor) and weight (``config.weight``'s granularity) quantizers, named after
        the layer."""
        w = config.weight
        self.input_quantizer = TensorQuantizer(config.activation, axis=None, name=f"{name}.input")
        self.weight_quantizer = TensorQuantizer(
            w,
            axis=self.weight_channel_axis,
            num_channels=self.weight.shape[self.weight_channel_axis],
            dynamic=w.calibrator == "max",
            name=f"{name}.weight",
        )

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias the quantized layer uses: ``bias`` plus the bias correction (``lq.correct_bias``, a buffer
        ``bias_correction`` on the weight quantizer) while the weight quantizer quantizes; ``bias`` alone when
        the layer runs in float (quantization disabled, partial quantization) or has no correction."""
        correction = getattr(self.weight_quantizer, "bias_correction", None)
        if correction is None or self.weight_quantizer.mode != "quantize":
            return self.bias
        correction = correction.to(self.weight.dtype)
        return correction if self.bias is None else self.bias + correction

    def input_smoothing(self) -> torch.Tensor | None:
        """The per-input-channel divisor ``s`` of SmoothQuant (``lq.smooth_quant``, a buffer ``smoothing`` on the
        input quantizer) while the input quantizer is on (calibrating or quantizing): the layer then computes
        ``Q(x / s) Q(W diag(s))^T``, equal to ``x W^T`` in exact arithmetic. ``None`` when the layer runs in float
        (quantization disabled, partial quantization) or was not smoothed."""
        s = getattr(self.input_quantizer, "smoothing", None)
        if s is None or self.input_quantizer.mode == "off":
            return None
        return s

    def smooth_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x / s`` while the layer is smoothed (:meth:`input_smoothing`), else ``x`` itself: the input its
        input quantizer sees (the weight's twin is :meth:`quant_weight`)."""
        s = self.input_smoothing()
        return x if s is None else x / s.to(x.dtype)

    def quant_weight(self) -> torch.Tensor:
        """The weight as the weight quantizer sees it: ``weight * s`` per input channel when the layer is
        smoothed (:meth:`input_smoothing`), else ``weight`` itself."""
        s = self.input_smoothing()
        return self.weight if s is None else self.weight * s.to(self.weight.dtype)

    def smoothed_weight(self) -> torch.Tensor:
        """``weight * s`` whenever the layer has a smoothing and quantizes its input when it quantizes (the weight
        its weight quantizer must be calibrated for), whatever the quantizers' modes are right now."""
        s = getattr(self.input_quantizer, "smoothing", None)
        if s is None or not self.input_quantizer.spec.enabled:
            return self.weight
        return self.weight * s.to(self.weight.dtype)

    def quantizers(self) -> dict[str, TensorQuantizer]:
        """``{attribute name: quantizer}`` of this layer."""
        return {n: m for n, m in self.named_children() if isinstance(m, TensorQuantizer)}
