"""Example models (plain ``nn.Module``) and :class:`LitClassifier`, a standard LightningModule around them::

    from lq.models import LitClassifier, build_model
    lit = LitClassifier(arch="small_cnn", arch_kwargs={"width": 16})
    lit = LitClassifier.load_from_checkpoint("last.ckpt")     # rebuilt from the saved arch, no arguments
"""

from lq.models.classifier import LitClassifier
from lq.models.mlp import MLP
from lq.models.mobilenet import InvertedResidual, MobileNetSmall
from lq.models.mnist_cnn import mnist_cnn, pretrained_mnist_cnn
from lq.models.registry import ARCHITECTURES, build_model
from lq.models.resnet import BasicBlock, SmallResNet
from lq.models.small_cnn import SmallCNN

__all__ = [
    "ARCHITECTURES",
    "MLP",
    "BasicBlock",
    "InvertedResidual",
    "LitClassifier",
    "MobileNetSmall",
    "SmallCNN",
    "SmallResNet",
    "build_model",
    "mnist_cnn",
    "pretrained_mnist_cnn",
]
