"""Getting a stage's DataLoader from inside a callback, before Lightning has loaded it.

At ``on_fit_start`` ``trainer.train_dataloader`` is not loaded yet (DESIGN.md): ask the source the Trainer
will use (dataloaders passed to ``fit``, the datamodule, or the module's hook) directly.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def _first(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)) and loaders and not hasattr(loaders, "_fields"):
        return loaders[0]
    if isinstance(loaders, dict) and loaders:
        return next(iter(loaders.values()))
    return loaders


def train_loader(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """The training DataLoader (first one if there are several), or None if the run has none."""
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    loader = None
    if source is not None and source.instance is not None and source.is_defined():
        loader = source.dataloader()
    elif trainer.datamodule is not None and _overridden(trainer.datamodule, "train_dataloader"):
        loader = trainer.datamodule.train_dataloader()
    elif _overridden(pl_module, "train_dataloader"):
        loader = pl_module.train_dataloader()
    return _first(loader)


def val_loader(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """The validation DataLoader the run uses (loaded or not yet), or None."""
    if trainer.val_dataloaders is not None:
        return _first(trainer.val_dataloaders)
    loop = trainer.validate_loop if trainer.state.fn == "validate" else trainer.fit_loop.epoch_loop.val_loop
    source = getattr(loop, "_data_source", None)
    if source is not None and source.instance is not None and source.is_defined():
        return _first(source.dataloader())
    if trainer.datamodule is not None and _overridden(trainer.datamodule, "val_dataloader"):
        return _first(trainer.datamodule.val_dataloader())
    if _overridden(pl_module, "val_dataloader"):
        return _first(pl_module.val_dataloader())
    return None


def stage_loader(trainer: pl.Trainer, stage: str) -> Any:
    """The already-loaded loader of an evaluation stage (validate / test / predict)."""
    attr = {"validate": "val_dataloaders", "test": "test_dataloaders", "predict": "predict_dataloaders"}[stage]
    return _first(getattr(trainer, attr, None))


def _overridden(obj: Any, hook: str) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    try:
        return is_overridden(hook, obj)
    except (ValueError, AttributeError):
        return False
