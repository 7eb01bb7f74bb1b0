"""Converted average pooling (``lq.convert`` of ``lq.nn.QuantAvgPool2d`` / ``QuantAdaptiveAvgPool2d``).

The fake-quant layer averages ``Q(x) = step * q`` (eq. 12, ``q = clip(round(x / step), -qmax, qmax)``, eq. 7).
The converted layer quantizes its input to the same integers ``q`` (``kernels.quantize_to_grid``: the value
torch's fake-quant kernel multiplies by, so the integers are the fake-quant model's bit for bit), averages
them with torch's own pooling on their float values, and multiplies by the step once:
``avg(q) * step``. The window sums of integers are exact in fp32 while ``window * qmax < 2^24`` (fp64 beyond),
so the one difference from the fake-quant model is float rounding of the average (the fake-quant model sums
``step * q`` in fp32). Zero padding is exact on the integer grid (``Q(0) = 0``), so padding, ``ceil_mode``,
``count_include_pad`` and ``divisor_override`` are torch's, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lq.deploy import kernels, traced
from lq.deploy.int8_layers import Int8Module, steps_from_amax

#: fp32 holds every integer below this exactly
_FP32_EXACT = 2**24


class _Int8AvgPoolNd(Int8Module):
    """What both converted average poolings share: the input scale, quantization, the exact sum dtype."""

    def __init__(self, name: str, bits: int, backend: str = "auto", device: torch.device | None = None) -> None:
        super().__init__(name, bits, backend)
        self.register_buffer("input_scale", torch.ones((), device=device))

    @classmethod
    def from_quant(cls, layer: nn.Module, name: str, backend: str = "auto") -> _Int8AvgPoolNd:
        """Build from a calibrated ``lq.nn.QuantAvgPool2d`` / ``QuantAdaptiveAvgPool2d``."""
        q = layer.input_quantizer
        m = cls(layer, name, q.spec.bits, backend, q.amax.device)
        with torch.no_grad():
            m.input_scale.copy_(1.0 / steps_from_amax(q.amax, q.spec.bits).reshape(()))
        return m

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _window(self, x: torch.Tensor) -> int:
        """An upper bound on the values one output averages (the sum must stay exact)."""
        raise NotImplementedError

    def _average(self, t: torch.Tensor, x: torch.Tensor, step: float | torch.Tensor) -> torch.Tensor:
        """``avg(t) * step`` for the integer grid ``t`` of input ``x``, in ``x``'s dtype."""
        dt = torch.float32 if self._window(x) * self.qmax_input < _FP32_EXACT else torch.float64
        return (self._pool(t.to(dt)) * step).to(x.dtype)

    @torch.compiler.disable  # eager kernels only (see Int8Module._forward)
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        t = kernels.quantize_to_grid(x, self.input_scale, self.qmax_input)  # FloatingPointError on NaN / Inf
        return self._average(t, x, self._steps()[0])

    def _traced(self, x: torch.Tensor) -> torch.Tensor:
        t, poison = traced.quantize(x, self.input_scale, self.qmax_input, self.name)
        y = self._average(t, x, 1.0 / self.input_scale)
        return y if poison is None else y + poison.to(y.dtype)


class Int8AvgPool2d(_Int8AvgPoolNd):
    """``nn.AvgPool2d`` on the input's integer grid times the step (module docstring)."""

    def __init__(self, pool: nn.AvgPool2d, name: str, bits: int, backend: str = "auto",
                 device: torch.device | None = None) -> None:
        super().__init__(name, bits, backend, device)
        self.kernel_size, self.stride, self.padding = pool.kernel_size, pool.stride, pool.padding
        self.ceil_mode, self.count_include_pad = pool.ceil_mode, pool.count_include_pad
        self.divisor_override = pool.divisor_override

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                            self.divisor_override)

    def _window(self, x: torch.Tensor) -> int:
        k = (self.kernel_size, self.kernel_size) if isinstance(self.kernel_size, int) else self.kernel_size
        return int(k[0]) * int(k[1])

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}, count_include_pad={self.count_include_pad}, bits={self.input_bits}")


class Int8AdaptiveAvgPool2d(_Int8AvgPoolNd):
    """``nn.AdaptiveAvgPool2d`` (global average pooling for ``output_size=1``) on the input's integer grid times
    the step (module docstring)."""

    def __init__(self, pool: nn.AdaptiveAvgPool2d, name: str, bits: int, backend: str = "auto",
                 device: torch.device | None = None) -> None:
        super().__init__(name, bits, backend, device)
        self.output_size = pool.output_size

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(t, self.output_size)

    def _window(self, x: torch.Tensor) -> int:
        # an adaptive window is at most ceil(size / out) + 1 long: the whole plane bounds it
        # (symbolic sizes while compiling: a guard on the comparison, no specialisation)
        return x.shape[-1] * x.shape[-2]

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, bits={self.input_bits}"


__all__ = ["Int8AdaptiveAvgPool2d", "Int8AvgPool2d"]
