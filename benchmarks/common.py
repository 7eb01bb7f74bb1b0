"""Helpers shared by the benchmark scripts (each runs as ``python benchmarks/<name>.py``, which puts this
folder on ``sys.path``): interleaved median timing and an SGD training step."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, settle: int = 0
) -> dict[str, float]:
    """Median seconds of each callable, run in turn within every round so that background load hits all
    of them alike (``warmup`` untimed rounds first). ``settle``: untimed calls of the same callable right
    before each timed one, so it is not timed just after another variant (whose allocations leave glibc's
    heap in another state: the int8 Linear step timed right after bf16 autocast took ~2.5 ms more, whichever
    int8 variant came first, 2-core VNNI host)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            for _ in range(settle):
                fn()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def without_tile_kernels(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``LQ_TILE_UNIT=off`` (``lq/ops/amx.c``'s convolution kernels off: oneDNN and ``torch._int_mm``
    instead), the setting restored after each call, so one process can time both interleaved."""
    import os

    from lq.ops import native_quant

    def run() -> object:
        before = os.environ.get("LQ_TILE_UNIT")
        os.environ["LQ_TILE_UNIT"] = "off"
        native_quant.tile_unit.cache_clear()
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["LQ_TILE_UNIT"]
            else:
                os.environ["LQ_TILE_UNIT"] = before
            native_quant.tile_unit.cache_clear()

    return run


def median_time(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    return interleaved({"fn": fn}, repeats, warmup)["fn"]


def train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, momentum: float = 0.0, autocast: bool = False,
    saved_int8_qmax: int | None = None,
) -> Callable[[], None]:
    """One forward + cross-entropy backward + SGD (lr 1e-3) step on ``(x, y)``, as a callable;
    ``autocast`` runs the forward under CPU bf16 autocast; ``saved_int8_qmax``: the forward keeps its saved
    activations as int8 (``lq.ops.saved_int8``, as ``Int8Training(int8_saved=True)`` does)."""
    import contextlib

    from lq.ops.saved_int8 import int8_saved_activations

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=momentum)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        saving = int8_saved_activations(saved_int8_qmax) if saved_int8_qmax else contextlib.nullcontext()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), saving:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def add_cpu_malloc_flag(ap) -> None:
    """``--cpu-malloc``: run every variant with glibc keeping freed blocks for reuse (``lq.cpu_memory``, what the
    recipes' ``cpu_malloc: true`` does in a training run); off by default (glibc's own behaviour)."""
    ap.add_argument("--cpu-malloc", action="store_true",
                    help="glibc keeps freed blocks for reuse for every variant (lq.cpu_memory; the recipes' setting)")


def apply_cpu_malloc(args) -> str:
    """Apply ``--cpu-malloc`` (process-wide, so fp32, bf16 and int8 alike); returns a line saying which malloc ran."""
    if not getattr(args, "cpu_malloc", False):
        return "malloc: glibc defaults (fresh pages for blocks above its mmap threshold)"
    from lq import cpu_memory

    on = cpu_memory.keep_freed_cpu_memory()
    if not on:
        return "malloc: --cpu-malloc not applicable here"
    return "malloc: lq.cpu_memory keeps freed blocks (--cpu-malloc)"
