"""``TensorQuantizer``: the module that sits on one input of a quantized layer.

It holds the calibrated range ``amax`` as a buffer (a Parameter when the range is learned, Section 5.3)
and runs in one of three modes:

- ``"off"``: pass-through, the float reference (used by sensitivity analysis and partial quantization).
- ``"calibrate"``: pass-through, while a calibrator (``lq.calib``) collects range statistics (Section 3.4).
- ``"quantize"``: fake quantization, eq. 12, with the STE of eq. 13.

Weight quantizers with max calibration are *dynamic*: amax follows ``|W|.max()`` per channel at every
forward, so fine-tuning and BN folding never leave a stale range (the paper's per-channel max, Section 4.1).
"""

from __future__ import annotations

import torch
from torch import nn

from lq.calib import Calibrator, MaxCalibrator, make_calibrator
from lq.quant.config import QuantSpec
from lq.quant.functional import fake_quant, fake_quant_learned_range

MODES = ("off", "calibrate", "quantize")
#: Optional per-layer buffers that live on a quantizer and are created only when used: ``bias_correction``
#: (``lq.correct_bias``, on the weight quantizer) and ``smoothing`` (``lq.smooth_quant``, on the input quantizer).
ON_DEMAND_BUFFERS = ("bias_correction", "smoothing")


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor with a calibrated, fixed (or learned) symmetric range.

    Args:
        spec: bits, granularity, calibrator (``QuantSpec``).
        axis: the channel axis when ``spec.granularity == "per_channel"`` (ignored per tensor).
        num_channels: the size of that axis (per-channel amax has one value per channel).
        dynamic: recompute amax as the per-channel/per-tensor max of the input at every forward (weights).
        name: the owning layer's name, used in error messages.
    """

    def __init__(
        self,
        spec: QuantSpec,
        axis: int | None = None,
        num_channels: int = 1,
        dynamic: bool = False,
        name: str = "",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.axis = axis if spec.per_channel else None
        if spec.per_channel and axis is None:
            raise ValueError(f"{name or 'quantizer'}: per_channel quantization needs a channel axis")
        self.dynamic = bool(dynamic) and not spec.learn_range
        self.name = name
        shape = (num_channels,) if self.axis is not None else ()
        init = torch.full(shape, float("nan"))  # NaN = "not calibrated yet"
        if spec.learn_range:
            self.amax = nn.Parameter(init)
        else:
            self.register_buffer("amax", init)
        # Quantizing from the start: an uncalibrated activation quantizer fails loudly at its first
        # forward instead of silently running in float.
        self._mode = "quantize" if spec.enabled else "off"
        self._calibrator: Calibrator | None = None
        #: (method, percentile) that calibrator "layerwise" chose for this quantizer (lq.layer_choice)
        self.calib_choice: tuple[str, float | None] | None = None

    # ----------------------------------------------------------------------------------------- state
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        if not self.spec.enabled:
            value = "off"
        if value == "calibrate" and self._calibrator is None:
            self.start_calibration()
        self._mode = value

    def start_calibration(self, method: str | None = None) -> None:
        """Fresh statistics for ``method`` (default: the spec's calibrator) and calibrate mode."""
        method = method or self.spec.calibrator
        self._calibrator = make_calibrator(method, axis=self.axis, num_bins=self.spec.num_bins)
        self.calib_choice = None
        self._mode = "calibrate" if self.spec.enabled else "off"

    @property
    def is_calibrated(self) -> bool:
        return bool(torch.isfinite(self.amax).all())

    @property
    def has_calib_data(self) -> bool:
        """True once the calibrator has collected at least one tensor since the last reset."""
        return self._calibrator is not None and self._calibrator.has_data

    @property
    def calibrator(self) -> Calibrator | None:
        return self._calibrator

    def reset_calibration(self) -> None:
        """Forget collected statistics (the calibrated amax stays until the next ``load_calib_amax``)."""
        if self._calibrator is not None:
            self._calibrator.reset()

    @torch.no_grad()
    def load_calib_amax(self, method: str | None = None, percentile: float | None = None) -> torch.Tensor:
        """Set amax from the collected statistics with ``method`` (default: the spec's calibrator).

        ``method`` is one of "max", "entropy", "percentile", "mse"; a histogram collected once serves all.
        """
        if self._calibrator is None:
            raise RuntimeError(f"{self.name}: no calibration data was collected; run lq.calibrate(model, data)")
        method = method or self.spec.calibrator
        if method == "layerwise":
            if self.calib_choice is None:
                # before the per-layer choice ran (lq.calibrate runs it right after): the full range
                method, percentile = "max", None
            else:
                method, percentile = self.calib_choice
        if method == "auto":
            method = "entropy"
        try:
            if isinstance(self._calibrator, MaxCalibrator):
                if method != "max":
                    raise ValueError(
                        f"{self.name}: the max calibrator keeps only the maximum and cannot give {method!r}; "
                        "calibrate with calibrator 'entropy', 'percentile', 'mse' or 'auto' (one histogram "
                        "serves all methods)"
                    )
                amax = self._calibrator.compute_amax()
            else:
                pct = float(percentile if percentile is not None else self.spec.percentile)
                amax = self._calibrator.compute_amax(method=method, percentile=pct, bits=self.spec.bits)
        except RuntimeError as err:
            raise RuntimeError(f"{self.name}: {err}") from err
        self.set_amax(amax)
        return self.amax.detach()

    @torch.no_grad()
    def set_amax(self, amax: torch.Tensor) -> None:
        """Set the calibrated range (reshaped to this quantizer's amax shape: one value, or one per channel)."""
        amax = torch.as_tensor(amax, dtype=torch.float32, device=self.amax.device).reshape(self.amax.shape)
        self.amax.data.copy_(amax)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A float checkpoint (or a Lightning checkpoint whose quantizer state lives in the lq callback's own
        # section) has no amax: keep the current range instead of failing a strict load. A present amax of
        # another shape (a checkpoint from another config) still fails loudly below.
        key = prefix + "amax"
        if key in state_dict and state_dict[key].shape != self.amax.shape:
            error_msgs.append(
                f"{self.name}: checkpoint amax has shape {tuple(state_dict[key].shape)} but this quantizer has "
                f"{tuple(self.amax.shape)}; the checkpoint comes from another quantization config (granularity)"
            )
            return
        # lq.correct_bias's and lq.smooth_quant's buffers: registered on demand, so a corrected or smoothed
        # model's state_dict loads into a freshly quantized one (and one without them removes nothing).
        for buffer in ON_DEMAND_BUFFERS:
            key_b = prefix + buffer
            if key_b in state_dict and buffer not in self._buffers:
                self.register_buffer(buffer, torch.zeros_like(state_dict[key_b], dtype=torch.float32))
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key not in state_dict:
            del missing_keys[before:]

    # --------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "off":
            return x
        if not x.is_floating_point():
            raise TypeError(
                f"{self.name}: quantized layers take floating-point inputs (fp32/fp16/bf16), got {x.dtype}"
            )
        if self._mode == "calibrate":
            try:
                self._calibrator.collect(x.detach())
            except ValueError as err:
                raise ValueError(f"layer '{self.name}': {err}") from err
            return x
        if self.dynamic and torch.compiler.is_compiling():
            # torch.export / torch.compile: the range as a graph value (no cache, no data-dependent check)
            a = x.detach().abs()
            amax = a.amax() if self.axis is None else a.amax(dim=[d for d in range(x.dim()) if d != self.axis % x.dim()])
            return fake_quant(x, amax.float(), self.spec.bits, self.axis, in_range=True)
        if self.dynamic:
            # Without autograd (evaluation, sensitivity sweeps, calibration of other layers) an unchanged
            # weight Parameter gives the same fake-quantized weight: reuse it instead of two passes plus a
            # fake-quant. Only Parameters: a weight recomputed each forward (pruning's weight_orig * mask)
            # is a new tensor whose address and version counter could repeat with other values.
            cacheable = isinstance(x, nn.Parameter) and not torch.is_grad_enabled()
            # (inference tensors, e.g. a smoothed weight W diag(s) made under torch.inference_mode, have no version)
            key = (x.data_ptr(), x._version, x.shape, x.dtype, x.device) if cacheable else None
            cached = self.__dict__.get("_dynamic_cache")
            if cacheable and cached is not None and cached[0] == key:
                return cached[1]
            with torch.no_grad():
                if self.axis is None:
                    self.amax.copy_(x.detach().abs().amax().float())
                else:
                    dims = [d for d in range(x.dim()) if d != self.axis % x.dim()]
                    self.amax.copy_(x.detach().abs().amax(dim=dims).float())
            if not bool(torch.isfinite(self.amax).all()):  # amax is tiny: this check is free
                self._raise_non_finite(x)
            out = fake_quant(x, self.amax, self.spec.bits, self.axis, in_range=True)  # amax = max |x|
            self.__dict__["_dynamic_cache"] = (key, out.detach()) if cacheable else None
            return out
        if not torch.compiler.is_compiling():  # data-dependent checks: torch.export / torch.compile trace without them
            if not self.is_calibrated:
                raise RuntimeError(
                    f"layer '{self.name}' is quantized but has no calibrated range: run "
                    "lq.calibrate(model, data) first (or disable it with lq.quantization_disabled)"
                )
            self._check_finite(x)
        if self.spec.learn_range and self.training:
            return fake_quant_learned_range(x, self.amax, self.spec.bits, self.axis)
        return fake_quant(x, self.amax, self.spec.bits, self.axis)

    def _check_finite(self, x: torch.Tensor) -> None:
        """NaN/Inf in a quantized input is an error naming the layer, never a silent number: eq. 7's clamp
        would turn Inf into ``amax`` and NaN would spread through the fake-quantized model. One fp32 sum
        pass (NaN and Inf make it non-finite); a sum that merely overflowed is confirmed element-wise."""
        if x.numel() and not bool(torch.isfinite(x.detach().sum(dtype=torch.float32))):
            if not bool(torch.isfinite(x.detach()).all()):
                self._raise_non_finite(x)

    def _raise_non_finite(self, x: torch.Tensor) -> None:
        what = "NaN" if bool(torch.isnan(x.detach()).any()) else "Inf"
        layer, _, role = self.name.rpartition(".")
        role = role.removesuffix("_quantizer") if layer else "input"
        raise FloatingPointError(
            f"layer '{layer or self.name}': {what} in its quantized {role}; int8 cannot "
            "represent it. Check the input data, or the previous layer (a diverging model: lower the learning "
            "rate or clip gradients)"
        )

    def extra_repr(self) -> str:
        gran = f"per_channel(axis={self.axis})" if self.axis is not None else "per_tensor"
        if self.is_calibrated:
            a = self.amax.detach()
            amax = f"{a.item():.4g}" if a.numel() == 1 else f"[{a.min().item():.4g}, {a.max().item():.4g}]({a.numel()})"
        else:
            amax = "uncalibrated"
        extra = ", dynamic" if self.dynamic else ""
        extra += ", learned" if self.spec.learn_range else ""
        calibrator = self.spec.calibrator
        if calibrator == "layerwise" and self.calib_choice is not None:
            m, p = self.calib_choice
            calibrator += f"({m}{'' if p is None or m != 'percentile' else f' {p:g}'})"
        return f"bits={self.spec.bits}, {gran}, amax={amax}, calibrator={calibrator}, mode={self._mode}{extra}"
