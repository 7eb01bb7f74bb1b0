"""Converted int8 layers written in plain torch ops, for ``torch.compile`` and ``torch.export``.

The eager kernels of a converted layer (``lq.deploy.kernels``: oneDNN / fbgemm packed weights, a sign test
and a NaN test that read values back to Python) cost a fixed 30-100 us a call whatever the batch, which is
why a converted CNN lost to fp32 at batch 1. Written instead as ops a compiler can see, the same eq. 10 runs
as one graph: the activation quantization of eq. 7 (``clip(round(s x))``), an integer GEMM with int32
accumulation (``torch._int_mm``), and the output stage ``acc * (1 / (s_x s_w)) + b``. Inductor then fuses
each layer's output stage with whatever follows it in the user's forward (ReLU, pooling, a residual add)
and with the next layer's quantization into one loop, so the int8 "chain" of ``lq.deploy.chain`` falls out
of the compiler for any graph, not only ``nn.Sequential``. Layers pick this form while
``torch.compiler.is_compiling()`` (``lq.convert(model, compile=True)``, ``torch.compile``, ``torch.export``).

Exactness is the eager path's: the integers are the fake-quant model's (same ``x * s`` in fp32, torch's
round-half-even), every integer sum is exact (int32, the reduction cut into chunks that cannot overflow;
or float math on integer values where the sum stays below 2^24 in fp32, 2^53 in fp64), and the output stage
is the same fp32 expression. Which GEMM runs, by device and host:

- CPU with AVX-512 VNNI / AMX (``lq.ops.hardware.cpu_int_mm_is_fast``) and CUDA: ``torch._int_mm``. A
  convolution (2d, one group) is an int8 im2col in channels-last order (one copy of the strided windows of
  the zero-padded input; zero is exact in symmetric int8) times the ``[kh*kw*C, O]`` weight; its output rows
  are the NHWC output, returned as a channels-last NCHW tensor. CUDA's shape rules (rows > 16, inner and
  output sizes multiples of 8; ``lq.ops.int8_conv_gemm.CUDA_INT_MM``) are met by zero padding. The shape
  class CPU ``_int_mm`` gets wrong (K = 1, ``lq.ops.int8_mm.int_mm_covers``) takes the float route below.
- Everywhere else (AVX2 CPUs, where ``_int_mm`` is a scalar loop; grouped, 1d and 3d convolutions;
  ``backend="reference"``): ``F.linear`` / ``F.conv*d`` on the integer values in fp32 (exact below 2^24)
  or fp64, as the eager reference kernel.
- Except: a 2-d convolution on a CPU with oneDNN that is large enough to pay oneDNN's per-call set-up
  (batch 14-32 and up for 28x28 images) calls the layer's own eager oneDNN kernel from the graph
  (:mod:`lq.deploy.onednn_op`; on VNNI and, with the signed split, on AVX2). Its direct convolution is ~3x
  the im2col + ``_int_mm`` on SmallResNet's layers at batch 64. ``torch.export`` never takes it.

A NaN or Inf input raises a ``RuntimeError`` naming the layer on CPU (``torch._assert_async``, which
Inductor keeps; one fused reduction per layer; eager layers raise ``FloatingPointError``, a type the
compiler cannot raise). On CUDA a failed device assert would end the process, so there a non-finite input
makes the layer's whole output NaN instead (never finite wrong numbers).

fp16/bf16 activations: ``lq.convert(compile=True)`` sets Inductor's ``emulate_precision_casts``, so a layer's
output is rounded to the input dtype before the next layer quantizes it, as in eager mode (without it Inductor
keeps the fp32 value through the fused cast and the next layer's integers can differ). A ``torch.compile`` of
your own should set it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lq.ops import hardware as hw
from lq.ops.int8_conv_gemm import CUDA_INT_MM
from lq.ops.int8_mm import int_mm_covers, reduction_chunks

__all__ = ["conv2d_int_mm", "graph_breaks", "int_mm_exact", "quantize", "use_int_mm"]


def quantize(x: torch.Tensor, inv_step: torch.Tensor, qmax: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eq. 7, ``clip(round(x * s), -qmax, qmax)`` as fp32 integers (``kernels.quantize_to_grid``'s values),
    and what the output must add to carry a non-finite input: None on CPU, where a NaN/Inf input raises
    naming ``name``; on CUDA a 0-d tensor that is 0 for a finite input and NaN otherwise."""
    t = (x if x.dtype == torch.float32 else x.float()) * inv_step
    finite = torch.isfinite(t).all()
    poison = None
    if t.is_cuda:
        poison = torch.where(finite, 0.0, float("nan"))
    else:
        torch._assert_async(finite, f"{name}: NaN or Inf in the input: int8 kernels cannot represent it "
                                    "(check the data or the previous layer)")
    return t.round().clamp(-qmax, qmax), poison


@torch.compiler.assume_constant_result
def _cpu_int_mm_fast() -> bool:
    """``hw.cpu_int_mm_is_fast()``, a constant of the process for the tracer (it reads /proc/cpuinfo)."""
    return hw.cpu_int_mm_is_fast()


def use_int_mm(device: torch.device, backend: str, k: int, n: int) -> bool:
    """Whether a ``[M, k] x [k, n]`` integer GEMM runs as ``torch._int_mm`` here (see the module docstring)."""
    if backend == "reference":
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _cpu_int_mm_fast() and int_mm_covers(2, k, n)


def int_mm_exact(
    a: torch.Tensor, w_kn: torch.Tensor, qmax_a: int, qmax_w: int, cuda_shapes: bool | None = None
) -> torch.Tensor:
    """``a @ w_kn`` of int8 ``a [M, K]`` and ``w_kn [K, N]`` with ``torch._int_mm``, as fp32: the reduction
    is cut where an int32 sum could overflow (``max_exact_reduction``), the chunks' int32 sums added in fp64
    when there are several. ``cuda_shapes`` (default: ``a.is_cuda``) zero-pads to cuBLASLt's shape rules."""
    (m, k), n = a.shape, w_kn.shape[1]
    cuda_shapes = a.is_cuda if cuda_shapes is None else cuda_shapes
    if cuda_shapes:  # cuBLASLt's rules (CUDA_INT_MM: rows > 16, K and N multiples of 8); zeros add nothing
        mp, kp, np_ = CUDA_INT_MM.m(m), CUDA_INT_MM.kn(k), CUDA_INT_MM.kn(n)
        # the weight stays column-major, the layout cuBLASLt's int8 GEMM takes (as lq::int8_mm hands it)
        a, w_kn = F.pad(a, (0, kp - k, 0, mp - m)), F.pad(w_kn.t(), (0, kp - k, 0, np_ - n)).t()
    multiple = CUDA_INT_MM.multiple if cuda_shapes else 1
    spans = reduction_chunks(a.shape[1], hw.max_exact_reduction(qmax_a, qmax_w), multiple)
    if len(spans) == 1:
        acc = torch._int_mm(a, w_kn).float()
    else:
        acc = None
        for k0, k1 in spans:
            part = torch._int_mm(a[:, k0:k1].contiguous(), w_kn[k0:k1].t().contiguous().t()).double()
            acc = part if acc is None else acc + part
        acc = acc.float()
    return acc[:m, :n] if acc.shape != (m, n) else acc


def conv2d_int_mm(
    t: torch.Tensor,
    w_kn: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    qmax_a: int,
    qmax_w: int,
) -> torch.Tensor:
    """int32-exact ``conv2d`` (one group) of the integer grid ``t [N, C, H, W]`` (fp32 integers) with the
    int8 weight ``w_kn [kh*kw*C, O]`` (taps outer, channels inner), as fp32 ``[N, O, Ho, Wo]`` in
    channels-last memory: int8 im2col in NHWC order, then one integer GEMM (:func:`int_mm_exact`)."""
    ph, pw = padding
    x8 = t.to(torch.int8).permute(0, 2, 3, 1)  # NHWC
    if ph or pw:
        x8 = F.pad(x8, (0, 0, pw, pw, ph, ph))
    cols, ho, wo = im2col(x8.contiguous(), kernel_size, stride, dilation)
    acc = int_mm_exact(cols, w_kn, qmax_a, qmax_w)
    return acc.view(t.shape[0], ho, wo, w_kn.shape[1]).permute(0, 3, 1, 2)


def im2col(
    x8: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[torch.Tensor, int, int]:
    """The ``[positions, taps * channels]`` operand of the padded contiguous NHWC input ``x8`` (its windows as
    a strided view, copied once), and the output height and width."""
    n, h, w, c = x8.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (w - dw * (kw - 1) - 1) // sw + 1
    s_n, s_h, s_w, s_c = x8.stride()
    windows = x8.as_strided((n, ho, wo, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
    return windows.reshape(n * ho * wo, kh * kw * c), ho, wo


def graph_breaks(model: torch.nn.Module, *example: torch.Tensor) -> list[str]:
    """Why ``torch.compile`` would split ``model``'s forward on ``example`` (empty: one graph). The code
    between graphs runs eagerly, so a break costs speed, never correctness; this says where it happens.

    It runs ``torch._dynamo.explain``, which resets dynamo: every model compiled in this process compiles
    again on its next call. Call it before timing, not between."""
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(*example)
    return [str(getattr(b, "reason", b)) for b in explanation.break_reasons]
