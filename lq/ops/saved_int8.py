"""Activations saved for backward as int8: the memory half of int8 dataflow (Zhu et al. 2020; Jetfire, Xi et al.
2024, keep the data between layers in int8 "in order to save memory").

In a float training step the tensors autograd keeps for backward are fp32: BatchNorm's input, ReLU's output,
the input of every conv (the same tensor as the ReLU output before it). ``lq.ops.int8_conv2d`` already keeps
only its int8 input ``x_q``, but BatchNorm and ReLU still keep fp32 copies, so an int8 step kept *more* bytes
than the fp32 one (1.15x on SmallResNet). Inside :func:`int8_saved_activations` (what ``Int8Training`` wraps
around each training step's forward), ``torch.autograd.graph.saved_tensors_hooks`` stores every saved float
activation as int8 (eq. 7) with its step and hands backward the dequantized values (eq. 8):

* a non-negative tensor (a ReLU / ReLU6 / pooling output: the next conv's input) is quantized exactly as the
  int8 conv quantizes its input, per tensor with ``act_bits``; the conv then finds it in a registry instead of
  quantizing again, so ReLU's backward and the conv's backward share one int8 tensor (no second copy, and one
  quantization pass less);
* any other tensor (BatchNorm's input, a residual sum) with one step per channel (dim 1), 8 bits.

Only the int8 dataflow is compressed: a tensor is packed when an int8 layer or a ReLU-like clip, pooling or
residual add produced it (``PACKED_PRODUCERS``, read off its ``grad_fn``), so the loss, softmax, log,
division and user code keep exact float tensors. The input of a layer trained in float (a skipped Linear /
Conv) is kept in float for that layer, even when a ReLU before it saved an int8 copy for its own backward.
Backward is approximate where it reads packed values: ReLU's mask ``y > 0`` misses outputs below half a step
(their gradient is dropped), BatchNorm's input-gradient sees its input rounded to 8 bits per channel. The
forward is unchanged. Parameters, integer tensors and small tensors (< ``MIN_NUMEL`` elements) are kept as they
are.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lq.ops import fused, native_quant
from lq.ops.quantize import dequantize_along, quantize_along

#: tensors smaller than this are saved as they are (scales, statistics, logits of small heads)
MIN_NUMEL = 4096

#: ``type(t.grad_fn).__name__`` of the tensors that are packed: outputs of the int8 layers (the input of the
#: BatchNorm after them), of ReLU-like clips, pooling and residual adds (the inputs of the next int8 layer)
PACKED_PRODUCERS = frozenset({
    "Int8Conv2dFunctionBackward", "Int8LinearFunctionBackward",
    "ReluBackward0", "HardtanhBackward0", "ClampBackward1", "ClampMinBackward0", "LeakyReluBackward0",
    "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0", "AddBackward0",
    "NativeBatchNormBackward0", "CudnnBatchNormBackward0",
})

_active: list["_Session"] = []


@dataclass
class _Packed:
    q: torch.Tensor
    step: torch.Tensor
    axis: int | None
    dtype: torch.dtype


class _Session:
    """One forward's registry: fp32 tensor (by identity) -> its per-tensor int8 form, for the int8 conv."""

    def __init__(self, act_qmax: int, on_pack: Callable[[Any], None] | None = None) -> None:
        self.act_qmax, self.on_pack = act_qmax, on_pack
        self.shared: dict[int, tuple[weakref.ref, int, torch.Tensor, torch.Tensor]] = {}
        self.float_inputs: dict[int, weakref.ref] = {}  # inputs of layers that train in float

    def keep_float(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook (every module): a Linear / Conv without int8 compute saves its input in float."""
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and "int8_compute" not in module.__dict__:
            for a in args:
                if isinstance(a, torch.Tensor):
                    self.float_inputs[id(a)] = weakref.ref(a)

    def pack(self, t: torch.Tensor):
        out = self._pack(t)
        if self.on_pack is not None:
            self.on_pack(out)
        return out

    def _pack(self, t: torch.Tensor):
        if (not t.is_floating_point() or t.numel() < MIN_NUMEL or isinstance(t, nn.Parameter)
                or (t.requires_grad and t.is_leaf) or t.grad_fn is None
                or type(t.grad_fn).__name__ not in PACKED_PRODUCERS):
            return t
        ref = self.float_inputs.get(id(t))
        if ref is not None and ref() is t:
            return t
        hit = self.lookup(t)
        if hit is not None:
            return _Packed(hit[0], hit[1], None, t.dtype)
        x = t.detach()
        # (one C call: its min/max, then its integers; torch ops where the kernel does not apply)
        done = native_quant.pack_activation(x, self.act_qmax) or _pack_activation_torch(x, self.act_qmax)
        if done == "nonfinite":
            return t  # NaN/Inf: left for the layers' own checks to report, by name
        if done != "negative":  # non-negative: the next int8 conv takes these integers as its own (shared_int8)
            self.remember(t, *done)
            return _Packed(*done, None, t.dtype)
        axis = 1 if t.dim() >= 2 else None
        q, step = quantize_along(x, 127, axis, what="saved activation")
        return _Packed(q, step, axis, t.dtype)

    @staticmethod
    def unpack(p):
        if not isinstance(p, _Packed):
            return p
        return dequantize_along(p.q, p.step, p.axis).to(p.dtype)

    def remember(self, t: torch.Tensor, q: torch.Tensor, step: torch.Tensor) -> None:
        self.shared[id(t)] = (weakref.ref(t), t._version, q, step)

    def lookup(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.shared.get(id(t))
        if entry is None or entry[0]() is not t or entry[1] != t._version:
            return None
        return entry[2], entry[3]


def _pack_activation_torch(x: torch.Tensor, qmax: int) -> str | tuple[torch.Tensor, torch.Tensor]:
    """``native_quant.pack_activation`` with torch ops: ``"nonfinite"``, ``"negative"``, or a non-negative ``x``'s
    per-tensor ``(q, step)`` as ``quantize_along(x, qmax, None)`` makes them, bit for bit (max |x| = its maximum
    here), without that function's second reduction pass."""
    lo, hi = torch.aminmax(x)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        return "nonfinite"
    if float(lo) < 0.0:
        return "negative"
    s = fused.scale_from_amax(hi.float().reshape(1), qmax)
    return fused.quantize_with_scale(x, s, qmax, None), 1.0 / s


def shared_int8(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-tensor int8 form of ``x`` already made for backward in this step (``(q, step)``, as
    ``quantize_along(x, qmax, None)`` returns them), or None."""
    if not _active or _active[-1].act_qmax != qmax:
        return None
    return _active[-1].lookup(x)


def share_int8(x: torch.Tensor, q: torch.Tensor, step: torch.Tensor, qmax: int) -> None:
    """Register the int8 conv's quantized input, so a later save of ``x`` (an in-place ReLU after the conv
    cannot, but a second consumer can) reuses it."""
    if _active and _active[-1].act_qmax == qmax:
        _active[-1].remember(x, q, step)


@contextlib.contextmanager
def int8_saved_activations(act_qmax: int, on_pack: Callable[[Any], None] | None = None) -> Iterator[None]:
    """Inside the block, float activations saved for backward are kept as int8 (module docstring). Enter it
    around a forward; backward may run after the block ends (the packed tensors carry their own unpacking).

    Args:
        act_qmax: the int8 layers' activation ``qmax`` (127 for 8 bits, 63 for 7), so the per-tensor int8 form
            of a non-negative activation is exactly the one the next int8 conv computes.
        on_pack: called with what is stored for each saved tensor (the tensor itself, or an object with ``q``
            and ``step``), for memory accounting.
    """
    session = _Session(act_qmax, on_pack)
    _active.append(session)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(session.keep_float)
    try:
        with torch.autograd.graph.saved_tensors_hooks(session.pack, session.unpack):
            yield
    finally:
        handle.remove()
        _active.remove(session)
        session.shared.clear()
        session.float_inputs.clear()
