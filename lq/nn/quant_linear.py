"""``QuantLinear``: ``nn.Linear`` with fake-quantized input (per tensor) and weight (per output row).

Eq. 9 computed in float on fake-quantized operands; ``lq.convert`` later runs it as eq. 10 (int8 GEMM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lq.nn.int8_compute import int8_compute_config, int8_linear_forward
from lq.nn.mixin import QuantMixin


class QuantLinear(QuantMixin, nn.Linear):
    float_class = nn.Linear
    weight_channel_axis = 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        config = int8_compute_config(self)
        if config is not None:
            out = int8_linear_forward(self, input, config)
            if out is not None:
                return out
        # lq.smooth_quant: x / s and W diag(s), exact in float
        x, w = self.smooth_input(input), self.quant_weight()
        return F.linear(self.input_quantizer(x), self.weight_quantizer(w), self.quantized_bias())
