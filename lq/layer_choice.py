"""Label-free "PTQ best" per layer: each activation quantizer gets the calibration (max, entropy,
percentiles, mse; the paper's Table 5 columns) that quantizes its layer's output best, without labels.

Wu et al. 2020 (Section 4.2, Table 5) find that no single calibrator is best for every network and report
"PTQ best" as the best of them for the whole model, chosen on the validation metric. Here the choice is
made per layer and needs no metric: on calibration data, in the order the forward pass reaches the layers
(topological order, with the layers before already quantized by their choice), every candidate range of a
layer's input quantizer is scored by the error it causes in that layer's output,

    err(c) = || f(Q_c(x), Q(W)) - f(x, W) ||^2,

where ``x`` is the input that actually arrives (so upstream quantization error is accounted for), ``f`` the
layer (conv / linear / matmul), ``Q_c`` eq. 12 with the candidate's amax, and ``f(x, W)`` the same layer in
float. The candidate with the smallest error summed over the calibration batches is kept. One extra forward
pass over a subset of the calibration data, with ``len(candidates) + 1`` evaluations of each quantized layer,
reads every candidate off the histograms the calibration pass already collected.

Online over batches: while later batches arrive, each layer runs with the candidate that is best on the
batches seen so far, so layers downstream see the input they will see after calibration (up to that
running choice).

Then (scope "layer", what ``lq.calibrate`` runs by default) the per-layer choice is compared with each single
calibrator applied to every chosen quantizer (entropy aside), by the model's output error against the float
model on the first 32 kept samples, and the smallest error is kept: a layer's own output error can prefer a
range that is worse for the model (MiniLM: 0.9841 mean cosine per layer, 0.9887 after this comparison, which
kept percentile 99.99% everywhere). Costs 8 passes over those 32 samples (benchmarks/RESULTS.md).

``scope="model"`` scores each candidate by the error of the *model's* output instead (greedy in execution
order: the quantizers before at their choice, the ones after still in float), which sees what a layer's
error does downstream, e.g. through LayerNorm and attention. It costs ``len(candidates)`` forward passes of
the scoring data per quantizer instead of one: on MiniLM it lifts the mean embedding cosine from 0.984
(``"layer"``) to 0.993, above every single calibrator (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lq.nn.swap import quantized_layers
from lq.quant.config import AUTO_CANDIDATES
from lq.quant.quantizer import TensorQuantizer

log = logging.getLogger(__name__)

#: The input quantizers a layer may have, in the order their choices are made.
_INPUT_QUANTIZERS = ("input_quantizer", "other_quantizer")
#: what a candidate's error is measured on
SCOPES = ("layer", "model")


def candidate_name(method: str, percentile: float | None) -> str:
    return f"percentile_{percentile:g}" if method == "percentile" else method


@dataclass
class LayerwiseChoice:
    """Per activation quantizer: the kept candidate and each candidate's output error relative to the
    float output's energy (``sum err / sum ||f(x, W)||^2`` over the scored batches)."""

    methods: dict[str, str] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    #: scope "layer": the model-output error (relative to the float output's energy) of the per-layer choice
    #: ("per-layer") and of every candidate applied to all chosen quantizers; the smallest was kept
    model_errors: dict[str, float] = field(default_factory=dict)
    #: scope "layer": each quantizer's own choice before that comparison
    per_layer: dict[str, str] = field(default_factory=dict)

    def table(self) -> list[tuple[str, str, float]]:
        """``(quantizer, chosen candidate, its relative output error)`` rows."""
        return [(n, m, self.errors[n][m]) for n, m in self.methods.items()]


class _LayerScorer:
    """The forward pre-hook of one quantized layer: scores its quantizers' candidates on the arriving input,
    then leaves each quantizer at its best-so-far candidate for the real forward."""

    def __init__(self, quantizers: dict[str, TensorQuantizer], amaxes: dict[str, dict]) -> None:
        self.quantizers = quantizers  # full name -> quantizer (those of this layer that are chosen)
        self.amaxes = amaxes  # full name -> {candidate: amax}
        self.errors = {n: dict.fromkeys(amaxes[n], 0.0) for n in quantizers}
        self.energy = {n: 0.0 for n in quantizers}
        self.calls = 0

    @torch.no_grad()
    def __call__(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        own = [m for m in layer.modules() if isinstance(m, TensorQuantizer)]
        modes = [q.mode for q in own]
        try:
            for q in own:
                q.mode = "off"
            ref = layer.forward(*args, **kwargs).float()
        finally:
            for q, mode in zip(own, modes):
                q.mode = mode
        energy = float(ref.pow(2).sum())
        for name, q in self.quantizers.items():
            self.energy[name] += energy
            for cand, amax in self.amaxes[name].items():
                q.amax.data.copy_(amax)
                out = layer.forward(*args, **kwargs).float()
                self.errors[name][cand] += float((out - ref).pow(2).sum())
            q.amax.data.copy_(self.amaxes[name][self.best(name)])  # the real forward runs with it

    def best(self, name: str) -> str:
        errs = self.errors[name]
        return min(errs, key=errs.get)


def choose_per_layer(
    model: nn.Module,
    run: Any,
    candidates: Sequence[tuple[str, float | None]] = AUTO_CANDIDATES,
    names: Iterable[str] | None = None,
    scope: str = "layer",
    guard_run: Any = None,
    guard: bool = True,
) -> LayerwiseChoice:
    """Pick every histogram-calibrated activation quantizer's range by its layer's output error (see module
    docstring). ``run(model)`` runs the forward passes to score on (a subset of the calibration data).

    Needs the histograms of a previous collection (``lq.calibrate`` does both). Weight quantizers and
    quantizers that are off are left alone; ``names`` limits the choice to those quantizers. ``scope``: score by
    the layer's output error (``"layer"``, one scoring pass) or the model's (``"model"``, see the module
    docstring). With scope "layer" the per-layer choice is then compared with every candidate applied to all
    the quantizers by the model-output error over ``guard_run(model)`` (default ``run``; ``lq.calibrate`` passes
    32 samples), and the smallest is kept (``guard=False``: the per-layer choice as it is).
    Returns the choice; the chosen amax values are loaded and each
    quantizer remembers its choice (``TensorQuantizer.calib_choice``).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    layers = quantized_layers(model)
    wanted = None if names is None else set(names)
    qs = _histogram_quantizers(layers, wanted)
    if scope == "model":
        return _choose_by_model_output(model, run, candidates, qs)
    by_layer: dict[str, dict[str, TensorQuantizer]] = {}
    for full, q in qs.items():
        by_layer.setdefault(full.rpartition(".")[0], {})[full] = q
    scorers: dict[str, _LayerScorer] = {}
    handles = []
    for lname, chosen in by_layer.items():
        amaxes = {full: _candidate_amaxes(q, candidates) for full, q in chosen.items()}
        scorers[lname] = _LayerScorer(chosen, amaxes)
        handles.append(layers[lname].register_forward_pre_hook(scorers[lname], with_kwargs=True))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    _reduce_across_ranks(scorers)
    choice = LayerwiseChoice()
    by_name = dict(candidates_by_name(candidates))
    never = []
    for scorer in scorers.values():
        for name, q in scorer.quantizers.items():
            if scorer.calls == 0:
                never.append(name)
                continue
            best = scorer.best(name)
            q.amax.data.copy_(scorer.amaxes[name][best])
            q.calib_choice = by_name[best]
            choice.methods[name] = best
            total = max(scorer.energy[name], 1e-30)
            choice.errors[name] = {c: e / total for c, e in scorer.errors[name].items()}
    if never:
        raise RuntimeError(
            f"per-layer calibration choice: layers {never[:10]} did not run during the scoring pass, so no range "
            "could be chosen for them. Check that the calibration data reaches them, or skip them in "
            "QuantConfig.skip"
        )
    choice.per_layer = dict(choice.methods)
    if guard:
        _keep_if_better_than_uniform(model, guard_run or run, [c for c in candidates if c[0] != "entropy"], qs, choice)
    model._lq_layerwise = choice  # noqa: SLF001 - read by reports / trackers
    log.info("lq: per-layer calibration choice: %s", {n: m for n, m in choice.methods.items()})
    return choice


def _squared_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """``sum ||o - r||^2`` over the model outputs of one scoring run against the float run's."""
    return sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, reference))


def _summed_over_ranks(errors: dict[str, float], mean: bool = False) -> dict[str, float]:
    """Each candidate's error summed (``mean``: averaged) over torch.distributed ranks, so all ranks pick the
    same one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = _all_reduce_sum(list(errors.values()))
        return dict(zip(errors, (total / dist.get_world_size() if mean else total).tolist()))
    return errors


def _model_outputs(model: nn.Module, run: Any) -> list[torch.Tensor]:
    """The model's floating-point outputs over ``run(model)``'s forward passes."""
    from torch.utils._pytree import tree_leaves

    outputs: list[torch.Tensor] = []

    def capture(_module, _args, output) -> None:
        outputs.extend(t.detach().float() for t in tree_leaves(output)
                       if isinstance(t, torch.Tensor) and t.is_floating_point())

    handle = model.register_forward_hook(capture)
    try:
        run(model)
    finally:
        handle.remove()
    return outputs


def _keep_if_better_than_uniform(
    model: nn.Module, run: Any, candidates: Sequence[tuple[str, float | None]], qs: dict[str, TensorQuantizer],
    choice: LayerwiseChoice,
) -> None:
    """The guard of scope "layer": a layer's own output error can prefer a range that is worse for the model
    (on MiniLM it kept the hidden states' outliers where clipping them serves the embedding). Score the
    per-layer choice and each candidate applied to *all* chosen quantizers by the model-output error on the
    scoring data (1 + len(candidates) scoring passes, plus the float reference) and keep the smallest, so the
    default is never worse than the best single calibrator by this label-free measure. (Entropy is left out of
    the uniform candidates by the caller: as a whole-model choice it was the worst on every model measured.)"""
    everything = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    modes = {id(q): q.mode for q in everything}
    chosen = {n: (q.amax.detach().clone(), q.calib_choice) for n, q in qs.items()}
    errors: dict[str, float] = {}
    try:
        for q in everything:
            q.mode = "off"
        reference = _model_outputs(model, run)
        energy = max(sum(float(r.pow(2).sum()) for r in reference), 1e-30)
        for q in everything:
            q.mode = modes[id(q)]

        def error() -> float:
            return _squared_error(_model_outputs(model, run), reference) / energy

        errors["per-layer"] = error()
        by_name = dict(candidates_by_name(candidates))
        for cand, (method, pct) in by_name.items():
            for q in qs.values():
                q.load_calib_amax(method, percentile=pct)
            errors[cand] = error()
        errors = _summed_over_ranks(errors, mean=True)
        best = min(errors, key=errors.get)
        if best == "per-layer":
            for name, q in qs.items():
                q.amax.data.copy_(chosen[name][0])
                q.calib_choice = chosen[name][1]
        else:
            method, pct = by_name[best]
            for name, q in qs.items():
                q.load_calib_amax(method, percentile=pct)
                q.calib_choice = (method, pct)
                choice.methods[name] = best
            log.info("lq: per-layer calibration: %s for every layer gives a smaller model-output error (%.3g) than "
                     "the per-layer choice (%.3g); kept it", best, errors[best], errors["per-layer"])
    except BaseException:
        for name, q in qs.items():
            q.amax.data.copy_(chosen[name][0])
            q.calib_choice = chosen[name][1]
        raise
    finally:
        for q in everything:
            q.mode = modes[id(q)]
    choice.model_errors = errors


def _reduce_across_ranks(scorers: dict[str, _LayerScorer]) -> None:
    """Under torch.distributed every rank scored its own batches: sum the error tables (and call counts) so
    that every rank makes the same choice, as ``lq.calibrate`` reduces its statistics."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rows = [(s, n) for s in scorers.values() for n in s.quantizers]
    values = [v for s, n in rows for v in (*s.errors[n].values(), s.energy[n], float(s.calls))]
    t = _all_reduce_sum(values)
    it = iter(t.tolist())
    for s, n in rows:
        for c in s.errors[n]:
            s.errors[n][c] = next(it)
        s.energy[n] = next(it)
        s.calls = int(next(it))


def _all_reduce_sum(values: list[float]) -> torch.Tensor:
    """Sum ``values`` over the ranks (float64; on the GPU under NCCL, which takes no CPU tensors)."""
    import torch.distributed as dist

    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu()


def candidates_by_name(candidates: Iterable[tuple[str, float | None]]) -> list[tuple[str, tuple[str, float | None]]]:
    return [(candidate_name(m, p), (m, p)) for m, p in candidates]


def _candidate_amaxes(q: TensorQuantizer, candidates: Sequence[tuple[str, float | None]]) -> dict[str, torch.Tensor]:
    """Every candidate's amax for ``q``, read off its histogram, shaped like ``q.amax``."""
    return {
        candidate_name(m, p): q.calibrator.compute_amax(
            method=m, percentile=p if p is not None else 99.99, bits=q.spec.bits
        ).to(q.amax.device).reshape(q.amax.shape)
        for m, p in candidates
    }


def _histogram_quantizers(layers: dict[str, nn.Module], wanted: set[str] | None) -> dict[str, TensorQuantizer]:
    """``{full name: quantizer}`` of the layers' input quantizers that can be chosen (histogram, quantizing)."""
    out = {}
    for lname, layer in layers.items():
        for attr in _INPUT_QUANTIZERS:
            q = getattr(layer, attr, None)
            full = f"{lname}.{attr}"
            if (
                isinstance(q, TensorQuantizer) and q.mode == "quantize" and not q.dynamic
                and q.calibrator is not None and q.calibrator.has_data and hasattr(q.calibrator, "histogram")
                and (wanted is None or full in wanted)
            ):
                out[full] = q
    if not out:
        raise ValueError(
            "per-layer calibration choice: no activation quantizer holds a histogram; calibrate with an "
            "'entropy', 'percentile', 'mse', 'auto' or 'layerwise' activation calibrator first"
        )
    return out


def _choose_by_model_output(
    model: nn.Module, run: Any, candidates: Sequence[tuple[str, float | None]], qs: dict[str, TensorQuantizer]
) -> LayerwiseChoice:
    """``scope="model"``: greedy in execution order; each candidate scored by the squared error of the model's
    floating-point outputs against the float model's on the scoring data."""
    order: list[TensorQuantizer] = []
    seen: set[int] = set()

    def note(q: TensorQuantizer):
        def hook(_module, _args) -> None:
            if id(q) not in seen:
                seen.add(id(q))
                order.append(q)
        return hook

    def scored() -> list[torch.Tensor]:
        return _model_outputs(model, run)

    everything = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    modes = {id(q): q.mode for q in everything}
    notes = [q.register_forward_pre_hook(note(q)) for q in qs.values()]
    name_of = {id(q): n for n, q in qs.items()}
    choice = LayerwiseChoice()
    by_name = dict(candidates_by_name(candidates))
    try:
        for q in everything:  # the float reference (and the order in which the quantizers run)
            q.mode = "off"
        reference = scored()
        for h in notes:
            h.remove()
        energy = sum(float(r.pow(2).sum()) for r in reference)
        never = [n for n, q in qs.items() if id(q) not in seen]
        if never:
            raise RuntimeError(
                f"per-layer calibration choice: layers {never[:10]} did not run during the scoring pass, so no "
                "range could be chosen for them. Check that the calibration data reaches them, or skip them in "
                "QuantConfig.skip"
            )
        for q in everything:  # weights quantized throughout; activations join in execution order
            q.mode = modes[id(q)] if id(q) not in name_of else "off"
        for q in order:
            name = name_of[id(q)]
            q.mode = "quantize"
            errors = {}
            for cand, (method, pct) in by_name.items():
                q.load_calib_amax(method, percentile=pct)
                errors[cand] = _squared_error(scored(), reference)
            errors = _summed_over_ranks(errors)
            best = min(errors, key=errors.get)
            q.load_calib_amax(*by_name[best][:1], percentile=by_name[best][1])
            q.calib_choice = by_name[best]
            choice.methods[name] = best
            choice.errors[name] = {c: e / max(energy, 1e-30) for c, e in errors.items()}
    finally:
        for h in notes:
            h.remove()
        for q in everything:
            q.mode = modes[id(q)]
    model._lq_layerwise = choice  # noqa: SLF001 - read by reports / trackers
    log.info("lq: per-layer calibration choice (model-output scope): %s", choice.methods)
    return choice
