"""What the lq callbacks share: swapping layers in ``setup``, calibrating, and checkpoint state.

Lightning facts this follows (DESIGN.md): layers are swapped in ``setup`` (before ``configure_optimizers``
and DDP wrapping; the swap keeps the Parameter objects); ``pl_module.forward`` is never replaced; the
checkpoint's ``state_dict`` stays float-compatible while the quantizer state lives in this callback's own
section and is re-applied in ``on_load_checkpoint``, after the Trainer restored the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lq.checkpoint import (
    STATE_MARKER,
    apply_quantizer_state,
    mark_exception,
    quantizer_state,
    register_float_state_dict_hook,
    remove_float_state_dict_hook,
    strip_quantizer_keys,
)
from lq.cpu_memory import keep_freed_cpu_memory, release_freed_cpu_memory
from lq.nn.swap import quantization_report, quantize, quantized_layers
from lq.quant.config import QuantConfig
from lq.workflow import calibrate, quantizers

from lq.callbacks.loaders import train_loader
from lq.callbacks.sharding import check_fsdp2_parameters, check_strategy, unsharded


def progress_enabled(trainer: pl.Trainer) -> bool:
    """Lightning's convention for lq's own bars (calibration, sensitivity sweep, calibrator "auto"): shown on
    rank zero when the Trainer has an enabled progress bar (``enable_progress_bar=True``, the default), never
    when the user turned progress bars off."""
    bar = getattr(trainer, "progress_bar_callback", None)
    return bool(trainer.is_global_zero and bar is not None and getattr(bar, "is_enabled", True))


class _Progress(Iterable):
    """Wraps a loader with a progress bar (rich/tqdm from Lightning's own dependencies) on rank zero."""

    def __init__(self, loader: Iterable, trainer: pl.Trainer, desc: str, total: int | None) -> None:
        self.loader, self.trainer, self.desc, self.total = loader, trainer, desc, total

    def __iter__(self) -> Iterator:
        show = progress_enabled(self.trainer)
        if not show:
            yield from self.loader
            return
        from tqdm.auto import tqdm

        with tqdm(total=self.total, desc=self.desc, unit="sample", leave=False, dynamic_ncols=True) as bar:
            for batch in self.loader:
                yield batch
                first = batch[0] if isinstance(batch, (list, tuple)) else batch
                bar.update(int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1)


def cpu_memory_for(trainer: pl.Trainer, wanted: bool) -> bool:
    """When ``wanted`` and the trainer runs on CPU, keep freed blocks in the heap (``lq.cpu_memory``: quantized
    steps allocate more large tensors). Returns whether the caller now holds the setting (then it must call
    ``lq.cpu_memory.release_freed_cpu_memory()`` once, at teardown)."""
    return bool(wanted) and trainer.strategy.root_device.type == "cpu" and keep_freed_cpu_memory()


def spawned_start_method(trainer: pl.Trainer) -> str | None:
    """"spawn" / "fork" / "forkserver" when the strategy runs fit in worker processes it starts itself
    (``strategy="ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``), else None."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    try:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    except ImportError:  # pragma: no cover - Lightning moved it: only its multiprocessing launcher has this
        return getattr(launcher, "_start_method", None)
    return str(launcher._start_method) if isinstance(launcher, _MultiProcessingLauncher) else None


def warn_weights_only_checkpoints(trainer: pl.Trainer, name: str) -> None:
    """``ModelCheckpoint(save_weights_only=True)`` writes neither callback states nor calls the callbacks'
    ``on_save_checkpoint``: its file gets only ``state_dict``, which lq keeps float-compatible, so the
    calibrated (or learned) ranges are in no checkpoint. Say so instead of letting a later
    ``lq.load_from_checkpoint`` or ``ckpt_path=`` recalibrate or fail."""
    callbacks = getattr(trainer, "checkpoint_callbacks", ())
    weights_only = [cb for cb in callbacks if getattr(cb, "save_weights_only", False)]
    if weights_only:
        rank_zero_warn(
            f"{name}: {type(weights_only[0]).__name__}(save_weights_only=True) saves only the float-compatible "
            "state_dict, without the lq callback's section: those checkpoints hold no quantizer ranges, so "
            "lq.load_from_checkpoint cannot rebuild the quantized model from them and ckpt_path= recalibrates. "
            "Use save_weights_only=False (the default), or save the quantized model after fit with "
            "torch.save(model.state_dict(), path)"
        )


def warn_spawned_workers(trainer: pl.Trainer, name: str) -> None:
    """Under ``ddp_spawn`` the callbacks' ``setup`` runs only in the workers, so the module in the main process
    is never quantized. Lightning then loads rank 0's weights into it with ``strict=False``, which silently
    drops the quantizer keys: after ``trainer.fit`` the user holds a float module with the trained weights
    and no error. No callback hook runs in the main process after the workers end, so lq cannot swap it
    there; say so once, from rank 0, with the two ways out."""
    method = spawned_start_method(trainer)
    if method is None:
        return
    rank_zero_warn(
        f"{name}: strategy {type(trainer.strategy).__name__} (start method '{method}', e.g. "
        "strategy='ddp_spawn') fits in worker processes, where the layers are quantized; after trainer.fit the "
        "module in the main process gets the trained weights but stays float (no quantizers, no ranges). Get "
        "the quantized model with lq.load_from_checkpoint(YourModule, checkpoint_path) on a checkpoint the run "
        "saved (ModelCheckpoint), or use strategy='ddp', whose main process is rank 0 and keeps the quantized "
        "module"
    )


class QuantizationCallback(Callback):
    """Base of Int8PTQ / Int8QAT / Int8Sensitivity. Not used directly.

    Args:
        config: what and how to quantize (``lq.QuantConfig``; default = the paper's recommendation).
        num_samples: calibration samples (paper Appendix A: 1024 for CNNs).
        calibration_data: a DataLoader / iterable / ``forward_loop(model)`` to calibrate on; default: the
            run's training dataloader.
        cpu_malloc: on CPU, set glibc's malloc to keep freed blocks for reuse from ``setup`` until ``teardown``
            (``lq.cpu_memory``; QAT step 1.3x -> 1.13x fp32 measured). Process-wide, hence off by default;
            restored at teardown or on an exception; ``LQ_CPU_MALLOC=0`` in the environment overrides it.

    Strategies: single device, DDP (calibration statistics reduced across ranks), and ModelParallelStrategy
    with FSDP2 ``fully_shard``; not Lightning's FSDPStrategy (FSDP1), see ``lq.callbacks.sharding``.
    """

    #: whether this callback calibrates with a forward on the LightningModule (refused under FSDP1)
    calibrates: ClassVar[bool] = True

    def __init__(
        self,
        config: QuantConfig | None = None,
        num_samples: int = 1024,
        calibration_data: Iterable | Callable | None = None,
        cpu_malloc: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(cpu_malloc, bool):
            raise TypeError(f"cpu_malloc must be True or False, got {cpu_malloc!r}")
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
        self.cpu_malloc = cpu_malloc
        self._holds_cpu_malloc = False  # this callback counts as a holder of lq.cpu_memory's setting

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config=repr(self.config))

    # ------------------------------------------------------------------------------------- swapping
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__, self.calibrates)
        if not self._holds_cpu_malloc:  # once per callback, whatever the number of stages set up
            self._holds_cpu_malloc = cpu_memory_for(trainer, self.cpu_malloc)
        if stage == "fit" and self.config.equalize:
            raise ValueError(
                f"{type(self).__name__}: QuantConfig(equalize=True) rescales the float weights and turns ReLU6 into "
                "per-channel clamps, which the checkpoints of a fit cannot give back to your own module class. "
                "Equalize the float model before the Trainer (lq.fold_bn(model); lq.equalize(model)) and keep "
                "equalize=False in the callback's config"
            )
        if not quantized_layers(pl_module):
            quantize(pl_module, self.config)
            rank_zero_info(str(quantization_report(pl_module)))
        check_fsdp2_parameters(trainer, pl_module, type(self).__name__)
        self._module = pl_module
        # Every state_dict() taken while the Trainer runs (checkpoints, ModelPruning's rebuilt state_dict,
        # SWA's copy) leaves the quantizers out; removed again at teardown (lq.checkpoint).
        register_float_state_dict_hook(pl_module)
        if stage == "fit":
            warn_spawned_workers(trainer, type(self).__name__)
            warn_weights_only_checkpoints(trainer, type(self).__name__)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release_cpu_malloc()
        remove_float_state_dict_hook(pl_module)  # outside a run, model.state_dict() holds the quantizers

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hook when fit/validate/test raises: release what setup took here.
        self._release_cpu_malloc()
        # Not removed here: callbacks after this one (OnExceptionCheckpoint) may still save in their
        # on_exception. The hook stays active while this exception is handled and is inert afterwards.
        mark_exception(pl_module, exception)

    def _release_cpu_malloc(self) -> None:
        """Let go of the process-wide malloc setting taken in ``setup`` (the last holder restores glibc's
        defaults, ``lq.cpu_memory``); idempotent, so teardown after on_exception is harmless."""
        if self._holds_cpu_malloc:
            self._holds_cpu_malloc = False
            release_freed_cpu_memory()

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
        """lq.calibrate on ``data`` with a progress bar (and one over the candidates of calibrator "auto");
        eval mode and no_grad inside, train mode restored."""
        if not callable(data) or isinstance(data, Iterable):
            data = _Progress(data, trainer, f"{type(self).__name__}: calibrating", self.num_samples)
        kwargs.setdefault("progress", progress_enabled(trainer))
        with unsharded(pl_module):  # FSDP2: static weight calibration reads whole weights, not shards
            calibrate(pl_module, data, num_samples=self.num_samples, **kwargs)
        rank_zero_info(f"{type(self).__name__}: calibrated {len(quantized_layers(pl_module))} layers")
        smoothing = [r for r in pl_module.__dict__.get("_lq_smoothing", ()) if r.alpha is not None]
        if smoothing:
            rows = "\n".join(
                f"  {r.layer:<40} alpha {r.alpha:.1f}, output error {r.error_before / max(r.error_after, 1e-30):.1f}x "
                "lower" for r in smoothing
            )
            rank_zero_info(f"{type(self).__name__}: SmoothQuant on {len(smoothing)} Linear layers:\n{rows}")
        choice = getattr(pl_module, "_lq_layerwise", None)
        if choice is not None and choice.methods:
            rows = "\n".join(f"  {n:<40} {m:<20} output error {e:.3g}" for n, m, e in choice.table())
            rank_zero_info(f"{type(self).__name__}: per-layer calibration (label-free PTQ best):\n{rows}")

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
        if not state:
            if trainer.state.fn == "fit":
                # Resuming QAT from a float run would restore its epoch, optimizer and scheduler into the QAT
                # schedule and recalibrate halfway: not what anyone means by ckpt_path.
                raise ValueError(
                    f"{type(self).__name__}: trainer.fit(ckpt_path=...) resumes a run, but this checkpoint holds "
                    "no lq quantizer state (it was written without an lq callback). To quantize a float model "
                    "trained elsewhere, load its weights with YourModule.load_from_checkpoint(path) and call "
                    "trainer.fit(model) without ckpt_path"
                )
            rank_zero_info(f"{type(self).__name__}: the checkpoint holds no lq quantizer state (a float "
                           "checkpoint): the model is calibrated as in a fresh run")
            return
        try:
            apply_quantizer_state(pl_module, state)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: cannot restore the checkpoint's quantizer state: {err}") from err
        self._restored = True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied in on_load_checkpoint, which has the module
        pass
