"""Int8 conv2d as int8 im2col + int8 GEMM (``lq::int8_mm``): the forward, grad_input and grad_weight
convolutions of a layer -- the three that Zhu et al. 2020 (*Towards Unified INT8 Training for Convolutional
Neural Network*, CVPR) compute in int8 -- for devices without an int8 convolution kernel. Registered as the
CUDA kernels of ``lq::int8_conv2d``, ``lq::int8_conv2d_grad_input`` and ``lq::int8_conv2d_grad_weight``
(``lq::int8_mm`` runs ``torch._int_mm``, cuBLASLt's int8 GEMM, there). Nothing here is device specific: the
tests run the same code on CPU (``lq::int8_mm`` then takes its CPU route) against the float64 references.

Notation: ``x [N, C, H, W]``, ``w [O, C/g, kh, kw]``, ``g = dL/dy [N, O, Ho, Wo]``, per group
``R = N*Ho*Wo`` output positions and ``K = C/g*kh*kw`` taps.

* forward, per group: ``y[R, O/g] = cols[R, K] @ w[O/g, K]^T``, scaled by the per-tensor input step (row
  scale) and the per-output-channel weight step (column scale), plus the bias (Wu et al. eq. 10: the scales
  are constant along the reduced (C/g, kh, kw)). ``cols`` is the int8 im2col with K contiguous, copied once
  from the strided window view of the zero-padded input (``conv_windows``; zero is exact in symmetric int8).
  Both GEMM operands are K-contiguous ("TN"), the layout cuBLASLt's int8 GEMM takes on every GPU generation
  and the one ``lq::int8_mm``'s CUDA kernel hands it (any other layout would be copied there).
* grad_weight, per group: ``dW[O/g, K] = g[O/g, R] @ cols[K, R]^T``, scaled by the gradient's per-channel
  (or per-tensor) step and the input's step. Here R is reduced, so the im2col puts R last. The CPU kernel's
  im2col path is this function with unpadded shapes (``UNPADDED``).
* grad_input: the transposed convolution written as a stride-1 convolution -- the gradient zero-inserted
  (``stride - 1`` zeros between pixels) and padded by ``dilation * (k - 1) - padding`` (+ ``output_padding``;
  negative pads crop), convolved with the weight flipped in space and with in/out channels swapped per group
  (``transposed_conv_input`` / ``transposed_conv_weight``, shared with the oneDNN kernel) -- run through the
  forward GEMM above. Chosen over a GEMM ``g[R, O/g] @ w[O/g, K]`` followed by col2im because (1) exactness
  is the forward's argument verbatim (int8 operands, one int32-bounded reduction of O/g*kh*kw products,
  nothing wider than int8 in between), whereas col2im would sum GEMM outputs that ``lq::int8_mm`` returns
  as fp32 (rounded once they pass 2^24, i.e. O/g > 1040 at 8 bits), and (2) memory: the int32/fp32 columns
  of col2im take 4 bytes per element, 4x the forward's int8 im2col always, while the zero-inserted int8
  im2col is ``(H*W)/(Ho*Wo) * O/C``, about ``stride^2 * O/C`` times the forward's: 1x for the stride-1 convs
  that make up most networks, but 4x (C -> C) to 8x (C -> 2C) for a stride-2 downsampling conv, where 3/4
  of the products are with inserted zeros; plus the int8 canvas, about ``N*O*H*W`` bytes. Sub-pixel
  decomposition (one stride-1 conv per stride phase) would remove the zeros; not done here.

Shapes: ``torch._int_mm`` on CUDA needs M > 16 and K, N positive multiples of 8 (``lq::int8_mm``'s CUDA
kernel checks exactly this and otherwise falls back to its float64 reference). The operands are built with
zero padding up to those sizes (``CUDA_INT_MM``) -- zero rows/columns add 0 to every sum, and the padded
rows/columns of the result are dropped -- so K = 1, 1x1 convs, depthwise (O/g = 1), tiny batches and odd
sizes all run the int8 GEMM and stay exact; no shape class needs the reference. Each group's operands
start 256-byte aligned (``ALIGN``). The price is memory and
work on zeros where sizes are small or odd (a 3x3 depthwise im2col row grows from 9 to 16 taps). Groups run
one GEMM each (a depthwise layer with C channels: C thin GEMMs). im2col copies from strided views, so
non-contiguous and channels_last inputs need no special case; outputs are contiguous NCHW (as the fake
kernels say).

Overflow: ``lq::int8_mm`` cuts every reduction into chunks of at most ``max_exact_reduction(qa, qb) =
floor((2^31 - 1) / (qa * qb))`` terms (133,144 at 127 x 127), each term at most ``qa * qb`` in magnitude,
so no int32 partial sum can exceed ``2^31 - 1``; chunk boundaries are multiples of 8 (``reduction_chunks``)
and the padded reduction length is too, so each chunk meets ``_int_mm``'s K rule. Zero padding only adds
zero terms. Forward and grad_input reduce at most C/g*kh*kw (or O/g*kh*kw) terms -- one chunk in practice --
grad_weight reduces N*Ho*Wo, which can take several chunks, summed in fp32 as in every ``lq::int8_mm``
kernel. NaN/Inf never reach these kernels: ``Int8Conv2dFunction`` quantizes every operand with
``quantize_along`` / ``quantize_grad``, which raise ``FloatingPointError`` naming the layer on non-finite
values (``lq.ops.quantize.check_finite``).
"""

from __future__ import annotations

import dataclasses

import torch

from lq.ops import hardware as hw
from lq.ops import int8_conv_kernels as K
from lq.ops.int8_mm import int8_mm

__all__ = [
    "CUDA_INT_MM",
    "UNPADDED",
    "GemmShapes",
    "conv2d_fwd_gemm",
    "conv2d_grad_input_gemm",
    "conv2d_grad_weight_gemm",
]

KERNEL = "im2col_int8_mm"  # the name ``lq.ops.hardware.record_kernels`` shows for these kernels


@dataclasses.dataclass(frozen=True)
class GemmShapes:
    """Smallest GEMM sizes a kernel takes: M >= ``min_m``; K and N positive multiples of ``multiple``."""

    min_m: int
    multiple: int

    def m(self, m: int) -> int:
        """Rows of the left operand for ``m`` real rows."""
        return max(m, self.min_m)

    def kn(self, n: int) -> int:
        """Reduction length or right-operand rows for ``n`` real ones."""
        if self.multiple == 1:
            return n
        return max(self.multiple, -(-n // self.multiple) * self.multiple)


#: ``torch._int_mm`` on CUDA (cuBLASLt IGEMM): M > 16, K and N positive multiples of 8.
CUDA_INT_MM = GemmShapes(min_m=17, multiple=8)
#: no padding (the CPU kernels: ``lq::int8_mm`` routes each shape class there itself).
UNPADDED = GemmShapes(min_m=0, multiple=1)


#: bytes: every group's GEMM operand starts on such a boundary, as a fresh CUDA allocation does. torch's int8
#: GEMM calls ``cublasLtMatmul`` without alignment hints, and cuBLASLt's default preference assumes 256.
ALIGN = 256


def _gemm_operands(groups: int, rows: int, cols: int, used: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """int8 ``[g, rows, cols]``, each group's matrix contiguous and ``ALIGN``-aligned; zeros outside the
    ``[:used[0], :used[1]]`` region the caller fills (the GEMM padding)."""
    per = rows * cols
    stride = -(-per // ALIGN) * ALIGN if groups > 1 else per
    make = torch.empty if (rows, cols) == used else torch.zeros
    return make((groups, stride), dtype=torch.int8, device=like.device)[:, :per].view(groups, rows, cols)


def _im2col(x, kernel, stride, padding, dilation, groups, positions_first: bool, shapes: GemmShapes):
    """int8 im2col of ``x`` per group as a zero-padded GEMM operand, one copy from the strided window view.

    ``positions_first``: ``[g, M, Kp]`` with the taps (C/g, kh, kw) contiguous -- the forward's left operand
    (M >= R output positions). Otherwise ``[g, Np, Rp]`` with the positions (N, Ho, Wo) contiguous -- the
    grad_weight's right operand (Np >= K taps). Returns ``(cols, (N, Ho, Wo), K)``.
    """
    win = K.conv_windows(x, kernel, stride, padding, dilation)  # [C, kh, kw, N, Ho, Wo], a view
    c, kh, kw, n, ho, wo = win.shape
    cg = c // groups
    r, k = n * ho * wo, cg * kh * kw
    win = win.unflatten(0, (groups, cg))  # [g, C/g, kh, kw, N, Ho, Wo]
    if positions_first:
        cols = _gemm_operands(groups, shapes.m(r), shapes.kn(k), (r, k), x)
        cols[:, :r, :k].view(groups, n, ho, wo, cg, kh, kw).copy_(win.permute(0, 4, 5, 6, 1, 2, 3))
    else:
        cols = _gemm_operands(groups, shapes.kn(k), shapes.kn(r), (k, r), x)
        cols[:, :k, :r].view(groups, cg, kh, kw, n, ho, wo).copy_(win)
    return cols, (n, ho, wo), k


def _per_group(step: torch.Tensor, channels: int, groups: int, padded: int, fill: float) -> torch.Tensor:
    """A per-channel (or per-tensor, broadcast) fp32 vector as ``[g, padded]``, the padding ``fill``."""
    v = step.float().reshape(-1).expand(channels).reshape(groups, channels // groups)
    out = torch.full((groups, padded), fill, dtype=torch.float32, device=step.device)
    out[:, : v.shape[1]] = v
    return out


def conv2d_fwd_gemm(x, w, x_step, w_step, x_qmax, w_qmax, bias, stride, padding, dilation, groups,
                    shapes: GemmShapes = CUDA_INT_MM) -> torch.Tensor:
    """``lq::int8_conv2d`` as im2col + one ``lq::int8_mm`` per group (see the module docstring); fp32 NCHW."""
    o, cg, kh, kw = w.shape
    og = o // groups
    cols, (n, ho, wo), k = _im2col(x, (kh, kw), stride, padding, dilation, groups, True, shapes)
    r = n * ho * wo
    ogp = shapes.kn(og)
    wm = _gemm_operands(groups, ogp, cols.shape[2], (og, k), w)
    wm[:, :og, :k] = w.reshape(groups, og, k)
    ws = _per_group(w_step, o, groups, ogp, 1.0)
    b = None if bias is None else _per_group(bias, o, groups, ogp, 0.0)
    xs = x_step.float().reshape(1)
    y = torch.empty((n, o, ho, wo), dtype=torch.float32, device=x.device)
    for i in range(groups):
        out = int8_mm(cols[i], wm[i], xs, ws[i], x_qmax, w_qmax, None if b is None else b[i])  # [M, ogp]
        y[:, i * og : (i + 1) * og].copy_(out[:r, :og].view(n, ho, wo, og).permute(0, 3, 1, 2))
    return y


def conv2d_grad_input_gemm(g, w, g_step, g_qmax, w_qmax, input_size, stride, padding, dilation, groups,
                           shapes: GemmShapes = CUDA_INT_MM) -> torch.Tensor:
    """``lq::int8_conv2d_grad_input``: the zero-inserted gradient convolved (stride 1) with the flipped,
    channel-swapped weight through :func:`conv2d_fwd_gemm`; fp32 ``[N, C, H, W]`` scaled by ``g_step``."""
    canvas, conv_pad = K.transposed_conv_input(g, w.shape, input_size, stride, padding, dilation)
    wt = K.transposed_conv_weight(w, groups)
    one = torch.ones(1, dtype=torch.float32, device=g.device)
    return conv2d_fwd_gemm(
        canvas, wt, g_step, one, g_qmax, w_qmax, None, [1, 1], conv_pad, list(dilation), groups, shapes
    )


def conv2d_grad_weight_gemm(g, x, g_step, x_step, g_qmax, x_qmax, weight_size, stride, padding, dilation, groups,
                            shapes: GemmShapes = CUDA_INT_MM) -> torch.Tensor:
    """``lq::int8_conv2d_grad_weight`` as im2col + one ``lq::int8_mm`` per group; fp32 ``[O, C/g, kh, kw]``."""
    o, cg, kh, kw = weight_size
    og = o // groups
    cols, (n, ho, wo), k = _im2col(x, (kh, kw), stride, padding, dilation, groups, False, shapes)  # [g, Np, Rp]
    r = n * ho * wo
    # g [N, O, Ho, Wo] -> [g, M, Rp]: rows are output channels (each keeps its own scale), the reduced
    # positions contiguous, matching ``cols``.
    ogm = shapes.m(og)
    gm = _gemm_operands(groups, ogm, cols.shape[2], (og, r), g)
    gm[:, :og, :r].view(groups, og, n, ho, wo).copy_(g.unflatten(1, (groups, og)).permute(1, 2, 0, 3, 4))
    gs = _per_group(g_step, o, groups, ogm, 1.0)
    xs = x_step.float().reshape(1)
    outs = [int8_mm(gm[i], cols[i], gs[i], xs, g_qmax, x_qmax, None)[:og, :k] for i in range(groups)]
    return torch.cat(outs, 0).reshape(o, cg, kh, kw) if groups > 1 else outs[0].reshape(o, cg, kh, kw)


# ----------------------------------------------------------------------------------- CUDA kernels
@K.int8_conv2d_fwd.register_kernel("cuda")
def _conv_fwd_cuda(x, w, x_step, w_step, x_qmax, w_qmax, bias, stride, padding, dilation, groups):
    hw.ran("int8_conv2d", KERNEL)  # lq::int8_mm records its own kernel per group
    y = conv2d_fwd_gemm(x, w, x_step, w_step, x_qmax, w_qmax, bias, stride, padding, dilation, groups)
    return y.contiguous()  # the layout the op's fake kernel promises off CPU (compiled graphs check it)


@K.int8_conv2d_grad_input.register_kernel("cuda")
def _conv_grad_input_cuda(g, w, g_step, g_qmax, w_qmax, input_size, stride, padding, dilation, groups):
    hw.ran("int8_conv2d_grad_input", KERNEL)
    gx = conv2d_grad_input_gemm(g, w, g_step, g_qmax, w_qmax, input_size, stride, padding, dilation, groups)
    return gx.contiguous()


@K.int8_conv2d_grad_weight.register_kernel("cuda")
def _conv_grad_weight_cuda(g, x, g_step, x_step, g_qmax, x_qmax, weight_size, stride, padding, dilation, groups):
    hw.ran("int8_conv2d_grad_weight", KERNEL)
    gw = conv2d_grad_weight_gemm(g, x, g_step, x_step, g_qmax, x_qmax, weight_size, stride, padding, dilation, groups)
    return gw.contiguous()
