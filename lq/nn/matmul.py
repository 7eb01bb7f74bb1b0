"""Matrix multiplication between two activations (attention's Q K^T and P V), as modules.

``torch.matmul`` in user code is invisible to module swapping; write ``self.matmul = lq.nn.Matmul()`` and
call ``self.matmul(q, k.transpose(-2, -1))`` instead, and ``lq.quantize`` turns it into ``QuantMatmul``:
both inputs fake-quantized per tensor (the paper quantizes "other matrix multiplications", Section 4).
"""

from __future__ import annotations

import torch
from torch import nn

from lq.quant.config import QuantConfig
from lq.quant.quantizer import TensorQuantizer


class Matmul(nn.Module):
    """Float ``torch.matmul(a, b)`` as a module, so it can be found and quantized by name."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class QuantMatmul(Matmul):
    """``torch.matmul`` on two per-tensor fake-quantized activations (no weight)."""

    float_class = Matmul

    def init_quantizers(self, config: QuantConfig, name: str) -> None:
        """Create the two activation quantizers (both operands are activations, per tensor) from ``config``."""
        self.input_quantizer = TensorQuantizer(config.activation, name=f"{name}.input")
        self.other_quantizer = TensorQuantizer(config.activation, name=f"{name}.other")

    def quantizers(self) -> dict[str, TensorQuantizer]:
        """``{attribute name: quantizer}`` of this layer."""
        return {"input_quantizer": self.input_quantizer, "other_quantizer": self.other_quantizer}

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.input_quantizer(a), self.other_quantizer(b))
