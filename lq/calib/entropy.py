"""Entropy calibration (Wu et al. 2020, Section 3.4 "Entropy"; TensorRT's default, Migacz 2017).

Choose the clipping threshold that minimises the KL divergence between the distribution of ``|x|`` and its
int8-quantized version, searched on a histogram. TensorRT's algorithm (GTC 2017, "8-bit Inference with
TensorRT"), for a histogram ``H`` of ``|x|`` with ``B`` bins and ``n = 2^(b-1)`` quantization levels
(128 for int8), for every candidate ``i`` in ``[n, B]`` (clip after bin ``i - 1``):

1. reference ``P = H[:i]`` with the clipped mass ``sum(H[i:])`` added to its last bin ``P[i-1]``;
2. candidate ``Q``: ``H[:i]`` merged into ``n`` levels (bin ``j`` belongs to level ``floor(j n / i)``), each
   level's mass spread evenly back over the bins of that level where ``P`` is non-zero (empty bins stay 0);
3. ``KL(P || Q)`` with both normalised; the threshold is the edge ``i * bin_width`` of the best ``i``.

Two details follow the open reimplementations of the same algorithm:

- When the clipped mass lands in bin ``i - 1`` of a level that holds no other mass, ``Q`` is 0 where ``P`` is
  not and the divergence is infinite, so a sparse outlier tail could never be clipped. As MXNet / ONNX
  Runtime / TVM do (they smooth ``Q`` with ``eps = 1e-4`` counts), ``Q`` gets a floor of ``Q_FLOOR`` counts there.
- ``ignore_zero_bin`` (default on) replaces ``H[0]`` by ``H[1]`` as NVIDIA's pytorch-quantization does: exact
  zeros (half of every post-ReLU tensor) quantize without error, but left in bin 0 their spike dominates the
  divergence and drags the threshold down to the smallest candidate.

The search over all candidates is vectorised with prefix sums: every sum over a level is a difference of
cumulative sums, so the whole search costs ``O(B * n)`` tensor work (a few ms for 2048 bins), done in about
eight chunks of candidates rather than a Python loop over 1921 of them.
"""

from __future__ import annotations

import logging

import torch

from lq.calib._small_ops import GRAIN_SIZE, safe_log, take
from lq.quant.functional import check_bits

logger = logging.getLogger(__name__)

#: Smoothing floor (in histogram counts) for ``Q`` where ``P`` has mass and ``Q`` has none (see module doc).
Q_FLOOR = 1e-4


def _as_hist(hist: torch.Tensor) -> torch.Tensor:
    hist = torch.as_tensor(hist)
    if hist.dim() != 1 or hist.numel() == 0:
        raise ValueError(f"expected a 1-D histogram, got shape {tuple(hist.shape)}")
    hist = hist.detach().to(torch.float64)
    if bool((hist < 0).any()) or not bool(torch.isfinite(hist).all()):
        raise ValueError("histogram counts must be finite and non-negative")
    return hist


def kl_divergences(
    hist: torch.Tensor, bits: int = 8, *, ignore_zero_bin: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(P_i || Q_i)`` for every candidate clip ``i`` in ``[2^(b-1), B]`` (TensorRT's search, see module doc).

    Returns ``(candidates, divergences)``: int64 and float64 tensors of length ``B - 2^(b-1) + 1`` (empty when
    the histogram has fewer bins than levels). ``inf`` marks an impossible candidate (no mass inside it).
    """
    h = _as_hist(hist)
    n = 2 ** (check_bits(bits) - 1)
    num_bins = h.numel()
    device = h.device
    if num_bins < n:
        empty = torch.empty(0, device=device)
        return empty.long(), empty.double()
    if ignore_zero_bin and num_bins > 1:
        h = h.clone()
        h[0] = h[1]

    zero = torch.zeros(1, dtype=torch.float64, device=device)
    cum = torch.cat([zero, h.cumsum(0)])  # cum[k] = sum(h[:k])
    nz = (h > 0).double()
    cum_nz = torch.cat([zero, nz.cumsum(0)])  # number of non-empty bins in h[:k]
    hlogh = h * safe_log(h)
    cum_hlogh = torch.cat([zero, hlogh.cumsum(0)])
    total = cum[-1]
    if float(total) <= 0:
        cand = torch.arange(n, num_bins + 1, device=device)
        return cand, torch.full(cand.shape, float("inf"), dtype=torch.float64, device=device)

    cand = torch.arange(n, num_bins + 1, device=device)  # (K,) candidate i: keep bins [0, i)
    kept = take(cum, cand)  # sum(H[:i]); Q is normalised by it
    tail = total - kept  # the clipped mass, added to P[i-1]
    h_last = take(h, cand - 1)
    p_last = (h_last + tail) / total
    # P is non-zero at i-1 even where H is empty (the outliers): Q spreads the last level over that bin too.
    extra = ((h_last == 0) & (tail > 0)).double()
    safe_kept = kept.clamp_min(torch.finfo(torch.float64).tiny)

    # The (candidates x levels) part, in chunks below torch's grain size: each op then runs on the calling
    # thread (see lq.calib._small_ops for why that matters).
    levels = torch.arange(n + 1, device=device)
    mass_log_q = torch.empty_like(kept)  # sum over levels of mass * log q
    q_last = torch.empty_like(kept)  # q of the level holding bin i-1 (always the last level)
    rows = max(1, GRAIN_SIZE // (n + 1))
    for start in range(0, cand.numel(), rows):
        sl = slice(start, start + rows)
        # Level g of candidate i covers bins [ceil(g i / n), ceil((g+1) i / n)): the j with floor(j n / i) == g.
        bounds = (levels[None, :] * cand[sl, None] + n - 1) // n  # (R, n + 1); bounds[:, n] == i
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        mass = take(cum, hi) - take(cum, lo)  # (R, n): H mass of each level (without the clipped outliers)
        count = take(cum_nz, hi) - take(cum_nz, lo)  # (R, n): non-empty bins of P in each level
        count[:, -1] += extra[sl]
        q = torch.where(mass > 0, mass / (count.clamp_min(1) * safe_kept[sl, None]), torch.zeros_like(mass))
        log_q = safe_log(q)
        mass_log_q[sl] = (mass * log_q).sum(dim=1)
        q_last[sl] = q[:, -1]
    # The smoothing floor: the clipped mass fell into a level with no mass of its own.
    log_q_last = safe_log(torch.where(q_last > 0, q_last, Q_FLOOR / safe_kept))

    log_total = safe_log(total)
    # sum_{j < i-1} P_j log P_j, with P_j = H_j / T
    ent_inner = (take(cum_hlogh, cand - 1) - take(cum, cand - 1) * log_total) / total
    ent_last = p_last * safe_log(p_last)
    # sum_{j < i-1, H_j > 0} P_j log Q_j: each level contributes mass * log q, minus bin i-1's own share.
    cross_inner = (mass_log_q - h_last * safe_log(q_last)) / total
    cross_last = torch.where(p_last > 0, p_last * log_q_last, torch.zeros_like(p_last))
    kl = ent_inner + ent_last - cross_inner - cross_last
    kl = torch.where(kept > 0, kl, torch.full_like(kl, float("inf")))
    return cand, kl


def entropy_amax(
    hist: torch.Tensor, bin_width: float | torch.Tensor, bits: int = 8, *, ignore_zero_bin: bool = True
) -> torch.Tensor:
    """TensorRT's KL-divergence threshold for a histogram of ``|x|`` (bins of width ``bin_width`` from 0).

    Returns a 0-d fp32 tensor on the histogram's device: ``i * bin_width`` for the candidate ``i`` in
    ``[2^(b-1), B]`` with the smallest ``KL(P || Q)`` (ties go to the larger ``i``: less clipping). When all
    the mass lies in at most ``2^(b-1)`` bins (or the histogram has fewer bins than that), no clipping can
    reduce rounding error and the answer is the upper edge of the last non-empty bin. An empty histogram
    gives 0.
    """
    h = _as_hist(hist)
    width = float(bin_width)
    n = 2 ** (check_bits(bits) - 1)
    nonzero = torch.nonzero(h > 0).flatten()
    if nonzero.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=h.device)
    last = int(nonzero[-1])
    if last + 1 <= n or h.numel() < n:
        logger.debug("entropy calibration: mass in %d bins <= %d levels, keeping the max edge", last + 1, n)
        return torch.tensor((last + 1) * width, dtype=torch.float32, device=h.device)
    cand, kl = kl_divergences(h, bits, ignore_zero_bin=ignore_zero_bin)
    best = kl.min()
    # The last argmin: among equal divergences prefer the larger range (less clipping).
    k = int(torch.nonzero(kl == best).flatten()[-1])
    return torch.tensor(int(cand[k]) * width, dtype=torch.float32, device=h.device)
