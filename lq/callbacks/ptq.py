"""``Int8PTQ``: post-training quantization as a Lightning callback (paper Section 4 and 6, "PTQ").

    trainer = Trainer(callbacks=[Int8PTQ()])
    trainer.test(model, datamodule=dm)      # the int8 (fake-quant) accuracy in one line

Swaps the layers in ``setup``, calibrates at the start of the stage (fit, validate, test or predict) on
training data, and leaves the training schedule alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl

from lq.callbacks.base import QuantizationCallback
from lq.callbacks.export import export_after_fit
from lq.callbacks.evaluation import metric_evaluator
from lq.callbacks.loaders import stage_loader, val_loader
from lq.extras import import_extra
from lq.quant.config import CALIBRATORS, QuantConfig

#: ``method=`` values, spelled out so LightningCLI (jsonargparse) rejects a typo when it parses the YAML;
#: the same names as ``lq.quant.config.CALIBRATORS`` (tests/test_lightning_cli.py checks they agree).
CalibratorName = Literal["max", "entropy", "percentile", "mse", "auto", "layerwise"]


class Int8PTQ(QuantizationCallback):
    """Quantize and calibrate a LightningModule without changing how it trains.

    Args:
        config: ``lq.QuantConfig`` (default: per-channel max weights, per-tensor activations calibrated per layer
            without labels, calibrator "layerwise").
        num_samples: calibration samples (1024, paper Appendix A).
        calibration_data: DataLoader / iterable / ``forward_loop(model)``; default: the training loader.
        method: override the activation calibrator ("max", "entropy", "percentile", "mse", "auto").
        monitor, mode: the validation metric "auto" maximises (or minimises with ``mode="min"``).
        export_onnx: at the end of fit, write the quantized model as ONNX with Q/DQ nodes to this path
            (``lq.export_onnx``; the example input is one sample of the training data; needs
            ``pip install 'lq[onnx]'``, checked here rather than after the fit).
        onnx_runtime: the form of the ONNX graph (``lq.export_onnx``'s ``runtime``): ``"tensorrt"`` (int8 Q/DQ)
            or ``"onnxruntime"`` (the form onnxruntime fuses into QLinearConv / QGemm).
        export_converted: at the end of fit, save a converted int8 copy of the model (``lq.convert``) with
            ``torch.save`` to this path (load it with ``torch.load(path, weights_only=False)``).
        cpu_malloc: on CPU, keep freed malloc blocks for reuse from setup to teardown (process-wide, so off by
            default; see ``lq.cpu_memory``).
    """

    def __init__(
        self,
        config: QuantConfig | None = None,
        num_samples: int = 1024,
        calibration_data: Iterable | Callable | None = None,
        method: CalibratorName | None = None,
        monitor: str | None = "val_acc",
        mode: Literal["max", "min"] = "max",
        export_onnx: str | None = None,
        export_converted: str | None = None,
        cpu_malloc: bool = False,
        onnx_runtime: Literal["tensorrt", "onnxruntime"] = "tensorrt",
    ) -> None:
        super().__init__(config, num_samples, calibration_data, cpu_malloc=cpu_malloc)
        if onnx_runtime not in ("tensorrt", "onnxruntime"):
            raise ValueError(f"onnx_runtime must be 'tensorrt' or 'onnxruntime', got {onnx_runtime!r}")
        self.onnx_runtime = onnx_runtime
        if export_onnx is not None:
            import_extra("onnx", f"{type(self).__name__}(export_onnx=...)")
        self.export_onnx = export_onnx
        self.export_converted = export_converted
        if method is not None and method not in CALIBRATORS:
            raise ValueError(f"method must be one of {CALIBRATORS} or None, got {method!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.method = method
        self.monitor = monitor
        self.mode = mode

    @property
    def wants_auto(self) -> bool:
        return self.method == "auto" or (self.method is None and self.config.activation.calibrator == "auto")

    def _calibrate_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage_data: Any = None) -> None:
        if self._restored or self.is_calibrated(pl_module):
            return
        try:
            data = self._calibration_source(trainer, pl_module)
        except (ValueError, AttributeError, RuntimeError):
            if stage_data is None:
                raise
            warnings.warn(
                f"{type(self).__name__}: no training data available in this stage; calibrating on the stage's "
                "own data. Pass calibration_data=<train DataLoader> to calibrate on training samples",
                stacklevel=2,
            )
            data = stage_data
        kwargs: dict[str, Any] = {"method": self.method}
        if self.wants_auto:
            evaluate, _ = metric_evaluator(pl_module, val_loader(trainer, pl_module) or stage_data, self.monitor)
            kwargs["evaluate"] = evaluate if self.mode == "max" else (lambda m: -evaluate(m))
        self.calibrate(trainer, pl_module, data, **kwargs)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrate_once(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and (self.export_onnx or self.export_converted):
            export_after_fit(trainer, pl_module, self.export_onnx, self.export_converted, self.onnx_runtime)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._calibrate_once(trainer, pl_module, stage_loader(trainer, "validate"))

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrate_once(trainer, pl_module, stage_loader(trainer, "test"))

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrate_once(trainer, pl_module, stage_loader(trainer, "predict"))
