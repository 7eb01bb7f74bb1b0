"""A multilayer perceptron that flattens its input: Linear layers only (for QuantLinear / int8 GEMM)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """``flatten -> [Linear -> ReLU] * len(hidden) -> head Linear``.

    Module names: ``flatten``, ``body.<2i>`` (Linear) / ``body.<2i+1>`` (ReLU), ``head``.

    Args:
        in_features: features after flattening (784 for 28x28, 64 for 8x8).
        hidden: widths of the hidden layers (may be empty: a linear classifier).
        num_classes: outputs of the head.
    """

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (256, 256), num_classes: int = 10) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        hidden = tuple(hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in hidden):
            raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}")
        self.flatten = nn.Flatten(1)
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of inputs ``(N, ...)`` with ``in_features`` values each."""
        return self.head(self.body(self.flatten(x)))
