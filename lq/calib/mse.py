"""MSE calibration: the amax that minimises the mean squared quantization error of ``|x|``.

Not one of the paper's three methods (Section 3.4), but the usual fourth one (NVIDIA pytorch-quantization's
``method="mse"``; the paper's Section 3.4 trade-off made explicit): clipping trades a large error on a few
outliers for a smaller rounding error on the inliers, and MSE weighs the two directly.

For every candidate amax on a bin edge ``a = i * bin_width`` the expected squared error of fake quantization
(eq. 12, step ``Delta = a / (2^(b-1) - 1)``) is evaluated over the histogram with the values of each bin
spread uniformly over the bin (a finer model than the bin centre alone, which aliases with the quantization
grid when ``Delta`` is a few bins wide):

- values in ``[0, a]`` round to the nearest ``k Delta``: quantization cell ``k`` (``|x - k Delta| <= Delta / 2``)
  contributes ``int (x - k Delta)^2 dN = M2 - 2 k Delta M1 + (k Delta)^2 M0`` with ``M_p`` the p-th moment of
  the histogram over the cell;
- values beyond ``a`` are clipped to ``a``: ``M2 - 2 a M1 + a^2 M0`` over ``[a, R)``.

With a piecewise-constant density every ``M_p`` over any interval is a difference of a cumulative moment
function (prefix sums over whole bins plus the part of one bin), so each candidate costs ``O(2^(b-1))``: the
search is ``O(B * 2^(b-1))`` tensor work, independent of how many values were collected, in fp64.
"""

from __future__ import annotations

import torch

from lq.calib._small_ops import GRAIN_SIZE, floor_nonneg, take
from lq.quant.functional import qmax



def _cumulative_moments(h: torch.Tensor) -> list[torch.Tensor]:
    """``C_p[j] = int_0^j x^p dN`` at the bin edges (bin units), p = 0, 1, 2; density ``h[t]`` on ``[t, t+1)``."""
    t = torch.arange(h.numel(), dtype=torch.float64, device=h.device)
    zero = torch.zeros(1, dtype=torch.float64, device=h.device)
    t1 = t + 1
    per_bin = (h, h * (t1 * t1 - t * t) / 2, h * (t1 * t1 * t1 - t * t * t) / 3)
    return [torch.cat([zero, v.cumsum(0)]) for v in per_bin]


def _moments_at(cum: list[torch.Tensor], h: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    """``int_0^x t^p dN`` for p = 0, 1, 2 at real ``x`` in ``[0, B]`` (bin units): whole bins + part of one."""
    jl = floor_nonneg(x).clamp_(0, h.numel() - 1)
    j = jl.to(x.dtype)
    hj = take(h, jl)
    x2, j2 = x * x, j * j
    return [
        take(cum[0], jl) + hj * (x - j),
        take(cum[1], jl) + hj * (x2 - j2) / 2,
        take(cum[2], jl) + hj * (x2 * x - j2 * j) / 3,
    ]


def mse_errors(hist: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected squared error (squared bin widths, summed over the counts) for each candidate amax of ``i`` bins.

    Candidates are ``i = 1 .. last + 1`` (``last``: the last non-empty bin; beyond it nothing is clipped and
    the rounding error only grows). Returns ``(candidates, errors)``; both empty for an empty histogram.
    """
    h = torch.as_tensor(hist).detach().to(torch.float64).flatten()
    q = qmax(bits)
    nonzero = torch.nonzero(h > 0).flatten()
    if nonzero.numel() == 0:
        empty = torch.empty(0, device=h.device)
        return empty.long(), empty.double()
    last = int(nonzero[-1])
    h = h[: last + 1]  # nothing beyond the last non-empty bin
    cum = _cumulative_moments(h)
    total = [c[-1] for c in cum]
    cand = torch.arange(1, last + 2, device=h.device)
    k = torch.arange(q + 1, dtype=torch.float64, device=h.device)  # quantization levels 0 .. qmax
    edges = torch.arange(q + 2, dtype=torch.float64, device=h.device) - 0.5  # cell k is [k - 1/2, k + 1/2) steps
    errors = torch.empty(cand.numel(), dtype=torch.float64, device=h.device)
    # Chunks below torch's grain size keep every op on the calling thread (see lq.calib._small_ops).
    rows = max(1, GRAIN_SIZE // (q + 2))
    for start in range(0, cand.numel(), rows):
        a = cand[start : start + rows].double()  # (R,) amax in bin widths
        step = (a / q)[:, None]
        # Cell boundaries clipped to [0, a]; consecutive cells share them, so each moment is one difference.
        bounds = torch.minimum((edges[None, :] * step).clamp_(min=0.0), a[:, None])  # (R, q + 2)
        m0, m1, m2 = (torch.diff(v, dim=1) for v in _moments_at(cum, h, bounds))  # (R, q + 1) per cell
        centre = k[None, :] * step
        # sum over cells of int (x - c_k)^2 dN = M2 - 2 c_k M1 + c_k^2 M0; the M2 terms sum to M2 over [0, a].
        rounding = m2.sum(dim=1) + (centre * (centre * m0 - 2.0 * m1)).sum(dim=1)
        # a is a bin edge: the clipped part is a difference of whole-bin prefix sums.
        ai = a.long()
        c0, c1, c2 = (total[p] - take(cum[p], ai) for p in range(3))
        clipping = c2 - 2.0 * a * c1 + a * a * c0
        errors[start : start + a.numel()] = rounding + clipping
    return cand, errors

def mse_amax(hist: torch.Tensor, bin_width: float | torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The bin edge ``a`` minimising the expected ``(x - fake_quant(x, a))^2`` over a histogram of ``|x|``.

    Returns a 0-d fp32 tensor on the histogram's device (0 for an empty histogram).
    """
    h = torch.as_tensor(hist).detach()
    width = float(bin_width)
    cand, errors = mse_errors(h, bits)
    if cand.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=h.device)
    k = int(torch.argmin(errors))
    return torch.tensor(int(cand[k]) * width, dtype=torch.float32, device=h.device)
