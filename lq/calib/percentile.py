"""Percentile calibration (Wu et al. 2020, Section 3.4 "Percentile"; Table 5 tries 99.9% ... 99.9999%).

amax is the ``p``-th percentile of ``|x|``: 99.99% calibration clips the 0.01% largest magnitudes. Read off the
cumulative histogram, linearly interpolated inside the bin where the cumulative count crosses ``p`` percent
(values are assumed uniform inside a bin), so the error is below one bin width.
"""

from __future__ import annotations

import torch


def check_percentile(percentile: float) -> float:
    """Validate a percentile in (0, 100] and return it as a float."""
    try:
        p = float(percentile)
    except (TypeError, ValueError):
        raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}") from None
    if not 0.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (0, 100] (e.g. 99.99 keeps 99.99% of |x|), got {percentile!r}")
    return p


def percentile_amax(hist: torch.Tensor, bin_width: float | torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile``-th percentile of a histogram of ``|x|`` (bins of width ``bin_width`` from 0).

    Returns a 0-d fp32 tensor on the histogram's device; 0 for an empty histogram. ``percentile=100`` gives
    the upper edge of the last non-empty bin.
    """
    p = check_percentile(percentile)
    h = torch.as_tensor(hist).detach().to(torch.float64).flatten()
    width = float(bin_width)
    cum = h.cumsum(0)
    total = float(cum[-1]) if cum.numel() else 0.0
    if total <= 0:
        return torch.zeros((), dtype=torch.float32, device=h.device)
    target = total * p / 100.0
    # First bin whose cumulative count reaches the target (it is non-empty: the cumulative count jumps there).
    k = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64, device=h.device))[0])
    k = min(k, h.numel() - 1)
    below = float(cum[k]) - float(h[k])
    frac = min(max((target - below) / float(h[k]), 0.0), 1.0) if float(h[k]) > 0 else 1.0
    return torch.tensor((k + frac) * width, dtype=torch.float32, device=h.device)
