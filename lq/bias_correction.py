"""Bias correction of the output shift that weight quantization causes (Nagel et al. 2019, *Data-Free
Quantization Through Weight Equalization and Bias Correction*, Sec. 4.2, eq. 13-15, empirical variant).

With ``W~ = Q(W)`` and ``eps = W~ - W``, a quantized layer's output is ``y~ = y + eps x``, so its expectation is
shifted per output channel by ``E[eps x] = eps E[x]``. Subtracting that shift from the bias makes the
quantized layer unbiased. ``E[eps x]`` is measured here on calibration data, with the layer's input as the
quantized model produces it (upstream layers quantized, the input fake-quantized with its calibrated range):
for a conv, the mean over samples and positions of ``conv(x~, eps)`` per output channel, which also counts the
zero padding exactly.

Apply after ``lq.calibrate`` (the input ranges must be final) and before ``lq.convert`` / export. The
correction is added to the bias only while the layer's weight quantizer quantizes (``QuantMixin.quantized_bias``):
the float model, partial quantization and sensitivity's fp32 reference are unaffected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lq.nn.quant_conv import QuantConv1d, QuantConv2d, QuantConv3d
from lq.nn.quant_linear import QuantLinear

log = logging.getLogger(__name__)

_CORRECTABLE = (QuantLinear, QuantConv1d, QuantConv2d, QuantConv3d)


@dataclass
class BiasCorrection:
    """What ``correct_bias`` did to one layer: the largest |shift| subtracted and the largest |bias| before."""

    layer: str
    max_shift: float
    max_bias: float
    samples: int


def _shift(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over samples/positions of ``eps x~`` per output channel, and how many terms it sums."""
    w = layer.quant_weight().detach().float()  # W diag(s) and x / s for a layer smoothed by lq.smooth_quant
    eps = layer.weight_quantizer(w) - w
    xq = layer.input_quantizer(layer.smooth_input(x)).float()
    if isinstance(layer, nn.Linear):
        y = F.linear(xq, eps)
        return y.reshape(-1, y.shape[-1]).sum(0), y.numel() // y.shape[-1]
    y = layer._conv_forward(xq, eps, None)
    dims = [0] + list(range(2, y.dim()))
    return y.sum(dims), y.numel() // y.shape[1]


def corrections(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: correction}`` of every layer ``correct_bias`` corrected (the buffer ``bias_correction`` of
    its weight quantizer)."""
    return {n: m.weight_quantizer.bias_correction for n, m in model.named_modules()
            if isinstance(m, _CORRECTABLE) and getattr(m.weight_quantizer, "bias_correction", None) is not None}


def set_correction(layer: nn.Module, correction: torch.Tensor | None) -> None:
    """Store (or with ``None`` remove) a layer's bias correction, replacing any previous one."""
    q = layer.weight_quantizer
    if correction is None:
        if "bias_correction" in q._buffers:
            del q._buffers["bias_correction"]
        return
    correction = correction.detach().to(device=layer.weight.device, dtype=torch.float32)
    if getattr(q, "bias_correction", None) is not None and q.bias_correction.shape == correction.shape:
        q.bias_correction.copy_(correction)
    else:
        q.register_buffer("bias_correction", correction.clone())


def _put_back(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    mods = dict(model.named_modules())
    for name, correction in saved.items():
        set_correction(mods[name], correction)


def _all_reduce(sums: dict[str, torch.Tensor], counts: dict[str, int], layers: dict[str, nn.Module]) -> None:
    """Under torch.distributed, sum the statistics over ranks, so every rank applies the same correction. Every
    rank joins every reduction in the same order (a rank whose data never reached a layer adds zeros)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for name, layer in layers.items():
        out_channels = layer.weight.shape[0]
        buf = torch.zeros(out_channels + 1, dtype=torch.float64, device=layer.weight.device)
        if name in sums:
            buf[:-1] = sums[name].double()
            buf[-1] = counts[name]
        torch.distributed.all_reduce(buf)
        if buf[-1] > 0:
            sums[name], counts[name] = buf[:-1].float(), int(buf[-1].item())


def correct_bias(model: nn.Module, data: Any, num_samples: int | None = 1024) -> list[BiasCorrection]:
    """Correct each quantized layer's bias for its expected weight-quantization shift (Nagel et al. eq. 15).

    The correction ``-E[(Q(W) - W) x~]`` per output channel is kept in a buffer ``bias_correction`` of the
    layer's weight quantizer and added to the bias only while that quantizer quantizes, so the float model
    (``lq.quantization_disabled``, partial quantization, sensitivity's fp32 reference) is unchanged, a second
    call replaces the correction instead of adding to it, and no Parameter is created. ``lq.convert`` and
    ``lq.export_onnx`` use the corrected bias; checkpoints keep the correction in the lq section. Under
    torch.distributed the statistics are summed over ranks, so every rank applies the same correction.

    Args:
        model: a quantized model (``lq.quantize``) with calibrated activations (``lq.calibrate``).
        data: a DataLoader / iterable of batches, or a ``forward_loop(model)`` callable (as ``lq.calibrate``).
        num_samples: samples to average over (``None``: the whole iterable).

    Returns:
        One :class:`BiasCorrection` per corrected layer. Layers whose weight quantizer is off, and
        ConvTranspose / Matmul layers, are left alone.

    Raises:
        ValueError: the model has no quantized Linear/Conv layer with weight quantization on, a layer's input
            range is not calibrated, ``num_samples`` is not positive, or a layer never ran on ``data`` (its
            name is given); the model is then unchanged.
    """
    from lq.workflow import _eval_no_grad, _run_data

    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples <= 0):
        raise ValueError(f"correct_bias: num_samples must be a positive int or None, got {num_samples!r}")
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, _CORRECTABLE) and m.weight_quantizer.mode == "quantize"}
    if not layers:
        raise ValueError("correct_bias: no quantized Linear/Conv layer with weight quantization enabled; call "
                         "lq.quantize(model) and lq.calibrate(model, data) first")
    uncalibrated = [n for n, m in layers.items() if m.input_quantizer.mode == "quantize"
                    and not m.input_quantizer.dynamic and not m.input_quantizer.is_calibrated]
    if uncalibrated:
        raise ValueError(f"correct_bias: the input ranges of {uncalibrated} are not calibrated; run "
                         "lq.calibrate(model, data) first")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            total, count = _shift(module, args[0])
            sums[name] = sums[name] + total if name in sums else total
            counts[name] = counts.get(name, 0) + count
        return record

    # Every layer's shift is measured in one pass with no correction active upstream, so the result does
    # not depend on a previous call (a second call replaces the corrections with the same values).
    previous = {n: c.clone() for n, c in corrections(model).items()}
    for layer in layers.values():
        set_correction(layer, None)
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with _eval_no_grad(model):
            seen = _run_data(model, data, num_samples)
        _all_reduce(sums, counts, layers)
    except BaseException:
        _put_back(model, previous)
        raise
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in sums]
    if missing:
        _put_back(model, previous)
        raise ValueError(f"correct_bias: {missing} never ran on the data (dead branches?); nothing was corrected. "
                         "Pass data that exercises them, or skip them in QuantConfig")
    report = []
    with torch.no_grad():
        for name, layer in layers.items():
            shift = sums[name] / counts[name]
            set_correction(layer, -shift)
            before = 0.0 if layer.bias is None else float(layer.bias.detach().abs().max())
            report.append(BiasCorrection(name, float(shift.abs().max()), before, seen))
    log.info("correct_bias: corrected %d layers on %s samples", len(report), seen)
    return report
