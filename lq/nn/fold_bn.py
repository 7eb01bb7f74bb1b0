"""Batch-norm folding (paper Appendix C, eq. 14-16).

A BN after a Linear/Conv computes ``z = c * y + d`` with ``c = gamma / sqrt(Var[y] + eps)`` and
``d = beta - gamma E[y] / sqrt(Var[y] + eps)`` (eq. 14); folding gives ``W' = c W`` (per output channel)
and ``b' = c b + d`` (eq. 16), and the BN becomes ``nn.Identity``. Folding uses the running statistics, so
it is an inference transform: do it on a trained model, before calibration (or let it recalibrate the
weight ranges of already-quantized layers, which it does).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import fx, nn

from lq.nn.swap import QUANT_CLASSES, _parent
from lq.quant.quantizer import TensorQuantizer

log = logging.getLogger(__name__)

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Tracer(fx.Tracer):
    """Keeps lq's quantized layers and quantizers as leaves (their control flow is not traceable)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QUANT_CLASSES + (TensorQuantizer,)) or super().is_leaf_module(m, qualname)


def _pairs_from_graph(model: nn.Module) -> list[tuple[str, str]] | None:
    """(layer, bn) pairs where the BN's only input is the layer's output and nothing else reads it."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any untraceable model falls back to Sequential scanning
        log.debug("fold_bn: torch.fx could not trace the model (%s); scanning nn.Sequential instead", err)
        return None
    mods = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _BN):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(mods.get(src.target), _FOLDABLE)
            and len(src.users) == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_from_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            kids = list(m.named_children())
            for (a, ma), (b, mb) in zip(kids, kids[1:]):
                if isinstance(ma, _FOLDABLE) and isinstance(mb, _BN):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


@torch.no_grad()
def fold_bn_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold one BN into the preceding layer's weight and bias in place (eq. 16)."""
    if not bn.track_running_stats or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    std = torch.sqrt(bn.running_var.float() + bn.eps)
    gamma = bn.weight.float() if bn.affine else torch.ones_like(std)
    beta = bn.bias.float() if bn.affine else torch.zeros_like(std)
    c = gamma / std  # eq. 14
    d = beta - gamma * bn.running_mean.float() / std
    w = layer.weight
    transposed = isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    axis = 1 if transposed else 0
    if transposed and layer.groups != 1:
        raise ValueError("folding BN into a grouped ConvTranspose is not supported")
    if w.shape[axis] != c.numel():
        raise ValueError(f"BN has {c.numel()} channels but the layer has {w.shape[axis]} outputs")
    shape = [1] * w.dim()
    shape[axis] = -1
    w.mul_(c.reshape(shape).to(w.dtype))  # W' = c W, in place: the Parameter object is kept
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(c.numel(), dtype=w.dtype, device=w.device))
    layer.bias.copy_((c * layer.bias.float() + d).to(layer.bias.dtype))  # b' = c b + d


def _recalibrate_weight(layer: nn.Module) -> None:
    q = getattr(layer, "weight_quantizer", None)
    if q is None or q.dynamic or not q.is_calibrated:
        return
    q.start_calibration()
    q(layer.weight.detach())
    q.load_calib_amax()
    q.mode = "quantize"


def fold_bn(model: nn.Module, pairs: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a Linear/Conv into it and replace it by ``nn.Identity``.

    Pairs are found by tracing the model with torch.fx (the BN must be the only reader of the layer's
    output); if the model cannot be traced, consecutive (layer, BN) children of ``nn.Sequential`` are used.
    Pass ``pairs=[("conv1", "bn1"), ...]`` to name them yourself. Returns the folded pairs.
    """
    if model.training:
        warnings.warn(
            "fold_bn: the model is in train mode; folding uses the BN running statistics, so call "
            "model.eval() for inference after folding",
            stacklevel=2,
        )
    mods = dict(model.named_modules())
    if pairs is None:
        pairs = _pairs_from_graph(model)
        if pairs is None:
            pairs = _pairs_from_sequential(model)
    else:
        for layer_name, bn_name in pairs:
            for n, kinds in ((layer_name, _FOLDABLE), (bn_name, _BN)):
                if not isinstance(mods.get(n), kinds):
                    raise ValueError(f"fold_bn: {n!r} is not a {[k.__name__ for k in kinds]} module of the model")
    folded = []
    for layer_name, bn_name in pairs:
        layer, bn = mods[layer_name], mods[bn_name]
        if not bn.track_running_stats:
            warnings.warn(f"fold_bn: {bn_name} has no running statistics; left in place", stacklevel=2)
            continue
        fold_bn_into(layer, bn)
        parent, child = _parent(model, bn_name)
        setattr(parent, child, nn.Identity().train(bn.training))  # the model's mode stays one mode
        _recalibrate_weight(layer)
        folded.append((layer_name, bn_name))
    if not folded:
        warnings.warn("fold_bn: found no BatchNorm directly after a Linear/Conv layer; nothing folded", stacklevel=2)
    log.info("fold_bn: folded %d BatchNorm layers: %s", len(folded), folded)
    return folded
