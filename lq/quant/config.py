"""What to quantize and how: ``QuantSpec`` for one tensor kind, ``QuantConfig`` for a model.

The defaults are the paper's recommendation (Wu et al. 2020, Section 6): weights per-channel with max
calibration, activations per-tensor (per-layer "PTQ best" here; the paper tries max, entropy and percentiles), scale
quantization with the symmetric range [-127, 127]. Hydra builds both from YAML (see ``conf/quant``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lq.quant.functional import check_bits

GRANULARITIES = ("per_tensor", "per_channel")
CALIBRATORS = ("max", "entropy", "percentile", "mse", "auto", "layerwise")
#: The candidates that ``calibrator="auto"`` tries (the paper's Table 5 columns, plus mse).
AUTO_CANDIDATES = (
    ("max", None),
    ("entropy", None),
    ("percentile", 99.9),
    ("percentile", 99.99),
    ("percentile", 99.999),
    ("percentile", 99.9999),
    ("mse", None),
)
#: Layer kinds ``lq.quantize`` knows how to swap (names match ``lq.nn.QUANT_MODULES``).
LAYER_KINDS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Matmul")


@dataclass
class QuantSpec:
    """How to quantize one kind of tensor (weights or activations).

    Args:
        bits: integer width b, 2..16 (eq. 6: the range is [-(2^(b-1) - 1), 2^(b-1) - 1]).
        granularity: ``"per_tensor"`` or ``"per_channel"`` (Section 3.2). Per-channel for weights means one
            range per output channel (axis 0 of Linear/Conv weights, axis 1 of ConvTranspose weights).
        calibrator: ``"max"``, ``"entropy"``, ``"percentile"``, ``"mse"``, ``"auto"`` or ``"layerwise"``
            (Section 3.4). "auto" tries each for the whole model and keeps the best on an evaluate function (the
            paper's "PTQ best", needs a metric); "layerwise" picks among the same candidates per layer, without
            labels, by the error each causes in its layer's output (``lq.layer_choice``).
        percentile: the percentile for ``calibrator="percentile"`` (e.g. 99.99 keeps 99.99% of |x| values).
        num_bins: histogram bins for entropy / percentile / mse calibration.
        learn_range: make amax a trainable parameter during QAT (PACT/LSQ, Section 5.3).
        enabled: quantize this kind of tensor at all (``False`` keeps e.g. activations in float).
    """

    bits: int = 8
    granularity: str = "per_tensor"
    calibrator: str = "max"
    percentile: float = 99.99
    num_bins: int = 2048
    learn_range: bool = False
    enabled: bool = True

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"calibrator must be one of {CALIBRATORS}, got {self.calibrator!r}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if int(self.num_bins) < 128:
            raise ValueError(f"num_bins must be >= 128 (entropy calibration searches 128 levels), got {self.num_bins}")

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per_channel"


def _default_weight() -> QuantSpec:
    return QuantSpec(bits=8, granularity="per_channel", calibrator="max")


def _default_activation() -> QuantSpec:
    # Label-free per-layer "PTQ best" (lq.layer_choice): entropy alone lost 9.7 points on the pretrained
    # MNIST CNN (it clips the first conv's input at the background value); the per-layer choice keeps it
    # within 0.1% of fp32 and matches the best single calibrator elsewhere (benchmarks/RESULTS.md).
    return QuantSpec(bits=8, granularity="per_tensor", calibrator="layerwise")


@dataclass
class QuantConfig:
    """Which layers to quantize and how.

    Args:
        weight: spec for the weights of every quantized layer (per-channel max by default, Section 4.1).
        activation: spec for the layer inputs (per-tensor, "layerwise" by default, Section 4.2).
        skip: fnmatch globs on module names (``model.named_modules()``) to keep in float, e.g. ``["head.*"]``.
        only: if given, quantize only modules whose names match one of these globs.
        layers: layer kinds to quantize, from ``LAYER_KINDS``.
        gelu10: replace ``nn.GELU`` (and transformers' GELU activations) by GELU10, which clips the output
            at 10 so max calibration keeps resolution for the small negative values (Appendix D).
        equalize: cross-layer equalization (``lq.equalize``, Nagel et al. 2019) of the float weights before the
            layers are swapped: consecutive Linear/Conv pairs joined by ReLU/ReLU6/pooling get equal per-channel
            weight ranges (fold BatchNorm first: ``lq.fold_bn``). Off by default; its measured effect per model
            is in benchmarks/RESULTS.md (recipe fashion_mobilenet).
        bias_correction: after calibration, ``lq.calibrate`` subtracts each layer's expected output shift caused
            by weight quantization from its bias (``lq.correct_bias``, Nagel et al. 2019, on the calibration
            data). Off by default (see RESULTS.md for its measured effect per model).
        smoothquant: ``lq.calibrate`` migrates Linear layers' activation outliers into their weights
            (``lq.smooth_quant``, Xiao et al. 2023), with the strength alpha searched per layer on the calibration
            data, for the layers where that divides the layer's output error at least ``lq.smoothing.MIN_GAIN``
            (2) times. On by default: every Linear of MiniLM qualifies (mean cosine 0.9887 -> 0.9967), no layer
            of the CNNs measured does (RESULTS.md), and those pay no extra pass over the data.
        quantize_pooling: also quantize the inputs of average pooling (``nn.AvgPool2d``, ``nn.AdaptiveAvgPool2d``:
            ``lq.nn.QuantAvgPool2d`` / ``QuantAdaptiveAvgPool2d``) with a per-tensor ``activation`` quantizer,
            calibrated like every other (``skip`` / ``only`` apply; ``layers`` does not, it lists GEMM-like kinds).
            The paper quantizes only the inputs of GEMM-like layers, so a conv before global average pooling keeps
            a float output; with a quantizer there, deployment runtimes run that conv in int8 too (onnxruntime:
            ``QLinearConv`` + ``QLinearGlobalAveragePool``, as ``quantize_static`` does). Max pooling needs none
            (it commutes with the quantizer). Off by default: the paper's model, and the checkpoints written
            without it, are unchanged.
    """

    weight: QuantSpec = field(default_factory=_default_weight)
    activation: QuantSpec = field(default_factory=_default_activation)
    skip: list[str] = field(default_factory=list)
    only: list[str] | None = None
    layers: list[str] = field(default_factory=lambda: list(LAYER_KINDS))
    gelu10: bool = False
    equalize: bool = False
    bias_correction: bool = False
    smoothquant: bool = True
    quantize_pooling: bool = False

    def __post_init__(self) -> None:
        # Hydra hands over DictConfig / ListConfig objects: normalise them to plain Python types.
        if not isinstance(self.weight, QuantSpec):
            self.weight = QuantSpec(**dict(self.weight))
        if not isinstance(self.activation, QuantSpec):
            self.activation = QuantSpec(**dict(self.activation))
        if isinstance(self.skip, str) or (self.only is not None and isinstance(self.only, str)):
            raise TypeError("skip and only take a list of glob patterns, e.g. skip=['head.*'], not a string")
        self.skip = [str(p) for p in self.skip]
        self.only = None if self.only is None else [str(p) for p in self.only]
        self.layers = [str(k) for k in self.layers]
        for name in ("gelu10", "equalize", "bias_correction", "smoothquant", "quantize_pooling"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantConfig.{name} takes True or False, got {getattr(self, name)!r}")
        unknown = sorted(set(self.layers) - set(LAYER_KINDS))
        if unknown:
            raise ValueError(f"unknown layer kinds {unknown}; allowed: {list(LAYER_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts (what checkpoints and loggers store; ``from_dict`` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """Rebuild a config from ``to_dict``'s nested dicts (specs may also be given as ``QuantSpec``). A dict without
        ``smoothquant`` (written by an lq without SmoothQuant) reads as ``smoothquant=False``, one without
        ``quantize_pooling`` as ``quantize_pooling=False`` (what such a model was)."""
        d = dict(d)
        # a dict written before the field existed describes a model calibrated without SmoothQuant
        d.setdefault("smoothquant", False)
        d.setdefault("quantize_pooling", False)
        d["weight"] = QuantSpec(**d.get("weight", {})) if isinstance(d.get("weight"), dict) else d.get("weight")
        d["activation"] = (
            QuantSpec(**d.get("activation", {})) if isinstance(d.get("activation"), dict) else d.get("activation")
        )
        return cls(**{k: v for k, v in d.items() if v is not None or k == "only"})
