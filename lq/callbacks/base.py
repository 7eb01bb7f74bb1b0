"""What the lq callbacks share: swapping layers in ``setup``, calibrating, and checkpoint state.

Lightning facts this follows (DESIGN.md): layers are swapped in ``setup`` (before ``configure_optimizers``
and DDP wrapping; the swap keeps the Parameter objects); ``pl_module.forward`` is never replaced; the
checkpoint's ``state_dict`` stays float-compatible while the quantizer state lives in this callback's own
section and is re-applied in ``on_load_checkpoint``, after the Trainer restored the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lq.checkpoint import STATE_MARKER, apply_quantizer_state, quantizer_state, strip_quantizer_keys
from lq.cpu_memory import keep_freed_cpu_memory
from lq.nn.swap import quantization_report, quantize, quantized_layers
from lq.quant.config import QuantConfig
from lq.workflow import calibrate, quantizers

from lq.callbacks.loaders import train_loader


class _Progress(Iterable):
    """Wraps a loader with a progress bar (rich/tqdm from Lightning's own dependencies) on rank zero."""

    def __init__(self, loader: Iterable, trainer: pl.Trainer, desc: str, total: int | None) -> None:
        self.loader, self.trainer, self.desc, self.total = loader, trainer, desc, total

    def __iter__(self) -> Iterator:
        show = self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None
        if not show:
            yield from self.loader
            return
        from tqdm.auto import tqdm

        with tqdm(total=self.total, desc=self.desc, unit="sample", leave=False, dynamic_ncols=True) as bar:
            for batch in self.loader:
                yield batch
                first = batch[0] if isinstance(batch, (list, tuple)) else batch
                bar.update(int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1)


def cpu_memory_for(trainer: pl.Trainer) -> None:
    """On CPU, keep freed blocks in the heap (``lq.cpu_memory``): quantized steps allocate more large tensors."""
    if trainer.strategy.root_device.type == "cpu":
        keep_freed_cpu_memory()


class QuantizationCallback(Callback):
    """Base of Int8PTQ / Int8QAT / Int8Sensitivity. Not used directly.

    Args:
        config: what and how to quantize (``lq.QuantConfig``; default = the paper's recommendation).
        num_samples: calibration samples (paper Appendix A: 1024 for CNNs).
        calibration_data: a DataLoader / iterable / ``forward_loop(model)`` to calibrate on; default: the
            run's training dataloader.
    """

    def __init__(
        self,
        config: QuantConfig | None = None,
        num_samples: int = 1024,
        calibration_data: Iterable | Callable | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            config = QuantConfig()
        if isinstance(config, dict) or hasattr(config, "items"):
            config = QuantConfig(**dict(config))
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be an lq.QuantConfig, got {type(config).__name__}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.config = config
        self.num_samples = num_samples
        self.calibration_data = calibration_data
        self._restored = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config=repr(self.config))

    # ------------------------------------------------------------------------------------- swapping
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        cpu_memory_for(trainer)
        if not quantized_layers(pl_module):
            quantize(pl_module, self.config)
            rank_zero_info(str(quantization_report(pl_module)))
        self._module = pl_module

    # ---------------------------------------------------------------------------------- calibration
    @staticmethod
    def is_calibrated(pl_module: pl.LightningModule) -> bool:
        return all(q.is_calibrated for q in quantizers(pl_module).values() if q.mode == "quantize" and not q.dynamic)

    def _calibration_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule, fallback: Any = None) -> Any:
        data = self.calibration_data if self.calibration_data is not None else train_loader(trainer, pl_module)
        if data is None:
            data = fallback
        if data is None:
            raise ValueError(
                f"{type(self).__name__}: no data to calibrate on: the run has no train dataloader. Pass "
                "calibration_data=<DataLoader> (training samples, paper Appendix A) to the callback"
            )
        return data

    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, data: Any, **kwargs: Any) -> None:
        """lq.calibrate on ``data`` with a progress bar; eval mode and no_grad inside, train mode restored."""
        if not callable(data) or isinstance(data, Iterable):
            data = _Progress(data, trainer, f"{type(self).__name__}: calibrating", self.num_samples)
        calibrate(pl_module, data, num_samples=self.num_samples, **kwargs)
        rank_zero_info(f"{type(self).__name__}: calibrated {len(quantized_layers(pl_module))} layers")

    # ---------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        module = getattr(self, "_module", None)
        return quantizer_state(module) if module is not None and quantized_layers(module) else {}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Keep state_dict float-compatible: Module.load_from_checkpoint must load it strictly (#6457).
        strip_quantizer_keys(pl_module, checkpoint["state_dict"])

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:  # written by a callback with another key (other config): any lq state will do
            state = next((v for v in checkpoint.get("callbacks", {}).values() if STATE_MARKER in v), None)
        if state:
            apply_quantizer_state(pl_module, state)
            self._restored = True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied in on_load_checkpoint, which has the module
        pass
