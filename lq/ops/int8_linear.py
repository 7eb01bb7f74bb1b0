"""Int8 linear with int8 forward and int8 backward GEMMs (Wu et al. 2020 eq. 10; gradients quantized as in
Zhu et al. 2020, CVPR). One ``autograd.Function`` covers the three GEMMs of the layer; an
``Int8ComputeConfig`` toggles them (torchao ``int8_mixed_precision`` style).

Layouts (``x [M, K]``, ``W [N, K]``, ``g = dL/dy [M, N]``). In an int8 GEMM the scales factor out of the
sum only if they are constant along the *reduced* dimension (eq. 10), so each GEMM quantizes its operands
with scales along the dimensions it keeps:

* forward ``y = x W^T`` reduces K: ``x`` per row (M) or per tensor (static), ``W`` per output channel (N).
* grad_input ``dx = g W`` reduces N. ``W``'s forward scale varies along N, so instead of re-quantizing
  ``W`` per input channel we fold its scale into the gradient: ``g W = (g * step_w[None, :]) W_q``, then
  quantize ``g * step_w`` **per row** (M; constant along N) and multiply by the saved integer ``W_q``.
* grad_weight ``dW = g^T x`` reduces M. The saved ``x_q`` has one scale per *row* (varies along M), so
  again fold it into the gradient: ``g^T x = (g * step_x[:, None])^T x_q``, and quantize
  ``g * step_x`` **per column** (N; constant along M) -- i.e. ``g^T`` row-wise. The saved int8 ``x_q`` is
  used as is: no float activation is kept for backward (int8 + one fp32 per row: ~0.25x fp32 memory).

Both backward GEMMs therefore compute the exact gradient of the *quantized* forward (straight-through for
the rounding of eq. 13) up to the rounding of the gradient itself.
"""

from __future__ import annotations

import torch

from lq.ops.config import Int8ComputeConfig
from lq.ops.grad_quant import GradOperand, check_unquantized_grad, quantize_layer_grads
from lq.ops.int8_mm import int8_mm_eager, int8_mm_reference
from lq.ops.partitioner import keep, keep_input
from lq.ops.quantize import dequantize_along, quantize_along
from lq.quant.functional import qmax as _qmax

__all__ = ["Int8LinearFunction", "int8_linear"]


def _mm(cfg: Int8ComputeConfig, *args):
    return int8_mm_eager(*args) if cfg.use_fast_kernels else int8_mm_reference(*args)


class Int8LinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with int8 GEMMs forward and backward (see module docstring for the layouts)."""

    @staticmethod
    def forward(ctx, x, weight, bias, config: Int8ComputeConfig, name, act_amax, clip_state=None):
        qa, qw = _qmax(config.act_bits), _qmax(config.weight_bits)
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        if config.act_scale == "static":
            if act_amax is None:
                raise ValueError(f"int8_linear '{name}': act_scale='static' needs act_amax (a calibrated amax)")
            xq, x_step = quantize_along(
                x2, qa, None, amax=torch.as_tensor(act_amax, device=x.device), name=name
            )
        else:
            xq, x_step = quantize_along(x2, qa, 0, name=name)
        wq, w_step = quantize_along(weight, qw, 0, name=name, what="weight")
        y = _mm(config, xq, wq, x_step, w_step, qa, qw, bias)
        kept = (x,) if keep_input(x, ctx.needs_input_grad[0]) else ()  # (compiled on CPU: lq.ops.partitioner)
        ctx.save_for_backward(xq, x_step, wq, w_step, *kept)
        ctx.config, ctx.name, ctx.x_shape, ctx.x_dtype = config, name, x.shape, x.dtype
        ctx.clip_state = clip_state  # the layer's own dict: periodic clip ratios (config.clip_every)
        ctx.static = config.act_scale == "static"
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xq, x_step, wq, w_step, *kept = ctx.saved_tensors
        cfg: Int8ComputeConfig = ctx.config
        qa, qw, qg = _qmax(cfg.act_bits), _qmax(cfg.weight_bits), _qmax(cfg.grad_bits)
        n = wq.shape[0]
        g = grad_out.reshape(-1, n).float()
        grad_x = grad_w = grad_b = None
        one = torch.ones(1, dtype=torch.float32, device=g.device)
        check_unquantized_grad(g, ctx.needs_input_grad, cfg, ctx.name)
        # both products' gradient operands (quantize_grad_pair: one pass where neither searches its clip):
        # grad_input folds W's per-output-channel step into g (N is reduced there) and quantizes per row (or per
        # layer); grad_weight folds x's per-row step into g (M is reduced there) and quantizes per column N
        row = cfg.grad_granularity == "row"
        xs = x_step.reshape(-1, 1) if x_step.numel() > 1 else x_step.reshape(1, 1)
        ops = {}
        if ctx.needs_input_grad[0] and cfg.int8_grad_input_enabled:
            ops["x"] = GradOperand(0 if row else None, w_step.reshape(1, -1), "output gradient (grad_input GEMM)")
        if ctx.needs_input_grad[1] and cfg.int8_grad_weight_enabled:
            ops["w"] = GradOperand(1 if row else None, xs, "output gradient (grad_weight GEMM)")
        quantized = quantize_layer_grads(g, qg, ops, cfg, ctx.name, ctx.clip_state)
        if ctx.needs_input_grad[0]:
            if "x" in quantized:
                r = quantized.pop("x")  # (freed once its GEMM has run)
                # b operand [K, N] (reduced N last): the integer weight transposed, as a view (the kernels read
                # strided operands or copy them themselves; an int8 transpose copy cost 0.6 ms at 1024^2)
                grad_x = _mm(cfg, r.q, wq.t(), r.step, one, qg, qw, None)
            else:
                grad_x = g @ dequantize_along(wq, w_step, 0)
            if ctx.static:
                # eq. 13: no gradient where the input was clipped by the calibrated range (|x_q| = qmax).
                grad_x = grad_x.masked_fill_(xq.abs() >= qa, 0.0)
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
            if kept:
                grad_x = keep(kept[0], grad_x)
        if ctx.needs_input_grad[1]:
            if "w" in quantized:
                r = quantized.pop("w")
                # a = g^T [N, M], b = x_q^T [K, M]: both with the reduced M last, as transposed views (the
                # kernels read strided operands or copy them themselves)
                grad_w = _mm(cfg, r.q.t(), xq.t(), r.step, one, qg, qa, None)
            else:
                grad_w = g.t() @ dequantize_along(xq, x_step, 0 if x_step.numel() > 1 else None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Int8ComputeConfig = Int8ComputeConfig(),  # noqa: B008 (frozen, immutable)
    name: str | None = None,
    act_amax: torch.Tensor | float | None = None,
    clip_state: dict | None = None,
) -> torch.Tensor:
    """``x W^T + b`` computed with int8 GEMMs in forward and backward.

    ``x [..., K]`` (any float dtype; output has ``x``'s dtype), ``weight [N, K]``, ``bias [N]``.
    ``act_amax``: calibrated per-tensor amax for ``config.act_scale == "static"`` (if given with the default
    dynamic config, it switches the op to static). ``name`` labels error messages and gradient statistics.
    ``clip_state``: a dict kept per layer (``lq.ops.grad_quant.layer_clip_state(layer)``) where
    ``config.clip_every > 1`` remembers the searched clip ratios between searches; without one every
    backward searches (see ``quantize_grad``).
    """
    if act_amax is not None and config.act_scale == "dynamic":
        from dataclasses import replace

        config = replace(config, act_scale="static")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"int8_linear '{name}': input has {x.shape[-1]} features but weight is {tuple(weight.shape)}"
        )
    if clip_state is not None and not isinstance(clip_state, dict):
        raise TypeError(f"int8_linear '{name}': clip_state must be a dict or None, got {type(clip_state).__name__}")
    return Int8LinearFunction.apply(x, weight, bias, config, name, act_amax, clip_state)
