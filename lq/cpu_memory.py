"""Keep freed CPU memory in the process heap, so quantized training does not pay page faults every step.

Fake quantization (and int8 compute) adds a few large tensors per layer and step: the quantized activation
and the STE mask saved for backward, temporaries of the quantize passes. glibc's ``malloc`` serves blocks
above its mmap threshold (128 KiB, growing dynamically up to 32 MiB) with fresh ``mmap``s and gives them
back with ``munmap`` when freed, so each step touches fresh pages: on this project's 2-core VM that costs
more than the arithmetic of the quantization itself. Measured (``benchmarks/bench_fake_quant.py``, SmallResNet
QAT step vs fp32 step, interleaved, 2 threads): 1.29-1.36x fp32 with glibc's defaults, 1.13-1.15x with the
settings below (the fp32 step itself is unchanged within noise). This is the same remedy as the CPU
performance guides' advice to preload jemalloc/tcmalloc, done in-process with ``mallopt``:

* ``M_MMAP_THRESHOLD = 32 MiB`` (glibc's maximum): blocks up to 32 MiB come from the heap and are reused;
* ``M_MMAP_MAX = 0``: larger blocks too (the main thread's heap serves them instead of an ``mmap`` each; glibc
  still maps a block its heap cannot grow for, and other threads' arenas keep their own rules). An int8
  transformer's 48 MiB fp32 activations faulted in fresh every step: MiniLM's int8 step 2090 -> 1238 ms, bf16
  autocast 1759 -> 1671 (its activations are half the size and stayed under 32 MiB); 2-core AVX-512 host,
  RESULTS.md 2026-11-30 seventh session;
* ``M_TRIM_THRESHOLD = 1 GiB``: free memory at the top of the heap is not returned to the OS after each step.

The cost is that the process keeps up to its peak heap usage (as PyTorch's CUDA caching allocator does on
GPU). These are process-wide settings, so lq never changes them unless asked: the callbacks take
``cpu_malloc=True`` (the recipes in ``conf/quant`` pass it) and then call :func:`keep_freed_cpu_memory` in
``setup`` when the trainer runs on CPU and :func:`release_freed_cpu_memory` at ``teardown`` (or on an
exception). Holders are counted: the settings go in with the first holder and are restored when the last one
lets go, so one trainer's teardown does not undo them under another trainer that is still running.

glibc has no getter for these parameters, so "restored" means glibc's documented defaults
(``M_MMAP_THRESHOLD`` = ``M_TRIM_THRESHOLD`` = 128 KiB, ``M_MMAP_MAX`` = 65536). One difference stays: any
``mallopt`` of either threshold switches off glibc's dynamic mmap threshold (which otherwise grows with the
sizes freed) for the rest of the process; after the restore the thresholds stay fixed at 128 KiB. That lasting
change is why this is opt-in. The environment variable ``LQ_CPU_MALLOC=0`` is a hard opt-out (wins over
``cpu_malloc=True``). A no-op where the C library is not glibc (macOS, Windows, musl) or jemalloc/tcmalloc is
preloaded (their own caching applies).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import threading

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024
# glibc's documented defaults (mallopt(3)); glibc has no getter, so these are what a restore sets
DEFAULT_MMAP_THRESHOLD = 128 * 1024
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536


def enabled() -> bool:
    """False when the environment says ``LQ_CPU_MALLOC=0`` (a hard opt-out, whatever the callbacks ask)."""
    return os.environ.get("LQ_CPU_MALLOC", "1") != "0"


def _libc() -> ctypes.CDLL | None:
    """glibc, or None where the settings do not apply (not glibc, or jemalloc/tcmalloc preloaded)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt(libc: ctypes.CDLL, mmap_threshold: int, trim_threshold: int, mmap_max: int) -> bool:
    try:
        return (bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
                and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
                and bool(libc.mallopt(_M_MMAP_MAX, mmap_max)))
    except AttributeError:  # a C library without mallopt
        return False


_lock = threading.Lock()
_holders = 0  # callers of keep_freed_cpu_memory() that got True and have not released yet


def holders() -> int:
    """How many holders keep the settings in effect now (0: glibc's defaults, or never changed)."""
    return _holders


def keep_freed_cpu_memory() -> bool:
    """Apply the ``mallopt`` settings above (with the first holder) and count the caller as a holder.

    Returns whether the settings are in effect; only then must the caller later call
    :func:`release_freed_cpu_memory` once. False, and nothing changed, with ``LQ_CPU_MALLOC=0``, where the C
    library is not glibc, or when ``mallopt`` refused (then glibc's defaults are put back).
    """
    global _holders
    if not enabled():
        return False
    with _lock:
        if _holders == 0:
            libc = _libc()
            if libc is None:
                return False
            if not _mallopt(libc, MMAP_THRESHOLD, TRIM_THRESHOLD, 0):
                _mallopt(libc, DEFAULT_MMAP_THRESHOLD, DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX)
                return False
            log.info("lq: glibc malloc keeps freed blocks for reuse (until the last lq callback using "
                     "cpu_malloc=True tears down)")
        _holders += 1
        return True


def release_freed_cpu_memory() -> None:
    """One holder lets go; the last one restores glibc's documented defaults (128 KiB thresholds, which stay
    fixed: see the module docstring). Raises ``RuntimeError`` when nobody holds the settings."""
    global _holders
    with _lock:
        if _holders == 0:
            raise RuntimeError(
                "release_freed_cpu_memory() without a matching keep_freed_cpu_memory() that returned True"
            )
        _holders -= 1
        if _holders == 0:
            libc = _libc()
            if libc is not None and _mallopt(libc, DEFAULT_MMAP_THRESHOLD, DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX):
                log.info("lq: glibc malloc thresholds restored to glibc's defaults (128 KiB)")
