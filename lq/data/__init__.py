"""Real, offline data sets as LightningDataModules (see shared DATA.md), plus :func:`load_split` for scripts::

    from lq.data import MNISTDataModule, load_split
    dm = MNISTDataModule(batch_size=256, limit_train=5000)
    x, y = load_split("mnist", "test")          # (10000, 1, 28, 28) float32 normalised, (10000,) int64
"""

from __future__ import annotations

from typing import Any

import torch

from lq.data.base import SPLITS, InMemoryDataModule, check_split
from lq.data.digits import DigitsDataModule
from lq.data.fashion_mnist import FashionMNISTDataModule
from lq.data.mnist import MNISTDataModule

#: data set name -> DataModule class (the names :func:`load_split` and Hydra configs use)
DATAMODULES: dict[str, type[InMemoryDataModule]] = {
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "digits": DigitsDataModule,
}


def get_datamodule(name: str, **kwargs: Any) -> InMemoryDataModule:
    """Build the data module registered as ``name`` (one of :data:`DATAMODULES`) with ``kwargs``."""
    if name not in DATAMODULES:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATAMODULES)}")
    return DATAMODULES[name](**kwargs)


def load_split(name: str, split: str, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Return one split of a data set as in-memory tensors ``(images (N,C,H,W) float32, labels (N,) int64)``.

    Args:
        name: ``"mnist"``, ``"fashion_mnist"`` or ``"digits"``.
        split: ``"train"``, ``"val"``, ``"test"`` (or ``"predict"``, an alias of test).
        **kwargs: data module options, e.g. ``normalize=False``, ``limit_test=1000``, ``seed=1``.
    """
    split = check_split(split)
    dm = get_datamodule(name, **kwargs)
    dm.setup()
    return dm.split_tensors(split)


__all__ = [
    "DATAMODULES",
    "SPLITS",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "InMemoryDataModule",
    "MNISTDataModule",
    "get_datamodule",
    "load_split",
]
