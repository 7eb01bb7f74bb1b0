"""What an int8 layer does for torch.compile's partitioner on CPU: keep its float input for backward.

An int8 layer saves its *integer* input for backward, not the float one. In a compiled training step the ReLU
(or ReLU6 / Hardtanh) before the layer then has no float tensor kept that its backward could read its mask
from, and AOT's min-cut partitioner saves the mask ``relu_out <= 0`` as a bool tensor (1 byte an element, less
than the fp32 output). torch 2.13's Inductor writes bool (and uint8) masks on CPU through a slow vectorised
path: 5-20 ms for a 1024 x 1024 mask against 0.3 ms for an fp32 result of the same comparison (AVX-512 host,
any ``cpp.simdlen``), so a compiled int8 MLP step took 55 ms against 33-37 ms eager. An fp32 Linear does not
hit this: it saves its float input, which is the ReLU output, and the partitioner reads the mask from it.

So while compiling for a CPU the layer saves its float input too and hands it, with the incoming gradient, to
:func:`keep` in backward: an op the compiler cannot see into, fold or move into the forward (it depends on the
gradient), which returns a zero. The partitioner must then keep the float input, and ReLU's backward reads its
mask from that tensor. The price is memory: behind a ReLU it is what eager pays (eager autograd keeps the ReLU
output for ReLU's backward, and it is this very tensor); behind a layer whose output the partitioner would not
otherwise keep (BatchNorm or LayerNorm output feeding the int8 layer directly, a pooling output, a residual sum
without a ReLU) it is one fp32 copy of that input more than eager or the compiled step before (a review
measured conv -> BN -> conv: 296 KiB saved against 169). A per-layer opt-in (only behind ReLU-like ops) would
remove that; not done. Arithmetic expressions of the input that are zero (``x.sum() * 0``) do
not do it: AOT folds them into a constant and the bool mask comes back (measured). Not covered: a ReLU whose
output reaches the layer through a view (ReLU -> Flatten -> Linear at a CNN's head): the partitioner keeps the
view and still saves the mask (a small tensor there).
"""

from __future__ import annotations

import torch

__all__ = ["keep", "keep_input"]


def keep_input(x: torch.Tensor, needs_grad: bool) -> bool:
    """Whether a layer saves its float input ``x`` for the partitioner: while compiling, on CPU, when ``x``
    needs a gradient (``ctx.needs_input_grad``: e.g. a ReLU before the layer, whose backward runs)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and needs_grad


@torch.library.custom_op("lq::keep", mutates_args=())
def _keep(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=grad.dtype, device=grad.device)


@_keep.register_fake
def _(x, grad):
    return grad.new_empty(())


def keep(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` plus a zero from an opaque op that takes ``x``: the compiled backward uses ``x``."""
    return grad + torch.ops.lq.keep(x, grad)
