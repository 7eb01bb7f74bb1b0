"""``lq.convert``: turn a calibrated fake-quant model into an int8 inference model (paper Section 3.2-3.3).

A fake-quant layer computes eq. 9 in float on ``dequantize(quantize(x))`` operands; the converted layer
computes the same numbers as eq. 10 (integer GEMM with int32 accumulation, then one float multiply by
``1 / (s_x s_w)`` and the bias), from int8 weights stored once. See ``lq.deploy.int8_layers`` and
``lq.deploy.kernels``.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from lq.deploy.chain import fuse_sequentials
from lq.deploy.int8_layers import (
    Int8ConvNd,
    Int8ConvTranspose2d,
    Int8Linear,
    Int8Matmul,
    Int8Module,
)
from lq.deploy.int8_pool import Int8AdaptiveAvgPool2d, Int8AvgPool2d
from lq.deploy.kernels import BACKENDS, onednn_mode
from lq.nn.fold_bn import fold_bn as _fold_bn
from lq.nn.matmul import QuantMatmul
from lq.nn.quant_conv import QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose2d
from lq.nn.quant_linear import QuantLinear
from lq.nn.quant_pool import QuantAdaptiveAvgPool2d, QuantAvgPool2d
from lq.nn.swap import _parent, quantized_layers, restore
from lq.quant.quantizer import TensorQuantizer

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _plan(name: str, layer: nn.Module) -> str:
    """``"int8"`` (all quantizers quantize), ``"float"`` (all off) or ``"keep"`` (mixed: stays fake-quant).

    Raises a clear error for a layer that is still calibrating or has no calibrated range.
    """
    qs: dict[str, TensorQuantizer] = layer.quantizers()
    modes = {q.mode for q in qs.values()}
    if "calibrate" in modes:
        raise RuntimeError(
            f"lq.convert: layer '{name}' is still in calibrate mode; finish calibration with "
            "lq.calibrate(model, data) (which loads the ranges) before converting"
        )
    if modes == {"off"}:
        return "float"
    for qname, q in qs.items():
        if q.mode == "quantize" and not q.dynamic and not q.is_calibrated:
            raise RuntimeError(
                f"lq.convert: layer '{name}' is quantized but its {qname} has no calibrated range (amax is NaN). "
                f"Run lq.calibrate(model, data) first, or keep the layer in float with "
                f"lq.set_quantization(model, False, ['{name}'])"
            )
    if modes == {"quantize"}:
        return "int8"
    return "keep"


def _weight_amax(layer: nn.Module) -> torch.Tensor:
    """Per-channel weight range: recomputed from the weight for dynamic (max) quantizers, as their forward does."""
    q: TensorQuantizer = layer.weight_quantizer
    if not q.dynamic:
        return q.amax.detach()
    w = layer.smoothed_weight().detach()  # W diag(s) for a layer smoothed by lq.smooth_quant
    if q.axis is None:
        return w.abs().amax().float()
    dims = [d for d in range(w.dim()) if d != q.axis % w.dim()]
    return w.abs().amax(dim=dims).float()


def _int8_layer(name: str, layer: nn.Module, backend: str) -> Int8Module:
    if isinstance(layer, QuantMatmul):
        return Int8Matmul.from_quant(layer, name, backend)
    if isinstance(layer, QuantAvgPool2d):  # QuantConfig(quantize_pooling=True): no weight
        return Int8AvgPool2d.from_quant(layer, name, backend)
    if isinstance(layer, QuantAdaptiveAvgPool2d):
        return Int8AdaptiveAvgPool2d.from_quant(layer, name, backend)
    if layer.weight_quantizer.axis is None:
        # per-tensor weights: one amax for all channels (eq. 10 with a scalar s_w)
        amax = _weight_amax(layer).reshape(()).expand(layer.weight.shape[layer.weight_channel_axis]).clone()
    else:
        amax = _weight_amax(layer)
    if isinstance(layer, QuantLinear):
        return Int8Linear.from_quant(layer, name, amax, backend)
    if isinstance(layer, (QuantConv1d, QuantConv2d, QuantConv3d)):
        return Int8ConvNd.from_quant(layer, name, amax, backend)
    if isinstance(layer, QuantConvTranspose2d):
        return Int8ConvTranspose2d.from_quant(layer, name, amax, backend)
    raise TypeError(f"lq.convert: no int8 inference layer for {type(layer).__name__} ('{name}')")


def _has_foldable_bn(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


def convert(
    model: nn.Module, backend: str = "auto", fold_bn: bool = True, fuse: bool = True, compile: bool = False
) -> nn.Module:
    """Replace every calibrated quantized layer by an int8 inference layer, in place; returns the model.

    For each quantized layer (``lq.quantize`` + ``lq.calibrate``) whose quantizers are all in
    ``"quantize"`` mode, the weight is quantized once to int8 per output channel (eq. 7, the integers the
    fake-quant model used) and the layer runs eq. 10: ``y = (x_q w_q) / (s_x s_w) + b``, an integer GEMM
    or convolution with int32 accumulation. Layers whose quantizers are all off (partial quantization,
    Section 5.1) go back to their float class; layers with only some quantizers on stay fake-quant (a
    warning names them). Average pooling with an input quantizer (``QuantConfig(quantize_pooling=True)``)
    becomes ``Int8AvgPool2d`` / ``Int8AdaptiveAvgPool2d``: the average of the input's grid integers times the
    step, the fake-quant model's numbers up to float rounding. BatchNorms that directly follow a layer are
    folded first (Appendix C, ``lq.fold_bn``) unless ``fold_bn=False``.

    The result is inference-only: it is put in eval mode, the remaining float parameters stop requiring
    grad, and a converted layer raises in train mode or when asked for gradients. ``state_dict()`` holds
    int8 weights (4x smaller than fp32) plus fp32 scales and biases; load it into another model converted
    the same way. If ``model`` is itself a quantized layer, the new int8 layer is returned instead.

    With ``fuse=True``, int8 layers in an ``nn.Sequential`` that only ReLU / max-pool / flatten / identity
    separate hand each other integers instead of floats (``lq.deploy.chain``: the requantization and ReLU
    run in the kernel's output stage, pooling on uint8); such a Sequential becomes an ``Int8Sequential`` in
    place (its class changes; children, names, buffers, hooks and state_dict stay).

    Args:
        model: a model quantized with ``lq.quantize`` and calibrated with ``lq.calibrate``.
        backend: ``"auto"`` (on CPU fbgemm for Linear and oneDNN for Conv, each where its self-test shows
            exact results; ``torch._int_mm`` for Linear on CUDA; exact reference kernels for the rest),
            ``"fbgemm"`` (Linear), ``"onednn"``, ``"int_mm"`` or ``"reference"`` (integer math in float,
            exact; slow, for checking).
        fold_bn: fold foldable BatchNorms into the preceding layer before converting.
        fuse: run int8 layers in Sequentials as integer chains (``lq.deploy.chain``); ``False`` keeps each
            layer float in, float out.
        compile: compile the converted model's forward with ``torch.compile`` (``nn.Module.compile``, in
            place). The int8 layers then run as plain torch ops (``lq.deploy.traced``: ``torch._int_mm`` with
            im2col for convolutions on AVX-512 VNNI CPUs and CUDA, exact float math on the integers
            elsewhere) and Inductor fuses each layer's output stage with what follows in the user's forward
            (ReLU, pooling, residual adds) and the next layer's quantization: no per-call kernel set-up, and
            int8 hand-over for any graph, not only ``nn.Sequential``. The first call per input shape compiles
            (seconds; a C++ compiler is needed on CPU); a new shape, dtype or layout recompiles (torch's
            guards), and code dynamo cannot trace runs eagerly (``lq.deploy.traced.graph_breaks`` lists it).
            Measured on a 2-core AVX-512 VNNI CPU (``benchmarks/bench_convert.py``): the Fashion CNN at batch 1
            goes from 0.5x to 2x torch fp32.

    Raises:
        ValueError: the model has no quantized layers, a layer uses more than 8 bits, unknown backend.
        RuntimeError: a quantized layer is uncalibrated or still calibrating (the message names it).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for flag, value in (("fold_bn", fold_bn), ("fuse", fuse), ("compile", compile)):
        if not isinstance(value, bool):
            raise TypeError(f"lq.convert: {flag} must be True or False, got {value!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = quantized_layers(model)
    if not layers:
        if any(isinstance(m, Int8Module) for m in model.modules()):
            raise ValueError("lq.convert: this model is already converted")
        raise ValueError("lq.convert: the model has no quantized layers; call lq.quantize(model) and lq.calibrate first")
    # Check everything before changing anything: an error leaves the model as it was.
    plans = {name: _plan(name, layer) for name, layer in layers.items()}
    model.eval()
    if fold_bn and _has_foldable_bn(model):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="fold_bn: found no BatchNorm")
            folded = _fold_bn(model)
        if folded:
            log.info("lq.convert: folded %d BatchNorm layers first", len(folded))
    converted, floated, kept = [], [], []
    root_replacement: nn.Module | None = None
    for name, layer in layers.items():
        plan = plans[name]
        if plan == "float":
            restore(layer)
            floated.append(name)
            continue
        if plan == "keep":
            kept.append(name)
            continue
        new = _int8_layer(name or type(layer).__name__, layer, backend)
        new.eval()
        if name == "":
            root_replacement = new
        else:
            parent, child = _parent(model, name)
            setattr(parent, child, new)
        converted.append(name)
    if kept:
        warnings.warn(
            f"lq.convert: {len(kept)} layers have only some quantizers on and stay fake-quant (float compute): "
            f"{kept[:10]}. Turn all their quantizers on or off to convert them",
            stacklevel=2,
        )
    result = root_replacement if root_replacement is not None else model
    if fuse:
        result = fuse_sequentials(result)
    for p in result.parameters():
        p.requires_grad_(False)
    if compile:
        # fp16/bf16: round each layer's output to its dtype before the next layer quantizes it, as eager does
        result.compile(options={"emulate_precision_casts": True})
    log.info(
        "lq.convert: %d layers int8 (oneDNN mode %s), %d back to float, %d kept fake-quant",
        len(converted), onednn_mode(), len(floated), len(kept),
    )
    return result


__all__ = ["convert"]
