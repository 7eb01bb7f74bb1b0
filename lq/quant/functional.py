"""Quantization math of Wu et al. 2020, Section 3 (equation numbers are the paper's).

Convention: ``s`` is the paper's *scale factor*, the multiplier that maps real values to the integer grid
(``x_q = round(s * x)``); the step between two representable values is ``1 / s``. torch's fused fake-quant
kernels take the step (``scale = 1 / s``) instead; the translation happens here and nowhere else.

Scale (symmetric) quantization, eq. 6-8, uses the integer range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (int8:
[-127, 127]); affine quantization, eq. 1-5, uses ``[-2^(b-1), 2^(b-1) - 1]`` with an integer zero point.
"""

from __future__ import annotations

import torch

#: amax values below this are treated as this value, so an all-zero tensor gives a finite scale (its
#: values all quantize to 0) instead of a division by zero.
AMAX_EPS = 1e-12

MIN_BITS, MAX_BITS = 2, 16


def check_bits(bits: int) -> int:
    """Validate a bit width (2..16) and return it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def qmax(bits: int) -> int:
    """Largest integer of the symmetric b-bit range: 2^(b-1) - 1 (127 for int8)."""
    return 2 ** (check_bits(bits) - 1) - 1


def int_dtype(bits: int) -> torch.dtype:
    """Smallest signed integer dtype that holds a b-bit value."""
    return torch.int8 if check_bits(bits) <= 8 else torch.int16


def reshape_for_axis(v: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Shape a per-channel vector ``v`` (length ``x.shape[axis]``) so it broadcasts against ``x``.

    With ``axis=None`` (per-tensor) ``v`` must hold one element and is returned as a 0-d tensor.
    """
    if axis is None:
        if v.numel() != 1:
            raise ValueError(f"per-tensor quantization needs one amax value, got shape {tuple(v.shape)}")
        return v.reshape(())
    axis = axis % x.dim()
    if v.numel() != x.shape[axis]:
        raise ValueError(
            f"per-channel amax has {v.numel()} values but the tensor has {x.shape[axis]} channels on axis {axis}"
        )
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.reshape(shape)


def scale_from_amax(amax: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Eq. 6: ``s = (2^(b-1) - 1) / alpha`` for the symmetric range ``[-alpha, alpha]``, alpha = amax."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return qmax(bits) / amax.float().clamp_min(AMAX_EPS)


def affine_params(beta: torch.Tensor, alpha: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1-2: scale ``s = (2^b - 1) / (alpha - beta)`` and zero point ``z = -round(beta * s) - 2^(b-1)``.

    The range is first widened to include 0 so that real zero is exactly representable.
    """
    check_bits(bits)
    beta = torch.as_tensor(beta, dtype=torch.float32).clamp(max=0.0)
    alpha = torch.as_tensor(alpha, dtype=torch.float32).clamp(min=0.0)
    s = (2**bits - 1) / (alpha - beta).clamp_min(AMAX_EPS)
    z = -torch.round(beta * s) - 2 ** (bits - 1)
    return s, z


def quantize(
    x: torch.Tensor,
    s: torch.Tensor,
    bits: int = 8,
    z: torch.Tensor | None = None,
    axis: int | None = None,
) -> torch.Tensor:
    """Eq. 7 (scale, ``z=None``): ``clip(round(s x), -(2^(b-1)-1), 2^(b-1)-1)``;
    eq. 4 (affine): ``clip(round(s x + z), -2^(b-1), 2^(b-1)-1)``.

    ``s`` (and ``z``) are scalars or per-channel vectors along ``axis``. Returns int8 (b <= 8) or int16.
    """
    s = reshape_for_axis(torch.as_tensor(s, device=x.device), x, axis)
    y = x.float() * s
    if z is None:
        lo, hi = -qmax(bits), qmax(bits)
    else:
        y = y + reshape_for_axis(torch.as_tensor(z, device=x.device), x, axis)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(y), lo, hi).to(int_dtype(bits))


def dequantize(
    x_q: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None = None,
    axis: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Eq. 8 (scale): ``x_q / s``; eq. 5 (affine): ``(x_q - z) / s``."""
    s = reshape_for_axis(torch.as_tensor(s, device=x_q.device), x_q, axis)
    y = x_q.float()
    if z is not None:
        y = y - reshape_for_axis(torch.as_tensor(z, device=x_q.device), x_q, axis)
    return (y / s).to(dtype)


def _step(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Distance between two representable values, 1/s, as torch's fused kernels want it (fp32)."""
    return amax.detach().float().clamp_min(AMAX_EPS) / qmax(bits)


def fake_quant(
    x: torch.Tensor, amax: torch.Tensor, bits: int = 8, axis: int | None = None, *, in_range: bool = False
) -> torch.Tensor:
    """Eq. 12, ``dequantize(quantize(x))`` with the straight-through estimator of eq. 13.

    The gradient is 1 where ``-amax <= x <= amax`` and 0 outside. ``amax`` is a scalar (per-tensor,
    ``axis=None``) or a vector with one value per slice along ``axis`` (per-channel). Any float dtype. On
    CUDA this runs torch's fused fake-quant kernels; on CPU ``lq.quant.fake_quant_cpu`` (same numbers,
    several times faster than torch's scalar CPU kernel). ``in_range=True`` promises ``|x| <= amax``
    everywhere (``amax`` is the max of this ``x``): the CPU path then skips the all-ones STE mask.
    """
    q = qmax(bits)
    step = _step(amax, bits)
    if x.device.type == "cpu":
        from lq.quant.fake_quant_cpu import fake_quant_cpu

        return fake_quant_cpu(x, reshape_for_axis(step.reshape(-1), x, axis), q, in_range=in_range)
    if axis is None:
        zero = torch.zeros((), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x, step.reshape(()), zero, -q, q)
    axis = axis % x.dim()
    step = step.reshape(-1)
    zero = torch.zeros(step.shape, dtype=torch.int32, device=x.device)
    return torch.fake_quantize_per_channel_affine(x, step, zero, axis, -q, q)


def fake_quant_learned_range(
    x: torch.Tensor, amax: torch.Tensor, bits: int = 8, axis: int | None = None
) -> torch.Tensor:
    """Eq. 12 with a trainable range (Section 5.3): gradients flow to ``amax`` as well as to ``x``.

    The gradient w.r.t. the step follows LSQ (Esser et al. 2020) inside the range and PACT (Choi et al.
    2018) outside it (``d x_hat / d alpha = sign(x)`` for clipped values); the step is ``amax / qmax``, so
    autograd carries it to ``amax``. Uses torch's fused learnable fake-quant kernels.
    """
    q = qmax(bits)
    step = amax.float().clamp_min(AMAX_EPS) / q
    if axis is None:
        zero = torch.zeros(1, dtype=torch.float32, device=x.device)
        out = torch._fake_quantize_learnable_per_tensor_affine(x.float(), step.reshape(1), zero, -q, q, 1.0)
    else:
        axis = axis % x.dim()
        zero = torch.zeros(step.numel(), dtype=torch.float32, device=x.device)
        out = torch._fake_quantize_learnable_per_channel_affine(
            x.float(), step.reshape(-1), zero, axis, -q, q, 1.0
        )
    return out.to(x.dtype)


def fake_quant_affine(x: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Eq. 12 for affine quantization (eq. 1-5), per tensor, with the STE of eq. 13 on ``[beta, alpha]``."""
    s, z = affine_params(beta, alpha, bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    # torch's kernel computes clamp(round(x / step + zp), lo, hi) - zp) * step, which is eq. 4 then eq. 5.
    zp = z.to(torch.int32).to(x.device).reshape(())
    return torch.fake_quantize_per_tensor_affine(x, (1.0 / s).reshape(()).to(x.device), zp, lo, hi)
