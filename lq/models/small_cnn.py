"""A small conv-BN-ReLU network (for Fashion-MNIST / MNIST): the BatchNorm model for ``fold_bn`` + PTQ."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, batchnorm: bool = True) -> nn.Sequential:
    """``Conv2d(3x3, padding 1) -> BatchNorm2d -> ReLU`` (conv bias only without BN), keys ``0``/``1``/``2``."""
    if batchnorm:
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU())


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks, two max-pools, global average pooling and a linear head.

    Layout for a ``(N, in_channels, 28, 28)`` input (any size >= 4 works: the pooling is global)::

        features.0  conv_bn_relu(in_channels, width)        28x28
        features.1  MaxPool2d(2)                             14x14
        features.2  conv_bn_relu(width, 2*width)            14x14
        features.3  MaxPool2d(2)                             7x7
        features.4  conv_bn_relu(2*width, 4*width)          7x7
        pool        AdaptiveAvgPool2d(1) + flatten           (N, 4*width)
        head        Linear(4*width, num_classes)

    Args:
        num_classes: outputs of the head.
        in_channels: input channels.
        width: channels of the first block (then 2x and 4x).
        batchnorm: put BatchNorm2d after each conv (the conv then has no bias).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, batchnorm: bool = True) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, width, batchnorm),
            nn.MaxPool2d(2),
            conv_bn_relu(width, 2 * width, batchnorm),
            nn.MaxPool2d(2),
            conv_bn_relu(2 * width, 4 * width, batchnorm),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, in_channels, H, W)``."""
        return self.head(self.pool(self.features(x)))
