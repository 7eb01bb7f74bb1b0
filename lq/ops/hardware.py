"""What the int8 kernels of this machine compute exactly, and a one-time fallback warning.

oneDNN's int8 kernels multiply an unsigned 8-bit operand ``u`` by a signed 8-bit operand ``w``. With VNNI
(``vpdpbusd``: AVX512-VNNI, AVX-VNNI, AMX) the products go straight into int32 accumulators: exact for any
8-bit values. Without VNNI (plain AVX2 / AVX-512BW) the kernels use ``vpmaddubsw``, which adds two
neighbouring products into a *saturating int16*: ``u_a*w_a + u_b*w_b`` must stay within 32767, else the
result is silently wrong (measured here on an AVX2 EPYC: errors up to 1.7e5 on a 1024-deep dot product
with full-range operands). That is why torch's x86 qconfig uses ``reduce_range`` (7-bit activations).
Which case holds is not guessed from CPU flags: ``onednn_mode()`` runs oneDNN's int8 linear and conv
(dense and depthwise) once per process on worst-case operands and compares with exact float math.
``u8s8_exact`` encodes the rule on top of that; the training ops (``lq.ops``) and the converted inference
layers (``lq.deploy``) consult it and fall back to exact reference kernels otherwise.

``torch._int_mm`` on CPU is fast only with AVX-512 (VNNI); on AVX2 it is a scalar loop, ~75x slower
than fp32 ``mm`` on this machine, so the CPU GEMM kernel uses oneDNN's ``qlinear`` there instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
INT16_MAX = 32767
INT32_MAX = 2**31 - 1
#: fp32 represents every integer of magnitude <= 2^24 exactly.
FP32_EXACT_INT = 2**24

_warned: set[str] = set()

#: oneDNN accumulation modes found by :func:`onednn_mode`
FULL_RANGE = "full_range"  # u8 in [0, 255] x s8 exact (VNNI / AMX)
HALF_RANGE = "half_range"  # only u8 in [0, 127] x s8 exact (AVX2 vpmaddubsw saturates int16 pair sums)
UNAVAILABLE = "unavailable"  # no oneDNN int8 ops, or not even the half range is exact


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_has_vnni() -> bool:
    """True when the CPU flags list an int8 dot-product instruction (for reports; kernels decide by
    :func:`onednn_mode`, which measures what oneDNN actually computes)."""
    return any(flag in cpu_flags() for flag in _VNNI_FLAGS)


@functools.cache
def cpu_int_mm_is_fast() -> bool:
    """``torch._int_mm`` on CPU runs a VNNI kernel (AVX-512 + VNNI) rather than a scalar loop."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") and cpu_has_vnni()


def biased_u8_max(qmax: int) -> int:
    """Largest unsigned value of a symmetric int8 operand shifted by ``biased_zero_point(qmax)``."""
    return qmax + biased_zero_point(qmax)


def biased_zero_point(qmax: int) -> int:
    """Zero point used to shift a symmetric operand in ``[-qmax, qmax]`` into uint8.

    7-bit data (``qmax <= 63``) get 64, so ``u`` stays within [1, 127] and the int16 pair sums of
    ``vpmaddubsw`` cannot saturate even against full-range int8 weights (2 * 127 * 127 = 32258). 8-bit data
    get 128 (a sign-bit flip, ``u`` in [1, 255]).
    """
    return 64 if qmax <= 63 else 128


def to_biased_u8(q: torch.Tensor, qmax: int) -> tuple[torch.Tensor, int]:
    """Shift int8 ``q`` in ``[-qmax, qmax]`` to uint8 ``u = q + zp`` (oneDNN wants uint8 activations).

    oneDNN's int8 convolution/matmul take an *unsigned* source with a zero point and a signed weight; a
    symmetric int8 tensor becomes such a source without any change of value: ``q = u - zp``.
    """
    zp = biased_zero_point(qmax)
    if zp == 128:
        return q.view(torch.uint8).bitwise_xor(128), zp  # q + 128 in two's complement
    return (q + zp).view(torch.uint8), zp  # no int8 overflow: |q| <= 63


def u8s8_exact(u_qmax: int, s_qmax: int) -> bool:
    """Whether oneDNN computes ``sum (u - zp) * w`` exactly for u from a ``u_qmax`` operand, |w| <= s_qmax."""
    mode = onednn_mode()
    if mode == FULL_RANGE:
        return True
    return mode == HALF_RANGE and 2 * biased_u8_max(u_qmax) * s_qmax <= INT16_MAX


def onednn_available() -> bool:
    """True if this torch build has oneDNN's int8 linear/conv ops (the CPU fast path)."""
    ops = torch.ops.onednn
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(ops, n) for n in ("qlinear_prepack", "qlinear_pointwise", "qconv_prepack", "qconv_pointwise")
        )
    except Exception:  # noqa: BLE001 - an op namespace that fails to load means "not available"
        return False


def _selftest_linear(u_max: int, zero_point: int) -> bool:
    m, k, n = 4, 64, 16
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[n // 2 :] = -127
    u = torch.full((m, k), u_max, dtype=torch.uint8)
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    ones = torch.ones(n)
    y = torch.ops.onednn.qlinear_pointwise(
        u, 1.0, zero_point, packed, ones, torch.zeros(n, dtype=torch.int64), None, 1.0, 0, torch.float32, "none", [], ""
    )
    ref = (u.double() - zero_point) @ w.double().t()
    return bool(torch.equal(y.double(), ref))


def _selftest_conv(u_max: int, zero_point: int) -> bool:
    results = []
    for groups, cin, cout in ((1, 32, 16), (16, 16, 16)):  # dense and depthwise kernels differ in oneDNN
        w = torch.full((cout, cin // groups, 3, 3), 127, dtype=torch.int8)
        w[cout // 2 :] = -127
        u = torch.full((2, cin, 6, 6), u_max, dtype=torch.uint8)
        ones = torch.ones(cout)
        packed = torch.ops.onednn.qconv_prepack(w, ones, 1.0, zero_point, [1, 1], [0, 0], [1, 1], groups, None)
        y = torch.ops.onednn.qconv_pointwise(
            u, 1.0, zero_point, packed, ones, torch.zeros(cout, dtype=torch.int64), None,
            [1, 1], [0, 0], [1, 1], groups, 1.0, 0, torch.float32, "none", [], "",
        )
        ref = F.conv2d(u.double() - zero_point, w.double(), groups=groups)
        results.append(bool(torch.equal(y.double(), ref)))
    return all(results)


@functools.cache
def onednn_mode() -> str:
    """How oneDNN's u8 x s8 kernels accumulate on this CPU, found by running worst-case operands once.

    Returns ``"full_range"`` (u8 values up to 255 are exact: VNNI/AMX), ``"half_range"`` (only u8 values
    up to 127 are exact: AVX2 without VNNI, where ``vpmaddubsw`` saturates at int16) or ``"unavailable"``
    (no oneDNN, or not even the half range is exact: the reference kernels are used).
    """
    if not onednn_available():
        return UNAVAILABLE
    try:
        if _selftest_linear(255, 128) and _selftest_conv(255, 128):
            mode = FULL_RANGE
        elif _selftest_linear(127, 0) and _selftest_conv(127, 0):
            mode = HALF_RANGE
        else:
            mode = UNAVAILABLE
    except Exception as err:  # noqa: BLE001 - any failure of the ops means "do not use them"
        log.info("lq: oneDNN int8 self-test failed (%s); using reference int8 kernels", err)
        mode = UNAVAILABLE
    log.info("lq: oneDNN int8 mode on this CPU: %s", mode)
    return mode


@dataclasses.dataclass(frozen=True)
class OnednnConvPlan:
    """How to run one convolution on oneDNN's int8 kernel so that it is exact (see :func:`onednn_conv_plan`).

    ``pre_pad``: ``F.pad`` widths to apply to the u8 input with its zero point first (``None``: none);
    ``stride`` / ``padding``: what to give oneDNN; ``keep``: the slice of its output to keep (``None``: all).
    """

    stride: list[int]
    padding: list[int]
    pre_pad: list[int] | None
    keep: tuple[slice, ...] | None

    def finish(self, y: "torch.Tensor") -> "torch.Tensor":
        return y if self.keep is None else y[self.keep].clone(memory_format=torch.preserve_format)


def onednn_conv_plan(
    in_sizes: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> OnednnConvPlan:
    """Route around the shape classes where oneDNN's u8 x s8 convolution returns wrong values, with the same
    numbers. Both were found by ``tests/test_kernels_differential.py`` on the AVX-512 VNNI host:

    * an output size of 1 with a stride > 1 along that dimension (e.g. a (1, 5) kernel, stride (1, 2), on a
      width-5 input; dense and grouped): with one output position the stride does not matter, so run
      stride 1 there and keep position 0 (a few extra columns, fewer than one stride);
    * an output window whose taps all fall in the padding (wide padding, or dilation stepping over a short
      input; garbage there, seen with one input channel per group): pad the input explicitly with the
      zero point (= real 0) and run without padding.

    Cached per geometry: converted models call this on every forward.
    """
    return _onednn_conv_plan(tuple(in_sizes), tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))


def _window_in_padding(n: int, k: int, s: int, p: int, d: int) -> bool:
    """Whether some output position's taps ``o*s - p + j*d`` (j < k) all miss the input ``[0, n)``."""
    out = (n + 2 * p - d * (k - 1) - 1) // s + 1
    return any(not any(0 <= o * s - p + j * d < n for j in range(k)) for o in range(out))


@functools.lru_cache(maxsize=4096)
def _onednn_conv_plan(in_sizes, kernel, stride, padding, dilation) -> OnednnConvPlan:
    dims = len(in_sizes)
    new_stride, new_padding, keep = list(stride), list(padding), [slice(None), slice(None)]
    pre_pad = None
    if any(a[3] > 0 and _window_in_padding(*a) for a in zip(in_sizes, kernel, stride, padding, dilation)):
        pre_pad = [v for p in reversed(padding) for v in (p, p)]
        in_sizes = [n + 2 * p for n, p in zip(in_sizes, padding)]
        new_padding = [0] * dims
    for i in range(dims):
        n, k, s, p, d = in_sizes[i], kernel[i], stride[i], new_padding[i], dilation[i]
        single = s > 1 and (n + 2 * p - d * (k - 1) - 1) // s + 1 == 1
        new_stride[i] = 1 if single else s
        keep.append(slice(0, 1) if single else slice(None))
    changed = any(k != slice(None) for k in keep)
    return OnednnConvPlan(new_stride, new_padding, pre_pad, tuple(keep) if changed else None)


def max_exact_reduction(a_max: int, b_max: int) -> int:
    """Longest reduction whose int32 accumulator cannot overflow: ``a_max * b_max * K <= 2^31 - 1``.

    127 * 127 -> K <= 133,144; for oneDNN's biased uint8 operand (up to 255) * 127 -> K <= 66,313.
    """
    return max(1, INT32_MAX // max(1, a_max * b_max))


def warn_once(key: str, message: str) -> None:
    """``warnings.warn`` the first time ``key`` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


#: active :func:`record_kernels` lists (empty: recording costs one truthiness test per kernel call)
_RECORDERS: list[list[str]] = []


@contextlib.contextmanager
def record_kernels() -> Iterator[list[str]]:
    """Record which kernel each int8 op ran while the block is active, as ``"op:kernel"`` strings in call order.

    ``with record_kernels() as ran: lq.ops.int8_mm(...)`` then ``ran == ["int8_mm:int_mm"]`` (or
    ``"int8_mm:onednn"``, ``"int8_mm:reference"``, ...). Tests use it to assert that the fast kernel a host
    should use actually ran -- a differential test that silently compared the reference with itself could
    never fail -- and users can use it to see where their shapes fall back.
    """
    ran: list[str] = []
    _RECORDERS.append(ran)
    try:
        yield ran
    finally:
        _RECORDERS.remove(ran)


_LOCAL = threading.local()


@contextlib.contextmanager
def recording_suspended() -> Iterator[None]:
    """Kernels run in this thread inside the block are not recorded (a probe the library runs for itself, not a
    call of the user's model); other threads record as usual."""
    before = getattr(_LOCAL, "suspended", False)
    _LOCAL.suspended = True
    try:
        yield
    finally:
        _LOCAL.suspended = before


def ran(op: str, kernel: str) -> None:
    """Note that ``op`` ran ``kernel`` (for :func:`record_kernels`; a no-op when nothing records)."""
    if _RECORDERS and not getattr(_LOCAL, "suspended", False):
        for log_ in _RECORDERS:
            log_.append(f"{op}:{kernel}")


def reset_warnings() -> None:
    """Forget which fallback warnings were shown (tests)."""
    _warned.clear()
