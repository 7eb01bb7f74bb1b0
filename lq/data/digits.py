"""scikit-learn's 8x8 handwritten digits (1797 images, bundled with scikit-learn): the fastest real data set."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import torch

from lq.data.base import InMemoryDataModule, Split, seeded_split

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install scikit-learn"


@functools.lru_cache(maxsize=1)
def load_digits_tensors() -> Split:
    """Return all 1797 digits: images ``(1797, 1, 8, 8)`` float32 in ``[0, 1]`` (pixel/16), labels int64.

    Raises:
        ImportError: scikit-learn is missing; the message names the install command.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(f"the digits data set needs scikit-learn. Install it with: {INSTALL_HINT}") from e
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.int64)
    return x, y


class DigitsDataModule(InMemoryDataModule):
    """sklearn's 8x8 digits; batches are ``(x (B,1,8,8) float32, y (B,) int64)``.

    A seeded split of the 1797 images: test ``test_fraction``, val ``val_fraction``, train the rest (with the
    defaults 1258 / 180 / 359). ``normalize`` standardises with the training mean/std (``self.mean``/``self.std``).

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        normalize: standardise with the training mean/std; ``False`` keeps ``[0, 1]``.
        limit_train: keep a seeded subset of this many training samples (``None``: all).
        limit_val: same for val.
        limit_test: same for test.
        val_fraction: share of the data held out for validation.
        test_fraction: share of the data held out for test.
        seed: seed of the split and of the subsets.
        shuffle_train: shuffle the training loader.
        drop_last: drop the last incomplete training batch.
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        normalize: bool = True,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
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
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < float(frac) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {frac!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
        self.normalize = bool(normalize)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.mean: float | None = None
        self.std: float | None = None

    def load_splits(self) -> Mapping[str, Split]:
        """Split the 1797 digits with the seed and normalise (if asked)."""
        x, y = load_digits_tensors()
        n = x.shape[0]
        n_test = round(n * self.test_fraction)
        n_val = round(n * self.val_fraction)
        train_idx, val_idx, test_idx = seeded_split(n, (n - n_val - n_test, n_val, n_test), self.seed)
        out = {
            "train": (x[train_idx], y[train_idx]),
            "val": (x[val_idx], y[val_idx]),
            "test": (x[test_idx], y[test_idx]),
        }
        if self.normalize:
            self.mean = float(out["train"][0].mean())
            self.std = float(out["train"][0].std())
            out = {k: ((xi - self.mean) / self.std, yi) for k, (xi, yi) in out.items()}
        return out
