"""Fast symmetric int8 quantization of activations and weights for the int8 ops (Wu et al. eq. 6-8).

``q = clamp(round(s * x), -qmax, qmax)`` with ``s = qmax / amax``; the ops carry ``step = 1 / s`` (the real
value of one integer unit) because that is what multiplies an int32 accumulator back to real numbers
(eq. 10: ``y = (1 / (s_x s_w)) * sum_k x_q w_q``).

Where the scale sits decides whether it factors out of a GEMM (eq. 10): a scale may vary along every
dimension *except* the one summed over. ``quantize_along`` therefore takes the dimension(s) that keep their
own scale (``keep_dim``) and reduces amax over the others.
"""

from __future__ import annotations

import torch

from lq.ops import fused, native_quant


def quantize_along(
    x: torch.Tensor,
    qmax: int,
    keep_dim: int | None,
    amax: torch.Tensor | None = None,
    name: str | None = None,
    what: str = "input",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to int8 with one scale per index of ``keep_dim`` (``None``: one scale per tensor).

    Returns ``(q, step)``; ``step`` has shape ``[x.shape[keep_dim]]`` (or ``[1]``), fp32. ``amax``
    overrides the data's own amax (static calibration; values beyond it are clipped, eq. 7). Raises
    ``FloatingPointError`` naming ``name`` when ``x`` holds NaN/Inf (checked on the amax reduction, which
    for a static amax costs one extra reduction pass).
    """
    static = None if amax is None else amax.to(x.device).float().reshape(-1)
    if x.numel() == 0:  # an empty batch: no data amax (a reduction over nothing); the calibrated one, else 0
        return quantize_empty(x, qmax, keep_dim, static)
    done = None  # (C kernels on CPU, lq.ops.native_quant: None where they do not apply)
    if keep_dim is None:
        done = native_quant.quantize_tensor(x, qmax, static)
    elif static is None and keep_dim % x.dim() == 0 and x.dim() > 1:
        # a scale per row; a conv weight [O, C, kh, kw] as the rows [O, C * kh * kw]
        rows = x if x.dim() == 2 else x.reshape(x.shape[0], -1) if x.is_contiguous() else None
        done = None if rows is None else native_quant.quantize_rows(rows, qmax)
        if done is not None and x.dim() > 2:
            done = (done[0].view(x.shape), *done[1:])
    elif static is None and keep_dim % x.dim() == 1 and x.dim() in (2, 4) and not x.requires_grad:
        # a scale per column of [M, N] / per channel of [N, C, H, W]: grad_weight's operand kernel with ratio 1, no
        # multiplier and round-to-nearest is eq. 6-7 per channel (saved activations, lq.ops.saved_int8)
        done = native_quant.grad_operands(x, qmax, [(1, None, 1.0, None, None)])
        done = None if done is None else done[0]
    q, step, data_amax, finite = done if done is not None else fused.quantize_dynamic(x, qmax, keep_dim, static)
    require_finite(finite, data_amax, what, name)  # a NaN would otherwise become garbage int8: raises
    return q, step


def quantize_empty(
    x: torch.Tensor, qmax: int, keep_dim: int | None, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, step)`` of an empty ``x``: zeros, and the step of ``amax`` (fp32, per tensor) or of amax 0 (the
    smallest scale's step) per index of ``keep_dim``, without a reduction over nothing."""
    n = 1 if keep_dim is None else x.shape[keep_dim]
    s = fused.scale_from_amax(amax if amax is not None else torch.zeros(n, device=x.device), qmax)
    return torch.zeros(x.shape, dtype=torch.int8, device=x.device), 1.0 / s


def require_finite(finite: torch.Tensor, amax: torch.Tensor, what: str, name: str | None) -> None:
    """Raise (:func:`check_finite`'s error) unless ``finite`` (0-d bool) is true. Inside a compiled graph, where
    reading a tensor on the host would break the graph, an asynchronous assert with the same message."""
    if torch.compiler.is_compiling():
        torch._assert_async(finite, _finite_message(what, name))
    elif not bool(finite):
        check_finite(amax, what, name)


def dequantize_along(q: torch.Tensor, step: torch.Tensor, keep_dim: int | None) -> torch.Tensor:
    """Eq. 8: ``q * step`` with ``step`` broadcast along ``keep_dim`` (``None``: per tensor), fp32."""
    done = native_quant.dequantize(q, step, keep_dim)  # (one C pass on CPU where it applies)
    if done is not None:
        return done
    if keep_dim is None or step.numel() == 1:
        return q.float() * step.reshape(())
    shape = [1] * q.dim()
    shape[keep_dim % q.dim()] = -1
    return q.float() * step.reshape(shape)


def check_finite(amax: torch.Tensor, what: str, name: str | None) -> None:
    """Raise ``FloatingPointError`` naming the layer when ``amax`` holds NaN/Inf (never cast NaN to int8)."""
    if not bool(torch.isfinite(amax).all()):
        raise FloatingPointError(_finite_message(what, name))


def _finite_message(what: str, name: str | None) -> str:
    layer = f"layer '{name}'" if name else "an unnamed layer (pass name=... to the op to see which)"
    return (
        f"lq int8 op: non-finite values (NaN or Inf) in the {what} of {layer}; int8 cannot represent "
        "them. Lower the learning rate, enable gradient clipping, or keep this layer in float."
    )
