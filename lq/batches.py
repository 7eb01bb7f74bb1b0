"""Feeding a batch of unknown shape to a model: the convention lq uses when it runs forward passes itself
(calibration, sensitivity) on a DataLoader the user already has."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: dict keys that are targets, not model inputs
_TARGET_KEYS = ("label", "labels", "target", "targets", "y")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch) if not hasattr(batch, "_fields") else batch
    return batch


def model_inputs(batch: Any) -> tuple[tuple, dict]:
    """(args, kwargs) for ``model(*args, **kwargs)``: a tensor is the input; a tuple/list ``(x, y, ...)``
    gives ``x``; a dict gives its non-target entries as keyword arguments."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in _TARGET_KEYS}
    if isinstance(batch, (list, tuple)) and len(batch) > 0:
        return (batch[0],), {}
    raise TypeError(
        f"cannot feed a batch of type {type(batch).__name__} to the model; pass a forward_loop(model) "
        "callable instead of a data loader"
    )


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        n = batch_size(v) if isinstance(v, (torch.Tensor, Mapping, list, tuple)) else 0
        if n:
            return n
    return 1


def forward_batch(model: nn.Module, batch: Any) -> Any:
    args, kwargs = model_inputs(to_device(batch, model_device(model)))
    return model(*args, **kwargs)
