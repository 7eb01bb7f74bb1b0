"""The calibrator interface (Wu et al. 2020, Section 3.4: choosing the range ``[-amax, amax]``).

A calibrator watches one tensor (a layer's weight or input activation) during calibration and reduces what it
saw to ``amax``, the ``alpha`` of eq. 6 (``s = (2^(b-1) - 1) / amax``). Every calibrator is streaming (one
``collect`` per batch, nothing kept but running statistics), stays on the data's device, and works per tensor
(``axis=None``) or per channel (one amax per slice along ``axis``, Section 3.2).

Under DDP each rank sees different batches; ``sync()`` all-reduces the statistics so that every rank ends
with the same amax (MAX for maxima, SUM for histogram counts).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

#: Input dtypes a calibrator accepts; statistics are computed in fp32 whatever the input dtype.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Calibrator:
    """Streaming range statistics for one tensor.

    Args:
        axis: ``None`` for per-tensor statistics (``compute_amax`` returns a 0-d tensor); an int for
            per-channel statistics, one amax per slice along that axis (``compute_amax`` returns ``(C,)``).
            Negative axes count from the end, as in torch.

    Subclasses implement ``collect``, ``compute_amax``, ``reset`` and ``_sync_stats``.
    """

    def __init__(self, axis: int | None = None) -> None:
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"axis must be None (per-tensor) or an int (per-channel), got {axis!r}")
        self._axis = axis

    # ------------------------------------------------------------------------------------ interface
    @property
    def axis(self) -> int | None:
        """The channel axis (``None``: per tensor)."""
        return self._axis

    @property
    def has_data(self) -> bool:
        """True once ``collect`` has seen at least one non-empty tensor since construction or ``reset``."""
        raise NotImplementedError

    def collect(self, x: torch.Tensor) -> None:
        """Add the statistics of one tensor (a batch). Cheap and on ``x.device``."""
        raise NotImplementedError

    def compute_amax(self, **kwargs) -> torch.Tensor:
        """The calibrated range: a 0-d tensor (per tensor) or ``(C,)`` (per channel), fp32, on the data's device."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything collected."""
        raise NotImplementedError

    def sync(self, group: dist.ProcessGroup | None = None) -> None:
        """Make every rank of ``group`` hold identical statistics (all-reduce); a no-op without torch.distributed.

        Every rank of the group must call it (it is a collective), including ranks that collected nothing:
        they receive the other ranks' statistics.
        """
        if not dist_ready():
            return
        self._sync_stats(group)

    def _sync_stats(self, group: dist.ProcessGroup | None) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        gran = "per_tensor" if self._axis is None else f"per_channel(axis={self._axis})"
        return f"{type(self).__name__}({gran}, has_data={self.has_data})"

    # ------------------------------------------------------------------------------------- helpers
    def _check_input(self, x: torch.Tensor) -> int | None:
        """Validate ``x`` and return the channel axis normalised to ``[0, x.dim())`` (``None`` per tensor)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.collect expects a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{type(self).__name__}.collect takes floating-point tensors (float16, bfloat16, float32, "
                f"float64), got dtype {x.dtype}; calibrate the float tensor before it is quantized or cast"
            )
        if self._axis is None:
            return None
        if x.dim() == 0 or not -x.dim() <= self._axis < x.dim():
            raise ValueError(
                f"per-channel calibration on axis {self._axis} needs a tensor with more than "
                f"{self._axis if self._axis >= 0 else -self._axis - 1} dimensions, got shape {tuple(x.shape)}"
            )
        return self._axis % x.dim()

    def _check_channels(self, expected: int | None, got: int, axis: int) -> None:
        if expected is not None and expected != got:
            raise ValueError(
                f"per-channel calibration on axis {self._axis}: earlier tensors had {expected} channels, this one "
                f"has {got}; every collected tensor must have the same number of channels (call reset() to start over)"
            )

    def _require_data(self) -> None:
        if not self.has_data:
            raise RuntimeError(
                f"{type(self).__name__}.compute_amax: no data was collected; call collect(x) on at least one "
                "tensor first (run calibration batches through the model in calibrate mode)"
            )


# ---------------------------------------------------------------------------------------- helpers
def collecting(fn: Callable) -> Callable:
    """Decorator for ``collect``: no autograd, and *outside* inference mode even when called inside it
    (Lightning's validate/test), so the running state (counts, maxima, scratch) stays ordinary tensors that a
    later collection outside inference mode may update in place. Reading inference-mode inputs is allowed."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad(), torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper


def abs_max(a: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``max`` of a tensor of absolute values as a ``(C,)`` vector in ``a``'s dtype.

    ``C = 1`` per tensor (``axis=None``); per channel the maximum runs over every dim but ``axis``. A maximum
    is exact in any dtype, so the caller may convert it afterwards. NaN propagates (``amax`` is NaN-aware).
    """
    if axis is None:
        return a.amax().reshape(1)
    dims = [d for d in range(a.dim()) if d != axis]
    return a.amax(dim=dims) if dims else a.clone()


def check_finite(m_native: torch.Tensor, m_fp32: torch.Tensor) -> tuple[bool, bool]:
    """One host sync: (all finite in the input dtype, all finite in fp32)."""
    ok = torch.stack([torch.isfinite(m_native).all(), torch.isfinite(m_fp32).all()]).tolist()
    return bool(ok[0]), bool(ok[1])


def raise_not_finite(x: torch.Tensor, finite_native: bool) -> None:
    """The error for a tensor with NaN/Inf (the caller adds the layer name)."""
    if not finite_native:
        raise ValueError(
            f"calibration input (shape {tuple(x.shape)}, dtype {x.dtype}) contains NaN or Inf values; "
            "check the model and the data (e.g. a diverged layer or an unnormalised input) before calibrating"
        )
    raise ValueError(
        f"calibration input (shape {tuple(x.shape)}, dtype {x.dtype}) holds values beyond the float32 range "
        f"(|x| > {torch.finfo(torch.float32).max:.3g}), which int8 calibration cannot represent"
    )


def dist_ready() -> bool:
    """True when torch.distributed is built in and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def comm_device(group: dist.ProcessGroup | None, state_device: torch.device | None) -> torch.device:
    """Device for collective tensors: the statistics' device, or (on a rank with no statistics) the backend's."""
    if state_device is not None:
        return state_device
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync_header(
    group: dist.ProcessGroup | None, num_channels: int | None, device: torch.device
) -> int | None:
    """All-reduce who has data and how many channels: the common channel count, or ``None`` if no rank has data.

    Raises ``RuntimeError`` (on every rank alike) when ranks collected different channel counts.
    """
    has = num_channels is not None
    # MAX of [C, -C, has]: a rank without data sends [0, -huge, 0] so it does not affect either bound.
    header = torch.tensor(
        [num_channels if has else 0, -num_channels if has else -(2**62), int(has)], dtype=torch.int64, device=device
    )
    dist.all_reduce(header, op=dist.ReduceOp.MAX, group=group)
    c_max, c_min, any_data = int(header[0]), -int(header[1]), int(header[2])
    if not any_data:
        logger.debug("calibrator sync: no rank collected data")
        return None
    if c_max != c_min:
        raise RuntimeError(
            f"calibrator sync: ranks collected tensors with different channel counts ({c_min} vs {c_max}); "
            "every rank must calibrate the same model"
        )
    return c_max
