"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (offline): 60k train / 10k test, 28x28.

Files: ``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` in the idx format
(a 4-byte magic whose last byte is the number of dimensions, the dimensions as big-endian int32, then the
uint8 data). The last 5k of a seeded permutation of the training set are held out as validation.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from lq.data.base import InMemoryDataModule, Split, seeded_split

log = logging.getLogger(__name__)

INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
#: Environment variable that overrides the default folder.
ROOT_ENV = "LQ_FASHION_MNIST_ROOT"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one (optionally gzipped) idx file into a uint8 numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path} is not an idx file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: unsupported idx header (magic {data[:4].hex()}; only uint8 idx files)")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {arr.size} values")
    return arr.reshape(dims)


def _resolve_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        root = os.environ.get(ROOT_ENV, DEFAULT_ROOT)
    return Path(root)


@functools.lru_cache(maxsize=2)
def _read_files(root: str) -> dict[str, Split]:
    out = {}
    for name, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(Path(root, f"{prefix}-images-idx3-ubyte.gz"))
        y = read_idx(Path(root, f"{prefix}-labels-idx1-ubyte.gz"))
        out[name] = (
            torch.from_numpy(x.copy()).reshape(-1, 1, 28, 28),  # uint8
            torch.from_numpy(y.astype(np.int64)),
        )
    return out


def load_fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, Split]:
    """Return the raw Fashion-MNIST ``{"train", "test"}`` splits: uint8 images ``(N,1,28,28)``, int64 labels.

    Args:
        root: folder with the four idx files; default ``$LQ_FASHION_MNIST_ROOT`` or
            ``/usr/share/datasets/fashion-mnist``.

    Raises:
        FileNotFoundError: a file is missing; the message names the install command. The returned tensors are
            cached per process and shared: treat them as read-only.
    """
    root = _resolve_root(root)
    missing = [
        f"{p}-{k}-ubyte.gz"
        for p in ("train", "t10k")
        for k in ("images-idx3", "labels-idx1")
        if not Path(root, f"{p}-{k}-ubyte.gz").is_file()
    ]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files {missing} not found in {root}. Install them with: {INSTALL_HINT}")
    log.info("loading Fashion-MNIST from %s", root)
    return _read_files(str(root.resolve()))


class FashionMNISTDataModule(InMemoryDataModule):
    """Fashion-MNIST clothing images; batches are ``(x (B,1,28,28) float32, y (B,) int64)``.

    Splits: train 55k and val 5k (a seeded hold-out of the 60k training file), test 10k; ``predict`` = test.
    Pixels are scaled to ``[0, 1]`` and, with ``normalize``, standardised with the mean/std of the 55k
    training images (stored as ``self.mean`` / ``self.std`` after ``setup``; about 0.286 / 0.353).

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        normalize: standardise with the training mean/std; ``False`` keeps ``[0, 1]``.
        limit_train: keep a seeded subset of this many training samples (``None``: all).
        limit_val: same for val.
        limit_test: same for test.
        val_size: how many training images to hold out as validation (0 < val_size < 60000).
        seed: seed of the hold-out and of the subsets.
        root: folder of the idx files (default ``/usr/share/datasets/fashion-mnist``).
        shuffle_train: shuffle the training loader.
        drop_last: drop the last incomplete training batch.
    """

    num_classes = 10
    input_shape = (1, 28, 28)
    classes = CLASSES

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        normalize: bool = True,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        val_size: int = 5000,
        seed: int = 0,
        root: str | None = None,
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
        if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 < val_size < 60000:
            raise ValueError(f"val_size must be an int in (0, 60000), got {val_size!r}")
        self.normalize = bool(normalize)
        self.val_size = val_size
        self.root = root
        self.mean: float | None = None
        self.std: float | None = None

    def load_splits(self) -> Mapping[str, Split]:
        """Read the idx files, hold out the validation split, scale and normalise."""
        raw = load_fashion_mnist(self.root)
        x_all, y_all = raw["train"]
        n = x_all.shape[0]
        train_idx, val_idx = seeded_split(n, (n - self.val_size, self.val_size), self.seed)
        splits = {
            "train": (x_all[train_idx], y_all[train_idx]),
            "val": (x_all[val_idx], y_all[val_idx]),
            "test": raw["test"],
        }
        out = {k: (x.float().div_(255.0), y) for k, (x, y) in splits.items()}
        if self.normalize:
            x_train = out["train"][0]
            self.mean = float(x_train.mean())
            self.std = float(x_train.std())
            out = {k: ((x - self.mean) / self.std, y) for k, (x, y) in out.items()}
        return out
