"""A small MobileNetV2-style network (Sandler et al. 2018) for 28x28 inputs: inverted residuals, depthwise
convs, ReLU6, linear bottlenecks. The model class where per-channel ranges differ most between neighbouring
layers (depthwise filters), i.e. where cross-layer equalization and bias correction (Nagel et al. 2019) matter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
            relu6: bool = True) -> nn.Sequential:
    """``Conv2d(kernel, padding kernel//2, no bias) -> BatchNorm2d [-> ReLU6]`` with keys ``0``/``1``/``2``."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu6:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """``expand (1x1) -> depthwise 3x3 (stride) -> project (1x1, linear)``, plus the input when the shapes match.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the depthwise conv.
        expand: expansion factor of the hidden width (``expand * in_channels``); 1 skips the expand conv.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(in_channels, hidden, 1))
        layers += [conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
                   conv_bn(hidden, out_channels, 1, relu6=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``block(x) + x`` when the block keeps the shape, else ``block(x)``."""
        out = self.block(x)
        return out + x if self.residual else out


#: (out_channels, stride, expand) of each inverted residual block; with the stride-2 stem a 28x28 input runs
#: at 14x14, then 7x7 from the fourth block
DEFAULT_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (16, 1, 1), (24, 1, 4), (24, 1, 4), (32, 2, 4), (32, 1, 4), (64, 1, 4),
)


class MobileNetSmall(nn.Module):
    """Stem ``conv3x3-BN-ReLU6``, inverted residual blocks, ``conv1x1-BN-ReLU6`` to ``last_channels``, global
    average pooling and a linear head.

    Args:
        num_classes: outputs of the head.
        in_channels: input channels.
        stem_channels: channels of the stem conv.
        stem_stride: stride of the stem conv (2: a 28x28 input is processed at 14x14, 4x cheaper on a CPU).
        blocks: ``(out_channels, stride, expand)`` per block (default :data:`DEFAULT_BLOCKS`).
        last_channels: channels of the last 1x1 conv.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, stem_channels: int = 16, stem_stride: int = 2,
                 blocks: Sequence[Sequence[int]] = DEFAULT_BLOCKS, last_channels: int = 128) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels),
                        ("stem_channels", stem_channels), ("stem_stride", stem_stride),
                        ("last_channels", last_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        layers: list[nn.Module] = [conv_bn(in_channels, stem_channels, 3, stride=stem_stride)]
        channels = stem_channels
        for spec in blocks:
            out, stride, expand = (int(v) for v in spec)
            layers.append(InvertedResidual(channels, out, stride, expand))
            channels = out
        layers.append(conv_bn(channels, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, in_channels, H, W)``."""
        return self.head(self.pool(self.features(x)))
