"""``LitClassifier``: the plain image-classification LightningModule a user would write, used by the tests,
benchmarks and Hydra recipes as the "unmodified user module" the lq callbacks must work on."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from lq.models.registry import ARCHITECTURES, build_model

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "none")


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` / ``[x, y]`` / ``{"x"|"image"|"input": x, "y"|"label"|"target": y}`` / ``x`` -> ``(x, y or None)``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("x", "image", "images", "input", "inputs") if k in batch), None)
        y = next((batch[k] for k in ("y", "label", "labels", "target", "targets") if k in batch), None)
        if x is None:
            raise ValueError(f"cannot find the input in a batch with keys {sorted(batch)}")
        return x, y
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"unsupported batch type {type(batch).__name__}; expected (x, y), a dict or a tensor")


def _to_plain(obj: Any) -> Any:
    """Turn OmegaConf containers (what Hydra passes) into plain dicts/lists, so the saved hyperparameters
    load with ``weights_only=True`` and print cleanly. Tuples stay tuples."""
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to_plain(v) for v in obj)
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_to_plain(v) for v in obj]
    return obj


class LitClassifier(L.LightningModule):
    """Cross-entropy classifier around any ``nn.Module`` that maps a batch of inputs to logits.

    Logs ``train_loss`` (every step) and ``train_acc`` (epoch), ``val_loss`` / ``val_acc`` (epoch, progress
    bar) and ``test_loss`` / ``test_acc``. ``predict_step`` returns logits. Batches are ``(x, y)``.

    The wrapped module is ``self.model`` (layer names ``model.<...>``). Hyperparameters are saved without the
    module, so a checkpoint loads back either with ``LitClassifier.load_from_checkpoint(path, model=net)`` or,
    when the module was built from ``arch``, with plain ``LitClassifier.load_from_checkpoint(path)``.

    Args:
        model: the network. If ``None``, it is built as ``build_model(arch, **arch_kwargs)``. When both are
            given, ``model`` wins (this is what ``load_from_checkpoint(path, model=...)`` does).
        lr: learning rate (peak of the cosine schedule).
        optimizer: ``"sgd"`` (momentum, weight decay) or ``"adamw"``.
        momentum: SGD momentum, in ``[0, 1)``; unused by AdamW.
        weight_decay: L2 / decoupled weight decay, ``>= 0``.
        max_epochs_hint: epochs of the cosine schedule. ``None``: follow the trainer (``max_epochs`` epochs,
            or per step over ``trainer.estimated_stepping_batches`` when the run is bounded by ``max_steps``).
        scheduler: ``"cosine"`` (``CosineAnnealingLR`` down to 0) or ``"none"``.
        num_classes: classes of the accuracy metrics.
        arch: name of a registered architecture: ``"mnist_cnn"``, ``"small_cnn"``, ``"small_resnet"``, ``"mlp"``.
        arch_kwargs: keyword arguments of the architecture, e.g. ``{"width": 16}``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        lr: float = 0.1,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        max_epochs_hint: int | None = None,
        scheduler: str = "cosine",
        num_classes: int = 10,
        arch: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if max_epochs_hint is not None and (
            isinstance(max_epochs_hint, bool) or not isinstance(max_epochs_hint, int) or max_epochs_hint <= 0
        ):
            raise ValueError(f"max_epochs_hint must be None or a positive int, got {max_epochs_hint!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if arch is not None and arch not in ARCHITECTURES:
            raise ValueError(f"arch must be None or one of {sorted(ARCHITECTURES)}, got {arch!r}")
        if arch_kwargs is not None and not isinstance(arch_kwargs, Mapping):
            raise ValueError(f"arch_kwargs must be a dict or None, got {type(arch_kwargs).__name__}")
        arch_kwargs = None if arch_kwargs is None else _to_plain(arch_kwargs)  # saved below as a plain dict
        self.save_hyperparameters(ignore=["model"])
        if model is None:
            if arch is None:
                raise ValueError(
                    "LitClassifier needs a model: pass model=<nn.Module> or arch=<name> with one of "
                    f"{sorted(ARCHITECTURES)} (a checkpoint saved without arch loads with "
                    "LitClassifier.load_from_checkpoint(path, model=<nn.Module>))"
                )
            model = build_model(arch, **dict(arch_kwargs or {}))
        elif not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped model."""
        return self.model(x)

    def _step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = _split_batch(batch)
        if y is None:
            raise ValueError("training/validation/test batches need labels: (x, y)")
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy loss; logs ``train_loss`` (step) and ``train_acc`` (epoch)."""
        loss, logits, y = self._step(batch)
        self.train_acc(logits.detach(), y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Logs ``val_loss`` and ``val_acc`` (epoch means, on the progress bar)."""
        loss, logits, y = self._step(batch)
        self.val_acc(logits, y)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True)
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Logs ``test_loss`` and ``test_acc``."""
        loss, logits, y = self._step(batch)
        self.test_acc(logits, y)
        self.log("test_loss", loss, on_epoch=True)
        self.log("test_acc", self.test_acc, on_epoch=True, prog_bar=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Logits ``(B, num_classes)``; labels in the batch are ignored."""
        x, _ = _split_batch(batch)
        return self(x)

    def _cosine_horizon(self) -> tuple[int, str] | None:
        """``(T_max, interval)`` of the cosine schedule, or ``None`` when the run length is unknown."""
        hp = self.hparams
        if hp.max_epochs_hint is not None:
            return int(hp.max_epochs_hint), "epoch"
        trainer = self._trainer
        if trainer is None:
            return None
        max_epochs = trainer.max_epochs
        if (trainer.max_steps is not None and trainer.max_steps > 0) or max_epochs is None or max_epochs < 0:
            steps = trainer.estimated_stepping_batches
            if not math.isfinite(steps) or steps <= 0:
                return None
            return int(steps), "step"
        return int(max_epochs), "epoch"

    def configure_optimizers(self) -> Any:
        """SGD (momentum, weight decay) or AdamW, plus a cosine schedule over the run unless ``scheduler="none"``."""
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return opt
        horizon = self._cosine_horizon()
        if horizon is None:
            log.warning("LitClassifier: run length unknown (no max_epochs/max_steps/max_epochs_hint); no LR schedule")
            return opt
        t_max, interval = horizon
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, t_max))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}
