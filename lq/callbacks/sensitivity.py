"""``Int8Sensitivity``: per-layer sensitivity and partial quantization during validation (Section 5.1).

    trainer = Trainer(callbacks=[Int8Sensitivity(monitor="val_acc", target=0.01)])
    trainer.validate(model, datamodule=dm)
    cb.report.ranking(), cb.result.skipped

Quantizes one layer at a time on the validation batches, ranks the layers by the monitored metric (the one
``validation_step`` already logs; agreement with fp32 outputs where none is logged), and keeps the smallest
set of most-sensitive layers in float so the metric is within ``target`` (relative) of fp32. Logs a table
and a bar chart (the paper's Fig. 3) to the trainer's loggers and saves the chart as PNG in the log dir
(the chart needs matplotlib, ``pip install 'lq[plots]'``; without it the table and scalars are logged).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lq.callbacks.base import progress_enabled
from lq.callbacks.evaluation import metric_evaluator
from lq.callbacks.loaders import val_loader
from lq.callbacks.ptq import Int8PTQ
from lq.plots import log_sensitivity
from lq.quant.config import QuantConfig
from lq.workflow import PartialQuantization, SensitivityReport, partial_quantize, sensitivity, set_quantization

log = logging.getLogger(__name__)


class Int8Sensitivity(Int8PTQ):
    """Sensitivity analysis + partial quantization on the validation data, once per run by default.

    Args:
        monitor: the logged validation metric to rank by (e.g. "val_acc").
        mode: "max" if higher is better, "min" otherwise.
        target: allowed relative drop vs fp32 after partial quantization (0.01 = 1%, paper Table 6).
        apply: turn the skipped layers' quantization off (partial quantization); False only reports.
        limit_batches: validation batches per evaluation (int count or float fraction).
        config, num_samples, calibration_data: as in ``Int8PTQ`` (used if no other lq callback quantized
            and calibrated the model first).
        cpu_malloc: as in ``Int8PTQ`` (process-wide malloc setting on CPU, off by default).
    """

    def __init__(
        self,
        monitor: str | None = "val_acc",
        mode: Literal["max", "min"] = "max",
        target: float = 0.01,
        apply: bool = True,
        limit_batches: int | float = 1.0,
        config: QuantConfig | None = None,
        num_samples: int = 1024,
        calibration_data: Iterable | Callable | None = None,
        cpu_malloc: bool = False,
    ) -> None:
        super().__init__(config, num_samples, calibration_data, None, monitor, mode, cpu_malloc=cpu_malloc)
        if not 0 <= target < 1:
            raise ValueError(f"target is a relative drop in [0, 1), e.g. 0.01, got {target!r}")
        self.target = float(target)
        self.apply = bool(apply)
        self.limit_batches = limit_batches
        self.report: SensitivityReport | None = None
        self.result: PartialQuantization | None = None
        self.metric_name: str | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.report is not None:
            return
        if not self.is_calibrated(pl_module):
            self._calibrate_once(trainer, pl_module, val_loader(trainer, pl_module))
        evaluate, self.metric_name = metric_evaluator(
            pl_module, val_loader(trainer, pl_module), self.monitor, self.limit_batches
        )
        mode = self.mode if self.metric_name == self.monitor else "max"
        show = progress_enabled(trainer)  # one bar per loop, the layer as postfix, when the Trainer shows bars
        self.report = sensitivity(pl_module, evaluate, mode=mode, progress=show)
        if self.apply:
            self.result = partial_quantize(
                pl_module, evaluate, target=self.target, mode=mode, report=self.report, progress=show
            )
            # Every rank keeps rank zero's decision (each rank may have seen other validation shards).
            skipped = trainer.strategy.broadcast(self.result.skipped, src=0)
            set_quantization(pl_module, True)
            if skipped:
                set_quantization(pl_module, False, skipped)
            self.result.skipped = list(skipped)
        rank_zero_info(self.summary())
        if trainer.is_global_zero:
            log_sensitivity(trainer, self.report, self.result, self.metric_name)

    def summary(self) -> str:
        """The report as text: fp32 and all-int8 metric, then the 15 most sensitive layers with their drop."""
        r = self.report
        lines = [f"Int8Sensitivity ({self.metric_name}): fp32 {r.fp32:.4f}, all int8 {r.int8:.4f}"]
        lines += [f"  {name:40s} {value:.4f}  ({drop:+.2%})" for name, value, drop in r.rows()[:15]]
        if self.result is not None:
            lines.append(
                f"  partial quantization: {len(self.result.skipped)} layers in float {self.result.skipped} -> "
                f"{self.result.metric:.4f} (target {self.target:.2%}, {'reached' if self.result.reached else 'NOT reached'})"
            )
        return os.linesep.join(lines)
