"""``lq::int8_mm``: ``out = (a @ b^T) * a_step[:, None] * b_step[None, :] + bias`` on int8 ``a [M, K]``,
``b [N, K]`` with exact int32-style accumulation (Wu et al. eq. 10), fp32 output.

Organised like bitsandbytes' ``backends/{default,cpu,cuda}/ops.py``: a ``torch.library`` custom op whose
default kernel is the portable reference (``int8_mm_reference``; ground truth in tests, used on any device
without a fast kernel), plus device kernels:

* CPU with AVX-512 VNNI: ``bitsandbytes::int8_linear_matmul`` (dispatches to ``torch._int_mm``).
* CPU without VNNI (AVX2): oneDNN ``qlinear_pointwise`` on a uint8-shifted operand (``_int_mm`` is a
  scalar loop there), provided the operand ranges cannot saturate (``lq.ops.hardware.u8s8_exact``).
* CUDA: ``torch._int_mm`` where its shape constraints hold.

Every kernel splits the reduction so that an int32 accumulator can never overflow; shapes a fast kernel
does not cover fall back to the reference with a one-time warning, never to wrong numbers.
"""

from __future__ import annotations

import threading

import torch

from lq.ops import hardware as hw

__all__ = ["exact_int_matmul", "int8_mm", "int8_mm_eager", "int8_mm_reference", "plain_cpu_eager"]


def _exact_fp32_ok(device: torch.device) -> bool:
    # fp32 GEMM on integer-valued data is exact while every partial sum stays <= 2^24 -- unless the
    # backend is allowed to drop precision (TF32 on CUDA, bf16 on CPU under "medium" precision).
    return device.type == "cpu" and torch.get_float32_matmul_precision() == "highest"


def exact_int_matmul(a: torch.Tensor, b: torch.Tensor, a_qmax: int = 127, b_qmax: int = 127) -> torch.Tensor:
    """``a @ b^T`` of int8 matrices, exact, as float64 (plain torch, any device).

    On CPU the reduction is cut into chunks of ``K_c`` with ``K_c * a_qmax * b_qmax <= 2^24`` so that each
    chunk is an exact fp32 GEMM (fast), and the chunks are summed in float64 (exact below 2^53). Elsewhere
    float64 GEMMs are used directly.
    """
    k = a.shape[1]
    if not _exact_fp32_ok(a.device):
        return a.double() @ b.double().t()
    chunk = max(1, hw.FP32_EXACT_INT // max(1, a_qmax * b_qmax))
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for k0 in range(0, k, chunk):
        k1 = min(k, k0 + chunk)
        out += (a[:, k0:k1].float() @ b[:, k0:k1].float().t()).double()
    return out


def _finish(acc: torch.Tensor, a_step: torch.Tensor, b_step: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = acc.mul_(a_step.reshape(-1, 1).to(acc.dtype)).mul_(b_step.reshape(1, -1).to(acc.dtype))
    if bias is not None:
        out = out.add_(bias.to(acc.dtype))
    return out.float()


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"lq::int8_mm needs int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"lq::int8_mm needs a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")


def int8_mm_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    a_step: torch.Tensor,
    b_step: torch.Tensor,
    a_qmax: int,
    b_qmax: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Portable reference of ``lq::int8_mm`` (exact integer sums, scaled in float64, returned as fp32)."""
    _check(a, b)
    return _finish(exact_int_matmul(a, b, a_qmax, b_qmax), a_step, b_step, bias)


@torch.library.custom_op("lq::int8_mm", mutates_args=())
def int8_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_step: torch.Tensor,
    b_step: torch.Tensor,
    a_qmax: int,
    b_qmax: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``(a @ b^T) * a_step[:, None] * b_step[None, :] + bias``; a int8 [M, K], b int8 [N, K], fp32 out.

    ``a_step``: ``[M]`` or ``[1]``; ``b_step``: ``[N]`` or ``[1]``; ``|a| <= a_qmax``, ``|b| <= b_qmax``
    (used to pick exact kernels and overflow-free chunking).
    """
    hw.ran("int8_mm", "reference")  # devices without a registered fast kernel
    return int8_mm_reference(a, b, a_step, b_step, a_qmax, b_qmax, bias)


@int8_mm.register_fake
def _(a, b, a_step, b_step, a_qmax, b_qmax, bias):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.float32)


# --------------------------------------------------------------------------------------------- CPU
def reduction_chunks(k: int, chunk: int, multiple: int = 1) -> list[tuple[int, int]]:
    """``[k0, k1)`` ranges covering ``range(k)``, each at most ``chunk`` long, of near-equal length.

    Balanced rather than ``chunk, chunk, ..., rest``: a rest of length 1 would hit the K = 1 shape class
    that ``torch._int_mm`` gets wrong on CPU. ``multiple``: every boundary but the last on that multiple
    (CUDA's ``_int_mm`` wants K % 8 == 0; then ``chunk`` must be at least ``multiple``).
    """
    if k <= chunk:
        return [(0, k)]
    units, per = -(-k // multiple), max(1, chunk // multiple)
    pieces = -(-units // per)
    bounds = [min(k, (i * units // pieces) * multiple) for i in range(pieces + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def int_mm_covers(m: int, k: int, n: int) -> bool:
    """Shape classes where CPU ``torch._int_mm`` is exact, as measured: K = 1 with N > 1 returns wrong sums
    on the AVX-512 VNNI host (every M; ``tests/test_kernels_differential.py`` checks all classes against the
    reference on whatever host runs the tests)."""
    return k >= 2 or n == 1


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides torch itself would give it, where a dimension has size 1 (else ``t``): CPU
    ``torch._int_mm`` reads a ``[1, K]`` operand with strides ``(1, 1)`` (a transposed ``[K, 1]`` column, which
    torch counts as contiguous) as garbage, and into ``out=`` it writes nothing (found on the AVX-512 VNNI
    host; the operands are tiny then, so the copy is free)."""
    if 1 not in t.shape:
        return t
    return t.contiguous().reshape(-1).view(t.shape)


def _int_mm_chunked(
    a: torch.Tensor, b: torch.Tensor, a_qmax: int, b_qmax: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``a @ b^T`` via bitsandbytes' ``int8_linear_matmul`` (-> ``torch._int_mm``), reduction split so that no
    chunk can overflow int32: the int32 sums when one chunk covers K, else the chunk partials summed in fp32.
    Operands may be strided views (a transposed ``a`` or ``b`` is read in place: ``_int_mm`` takes strides,
    and on the AVX-512 host a transposed ``a`` costs 1.41 ms against 0.67 ms to copy it plus 1.34 ms for the
    contiguous product, 1024^3, one thread). ``out``: an int32 ``[M, N]`` buffer for the sums when one chunk
    covers K (:func:`sums_workspace`); ignored otherwise."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    k = a.shape[1]
    chunks = reduction_chunks(k, hw.max_exact_reduction(a_qmax, b_qmax))
    if len(chunks) == 1:
        a, b = _canonical(a), _canonical(b)
        if out is not None:
            # bitsandbytes' CPU kernel is this very call (``torch._int_mm(A, B.t())``) without ``out=``
            return torch._int_mm(a, b.t(), out=out)
        return torch.ops.bitsandbytes.int8_linear_matmul.default(a, b)
    out = None
    for k0, k1 in chunks:
        part = torch.ops.bitsandbytes.int8_linear_matmul.default(
            a[:, k0:k1].contiguous(), b[:, k0:k1].contiguous()
        ).float()
        out = part if out is None else out.add_(part)
    return out


_workspace = threading.local()


def sums_workspace(m: int, n: int) -> torch.Tensor | None:
    """A reused int32 ``[m, n]`` CPU buffer for integer sums that the output stage consumes at once, or None for
    outputs of ``IN_PLACE_BYTES`` and more (those are scaled over their own memory and returned).

    One buffer per thread, grown to the largest size asked for (at most 32 MiB). A fresh int32 output per
    GEMM costs page faults whenever glibc hands out new pages (its dynamic mmap threshold; every time above
    32 MiB): ``torch._int_mm`` 1024^3 took 0.8-2.1 ms after other work had run, 0.74-1.05 ms into a reused
    buffer (AVX-512 VNNI host, 2 threads)."""
    numel = m * n
    if numel == 0 or _scaled_in_place(numel):
        return None
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.numel() < numel:
        # never an inference tensor (one made under torch.inference_mode, e.g. Lightning's sanity-check validation,
        # could not be written outside it: every later training step would raise)
        with torch.inference_mode(False):
            buf = _workspace.buf = torch.empty(numel, dtype=torch.int32)
    return buf[:numel].view(m, n)


def _epilogue(acc: torch.Tensor, a_step: torch.Tensor, b_step: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = acc.float() * a_step.float().reshape(-1, 1) * b_step.float().reshape(1, -1)
    return out if bias is None else out + bias.float()


# Outputs from this size on are scaled in place (glibc serves allocations above its mmap threshold, at most
# 32 MiB, with fresh pages every time, and faulting them in costs as much as the scaling itself)
IN_PLACE_BYTES = 32 << 20


def _scaled_in_place(numel: int) -> bool:
    """Whether an output of ``numel`` 4-byte sums is scaled over its own memory (``IN_PLACE_BYTES``)."""
    return numel * 4 >= IN_PLACE_BYTES


def scale_sums(acc: torch.Tensor, a_step: torch.Tensor, b_step: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The output stage of eq. 10: integer sums ``acc [M, N]`` (int32, or fp32 holding integers) times
    ``a_step[:, None] * b_step[None, :]`` plus ``bias``, fp32, in one fused pass (compiled, ``lq.ops.fused``)
    instead of four eager ones (int32 -> fp32 copy, two scalings, the bias: 3.3 -> 0.6 ms on a 1024x1024
    output, one thread). Same operations in the same order as the eager ones. A contiguous CPU output of
    ``IN_PLACE_BYTES`` or more is written over ``acc``'s own memory, 1 MiB of rows at a time: 9.3 -> 4.3 ms
    on an 8192x1024 output, 13.4 -> 7.0 ms on MiniLM's 8192x1536 (2 threads)."""
    from lq.ops import fused, native_quant

    in_place = acc.device.type == "cpu" and acc.is_contiguous() and _scaled_in_place(acc.numel()) and acc.dim() == 2
    done = native_quant.scale_sums(acc, a_step, b_step, bias, in_place)  # (C, one pass: CPU int32 sums)
    if done is not None:
        return done
    if in_place:
        return _scale_sums_in_place(acc, a_step, b_step, bias)
    return fused.call("int8_mm_epilogue", _epilogue, acc, a_step, b_step, bias)


def _scale_sums_in_place(acc, a_step, b_step, bias) -> torch.Tensor:
    m, n = acc.shape
    out = acc if acc.dtype == torch.float32 else acc.view(torch.float32)  # int32 and fp32: 4 bytes each
    a = a_step.float().reshape(-1, 1).expand(m, 1)
    b = b_step.float().reshape(1, -1)
    c = None if bias is None else bias.float().reshape(1, -1)
    rows = max(1, (1 << 20) // (4 * n))
    tmp = torch.empty(min(rows, m), n)
    for i in range(0, m, rows):
        j = min(m, i + rows)
        t = tmp[: j - i]
        torch.mul(acc[i:j], a[i:j], out=t)  # read before any write to these rows: in place is safe
        t.mul_(b)
        if c is not None:
            t.add_(c)
        out[i:j].copy_(t)
    return out


def onednn_qlinear(u: torch.Tensor, zp: int, w: torch.Tensor, u_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    """oneDNN ``(u - zp) @ w^T * u_scale * w_scale[None, :]`` with u uint8 [M, K], w int8 [N, K], fp32 out."""
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    w_zp = torch.zeros(w.shape[0], dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(
        u, u_scale, zp, packed, w_scale, w_zp, None, 1.0, 0, torch.float32, "none", [], ""
    )


def _onednn_mm(
    u_src: torch.Tensor, u_qmax: int, u_step: torch.Tensor, w: torch.Tensor, w_qmax: int, w_step: torch.Tensor
) -> torch.Tensor:
    """``u_src @ w^T`` scaled, u_src the operand oneDNN sees as unsigned (shifted by its zero point)."""
    u, zp = hw.to_biased_u8(u_src.contiguous(), u_qmax)
    w = w.contiguous()
    n = w.shape[0]
    w_scale = w_step.float().reshape(-1).expand(n).contiguous() if w_step.numel() == 1 else w_step.float().contiguous()
    per_tensor = u_step.numel() == 1
    u_scale = float(u_step) if per_tensor else 1.0
    k = u.shape[1]
    out = None
    for k0, k1 in reduction_chunks(k, hw.max_exact_reduction(hw.biased_u8_max(u_qmax), w_qmax)):
        uc = u if k1 - k0 == k else u[:, k0:k1].contiguous()
        wc = w if k1 - k0 == k else w[:, k0:k1].contiguous()
        part = onednn_qlinear(uc, zp, wc, u_scale, w_scale)
        out = part if out is None else out.add_(part)
    if not per_tensor:
        out.mul_(u_step.float().reshape(-1, 1))  # caller adds the bias afterwards
    return out


def _reference_fallback(key: str, message: str, *args) -> torch.Tensor:
    """A shape or range class no fast kernel computes exactly: warn once per class, note it, run the reference."""
    hw.warn_once(key, message)
    hw.ran("int8_mm", "reference")
    return int8_mm_reference(*args)


@int8_mm.register_kernel("cpu")
def _int8_mm_cpu(a, b, a_step, b_step, a_qmax, b_qmax, bias):
    _check(a, b)
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0 or k == 0:
        hw.ran("int8_mm", "reference")
        return int8_mm_reference(a, b, a_step, b_step, a_qmax, b_qmax, bias)
    from lq.ops import native_quant

    out = native_quant.amx_mm(a, b, a_step, b_step, bias, hw.max_exact_reduction(a_qmax, b_qmax))
    if out is not None:  # (AMX: the product and the output stage in one C call)
        hw.ran("int8_mm", "amx")
        return out
    if hw.cpu_int_mm_is_fast() and int_mm_covers(m, k, n):
        hw.ran("int8_mm", "int_mm")
        return scale_sums(_int_mm_chunked(a, b, a_qmax, b_qmax, sums_workspace(m, n)), a_step, b_step, bias)
    elif hw.cpu_int_mm_is_fast() and not (hw.u8s8_exact(a_qmax, b_qmax) or hw.u8s8_exact(b_qmax, a_qmax)):
        return _reference_fallback(
            "int8_mm:int_mm-k1",
            f"lq::int8_mm: torch._int_mm on CPU returns wrong sums for K = 1 (here M={m}, N={n}); using the "
            "exact reference kernel for this shape class.",
            a, b, a_step, b_step, a_qmax, b_qmax, bias,
        )
    elif hw.u8s8_exact(a_qmax, b_qmax):
        hw.ran("int8_mm", "onednn")
        out = _onednn_mm(a, a_qmax, a_step, b, b_qmax, b_step)
    elif hw.u8s8_exact(b_qmax, a_qmax):
        # out^T = b @ a^T: the operand with the narrower range becomes oneDNN's unsigned source.
        hw.ran("int8_mm", "onednn_transposed")
        out = _onednn_mm(b, b_qmax, b_step, a, a_qmax, a_step).t()
    else:
        return _reference_fallback(
            f"int8_mm:{a_qmax}:{b_qmax}",
            f"lq::int8_mm: this CPU has no VNNI, so oneDNN's u8 x s8 kernels saturate on {a_qmax}- x "
            f"{b_qmax}-range operands; using the exact (slower) reference kernel. Int8ComputeConfig."
            "for_cpu_without_vnni() (7-bit activations and weights) enables the fast kernels.",
            a, b, a_step, b_step, a_qmax, b_qmax, bias,
        )
    if bias is not None:
        out = out + bias.float()
    return out


def int8_mm_eager(
    a: torch.Tensor, b: torch.Tensor, a_step: torch.Tensor, b_step: torch.Tensor, a_qmax: int, b_qmax: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``lq::int8_mm`` with its CPU kernel called directly where nothing needs the op itself: plain CPU tensors, no
    compile trace, no dispatch or torch-function mode (profilers, fake tensors and tracers see the op as before).
    The custom op's Python dispatch cost 70-250 us a call on the 2-core host, against a 0.85 ms 1024^3 product."""
    if plain_cpu_eager(a, b):
        return _int8_mm_cpu(a, b, a_step, b_step, a_qmax, b_qmax, bias)
    return int8_mm(a, b, a_step, b_step, a_qmax, b_qmax, bias)


def plain_cpu_eager(*tensors: torch.Tensor) -> bool:
    """Whether a custom op's CPU kernel may be called directly on ``tensors``: plain CPU tensors, no compile trace, no
    dispatch or torch-function mode (where those are active, the op itself must run: profilers, fake tensors and
    tracers see it)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    for t in tensors:  # (a loop and is_cpu: ~3x cheaper than all() over a generator and device.type)
        if type(t) is not torch.Tensor or not t.is_cpu:
            return False
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and not torch._C._is_torch_function_mode_enabled())


# -------------------------------------------------------------------------------------------- CUDA
@int8_mm.register_kernel("cuda")
def _int8_mm_cuda(a, b, a_step, b_step, a_qmax, b_qmax, bias):
    _check(a, b)
    m, k = a.shape
    n = b.shape[0]
    # torch._int_mm (cuBLASLt IGEMM) needs M > 16 and K, N multiples of 8: zero rows / columns make any shape
    # fit (a zero adds nothing to an integer dot product), and the result is cut back to M x N
    mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
    if (mp, kp) != (m, k):
        a = torch.nn.functional.pad(a, (0, kp - k, 0, mp - m))
    if (np_, kp) != (n, k):
        b = torch.nn.functional.pad(b, (0, kp - k, 0, np_ - n))
    k = kp
    hw.ran("int8_mm", "int_mm")
    out = None
    for k0, k1 in reduction_chunks(k, hw.max_exact_reduction(a_qmax, b_qmax), multiple=8):
        # mat2 = b_chunk^T [Kc, N] as a column-major view, the layout cuBLASLt's IGEMM wants
        part = torch._int_mm(a[:, k0:k1].contiguous(), b[:, k0:k1].contiguous().t()).float()
        out = part if out is None else out.add_(part)
    out = out[:m, :n].contiguous() if out.shape != (m, n) else out
    out.mul_(a_step.float().reshape(-1, 1)).mul_(b_step.float().reshape(1, -1))
    if bias is not None:
        out = out + bias.float()
    return out
