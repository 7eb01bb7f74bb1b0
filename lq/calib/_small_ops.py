"""Helpers for the small fp64 computations on histograms (a few thousand to ~30k elements per op).

On CPU, torch runs some ops in an OpenMP parallel region whatever their size: advanced indexing
(``t[idx]``, ``torch.take``) and unary float ops such as ``log`` and ``floor``. When the other cores are
busy, each such region waits for a descheduled thread and a 30 us op takes ~15 ms, so a search of a few
hundred ops slows down 30x. ``index_select`` and binary TensorIterator ops (``xlogy``, ``where``, ``mul``)
stay on one thread below torch's grain size; the helpers below use only those.
"""

from __future__ import annotations

import torch

#: torch's intra-op grain size: TensorIterator ops on fewer elements run on the calling thread.
GRAIN_SIZE = 32768


def take(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``src[idx]`` for a 1-D ``src`` and an integer ``idx`` of any shape."""
    return src.index_select(0, idx.reshape(-1)).view(idx.shape)


def safe_log(v: torch.Tensor) -> torch.Tensor:
    """``log(v)`` where ``v > 0``, else 0 (so that ``v * safe_log(v)`` follows ``0 log 0 = 0``)."""
    return torch.xlogy(torch.ones_like(v), torch.where(v > 0, v, torch.ones_like(v)))


def floor_nonneg(v: torch.Tensor) -> torch.Tensor:
    """``floor(v)`` for ``v >= 0`` (int64), by truncation."""
    return v.to(torch.int64)
