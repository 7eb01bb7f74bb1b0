"""oneDNN's int8 convolution as a custom op of compiled graphs (``lq::onednn_conv``), where it is faster.

A compiled converted model (``lq.convert(model, compile=True)``, :mod:`lq.deploy.traced`) writes its layers in
plain torch ops so Inductor can fuse the quantization and the output stages into the code around them. For
the convolution itself plain ops mean an int8 im2col plus ``torch._int_mm``, and at batch 64 that im2col is
the larger half of the time: it writes ``kh * kw`` copies of each input, 16 bytes at a time for a 16-channel
layer. oneDNN's direct int8 convolution reads the input once and is about 3x faster on SmallResNet's convs
(0.98 ms for all eight at batch 64 against 3.0 ms for im2col + ``_int_mm``, measured on the AVX-512 VNNI host,
2 threads). Where it is faster a compiled graph calls the converted layer's own eager oneDNN kernel through
this op: the graph quantizes (fused with the previous layer's output stage) into the uint8 operand, the op runs
the convolution with its int32 accumulation and eq. 10's fp32 output stage and bias, and the graph goes on
with the fp32 output (a ReLU, a residual add and the next quantization fuse after it).

Which is faster depends on the shape: oneDNN sets up each call (~60 us), which small convolutions (batch 1)
do not pay back, and the im2col costs most where its operand is big and output channels are few
(:func:`prefer_onednn`, a rule fit on measurements; under dynamic shapes the symbolic sizes make it a guard).
Timing both kernels eagerly while tracing was tried and misleads: torch's eager strided copy of a
few-channel im2col is several times slower than the loop Inductor generates for it.

The op takes the layer by a handle (``id(layer)``; a registry of live converted layers, weakly held), so
the packed weight stays the layer's cached one and a ``load_state_dict`` repacks it as in eager mode. That
ties the graph to this process: ``torch.export`` never uses the op (``torch.compiler.is_exporting()``), its
program keeps the portable ``_int_mm`` form.
"""

from __future__ import annotations

import weakref

import torch

from lq.ops import hardware as hw

__all__ = ["conv2d", "onednn_conv", "prefer_onednn", "register"]

_LAYERS: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()

#: im2col operand bytes from which oneDNN's direct convolution is faster (:func:`prefer_onednn`)
MIN_OPERAND = 1536 * 1024


def register(layer: torch.nn.Module) -> None:
    """Make ``layer`` reachable by :func:`onednn_conv` under its handle ``id(layer)`` while it lives (called
    when a converted conv is made or unpickled, outside any tracing: the compiled graph reads only ``id``)."""
    _LAYERS[id(layer)] = layer


def _layer(key: int) -> torch.nn.Module:
    layer = _LAYERS.get(key)
    if layer is None:
        raise RuntimeError("lq::onednn_conv: the converted layer this compiled graph was made for no longer "
                           "exists; compile the model again")
    return layer


def prefer_onednn(positions: int, taps: int, channels: int) -> bool:
    """Whether oneDNN's direct convolution beats the graph's im2col + ``_int_mm`` for a convolution with
    ``positions`` output positions (``N * Ho * Wo``), ``taps`` kernel taps (``kh * kw``) and ``channels``
    input channels per group: when the im2col operand the graph would write, ``positions * taps`` rows of
    ``channels`` bytes each (a row costs at least a 16-byte vector), reaches :data:`MIN_OPERAND`. Below that,
    oneDNN's per-call set-up (~60 us) costs more than the copy. Fit on compiled single-convolution models of
    the Fashion CNN's and SmallResNet's 11 geometries at batch 4-64 (AVX-512 VNNI host, 2 threads;
    ``benchmarks/bench_compiled_conv.py``: the faster kernel in 51 of 55 cells, the others within 40 us).
    Exact either way:
    only speed depends on it. The same rule stands for AVX2 hosts (oneDNN's split form against float math)
    until one is measured there."""
    return positions * taps * max(channels, 16) >= MIN_OPERAND


def _output_sizes(conv: torch.nn.Module, in_sizes) -> list:
    """The output's spatial sizes of the converted convolution ``conv`` for input sizes ``in_sizes`` (ints or,
    while tracing with dynamic shapes, symbolic sizes)."""
    return [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(in_sizes, conv.kernel_size, conv.stride, conv._kernel_padding(), conv.dilation)
    ]


@torch.compiler.assume_constant_result
def _mode() -> str:
    """``hw.onednn_mode()``, a constant of the process for the tracer."""
    return hw.onednn_mode()


def conv2d(conv: torch.nn.Module, t: torch.Tensor) -> torch.Tensor | None:
    """In a graph being compiled: eq. 10 with the bias of the converted 2-d convolution ``conv`` for its
    quantized input ``t`` (fp32 integers, NCHW) by oneDNN, fp32 channels-last; ``None`` where the graph
    keeps its own ops: not on a CPU, a backend or bit width the eager layer would not run on oneDNN, no
    oneDNN, while exporting (the op is tied to this process), or a convolution where oneDNN is not faster
    (:func:`prefer_onednn`).

    The uint8 operand, written by the fused loop that quantizes: on VNNI hosts (full range) ``t + 128`` with
    zero point 128; on AVX2 (half range, where only u8 <= 127 is exact) the split ``[max(t, 0), max(-t, 0)]``
    along the channels with zero point 0, which the layer pairs with its ``[W, -W]`` weight (one convolution
    of twice the depth, exact; as the eager ``kernels.u8_operand``; one group only).
    """
    if t.device.type != "cpu" or conv.backend not in ("auto", "onednn", "fbgemm") or conv.bits > 8:
        return None
    mode = _mode()
    if torch.compiler.is_exporting() or mode == hw.UNAVAILABLE or (mode == hw.HALF_RANGE and conv.groups != 1):
        return None
    positions = t.shape[0]
    for size in _output_sizes(conv, t.shape[2:]):
        positions = positions * size
    if not prefer_onednn(positions, conv.kernel_size[0] * conv.kernel_size[1], conv.in_channels // conv.groups):
        return None
    if mode == hw.FULL_RANGE:
        u, zp, signed = t + 128, 128, False
    else:
        u, zp, signed = torch.cat([t.clamp(min=0), t.neg().clamp(min=0)], dim=1), 0, True
    return onednn_conv(u.to(torch.uint8).contiguous(memory_format=torch.channels_last), id(conv), zp, signed)


# Defined with torch.library's low-level API rather than ``custom_op``: its Python wrapper costs ~10 us a call
# (measured), which nine convolutions a forward pay; the op needs no autograd.
_LIB = torch.library.Library("lq", "FRAGMENT")
_LIB.define("onednn_conv(Tensor u, int layer, int zero_point, bool signed) -> Tensor")


def _onednn_conv_cpu(u: torch.Tensor, layer: int, zero_point: int, signed: bool) -> torch.Tensor:
    """Eq. 10 with the bias for the uint8 operand ``u`` (NCHW sizes, zero point ``zero_point``, ``signed``: the
    half-range split) of the converted conv whose ``id`` is ``layer`` (:func:`register`): fp32, channels-last."""
    hw.ran("Int8Conv2d", "onednn (compiled graph)")
    conv = _layer(layer)
    conv.sync_cache()  # (a scale replaced through _buffers: the graph quantizes with it, so must the pack)
    return conv.onednn_u8(u, zero_point, signed).contiguous(memory_format=torch.channels_last)


_LIB.impl("onednn_conv", _onednn_conv_cpu, "CPU")


@torch.library.register_fake("lq::onednn_conv", lib=_LIB)
def _(u: torch.Tensor, layer: int, zero_point: int, signed: bool) -> torch.Tensor:
    conv = _layer(layer)
    sizes = _output_sizes(conv, u.shape[2:])
    return u.new_empty((u.shape[0], conv.out_channels, *sizes), dtype=torch.float32).contiguous(
        memory_format=torch.channels_last
    )


#: ``lq::onednn_conv(u, id(layer), zero_point, signed)``
onednn_conv = torch.ops.lq.onednn_conv.default
