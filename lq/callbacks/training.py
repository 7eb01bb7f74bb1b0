"""``Int8Training``: train (from scratch or fine-tune) with int8 compute, Zhu et al. 2020.

    trainer = Trainer(callbacks=[Int8Training()])
    trainer.fit(model, datamodule=dm)

Every Linear and Conv2d runs its forward, grad_input and grad_weight as int8 products (``lq.ops``) with
dynamic per-batch scales: activations and weights quantized in the forward, output gradients quantized
with a per-layer dynamic scale and direction-sensitive clipping where they are consumed (so nothing is
lost at residual adds). Optionally the learning rate is scaled down by the measured gradient deviation
(deviation-counteractive LR scaling). Parameters stay fp32; the optimizer is untouched.
"""

from __future__ import annotations

from collections.abc import Mapping

import contextlib
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lq.callbacks.base import QuantizationCallback
from lq.nn.int8_compute import use_int8_compute
# A runtime import, not a TYPE_CHECKING one: LightningCLI (jsonargparse) reads the annotation of ``compute``
# to build the dataclass from a YAML mapping. Free: ``import lq`` already imports lq.ops (lq.nn uses it).
from lq.ops.config import Int8ComputeConfig
from lq.quant.config import QuantConfig, QuantSpec


class Int8Training(QuantizationCallback):
    """int8 forward and backward GEMMs for an unmodified LightningModule.

    Args:
        compute: an ``lq.ops.Int8ComputeConfig`` (bits, which backward GEMMs run in int8, gradient clipping,
            gradient rounding); default ``Int8ComputeConfig.for_this_machine()`` (8/8/8 bits where the int8
            kernels are exact and fast; 7-bit activations/weights on x86 CPUs without VNNI). A mapping of its
            fields (LightningCLI YAML ``compute: {grad_rounding: stochastic}``, a Hydra override
            ``"callback.compute={grad_rounding: stochastic_hash}"``) builds it over
            ``for_this_machine()``'s defaults for the trainer's device (the fields it names win): overriding
            only ``clip_every`` on a CPU without VNNI keeps the 7-bit operands its fast kernels need.
        skip: fnmatch globs of layers kept in float (e.g. the first conv and the classifier head).
        deviation_lr_scaling: scale each step's LR by ``lq.ops.deviation_lr_factor`` of the mean gradient
            deviation measured in that step's backward (Zhu et al.). The tracker that measures it is closed
            after backward, and also when the run raises (``on_exception``) or ends (``teardown``), so a
            failed backward leaves no tracker collecting in the process.
        cpu_malloc: on CPU, keep freed malloc blocks for reuse from setup to teardown (``lq.cpu_memory``;
            process-wide, so off by default; int8 steps allocate many activation-sized temporaries).
        int8_saved: keep the float activations autograd saves for backward (BatchNorm's input, ReLU's output:
            functional ``F.relu`` and residual sums included) as int8 during each training step's forward, the
            ReLU output shared with the next int8 conv's own int8 input (``lq.ops.saved_int8``). SmallResNet:
            saved-for-backward bytes 0.26x fp32's instead of 1.15x, for 11% more step time. Off by default:
            over three seeds of ``fashion_int8_train`` it gave +1.26, -1.40, +0.70 points vs fp32, one seed
            outside the 1-point bar that float-saved activations kept (benchmarks/RESULTS.md).
    """

    calibrates = False  # dynamic scales: no calibration forward (allowed, with a warning, under FSDP1)

    def __init__(
        self,
        compute: Int8ComputeConfig | None = None,
        skip: list[str] | None = None,
        deviation_lr_scaling: bool = False,
        cpu_malloc: bool = False,
        int8_saved: bool = False,
    ) -> None:
        off = QuantSpec(enabled=False)
        config = QuantConfig(weight=off, activation=QuantSpec(enabled=False), skip=list(skip or []),
                             layers=["Linear", "Conv2d"])
        super().__init__(config=config, num_samples=1, cpu_malloc=cpu_malloc)
        self._compute_fields = None
        if isinstance(compute, Mapping):  # a YAML / Hydra mapping of its fields, over for_this_machine()'s
            self._compute_fields = {str(k): v for k, v in compute.items()}
            Int8ComputeConfig(**self._compute_fields)  # a wrong field or value raises here, not at fit time
            compute = Int8ComputeConfig.for_this_machine(**self._compute_fields)  # re-made for the device in setup
        if compute is not None and not isinstance(compute, Int8ComputeConfig):
            raise TypeError(
                f"compute must be an lq.ops.Int8ComputeConfig or a mapping of its fields, got {type(compute).__name__}"
            )
        if compute is not None and compute.act_scale != "dynamic":
            raise ValueError("Int8Training uses dynamic scales (act_scale='dynamic'); for calibrated static "
                             "scales use Int8QAT(compute='int8')")
        for name, value in (("deviation_lr_scaling", deviation_lr_scaling), ("int8_saved", int8_saved)):
            if not isinstance(value, bool):
                raise TypeError(f"Int8Training({name}=...) takes True or False, got {value!r}")
        self.compute = compute
        self.deviation_lr_scaling = bool(deviation_lr_scaling)
        self._tracker = None
        self._saved_lrs: list[list[float]] | None = None
        self.int8_saved = bool(int8_saved)
        self._saving: contextlib.ExitStack | None = None
        self._act_qmax = 127

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        callbacks = getattr(trainer, "callbacks", ())
        others = [type(cb).__name__ for cb in callbacks if isinstance(cb, QuantizationCallback) and cb is not self]
        if others:
            # Whichever swaps first decides the layers; the other then calibrates quantizers that the dynamic
            # int8 path never feeds ("quantizers saw no data"), or trains with a config nobody asked for.
            raise ValueError(
                f"Int8Training cannot share a Trainer with {', '.join(others)}: it trains with dynamic int8 scales "
                "and its quantizers off. For quantization-aware fine-tuning on int8 GEMMs use "
                "Int8QAT(compute='int8') alone; quantize or analyse the int8-trained model in a later "
                "trainer.fit/validate with the other callback"
            )
        super().setup(trainer, pl_module, stage)  # swap in the quantized layers (quantizers off)
        from lq.ops import reset_clip_state

        reset_clip_state(pl_module)  # this model's periodically searched clip ratios (clip_every > 1) start afresh
        device = trainer.strategy.root_device
        if self._compute_fields is not None:
            self.compute = Int8ComputeConfig.for_this_machine(str(device), **self._compute_fields)
        names = use_int8_compute(pl_module, self.compute, device=device)
        if names:
            from lq.nn.int8_compute import int8_compute_config
            from lq.quant.functional import qmax

            self._act_qmax = qmax(int8_compute_config(pl_module.get_submodule(names[0])).act_bits)
        rank_zero_info(f"Int8Training: {len(names)} layers compute in int8 (forward and backward)")

    # ------------------------------------------------- activations saved as int8 during the forward
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._stop_saving()
        if self.int8_saved:
            from lq.ops.saved_int8 import int8_saved_activations

            self._saving = contextlib.ExitStack()
            self._saving.enter_context(int8_saved_activations(self._act_qmax))

    def _stop_saving(self) -> None:
        """End the forward's int8 saving (before backward, or at the batch's end / on an exception if the
        step skipped backward); idempotent."""
        if self._saving is not None:
            self._saving.close()
            self._saving = None

    # ----------------------------------------------------------- deviation-counteractive LR (Zhu et al.)
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self._stop_saving()
        if self.deviation_lr_scaling:
            from lq.ops import GradDeviationTracker

            self._tracker = GradDeviationTracker().__enter__()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)

    def _close_tracker(self) -> None:
        """A backward that raised never reaches on_after_backward: stop the tracker (idempotent) and drop it."""
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._tracker = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_saving()
        self._close_tracker()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_saving()
        self._close_tracker()
        super().teardown(trainer, pl_module, stage)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._tracker is None:
            return
        from lq.ops import deviation_lr_factor

        factor = deviation_lr_factor(self._tracker.mean())
        self._saved_lrs = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * factor
        self._optimizer = optimizer
        pl_module.log("lq/deviation_lr_factor", factor, on_step=True, on_epoch=False)
        self._tracker = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._stop_saving()
        # The scaled LR applied to this step only; the schedule continues from the unscaled value.
        if self._saved_lrs is not None:
            for g, lr in zip(self._optimizer.param_groups, self._saved_lrs):
                g["lr"] = lr
            self._saved_lrs = None
