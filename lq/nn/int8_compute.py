"""Running quantized Linear / Conv2d layers on real int8 GEMMs (``lq.ops``) instead of fake quantization.

``use_int8_compute(model, config)`` sets ``layer.int8_compute`` on every ``QuantLinear`` / ``QuantConv2d``;
their forward then calls ``lq.ops.int8_linear`` / ``lq.ops.int8_conv2d``: forward, grad_input and
grad_weight as int8 products (Zhu et al. 2020). With ``config.act_scale == "static"`` the input scale is
the calibrated amax of the layer's input quantizer (QAT with int8 compute: eq. 10 with the same ranges as
fake quantization); with ``"dynamic"`` it is the batch's own (int8 training from scratch). A layer whose
quantizers are off (partial quantization) runs in float. Each layer object passes its own clip state
(``lq.ops.grad_quant.layer_clip_state``) to the op, so ``config.clip_every > 1`` remembers ratios per layer
object: two models with the same layer names never share them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def int8_compute_config(layer: nn.Module):
    return layer.__dict__.get("int8_compute")


def _layer_name(layer: nn.Module) -> str:
    return layer.input_quantizer.name.rpartition(".")[0]


def _act_amax(layer: nn.Module, config) -> torch.Tensor | None | bool:
    """The static amax, None for dynamic scales, or False when the input quantizer is off or calibrating
    (the layer then runs its float / calibration path)."""
    q = layer.input_quantizer
    if config.act_scale == "dynamic":
        return None
    if q.mode != "quantize":
        return False
    if not q.is_calibrated:
        raise RuntimeError(f"layer '{_layer_name(layer)}': int8 compute with static scales needs lq.calibrate first")
    return q.amax.detach()


def int8_linear_forward(layer: nn.Module, x: torch.Tensor, config) -> torch.Tensor | None:
    """int8 forward of a QuantLinear, or None when the layer should run its float/fake-quant path."""
    from lq.ops import int8_linear
    from lq.ops.grad_quant import layer_clip_state

    amax = _act_amax(layer, config)
    if amax is False:
        return None
    return int8_linear(  # lq.smooth_quant: the int8 GEMM takes x / s and W diag(s)
        layer.smooth_input(x), layer.quant_weight(), layer.quantized_bias(), config=config, name=_layer_name(layer), act_amax=amax,
        clip_state=layer_clip_state(layer),
    )


def int8_conv2d_forward(layer: nn.Module, x: torch.Tensor, config) -> torch.Tensor | None:
    """int8 forward of a QuantConv2d (zeros padding only), or None to run the float/fake-quant path."""
    from lq.ops import int8_conv2d
    from lq.ops.grad_quant import layer_clip_state

    amax = _act_amax(layer, config)
    if amax is False:
        return None
    return int8_conv2d(
        x, layer.weight, layer.quantized_bias(), stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
        groups=layer.groups, config=config, name=_layer_name(layer), act_amax=amax,
        clip_state=layer_clip_state(layer),
    )


def use_int8_compute(
    model: nn.Module, config=None, layers: list[str] | None = None, device: torch.device | str | None = None
) -> list[str]:
    """Run the model's QuantLinear / QuantConv2d layers on int8 GEMMs with ``config``
    (``lq.ops.Int8ComputeConfig``; default: ``Int8ComputeConfig.for_this_machine(device)``, ``device`` being
    where the model will run, by default where its parameters are now). ``config=False`` switches back to
    fake quantization. Returns the names of the layers that run in int8.
    """
    from lq.nn.quant_conv import QuantConv2d
    from lq.nn.quant_linear import QuantLinear
    from lq.ops import Int8ComputeConfig
    from lq.ops.grad_quant import CLIP_STATE_ATTR

    if config is None:
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else "cpu"
        config = Int8ComputeConfig.for_this_machine(str(torch.device(device)))
    names = []
    for name, m in model.named_modules():
        if layers is not None and name not in layers:
            continue
        if isinstance(m, (QuantLinear, QuantConv2d)):
            if config is False:
                m.__dict__.pop("int8_compute", None)
                m.__dict__.pop(CLIP_STATE_ATTR, None)
            else:
                if isinstance(m, QuantConv2d) and m.padding_mode != "zeros":
                    log.warning("lq: %s uses padding_mode=%s; it stays on fake quantization", name, m.padding_mode)
                    continue
                m.__dict__["int8_compute"] = config
                names.append(name)
    return names
