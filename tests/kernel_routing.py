"""Which kernel each int8 op must run on this host, from the measured capabilities (``lq.ops.hardware``).

Tests assert these with ``lq.ops.hardware.record_kernels()``: a fast-vs-reference comparison whose fast side
silently took the reference path would compare the reference with itself and could never fail.
"""

from __future__ import annotations

from lq.ops import hardware as hw


def expected_mm_kernel(m: int, k: int, n: int, qa: int, qb: int) -> str:
    """``lq::int8_mm`` on CPU: ``torch._int_mm`` where it is fast (VNNI) and exact (K >= 2 or N == 1, as
    measured), else oneDNN where its u8 x s8 accumulation is exact for these ranges (either operand as the
    unsigned source), else the reference; on AMX CPUs the tile kernel (``lq/ops/amx.c``) before all of them
    while the int32 sums cannot overflow."""
    from lq.ops import native_quant

    if native_quant.amx_library() is not None and k <= hw.max_exact_reduction(qa, qb) and min(m, k, n) > 0:
        return "amx"
    if hw.cpu_int_mm_is_fast() and (k >= 2 or n == 1):
        return "int_mm"
    if hw.u8s8_exact(qa, qb):
        return "onednn"
    if hw.u8s8_exact(qb, qa):
        return "onednn_transposed"
    return "reference"


def expected_conv_kernel(
    op: str, u_qmax: int, w_qmax: int, reduction: int, geometry: tuple | None = None, channels_last: bool = False
) -> str:
    """The int8 conv ops on CPU: oneDNN where exact (ranges and int32 headroom), on AMX CPUs the tile kernel for
    stride-1 forwards and grad-inputs of undilated one-group layers (``geometry`` given), else the reference; the
    weight gradient runs oneDNN's GEMM on an int8 im2col where ``_int_mm`` is slow, else per-tap
    ``torch._int_mm`` GEMMs for stride-1 one-group layers (``geometry``: x size, weight size, stride, padding,
    dilation, groups; ``lq.ops.int8_conv_kernels.grad_weight_taps_apply``; on AMX CPUs the tile kernel takes the taps
    unless few input channels stack them into one GEMM), a 1x1 stride-1 layer with both operands ``channels_last``
    one AMX product, else ``lq::int8_mm`` on an im2col. On CPUs with AVX-512 VNNI but no tile unit the same kernels run
    their VNNI form (``native_quant.tile_unit() == "vnni"``). A 1x1 unpadded strided layer runs as the stride-1 one on
    its subsampled input (``pointwise_subsampled``)."""
    from lq.ops.int8_conv_kernels import pointwise_subsampled

    if geometry is not None and pointwise_subsampled(geometry[1], geometry[2], geometry[3]):
        (n, c, h, w), stride = geometry[0], geometry[2]
        geometry = ([n, c, -(-h // stride[0]), -(-w // stride[1])], geometry[1], (1, 1), (0, 0), (1, 1), geometry[5])
    if op == "int8_conv2d_grad_weight":
        if not hw.cpu_int_mm_is_fast() and hw.u8s8_exact(u_qmax, w_qmax):
            return "onednn"
        from lq.ops.int8_conv_kernels import grad_weight_taps_apply

        from lq.ops import native_quant

        amx = native_quant.amx_library() is not None
        unit = native_quant.tile_unit()
        if geometry is not None and grad_weight_taps_apply(*geometry, w_qmax, u_qmax):
            x_size, w_size = geometry[0], geometry[1]
            stacked = x_size[1] * w_size[2] * w_size[3] <= w_size[0]  # few input channels: dots or a stacked _int_mm
            stacked = stacked and (w_size[2] * w_size[3] > 1 or tuple(geometry[2]) != (1, 1))  # (1x1: nothing to stack)
            if unit:  # (few input channels: one VNNI dot product per output channel, input channel and tap)
                return "taps_dots" if stacked else f"taps_{unit}"
            return "taps_int_mm"
        if (geometry is not None and amx and channels_last and tuple(geometry[1][2:]) == (1, 1)
                and tuple(geometry[2]) == (1, 1) and tuple(geometry[3]) == (0, 0) and tuple(geometry[4]) == (1, 1)
                and geometry[5] == 1):
            return "pointwise_amx"  # (1x1 on channels-last operands: one AMX product of transposed views)
        return "im2col_int8_mm"
    from lq.ops import native_quant

    from lq.ops.int8_conv_kernels import amx_conv_applies

    if geometry is not None and native_quant.tile_unit() is not None:
        _, _, stride, _, dilation, groups = geometry
        # the tile unit first (its own limit: signed operands): forward at strides 1 and 2, every grad-input, of
        # undilated one-group layers (VNNI: the same kernels)
        if (amx_conv_applies(op, stride, dilation, groups)
                and reduction <= hw.max_exact_reduction(u_qmax, w_qmax)):
            return native_quant.tile_unit()
    exact = hw.u8s8_exact(u_qmax, w_qmax) and reduction <= hw.max_exact_reduction(hw.biased_u8_max(u_qmax), w_qmax)
    return "onednn" if exact else "reference"
