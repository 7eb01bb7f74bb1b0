"""Quantizer state in and out of Lightning checkpoints.

A Lightning checkpoint written with an lq callback keeps ``checkpoint["state_dict"]`` float-compatible (no
quantizer keys), so the user's own ``Module.load_from_checkpoint(path)`` loads it strictly (Lightning 1.x
#6457). The quantization config, every quantizer's amax and mode (partial quantization) live in the
callback's own section; the callback restores them after the Trainer restored the weights, and
``lq.load_from_checkpoint(Module, path)`` rebuilds the quantized model outside a Trainer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lq.nn.swap import quantize, quantized_layers
from lq.quant.config import QuantConfig
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
    }


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
        quantize(model, config)
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
    return model


def find_quantizer_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The lq callback's section of a Lightning checkpoint."""
    found = [v for v in checkpoint.get("callbacks", {}).values() if isinstance(v, dict) and STATE_MARKER in v]
    if not found:
        raise ValueError(
            "this checkpoint holds no lq quantizer state: it was not written by a Trainer with an lq callback "
            "(Int8PTQ / Int8QAT / Int8Sensitivity) that had quantized the model"
        )
    return found[-1]


def load_from_checkpoint(
    module_cls: type, checkpoint_path: str | Path, map_location: Any = "cpu", **kwargs: Any
) -> nn.Module:
    """The quantized model back from a Lightning checkpoint, outside a Trainer.

    Builds the float module with ``module_cls.load_from_checkpoint(path, **kwargs)`` (the checkpoint's
    state_dict is float-compatible), re-applies the quantization config, and loads the calibrated ranges and
    per-layer modes saved by the lq callback. Returns the module in eval mode.
    """
    if not hasattr(module_cls, "load_from_checkpoint"):
        raise TypeError(f"module_cls must be a LightningModule class, got {module_cls!r}")
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    state = find_quantizer_state(checkpoint)
    module = module_cls.load_from_checkpoint(checkpoint_path, map_location=map_location, **kwargs)
    apply_quantizer_state(module, state)
    module.eval()
    log.info("lq.load_from_checkpoint: %d quantized layers restored from %s", len(state["layers"]), checkpoint_path)
    return module
