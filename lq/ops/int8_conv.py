"""Int8 conv2d with int8 forward, grad_input and grad_weight (Wu et al. 2020 eq. 10; gradients quantized
as in Zhu et al. 2020, CVPR, who apply int8 to exactly these three convolutions).

Layouts (``x [N, C, H, W]``, ``W [O, C/g, kh, kw]``, ``g = dL/dy [N, O, Ho, Wo]``); scales must be constant
along each product's reduced dimensions (eq. 10):

* forward reduces (C/g, kh, kw): ``x`` per tensor (oneDNN takes one activation scale), ``W`` per output
  channel O.
* grad_input (transposed conv) reduces (O/g, kh, kw): ``W``'s per-O scale varies along it, so it is folded
  into the gradient, ``g * step_w[o]``, which is quantized with one scale per layer (Zhu et al.'s
  per-layer dynamic scale) and multiplied by the saved integer ``W_q``.
* grad_weight reduces (N, Ho, Wo): ``g`` gets one scale per output channel O (constant along N, Ho, Wo),
  ``x_q`` keeps its per-tensor scale. Only int8 ``x_q`` + one fp32 scale are saved for backward.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.nn.modules.utils import _pair

from lq.ops import int8_conv_kernels as K
from lq.ops import native_quant
from lq.ops.config import Int8ComputeConfig
from lq.ops.grad_quant import GradOperand, check_unquantized_grad, quantize_layer_grads
from lq.ops.int8_mm import plain_cpu_eager
from lq.ops.partitioner import keep, keep_input
from lq.ops.quantize import dequantize_along, quantize_along
from lq.ops.saved_int8 import share_int8, shared_int8
from lq.quant.functional import qmax as _qmax

__all__ = ["Int8Conv2dFunction", "int8_conv2d"]


class Int8Conv2dFunction(torch.autograd.Function):
    """conv2d with int8 products forward and backward (see module docstring for the layouts)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, config: Int8ComputeConfig, name, act_amax,
                clip_state=None):
        qa, qw = _qmax(config.act_bits), _qmax(config.weight_bits)
        if config.act_scale == "static":
            if act_amax is None:
                raise ValueError(f"int8_conv2d '{name}': act_scale='static' needs act_amax (a calibrated amax)")
            amax = torch.as_tensor(act_amax, device=x.device)
            xq, x_step = quantize_along(x, qa, None, amax=amax, name=name)
            xq = _kernel_layout(xq)
        else:
            shared = shared_int8(x, qa)  # already int8 for a ReLU's backward (Int8Training's saved activations)
            if shared is not None:  # (as it is: a channels-last copy would be kept for backward beside it)
                xq, x_step = shared
            else:
                xq, x_step = quantize_along(x, qa, None, name=name)
                xq = _kernel_layout(xq)
                share_int8(x, xq, x_step, qa)
        wq, w_step = quantize_along(weight, qw, 0, name=name, what="weight")
        fast = config.use_fast_kernels
        fwd = _kernel(K.int8_conv2d_fwd, K.conv2d_fwd_reference, fast, xq, wq)
        y = fwd(xq, wq, x_step, w_step, qa, qw, bias, stride, padding, dilation, groups)
        kept = (x,) if keep_input(x, ctx.needs_input_grad[0]) else ()  # (compiled on CPU: lq.ops.partitioner)
        ctx.save_for_backward(xq, x_step, wq, w_step, *kept)
        ctx.args = (stride, padding, dilation, groups)
        ctx.config, ctx.name, ctx.x_dtype = config, name, x.dtype
        ctx.clip_state = clip_state  # the layer's own dict: periodic clip ratios (config.clip_every)
        ctx.static, ctx.has_bias = config.act_scale == "static", bias is not None
        ctx.row_major = x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xq, x_step, wq, w_step, *kept = ctx.saved_tensors
        cfg: Int8ComputeConfig = ctx.config
        stride, padding, dilation, groups = ctx.args
        qa, qw, qg = _qmax(cfg.act_bits), _qmax(cfg.weight_bits), _qmax(cfg.grad_bits)
        g = grad_out.float()
        fast = cfg.use_fast_kernels
        grad_x = grad_w = grad_b = None
        check_unquantized_grad(g, ctx.needs_input_grad, cfg, ctx.name)
        ops = {}  # both products' gradient operands (quantize_grad_pair: one pass where neither searches)
        if ctx.needs_input_grad[0] and cfg.int8_grad_input_enabled:
            ops["x"] = GradOperand(None, w_step.reshape(1, -1, 1, 1), "output gradient (grad_input conv)")
        if ctx.needs_input_grad[1] and cfg.int8_grad_weight_enabled:
            ops["w"] = GradOperand(1 if cfg.grad_granularity == "row" else None, None, "output gradient (grad_weight conv)")
        quantized = quantize_layer_grads(g, qg, ops, cfg, ctx.name, ctx.clip_state)
        if ctx.needs_input_grad[0]:
            if "x" in quantized:
                r = quantized.pop("x")  # (freed once its GEMM has run)
                op = _kernel(K.int8_conv2d_grad_input, K.conv2d_grad_input_reference, fast, r.q, wq)
                args = (r.q, wq, r.step, qg, qw, list(xq.shape), stride, padding, dilation, groups)
                if ctx.row_major and op is K.CPU_KERNELS.get(K.int8_conv2d_grad_input):
                    grad_x = op(*args, channels_last=False)  # (the input's layout, written by the kernel)
                else:
                    grad_x = op(*args)
            else:
                w = dequantize_along(wq, w_step, 0)
                grad_x = torch.nn.grad.conv2d_input(list(xq.shape), w, g, stride, padding, dilation, groups)
            if ctx.static:
                grad_x = grad_x.masked_fill_(xq.abs() >= qa, 0.0)  # eq. 13 (clipped inputs get no gradient)
            grad_x = grad_x.to(ctx.x_dtype)
            if kept:
                grad_x = keep(kept[0], grad_x)
        if ctx.needs_input_grad[1]:
            wsize = list(wq.shape)
            if "w" in quantized:
                r = quantized.pop("w")
                op = _kernel(K.int8_conv2d_grad_weight, K.conv2d_grad_weight_reference, fast, r.q, xq)
                grad_w = op(r.q, xq, r.step, x_step, qg, qa, wsize, stride, padding, dilation, groups)
            else:
                x = dequantize_along(xq, x_step, None)
                grad_w = torch.nn.grad.conv2d_weight(x, wsize, g, stride, padding, dilation, groups)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


def _kernel_layout(xq: torch.Tensor) -> torch.Tensor:
    """The int8 input in channels-last where ``amx.c``'s kernels take the products on CPU (tile unit or VNNI): they
    read that layout, the forward's grid from it and the weight gradient's position-major phases, so one fast copy
    here (``native_quant.channels_last_i8``) replaces a copy in the forward and the slower channel-row phases in
    backward (64 x 64 @56 batch 32, NCHW: weight gradient 6.9 -> 5.6 ms). Other devices, traced graphs and CPUs
    without those kernels get ``xq`` as it is."""
    if torch.compiler.is_compiling() or xq.device.type != "cpu" or xq.dim() != 4 or native_quant.tile_unit() is None:
        return xq  # (a compiled graph: the op's kernel converts what it needs)
    return native_quant.channels_last_i8(xq)


def _kernel(op, reference, fast: bool, *tensors: torch.Tensor):
    """The custom ``op`` (fast kernels), its CPU kernel itself where nothing needs the op (plain eager CPU tensors:
    the op's Python dispatch cost ~50 us a call, 26 calls a SmallResNet step), or the ``reference``."""
    if not fast:
        return reference
    direct = K.CPU_KERNELS.get(op)  # (None for an op replaced by a test)
    return direct if direct is not None and plain_cpu_eager(*tensors) else op


def int8_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    config: Int8ComputeConfig = Int8ComputeConfig(),  # noqa: B008 (frozen, immutable)
    name: str | None = None,
    act_amax: torch.Tensor | float | None = None,
    clip_state: dict | None = None,
) -> torch.Tensor:
    """``F.conv2d`` computed with int8 convolutions/GEMMs in forward, grad_input and grad_weight.

    ``x [N, C, H, W]`` (output has ``x``'s dtype), ``weight [O, C/groups, kh, kw]``; numeric ``padding``
    only (no ``"same"``). ``act_amax``: calibrated per-tensor amax (static activation scale).
    ``clip_state``: the layer's dict for periodic clip search (``config.clip_every > 1``), as in
    ``int8_linear``.
    """
    if isinstance(padding, str):
        raise ValueError(  # noqa: TRY004 (a wrong value of an accepted F.conv2d argument)
            f"int8_conv2d '{name}': string padding {padding!r} is not supported; pass integers"
        )
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"int8_conv2d '{name}': needs 4-D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(
            f"int8_conv2d '{name}': input channels {x.shape[1]} / weight {tuple(weight.shape)} / groups {groups} mismatch"
        )
    if act_amax is not None and config.act_scale == "dynamic":
        config = replace(config, act_scale="static")
    if clip_state is not None and not isinstance(clip_state, dict):
        raise TypeError(
            f"int8_conv2d '{name}': clip_state must be a dict or None, got {type(clip_state).__name__}"
        )
    st, pa, di = (list(_pair(v)) for v in (stride, padding, dilation))
    return Int8Conv2dFunction.apply(x, weight, bias, st, pa, di, groups, config, name, act_amax, clip_state)
