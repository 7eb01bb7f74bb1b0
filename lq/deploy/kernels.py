"""Integer kernels for converted (inference-only) layers: paper eq. 10.

``y_ij = 1 / (s_x * s_w,j) * sum_k x_q,ik * w_q,kj (+ b_j)``: an integer GEMM (or convolution) with int32
accumulation, then one float multiply per output channel and the bias add (Section 3.2-3.3; per-tensor
activations, per-channel weights, scale quantization so no zero-point terms of eq. 11).

Convention (as in ``lq.quant.functional``): ``s`` maps reals to the grid, ``x_q = clip(round(s x))``; the
step is ``1 / s``. Activations are quantized here exactly as torch's fake-quant kernel does it
(``nearbyint(x * (1 / step))`` in fp32), so a converted layer sees the same integers as the fake-quant one.

Fast paths and why each exists:

- CPU, fbgemm (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``, Linear only): the fastest int8
  GEMM on x86 without VNNI; fp32 in (our scale and zero point), fp32 out. See the fbgemm section below.
- CPU, oneDNN (``torch.ops.onednn.qlinear_pointwise`` / ``qconv_pointwise``, Linear and Conv1d/2d/3d):
  u8 activations x s8 weights, int32 accumulation, fp32 output with the scales and bias applied inside.
  On CPUs with VNNI/AMX the u8 x s8 dot product accumulates exactly, so signed activations are shifted by a
  zero point of 128 (``u = x_q + 128``). On AVX2-only CPUs oneDNN uses ``vpmaddubsw``, which adds two
  u8 x s8 products in *saturating int16*: ``255 * 127 * 2 > 32767`` gives wrong results. There the
  activation keeps zero point 0 and values in [0, 127] (``2 * 127 * 127 = 32258`` cannot saturate):
  non-negative inputs (after ReLU: the common case) run as one GEMM; signed inputs are split into their
  positive and negative parts ``P - N``, concatenated along the input channels against the weight
  ``[W, -W]`` (one GEMM with twice the reduction length, exact). Which mode holds is decided once per
  process by a self-test on worst-case operands (:func:`onednn_mode`), never assumed from CPU flags.
- CUDA, ``torch._int_mm`` (Linear): int8 x int8 -> int32 with cuBLASLt. Its shape rules (rows > 16,
  inner and output sizes multiples of 8) are met by zero padding, which leaves the integer sums unchanged.
- Everywhere else (ConvTranspose, Matmul, CUDA convolutions, a CPU without exact oneDNN int8 kernels):
  a reference that runs float math on the integer values. It is exact because every partial sum
  is an integer below ``2^24`` (fp32, checked per layer) or ``2^53`` (fp64, used otherwise, and always on
  CUDA where TF32 could round).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lq.ops import native_quant
from lq.ops.hardware import (
    FULL_RANGE,
    HALF_RANGE,
    UNAVAILABLE,
    OnednnConvPlan,
    onednn_available,
    onednn_mode,
)

log = logging.getLogger(__name__)

#: Kernel families a converted layer can be told to use (``lq.convert(model, backend=...)``).
BACKENDS = ("auto", "fbgemm", "onednn", "int_mm", "reference")

#: oneDNN accumulation modes (FULL_RANGE, HALF_RANGE, UNAVAILABLE) come from :func:`onednn_mode`, the
#: self-test in ``lq.ops.hardware`` (imported above).

_FP32_EXACT = 2**24
#: floats from which :func:`quantize_to_grid` runs the native kernel
NATIVE_GRID = 4096


# ------------------------------------------------------------------------------------------ activations
def quantize_to_grid(
    x: torch.Tensor, inv_step: torch.Tensor, qmax: int, relu: bool = False, check: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 7 on an activation: ``clip(round(x * s), -qmax, qmax)``, kept as an fp32 tensor of integers.

    ``inv_step`` is ``s = 1 / step`` as an fp32 scalar tensor, the very value torch's fake-quant kernel
    multiplies by, so the integers equal those of the fake-quant model bit for bit. ``relu=True`` quantizes
    ``relu(x)`` (lower clip 0; exact, since the quantizer is monotone with ``Q(0) = 0``).

    Raises ``FloatingPointError`` when ``x`` holds NaN or Inf (the caller adds the layer name): the clamp
    would turn Inf into ``qmax`` and the uint8 cast of the kernels NaN into a number, silently, on every host.
    One ``aminmax`` pass finds both (it propagates NaN). ``check=False`` skips it for values an integer
    kernel just produced (finite by construction). ``out``: where the native kernel may write with
    ``check=False`` (``x`` itself for an in-place hand-over); a new tensor is returned wherever it does not run.

    Dense fp32 CPU inputs of :data:`NATIVE_GRID` floats or more take one pass of ``lq/ops/quant.c``
    (``native_quant.grid``: the same values, the check included) instead of the four passes of torch ops below
    (64 x 1024: 12 against 23 us; below ~4k floats its call costs more than it saves).
    """
    if (x.numel() >= NATIVE_GRID and isinstance(inv_step, torch.Tensor) and x.device.type == "cpu"
            and inv_step.device.type == "cpu" and inv_step.shape in ((), (1,)) and inv_step.dtype == torch.float32
            and not (inv_step.requires_grad and torch.is_grad_enabled())):
        # (with the check, never in place: an input with a NaN or Inf is left as it was when the error is raised)
        done = native_quant.grid(x, float(inv_step), 0 if relu else -qmax, qmax, None if check else out)
        if done is not None:
            grid, finite = done
            if finite or not check:
                return grid
            _non_finite(grid)  # (NaN stays NaN in the output; an Inf or overflowing product does not)
    t = (x if x.dtype == torch.float32 else x.float()) * inv_step
    if check and t.numel():
        lo, hi = torch.aminmax(t)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            _non_finite(t)
    return t.round_().clamp_(0 if relu else -qmax, qmax)


def _non_finite(t: torch.Tensor) -> None:
    """Raise :func:`quantize_to_grid`'s error for ``t``, which holds a NaN or an infinite ``x * s``."""
    what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
    raise FloatingPointError(
        f"{what} in the input: int8 kernels cannot represent it (check the data or the previous layer)"
    )


@dataclass(frozen=True, eq=False)
class Output:
    """What a converted layer's kernel writes after eq. 10's multiply and bias (``lq.deploy.chain``).

    ``Output()``: floats. ``Output(relu=True)``: ``relu`` of them, fused into the kernel where it can be;
    with ``upper=u`` the activation is ``clip(y, 0, u)`` (ReLU6 / Hardtanh(0, u)).
    ``Output(relu=True, inv_step=s, step=1/s, qmax=q)``: the integers ``clip(round(s * act(y)), 0, q)``,
    the next layer's input quantization (eq. 7) applied to this layer's activated output, as a ``uint8``
    tensor (oneDNN writes it directly) or fp32 integers (other kernels). ``inv_step`` is the next layer's
    ``input_scale`` tensor, the value its own quantization would multiply by.
    """

    relu: bool = False
    inv_step: torch.Tensor | None = None
    step: float = 1.0
    qmax: int = 127
    upper: float | None = None
    #: the next layer's SmoothQuant divisor (``lq.smooth_quant``), per feature: the grid is that of ``act(y) / d``
    divisor: torch.Tensor | None = None
    #: the largest integer of the grid output, derived: ``qmax``, or for a clip at ``upper`` the integer the
    #: unfused model gives it, ``round(upper * s)`` in fp32 (torch's rounding, ties to even). oneDNN clips at
    #: this integer times the step, not at ``upper``: when ``upper * s`` is a tie, a clip at ``upper`` would
    #: let the kernel's own rounding move every clipped value at once.
    top: int = field(init=False, default=127)

    def __post_init__(self) -> None:
        top = self.qmax
        if self.grid and self.upper is not None:
            clip = torch.tensor(self.upper, dtype=torch.float32, device=self.inv_step.device) * self.inv_step
            top = int(min(self.qmax, float(clip.round())))
        object.__setattr__(self, "top", top)  # frozen: set once here

    @property
    def grid(self) -> bool:
        return self.inv_step is not None

    def finish(self, y: torch.Tensor, act_done: bool) -> torch.Tensor:
        """Apply what the kernel did not (``act_done``: it applied the activation): the activation on
        float outputs, then the requantization to the next grid."""
        if y.dtype == torch.uint8:
            return y
        if not act_done and self.upper is not None:
            y = y.clamp_(0.0, self.upper)
        elif not act_done and self.relu:
            y = y.relu_()
        if self.grid and self.divisor is not None:
            y = y / self.divisor  # what the smoothed layer itself does to its float input, bit for bit
        return quantize_to_grid(y, self.inv_step, self.qmax, relu=True, check=False) if self.grid else y


FLOAT = Output()


def onednn_output(out: Output) -> tuple[float, torch.dtype, str, list[float]]:
    """oneDNN's output stage for ``out``: (output scale, dtype, post-op, its scalars).

    The grid output clips ``y`` to ``[0, top * step]`` (``hardtanh``: ReLU / ReLU6 plus the upper clip of
    eq. 7; a plain ``relu`` post-op would saturate at 255) and divides by ``step`` with
    round-to-nearest-even into uint8: eq. 7 of the next layer on the activated output.
    """
    if out.grid and out.divisor is None:
        return out.step, torch.uint8, "hardtanh", [0.0, out.top * out.step]
    # (a grid behind a per-feature divisor: activated floats out; Output.finish divides and quantizes)
    if out.upper is not None:
        return 1.0, torch.float32, "hardtanh", [0.0, out.upper]
    return 1.0, torch.float32, "relu" if out.relu else "none", []


# ------------------------------------------------------------------------------------------ reference
def exact_float_dtype(terms: int, qmax_a: int, qmax_b: int, device: torch.device) -> torch.dtype:
    """fp32 when every partial sum of ``terms`` products of integers up to ``qmax_a * qmax_b`` stays below
    2^24 on CPU (so fp32 math on integer values is exact in any summation order), fp64 otherwise.

    CUDA always gets fp64: cuBLAS/cuDNN may use TF32 for fp32 (10-bit mantissa), which would round.
    """
    if device.type == "cpu" and terms * qmax_a * qmax_b < _FP32_EXACT and _cpu_fp32_is_ieee():
        return torch.float32
    return torch.float64


def _cpu_fp32_is_ieee() -> bool:
    """False if the user told oneDNN to run fp32 matmul/conv in bf16/tf32 (torch.backends.mkldnn)."""
    for group in ("matmul", "conv"):
        prec = getattr(getattr(torch.backends.mkldnn, group, None), "fp32_precision", "none")
        if prec not in ("none", "ieee"):
            return False
    return True


# ------------------------------------------------------------------------------------------ oneDNN
# The self-test that decides the oneDNN mode lives in lq.ops.hardware (the training ops use it too).


def onednn_zero_point(mode: str) -> int:
    """Activation zero point the u8 operand carries in ``mode`` (oneDNN and fbgemm alike): 128 (full range)
    or 0 (half range)."""
    return 128 if mode == FULL_RANGE else 0


def nonneg_grid(t: torch.Tensor) -> bool:
    """Whether the integer grid ``t`` has no negative value. Raises ``FloatingPointError`` if it holds NaN
    (a NaN input; the uint8 cast would silently turn it into a number); the caller adds the layer name."""
    lo = float(t.min())  # one host sync
    if math.isnan(lo):
        raise FloatingPointError(
            "NaN in the input: the int8 kernels cannot represent it (check the data or the previous layer)"
        )
    return lo >= 0


def grid_operand(t: torch.Tensor, mode: str, groups: int = 1, nonneg: bool = False) -> tuple[torch.Tensor, bool]:
    """The integer grid ``t`` (fp32 integers in [-qmax, qmax]) as the activation operand of a u8 x s8 kernel
    (oneDNN or fbgemm) in ``mode``, still fp32; its zero point is ``onednn_zero_point(mode)``.

    Full range: ``t`` itself (the kernel adds zero point 128). Half range: ``t`` itself if no value is
    negative (one GEMM of the layer's size), else ``signed=True`` and the positive and negative parts
    ``P = max(t, 0)``, ``N = max(-t, 0)`` concatenated along the input channels (dim 1), per group: the layer
    then uses the weight ``[W, -W]`` concatenated the same way, so one GEMM computes ``P W - N W = x_q W``
    (eq. 10 is linear in ``x_q``) with twice the reduction length, exactly, and the output needs no
    post-processing. ``nonneg=True``: the caller knows no value is negative (no sign test, no host sync).
    """
    if nonneg or mode == FULL_RANGE or t.numel() == 0 or nonneg_grid(t):
        return t, False
    if groups == 1:  # written in place into one buffer: two passes, no concatenation copy
        c = t.shape[1]
        split = t.new_empty((t.shape[0], 2 * c, *t.shape[2:]))
        pos = torch.clamp(t, min=0, out=split[:, :c])
        torch.sub(pos, t, out=split[:, c:])  # max(-t, 0) = max(t, 0) - t
        return split, True
    pos = t.clamp(min=0)
    neg = pos - t
    b, c = t.shape[:2]
    rest = t.shape[2:]
    pos = pos.reshape(b, groups, c // groups, *rest)
    neg = neg.reshape(b, groups, c // groups, *rest)
    return torch.cat([pos, neg], dim=2).reshape(b, 2 * c, *rest), True


def u8_operand(t: torch.Tensor, mode: str, groups: int = 1, nonneg: bool = False) -> tuple[torch.Tensor, int, bool]:
    """The u8 activation oneDNN takes, its zero point, and whether it is the signed ``[P, N]`` split.

    A non-negative grid (``nonneg=True``, e.g. a uint8 grid handed over by the previous layer) is passed
    with zero point 0 in every mode: values up to 127 are exact even where only half the u8 range is.
    """
    if nonneg:
        return (t if t.dtype == torch.uint8 else t.to(torch.uint8)), 0, False
    operand, signed = grid_operand(t, mode, groups)
    zp = onednn_zero_point(mode)
    return (operand.add(zp) if zp else operand).to(torch.uint8), zp, signed


def signed_weight(w_q: torch.Tensor) -> torch.Tensor:
    """``[W, -W]`` along the input-channel dim (1) of an int8 weight (per group, as dim 1 already is)."""
    return torch.cat([w_q, w_q.neg()], dim=1)


def onednn_linear(
    u: torch.Tensor,
    zero_point: int,
    packed_weight: torch.Tensor,
    input_step: float,
    weight_step: torch.Tensor,
    bias: torch.Tensor | None,
    out: Output = FLOAT,
) -> torch.Tensor:
    """Eq. 10 for the u8 operand ``u`` (M, K) of :func:`u8_operand`: oneDNN u8 x s8 GEMM, int32 accumulation,
    then the output stage ``out`` (fp32, or the next layer's uint8 grid; :func:`onednn_output`).

    ``packed_weight`` is the prepacked weight, ``[W, -W]`` for the signed split.
    """
    scale, dtype, post_op, scalars = onednn_output(out)
    zeros = torch.zeros(weight_step.numel(), dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise.default(
        u, input_step, zero_point, packed_weight, weight_step, zeros, bias, scale, 0, dtype, post_op, scalars, "",
    )


# ------------------------------------------------------------------------------------------ fbgemm
# torch's fbgemm int8 GEMM is the fastest int8 Linear on x86 CPUs without VNNI (measured 2.2x fp32 at
# 1024x1024, batch 64, vs 1.5x for oneDNN's qlinear; benchmarks/bench_convert.py). We use
# ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` only as "u8 x s8 GEMM with int32 accumulation
# and an fp32 per-output-channel multiply": the input handed to it is already lq's integer grid (eq. 7,
# ``quantize_to_grid``, bit-identical to the fake-quant model) with scale 1.0, so fbgemm's own rounding
# (``fma(x, 1/scale, zero_point)``, which differs from ``round(x * s)`` just above half-integers) only ever
# sees integers; the packed weight carries the combined scale ``step_x * step_w[j]`` (eq. 10's one float
# multiply). One exception, exact too: the batch-1 chain's "clipped" hand-over (``fbgemm_grid_cap``) lets
# fbgemm quantize floats, with zero point 0, where the fma is a plain ``x * fp32(1/scale)`` and that factor
# is checked to be the next layer's ``s``. Where only u8 <= 127 is exact (``vpmaddubsw``), signed inputs run as
# one GEMM of twice the depth, ``[P, N]`` against ``[W, -W]`` (as for oneDNN, ``u8_operand``).
_FBGEMM_OP = "linear_with_input_q_dq_qweight_dq_output_fp32"
_FBGEMM_RELU_OP = "linear_with_input_q_dq_qweight_dq_relu_output_fp32"


def fbgemm_available() -> bool:
    """True if this torch build has fbgemm's quantized engine and the fp32-output int8 linear op."""
    try:
        return "fbgemm" in torch.backends.quantized.supported_engines and all(
            hasattr(torch.ops.quantized, op) for op in (_FBGEMM_OP, _FBGEMM_RELU_OP)
        )
    except Exception:  # noqa: BLE001 - a missing op namespace means "not available"
        return False


def fbgemm_prepack(w_q: torch.Tensor, out_scale: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
    """fbgemm's packed per-channel int8 weight: ``w_q`` [N, K] int8, ``out_scale`` [N] the fp32 factor each
    output channel's int32 sum is multiplied by, ``bias`` [N] fp32 added after it (``acc * scale + bias``)."""
    n = w_q.shape[0]
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "fbgemm"  # the pack's type decides which kernel runs later
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch; the pack is internal
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                w_q.cpu(), out_scale.float().double().cpu(), torch.zeros(n, dtype=torch.int64), 0
            )
            return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float().cpu())
    finally:
        torch.backends.quantized.engine = previous


@functools.cache
def fbgemm_op(relu: bool) -> Callable[..., torch.Tensor]:
    """The op's C++ entry point. Python's op call checks every argument for fake script objects (tracing
    support; ~10 us a call, as much as a batch-1 GEMM's quantization); eager calls with real packed weights
    do not need it. Falls back to the public overload if torch renames the attribute."""
    overload = getattr(torch.ops.quantized, _FBGEMM_RELU_OP if relu else _FBGEMM_OP).default
    return getattr(overload, "_op", overload)


def fbgemm_linear(
    t: torch.Tensor, packed: Callable[[bool], Any], mode: str, relu: bool = False, nonneg: bool = False
) -> torch.Tensor:
    """Eq. 10 for ``t`` (M, K), the integer grid: fbgemm's u8 x s8 GEMM, fp32 output (the bias is in the
    pack), ``relu`` fused. ``packed(signed)`` returns the packed weight, ``[W, -W]`` when ``signed``;
    ``nonneg``: ``t`` is known to hold no negative value (zero point 0, no sign test)."""
    operand, signed = grid_operand(t if t.dtype == torch.float32 else t.float(), mode, nonneg=nonneg)
    return fbgemm_op(relu)(operand, 1.0, 0 if nonneg else onednn_zero_point(mode), packed(signed))


def fbgemm_grid_cap(step: float, inv_step: torch.Tensor, qmax: int) -> float | None:
    """The clip ``c`` for which fbgemm's own input quantization with scale ``step`` of ``min(y, c)`` is eq. 7,
    ``clip(round(y * s), 0, qmax)``, for every ``y >= 0`` (``s = inv_step``); ``None`` where there is none.

    fbgemm quantizes an fp32 input as ``round(y * fp32(1 / scale))`` (ties to even), clipped to [0, 255]
    at zero point 0. That is eq. 7 below the clip when ``fp32(1 / step) == s``, true for about 86% of
    steps (the reciprocal of a reciprocal is not always the number back). The clip at ``qmax`` is then
    ``c = fp32(qmax * step)``, whose product with ``s`` rounds to ``qmax``: values above ``c`` become ``qmax``,
    values below quantize as eq. 7 does (monotone). Checked in ``tests/test_deploy_chain.py`` on values at
    and next to every half-integer.
    """
    a = fake_quant_step(step, inv_step)  # fp32(1 / step) == s, or None
    if a is None:
        return None
    cap = torch.tensor(float(qmax), dtype=torch.float32) * torch.tensor(a, dtype=torch.float32)
    return float(cap) if float((cap * inv_step.detach().float().cpu().reshape(())).round()) == qmax else None


#: the smallest magnitude that rounds to Inf in fp32 (round to nearest): ``2**128 - 2**103``
FP32_OVERFLOW = 2.0**128 - 2.0**103


def fake_quant_step(step: float, inv_step: torch.Tensor) -> float | None:
    """``step`` as fp32 where torch's fake quantization with it computes eq. 7's integers exactly and
    fbgemm's input quantization with it gets them back from the result; ``None`` where it cannot.

    ``torch.fake_quantize_per_tensor_affine(x, a, 0, -q, q)`` multiplies by ``fp32(1 / a)``, rounds (ties
    to even), clips and multiplies by ``a``: eq. 7's ``clip(round(x * s), -q, q)`` times ``a`` when
    ``fp32(1 / a) == s``. fbgemm quantizes that product ``n a`` as ``round(n a * fp32(1 / a)) + 128``
    (full range): the product is ``n`` within a few fp32 ulps of 127, far inside the rounding interval,
    so it gives ``n`` back. One op for the multiply, round and clip of a float input (three before: each
    ~5 us cache-cold at batch 1). Checked in ``tests/test_deploy_chain.py`` on values at every tie. As
    :func:`fbgemm_grid_cap`, this needs ``fp32(1 / step) == s`` (about 86% of steps).
    """
    s = inv_step.detach().float().cpu().reshape(())
    a = torch.tensor(step, dtype=torch.float32)
    if float(torch.ones((), dtype=torch.float32) / a) != float(s):
        return None
    return float(a)


@functools.cache
def fbgemm_mode() -> str:
    """How fbgemm's u8 x s8 GEMM accumulates here (``FULL_RANGE`` / ``HALF_RANGE`` / ``UNAVAILABLE``),
    found once by worst-case operands against exact float math, as :func:`onednn_mode` does for oneDNN."""
    if not fbgemm_available():
        return UNAVAILABLE

    def exact(u_max: int, zp: int) -> bool:
        k, n = 64, 16
        w = torch.full((n, k), 127, dtype=torch.int8)
        w[n // 2 :] = -127
        packed = fbgemm_prepack(w, torch.ones(n))
        x = torch.full((4, k), float(u_max - zp), dtype=torch.float32)  # integers, as lq feeds it
        y = getattr(torch.ops.quantized, _FBGEMM_OP)(x, 1.0, zp, packed)
        return bool(torch.equal(y.double(), x.double() @ w.double().t()))

    try:
        mode = FULL_RANGE if exact(255, 128) and exact(1, 128) else HALF_RANGE if exact(127, 0) else UNAVAILABLE
    except Exception as err:  # noqa: BLE001 - any failure of the op means "do not use it"
        log.info("lq.deploy: fbgemm int8 self-test failed (%s)", err)
        mode = UNAVAILABLE
    log.info("lq.deploy: fbgemm int8 mode on this CPU: %s", mode)
    return mode


def onednn_conv(
    u: torch.Tensor,
    zero_point: int,
    packed_weight: torch.Tensor,
    input_step: float,
    weight_step: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    out: Output = FLOAT,
) -> torch.Tensor:
    """Eq. 10 as a convolution (Conv1d/2d/3d) of the u8 operand ``u`` (:func:`u8_operand`): oneDNN u8 x s8,
    int32 accumulation, then the output stage ``out`` (as in :func:`onednn_linear`).

    ``padding`` is zero padding of the *real* input; with a zero point of 128 oneDNN pads with the zero
    point, so padding means real 0 in both modes.
    """
    plan = OnednnConvPlan(list(stride), list(padding), None, None)
    return onednn_conv_call(zero_point, packed_weight, input_step, weight_step, bias, plan, dilation, groups, out)(u)


def onednn_conv_call(
    zero_point: int,
    packed_weight: torch.Tensor,
    input_step: float,
    weight_step: torch.Tensor,
    bias: torch.Tensor | None,
    plan: OnednnConvPlan,
    dilation: Sequence[int],
    groups: int,
    out: Output = FLOAT,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`onednn_conv` with everything but the input bound: ``u -> y`` for inputs of the size ``plan``
    (``lq.ops.hardware.onednn_conv_plan``) was made for, its explicit padding and output slice included."""
    scale, dtype, post_op, scalars = onednn_output(out)
    zeros = torch.zeros(weight_step.numel(), dtype=torch.int64)
    stride, padding, dilation = list(plan.stride), list(plan.padding), list(dilation)
    op = torch.ops.onednn.qconv_pointwise.default

    def call(u: torch.Tensor) -> torch.Tensor:
        if plan.pre_pad is not None:
            u = F.pad(u, plan.pre_pad, value=zero_point)
        return plan.finish(op(u, input_step, zero_point, packed_weight, weight_step, zeros, bias, stride, padding,
                              dilation, groups, scale, 0, dtype, post_op, scalars, ""))

    return call


# ------------------------------------------------------------------------------------------ CUDA _int_mm
def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def pad_weight_for_int_mm(w_q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 weight zero-padded to multiples of 8 in both dims (``torch._int_mm`` on CUDA)."""
    n, k = w_q.shape
    return F.pad(w_q, (0, _round_up(k, 8) - k, 0, _round_up(n, 8) - n))


def int_mm_linear(t: torch.Tensor, w_padded: torch.Tensor, n_out: int) -> torch.Tensor:
    """int32 ``x_q @ w_q^T`` with ``torch._int_mm``: rows padded to > 16, inner size to the padded weight's.

    Zero rows/columns add nothing to the integer sums, so the unpadded block is exact.
    """
    m, k = t.shape
    k_pad = w_padded.shape[1]
    m_pad = max(m, 17) if t.is_cuda else m
    m_pad = _round_up(m_pad, 8) if t.is_cuda else m_pad
    x_q = t.to(torch.int8)
    if m_pad != m or k_pad != k:
        x_q = F.pad(x_q, (0, k_pad - k, 0, m_pad - m))
    acc = torch._int_mm(x_q.contiguous(), w_padded.t())
    return acc[:m, :n_out]


__all__ = [
    "BACKENDS",
    "FLOAT",
    "FULL_RANGE",
    "HALF_RANGE",
    "UNAVAILABLE",
    "Output",
    "exact_float_dtype",
    "fbgemm_available",
    "fbgemm_linear",
    "fbgemm_mode",
    "fbgemm_prepack",
    "grid_operand",
    "int_mm_linear",
    "onednn_available",
    "onednn_conv",
    "onednn_linear",
    "onednn_mode",
    "onednn_output",
    "pad_weight_for_int_mm",
    "quantize_to_grid",
    "signed_weight",
    "u8_operand",
]
