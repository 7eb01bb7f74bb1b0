"""Architectures by name, so a model can be rebuilt from hyperparameters (Hydra configs, checkpoints)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lq.models.mlp import MLP
from lq.models.mobilenet import MobileNetSmall
from lq.models.mnist_cnn import mnist_cnn
from lq.models.resnet import SmallResNet
from lq.models.small_cnn import SmallCNN

#: architecture name -> builder called with ``**arch_kwargs``
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mnist_cnn": mnist_cnn,  # kwargs: pretrained (default True)
    "small_cnn": SmallCNN,
    "small_resnet": SmallResNet,
    "mlp": MLP,
    "mobilenet_small": MobileNetSmall,
}


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build the registered architecture ``arch`` (one of :data:`ARCHITECTURES`) with ``kwargs``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)
