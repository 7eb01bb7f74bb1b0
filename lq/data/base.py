"""In-memory LightningDataModule base shared by the real data sets (MNIST, Fashion-MNIST, digits).

Every split lives in memory as a :class:`~torch.utils.data.TensorDataset` of float32 images ``(N, C, H, W)``
and int64 labels ``(N,)``. Subsampling (``limit_*``) is a seeded random subset, so a limited split is the same
on every run and on every rank, and still has all classes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger(__name__)

#: Split names every data module in :mod:`lq.data` serves.
SPLITS: tuple[str, ...] = ("train", "val", "test")

Split = tuple[torch.Tensor, torch.Tensor]


def check_split(split: str) -> str:
    """Return ``split`` if it is one of :data:`SPLITS` ("predict" maps to "test"), else raise ``ValueError``."""
    if split == "predict":
        return "test"
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or 'predict', got {split!r}")
    return split


def check_limit(name: str, value: int | None) -> int | None:
    """Validate a ``limit_*`` argument: ``None`` (use everything) or a positive int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be None or a positive int, got {value!r}")
    return value


def seeded_subset(x: torch.Tensor, y: torch.Tensor, limit: int | None, seed: int) -> Split:
    """Keep ``limit`` samples chosen by a seeded permutation (original order preserved); all if ``limit`` is None.

    The same ``(limit, seed)`` always gives the same samples. ``limit`` larger than the split keeps everything.
    """
    n = x.shape[0]
    if limit is None or limit >= n:
        return x, y
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:limit].sort().values
    return x[idx], y[idx]


def seeded_split(n: int, sizes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Partition ``range(n)`` into consecutive chunks of ``sizes`` of one seeded permutation (sorted indices)."""
    if sum(sizes) != n:
        raise ValueError(f"split sizes {sizes} do not add up to {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for s in sizes:
        out.append(perm[start : start + s].sort().values)
        start += s
    return out


class InMemoryDataModule(L.LightningDataModule):
    """A LightningDataModule whose splits are tensors loaded once into memory.

    Subclasses implement :meth:`load_splits`, returning the full (unlimited) ``{"train", "val", "test"}``
    tensors, already shaped ``(N, C, H, W)`` float32 and normalised as the subclass documents. This class
    applies the ``limit_*`` subsampling and builds the data loaders. ``predict`` serves the test split.

    Args:
        batch_size: samples per batch for every loader.
        num_workers: DataLoader workers (0 = load in the main process; the data is in memory anyway).
        limit_train: keep only this many training samples (seeded subset); ``None`` keeps all.
        limit_val: same for the validation split.
        limit_test: same for the test (and predict) split.
        seed: seed of the subsets and of any held-out split.
        shuffle_train: shuffle the training loader (``lightning.seed_everything`` makes it reproducible).
        drop_last: drop the last incomplete training batch.
    """

    #: number of classes; subclasses set it
    num_classes: int = 10
    #: shape of one sample ``(C, H, W)``; subclasses set it
    input_shape: tuple[int, int, int] = (1, 28, 28)

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        seed: int = 0,
        shuffle_train: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.limits: dict[str, int | None] = {
            "train": check_limit("limit_train", limit_train),
            "val": check_limit("limit_val", limit_val),
            "test": check_limit("limit_test", limit_test),
        }
        self.seed = int(seed)
        self.shuffle_train = bool(shuffle_train)
        self.drop_last = bool(drop_last)
        self._splits: dict[str, Split] | None = None
        self.datasets: dict[str, TensorDataset] = {}

    # --- to implement -------------------------------------------------------------------------------------
    def load_splits(self) -> Mapping[str, Split]:
        """Return the full ``{"train", "val", "test"}`` splits as ``(images, labels)`` tensors."""
        raise NotImplementedError

    def subset_seed(self, split: str) -> int:
        """Seed of the ``limit_*`` subset of ``split``: a different offset per split, so limited splits are
        independent draws. Subclasses whose split is a copy of another return that split's seed."""
        return self.seed + 1000 * (SPLITS.index(split) + 1)

    # --- Lightning hooks ----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to download: the data ships in a package. Loading here fails early if it is missing."""
        self._ensure_loaded()

    def setup(self, stage: str | None = None) -> None:
        """Load every split into memory (once; later calls are no-ops)."""
        self._ensure_loaded()

    def _ensure_loaded(self) -> None:
        if self._splits is not None:
            return
        full = self.load_splits()
        splits: dict[str, Split] = {}
        for name in SPLITS:
            x, y = full[name]
            x, y = seeded_subset(x, y, self.limits[name], self.subset_seed(name))
            splits[name] = (x.contiguous(), y.contiguous())
            self.datasets[name] = TensorDataset(*splits[name])
        self._splits = splits
        log.info(
            "%s: %s",
            type(self).__name__,
            ", ".join(f"{k}={v[0].shape[0]}" for k, v in splits.items()),
        )

    def split_tensors(self, split: str) -> Split:
        """Return ``(images, labels)`` of one split (``"train"``, ``"val"``, ``"test"`` or ``"predict"``)."""
        split = check_split(split)
        self._ensure_loaded()
        assert self._splits is not None
        return self._splits[split]

    def _loader(self, split: str, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        self._ensure_loaded()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``(x, y)``."""
        return self._loader("train", shuffle=self.shuffle_train, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        """Validation batches ``(x, y)`` in a fixed order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches ``(x, y)`` in a fixed order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split, in a fixed order (batches are ``(x, y)``; ``predict_step`` ignores ``y``)."""
        return self._loader("test")
