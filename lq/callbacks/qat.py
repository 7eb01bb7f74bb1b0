"""``Int8QAT``: quantization-aware fine-tuning as a Lightning callback (paper Section 5.2, Appendix A.2).

    trainer = Trainer(max_epochs=1, callbacks=[Int8QAT()])
    trainer.fit(pretrained_module, datamodule=dm)

Swaps the layers in ``setup``, calibrates at ``on_fit_start`` (the best PTQ calibration is a good QAT start;
``calibrator="auto"`` picks it on the validation metric), then fine-tunes with fixed ranges (Section 5.2) or
learned ranges (Section 5.3) under the paper's schedule: every param group starts at ``lr_scale`` x its
base LR and follows a cosine down to ``final_lr_scale`` x that start over the fit's steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.optim.lr_scheduler import LambdaLR

from lq.callbacks.ptq import CalibratorName, Int8PTQ
from lq.schedule import CosineFactor
from lq.quant.config import QuantConfig
from lq.workflow import quantizers

COMPUTE = ("fake", "int8")


class Int8QAT(Int8PTQ):
    """Quantization-aware fine-tuning of an unmodified LightningModule.

    Args:
        config: ``lq.QuantConfig``; set ``activation.learn_range=True`` for PACT/LSQ-style learned ranges.
        num_samples: calibration samples before fine-tuning (1024).
        lr_scale: fine-tuning LR / original LR (paper: 1/100).
        final_lr_scale: final LR / fine-tuning start LR (paper: 1/100).
        range_lr: LR of learned ranges (default: the first param group's fine-tuning LR); never weight decay.
        compute: "fake" (fake quantization) or "int8" (the forward runs real int8 GEMMs, ``lq.ops``).
        calibration_data, method, monitor, mode, export_onnx, export_converted, cpu_malloc, onnx_runtime: as in
            ``Int8PTQ``
            (``cpu_malloc=True`` speeds up CPU fine-tuning: the QAT step allocates more large tensors).
    """

    def __init__(
        self,
        config: QuantConfig | None = None,
        num_samples: int = 1024,
        lr_scale: float = 0.01,
        final_lr_scale: float = 0.01,
        range_lr: float | None = None,
        compute: Literal["fake", "int8"] = "fake",
        calibration_data: Iterable | Callable | None = None,
        method: CalibratorName | None = None,
        monitor: str | None = "val_acc",
        mode: Literal["max", "min"] = "max",
        export_onnx: str | None = None,
        export_converted: str | None = None,
        cpu_malloc: bool = False,
        onnx_runtime: Literal["tensorrt", "onnxruntime"] = "tensorrt",
    ) -> None:
        super().__init__(config, num_samples, calibration_data, method, monitor, mode, export_onnx, export_converted,
                         cpu_malloc=cpu_malloc, onnx_runtime=onnx_runtime)
        for name, v in (("lr_scale", lr_scale), ("final_lr_scale", final_lr_scale)):
            if not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1] (the paper uses 0.01), got {v!r}")
        if range_lr is not None and not range_lr > 0:
            raise ValueError(f"range_lr must be positive, got {range_lr!r}")
        if compute not in COMPUTE:
            raise ValueError(f"compute must be one of {COMPUTE}, got {compute!r}")
        self.lr_scale = float(lr_scale)
        self.final_lr_scale = float(final_lr_scale)
        self.range_lr = range_lr
        self.compute = compute

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.compute == "int8":
            from lq.nn.int8_compute import use_int8_compute
            from lq.ops import Int8ComputeConfig

            # The config's bit widths, so the int8 GEMMs give the fake-quant numbers (eq. 10 == eq. 9).
            config = Int8ComputeConfig(
                act_bits=self.config.activation.bits, weight_bits=self.config.weight.bits, act_scale="static"
            )
            names = use_int8_compute(pl_module, config)
            rank_zero_info(f"Int8QAT: {len(names)} layers run int8 GEMMs with the calibrated input ranges")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # calibrate unless restored from a checkpoint
        if not trainer.optimizers:
            raise ValueError("Int8QAT: configure_optimizers returned no optimizer; QAT fine-tunes with one")
        self._move_ranges_to_own_group(trainer, pl_module)
        self._install_schedule(trainer)

    # ------------------------------------------------------------------------------------ optimizer
    def _move_ranges_to_own_group(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Learned ranges (Section 5.3) get their own param group: own LR, no weight decay."""
        ranges = [q.amax for q in quantizers(pl_module).values() if isinstance(q.amax, torch.nn.Parameter)]
        if not ranges:
            return
        ids = {id(p) for p in ranges}
        opt = trainer.optimizers[0]
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        lr = self.range_lr if self.range_lr is not None else self._base_lr(opt.param_groups[0], 0) * self.lr_scale
        opt.add_param_group({"params": ranges, "lr": lr, "weight_decay": 0.0, "lq_range": True})
        rank_zero_info(f"Int8QAT: {len(ranges)} learned ranges in their own param group (lr={lr:g}, no weight decay)")

    @staticmethod
    def _base_lr(group: dict, index: int) -> float:
        lr = group.get("initial_lr", group.get("lr"))
        if lr is None:
            raise ValueError(
                f"Int8QAT: optimizer param group {index} has no 'lr'; the QAT schedule scales each group's "
                "learning rate (paper Appendix A.2)"
            )
        return float(lr)

    def _install_schedule(self, trainer: pl.Trainer) -> None:
        total = trainer.estimated_stepping_batches
        if total is None or total == float("inf") or total <= 0:
            raise ValueError("Int8QAT needs a finite number of steps for its schedule: set max_epochs or max_steps")
        total = int(total)
        if trainer.lr_scheduler_configs:
            rank_zero_warn(
                f"Int8QAT replaces the {len(trainer.lr_scheduler_configs)} LR scheduler(s) from configure_optimizers "
                f"by the paper's QAT schedule: cosine from {self.lr_scale:g} x base LR to {self.final_lr_scale:g} x "
                f"that, over {total} steps"
            )
        else:
            rank_zero_info(f"Int8QAT: LR schedule = cosine from {self.lr_scale:g} x base LR down to "
                           f"{self.final_lr_scale:g} x that over {total} steps")
        if not trainer.lightning_module.automatic_optimization:
            rank_zero_warn("Int8QAT: manual optimization: call lr_schedulers().step() every step yourself")
        configs = []
        for opt in trainer.optimizers:
            for i, group in enumerate(opt.param_groups):
                start = group["lr"] if group.get("lq_range") else self._base_lr(group, i) * self.lr_scale
                group["lr"] = group["initial_lr"] = start
            scheduler = LambdaLR(opt, CosineFactor(total, self.final_lr_scale))
            configs.append(LRSchedulerConfig(scheduler=scheduler, interval="step", frequency=1, name="lq_qat_lr"))
        trainer.strategy.lr_scheduler_configs = configs
