"""``QuantLinear``: ``nn.Linear`` with fake-quantized input (per tensor) and weight (per output row).

Eq. 9 computed in float on fake-quantized operands; ``lq.convert`` later runs it as eq. 10 (int8 GEMM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lq.nn.mixin import QuantMixin


class QuantLinear(QuantMixin, nn.Linear):
    float_class = nn.Linear
    weight_channel_axis = 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(input), self.weight_quantizer(self.weight), self.bias)
