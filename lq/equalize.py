"""Cross-layer equalization (Nagel et al. 2019, *Data-Free Quantization Through Weight Equalization and Bias
Correction*, Sec. 4.1).

For two layers ``A -> f -> B`` where ``f`` is positively homogeneous per channel (ReLU, max/avg pooling,
identity), ``B(f(A(x)))`` is unchanged when output channel ``i`` of ``A`` (weight rows and bias) is divided by
``s_i`` and input channel ``i`` of ``B`` is multiplied by ``s_i``. The choice (their eq. 11)

    s_i = sqrt(r1_i / r2_i),   r1_i = max|W_A[i, ...]|,  r2_i = max|W_B[:, i, ...]|

gives both layers the same range ``sqrt(r1_i * r2_i)`` for channel ``i``, which maximises the precision of
per-tensor weight quantization. Chains (``A -> B -> C``) are equalized pair by pair, repeated until the
scales converge. A ReLU6 between the pair becomes an exact per-channel clamp (``lq.nn.ChannelClamp``), so the
float model computes the same function to rounding (the paper swaps ReLU6 for ReLU, which changes it).

Apply it to the float model after ``lq.fold_bn`` (a BatchNorm between two layers stops the pair) and before
calibration: it changes the activations of ``A``'s output per channel.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from lq.deploy.chain import _leaves
from lq.nn.channel_clamp import ChannelClamp
from lq.nn.fold_bn import _recalibrate_weight, _Tracer
from lq.nn.swap import _parent

log = logging.getLogger(__name__)

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: modules that commute with a positive per-channel scale of their input (ChannelClamp is rescaled)
_HOMOGENEOUS = (nn.ReLU, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AvgPool3d, nn.Dropout, nn.ReLU6, ChannelClamp)
_RELU_FUNCTIONS = (F.relu, torch.relu)


@dataclass
class EqualizedPair:
    """One equalized pair ``first -> between -> second`` and the channel ranges before and after.

    ``range_ratio_before`` / ``after``: mean over channels of ``max(r1_i, r2_i) / min(r1_i, r2_i)`` (1.0 =
    equal ranges; channels where either range is 0 are left out).
    """

    first: str
    second: str
    between: list[str]
    range_ratio_before: float
    range_ratio_after: float = float("nan")


def _homogeneous(m: nn.Module | None) -> bool:
    """Commutes with a positive per-channel scale of its input: ReLU, ReLU6 (rewritten as a clamp), pooling,
    identity, dropout, and a ChannelClamp whose lower bound is 0."""
    if isinstance(m, ChannelClamp):
        return m.lower == 0.0
    return isinstance(m, _HOMOGENEOUS)


def _same_kind(a: nn.Module, b: nn.Module) -> bool:
    """Linear -> Linear or Conv -> Conv: a Linear after a conv reads the last (spatial) dimension, not channels."""
    return isinstance(a, nn.Linear) == isinstance(b, nn.Linear)


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of Parameters held by more than one module (tied weights)."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    return {k for k, v in owners.items() if v > 1}


def _channels(layer: nn.Module, side: str) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features if side == "out" else layer.in_features
    return layer.out_channels if side == "out" else layer.in_channels


def _out_ranges(layer: nn.Module) -> torch.Tensor:
    """r1: max |weight| per output channel."""
    w = layer.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(1).float()


def _in_view(layer: nn.Module) -> torch.Tensor:
    """The weight viewed as ``(groups, out_per_group, in_per_group, rest)``: input channel ``i`` is group
    ``i // in_per_group``, column ``i % in_per_group``."""
    w = layer.weight
    groups = getattr(layer, "groups", 1)
    return w.view(groups, w.shape[0] // groups, w.shape[1], -1)


def _in_ranges(layer: nn.Module) -> torch.Tensor:
    """r2: max |weight| over everything that reads input channel ``i``."""
    return _in_view(layer).detach().abs().amax(dim=(1, 3)).reshape(-1).float()


def _ratio(r1: torch.Tensor, r2: torch.Tensor) -> float:
    ok = (r1 > 0) & (r2 > 0)
    if not ok.any():
        return 1.0
    hi, lo = torch.maximum(r1[ok], r2[ok]), torch.minimum(r1[ok], r2[ok])
    return float((hi / lo).mean())


def _sole_call_sites(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _pairs_from_graph(model: nn.Module) -> list[tuple[str, list[str], str]] | None:
    """``(first, [modules between], second)`` from a torch.fx trace: every value on the path is read once."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - an untraceable model falls back to nn.Sequential scanning
        log.debug("equalize: torch.fx could not trace the model (%s); scanning nn.Sequential instead", err)
        return None
    mods = dict(model.named_modules())
    calls = _sole_call_sites(graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _LAYERS) or not node.args:
            continue
        between: list[str] = []
        src = node.args[0]
        while isinstance(src, fx.Node) and len(src.users) == 1:
            if src.op == "call_module" and _homogeneous(mods.get(src.target)):
                between.append(src.target)
            elif src.op == "call_function" and src.target in _RELU_FUNCTIONS and not src.kwargs.get("inplace"):
                pass  # F.relu(x): positively homogeneous, nothing to rewrite
            else:
                break
            src = src.args[0] if src.args else None
        if (
            isinstance(src, fx.Node)
            and len(src.users) == 1
            and src.op == "call_module"
            and isinstance(mods.get(src.target), _LAYERS)
            and all(calls.get(name, 0) == 1 for name in [src.target, node.target, *between])
        ):
            pairs.append((src.target, between[::-1], node.target))
    return pairs


def _pairs_from_sequential(model: nn.Module) -> list[tuple[str, list[str], str]]:
    """Consecutive leaves of plain ``nn.Sequential`` containers (nested ones flattened)."""
    names = {id(m): n for n, m in model.named_modules()}
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1

    nested = {id(c) for _, m in model.named_modules() if type(m) is nn.Sequential
              for c in m.children() if type(c) is nn.Sequential}
    pairs = []
    for _, seq in model.named_modules():
        if type(seq) is not nn.Sequential or id(seq) in nested:
            continue
        items = [m for _, _, m in _leaves(seq)]  # lq.deploy.chain's flattening of nested plain Sequentials
        for i, first in enumerate(items):
            if not isinstance(first, _LAYERS):
                continue
            j = i + 1
            while j < len(items) and _homogeneous(items[j]):
                j += 1
            if j < len(items) and isinstance(items[j], _LAYERS):
                chain = items[i:j + 1]
                if all(uses.get(id(m), 0) == 1 for m in chain):
                    pairs.append((names[id(first)], [names[id(m)] for m in items[i + 1:j]], names[id(items[j])]))
    return pairs


@torch.no_grad()
def _equalize_pair(model: nn.Module, first: str, between: list[str], second: str) -> float:
    """One equalization step; returns max |log s_i| (0 when nothing moved)."""
    mods = dict(model.named_modules())
    a, b = mods[first], mods[second]
    r1, r2 = _out_ranges(a), _in_ranges(b)
    s = torch.ones_like(r1)
    ok = (r1 > 0) & (r2 > 0)
    s[ok] = torch.sqrt(r1[ok] / r2[ok])
    w = a.weight
    w.div_(s.to(w.dtype).reshape([-1] + [1] * (w.dim() - 1)))
    if a.bias is not None:
        a.bias.div_(s.to(a.bias.dtype))
    view = _in_view(b)
    groups, _, per_group, _ = view.shape
    view.mul_(s.to(view.dtype).reshape(groups, 1, per_group, 1))
    for name in between:
        m = mods[name]
        if isinstance(m, nn.ReLU6):
            parent, child = _parent(model, name)
            setattr(parent, child, ChannelClamp(6.0 / s, channel_dim=-1 if isinstance(a, nn.Linear) else 1))
        elif isinstance(m, ChannelClamp):
            m.upper.div_(s.to(m.upper.device))
    for layer in (a, b):
        _recalibrate_weight(layer)
    return float(s.log().abs().max())


def equalize(
    model: nn.Module,
    pairs: list[tuple[str, list[str], str]] | None = None,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
) -> list[EqualizedPair]:
    """Equalize the per-channel weight ranges of consecutive layers in place (Nagel et al. 2019, eq. 11).

    Pairs are found with torch.fx (a Linear/Conv whose only reader is, through ReLU / ReLU6 / pooling /
    Identity modules each read once, another Linear/Conv), or, if the model cannot be traced, among
    consecutive leaves of ``nn.Sequential`` containers. ReLU6 modules between a pair become
    ``lq.nn.ChannelClamp`` (exact). Apply after ``lq.fold_bn`` and before ``lq.calibrate``.

    Args:
        model: the float model (or a quantized one whose activations are not calibrated yet).
        pairs: ``[(first, [between...], second), ...]`` module names, instead of the automatic search.
        max_iterations: passes over all pairs at most (chains need several to converge).
        tolerance: stop when no scale moved by more than this (max |log s|) in a pass.

    Returns:
        One :class:`EqualizedPair` per pair, with the mean range ratio before and after.

    Raises:
        ValueError: a named pair whose layers are not Linear/Conv, or whose channel counts differ.
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    mods = dict(model.named_modules())
    found = _pairs_from_graph(model)
    named = pairs is not None
    if pairs is None:
        pairs = found if found is not None else _pairs_from_sequential(model)
    elif found is not None:
        traced = {(f, tuple(b), s) for f, b, s in found}
        unseen = [(f, list(b), s) for f, b, s in pairs if (f, tuple(b), s) not in traced]
        if unseen:
            raise ValueError(f"equalize: the model's graph (torch.fx) does not connect {unseen} as 'first -> modules "
                             "between -> second' with each value read once; pairs it does connect: "
                             f"{[(f, list(b), s) for f, b, s in found]}")
    else:
        warnings.warn("equalize: the model cannot be traced (torch.fx), so the named pairs are not checked against "
                      "its forward; make sure each pair's output feeds only the next layer", stacklevel=2)
    shared = _shared_parameters(model)
    valid = []
    for first, between, second in pairs:
        a, b = mods.get(first), mods.get(second)
        if not isinstance(a, _LAYERS) or not isinstance(b, _LAYERS):
            raise ValueError(f"equalize: {first!r} and {second!r} must both be Linear/Conv layers of the model")
        bad = [n for n in between if not _homogeneous(mods.get(n))]
        if bad:
            raise ValueError(f"equalize: {bad} between {first!r} and {second!r} are not ReLU/ReLU6/pooling/Identity "
                             "modules; the pair cannot be equalized exactly")
        if not _same_kind(a, b) or _channels(a, "out") != _channels(b, "in"):
            if not named:
                continue  # e.g. conv -> Linear: the Linear mixes the last (spatial) dimension
            raise ValueError(f"equalize: {first!r} ({type(a).__name__}, {_channels(a, 'out')} output channels) -> "
                             f"{second!r} ({type(b).__name__}, reads {_channels(b, 'in')}): only Linear -> Linear or "
                             "Conv -> Conv pairs with matching channels can be equalized")
        tied = [n for n in (first, second, *between) for p in mods[n]._parameters.values()
                if p is not None and id(p) in shared]
        if tied:
            if named:
                raise ValueError(f"equalize: {sorted(set(tied))} share a Parameter with another module (tied "
                                 "weights); rescaling it would change that module too")
            continue
        for name in (first, second):
            for pname, p in mods[name]._parameters.items():
                if p is not None and not torch.isfinite(p).all():
                    raise ValueError(f"equalize: {name}.{pname} holds NaN or Inf; nothing was equalized")
        valid.append((first, list(between), second))
    if not valid:
        warnings.warn("equalize: found no pair of Linear/Conv layers joined only by ReLU/ReLU6/pooling; nothing "
                      "equalized (BatchNorm in between? call lq.fold_bn(model) first)", stacklevel=2)
        return []
    calibrated = [s for _, _, s in valid if getattr(getattr(mods[s], "input_quantizer", None), "is_calibrated", False)]
    if calibrated:
        warnings.warn(f"equalize: the input ranges of {calibrated} were calibrated before equalization and are now "
                      "stale: run lq.calibrate again", stacklevel=2)
    report = [EqualizedPair(f, s, btw, _ratio(_out_ranges(mods[f]), _in_ranges(mods[s]))) for f, btw, s in valid]
    for iteration in range(max_iterations):
        moved = max(_equalize_pair(model, f, btw, s) for f, btw, s in valid)
        if moved < tolerance:
            break
    log.info("equalize: %d pairs, %d passes", len(valid), iteration + 1)
    mods = dict(model.named_modules())
    for entry in report:
        entry.range_ratio_after = _ratio(_out_ranges(mods[entry.first]), _in_ranges(mods[entry.second]))
    if not math.isfinite(sum(e.range_ratio_after for e in report)):
        raise RuntimeError("equalize: non-finite weight ranges after equalization")  # pragma: no cover
    return report
