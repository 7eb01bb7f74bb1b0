"""Int8 conv2d kernels as ``torch.library`` custom ops: forward, grad_input, grad_weight.

Each op has a portable reference (default kernel: exact float64 convolution of the integer values,
scaled afterwards; ground truth in tests, runs on any device with float64 conv) and a CPU fast kernel:

* ``lq::int8_conv2d`` (forward): oneDNN ``qconv_prepack`` + ``qconv2d_pointwise`` on a uint8 source with
  zero point (the symmetric int8 activation shifted, ``lq.ops.hardware.to_biased_u8``), int8 weight with
  per-output-channel scales, fp32 output. oneDNN pads with the zero point, i.e. with real zeros.
* ``lq::int8_conv2d_grad_input``: the transposed convolution written as a stride-1 convolution with the
  same oneDNN op: zero-insert the gradient (``stride - 1`` zeros between pixels), pad it by
  ``dilation * (k - 1) - padding`` (plus ``output_padding`` at the bottom/right; negative pads crop), and
  convolve with the weight flipped in space and with its in/out channels swapped per group.
* ``lq::int8_conv2d_grad_weight``: int8 im2col (strided view of the zero-padded int8 input, one int8
  copy -- never fp32 ``F.unfold``) and one ``lq::int8_mm`` per group; ``lq::int8_mm`` splits the
  reduction (N * H_out * W_out, up to ~10^5 in ResNets) so int32 can never overflow (the algorithm lives
  in ``lq.ops.int8_conv_gemm``, whose padded variant is the CUDA kernel).

On CPUs with AMX-INT8 the tile unit (``lq/ops/amx.c`` through ``lq.ops.native_quant``), or VNNI without it, takes
these ops first where it applies: forwards of stride 1 and 2 and every grad-input of undilated one-group layers
(``amx_conv_applies``: an implicit GEMM over the padded input's grid, the stride-2 ones on its space-to-depth grid)
and the weight gradients by taps (``_grad_weight_taps``), all with exact int32 sums of signed operands.

CUDA kernels of all three ops: int8 im2col + ``torch._int_mm`` (``lq.ops.int8_conv_gemm``).
Shapes/ranges the fast kernel cannot compute exactly fall back to the reference with a one-time warning.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lq.ops import fused, native_quant
from lq.ops import hardware as hw
from lq.ops.int8_mm import _canonical, onednn_qlinear, reduction_chunks

__all__ = [
    "conv2d_fwd_reference",
    "conv2d_grad_input_reference",
    "conv2d_grad_weight_reference",
    "conv_windows",
    "int8_conv2d_fwd",
    "int8_conv2d_grad_input",
    "int8_conv2d_grad_weight",
    "int8_unfold",
    "transposed_conv_input",
    "transposed_conv_weight",
]


def _scale_channels(out: torch.Tensor, step: torch.Tensor, dim: int) -> torch.Tensor:
    if step.numel() == 1:
        return out.mul_(step.reshape(()).to(out.dtype))
    shape = [1] * out.dim()
    shape[dim] = -1
    return out.mul_(step.reshape(shape).to(out.dtype))


def _out_size(h: int, k: int, s: int, p: int, d: int) -> int:
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


# --------------------------------------------------------------------------------------- references
def conv2d_fwd_reference(x, w, x_step, w_step, x_qmax, w_qmax, bias, stride, padding, dilation, groups):
    """Exact ``conv2d(x_q, w_q)`` (float64 on integer values) * x_step * w_step[o] + bias, fp32."""
    acc = F.conv2d(x.double(), w.double(), None, stride, padding, dilation, groups)
    acc = _scale_channels(_scale_channels(acc, x_step, 1), w_step, 1)
    if bias is not None:
        acc = acc + bias.double().reshape(1, -1, 1, 1)
    return acc.float()


def _output_padding(input_size, g_shape, w_shape, stride, padding, dilation) -> list[int]:
    op = []
    for i in range(2):
        base = (g_shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (w_shape[2 + i] - 1) + 1
        op.append(input_size[2 + i] - base)
        if not 0 <= op[-1] < max(stride[i], dilation[i]):
            raise ValueError(f"input_size {input_size} is inconsistent with the gradient shape {tuple(g_shape)}")
    return op


def conv2d_grad_input_reference(g, w, g_step, g_qmax, w_qmax, input_size, stride, padding, dilation, groups):
    """Exact ``conv_transpose2d(g_q, w_q)`` (float64) * g_step, fp32: the input gradient of conv2d."""
    op = _output_padding(input_size, g.shape, w.shape, stride, padding, dilation)
    acc = F.conv_transpose2d(g.double(), w.double(), None, stride, padding, op, groups, dilation)
    return _scale_channels(acc, g_step, 1).float()


def conv2d_grad_weight_reference(g, x, g_step, x_step, g_qmax, x_qmax, weight_size, stride, padding, dilation, groups):
    """Exact ``sum_{n,h,w} g_q x_q`` weight gradient of conv2d (float64) * g_step[o] * x_step, fp32."""
    acc = torch.nn.grad.conv2d_weight(x.double(), list(weight_size), g.double(), stride, padding, dilation, groups)
    return _scale_channels(_scale_channels(acc, g_step, 0), x_step, 0).float()


# ------------------------------------------------------------------------------------ custom ops
def _empty_out(size, device: torch.device) -> torch.Tensor:
    """The fp32 result of ``lq::int8_conv2d`` / ``lq::int8_conv2d_grad_input`` as every kernel returns it:
    channels-last on CPU (oneDNN writes it; the CPU reference paths convert), contiguous elsewhere. Compiled
    graphs check the strides the fake kernels promise."""
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    return torch.empty(size, dtype=torch.float32, device=device, memory_format=fmt)


def _as_promised(t: torch.Tensor) -> torch.Tensor:
    """A CPU conv result in :func:`_empty_out`'s layout (a copy only where a kernel wrote another one)."""
    n, c, h, w = t.shape
    if t.stride() == (c * h * w, 1, w * c, c):
        return t
    return _empty_out(t.shape, t.device).copy_(t)


@torch.library.custom_op("lq::int8_conv2d", mutates_args=())
def int8_conv2d_fwd(
    x: torch.Tensor,
    w: torch.Tensor,
    x_step: torch.Tensor,
    w_step: torch.Tensor,
    x_qmax: int,
    w_qmax: int,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """conv2d of int8 ``x [N, C, H, W]`` (per-tensor ``x_step [1]``) and int8 ``w [O, C/g, kh, kw]``
    (``w_step [O]``), fp32 output ``+ bias``. Scales factor out of the (C/g, kh, kw) reduction (eq. 10)."""
    hw.ran("int8_conv2d", "reference")  # devices without a registered fast kernel
    return conv2d_fwd_reference(x, w, x_step, w_step, x_qmax, w_qmax, bias, stride, padding, dilation, groups)


@int8_conv2d_fwd.register_fake
def _(x, w, x_step, w_step, x_qmax, w_qmax, bias, stride, padding, dilation, groups):
    h = _out_size(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])
    wo = _out_size(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])
    return _empty_out((x.shape[0], w.shape[0], h, wo), x.device)


@torch.library.custom_op("lq::int8_conv2d_grad_input", mutates_args=())
def int8_conv2d_grad_input(
    g: torch.Tensor,
    w: torch.Tensor,
    g_step: torch.Tensor,
    g_qmax: int,
    w_qmax: int,
    input_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """Input gradient of conv2d from int8 ``g [N, O, Ho, Wo]`` (per-tensor ``g_step``) and the int8 weight.

    The weight's own scale varies along O, which this product sums over, so the caller folds it into ``g``
    before quantizing ``g`` (then the integer weight enters unscaled)."""
    hw.ran("int8_conv2d_grad_input", "reference")
    return conv2d_grad_input_reference(g, w, g_step, g_qmax, w_qmax, input_size, stride, padding, dilation, groups)


@int8_conv2d_grad_input.register_fake
def _(g, w, g_step, g_qmax, w_qmax, input_size, stride, padding, dilation, groups):
    return _empty_out(list(input_size), g.device)


@torch.library.custom_op("lq::int8_conv2d_grad_weight", mutates_args=())
def int8_conv2d_grad_weight(
    g: torch.Tensor,
    x: torch.Tensor,
    g_step: torch.Tensor,
    x_step: torch.Tensor,
    g_qmax: int,
    x_qmax: int,
    weight_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """Weight gradient of conv2d from int8 ``g [N, O, Ho, Wo]`` (``g_step [O]``: one scale per output
    channel, constant along the reduced N, Ho, Wo) and the saved int8 input (per-tensor ``x_step``)."""
    hw.ran("int8_conv2d_grad_weight", "reference")
    return conv2d_grad_weight_reference(
        g, x, g_step, x_step, g_qmax, x_qmax, weight_size, stride, padding, dilation, groups
    )


@int8_conv2d_grad_weight.register_fake
def _(g, x, g_step, x_step, g_qmax, x_qmax, weight_size, stride, padding, dilation, groups):
    return g.new_empty(list(weight_size), dtype=torch.float32)


# ------------------------------------------------------------------------------------ CPU kernels
def _qconv(u, zp, u_scale, w, w_scale, bias, stride, padding, dilation, groups):
    """oneDNN int8 conv: ``conv((u - zp) * u_scale, w * w_scale[o]) + bias``, fp32 output, routed around the
    geometries oneDNN gets wrong (``lq.ops.hardware.onednn_conv_plan``; same numbers)."""
    plan = hw.onednn_conv_plan(u.shape[2:], w.shape[2:], stride, padding, dilation)
    if plan.pre_pad is not None:
        u = F.pad(u, plan.pre_pad, value=zp)
    stride, padding = plan.stride, plan.padding
    o = w.shape[0]
    packed = torch.ops.onednn.qconv_prepack(w, w_scale, u_scale, zp, stride, padding, dilation, groups, None)
    w_zp = torch.zeros(o, dtype=torch.int64)
    return plan.finish(torch.ops.onednn.qconv2d_pointwise(
        u, u_scale, zp, packed, w_scale, w_zp, bias, stride, padding, dilation, groups,
        1.0, 0, torch.float32, "none", [], "",
    ))


def _beyond_onednn(u_qmax: int, w_qmax: int, reduction: int) -> bool:
    """Whether a ``reduction``-term sum could overflow oneDNN's int32 accumulator of biased-uint8 x int8 products
    (the signed kernels of ``amx.c`` keep a larger limit)."""
    return reduction > hw.max_exact_reduction(hw.biased_u8_max(u_qmax), w_qmax)


def _fast_conv_ok(kind: str, u_qmax: int, w_qmax: int, reduction: int) -> bool:
    if not hw.u8s8_exact(u_qmax, w_qmax):
        hw.warn_once(
            f"conv:{kind}:{u_qmax}:{w_qmax}",
            f"lq::{kind}: this CPU has no VNNI, so oneDNN's u8 x s8 conv saturates on {u_qmax}- x "
            f"{w_qmax}-range operands; using the exact (slow) reference kernel. "
            "Int8ComputeConfig.for_cpu_without_vnni() (7-bit activations and weights) enables the fast kernel.",
        )
        return False
    if _beyond_onednn(u_qmax, w_qmax, reduction):
        hw.warn_once(
            f"conv:{kind}:reduction",
            f"lq::{kind}: reduction length {reduction} could overflow oneDNN's int32 accumulator; "
            "using the exact reference kernel.",
        )
        return False
    return True


def amx_conv_applies(op: str, stride, dilation, groups: int) -> bool:
    """Whether ``op`` (``int8_conv2d`` or ``int8_conv2d_grad_input``) of this geometry runs on ``amx.c``'s kernels where
    the CPU has the tile unit or VNNI (``native_quant.amx_conv`` / ``amx_conv_grad_input``): undilated one-group
    layers, forward at strides 1 and 2, the input gradient at every stride: no weight prepacking per call, no
    biased-uint8 copy, fewer than 64 channels packed as several taps a step, exact int32 sums of signed operands (so
    also where the reduction is beyond oneDNN's biased-uint8 limit). Results are bit-identical to oneDNN's (the same
    fp32 output stage ``(acc * x_step) * w_step[o]``).

    Tile unit (AMX), forward / grad-input, batch 64 channels-last, 2-core host, ms tile vs oneDNN: 16 x 16 @28 0.41 /
    0.55 and 0.43 / 0.59; 16 -> 32 stride 2 @28 0.29 / 0.48 and 0.48 / 0.69; 64 x 64 @7 0.21 / 0.37 and 0.24 / 0.47;
    64 x 64 @56 batch 32 2.27 / 2.54 and 2.28 / 2.84; 256 x 256 @14 batch 32 2.65 / 3.47 and 2.68 / 3.93.

    VNNI (AMD Zen 5, 2 cores): timed alone, oneDNN's forwards looked as fast or faster (the stem 0.29 against 0.42 ms,
    64 x 64 @56 batch 32 4.91 against 5.61), but inside the ops they serve, fwd + bwd interleaved, VNNI everywhere
    was faster: the SmallResNet training step 1.34-1.49x / 1.20-1.25x / 1.05-1.13x at batch 2 / 16 / 64 (the stem
    alone on oneDNN: 1.31-1.39x / 1.17-1.21x / 1.04-1.12x), ``int8_conv2d`` fwd + bwd on 64 x 64 @56 batch 32 1.18x (NCHW) / 1.05x (channels-last), 256 x
    256 @14 1.02-1.04x, 128 x 128 1x1 @28 0.97-1.02x, 128 x 128 @14 0.97-1.00x, 64 -> 128 stride 2 @28 0.95-0.98x
    (the one loss: the space-to-depth weight is 1.78x the true work). benchmarks/RESULTS.md, 2026-12-01."""
    if tuple(dilation) != (1, 1) or groups != 1:
        return False
    return op == "int8_conv2d_grad_input" or tuple(stride) in ((1, 1), (2, 2))


def pointwise_subsampled(weight_size, stride, padding) -> bool:
    """Whether a convolution is 1x1, unpadded and strided (a ResNet's downsampling shortcut): then each of its three
    products is the stride-1 product on the input's subsampled grid ``x[:, :, ::sh, ::sw]`` (the forward and the
    weight gradient read only those pixels; the input gradient is zero at every other pixel), which the CPU kernels
    compute instead: the same integer sums and output stage, bit-identical, without the stride-2 kernels'
    space-to-depth weight (four phases, three of them zero for a 1x1 kernel) or a zero-inserted gradient. Measured
    (AVX-512 VNNI, 2 threads, forward / input gradient / weight gradient, ms before -> after): 16 -> 32 channels @28
    batch 64 0.10 -> 0.08 / 0.22 -> 0.09 / 0.26 -> 0.23; 32 -> 64 @14 0.056 -> 0.053 / 0.088 -> 0.057 / 0.16 ->
    0.12; 256 -> 512 @28 batch 32 1.82 -> 1.32 / 3.0 -> 1.4 / 2.6 -> 1.6."""
    return tuple(weight_size[2:]) == (1, 1) and tuple(stride) != (1, 1) and not any(padding)


def _subsampled(t: torch.Tensor, stride) -> torch.Tensor:
    """The pixels ``t[:, :, ::sh, ::sw]`` that a 1x1 strided convolution reads, densely in ``t``'s layout."""
    fmt = torch.channels_last if fused.is_channels_last(t) else torch.contiguous_format
    return t[:, :, :: stride[0], :: stride[1]].contiguous(memory_format=fmt)


@int8_conv2d_fwd.register_kernel("cpu")
def _conv_fwd_cpu(x, w, x_step, w_step, x_qmax, w_qmax, bias, stride, padding, dilation, groups):
    if pointwise_subsampled(w.shape, stride, padding):
        x, stride, dilation = _subsampled(x, stride), [1, 1], [1, 1]
    reduction = w.shape[1] * w.shape[2] * w.shape[3]
    if amx_conv_applies("int8_conv2d", stride, dilation, groups):  # (its own int32 limit: signed operands)
        y = native_quant.amx_conv(x, w, x_step, w_step, bias, list(padding), hw.max_exact_reduction(x_qmax, w_qmax),
                                  list(stride))
        if y is not None:  # (the tile unit or VNNI: no weight prepacking, no biased-uint8 copy of the input)
            hw.ran("int8_conv2d", native_quant.tile_unit())
            return y
    if not _fast_conv_ok("int8_conv2d", x_qmax, w_qmax, reduction):
        hw.ran("int8_conv2d", "reference")
        return _as_promised(
            conv2d_fwd_reference(x, w, x_step, w_step, x_qmax, w_qmax, bias, stride, padding, dilation, groups)
        )
    hw.ran("int8_conv2d", "onednn")
    u, zp = hw.to_biased_u8(_channels_last(x), x_qmax)
    o = w.shape[0]
    w_scale = w_step.float().reshape(-1).expand(o).contiguous()
    b = None if bias is None else bias.float().contiguous()
    return _as_promised(_qconv(u, zp, float(x_step), w.contiguous(), w_scale, b, stride, padding, dilation, groups))


def transposed_conv_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """``w [O, C/g, kh, kw]`` -> ``[C, O/g, kh, kw]`` flipped in space: the weight that turns the transposed
    convolution (input gradient) into an ordinary convolution."""
    o, cg, kh, kw = w.shape
    wt = w.reshape(groups, o // groups, cg, kh, kw).transpose(1, 2).reshape(groups * cg, o // groups, kh, kw)
    return wt.flip(-1, -2).contiguous()


@int8_conv2d_grad_input.register_kernel("cpu")
def _conv_grad_input_cpu(g, w, g_step, g_qmax, w_qmax, input_size, stride, padding, dilation, groups,
                         channels_last: bool = True):
    """The op's CPU kernel. ``channels_last=False`` (``lq.ops.int8_conv``'s backward of a row-major input, calling this
    directly): the tile unit's kernels write the result row-major, the layout autograd would copy a leaf's gradient
    into (~3 ms for 32 x 64 x 56 x 56), as does a 1x1 strided layer's on any kernel (:func:`pointwise_subsampled`);
    the other kernels return channels-last as the op does."""
    o, _, kh, kw = w.shape
    n, c, h, wd = input_size
    sampled = [-(-h // stride[0]), -(-wd // stride[1])]  # (the pixels a 1x1 strided layer reads)
    if pointwise_subsampled(w.shape, stride, padding) and list(g.shape[2:]) == sampled:
        # (the stride-1 input gradient at the pixels the layer read, zeros elsewhere)
        small = _conv_grad_input_cpu(g, w, g_step, g_qmax, w_qmax, [n, c, *g.shape[2:]], [1, 1], [0, 0], [1, 1],
                                     groups, channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(list(input_size), dtype=torch.float32, device=g.device, memory_format=fmt).zero_()
        out[:, :, :: stride[0], :: stride[1]] = small
        return out
    reduction = (o // groups) * kh * kw
    tile = amx_conv_applies("int8_conv2d_grad_input", stride, dilation, groups)
    if tile and native_quant.tile_usable(g, w, g_step):
        limit = hw.max_exact_reduction(g_qmax, w_qmax)
        y = native_quant.amx_conv_grad_input(g, w, g_step, list(input_size), list(stride), list(padding), limit,
                                             channels_last)
        if y is None:  # (other strides and paddings: a stride-1 convolution of the zero-inserted gradient)
            canvas, conv_pad = transposed_conv_input(
                g, w.shape, input_size, stride, padding, dilation, memory_format=torch.channels_last
            )
            wt = transposed_conv_weight(w, groups)
            ones = torch.ones(wt.shape[0], dtype=torch.float32)
            y = native_quant.amx_conv(canvas, wt, g_step, ones, None, conv_pad, limit)
        if y is not None and list(y.shape) == list(input_size):
            hw.ran("int8_conv2d_grad_input", native_quant.tile_unit())
            return y
    if not _fast_conv_ok("int8_conv2d_grad_input", g_qmax, w_qmax, reduction):
        hw.ran("int8_conv2d_grad_input", "reference")
        return _as_promised(
            conv2d_grad_input_reference(g, w, g_step, g_qmax, w_qmax, input_size, stride, padding, dilation, groups)
        )
    hw.ran("int8_conv2d_grad_input", "onednn")
    u, zp = hw.to_biased_u8(_channels_last(g), g_qmax)
    canvas, conv_pad = transposed_conv_input(
        u, w.shape, input_size, stride, padding, dilation, fill=zp, memory_format=torch.channels_last
    )
    wt = transposed_conv_weight(w, groups)
    w_scale = torch.ones(wt.shape[0], dtype=torch.float32)
    return _as_promised(_qconv(canvas, zp, float(g_step), wt, w_scale, None, [1, 1], conv_pad, list(dilation), groups))


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the layout oneDNN's convolutions compute in (NHWC): the int8 activations and gradients of the
    training ops mostly arrive in it already, and a row-major copy here was converted back inside
    ``qconv2d_pointwise`` (two layout copies of every conv input; ~2.7 ms of a SmallResNet int8 step). A row-major
    int8 tensor is copied by ``native_quant.channels_last_i8`` (one C pass, twice torch's permuted int8 copy)."""
    return native_quant.channels_last_i8(t)


def transposed_conv_input(
    g: torch.Tensor, w_shape, input_size, stride, padding, dilation, fill: int = 0,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[torch.Tensor, list[int]]:
    """``g [N, O, Ho, Wo]`` -> ``(canvas, conv_pad)``: the transposed convolution (input gradient) as an
    ordinary stride-1 convolution ``conv2d(canvas, transposed_conv_weight(w), padding=conv_pad, dilation)``.

    Zero-insertion (``stride - 1`` zeros between pixels) and padding by ``dilation * (k - 1) - padding``
    (plus ``output_padding`` at the bottom/right; negative pads crop), all with ``fill`` (the value that
    means 0: 0 for int8, the zero point for a uint8-shifted ``g``). The plain stride-1 case with symmetric
    non-negative pads returns ``g`` itself and leaves the padding to the convolution (``conv_pad``); else the
    canvas is made in ``memory_format``."""
    op = _output_padding(input_size, g.shape, w_shape, stride, padding, dilation)
    n, o, ho, wo = g.shape
    k = w_shape[2:]
    lo = [dilation[i] * (k[i] - 1) - padding[i] for i in range(2)]
    hi = [lo[i] + op[i] for i in range(2)]
    if list(stride) == [1, 1] and lo[0] == hi[0] >= 0 and lo[1] == hi[1] >= 0:
        return g, [lo[0], lo[1]]
    hd = [(ho - 1) * stride[0] + 1, (wo - 1) * stride[1] + 1]
    pad_lo = [max(v, 0) for v in lo]
    pad_hi = [max(v, 0) for v in hi]
    canvas = torch.empty(
        (n, o, hd[0] + pad_lo[0] + pad_hi[0], hd[1] + pad_lo[1] + pad_hi[1]),
        dtype=g.dtype, device=g.device, memory_format=memory_format,
    ).fill_(fill)
    canvas[:, :, pad_lo[0] : pad_lo[0] + hd[0] : stride[0], pad_lo[1] : pad_lo[1] + hd[1] : stride[1]] = g
    crop_lo = [max(-v, 0) for v in lo]
    crop_hi = [max(-v, 0) for v in hi]
    canvas = canvas[:, :, crop_lo[0] : canvas.shape[2] - crop_hi[0], crop_lo[1] : canvas.shape[3] - crop_hi[1]]
    return canvas.contiguous(memory_format=memory_format), [0, 0]


def int8_unfold(x: torch.Tensor, kernel: tuple[int, int], stride, padding, dilation, pad_value: int = 0) -> torch.Tensor:
    """im2col on 8-bit data: ``[N, C, H, W]`` -> ``[C, kh, kw, N, Ho, Wo]`` (one contiguous int8/uint8 copy).

    The layout puts the GEMM's reduced dimension (N * Ho * Wo) last and contiguous, and the weight's
    (C, kh, kw) first, so each group's slice is directly a ``[C/g*kh*kw, R]`` GEMM operand. Zero padding is
    exact in symmetric int8 (0 means real 0); a uint8-shifted input pads with its zero point ``pad_value``.
    """
    return conv_windows(x, kernel, stride, padding, dilation, pad_value).contiguous()


def conv_windows(x: torch.Tensor, kernel: tuple[int, int], stride, padding, dilation, pad_value: int = 0) -> torch.Tensor:
    """The convolution windows of ``x [N, C, H, W]`` as a strided view ``[C, kh, kw, N, Ho, Wo]`` of the
    padded input (no copy beyond the padding): ``int8_unfold`` without its copy, for callers that copy it
    into another layout."""
    n, c, h, w = x.shape
    kh, kw = kernel
    if any(padding):
        xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), value=pad_value)
    else:
        xp = x.contiguous()
    ho = _out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _out_size(w, kw, stride[1], padding[1], dilation[1])
    sn, sc, sh, sw = xp.stride()
    return xp.as_strided(
        (c, kh, kw, n, ho, wo),
        (sc, sh * dilation[0], sw * dilation[1], sn, sh * stride[0], sw * stride[1]),
    )


def _grad_weight_onednn(g, x, g_step, x_step, g_qmax, x_qmax, weight_size, stride, padding, dilation, groups):
    """CPU without fast ``_int_mm``: the unfolded input is the big operand, so it is oneDNN's *uint8
    source* -- shifted once on the small input before unfolding (the padding takes the zero point), so
    no extra pass over the 9x larger column matrix -- and the gradient ``[O, R]`` is the (small) int8
    weight that oneDNN reorders. Its per-output-channel scale is oneDNN's per-channel weight scale, the
    input's per-tensor scale the source scale: the kernel returns the final fp32 values."""
    o, cg, kh, kw = weight_size
    u, zp = hw.to_biased_u8(x.contiguous(), x_qmax)
    cols = int8_unfold(u, (kh, kw), stride, padding, dilation, pad_value=zp)  # uint8 [C, kh, kw, N, Ho, Wo]
    r = cols.shape[3] * cols.shape[4] * cols.shape[5]
    cols = cols.reshape(groups, cg * kh * kw, r)
    gm = g.transpose(0, 1).reshape(groups, o // groups, r)  # [O, N*Ho*Wo]: reduced dim contiguous
    g_scale = g_step.float().reshape(-1).expand(o).reshape(groups, o // groups)
    chunks = reduction_chunks(r, hw.max_exact_reduction(hw.biased_u8_max(x_qmax), g_qmax))
    outs = []
    for i in range(groups):
        acc = None
        for r0, r1 in chunks:
            uc = cols[i, :, r0:r1]
            wc = gm[i, :, r0:r1]
            part = onednn_qlinear(uc.contiguous(), zp, wc.contiguous(), float(x_step), g_scale[i].contiguous())
            acc = part if acc is None else acc.add_(part)
        outs.append(acc.t())  # [O/g, C/g*kh*kw]
    out = torch.cat(outs, 0) if groups > 1 else outs[0]
    return out.reshape(o, cg, kh, kw)


def _phase_grid(x_hw: tuple[int, int], padding, stride) -> tuple[int, int]:
    """Rows and columns of the phase grid: the padded input cut into ``stride`` phases, each padded to the same
    ``ceil(padded size / stride)``."""
    return tuple(-(-(n + 2 * p) // s) for n, p, s in zip(x_hw, padding, stride))


def grad_weight_taps_apply(x_size, weight_size, stride, padding, dilation, groups, g_qmax: int, x_qmax: int) -> bool:
    """Whether :func:`_grad_weight_taps` computes this weight gradient: a CPU with fast ``torch._int_mm`` (VNNI),
    dilation 1, one group, a non-empty batch, more than one tap or a stride (a 1x1 stride-1 weight gradient is
    one GEMM on the input as it is; on VNNI without the tile unit it takes the taps kernel too: 128 x 128 channels
    at 28 x 28, batch 32: 0.82-0.88 ms against 1.9-2.8 for the im2col ``lq::int8_mm``), and the reduction over the
    phase grid's positions within int32."""
    n, c, h, w = x_size
    kh, kw = weight_size[2:]
    sh, sw = stride
    hs, ws = _phase_grid((h, w), padding, stride)
    t = n * hs * ws + ((kh - 1) // sh) * ws + (kw - 1) // sw  # the phase grid's positions + the last tap's reach
    return (
        hw.cpu_int_mm_is_fast() and tuple(dilation) == (1, 1) and groups == 1 and n > 0
        and (kh * kw > 1 or tuple(stride) != (1, 1) or native_quant.tile_unit() == "vnni")
        and 2 <= t <= hw.max_exact_reduction(g_qmax, x_qmax)
    )


def _input_phases(x, padding, stride, grid, tx, wanted, position_major) -> dict:
    """The zero-padded input ``x [N, C, H, W]`` cut into its stride phases: phase ``(p, q)`` holds padded rows
    ``sh * u + p`` and columns ``sw * v + q`` at grid position ``(u, v)`` (``grid = (Hs, Ws)``), as an int8
    buffer of ``tx`` positions (the ``N * Hs * Ws`` grid positions, then zeros), position-major ``[tx, C]`` or
    channel rows ``[C, tx]``. Only the phases in ``wanted``; stride 1 has one phase, the padded input itself.
    Position-major rows come from a channels-last input without a transpose (contiguous channel runs)."""
    n, c, h, w = x.shape
    (ph, pw), (sh, sw), (hs, ws) = padding, stride, grid
    t = n * hs * ws
    src = x.permute(0, 2, 3, 1) if position_major else x.permute(1, 0, 2, 3)  # [N, H, W, C] / [C, N, H, W]
    rows_dim = 1 if position_major else 2
    phases = {}
    for p, q in wanted:
        buf = torch.zeros((tx, c) if position_major else (c, tx), dtype=torch.int8, device=x.device)
        view = buf[:t].view(n, hs, ws, c) if position_major else buf[:, :t].view(c, n, hs, ws)
        # grid rows u hold input rows sh * u + p - ph where that lies in [0, h) (else padding: zeros)
        u0, u1 = max(0, -(-(ph - p) // sh)), (h - 1 + ph - p) // sh
        v0, v1 = max(0, -(-(pw - q) // sw)), (w - 1 + pw - q) // sw
        if u1 >= u0 and v1 >= v0:
            r0, c0 = sh * u0 + p - ph, sw * v0 + q - pw
            part = src.narrow(rows_dim, r0, sh * (u1 - u0) + 1).narrow(rows_dim + 1, c0, sw * (v1 - v0) + 1)
            part = part[:, ::sh, ::sw] if position_major else part[:, :, ::sh, ::sw]
            view.narrow(rows_dim, u0, u1 - u0 + 1).narrow(rows_dim + 1, v0, v1 - v0 + 1).copy_(part)
        phases[(p, q)] = buf
    return phases


def _grid_rows(g: torch.Tensor, dst: torch.Tensor, hs: int, ws: int, lead: int = 0, flip: int = 0) -> None:
    """``dst [>= O, >= lead + N * hs * ws]`` (contiguous) gets the gradient ``g [N, O, Ho, Wo]`` on the grid in its
    channel rows from column ``lead`` on, zeros elsewhere, every byte xor ``flip`` (``native_quant.flip_byte``): a C
    kernel of 16 x 16 byte transposes for a channels-last ``g`` on CPU (``native_quant.grid_rows``), else a fill and
    torch's strided copy."""
    n, o, ho, wo = g.shape
    if not native_quant.grid_rows(g, dst, hs, ws, lead, flip):
        dst.zero_()[:o, lead : lead + n * hs * ws].view(o, n, hs, ws)[:, :, :ho, :wo].copy_(g.permute(1, 0, 2, 3))
        if flip:
            dst.view(torch.uint8).bitwise_xor_(flip)


@functools.lru_cache(maxsize=256)
def _taps_geometry(x_shape: tuple, weight_size: tuple, padding: tuple, stride: tuple):
    """:func:`_grad_weight_taps`' geometry for one shape (cached: the same lists every step): ``(hs, ws, t, offs,
    phase_of, wanted, phase_idx)``, ``phase_idx`` each tap's index into the phases ``wanted`` (the kernels' operand)."""
    n = x_shape[0]
    o, c, kh, kw = weight_size
    sh, sw = stride
    hs, ws = _phase_grid(x_shape[2:], padding, stride)
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    offs = [(i // sh) * ws + j // sw for i, j in taps]
    phase_of = [(i % sh, j % sw) for i, j in taps]
    wanted = tuple(sorted(set(phase_of)))
    return hs, ws, n * hs * ws, tuple(offs), tuple(phase_of), wanted, tuple(wanted.index(p) for p in phase_of)


def _grad_weight_taps(g, x, g_step, x_step, weight_size, padding, stride=(1, 1)) -> torch.Tensor:
    """The weight gradient of a convolution (dilation 1, one group) without im2col: integer GEMMs on shifted
    views of the input's stride phases.

    ``grad_w[:, :, i, j] = sum_(n, a, b) g[n, :, a, b] x_pad[n, :, sh * a + i, sw * b + j]``. Cut the padded
    input into its ``sh x sw`` phases (``(i mod sh, j mod sw)``, each on an ``Hs x Ws`` grid, :func:`_input_phases`)
    and lay the gradient out on the same grid (zeros where no output is), ``G [O, T]``, ``T = N * Hs * Ws``:
    output position ``t`` and tap ``(i, j)`` read position ``t + off`` of phase ``(i mod sh, j mod sw)``, ``off =
    (i // sh) * Ws + j // sw``, so every tap is ``G @ X_phase[off : off + T]``, a GEMM on a shifted view, no copy.
    One copy of each operand (about one input) replaces the im2col's ``kh * kw`` strided copies: 2.6-3.5x faster
    than ``conv2d_grad_weight_gemm`` on SmallResNet's stride-1 3x3 layers at batch 64, and on its stride-2 layers
    1.44 -> 0.81 and 1.02 -> 0.50 ms (3x3), 0.66 -> 0.30 and 0.48 -> 0.20 ms (the 1x1 shortcuts; AVX-512 VNNI
    host, 2 threads). The phases are position-major
    (``[T, C]`` rows, copied from a channels-last input without transposing: 0.03 against 0.27 ms for a
    64x16x28x28 input) or channel rows (``[C, T]``, from a contiguous one). With few input channels (``C * taps
    <= O``: the first layer's ``C = 1``) each output channel, input channel and tap is one dot product of the rows on
    a CPU with VNNI (``native_quant.taps_dots``: 0.28 -> 0.12 ms on 64x1x28x28), else the taps' shifted rows are
    stacked into one operand and a single GEMM reads ``G`` once (1.26 -> 0.52 ms). The same integer sums (int32, one
    chunk: ``grad_weight_taps_apply``) scaled as ``lq::int8_mm`` scales them, so bit-identical to the im2col kernels."""
    o, c, kh, kw = weight_size
    geometry = _taps_geometry(tuple(x.shape), tuple(weight_size), tuple(padding), tuple(stride))
    hs, ws, t, offs, phase_of, wanted, phase_idx = geometry
    taps = kh * kw
    tx = t + max(offs)
    dev = g.device
    # few input channels: dot products, or the taps' shifted rows of X stacked into one GEMM (a 1x1 stride-1 layer
    # has nothing to stack)
    stacked = c * taps <= o and (taps > 1 or tuple(stride) != (1, 1))
    position_major = not stacked and fused.is_channels_last(x)
    if not stacked and native_quant.tile_usable(g, x, g_step, x_step) and x_step.numel() == 1:
        # the tile unit (or VNNI): each phase packed once for all its taps, each tap reading the gradient at a shift
        # (ge with a zero lead of max(offs) columns, rows up to a multiple of 32; on VNNI stored xor 0x80, its
        # unsigned operand); position-major phases as views of one grid built in C (the space-to-depth grid at
        # stride 2)
        phases = native_quant.phase_grids(x, padding, stride, (hs, ws), tx) if position_major else None
        phases = phases or _input_phases(x, padding, stride, (hs, ws), tx, wanted, position_major)
        lead = max(offs)
        geb = torch.empty((-(-o // 32) * 32, lead + -(-tx // 64) * 64), dtype=torch.int8, device=dev)
        _grid_rows(g, geb, hs, ws, lead, native_quant.flip_byte())
        out = native_quant.amx_taps(geb, o, lead, offs, phase_idx, [phases[p] for p in wanted], position_major, c,
                                    tx, g_step, x_step, list(weight_size))
        if out is not None:
            hw.ran("int8_conv2d_grad_weight", "taps_" + native_quant.tile_unit())
            return out
    if stacked and x_step.numel() == 1 and native_quant.tile_usable(g, x, g_step, x_step):
        # few input channels on a CPU with VNNI: one dot product per output channel, input channel and tap of the
        # gradient's rows (stored xor 0x80, a zero lead of max(offs) columns) with the phases' channel rows, instead of
        # the stacked GEMM below (1-channel stem, 64 x 16 x 28 x 28: 0.17 ms in torch._int_mm with N = 9)
        phases = _input_phases(x, padding, stride, (hs, ws), tx, wanted, False)
        lead = max(offs)
        geb = torch.empty((o, lead + tx), dtype=torch.int8, device=dev)
        _grid_rows(g, geb, hs, ws, lead, 0x80)
        out = native_quant.taps_dots(geb, o, lead, offs, phase_idx, [phases[p] for p in wanted], c, tx, g_step,
                                     x_step, list(weight_size))
        if out is not None:
            hw.ran("int8_conv2d_grad_weight", "taps_dots")
            return out
    hw.ran("int8_conv2d_grad_weight", "taps_int_mm")
    phases = _input_phases(x, padding, stride, (hs, ws), tx, wanted, position_major)
    ge = torch.empty((o, t), dtype=torch.int8, device=dev)
    _grid_rows(g, ge, hs, ws)
    if stacked:
        xs = torch.empty((taps, c, t), dtype=torch.int8, device=dev)
        for k, off in enumerate(offs):
            xs[k].copy_(phases[phase_of[k]][:, off : off + t])
        acc = torch._int_mm(ge, xs.view(taps * c, t).t()).view(o, taps, c).permute(1, 0, 2)
    else:
        acc = torch.empty((taps, o, c), dtype=torch.int32, device=dev)
        for k, off in enumerate(offs):
            buf = phases[phase_of[k]]
            b = buf[off : off + t] if position_major else _canonical(buf[:, off : off + t].t())
            torch._int_mm(ge, b, out=acc[k])
    out = acc.reshape(kh, kw, o, c).permute(2, 3, 0, 1).contiguous().float()  # (contiguous: what the op promises)
    return out.mul_(g_step.float().reshape(-1, 1, 1, 1)).mul_(x_step.float().reshape(1, -1, 1, 1))


def _grad_weight_pointwise(g, x, g_step, x_step, g_qmax, x_qmax, weight_size, stride, padding, dilation, groups):
    """A 1x1, stride-1, unpadded, one-group convolution's weight gradient on channels-last operands as one AMX
    product of the transposed views ``g [N*H*W, O]^T`` and ``x [N*H*W, C]^T`` (the kernel packs them itself:
    no im2col copies), scaled as ``lq::int8_mm`` scales the im2col path's product (bit-identical); ``None``
    where that does not apply."""
    o, c, kh, kw = weight_size
    if ((kh, kw) != (1, 1) or tuple(stride) != (1, 1) or tuple(padding) != (0, 0) or tuple(dilation) != (1, 1)
            or groups != 1 or x_step.numel() != 1 or not (fused.is_channels_last(g) and fused.is_channels_last(x))):
        return None
    gm = g.permute(0, 2, 3, 1).reshape(-1, o)  # [N*H*W, O]: views of the channels-last memory
    xm = x.permute(0, 2, 3, 1).reshape(-1, c)
    out = native_quant.amx_mm(gm.t(), xm.t(), g_step, x_step, None, hw.max_exact_reduction(g_qmax, x_qmax))
    return None if out is None else out.view(o, c, 1, 1)


@int8_conv2d_grad_weight.register_kernel("cpu")
def _conv_grad_weight_cpu(g, x, g_step, x_step, g_qmax, x_qmax, weight_size, stride, padding, dilation, groups):
    if pointwise_subsampled(weight_size, stride, padding):
        x, stride, dilation = _subsampled(x, stride), [1, 1], [1, 1]
    if not hw.cpu_int_mm_is_fast() and hw.u8s8_exact(x_qmax, g_qmax):
        hw.ran("int8_conv2d_grad_weight", "onednn")
        return _grad_weight_onednn(
            g, x, g_step, x_step, g_qmax, x_qmax, weight_size, stride, padding, dilation, groups
        ).contiguous()
    if grad_weight_taps_apply(x.shape, weight_size, stride, padding, dilation, groups, g_qmax, x_qmax):
        return _grad_weight_taps(g, x, g_step, x_step, weight_size, padding, stride)  # (records its kernel, taps_*)
    pointwise = _grad_weight_pointwise(g, x, g_step, x_step, g_qmax, x_qmax, weight_size, stride, padding, dilation,
                                       groups)
    if pointwise is not None:
        hw.ran("int8_conv2d_grad_weight", "pointwise_amx")
        return pointwise
    hw.ran("int8_conv2d_grad_weight", "im2col_int8_mm")  # lq::int8_mm records its own kernel per group
    # int8 im2col + one lq::int8_mm per group: the CUDA kernel's algorithm, without its shape padding
    return int8_conv_gemm.conv2d_grad_weight_gemm(
        g, x, g_step, x_step, g_qmax, x_qmax, weight_size, stride, padding, dilation, groups, int8_conv_gemm.UNPADDED
    )


#: each op's CPU kernel, for callers that skip the op's dispatch in plain eager use (``lq.ops.int8_conv``)
CPU_KERNELS = {
    int8_conv2d_fwd: _conv_fwd_cpu,
    int8_conv2d_grad_input: _conv_grad_input_cpu,
    int8_conv2d_grad_weight: _conv_grad_weight_cpu,
}

# The CUDA kernels (int8 im2col + torch._int_mm) register themselves; imported last: they use this module.
from lq.ops import int8_conv_gemm  # noqa: E402
