"""Writing the deployable artefacts at the end of fit: the ONNX Q/DQ graph and a converted int8 model.

With a ``WandbLogger`` among the Trainer's loggers each file written is also a W&B artifact (``lq-onnx-<run
id>``, ``lq-converted-<run id>``, type "model"), and so is the amax table of the exported model (``lq-amax-<run
id>``, type "amax-table", saved as ``lq_amax.csv`` in the run's log dir): ``lq.tracking.log_artifact``."""

from __future__ import annotations

import copy
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lq import tracking
from lq.batches import model_inputs, to_device
from lq.callbacks.loaders import train_loader
from lq.deploy import convert, export_onnx


def _example_input(trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
    loader = train_loader(trainer, pl_module)
    if loader is None:
        raise ValueError("export at the end of fit needs an example input: the run has no train dataloader")
    args, kwargs = model_inputs(next(iter(loader)))
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        raise ValueError("ONNX export at the end of fit supports models with one tensor input; call "
                         "lq.export_onnx(model, example_inputs, path) yourself for others")
    return to_device(args[0][:1], pl_module.device)


def _log_dir(trainer: pl.Trainer) -> str:
    d = getattr(trainer, "log_dir", None) or trainer.default_root_dir
    os.makedirs(d, exist_ok=True)
    return str(d)


def export_after_fit(
    trainer: pl.Trainer, pl_module: pl.LightningModule, onnx_path: str | None, converted_path: str | None,
    onnx_runtime: str = "tensorrt",
) -> None:
    was_training = pl_module.training
    pl_module.eval()
    try:
        if onnx_path:
            os.makedirs(os.path.dirname(os.path.abspath(onnx_path)), exist_ok=True)
            export_onnx(pl_module, _example_input(trainer, pl_module), onnx_path, runtime=onnx_runtime)
            rank_zero_info(f"lq: ONNX model with Q/DQ nodes ({onnx_runtime} form) written to {onnx_path}")
            tracking.log_artifact(trainer.loggers, onnx_path, "lq-onnx", "model",
                                  {"format": "onnx", "qdq": True, "runtime": onnx_runtime})
        if converted_path:
            # convert() works in place: convert a copy so the trained module stays trainable.
            model = copy.deepcopy(pl_module)
            model._trainer = None  # noqa: SLF001 - the copy must not carry the Trainer
            converted = convert(model)
            os.makedirs(os.path.dirname(os.path.abspath(converted_path)), exist_ok=True)
            torch.save(converted, converted_path)
            rank_zero_info(f"lq: converted int8 model saved to {converted_path}")
            tracking.log_artifact(
                trainer.loggers, converted_path, "lq-converted", "model", {"format": "torch.save", "lq.convert": True}
            )
        if tracking.wandb_loggers(trainer.loggers):  # the ranges that go with the exported model
            tracking.log_amax(trainer.loggers, pl_module, _log_dir(trainer))
    finally:
        pl_module.train(was_training)
