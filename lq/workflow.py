"""The paper's recommended workflow (Wu et al. 2020, Section 6, Fig. 5) as plain functions.

PTQ: ``quantize`` then ``calibrate`` (max / entropy / percentile / mse, or "auto" = the best on an evaluate
function). Partial quantization: ``sensitivity`` (one layer quantized at a time, Section 5.1) then
``partial_quantize`` (keep the most sensitive layers in float until the metric is within target). The
Lightning callbacks in ``lq.callbacks`` are doors onto these functions.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lq.batches import batch_size, forward_batch
from lq.calib.histogram import release_scratch
from lq.nn.swap import quantized_layers
from lq.progress import Show, check_show, track
from lq.quant.config import AUTO_CANDIDATES
from lq.quant.quantizer import TensorQuantizer

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], float]

#: calibration samples replayed to score calibrator "layerwise" (lq.layer_choice)
LAYERWISE_SAMPLES = 256
#: of those, how many score the per-layer choice against each single calibrator on the model's output
GUARD_SAMPLES = 32


def quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """``{name: TensorQuantizer}`` for every quantizer in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def _require_quantized(model: nn.Module, what: str) -> dict[str, nn.Module]:
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no quantized layers; call lq.quantize(model, config) first")
    return layers


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _run_data(model: nn.Module, data: Any, num_samples: int | None, keep: list | None = None, keep_samples: int = 0) -> int:
    """Forward ``data`` (an iterable of batches, or a ``forward_loop(model)`` callable) through the model.
    Returns how many samples were seen (``-1`` for a forward_loop, which counts for itself). ``keep``: a list
    that receives the first batches, about ``keep_samples`` samples (a one-shot iterator cannot be re-read)."""
    if callable(data) and not isinstance(data, (torch.utils.data.DataLoader, Iterable)):
        data(model)
        return -1
    if not isinstance(data, Iterable):
        raise TypeError(
            f"calibration data must be a DataLoader/iterable of batches or a forward_loop(model) callable, "
            f"got {type(data).__name__}"
        )
    seen = 0
    for batch in data:
        n = batch_size(batch)
        if num_samples is not None and seen + n > num_samples:
            batch = _take(batch, num_samples - seen)
            n = num_samples - seen
        forward_batch(model, batch)
        if keep is not None and seen < keep_samples:
            keep.append(batch)
        seen += n
        if num_samples is not None and seen >= num_samples:
            break
    if seen == 0:
        raise ValueError(
            "calibration data is empty (the data loader yielded no batch, or it is an exhausted iterator); "
            "pass a DataLoader over training samples"
        )
    return seen


def _take(batch: Any, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: _take(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_take(v, n) for v in batch)
    return batch


def calibrate(
    model: nn.Module,
    data: Any,
    num_samples: int | None = 1024,
    method: str | None = None,
    evaluate: Evaluate | None = None,
    percentile: float | None = None,
    layerwise_scope: str = "layer",
    progress: Show = None,
) -> nn.Module:
    """Calibrate every quantizer of a quantized model (Section 3.4, Appendix A: 1024 samples for CNNs).

    Weights with max calibration need no data (their range is the per-channel max, recomputed at every
    forward); other weight calibrators see the weights once. Activation statistics are collected on the
    float model (quantization off), in eval mode under no_grad, then ranges are computed with each
    quantizer's calibrator, or ``method`` for all activations ("max", "entropy", "percentile", "mse",
    "auto"). "auto" (the paper's "PTQ best") tries max, entropy, 99.9..99.9999% percentiles and mse from one
    histogram and keeps the best by ``evaluate(model) -> float`` (higher is better).

    Under torch.distributed the statistics are reduced across ranks, so every rank ends with the same amax.

    Args:
        data: a DataLoader / iterable of batches (tensor, ``(x, y, ...)`` tuple or dict of keyword inputs),
            or a callable ``forward_loop(model)`` that runs the forward passes itself.
        num_samples: stop after this many samples (``None``: the whole iterable).
        layerwise_scope: for calibrator "layerwise": score each candidate range by its layer's output error
            (``"layer"``, one scoring pass over 256 samples) or by the model's output error (``"model"``, one pass
            per candidate and quantizer; better on transformers, see ``lq.layer_choice``).
        progress: for "auto", a progress bar with ETA over the candidate calibrations (``lq.progress``: True,
            False, or None = only when stderr is a terminal).
    With ``QuantConfig(bias_correction=True)`` the biases are then corrected for the output shift of weight
    quantization (``lq.correct_bias``, on the first 256 calibration samples).

    Returns the model, calibrated and in quantize mode.
    """
    layers = _require_quantized(model, "lq.calibrate")
    check_show(progress, "lq.calibrate")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples <= 0):
        raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}")
    if layerwise_scope not in ("layer", "model"):
        raise ValueError(f"layerwise_scope must be 'layer' or 'model', got {layerwise_scope!r}")
    qs = quantizers(model)
    wanted_auto = method == "auto" or any(q.spec.calibrator == "auto" and q.spec.enabled for q in qs.values())
    if wanted_auto and evaluate is None:
        raise ValueError("calibrator 'auto' keeps the best calibration by a metric: pass evaluate=fn(model)->float")
    previous = {n: q.mode for n, q in qs.items()}
    weight_ids = {id(getattr(m, "weight_quantizer", None)) for m in layers.values()}
    weights = {n: q for n, q in qs.items() if id(q) in weight_ids and q.spec.enabled and not q.dynamic}
    act = {n: q for n, q in qs.items() if id(q) not in weight_ids and q.spec.enabled}
    layerwise = {n for n, q in act.items() if (method or q.spec.calibrator) == "layerwise"}
    config = getattr(model, "_lq_config", None)
    correct = bool(getattr(config, "bias_correction", False))
    smooth = bool(getattr(config, "smoothquant", False))
    model.__dict__.pop("_lq_layerwise", None)  # a previous per-layer choice no longer describes the ranges
    kept: list = []  # the first calibration batches, replayed to score the per-layer choice
    # What to put back if calibration fails (a forward_loop that raises, NaN in a batch, a layer no batch
    # reached): the model keeps its previous calibration, whole.
    saved = {n: (q.amax.detach().clone(), q.calib_choice) for n, q in qs.items()}
    from lq.smoothing import MIN_GAIN, SmoothingStats, _put_back, full_weight, smoothable_layers, smoothings

    saved_smoothing = {n: s.clone() for n, s in smoothings(model).items()}

    def undo() -> None:
        _restore(qs, saved)
        _put_back(model, saved_smoothing)

    # QuantConfig(smoothquant=True): SmoothQuant's statistics are measured in the histogram pass below; the layers
    # it smooths (lq.smoothing.MIN_GAIN) collect their histograms again, of x / s, in a second pass over the kept
    # first 256 samples (the whole forward_loop for a callable).
    # A model that is already smoothed (lq.smooth_quant, or a previous lq.calibrate) keeps its factors: they
    # are not searched again, so an explicit smooth_quant's alphas / layers / min_gain stand.
    smooth_layers = smoothable_layers(model) if smooth and not saved_smoothing else {}
    stats = None
    try:
        # (removes the layers' previous smoothing: their raw inputs and weights are measured)
        stats = SmoothingStats(model, smooth_layers, check=False) if smooth_layers else None
        # Weights: static, one look each (before any forward: under FSDP2 the weights are whole only until then).
        for name, q in weights.items():
            q.start_calibration()
            q(model.get_submodule(name.rpartition(".")[0]).smoothed_weight().detach())
            q.load_calib_amax()
        # Activations: collected on the float model (every other quantizer off).
        for q in qs.values():
            q.mode = "off"
        for q in act.values():
            q.start_calibration(method)
        with _eval_no_grad(model):
            seen = _run_data(model, data, num_samples, kept if layerwise or correct or smooth_layers else None,
                             LAYERWISE_SAMPLES)
        if num_samples is not None and 0 <= seen < num_samples:
            warnings.warn(
                f"lq.calibrate: asked for {num_samples} samples but the data held {seen}; calibrated on {seen}",
                stacklevel=2,
            )
        if stats is not None:
            report = stats.choose(min_gain=MIN_GAIN)
            model.__dict__["_lq_smoothing"] = report  # read by the callbacks' log (lq.smoothing.Smoothing rows)
            smoothed = [r.layer for r in report if r.alpha is not None]
            for n in smoothed:  # a static weight quantizer of a smoothed layer sees W diag(s)
                layer = smooth_layers[n]
                q = layer.weight_quantizer
                if any(q is w for w in weights.values()):
                    q.start_calibration()
                    q(full_weight(layer).detach() * layer.input_quantizer.smoothing)
                    q.load_calib_amax()
                    q.mode = "off"
            if smoothed:
                again = {id(smooth_layers[n].input_quantizer) for n in smoothed}
                for q in act.values():
                    if id(q) in again:
                        q.start_calibration(method)
                    else:
                        q.mode = "off"  # its histogram is complete; it passes its input through
                with _eval_no_grad(model):
                    _run_data(model, kept or data, None if kept else num_samples)
        for q in act.values():
            # Every rank joins every reduction (a rank that saw no data for a layer still takes part), so
            # DDP never waits on a rank that skipped; afterwards has_data is true if any rank collected.
            q.calibrator.sync()
        missing = [n for n, q in act.items() if not q.calibrator.has_data]
        if missing:
            raise ValueError(
                f"lq.calibrate: {len(missing)} quantizers saw no data during calibration: {missing[:10]}. If these "
                "layers run in forward, check that the calibration data reaches them; otherwise add them to "
                "QuantConfig.skip (the model keeps its previous calibration)"
            )
        for name, q in act.items():
            _warn_thin_histogram(name, q)
            q.load_calib_amax(method if method not in (None, "auto") else None, percentile=percentile)
    except BaseException:
        if stats is not None:
            stats.remove_hooks()
        undo()
        raise
    finally:
        release_scratch()  # the histogram collection's reused buffers
        # Back to the previous modes; a quantizer that was calibrating quantizes now.
        for n, q in qs.items():
            q.mode = "quantize" if previous[n] == "calibrate" else previous[n]
    log.info("lq.calibrate: calibrated %d layers on %s samples", len(layers), "all" if seen < 0 else seen)
    if layerwise:
        from lq.layer_choice import choose_per_layer

        def replay(m: nn.Module) -> None:
            with _eval_no_grad(m):
                if kept:
                    for batch in kept:
                        forward_batch(m, batch)
                else:  # a forward_loop(model) callable: it runs its own passes again
                    data(m)

        guard_batches, left = [], GUARD_SAMPLES
        for batch in kept:
            if left <= 0:
                break
            n = min(batch_size(batch), left)
            guard_batches.append(_take(batch, n))
            left -= n

        def replay_guard(m: nn.Module) -> None:
            with _eval_no_grad(m):
                for batch in guard_batches:
                    forward_batch(m, batch)

        try:
            # the comparison with single calibrators needs a few kept samples: a forward_loop(model) callable
            # would run its whole loop 8 more times, so there the per-layer choice stands as it is
            choose_per_layer(model, replay, names=layerwise, scope=layerwise_scope, guard_run=replay_guard,
                             guard=bool(guard_batches))
        except BaseException:
            undo()
            raise
    if wanted_auto:
        choose_calibration(model, evaluate, progress=progress)
    if correct:  # QuantConfig(bias_correction=True): on the final ranges, with the kept batches (Nagel et al.)
        from lq.bias_correction import correct_bias

        try:  # it changes nothing when it raises; the ranges go back as for any failed calibration
            correct_bias(model, kept or data, None if kept else num_samples)
        except BaseException:
            undo()
            raise
    return model


def _restore(qs: dict[str, TensorQuantizer], saved: dict[str, tuple[torch.Tensor, Any]]) -> None:
    """Put back the ranges (and per-layer choices) ``lq.calibrate`` found when it started."""
    with torch.no_grad():
        for name, (amax, choice) in saved.items():
            qs[name].amax.copy_(amax)
            qs[name].calib_choice = choice


#: a histogram with fewer values than this many times its bins gives unreliable entropy/percentile/mse ranges
THIN_HISTOGRAM = 1


def _warn_thin_histogram(name: str, q: TensorQuantizer) -> None:
    """Warn when a layer's histogram holds fewer values than it has bins (too few calibration samples)."""
    hist = getattr(q.calibrator, "histogram", None)
    if hist is None:
        return
    counts, _ = hist()
    total, bins = int(counts.sum()), counts.shape[-1]
    if total < THIN_HISTOGRAM * bins * (counts.shape[0] if counts.dim() > 1 else 1):
        warnings.warn(
            f"lq.calibrate: layer '{name.rpartition('.')[0]}' collected only {total} values for a {bins}-bin "
            "histogram: its entropy / percentile / mse ranges rest on too few samples. Calibrate on more data "
            "(paper Appendix A: 1024 samples) or use calibrator 'max'",
            stacklevel=3,
        )


@dataclass
class CalibrationChoice:
    """Result of trying several activation calibrations (the paper's Table 5 row for one model)."""

    best: str
    scores: dict[str, float]


def _candidate_name(method: str, percentile: float | None) -> str:
    return f"percentile_{percentile:g}" if method == "percentile" else method


def choose_calibration(
    model: nn.Module,
    evaluate: Evaluate,
    candidates: Iterable[tuple[str, float | None]] = AUTO_CANDIDATES,
    mode: str = "max",
    progress: Show = None,
) -> CalibrationChoice:
    """Load each candidate activation calibration, evaluate, and keep the best (Section 6, "PTQ").

    Needs histogram statistics from a previous ``calibrate`` with an "entropy"/"percentile"/"mse"/"auto"
    activation calibrator. The chosen amax values are loaded; the choice is stored on the model and
    returned. ``progress``: a bar with ETA over the candidates (``lq.progress``; None = only on a terminal).
    """
    _check_mode(mode)
    check_show(progress, "lq.choose_calibration")
    candidates = list(candidates)
    act = {
        n: q
        for n, q in quantizers(model).items()
        if not q.dynamic and q.calibrator is not None and q.calibrator.has_data and q.mode == "quantize"
    }
    if not act:
        raise ValueError("choose_calibration: no calibrated activation quantizers; run lq.calibrate first")
    if any(type(q.calibrator).__name__ == "MaxCalibrator" for q in act.values()):
        raise ValueError(
            "choose_calibration needs histograms: use calibrator 'entropy', 'percentile', 'mse' or 'auto' "
            "for activations (a max calibrator keeps only the maximum)"
        )
    scores: dict[str, float] = {}
    for method, pct in track(candidates, progress, "lq: calibrator auto", "calibration", lambda c: _candidate_name(*c)):
        for q in act.values():
            q.load_calib_amax(method, percentile=pct)
        scores[_candidate_name(method, pct)] = _score(evaluate, model)
    best_name = (max if mode == "max" else min)(scores, key=scores.get)
    best = dict((_candidate_name(m, p), (m, p)) for m, p in candidates)[best_name]
    for q in act.values():
        q.load_calib_amax(best[0], percentile=best[1])
    choice = CalibrationChoice(best=best_name, scores=scores)
    model._lq_calibration = choice  # noqa: SLF001
    log.info("lq: calibration scores %s; kept %s", scores, best_name)
    return choice


def _check_mode(mode: str) -> None:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' (higher metric is better) or 'min', got {mode!r}")


def _score(evaluate: Evaluate, model: nn.Module) -> float:
    value = evaluate(model)
    if isinstance(value, torch.Tensor):
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"evaluate(model) must return a number, got {type(value).__name__}") from err
    if not math.isfinite(value):
        raise ValueError(f"evaluate(model) returned {value}; the metric must be finite")
    return value


# ------------------------------------------------------------------------------- enabling / disabling
def _layer_names(model: nn.Module, layers: Iterable[str] | None) -> list[str]:
    all_layers = quantized_layers(model)
    if layers is None:
        return list(all_layers)
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [n for n in layers if n not in all_layers]
    if unknown:
        raise ValueError(f"not quantized layers of this model: {unknown}; quantized layers: {list(all_layers)[:10]}...")
    return layers


def set_quantization(model: nn.Module, enabled: bool, layers: Iterable[str] | None = None) -> None:
    """Turn quantization of ``layers`` (default: all) on or off. Off = the layer runs in float."""
    all_layers = quantized_layers(model)
    for name in _layer_names(model, layers):
        for q in all_layers[name].quantizers().values():
            q.mode = "quantize" if enabled else "off"


@contextlib.contextmanager
def quantization_disabled(
    model: nn.Module, layers: Iterable[str] | None = None, keep: Iterable[str] | None = None
) -> Iterator[nn.Module]:
    """Run the float reference inside the block: quantizers of ``layers`` (default: all) are off,
    except those of ``keep``. The previous modes come back on exit."""
    qs = quantizers(model)
    previous = {n: q.mode for n, q in qs.items()}
    try:
        set_quantization(model, False, layers)
        if keep is not None:
            set_quantization(model, True, keep)
        yield model
    finally:
        for n, q in qs.items():
            q.mode = previous[n]


def enabled_layers(model: nn.Module) -> list[str]:
    """Names of quantized layers whose quantizers are on."""
    return [n for n, m in quantized_layers(model).items() if any(q.mode != "off" for q in m.quantizers().values())]


# ------------------------------------------------------------------------------- sensitivity (5.1)
@dataclass
class SensitivityReport:
    """One-at-a-time sensitivity analysis (Section 5.1, Fig. 3).

    ``layers`` maps each layer to the metric with only that layer quantized, ordered from the most
    sensitive (worst metric) to the least.
    """

    fp32: float
    int8: float
    layers: dict[str, float]
    mode: str = "max"

    def ranking(self) -> list[str]:
        return list(self.layers)

    def rows(self) -> list[tuple[str, float, float]]:
        """(layer, metric with only it quantized, drop vs fp32 relative)."""
        return [(n, v, _relative_drop(self.fp32, v, self.mode)) for n, v in self.layers.items()]


def _relative_drop(ref: float, value: float, mode: str) -> float:
    """(ref - value) / |ref| for a higher-is-better metric (the paper's relative accuracy change, negated)."""
    diff = ref - value if mode == "max" else value - ref
    return diff / abs(ref) if ref != 0 else diff


def sensitivity(
    model: nn.Module,
    evaluate: Evaluate,
    mode: str = "max",
    layers: Iterable[str] | None = None,
    progress: Show | Callable[[Iterable], Iterable] = None,
) -> SensitivityReport:
    """Quantize one layer at a time and evaluate (Section 5.1). The model's modes are restored after.

    ``evaluate(model) -> float`` is the metric (higher is better with ``mode="max"``). Layers already
    turned off (e.g. by partial quantization) are measured too; ``layers`` restricts the sweep.
    ``progress``: a bar with ETA over the evaluations (fp32, all int8, then one per layer, the layer's name
    as postfix; ``lq.progress``): True, False, or None = only when stderr is a terminal. A callable
    ``progress(names)`` instead wraps the per-layer loop itself (e.g. ``tqdm``).
    """
    _check_mode(mode)
    if not callable(progress):
        check_show(progress, "lq.sensitivity")
    _require_quantized(model, "lq.sensitivity")
    names = _layer_names(model, layers)
    # (label, layers kept quantized): fp32 = none, all int8 = every swept layer, then one layer at a time
    runs: Iterable[tuple[str, list[str]]] = [("fp32", []), ("all int8", names)] + [(n, [n]) for n in names]
    if callable(progress):  # the caller's wrapper drives the per-layer loop (lazily: its bar times each layer)
        runs = itertools.chain(runs[:2], ((n, [n]) for n in progress(names)))
    else:
        runs = track(runs, progress, "lq: sensitivity", "eval", lambda r: r[0])
    scores: list[float] = []
    per_layer = {}
    for i, (label, keep) in enumerate(runs):
        with quantization_disabled(model, keep=keep):
            value = _score(evaluate, model)
        if i >= 2:
            per_layer[label] = value
        scores.append(value)
    fp32, int8 = scores[0], scores[1]
    ordered = dict(sorted(per_layer.items(), key=lambda kv: kv[1], reverse=(mode == "min")))
    report = SensitivityReport(fp32=fp32, int8=int8, layers=ordered, mode=mode)
    log.info("lq.sensitivity: fp32 %.4f, all quantized %.4f, most sensitive %s", fp32, int8, list(ordered)[:5])
    return report


@dataclass
class PartialQuantization:
    """Result of ``partial_quantize``: which layers stay in float and the metric reached."""

    skipped: list[str]
    metric: float
    fp32: float
    target: float
    reached: bool
    history: list[tuple[int, float]] = field(default_factory=list)
    report: SensitivityReport | None = None


def partial_quantize(
    model: nn.Module,
    evaluate: Evaluate,
    target: float = 0.01,
    mode: str = "max",
    report: SensitivityReport | None = None,
    max_skipped: int | None = None,
    progress: Show = None,
) -> PartialQuantization:
    """Keep the most sensitive layers in float until the metric is within ``target`` (relative) of fp32.

    Section 5.1 / Table 6: sort layers by one-at-a-time sensitivity, skip quantization of the most
    sensitive first, and stop at the smallest skip set that meets the target. The model is left with
    those layers' quantizers off; the result lists them. ``progress``: a bar with ETA over the evaluations
    (the layer just kept in float as postfix; also over the sensitivity sweep when ``report`` is not given;
    ``lq.progress``: True, False, or None = only when stderr is a terminal).
    """
    _check_mode(mode)
    check_show(progress, "lq.partial_quantize")
    if not 0 <= target < 1:
        raise ValueError(f"target is a relative drop in [0, 1), e.g. 0.01 for 1%, got {target!r}")
    _require_quantized(model, "lq.partial_quantize")
    report = report or sensitivity(model, evaluate, mode=mode, layers=enabled_layers(model), progress=progress)
    order = [n for n in report.ranking() if n in quantized_layers(model)]
    limit = len(order) if max_skipped is None else min(max_skipped, len(order))
    history = []
    skipped: list[str] = []
    metric = report.int8
    steps = track(
        list(range(limit + 1)), progress, "lq: partial quantization", "eval",
        lambda k: "all int8" if k == 0 else f"+{order[k - 1]} in float",
    )
    for k in steps:
        skipped = order[:k]
        with quantization_disabled(model, layers=skipped) if skipped else contextlib.nullcontext():
            metric = report.int8 if k == 0 else _score(evaluate, model)
        history.append((k, metric))
        if _relative_drop(report.fp32, metric, mode) <= target:
            break
    reached = _relative_drop(report.fp32, metric, mode) <= target
    if skipped:
        set_quantization(model, False, skipped)
    if not reached:
        warnings.warn(
            f"lq.partial_quantize: skipping {len(skipped)} layers reached {metric:.4f} vs fp32 {report.fp32:.4f}, "
            f"not within {target:.2%}; consider QAT (lq.callbacks.Int8QAT)",
            stacklevel=2,
        )
    model._lq_skipped = list(skipped)  # noqa: SLF001
    log.info("lq.partial_quantize: %d layers in float %s -> metric %.4f (fp32 %.4f)", len(skipped), skipped, metric, report.fp32)
    return PartialQuantization(skipped, metric, report.fp32, target, reached, history, report)
