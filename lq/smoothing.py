"""SmoothQuant: move activation outliers into the weights (Xiao et al. 2023, *SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models*, eq. 3-4).

A Linear layer ``Y = X W^T`` is unchanged by a per-input-channel scale ``s``: ``Y = (X diag(s)^-1) (W diag(s))^T``.
Transformer activations have a few channels with large values in every token; per-tensor quantization of ``X``
spends its range on them. With ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (eq. 4) those channels shrink in
``X / s`` and grow in ``W diag(s)``, whose per-output-channel quantization absorbs them better.

The paper folds ``s`` into the previous LayerNorm. That changes every consumer of the LayerNorm's output, and
in a post-LN transformer (BERT, MiniLM) that output is also the residual stream. Here ``s`` is kept per layer
instead, as a buffer ``smoothing`` on the layer's input quantizer: the layer divides its input by ``s`` right
before quantizing it (``QuantMixin.input_smoothing``), which ``lq.convert`` does in the same pass that rounds the
input (``Int8Linear``) and ONNX export as one ``Div``. So each layer gets its own ``s`` (Q, K and V need not
share one), residual paths stay untouched, and the float model (quantization disabled, partial quantization,
sensitivity's fp32 reference) computes exactly what it did.

``alpha`` is searched per layer on calibration data (the paper picks one ``alpha`` per model by hand): for each
candidate, including no smoothing at all, the layer's output on a sample of its real inputs is computed with
``X / s`` quantized per tensor (max range) and ``W diag(s)`` per output channel, and the candidate with the least
output MSE against the float output is kept. A layer that smoothing does not help keeps ``s = 1`` (no buffer).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lq.nn.quant_linear import QuantLinear
from lq.quant.functional import qmax

log = logging.getLogger(__name__)

#: the alphas tried per layer (eq. 4); the paper's default is 0.5, and 0.75-0.85 for its hardest models
ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: input rows per layer kept to score the candidates (a random sample of the calibration tokens)
SAMPLE_ROWS = 1024
#: ``lq.calibrate`` (``QuantConfig(smoothquant=True)``) smooths a layer only if that divides its output error at
#: least this much: 2.1-25x on every MiniLM layer, 1.4x at most on the pretrained MNIST CNN's classifier
#: (benchmarks/RESULTS.md), so CNNs keep unsmoothed layers (and their int8 chains, lq.deploy.chain)
MIN_GAIN = 2.0
_S_RANGE = (1e-5, 1e5)


@dataclass
class Smoothing:
    """What ``smooth_quant`` chose for one layer: ``alpha`` (``None``: not smoothed, no candidate beat
    ``s = 1``), the layer's output MSE with ``s = 1`` and with the choice (on the sampled inputs, relative to
    the float output's mean square), and the largest per-channel input range over the median before/after."""

    layer: str
    alpha: float | None
    error_before: float
    error_after: float
    outlier_ratio_before: float
    outlier_ratio_after: float


def smoothings(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: s}`` of every layer ``smooth_quant`` smoothed (the buffer ``smoothing`` of its input
    quantizer)."""
    return {n: m.input_quantizer.smoothing for n, m in model.named_modules()
            if isinstance(m, QuantLinear) and getattr(m.input_quantizer, "smoothing", None) is not None}


def set_smoothing(layer: nn.Module, s: torch.Tensor | None) -> None:
    """Store (or with ``None`` remove) a layer's per-input-channel divisor ``s``, replacing any previous one."""
    q = layer.input_quantizer
    if s is None:
        q._buffers.pop("smoothing", None)
        return
    s = s.detach().to(device=layer.weight.device, dtype=torch.float32).reshape(-1)
    if s.numel() != layer.in_features:
        raise ValueError(f"{q.name}: smoothing has {s.numel()} values, the layer has {layer.in_features} inputs")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"{q.name}: smoothing factors must be finite and positive")
    q._buffers.pop("smoothing", None)
    q.register_buffer("smoothing", s.clone())


def _put_back(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            set_smoothing(m, saved.get(name))


def full_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's whole weight: under FSDP2 a weight read outside a forward is this rank's ``DTensor`` shard,
    gathered here (a collective: every rank calls it for the same layers in the same order)."""
    w = layer.weight
    return w.full_tensor() if hasattr(w, "full_tensor") else w


def _fake_quant(x: torch.Tensor, amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Eq. 7 with a per-tensor or per-row (``amax`` of shape (rows, 1)) range, as float values."""
    q = qmax(bits)
    step = (amax / q).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.clamp(torch.round(x / step), -q, q) * step


def _scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 4, ``s = max|X|^alpha / max|W|^(1 - alpha)`` per input channel; 1 where a channel is all zero."""
    s = x_max.pow(alpha) / w_max.pow(1.0 - alpha)
    s = torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))
    return s.clamp(*_S_RANGE)


def _search(layer: QuantLinear, x_max: torch.Tensor, rows: torch.Tensor, alphas: Sequence[float]) -> tuple[
        list[float | None], torch.Tensor, list[torch.Tensor]]:
    """Output MSE of each candidate (``None`` = no smoothing, then ``alphas``) on the sampled input rows."""
    w = full_weight(layer).detach().float()
    w_max = w.abs().amax(0)
    x = rows.float()
    ref = x @ w.t()
    bits_x, bits_w = layer.input_quantizer.spec.bits, layer.weight_quantizer.spec.bits
    candidates: list[float | None] = [None, *alphas]
    if not x.shape[0]:  # under DDP, a rank whose data never reached the layer: it adds nothing to the errors
        return candidates, torch.zeros(len(candidates), dtype=torch.float64, device=x.device), [
            torch.ones_like(x_max) if a is None else _scales(x_max, w_max, a) for a in candidates]
    errors, scales = [], []
    for alpha in candidates:
        s = torch.ones_like(x_max) if alpha is None else _scales(x_max, w_max, alpha)
        xq = _fake_quant(x / s, (x_max / s).amax(), bits_x)
        ws = w * s
        per_row = layer.weight_quantizer.axis is not None  # per output channel (the default) or per tensor
        wq = _fake_quant(ws, ws.abs().amax(1, keepdim=True) if per_row else ws.abs().amax(), bits_w)
        errors.append(((xq @ wq.t()) - ref).pow(2).mean())
        scales.append(s)
    return candidates, torch.stack(errors).double() / ref.pow(2).mean().clamp_min(1e-30), scales


class SmoothingStats:
    """Forward pre-hooks that measure what the alpha search needs while the float model runs on calibration data:
    each layer's per-input-channel ``max|X_j|`` and a random sample of its input rows. ``lq.calibrate`` installs
    them during its own histogram pass (no extra pass for layers that end up unsmoothed; ``check=False``: NaN/Inf
    is left to the input quantizers, which raise naming themselves); ``smooth_quant`` runs a pass of its own. Any
    previous smoothing of the layers is removed first (their raw inputs are measured), and
    :meth:`undo` puts it back."""

    def __init__(self, model: nn.Module, layers: dict[str, QuantLinear], check: bool = True) -> None:
        self.model, self.layers, self.check = model, layers, check
        self.x_max: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.previous = {n: s.clone() for n, s in smoothings(model).items()}
        self._generator = torch.Generator().manual_seed(0)
        for m in layers.values():
            set_smoothing(m, None)  # measure the raw inputs: the result does not depend on a previous call
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            m = x.abs().amax(0).float()
            if not bool(torch.isfinite(m).all()):
                if not self.check:  # lq.calibrate: the layer's input quantizer raises, naming itself
                    return
                raise ValueError(f"smooth_quant: NaN or Inf in the input of layer '{name}'; check the data or the "
                                 "layers before it")
            self.x_max[name] = m if name not in self.x_max else torch.maximum(self.x_max[name], m)
            kept = sum(r.shape[0] for r in self.samples.get(name, []))
            if kept < SAMPLE_ROWS and x.shape[0]:
                take = min(SAMPLE_ROWS - kept, x.shape[0])
                idx = torch.randperm(x.shape[0], generator=self._generator)[:take].to(x.device)
                self.samples.setdefault(name, []).append(x[idx].float().clone())
        return record

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def undo(self) -> None:
        """Remove the hooks and put back the smoothing the model had before."""
        self.remove_hooks()
        _put_back(self.model, self.previous)

    @torch.no_grad()
    def choose(self, alphas: Sequence[float] = ALPHAS, min_gain: float = 1.0) -> list[Smoothing]:
        """Pick and apply each layer's smoothing from the measured statistics (the hooks are removed). A layer
        keeps ``s = 1`` unless its best candidate cuts the sampled output error at least ``min_gain``-fold.

        Raises ValueError naming layers that never ran (then the previous smoothing is back); with ``check=False``
        they are left out of the report."""
        self.remove_hooks()
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if dist:
            _sync_max(self.x_max, self.layers)
        missing = [n for n in self.layers if n not in self.x_max]
        if missing and self.check:
            self.undo()
            raise ValueError(f"smooth_quant: {missing} never ran on the data (dead branches?); nothing was smoothed. "
                             "Pass data that exercises them, or skip them in QuantConfig")
        report = []
        for name, layer in self.layers.items():
            if name in missing:  # lq.calibrate (check=False) names the layers no batch reached
                continue
            rows = torch.cat(self.samples[name]) if name in self.samples else torch.zeros(0, layer.in_features)
            candidates, errors, scales = _search(layer, self.x_max[name], rows.to(layer.weight.device), alphas)
            if dist:
                torch.distributed.all_reduce(errors)  # every rank keeps the same alpha
            best = int(torch.argmin(errors))
            if candidates[best] is not None and float(errors[best]) * min_gain > float(errors[0]):
                best = 0  # not worth it: the layer stays as it is
            set_smoothing(layer, None if candidates[best] is None else scales[best])
            report.append(Smoothing(name, candidates[best], float(errors[0]), float(errors[best]),
                                    _outlier_ratio(self.x_max[name]), _outlier_ratio(self.x_max[name] / scales[best])))
        self.samples.clear()
        return report


def _sync_max(x_max: dict[str, torch.Tensor], layers: dict[str, QuantLinear]) -> None:
    """Max-reduce the per-channel ranges over ranks. Every rank joins every reduction in the same order; a rank
    whose data never reached a layer contributes zeros (ranges are non-negative)."""
    for name, layer in layers.items():
        buf = x_max[name].clone() if name in x_max else torch.zeros(layer.in_features, device=layer.weight.device)
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX)
        if name in x_max or bool((buf != 0).any()):
            x_max[name] = buf


def _outlier_ratio(x_max: torch.Tensor) -> float:
    return float(x_max.max() / x_max.median().clamp_min(1e-12))


def smoothable_layers(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, QuantLinear]:
    """The QuantLinear layers to smooth: ``layers`` by name, or every one whose input and weight quantizers are
    enabled. Raises ValueError for unknown names."""
    linear = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if layers is not None:
        unknown = [n for n in layers if n not in linear]
        if unknown:
            raise ValueError(f"smooth_quant: {unknown} are not quantized Linear layers of the model; "
                             f"the quantized Linear layers are {sorted(linear)[:10]}")
        return {n: linear[n] for n in layers}
    return {n: m for n, m in linear.items() if m.input_quantizer.spec.enabled and m.weight_quantizer.spec.enabled}


def smooth_quant(
    model: nn.Module,
    data: Any,
    num_samples: int | None = 512,
    alphas: Sequence[float] = ALPHAS,
    layers: Sequence[str] | None = None,
    min_gain: float = 1.0,
) -> list[Smoothing]:
    """Smooth each quantized Linear layer's input (SmoothQuant, eq. 4), with ``alpha`` searched per layer.

    Runs the float model on ``data`` (every quantizer off) to measure each layer's per-input-channel range
    ``max|X_j|`` and to sample its input rows, then keeps per layer the ``alpha`` (or no smoothing) with the least
    output error (module docstring). Call it after ``lq.quantize`` and before ``lq.calibrate`` (which then keeps
    these factors); or leave ``QuantConfig(smoothquant=True)`` (the default), with which ``lq.calibrate`` of a
    model not yet smoothed measures the same statistics in its own histogram pass and smooths the layers where it
    cuts the error at least ``MIN_GAIN``-fold. A second call measures the unsmoothed inputs again and replaces
    the previous factors. Calibrated ranges of a layer whose factors changed (or were removed) no longer fit
    it: they are reset with a warning (calibrate again).

    Args:
        model: a quantized model (``lq.quantize``).
        data: a DataLoader / iterable of batches, or a ``forward_loop(model)`` callable (as ``lq.calibrate``).
        num_samples: samples to measure (``None``: the whole iterable).
        alphas: the migration strengths to try, each in [0, 1].
        layers: names of the QuantLinear layers to smooth (default: every one whose input and weight quantizers
            are enabled).
        min_gain: smooth a layer only if that divides its output error on the sampled inputs at least this much
            (1.0: any improvement).

    Returns:
        One :class:`Smoothing` per examined layer.

    Raises:
        ValueError: no quantized Linear layer, a name in ``layers`` that is not one, an ``alpha`` outside [0, 1],
            a layer that never ran on ``data``, or NaN/Inf in a layer's input (the layer is named). The model is
            then unchanged.
    """
    from lq.workflow import _eval_no_grad, _run_data, quantization_disabled

    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples <= 0):
        raise ValueError(f"smooth_quant: num_samples must be a positive int or None, got {num_samples!r}")
    if not float(min_gain) >= 1.0:
        raise ValueError(f"smooth_quant: min_gain must be >= 1, got {min_gain!r}")
    checked = [float(a) for a in alphas]
    if not checked or any(not 0.0 <= a <= 1.0 for a in checked):
        raise ValueError(f"smooth_quant: alphas must be a non-empty list of values in [0, 1], got {list(alphas)}")
    chosen = smoothable_layers(model, layers)
    if not chosen:
        raise ValueError("smooth_quant: the model has no quantized Linear layer with input and weight quantization "
                         "enabled; call lq.quantize(model) first (SmoothQuant applies to Linear layers only)")
    stats = SmoothingStats(model, chosen)
    try:
        with _eval_no_grad(model), quantization_disabled(model):
            _run_data(model, data, num_samples)
        report = stats.choose(checked, min_gain)
    except BaseException:
        stats.undo()
        raise
    stale = []
    for entry in report:
        layer = chosen[entry.layer]
        before, now = stats.previous.get(entry.layer), getattr(layer.input_quantizer, "smoothing", None)
        changed = (before is None) != (now is None) or (now is not None and not torch.equal(before, now))
        for q in (layer.input_quantizer, layer.weight_quantizer):
            if changed and not q.dynamic and q.is_calibrated:  # ranges measured on the other x / s or W diag(s)
                stale.append(q.name)
                q.amax.data.fill_(float("nan"))
    if stale:
        warnings.warn(f"smooth_quant: the ranges of {len(stale)} calibrated quantizers (e.g. {stale[0]}) no longer "
                      "fit the smoothed layers and were reset; run lq.calibrate(model, data) again", stacklevel=2)
    log.info("smooth_quant: smoothed %d of %d Linear layers", sum(r.alpha is not None for r in report), len(report))
    return report
