"""Quantizer state in and out of Lightning checkpoints.

A Lightning checkpoint written with an lq callback keeps ``checkpoint["state_dict"]`` float-compatible (no
quantizer keys), so the user's own ``Module.load_from_checkpoint(path)`` loads it strictly (Lightning 1.x
#6457). The quantization config, every quantizer's amax and mode (partial quantization) live in the
callback's own section; the callback restores them after the Trainer restored the weights, and
``lq.load_from_checkpoint(Module, path)`` rebuilds the quantized model outside a Trainer. While a Trainer runs,
a ``state_dict`` hook (``FloatCompatibleStateDict``) leaves the quantizer keys out of every
``pl_module.state_dict()``, so callbacks that rebuild ``checkpoint["state_dict"]`` themselves (ModelPruning)
keep it float-compatible in any callback order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lq.bias_correction import corrections, set_correction
from lq.nn.swap import quantize, quantized_layers
from lq.quant.config import QuantConfig
from lq.quant.quantizer import TensorQuantizer
from lq.smoothing import set_smoothing, smoothings
from lq.workflow import quantizers

log = logging.getLogger(__name__)

STATE_MARKER = "lq_quantizer_state"


def is_quantizer_key(model: nn.Module, key: str) -> bool:
    prefixes = tuple(f"{n}." for n in quantizers(model))
    return key.startswith(prefixes)


def strip_quantizer_keys(model: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove the quantizer entries from a state dict in place; returns what was removed."""
    prefixes = tuple(f"{n}." for n in quantizers(model))
    removed = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefixes)]}
    return removed


class FloatCompatibleStateDict:
    """``state_dict`` post-hook that leaves out the quantizers' entries while a Trainer runs the module.

    Why a hook and not only ``QuantizationCallback.on_save_checkpoint``: other callbacks rebuild
    ``checkpoint["state_dict"]`` from ``pl_module.state_dict()`` in their own ``on_save_checkpoint``
    (``ModelPruning`` with ``make_pruning_permanent=True``, its default). Run after lq's callback, they put
    the ``...input_quantizer.amax`` keys back, and the user's ``Module.load_from_checkpoint`` fails strictly.
    Filtering at the source makes every consumer of ``state_dict()`` see float-compatible keys, in any
    callback order. The quantizer state is not lost: it lives in the lq callback's checkpoint section, and
    ``TensorQuantizer`` tolerates a missing amax on load.

    Active only while the module's Trainer is inside a run (``trainer.state.stage`` set, status running or
    handling an exception, so checkpoints written by ``OnExceptionCheckpoint`` are float-compatible too).
    Outside a run ``model.state_dict()`` holds the quantizer keys again (users save quantized models that
    way); the lq callbacks also remove the hook at ``teardown``. A plain object without references, so
    ``copy.deepcopy(module)`` (``StochasticWeightAveraging``) and pickling stay cheap and safe.
    """

    def __init__(self) -> None:
        self.exception_id: int | None = None  # id() of the exception the Trainer is handling, set by on_exception

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        if not _in_trainer_run(module, self.exception_id):
            return
        names = [n for n, m in module.named_modules() if isinstance(m, TensorQuantizer)]
        if not names:
            return
        # ``prefix``: the module may be a child of the module whose state_dict() was called (a wrapper).
        prefixes = tuple(f"{prefix}{n}." for n in names)
        for key in [k for k in state_dict if k.startswith(prefixes)]:
            del state_dict[key]


def _in_trainer_run(module: nn.Module, exception_id: int | None) -> bool:
    """True while the module's Trainer runs a stage, or handles the exception that ended it.

    After an exception Lightning calls the callbacks' ``on_exception`` (``OnExceptionCheckpoint`` saves
    there) but no ``teardown``, and leaves ``trainer.state`` INTERRUPTED (with the stage still set after a
    KeyboardInterrupt). So "handling" means: the exception being handled right now (``sys.exc_info``, we are
    inside Lightning's ``except`` block) is the one the lq callback saw in ``on_exception``; once it has left
    the Trainer, ``state_dict()`` is complete again.
    """
    trainer = getattr(module, "_trainer", None)  # LightningModule.trainer raises when detached
    state = getattr(trainer, "state", None)
    if state is None or state.stage is None:
        return False
    from lightning.pytorch.trainer.states import TrainerStatus

    if state.status == TrainerStatus.RUNNING:
        return True
    handled = sys.exc_info()[1]
    return state.status == TrainerStatus.INTERRUPTED and handled is not None and id(handled) == exception_id


def register_float_state_dict_hook(module: nn.Module) -> None:
    """Install ``FloatCompatibleStateDict`` on ``module`` (once; a second call is a no-op)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"register_float_state_dict_hook: module must be an nn.Module, got {type(module).__name__}")
    hooks = [h for h in module._state_dict_hooks.values() if isinstance(h, FloatCompatibleStateDict)]
    for hook in hooks:  # left from a run that ended with an exception: a new run starts clean
        hook.exception_id = None
    if not hooks:
        module.register_state_dict_post_hook(FloatCompatibleStateDict())


def mark_exception(module: nn.Module, exception: BaseException) -> None:
    """Keep ``module``'s ``FloatCompatibleStateDict`` active while the Trainer handles ``exception``."""
    for hook in getattr(module, "_state_dict_hooks", {}).values():
        if isinstance(hook, FloatCompatibleStateDict):
            hook.exception_id = id(exception)


def remove_float_state_dict_hook(module: nn.Module) -> None:
    """Remove every ``FloatCompatibleStateDict`` from ``module``: ``state_dict()`` holds the quantizers again."""
    hooks = getattr(module, "_state_dict_hooks", {})
    for key in [k for k, h in hooks.items() if isinstance(h, FloatCompatibleStateDict)]:
        del hooks[key]


#: QuantSpec fields that do not change what a checkpoint's ranges mean
#: smoothquant: whether lq.calibrate searches smoothing factors; the factors themselves are in the state
CALIBRATION_ONLY_FIELDS = frozenset({"calibrator", "percentile", "num_bins", "smoothquant"})


def config_differences(saved: dict[str, Any], current: dict[str, Any], where: str = "") -> list[str]:
    """``["activation.bits: checkpoint 8, model 4", ...]`` for two ``QuantConfig.to_dict()`` results.

    Fields that only say how a range was *computed* (calibrator, percentile, histogram bins, smoothquant) are not
    differences: the checkpoint's amax values are the ranges, whatever produced them (e.g. ``Int8PTQ()``
    testing the checkpoint of a QAT run calibrated with "max")."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in CALIBRATION_ONLY_FIELDS:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{where}{key}.")
        elif a != b:
            out.append(f"{where}{key}: checkpoint {a!r}, model {b!r}")
    return out


def quantizer_state(model: nn.Module) -> dict[str, Any]:
    """Everything needed to rebuild the quantized model from its float weights."""
    config = getattr(model, "_lq_config", None)
    if config is None:
        raise ValueError("quantizer_state: the model was not quantized with lq.quantize")
    return {
        STATE_MARKER: 1,
        "config": config.to_dict(),
        "layers": list(quantized_layers(model)),
        "amax": {n: q.amax.detach().cpu().clone() for n, q in quantizers(model).items()},
        "modes": {n: q.mode for n, q in quantizers(model).items()},
        # lq.correct_bias (QuantConfig(bias_correction=True)): per corrected layer, the added bias shift
        "bias_correction": {n: c.detach().cpu().clone() for n, c in corrections(model).items()},
        # lq.smooth_quant (QuantConfig(smoothquant=True)): per smoothed Linear layer, the input divisor s
        "smoothing": {n: s.detach().cpu().clone() for n, s in smoothings(model).items()},
        # Int8Training / Int8QAT(compute="int8"): which layers run int8 GEMMs, and how (plain dict: Lightning may
        # load checkpoints with weights_only=True)
        "int8_compute": _int8_compute_state(model),
    }


def _int8_compute_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    from lq.nn.int8_compute import int8_compute_config

    out = {}
    for name, layer in quantized_layers(model).items():
        config = int8_compute_config(layer)
        if config is not None:
            out[name] = dataclasses.asdict(config)
    return out


def _apply_int8_compute_state(model: nn.Module, saved: dict[str, dict[str, Any]]) -> None:
    """Re-enable int8 compute on the layers that ran it and have none yet (the lq callback's ``setup``
    already set it on the Trainer path; ``lq.load_from_checkpoint`` rebuilds a model that has none)."""
    if not saved:
        return
    from lq.nn.int8_compute import int8_compute_config, use_int8_compute
    from lq.ops import Int8ComputeConfig

    known = {f.name for f in dataclasses.fields(Int8ComputeConfig)}
    layers = quantized_layers(model)
    for name, fields in saved.items():
        if name in layers and int8_compute_config(layers[name]) is None:
            config = Int8ComputeConfig(**{k: v for k, v in fields.items() if k in known})
            use_int8_compute(model, config, layers=[name])


@torch.no_grad()
def apply_quantizer_state(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Quantize ``model`` as described by ``state`` (if not already) and load its ranges and modes.

    Raises ValueError when the checkpoint was written for another config (different quantized layers or
    amax shapes), naming the differences.
    """
    if STATE_MARKER not in state:
        raise ValueError("not an lq quantizer state (no lq_quantizer_state marker)")
    config = QuantConfig.from_dict(state["config"])
    if not quantized_layers(model):
        # the saved weights are already equalized (if they were): never equalize them again on load
        quantize(model, dataclasses.replace(config, equalize=False))
        model._lq_config = config  # noqa: SLF001
    current = getattr(model, "_lq_config", None)
    if current is not None:
        diff = config_differences(config.to_dict(), current.to_dict())
        if diff:
            raise ValueError(
                "the checkpoint's quantizer state was written with another QuantConfig than the model's: "
                f"{'; '.join(diff)}. Quantize the model with the checkpoint's config (the lq callback's "
                "config=..., or lq.load_from_checkpoint(Module, path), which rebuilds it from the checkpoint), "
                "or start a new run without ckpt_path"
            )
    have, want = set(quantized_layers(model)), set(state["layers"])
    if have != want:
        raise ValueError(
            "the checkpoint's quantizer state comes from another quantization config: layers only in the "
            f"checkpoint {sorted(want - have)[:10]}, only in the model {sorted(have - want)[:10]}. Build the "
            "model with the same QuantConfig (skip/only/layers) the checkpoint was written with"
        )
    qs = quantizers(model)
    for name, amax in state["amax"].items():
        q = qs.get(name)
        if q is None or q.amax.shape != amax.shape:
            raise ValueError(
                f"quantizer {name}: checkpoint amax shape {tuple(amax.shape)} does not fit the model "
                f"({None if q is None else tuple(q.amax.shape)}); the checkpoint comes from another config"
            )
        q.amax.data.copy_(amax.to(q.amax.device))
    for name, mode in state["modes"].items():
        qs[name].mode = "quantize" if mode == "calibrate" else mode
    layers = quantized_layers(model)
    for name, correction in state.get("bias_correction", {}).items():
        if name not in layers:
            raise ValueError(f"the checkpoint's bias correction names layer {name!r}, which the model does not "
                             "quantize; the checkpoint comes from another config")
        set_correction(layers[name], correction)
    for name in smoothings(model):  # the checkpoint's ranges were calibrated with its own smoothing (or none)
        set_smoothing(layers[name], None)
    for name, s in state.get("smoothing", {}).items():
        if name not in layers or not hasattr(layers[name], "in_features"):
            raise ValueError(f"the checkpoint's smoothing names layer {name!r}, which is not a quantized Linear of "
                             "the model; the checkpoint comes from another config")
        set_smoothing(layers[name], s)
    _apply_int8_compute_state(model, state.get("int8_compute", {}))
    return model


def find_quantizer_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The lq callback's section of a Lightning checkpoint."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"a Lightning checkpoint is a dict, got {type(checkpoint).__name__}")
    found = [v for v in checkpoint.get("callbacks", {}).values() if isinstance(v, dict) and STATE_MARKER in v]
    if not found:
        sections = sorted(checkpoint.get("callbacks", {}))
        raise ValueError(
            "this checkpoint holds no lq quantizer state: it was not written by a Trainer with an lq callback "
            "(Int8PTQ / Int8QAT / Int8Sensitivity / Int8Training) that had quantized the model (its callback "
            f"sections: {sections[:10]}). For a float checkpoint, load the float model with "
            "Module.load_from_checkpoint(path) and quantize it (lq.quantize + lq.calibrate, or a Trainer with "
            "Int8PTQ / Int8QAT)"
        )
    return found[-1]


def load_from_checkpoint(
    module_cls: type, checkpoint_path: str | Path, map_location: Any = "cpu", **kwargs: Any
) -> nn.Module:
    """The quantized model back from a Lightning checkpoint, outside a Trainer.

    Builds the float module with ``module_cls.load_from_checkpoint(path, **kwargs)`` (the checkpoint's
    state_dict is float-compatible), re-applies the quantization config, and loads the calibrated ranges and
    per-layer modes saved by the lq callback. Returns the module in eval mode.

    Errors name the file and what to do: FileNotFoundError (no such file), ValueError (truncated or corrupt
    file, with torch's error as the cause; a directory, i.e. a distributed checkpoint; a checkpoint without lq
    state; lq state of another config),
    RuntimeError (the float weights do not fit ``module_cls``: another model).
    """
    if not isinstance(module_cls, type) or not hasattr(module_cls, "load_from_checkpoint"):
        raise TypeError(f"module_cls must be a LightningModule class, got {module_cls!r}")
    if not isinstance(checkpoint_path, (str, os.PathLike)):
        raise TypeError(f"checkpoint_path must be a str or path, got {type(checkpoint_path).__name__}")
    if Path(checkpoint_path).is_dir():
        # What ModelParallelStrategy (FSDP2) saves by default: one shard file per rank plus metadata.
        raise ValueError(
            f"lq.load_from_checkpoint: {checkpoint_path} is a directory (a distributed checkpoint, e.g. from "
            "ModelParallelStrategy's default save_distributed_checkpoint=True); lq reads single-file checkpoints: "
            "train with ModelParallelStrategy(save_distributed_checkpoint=False), which writes one full file"
        )
    if not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"lq.load_from_checkpoint: no checkpoint file at {checkpoint_path}")
    try:
        checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated or not a torch file: torch's messages do not name the file
        raise ValueError(
            f"lq.load_from_checkpoint: cannot read {checkpoint_path} as a torch checkpoint "
            f"({type(err).__name__}: {err}); the file is truncated or corrupt (an interrupted save?). Use "
            "another checkpoint, e.g. the previous one ModelCheckpoint kept"
        ) from err
    try:
        state = find_quantizer_state(checkpoint)
    except (ValueError, TypeError) as err:
        raise ValueError(f"lq.load_from_checkpoint({module_cls.__name__}, {checkpoint_path}): {err}") from err
    try:
        module = module_cls.load_from_checkpoint(checkpoint_path, map_location=map_location, **kwargs)
    except RuntimeError as err:  # strict load of the float weights: another model
        raise RuntimeError(
            f"lq.load_from_checkpoint: the float weights in {checkpoint_path} do not fit {module_cls.__name__} "
            f"(another model or other hyperparameters): {str(err)[:600]}. Pass the LightningModule "
            "class, and constructor kwargs, the checkpoint was written with"
        ) from err
    try:
        apply_quantizer_state(module, state)
    except ValueError as err:
        raise ValueError(f"lq.load_from_checkpoint({module_cls.__name__}, {checkpoint_path}): {err}") from err
    module.eval()
    log.info("lq.load_from_checkpoint: %d quantized layers restored from %s", len(state["layers"]), checkpoint_path)
    return module
