"""``Int8ComputeConfig``: the switches of the int8 training ops (one frozen dataclass, torchao style).

Bits are the symmetric ranges of Wu et al. 2020 eq. 6-8 (``qmax = 2^(b-1) - 1``; 8 bits -> [-127, 127]).
The gradient options are Zhu et al. 2020, *Towards Unified INT8 Training for Convolutional Neural Network*
(CVPR): per-layer dynamic gradient scale, direction-sensitive gradient clipping (Sec. 4.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lq.quant.functional import check_bits

_ACT_SCALES = ("dynamic", "static")
_GRAD_GRANULARITIES = ("row", "tensor")
_GRAD_ROUNDINGS = ("nearest", "stochastic", "stochastic_hash")


@dataclass(frozen=True)
class Int8ComputeConfig:
    """How an int8 op computes its forward GEMM/conv and its two backward GEMMs/convs.

    Args:
        act_bits: bits of the quantized activation (the saved int8 input). 8 -> [-127, 127].
        weight_bits: bits of the quantized weight (per output channel).
        grad_bits: bits of the quantized output gradient.
        act_scale: ``"dynamic"`` (amax of the current batch: per row for linear, per tensor for conv) or
            ``"static"`` (a calibrated per-tensor ``act_amax`` must be passed to the op).
        int8_grad_input: compute ``grad_input`` as an int8 GEMM/conv (else fp32 on the dequantized weight).
        int8_grad_weight: compute ``grad_weight`` as an int8 GEMM (else fp32 on the dequantized saved input).
        quantize_grad: master switch for gradient quantization; ``False`` makes both backward products fp32
            (int8 forward only, like int8 inference + straight-through training).
        grad_granularity: ``"row"``: one scale per row of the gradient for ``grad_input`` of linear (finer);
            ``"tensor"``: one scale per layer (Zhu et al.'s per-layer dynamic scale). Conv ``grad_input``
            always uses one scale per layer (the oneDNN kernel takes one activation scale).
        grad_clip: direction-sensitive gradient clipping (Zhu et al. Sec. 4.1): pick, among ``clip_ratios``,
            the clipping value ``ratio * amax`` that maximises cos(g, dequant(quant(clip(g)))).
        clip_ratios: candidate ratios of the clipping value to the gradient amax (1.0 = no clipping).
        clip_every: search the clip ratio on every ``clip_every``-th backward of each layer and reuse the
            chosen ratio in between (the scale stays dynamic: ratio times the current amax). Zhu et al.
            update the clipping value periodically; 1 searches every step. Default 16: the search then costs
            3% of an int8 SmallResNet step instead of 12% (bench_int8_step.py, VNNI host), and over eleven
            seeds of fashion_int8_train the accuracy moved -0.10 points on average against searching every
            step (paired by seed; one run's spread is about 2 points; benchmarks/RESULTS.md). The ratios are kept per layer
            object (quantized layers pass their own; functional ``int8_linear`` / ``int8_conv2d`` calls need
            ``clip_state=`` a dict per layer, else they search every step, with a one-time warning).
        grad_rounding: ``"nearest"`` (eq. 7's round) or ``"stochastic"``: ``floor(g * s + u)``, ``u`` uniform in
            [0, 1), an unbiased rounding (E[q] = g * s) so that the many small gradient entries that round to 0
            every step under "nearest" still move the weights on average. Measured on fashion_int8_train
            (benchmarks/RESULTS.md, seed 2): -11.4 points vs fp32 with "nearest", -2.4 with "stochastic"; over
            three seeds -6.1 vs +0.3 points, hence the default. ``u`` comes as random bytes, one per element,
            reproducible with ``torch.manual_seed`` (``lq.ops.fused.noise_bits``: on CPU a window at a random offset
            of a fixed 16 MiB+ table of random bytes, nothing made per call, and a level shift per call; torch's
            generator on other devices; 128 equally likely levels at every element, unbiased within 1/256 of a
            step). The noise costs ~3% of an int8 SmallResNet step; one ``torch.rand`` float per element cost 20%
            (bench_int8_step.py, VNNI host). ``"stochastic_hash"``: the same rounding with
            ``u`` made inside the fused quantization kernel from a counter hash (``lq.ops.fused.uniform_hash``),
            no faster than the noise bytes any more (56.6 vs 57.6 ms a step); opt-in: seven seeds of
            fashion_int8_train measured it 1.6 points below ``torch.rand`` noise on average (benchmarks/
            RESULTS.md, which also shows how wide one run's spread is).
        clip_samples: about how many elements (whole rows/channels) score the candidates for per-row/
            channel scales; per-layer scales use up to 16x as many (whole batch samples). The chosen ratio
            is then applied to the whole tensor.
        use_fast_kernels: ``False`` forces the portable reference kernels (tests, debugging).
    """

    act_bits: int = 8
    weight_bits: int = 8
    grad_bits: int = 8
    act_scale: Literal["dynamic", "static"] = "dynamic"
    int8_grad_input: bool = True
    int8_grad_weight: bool = True
    quantize_grad: bool = True
    grad_granularity: Literal["row", "tensor"] = "row"
    grad_clip: bool = True
    grad_rounding: Literal["nearest", "stochastic", "stochastic_hash"] = "stochastic"
    clip_ratios: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    clip_samples: int = 16384
    clip_every: int = 16
    use_fast_kernels: bool = True

    def __post_init__(self) -> None:
        for field in ("act_bits", "weight_bits", "grad_bits"):
            bits = check_bits(getattr(self, field))
            if bits > 8:
                raise ValueError(f"Int8ComputeConfig.{field} must be <= 8 for int8 kernels, got {bits}")
        if self.act_scale not in _ACT_SCALES:
            raise ValueError(f"act_scale must be one of {_ACT_SCALES}, got {self.act_scale!r}")
        if self.grad_granularity not in _GRAD_GRANULARITIES:
            raise ValueError(
                f"grad_granularity must be one of {_GRAD_GRANULARITIES}, got {self.grad_granularity!r}"
            )
        if self.grad_rounding not in _GRAD_ROUNDINGS:
            raise ValueError(f"grad_rounding must be one of {_GRAD_ROUNDINGS}, got {self.grad_rounding!r}")
        ratios = tuple(float(r) for r in self.clip_ratios)
        if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"clip_ratios must be a non-empty tuple of values in (0, 1], got {self.clip_ratios!r}")
        object.__setattr__(self, "clip_ratios", ratios)
        if self.clip_every < 1:
            raise ValueError(f"clip_every must be >= 1 (search the clip every n-th backward), got {self.clip_every}")
        if self.clip_samples < 1:
            raise ValueError(f"clip_samples must be >= 1, got {self.clip_samples}")

    @property
    def rounding_noise(self) -> bool | str:
        """What ``quantize_grad(stochastic=...)`` takes for ``grad_rounding``: False, True (noise bytes) or "hash"."""
        return {"nearest": False, "stochastic": True, "stochastic_hash": "hash"}[self.grad_rounding]

    @property
    def int8_grad_input_enabled(self) -> bool:
        return self.quantize_grad and self.int8_grad_input

    @property
    def int8_grad_weight_enabled(self) -> bool:
        return self.quantize_grad and self.int8_grad_weight

    @classmethod
    def for_this_machine(cls, device: str = "cpu", **overrides: object) -> Int8ComputeConfig:
        """8/8/8 bits where the int8 kernels compute them exactly and fast (CUDA; CPUs where oneDNN's u8 x s8
        kernels are exact over the full range, i.e. VNNI/AMX, as measured by ``lq.ops.hardware.onednn_mode``),
        else ``for_cpu_without_vnni`` (so the fast kernels run instead of the exact reference fallback)."""
        from lq.ops import hardware

        if device.startswith("cpu") and hardware.onednn_mode() != hardware.FULL_RANGE:
            return cls.for_cpu_without_vnni(**overrides)
        return cls(**overrides)  # type: ignore[arg-type]

    @classmethod
    def for_cpu_without_vnni(cls, **overrides: object) -> Int8ComputeConfig:
        """7-bit activations and weights, 8-bit gradients: the widest ranges that x86 CPUs without VNNI
        (AVX2 / AVX-512 w/o VNNI) multiply exactly in oneDNN's u8 x s8 kernels (see ``lq.ops.hardware``)."""
        kw: dict[str, object] = {"act_bits": 7, "weight_bits": 7, "grad_bits": 8}
        kw.update(overrides)
        return cls(**kw)  # type: ignore[arg-type]
