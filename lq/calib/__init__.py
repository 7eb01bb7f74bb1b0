"""Calibrators (Wu et al. 2020, Section 3.4): streaming range statistics that give each quantizer its amax.

- ``MaxCalibrator``: the largest ``|x|`` (the paper's choice for weights, Section 4.1).
- ``HistogramCalibrator``: one histogram of ``|x|`` from which ``compute_amax(method=...)`` reads
  ``"entropy"`` (TensorRT's KL search), ``"percentile"``, ``"mse"`` or ``"max"`` (Section 4.2, Table 5).

The pure functions ``entropy_amax``, ``percentile_amax`` and ``mse_amax`` work on any histogram of ``|x|``.
"""

from __future__ import annotations

from lq.calib.base import Calibrator
from lq.calib.entropy import entropy_amax, kl_divergences
from lq.calib.histogram import METHODS, HistogramCalibrator
from lq.calib.max import MaxCalibrator
from lq.calib.mse import mse_amax, mse_errors
from lq.calib.percentile import percentile_amax

#: Calibrator names accepted by ``make_calibrator`` (``lq.QuantSpec.calibrator``).
CALIBRATOR_NAMES = ("max", "entropy", "percentile", "mse", "auto", "layerwise")


def make_calibrator(name: str, axis: int | None = None, num_bins: int = 2048) -> Calibrator:
    """The calibrator that collects what method ``name`` needs.

    ``"max"`` -> ``MaxCalibrator(axis)``; ``"entropy"``, ``"percentile"``, ``"mse"``, ``"auto"`` and
    ``"layerwise"`` -> ``HistogramCalibrator(axis, num_bins)`` (one histogram serves every method, so "auto"
    and "layerwise" can try them all).
    """
    if name == "max":
        return MaxCalibrator(axis)
    if name in ("entropy", "percentile", "mse", "auto", "layerwise"):
        return HistogramCalibrator(axis, num_bins=num_bins)
    raise ValueError(f"calibrator must be one of {CALIBRATOR_NAMES}, got {name!r}")


__all__ = [
    "CALIBRATOR_NAMES",
    "METHODS",
    "Calibrator",
    "HistogramCalibrator",
    "MaxCalibrator",
    "entropy_amax",
    "kl_divergences",
    "make_calibrator",
    "mse_amax",
    "mse_errors",
    "percentile_amax",
]
