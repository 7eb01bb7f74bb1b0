"""``ChannelClamp``: ``clamp(x, lower, upper[c])`` with one upper bound per channel.

Cross-layer equalization (``lq.equalize``) divides channel ``c`` of a layer's output by ``s_c``. ReLU commutes
with that scaling; ReLU6 does not (``relu6(x / s) != relu6(x) / s``), but ``clamp(x / s, 0, 6 / s)`` equals
``relu6(x) / s`` exactly, so a ReLU6 between two equalized layers becomes a ``ChannelClamp`` with
``upper = 6 / s``: the float model computes the same function (Nagel et al. 2019 replace ReLU6 by ReLU
instead, which changes the model).
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelClamp(nn.Module):
    """``clamp(x, lower, upper[c])`` along ``channel_dim`` (1 for ``(N, C, ...)`` conv activations, -1 for
    ``(..., C)`` Linear activations).

    Args:
        upper: one upper bound per channel, shape ``(C,)``.
        lower: the lower bound (a scalar, 0 for a ReLU).
        channel_dim: the dimension of the input that indexes channels.
    """

    def __init__(self, upper: torch.Tensor, lower: float = 0.0, channel_dim: int = 1) -> None:
        super().__init__()
        upper = torch.as_tensor(upper, dtype=torch.float32).detach()
        if upper.dim() != 1 or upper.numel() == 0:
            raise ValueError(f"ChannelClamp: upper must be a non-empty 1-d tensor, got shape {tuple(upper.shape)}")
        if not torch.isfinite(upper).all() or (upper < lower).any():
            raise ValueError("ChannelClamp: every upper bound must be finite and >= lower")
        self.register_buffer("upper", upper)
        self.lower = float(lower)
        self.channel_dim = int(channel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` clamped to ``[lower, upper[c]]`` per channel ``c``."""
        dim = self.channel_dim % x.dim()
        if x.shape[dim] != self.upper.numel():
            raise ValueError(f"ChannelClamp: input has {x.shape[dim]} channels on dim {dim}, "
                             f"expected {self.upper.numel()}")
        shape = [1] * x.dim()
        shape[dim] = -1
        return torch.clamp(x, min=self.lower).minimum(self.upper.to(x.dtype).reshape(shape))

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}, lower={self.lower}, channel_dim={self.channel_dim}"
