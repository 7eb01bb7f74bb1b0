"""Quantized convolutions: fake-quantized input (per tensor) and weight (per output channel, Section 3.2:
"per-channel" = per kernel, since each kernel produces one output channel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lq.nn.int8_compute import int8_compute_config, int8_conv2d_forward
from lq.nn.mixin import QuantMixin


class _QuantConvNd(QuantMixin):
    weight_channel_axis = 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x, w = self.input_quantizer(input), self.weight_quantizer(self.weight)
        return self._conv_forward(x, w, self.quantized_bias())


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    float_class = nn.Conv1d


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    float_class = nn.Conv2d

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        config = int8_compute_config(self)
        if config is not None:
            out = int8_conv2d_forward(self, input, config)
            if out is not None:
                return out
        return super().forward(input)


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    float_class = nn.Conv3d


class QuantConvTranspose2d(QuantMixin, nn.ConvTranspose2d):
    """Transposed conv: its weight is (in, out / groups, kH, kW), so output channels are axis 1."""

    float_class = nn.ConvTranspose2d
    weight_channel_axis = 1

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return F.conv_transpose2d(
            self.input_quantizer(input),
            self.weight_quantizer(self.weight),
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )
