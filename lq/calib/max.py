"""Max calibration (Wu et al. 2020, Section 3.4 "Max"): amax is the largest ``|x|`` seen.

The paper's choice for weights (Section 4.1, Table 4: per-channel max keeps int8 weight accuracy) and one of
its activation candidates (Table 5). Per channel, the maximum runs over every dim but ``axis``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lq.calib.base import (
    Calibrator,
    check_finite,
    collecting,
    comm_device,
    raise_not_finite,
    sync_header,
)


def _abs_max_no_copy(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``max |x|`` as a ``(C,)`` vector in ``x``'s dtype, as ``max(max x, -min x)``: no ``|x|`` temporary.

    Reductions only read ``x``; ``x.abs()`` would first write a tensor as large as ``x``. NaN propagates.
    """
    if axis is None:
        lo, hi = torch.aminmax(x)
        return torch.maximum(hi, -lo).reshape(1)
    dims = [d for d in range(x.dim()) if d != axis]
    if not dims:
        return x.abs()
    return torch.maximum(x.amax(dim=dims), -x.amin(dim=dims))


class MaxCalibrator(Calibrator):
    """Running ``max |x|``, per tensor (``axis=None``) or per channel (one value per slice along ``axis``).

    Collecting reads the tensor once per tensor (``aminmax``; twice per channel: ``amax`` and ``amin``), with
    no temporary of its size, plus one host sync for the NaN/Inf check.
    """

    def __init__(self, axis: int | None = None) -> None:
        super().__init__(axis)
        self._amax: torch.Tensor | None = None  # (C,) fp32, C = 1 per tensor

    @property
    def has_data(self) -> bool:
        return self._amax is not None

    @collecting
    def collect(self, x: torch.Tensor) -> None:
        """Fold ``max |x|`` (per channel: over all dims but ``axis``) into the running maximum."""
        axis = self._check_input(x)
        if x.numel() == 0:
            return
        if axis is not None:
            self._check_channels(None if self._amax is None else self._amax.numel(), x.shape[axis], axis)
        m_native = _abs_max_no_copy(x.detach(), axis)
        m = m_native.float()
        finite_native, finite = check_finite(m_native, m)
        if not (finite_native and finite):
            raise_not_finite(x, finite_native)
        if self._amax is None:
            self._amax = m
        else:
            self._amax = torch.maximum(self._amax.to(m.device), m)

    def compute_amax(self, method: str = "max", **kwargs) -> torch.Tensor:
        """The maximum ``|x|`` collected: 0-d (per tensor) or ``(C,)`` (per channel), fp32, on the data's device.

        ``method`` may only be ``"max"`` (other keywords such as ``bits`` are accepted and ignored, so that
        callers can pass the same arguments as to ``HistogramCalibrator.compute_amax``).
        """
        if method != "max":
            raise ValueError(
                f"MaxCalibrator keeps only the maximum and cannot compute {method!r}; collect with "
                "HistogramCalibrator (make_calibrator('entropy' | 'percentile' | 'mse' | 'auto')) for that"
            )
        self._require_data()
        amax = self._amax.clone()
        return amax.reshape(()) if self._axis is None else amax

    def reset(self) -> None:
        self._amax = None

    def _sync_stats(self, group: dist.ProcessGroup | None) -> None:
        device = comm_device(group, None if self._amax is None else self._amax.device)
        c = sync_header(group, None if self._amax is None else self._amax.numel(), device)
        if c is None:
            return
        amax = self._amax if self._amax is not None else torch.zeros(c, dtype=torch.float32, device=device)
        amax = amax.to(device).contiguous()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        self._amax = amax

    def __repr__(self) -> str:
        gran = "per_tensor" if self._axis is None else f"per_channel(axis={self._axis})"
        if self._amax is None:
            return f"MaxCalibrator({gran}, no data)"
        a = self._amax
        rng = f"{a.item():.4g}" if a.numel() == 1 else f"[{a.min().item():.4g}, {a.max().item():.4g}]"
        return f"MaxCalibrator({gran}, amax={rng})"
