"""Swap float layers for quantized ones in place, by fnmatch rules on module names.

The swap changes the class of the existing module object (``module.__class__ = QuantLinear``) and adds its
quantizers, so every reference the user holds to the layer, and its ``weight``/``bias`` Parameters, stay
the same objects. ``restore`` undoes it.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from dataclasses import dataclass, field

from torch import nn

from lq.nn.gelu10 import GELU10, gelu_variant
from lq.nn.matmul import Matmul, QuantMatmul
from lq.nn.mixin import QuantMixin
from lq.nn.quant_conv import QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose2d
from lq.nn.quant_linear import QuantLinear
from lq.nn.quant_pool import QuantAdaptiveAvgPool2d, QuantAvgPool2d
from lq.quant.config import QuantConfig
from lq.quant.quantizer import TensorQuantizer

log = logging.getLogger(__name__)

#: float class -> quantized class
QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    Matmul: QuantMatmul,
    # only with QuantConfig(quantize_pooling=True): an input quantizer, no weight (lq.nn.quant_pool)
    nn.AvgPool2d: QuantAvgPool2d,
    nn.AdaptiveAvgPool2d: QuantAdaptiveAvgPool2d,
}
QUANT_CLASSES = tuple(QUANT_MODULES.values())
#: float pooling classes that ``QuantConfig.quantize_pooling`` switches on (not kinds of ``QuantConfig.layers``)
POOLING_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)


@dataclass
class QuantizationReport:
    """What ``lq.quantize`` did: layers swapped, and layers left in float with the reason."""

    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    gelu10: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"lq.quantize: {len(self.swapped)} layers quantized, {len(self.skipped)} kept in float"]
        lines += [f"  quantized  {n}" for n in self.swapped]
        lines += [f"  float      {n}: {why}" for n, why in self.skipped.items()]
        if self.gelu10:
            lines.append(f"  GELU10 replaced {len(self.gelu10)} GELU modules")
        return "\n".join(lines)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is one of lq's quantized layers (swapped in by ``lq.quantize``)."""
    return isinstance(module, QUANT_CLASSES)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(kind: str, patterns: list[str], names: list[str]) -> None:
    """Fail fast when a pattern matches no module, listing the closest names (ModelOpt does the same)."""
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            close = difflib.get_close_matches(p, names, n=5, cutoff=0.4)
            hint = f"; closest module names: {close}" if close else f"; module names look like {names[:5]}"
            raise ValueError(f"{kind} pattern {p!r} matches no module of the model{hint}")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _mha_children(model: nn.Module) -> set[str]:
    """Linear layers inside nn.MultiheadAttention: it calls F.multi_head_attention_forward with their
    weights directly, never their forward, so swapping them would quantize nothing."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out.update(f"{name}.{c}" if name else c for c, _ in m.named_children())
    return out


def quantize(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Swap the model's Linear / Conv / ConvTranspose2d / ``lq.nn.Matmul`` layers for quantized ones, in place.

    Layers whose names match ``config.skip`` stay in float; with ``config.only`` only matching layers are
    swapped. With ``config.quantize_pooling`` the ``nn.AvgPool2d`` / ``nn.AdaptiveAvgPool2d`` modules get an
    input quantizer too (``lq.nn.QuantAvgPool2d`` / ``QuantAdaptiveAvgPool2d``; skip and only apply to them).
    Returns the same model; the report (what was swapped, what was skipped and why) is logged and available
    from ``lq.quantization_report(model)``.

    Raises ValueError if a skip/only pattern matches no module, or if nothing could be quantized.
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be an lq.QuantConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = [n for n, _ in model.named_modules() if n]
    _check_patterns("skip", config.skip, names)
    _check_patterns("only", config.only or [], names)

    report = QuantizationReport()
    in_mha = _mha_children(model)
    already = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, TensorQuantizer):
            continue
        if is_quantized(module):
            already += 1
            continue
        float_cls = next((c for c in QUANT_MODULES if isinstance(module, c)), None)
        if float_cls is None:
            continue
        pooling = float_cls in POOLING_MODULES
        if pooling and not config.quantize_pooling:
            continue  # not a layer kind of lq's default model: not even reported
        if name in in_mha:
            report.skipped[name] = "inside nn.MultiheadAttention, which bypasses the layer's forward"
        elif type(module) is not float_cls:
            report.skipped[name] = (
                f"{type(module).__name__} subclasses {float_cls.__name__} with its own code; not swapped "
                "(quantize it with lq.nn layers in your model)"
            )
        elif not pooling and float_cls.__name__ not in config.layers:
            report.skipped[name] = f"layer kind {float_cls.__name__} not in config.layers"
        elif _matches(name, config.skip):
            report.skipped[name] = "matches a skip pattern"
        elif config.only is not None and not _matches(name, config.only):
            report.skipped[name] = "matches no 'only' pattern"
        else:
            swap(module, config, name)
            report.swapped.append(name)

    if config.gelu10:
        for name, module in list(model.named_modules()):
            approx = gelu_variant(module)
            if approx is not None:
                parent, child = _parent(model, name)
                setattr(parent, child, GELU10(approximate=approx))
                report.gelu10.append(name)

    if not report.swapped and not already:
        kinds = [c.__name__ for c in QUANT_MODULES if c not in POOLING_MODULES]
        raise ValueError(
            f"lq.quantize found nothing to quantize: the model has no {kinds} layers that are not skipped "
            f"({len(report.skipped)} skipped: {dict(list(report.skipped.items())[:5])})"
        )
    if config.equalize:  # after the checks above, so a failed quantize leaves the model as it was
        from lq.equalize import equalize

        equalize(model)  # exact on the float function; weight quantizers still uncalibrated (or recalibrated)
    model._lq_config = config  # noqa: SLF001 - read back by lq.quantization_report / checkpoints
    model._lq_report = report
    log.info("%s", report)
    return model


def swap(module: nn.Module, config: QuantConfig, name: str = "") -> nn.Module:
    """Turn one float layer into its quantized class in place (same object, same Parameters)."""
    qcls = QUANT_MODULES.get(type(module))
    if qcls is None:
        raise TypeError(f"{name or type(module).__name__}: no quantized version of {type(module).__name__}")
    module.__class__ = qcls
    module.init_quantizers(config, name or type(module).__name__)
    return module


def restore(module: nn.Module) -> nn.Module:
    """Undo ``swap``: the same object back in its float class, without quantizers."""
    if not is_quantized(module):
        return module
    for qname in list(module.quantizers()):
        delattr(module, qname)
    module.__class__ = module.float_class
    return module


def quantization_report(model: nn.Module) -> QuantizationReport:
    """The report of the last ``lq.quantize`` on this model."""
    report = getattr(model, "_lq_report", None)
    if report is None:
        raise ValueError("this model was not quantized with lq.quantize")
    return report


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` for every quantized layer of the model, in module order."""
    return {n: m for n, m in model.named_modules() if is_quantized(m)}


__all__ = [
    "POOLING_MODULES",
    "QUANT_MODULES",
    "QuantMixin",
    "QuantizationReport",
    "is_quantized",
    "quantization_report",
    "quantize",
    "quantized_layers",
    "restore",
    "swap",
]
