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
* ``M_TRIM_THRESHOLD = 1 GiB``: free memory at the top of the heap is not returned to the OS after each step.

The cost is that the process keeps up to its peak heap usage (as PyTorch's CUDA caching allocator does on
GPU). The lq callbacks call :func:`keep_freed_cpu_memory` when they train or calibrate on CPU; set the
environment variable ``LQ_CPU_MALLOC=0`` to leave the allocator alone. A no-op where the C library is not
glibc (macOS, Windows, musl) or jemalloc/tcmalloc is preloaded (their own caching applies).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024


def enabled() -> bool:
    return os.environ.get("LQ_CPU_MALLOC", "1") != "0"


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Apply the ``mallopt`` settings above once per process; returns whether they took effect."""
    if not enabled() or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False
    if ok:
        log.info("lq: glibc malloc keeps freed blocks up to 32 MiB for reuse (LQ_CPU_MALLOC=0 to disable)")
    return ok
