"""Histogram calibration: one streaming histogram of ``|x|`` serves entropy, percentile, mse and max
(Wu et al. 2020, Section 3.4; Table 5 compares them on the same calibration data).

The histogram covers ``[0, R)`` with ``num_bins`` equal bins, and ``R`` is always a power of two:
``R = 2^e`` with ``e`` the smallest integer such that ``max |x| < 2^e`` (``torch.frexp``). When a batch has a
larger maximum the range grows to ``2^(e + k)``; every new bin is then exactly ``2^k`` adjacent old bins,
which are merged by an integer shift of the bin index: counts are preserved exactly, nothing is
interpolated, and the result equals binning all the data at the final range at once (exactly so when
``num_bins`` is a power of two: the bin index is then an exact ``floor(x * 2^(log2(B) - e))`` in fp32). The same
merge brings the histograms of all DDP ranks to their common (largest) range in ``sync()`` before the counts
are summed.

Per channel the counts are a ``(C, num_bins)`` matrix with one power-of-two range per channel (weights whose
channels differ 100x in scale, e.g. after BN folding, keep full resolution in every channel); one
bincount over the flat index ``c * num_bins + bin`` fills all channels at once.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from lq.calib.base import (
    Calibrator,
    abs_max,
    collecting,
    comm_device,
    raise_not_finite,
    sync_header,
)
from lq.calib.entropy import entropy_amax
from lq.calib.mse import mse_amax
from lq.calib.percentile import check_percentile, percentile_amax
from lq.quant.functional import check_bits

logger = logging.getLogger(__name__)

#: The ways to read an amax off the histogram.
METHODS = ("entropy", "percentile", "mse", "max")

#: Smallest range exponent: maxima below 2^-100 (and all-zero channels) share the range [0, 2^-100).
#: Keeps ``num_bins * 2^-e`` finite in fp32.
MIN_EXPONENT = -100
MAX_BINS = 1 << 20

# Bin index without a second large allocation: an fp32 holding an integer k in [0, 2^23) plus 2^23 has the
# bit pattern 0x4B000000 + k, so the float buffer is reinterpreted as int32 and shifted in place.
_MAGIC = float(1 << 23)
_MAGIC_BITS = 0x4B000000


def _bin_index_(a: torch.Tensor, inv_width: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Turn ``a`` (fp32, ``>= 0``, owned by the caller) in place into ``min(floor(a * inv_width), B - 1)``.

    Returns an int32 view of the same memory (no extra allocation: on CPU a fresh multi-MB tensor costs as
    much as the arithmetic itself). ``a < 2^e`` and ``inv_width = B / 2^e``, so for a power-of-two ``B`` the
    product is exact and below ``B``: the clamp is needed only for other bin counts (fp32 rounding).
    """
    a.mul_(inv_width).floor_()
    if num_bins & (num_bins - 1):
        a.clamp_(max=num_bins - 1)
    return a.add_(_MAGIC).view(torch.int32).sub_(_MAGIC_BITS)


_scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _bin_index_scratch(x: torch.Tensor, inv_width: torch.Tensor, num_bins: int, nonneg: bool = False) -> torch.Tensor:
    """``min(floor(|x| * inv_width), B - 1)`` as int32, computed in scratch buffers kept between calls
    (``release_scratch()`` frees them; ``lq.calibrate`` does at its end). Three passes: scale, abs (skipped
    when ``nonneg``: every ``x >= 0``), and the float -> int32 conversion, whose truncation is ``floor`` for
    values >= 0. Exactly ``_bin_index_`` of ``|x|``: ``|x| * w == |x * w|`` for ``w > 0``."""
    n = x.numel()
    buf = _scratch.get(x.device)
    if buf is None or buf[0].numel() < n:
        buf = _scratch[x.device] = (  # ordinary tensors: collect runs outside inference mode (@collecting)
            torch.empty(n, dtype=torch.float32, device=x.device),
            torch.empty(n, dtype=torch.int32, device=x.device),
        )
    f, i = buf[0][:n].view(x.shape), buf[1][:n].view(x.shape)
    torch.mul(x, inv_width, out=f)
    if not nonneg:
        f.abs_()
    if num_bins & (num_bins - 1):
        f.clamp_(max=num_bins - 1)
    return i.copy_(f)


def _count_into(counts: torch.Tensor, idx: torch.Tensor) -> None:
    """``counts[idx[i]] += 1`` for every ``i`` (exact): the bincount accumulated straight into the counts
    (``index_add_`` skips bincount's min/max passes and its temporary). This serial scatter (~1.5 ns per
    element here) is the largest cost of histogram collection. Splitting it over threads was measured and
    dropped: next to OpenMP's spinning worker threads it was slower at 2 threads (1.84x vs 1.78x plain
    forward), faster only with OMP_WAIT_POLICY=PASSIVE, which slows the forward itself."""
    ones = torch.ones((), dtype=counts.dtype, device=idx.device).expand(idx.numel())
    counts.index_add_(0, idx, ones)


def release_scratch() -> None:
    """Free the scratch buffers of the per-tensor histogram collection."""
    _scratch.clear()


def _range_exponent(m: torch.Tensor) -> torch.Tensor:
    """Smallest ``e >= MIN_EXPONENT`` with ``m < 2^e`` (int64), elementwise."""
    e = torch.frexp(m).exponent.to(torch.int64)  # m = mantissa * 2^e with mantissa in [0.5, 1)
    return torch.where(m > 0, e, torch.full_like(e, MIN_EXPONENT)).clamp_min(MIN_EXPONENT)


def _rebin(counts: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Merge each row's bins in groups of ``2^shift[c]`` (old bin ``j`` goes to ``j >> shift``); exact."""
    num_bins = counts.shape[1]
    shift = shift.clamp(0, 62).to(torch.int64)
    j = torch.arange(num_bins, device=counts.device, dtype=torch.int64)
    target = torch.bitwise_right_shift(j[None, :], shift[:, None])
    return torch.zeros_like(counts).scatter_add_(1, target, counts)


class HistogramCalibrator(Calibrator):
    """Streaming histogram of ``|x|`` (per tensor or per channel) and the true ``max |x|``.

    Args:
        axis: ``None`` per tensor; an int for one histogram per slice along that axis.
        num_bins: bins per histogram (TensorRT uses 2048). A power of two makes range growth exact.

    ``collect`` per tensor (fp32) costs one ``aminmax``, three passes into reused scratch buffers (scale,
    abs, conversion to the int32 bin index) and one bincount (an ``index_add_``); per channel one ``abs``,
    one ``amax``, four in-place passes that turn ``|x|`` into bin indices without a second allocation and
    the bincount. Plus one host sync (the NaN/Inf check and whether the range grew). Counts are int64 on
    the data's device.
    """

    def __init__(self, axis: int | None = None, num_bins: int = 2048) -> None:
        super().__init__(axis)
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or not 2 <= num_bins <= MAX_BINS:
            raise ValueError(f"num_bins must be an int in [2, {MAX_BINS}] (2048 is TensorRT's), got {num_bins!r}")
        if num_bins & (num_bins - 1):
            logger.debug("num_bins=%d is not a power of two: range growth is exact only up to fp32 rounding", num_bins)
        self._num_bins = num_bins
        self.reset()

    # ----------------------------------------------------------------------------------------- state
    @property
    def num_bins(self) -> int:
        return self._num_bins

    @property
    def has_data(self) -> bool:
        return self._counts is not None

    def reset(self) -> None:
        self._counts: torch.Tensor | None = None  # (C, B) int64
        self._exp: torch.Tensor | None = None  # (C,) int64: channel c covers [0, 2^exp[c])
        self._amax: torch.Tensor | None = None  # (C,) fp32: true max |x|

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts, ranges)``: the histogram(s) of ``|x|`` and the range each one covers.

        Counts are ``(B,)`` (per tensor) or ``(C, B)`` int64; ranges are 0-d or ``(C,)`` fp64 powers of two;
        bin ``j`` covers ``[j, j + 1) * range / B``. Copies, on the data's device; for plots such as the
        paper's Fig. 2.
        """
        self._require_data()
        ranges = torch.tensor(
            [math.ldexp(1.0, e) for e in self._exp.tolist()], dtype=torch.float64, device=self._counts.device
        )
        if self._axis is None:
            return self._counts[0].clone(), ranges[0].clone()
        return self._counts.clone(), ranges

    # --------------------------------------------------------------------------------------- collect
    @collecting
    def collect(self, x: torch.Tensor) -> None:
        """Add ``|x|`` to the histogram(s), growing the range (exactly, see module doc) if needed."""
        axis = self._check_input(x)
        if x.numel() == 0:
            return
        x = x.detach()
        num_channels = 1 if axis is None else x.shape[axis]
        if axis is not None:
            self._check_channels(None if self._counts is None else self._counts.shape[0], num_channels, axis)
            if num_channels * self._num_bins >= 2**31:
                raise ValueError(
                    f"{num_channels} channels x {self._num_bins} bins exceed the int32 bin index; "
                    "use fewer bins (num_bins) for this per-channel histogram"
                )

        checks: list[torch.Tensor] = []  # extra flags read in the one host sync below
        if axis is None and x.dtype == torch.float32:
            # Per tensor (activations, the common case): the max without materialising |x|; the bin index
            # is built later in reused scratch buffers (no multi-MB allocation per batch).
            lo, hi = torch.aminmax(x)
            m = m_native = torch.maximum(lo.neg(), hi).reshape(1)
            checks = [lo >= 0]  # e.g. after ReLU: |x| == x, no abs pass
            a = None
        elif x.dtype == torch.float32:  # |x| in fp32, in a buffer we own (it becomes the bin index in place).
            a = x.abs()
            m = m_native = abs_max(a, axis)
        elif x.dtype == torch.float64:
            a64 = x.abs()
            m_native = abs_max(a64, axis)
            m = m_native.float()
            a = a64.float()
            del a64
        else:  # fp16 / bf16: fp32 holds them exactly
            a = x.float().abs_()
            m = m_native = abs_max(a, axis)

        exp = _range_exponent(m)
        if self._counts is not None:
            self._move_to(x.device)
            new_exp = torch.maximum(self._exp, exp)
            grew = (new_exp != self._exp).any()
        else:
            new_exp, grew = exp, torch.zeros((), dtype=torch.bool, device=x.device)
        flags = torch.stack(
            [torch.isfinite(m_native).all(), torch.isfinite(m).all(), grew, *checks]
        ).tolist()  # the one host sync of collect
        if not (flags[0] and flags[1]):
            raise_not_finite(x, bool(flags[0]))

        if self._counts is None:
            self._counts = torch.zeros(num_channels, self._num_bins, dtype=torch.int64, device=x.device)
            self._amax = m.clone()
        else:
            if flags[2]:
                self._counts = _rebin(self._counts, new_exp - self._exp)
            self._amax = torch.maximum(self._amax, m)
        self._exp = new_exp

        # Bins per unit of |x|: B / 2^exp (exact in fp32 for a power-of-two B).
        inv_width = torch.ldexp(torch.full_like(m, float(self._num_bins)), -new_exp)
        if a is None:
            idx = _bin_index_scratch(x, inv_width.reshape(()), self._num_bins, nonneg=bool(flags[3]))
        elif axis is None:
            idx = _bin_index_(a, inv_width.reshape(()), self._num_bins)
        else:
            shape = [1] * x.dim()
            shape[axis] = num_channels
            idx = _bin_index_(a, inv_width.reshape(shape), self._num_bins)
            offsets = torch.arange(num_channels, dtype=torch.int32, device=x.device) * self._num_bins
            idx.add_(offsets.reshape(shape))
        # The bincount, accumulated straight into the counts: index_add_ skips bincount's two extra passes
        # (min and max of the indices) and its temporary.
        _count_into(self._counts.view(-1), idx.reshape(-1))

    def _move_to(self, device: torch.device) -> None:
        if self._counts is not None and self._counts.device != device:
            self._counts = self._counts.to(device)
            self._exp = self._exp.to(device)
            self._amax = self._amax.to(device)

    # ----------------------------------------------------------------------------------- compute_amax
    def compute_amax(self, method: str = "entropy", *, percentile: float = 99.99, bits: int = 8) -> torch.Tensor:
        """amax from the histogram(s): 0-d (per tensor) or ``(C,)`` (per channel), fp32, on the data's device.

        Args:
            method: ``"entropy"`` (TensorRT's KL search, ``entropy_amax``), ``"percentile"``
                (``percentile_amax``), ``"mse"`` (``mse_amax``) or ``"max"`` (the exact ``max |x|`` seen).
            percentile: for ``method="percentile"``, in (0, 100].
            bits: the integer width the range is chosen for (entropy: ``2^(bits-1)`` levels; mse: the grid).

        The clipping methods never return more than the true ``max |x|``; an all-zero tensor gives 0.
        Per channel, each channel is searched on its own histogram (a Python loop over channels: calibration
        of weights happens once).
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        check_bits(bits)
        if method == "percentile":
            percentile = check_percentile(percentile)
        self._require_data()
        device = self._amax.device
        if method == "max":
            out = self._amax.clone()
        else:
            counts = self._counts.to("cpu", torch.float64)
            widths = [math.ldexp(1.0, e) / self._num_bins for e in self._exp.cpu().tolist()]
            true_max = self._amax.cpu().tolist()
            values = []
            for hist, width, mx in zip(counts, widths, true_max):
                if mx <= 0:
                    values.append(0.0)
                    continue
                if method == "entropy":
                    v = entropy_amax(hist, width, bits)
                elif method == "percentile":
                    v = percentile_amax(hist, width, percentile)
                else:
                    v = mse_amax(hist, width, bits)
                values.append(min(float(v), mx))
            out = torch.tensor(values, dtype=torch.float32, device=device)
        return out.reshape(()) if self._axis is None else out

    # ------------------------------------------------------------------------------------------- sync
    def _sync_stats(self, group: dist.ProcessGroup | None) -> None:
        device = comm_device(group, None if self._counts is None else self._counts.device)
        c = sync_header(group, None if self._counts is None else self._counts.shape[0], device)
        if c is None:
            return
        if self._counts is None:  # this rank saw nothing: contribute empty statistics
            self._counts = torch.zeros(c, self._num_bins, dtype=torch.int64, device=device)
            self._exp = torch.full((c,), MIN_EXPONENT, dtype=torch.int64, device=device)
            self._amax = torch.zeros(c, dtype=torch.float32, device=device)
        self._move_to(device)
        # One MAX for range exponents and maxima together (both exact in fp64), then merge to the common
        # range and SUM the counts.
        packed = torch.cat([self._exp.double(), self._amax.double()])
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        common_exp = packed[:c].to(torch.int64)
        self._amax = packed[c:].float()
        counts = _rebin(self._counts, common_exp - self._exp).contiguous()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        self._counts, self._exp = counts, common_exp

    def __repr__(self) -> str:
        gran = "per_tensor" if self._axis is None else f"per_channel(axis={self._axis})"
        if self._counts is None:
            return f"HistogramCalibrator({gran}, num_bins={self._num_bins}, no data)"
        a = self._amax
        rng = f"{a.item():.4g}" if a.numel() == 1 else f"[{a.min().item():.4g}, {a.max().item():.4g}]"
        return (
            f"HistogramCalibrator({gran}, num_bins={self._num_bins}, samples={int(self._counts.sum())}, "
            f"max={rng})"
        )
