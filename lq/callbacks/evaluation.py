"""Measuring a metric of the current (partly) quantized model from inside a callback.

The metric is the one the user's ``validation_step`` already logs, computed by a private, silent Trainer
running ``validate`` on the same module and loader (the outer Trainer's loop is left untouched). Silent: no
progress bar, summary or logger, and none of Lightning's info banners ("GPU available: ...", "TPU available",
the logger tip), which a sensitivity sweep would otherwise print once per layer (``quiet_lightning``). Where the
module logs nothing, the fallback metric is agreement with the fp32 model's outputs: top-1 agreement for
class scores, cosine similarity otherwise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lq.batches import forward_batch
from lq.workflow import quantization_disabled

log = logging.getLogger(__name__)


def _accelerator(device: torch.device) -> tuple[str, Any]:
    if device.type == "cuda":
        return "gpu", [device.index or 0]
    if device.type == "mps":
        return "mps", 1
    return "cpu", 1


#: the loggers Lightning's ``rank_zero_info`` banners go through (the Trainer's device lines and tips; Fabric's
#: and Lightning's own ``rank_zero`` modules, and the CUDA accelerator's "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES")
BANNER_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.accelerators.cuda",
)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Drop Lightning's info messages (warnings still pass) while a nested Trainer is built and run; each
    logger's own level is put back afterwards, so the user's run logs as before."""
    loggers = [logging.getLogger(name) for name in BANNER_LOGGERS]
    previous = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            if lg.getEffectiveLevel() < logging.WARNING:
                lg.setLevel(logging.WARNING)
        yield
    finally:
        for lg, level in zip(loggers, previous):
            lg.setLevel(level)


def logged_metrics(pl_module: pl.LightningModule, loader: Any, limit_batches: int | float = 1.0) -> dict[str, float]:
    """Run the module's validation_step over ``loader`` in a private Trainer; the logged metrics."""
    outer = pl_module._trainer  # noqa: SLF001 - restored below, the outer run must not notice
    device = pl_module.device
    was_training = pl_module.training
    accelerator, devices = _accelerator(device)
    limits = {} if limit_batches == 1.0 else {"limit_val_batches": limit_batches}
    try:
        with quiet_lightning():
            trainer = pl.Trainer(
                accelerator=accelerator,
                devices=devices,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[],
                **limits,
            )
            results = trainer.validate(pl_module, dataloaders=loader, verbose=False)
    finally:
        pl_module._trainer = outer  # noqa: SLF001
        pl_module.to(device)
        pl_module.train(was_training)
    merged: dict[str, float] = {}
    for r in results:
        merged.update({k: float(v) for k, v in r.items()})
    return merged


def _outputs(model: nn.Module, loader: Any, limit_batches: int | None) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if limit_batches is not None and i >= limit_batches:
                break
            out = forward_batch(model, batch)
            if isinstance(out, (tuple, list)):
                out = out[0]
            elif isinstance(out, dict):
                out = next(v for v in out.values() if isinstance(v, torch.Tensor))
            outs.append(out.detach().float())
    return outs


def fp32_agreement(model: nn.Module, loader: Any, limit_batches: int | None = None) -> Callable[[nn.Module], float]:
    """An evaluate(model) -> float measuring agreement with the fp32 outputs on ``loader``.

    Class scores (2-D outputs): the fraction of samples whose argmax equals the fp32 argmax. Anything else:
    the mean cosine similarity between flattened per-sample outputs.
    """
    was_training = model.training
    model.eval()
    with quantization_disabled(model):
        reference = _outputs(model, loader, limit_batches)
    model.train(was_training)
    if not reference:
        raise ValueError("the validation data is empty: cannot compare against fp32 outputs")

    def evaluate(m: nn.Module) -> float:
        was = m.training
        m.eval()
        outs = _outputs(m, loader, limit_batches)
        m.train(was)
        ref, out = torch.cat([r.flatten(1) if r.dim() > 1 else r[:, None] for r in reference]), torch.cat(
            [o.flatten(1) if o.dim() > 1 else o[:, None] for o in outs]
        )
        if reference[0].dim() == 2 and reference[0].shape[1] > 1:
            return (ref.argmax(1) == out.argmax(1)).float().mean().item()
        return torch.nn.functional.cosine_similarity(ref, out, dim=1).mean().item()

    return evaluate


def metric_evaluator(
    pl_module: pl.LightningModule, loader: Any, monitor: str | None, limit_batches: int | float = 1.0
) -> tuple[Callable[[nn.Module], float], str]:
    """(evaluate, what) for the monitored metric, or the fp32-agreement fallback if nothing is logged.

    Raises ValueError when ``monitor`` is never logged but other metrics are, listing them.
    """
    if loader is None:
        raise ValueError("no validation data: give the Trainer a val dataloader (or the datamodule one)")
    with quantization_disabled(pl_module):
        probe = logged_metrics(pl_module, loader, limit_batches)
    if monitor is not None and monitor in probe:

        def evaluate(m: nn.Module) -> float:
            return logged_metrics(m, loader, limit_batches)[monitor]

        return evaluate, monitor
    if probe:
        raise ValueError(
            f"monitor={monitor!r} is never logged by validation_step; logged keys: {sorted(probe)}. "
            "Pass one of them as monitor="
        )
    log.warning("lq: validation_step logs no metric; measuring agreement with the fp32 outputs instead")
    limit = None if isinstance(limit_batches, float) else int(limit_batches)
    return fp32_agreement(pl_module, loader, limit), "fp32_agreement"
