"""What the int8 kernels of this machine compute exactly, and a one-time fallback warning.

oneDNN's int8 kernels multiply an unsigned 8-bit operand ``u`` by a signed 8-bit operand ``w``. With VNNI
(``vpdpbusd``: AVX512-VNNI, AVX-VNNI, AMX) the products go straight into int32 accumulators: exact for any
8-bit values. Without VNNI (plain AVX2 / AVX-512BW) the kernels use ``vpmaddubsw``, which adds two
neighbouring products into a *saturating int16*: ``u_a*w_a + u_b*w_b`` must stay within 32767, else the
result is silently wrong (measured here on an AVX2 EPYC: errors up to 1.7e5 on a 1024-deep dot product
with full-range operands). That is why torch's x86 qconfig uses ``reduce_range`` (7-bit activations).
``u8s8_exact`` encodes that rule; fast kernels consult it and fall back to the reference otherwise.

``torch._int_mm`` on CPU is fast only with AVX-512 (VNNI); on AVX2 it is a scalar loop, ~75x slower
than fp32 ``mm`` on this machine, so the CPU GEMM kernel uses oneDNN's ``qlinear`` there instead.
"""

from __future__ import annotations

import functools
import warnings

import torch

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
INT16_MAX = 32767
INT32_MAX = 2**31 - 1
#: fp32 represents every integer of magnitude <= 2^24 exactly.
FP32_EXACT_INT = 2**24

_warned: set[str] = set()


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
    """True when the CPU has an int8 dot-product instruction (products accumulate in int32, no saturation)."""
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
    if cpu_has_vnni():
        return True
    return 2 * biased_u8_max(u_qmax) * s_qmax <= INT16_MAX


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


def reset_warnings() -> None:
    """Forget which fallback warnings were shown (tests)."""
    _warned.clear()
