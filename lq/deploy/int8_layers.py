"""Inference-only int8 layers made by ``lq.convert``: int8 weights, fp32 scales, an integer kernel (eq. 10).

Each layer holds, as buffers (so they are in ``state_dict``):

- ``weight``: the quantized weight ``w_q = clip(round(s_w * W))``, dtype int8 (eq. 7), same shape as the
  float weight. 4x smaller than fp32.
- ``weight_scale``: ``s_w`` per output channel (fp32), the paper's scale factor (eq. 6: ``qmax / amax``).
- ``input_scale``: ``s_x`` of the per-tensor activation (fp32 scalar); ``Int8Matmul`` has ``other_scale``.
- ``bias`` (fp32) where the float layer had one.

Forward quantizes the input with ``s_x`` exactly as the fake-quant model did, runs an integer kernel
(``lq.deploy.kernels``) and applies ``1 / (s_x s_w)`` and the bias: eq. 10. The output is in the input's
float dtype. These layers do not train: in train mode, or with an input that requires grad, they raise.
oneDNN's packed copy of the weight is a cache rebuilt on demand, not part of ``state_dict``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from operator import is_
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lq.deploy import gemv, kernels, onednn_op, traced
from lq.ops import hardware as hw
from lq.quant.functional import AMAX_EPS, qmax

log = logging.getLogger(__name__)

#: kernel families a Linear can run on (``Int8Module._kernel``)
_LINEAR_KERNELS = ("fbgemm", "onednn", "int_mm")
#: bound oneDNN calls a conv keeps (one per input size and output stage; ``Int8ConvNd.onednn_u8``)
_MAX_BOUND_CALLS = 32

#: Linear inputs with at most this many rows run as a 1x1 int8 convolution (faster in oneDNN than its
#: int8 inner product for a few rows); larger batches use the inner product.
SMALL_BATCH = 4

TRAIN_ERROR = (
    "{name}: lq.convert is for inference; the converted int8 layer has no float weights and cannot be "
    "{what}. Call model.eval() and run under torch.no_grad() (or torch.inference_mode()); to keep training, "
    "use the fake-quant model from before lq.convert (QAT, lq.callbacks.Int8QAT)."
)


def steps_from_amax(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Step ``1/s = amax / qmax`` in fp32, computed as ``lq.quant.functional.fake_quant`` does."""
    return amax.detach().float().clamp_min(AMAX_EPS) / qmax(bits)


def quantize_weight(w: torch.Tensor, amax: torch.Tensor, bits: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(w_q int8, s_w fp32)`` with the exact integers of the fake-quant weight (eq. 7).

    The integers are read back from torch's fused fake-quant kernel output (``q * step`` in fp32 divides
    back to ``q`` exactly), so they cannot differ from what the fake-quant model computed with.
    """
    step = steps_from_amax(amax, bits).reshape(-1)
    q = qmax(bits)
    w32 = w.detach().float()
    zero = torch.zeros(step.shape, dtype=torch.int32, device=w.device)
    wfq = torch.fake_quantize_per_channel_affine(w32, step.to(w.device), zero, axis, -q, q)
    shape = [1] * w.dim()
    shape[axis] = -1
    w_q = torch.round(wfq / step.to(w.device).reshape(shape)).clamp_(-q, q).to(torch.int8)
    return w_q, (1.0 / step).to(w.device)


class Int8Module(nn.Module):
    """What every converted layer shares: the inference guard, scale buffers, a kernel cache."""

    #: ``"auto"`` picks oneDNN on CPU, ``torch._int_mm`` on CUDA (Linear), the reference elsewhere.
    backend: str = "auto"

    #: float buffers that stay fp32 whatever ``.half()`` / ``.to(dtype)`` asks (they define the model)
    _fp32_buffers = ("weight_scale", "input_scale", "other_scale", "bias", "input_smoothing")

    def __init__(self, name: str, bits: int, backend: str, input_bits: int | None = None) -> None:
        super().__init__()
        if backend not in kernels.BACKENDS:
            raise ValueError(f"backend must be one of {kernels.BACKENDS}, got {backend!r}")
        self.name = name
        self.bits = int(bits)
        self.input_bits = int(input_bits if input_bits is not None else bits)
        self.qmax = qmax(self.bits)
        self.qmax_input = qmax(self.input_bits)
        self.backend = backend
        self._cache: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Guards, then the layer's ``_forward``; an error raised by a kernel is re-raised naming the layer.
        (ConvTranspose2d and Matmul take other arguments and define their own ``forward``.)"""
        self._check_inference(x)
        if torch.compiler.is_compiling():  # torch.compile / torch.export: plain torch ops (lq.deploy.traced)
            return self._traced(x)
        self.sync_cache()
        try:
            return self._forward(x)
        except FloatingPointError as err:
            raise FloatingPointError(f"{self.name}: {err}") from None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The eager forward (``lq.deploy.kernels``). Subclasses mark it ``torch.compiler.disable``: if dynamo
        gives up on ``forward`` (an error raised while tracing it makes dynamo skip that code for good), the
        compiled model then runs these eager kernels instead of tracing oneDNN's prepacking on fake tensors."""
        raise NotImplementedError

    def _traced(self, x: torch.Tensor) -> torch.Tensor:
        """The forward in plain torch ops, taken while ``torch.compiler.is_compiling()`` (``lq.deploy.traced``)."""
        raise NotImplementedError

    def _to_grid(self, x: torch.Tensor, inv_step: torch.Tensor, qmax: int) -> torch.Tensor:
        """``kernels.quantize_to_grid`` with the layer's name on a NaN/Inf error (for layers with their own
        ``forward``). While compiling, ``traced.quantize``; a non-finite input on CUDA then makes the grid NaN
        (these layers compute on it in float)."""
        if torch.compiler.is_compiling():
            t, poison = traced.quantize(x, inv_step, qmax, self.name)
            return t if poison is None else t + poison
        try:
            return kernels.quantize_to_grid(x, inv_step, qmax)
        except FloatingPointError as err:
            raise FloatingPointError(f"{self.name}: {err}") from None

    # --------------------------------------------------------------------------------- guards and cache
    def _check_inference(self, *inputs: torch.Tensor) -> None:
        if self.training:
            raise RuntimeError(TRAIN_ERROR.format(name=self.name, what="run in train mode"))
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
            raise RuntimeError(TRAIN_ERROR.format(name=self.name, what="asked for gradients"))
        for x in inputs:
            if not x.is_floating_point():
                raise TypeError(f"{self.name}: int8 layers take floating-point inputs, got {x.dtype}")

    def _apply(self, fn, recurse: bool = True):
        self._cache.clear()  # device moves invalidate packed weights and cached steps
        out = super()._apply(fn, recurse)
        for key in self._fp32_buffers:
            buf = self._buffers.get(key)
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[key] = buf.float()
        return out

    def sync_cache(self) -> dict[str, Any]:
        """The kernel cache, emptied first if a parameter or buffer was assigned, registered, deleted or
        replaced since it was filled (``layer.input_scale = t``, ``register_buffer``, ``del
        layer.input_smoothing``, ``layer._buffers["input_scale"] = t``): every packed weight and cached step
        was made from the old tensors. One identity check of the layer's tensors, ~1 us; called on every
        forward and by the int8 chains before they use what the cache holds. (Edits in place,
        ``layer.input_scale.mul_(2)``, are not seen: the packed weights are copies, as in torch.ao's quantized
        modules; ``load_state_dict`` and device moves clear the cache themselves.)"""
        cache = self._cache
        now = (*self._parameters.values(), *self._buffers.values())
        seen = cache.get("tensors")
        if seen is None or len(seen) != len(now) or not all(map(is_, seen, now)):
            cache.clear()
            cache["tensors"] = now
        return cache

    def _steps(self) -> tuple[float, torch.Tensor]:
        """(input step ``1/s_x`` as a float, weight steps ``1/s_w``), cached between calls; while compiling,
        both as tensors computed in the graph (a float read of a buffer would break it)."""
        if torch.compiler.is_compiling():
            return 1.0 / self.input_scale, 1.0 / self.weight_scale
        if "steps" not in self._cache:
            w_step = 1.0 / self.weight_scale if "weight_scale" in self._buffers else None
            self._cache["steps"] = (float(1.0 / self.input_scale), w_step)
        return self._cache["steps"]

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (``torch.save(model)``, ``copy.deepcopy``) leaves the kernel cache behind: oneDNN's packed
        weights are opaque tensors that cannot be serialised, and every entry is rebuilt on demand."""
        state = super().__getstate__()
        state["_cache"] = {}
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self._cache.clear()
        key = prefix + "input_smoothing"  # lq.smooth_quant's divisor: only smoothed Linear layers have one
        if key in state_dict and "input_smoothing" not in self._buffers:
            self.register_buffer("input_smoothing", torch.ones_like(state_dict[key], dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _kernel(self, device: torch.device, fast: tuple[str, ...]) -> str:
        """The kernel family to run: the requested backend if it applies here, else the reference (decided
        once per device; the cache is cleared on device moves and state_dict loads)."""
        key = ("kernel", device.type, fast)
        if key not in self._cache:
            self._cache[key] = self._choose_kernel(device, fast)
        return self._cache[key]

    def _choose_kernel(self, device: torch.device, fast: tuple[str, ...]) -> str:
        if self.backend == "reference":
            return "reference"
        if (
            device.type == "cpu"
            and "fbgemm" in fast
            and self.backend in ("auto", "fbgemm")
            and self.bits <= 8
            and kernels.fbgemm_mode() != kernels.UNAVAILABLE
            and 2 * self.in_features <= hw.max_exact_reduction(255, self.qmax)  # int32 cannot overflow
        ):
            return "fbgemm"
        if (
            device.type == "cpu"
            and "onednn" in fast
            and self.backend in ("auto", "onednn", "fbgemm")  # fbgemm: Linear only; convs take oneDNN
            and self.bits <= 8
            and kernels.onednn_mode() != kernels.UNAVAILABLE
        ):
            return "onednn"
        if "int_mm" in fast and self.backend in ("auto", "int_mm") and (device.type == "cuda" or self.backend == "int_mm"):
            return "int_mm"
        return "reference"


class Int8Linear(Int8Module):
    """``y = x W^T + b`` as eq. 10: int8 x int8 GEMM with int32 accumulation, one float multiply, bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 8,
        name: str = "Int8Linear",
        backend: str = "auto",
        device: torch.device | None = None,
        input_bits: int | None = None,
    ) -> None:
        super().__init__(name, bits, backend, input_bits)
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("input_scale", torch.ones((), device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_quant(cls, layer: nn.Linear, name: str, weight_amax: torch.Tensor, backend: str = "auto") -> Int8Linear:
        """Build from a calibrated ``QuantLinear`` (``weight_amax``: per output channel)."""
        bits_w, bits_x = layer.weight_quantizer.spec.bits, layer.input_quantizer.spec.bits
        _same_bits(name, bits_w, bits_x)
        dev = layer.weight.device
        m = cls(layer.in_features, layer.out_features, layer.bias is not None, bits_w, name, backend, dev, bits_x)
        return _load_quantized(m, layer, weight_amax, axis=0)

    def _packed_linear(self, signed: bool) -> torch.Tensor:
        key = f"packed_linear_{signed}"
        if key not in self._cache:
            w = kernels.signed_weight(self.weight) if signed else self.weight
            self._cache[key] = torch.ops.onednn.qlinear_prepack(w, None)
        return self._cache[key]

    def _packed_fbgemm(self, signed: bool):
        key = f"packed_fbgemm_{signed}"
        if key not in self._cache:
            w = kernels.signed_weight(self.weight) if signed else self.weight
            step_x, w_step = self._steps()
            self._cache[key] = kernels.fbgemm_prepack(w, step_x * w_step, self.bias)  # eq. 10's factor, bias
        return self._cache[key]

    def _packed_fbgemm_weight_steps(self):
        """fbgemm's pack with the weight steps alone (``lean_step`` form ``"clipped"``: the op is given the
        input step and forms ``step_x * step_w[j]`` itself, in fp32 as ``_packed_fbgemm`` does)."""
        if "packed_fbgemm_w" not in self._cache:
            self._cache["packed_fbgemm_w"] = kernels.fbgemm_prepack(self.weight, self._steps()[1], self.bias)
        return self._cache["packed_fbgemm_w"]

    def lean_step(self, form: str, out: kernels.Output) -> tuple[Callable[[torch.Tensor], torch.Tensor], str] | None:
        """This layer's part of an all-Linear :class:`~lq.deploy.chain.Int8Sequential` on fbgemm, bound once
        (2-D fp32 CPU inputs): at batch 1 the per-call bookkeeping of ``run`` (kernel choice, sign test,
        output form) and the requantization ops cost a quarter of fbgemm's GEMM.

        ``form`` is what the previous step hands over: ``"float"`` (the model's input: eq. 7 here, with the
        NaN/Inf check), ``"grid"`` (this layer's input integers) or ``"clipped"`` (the previous layer's
        activated output clipped at ``kernels.fbgemm_grid_cap``: fbgemm's own input quantization with this
        layer's step is then eq. 7 exactly). Returns the step and the form it hands on (``"clipped"`` where the
        consumer's step allows it, else ``"grid"``; ``"float"`` for a float output), or ``None`` where ``run``
        would do something else (another kernel, a clip ``upper``, a float input in half-range mode, which
        needs a sign test). A SmoothQuant divisor (``lq.smooth_quant``) is applied as ``run`` applies it: to a
        float input here, and by the previous layer (``out.divisor``) to what it hands over. Same numbers as
        ``run``, bit for bit (tests). Kept in the
        layer's kernel cache, cleared whenever the packed weight or a scale can change.
        """
        key = ("lean_step", form, out)  # the Output object itself: a consumer's reloaded scale is a new Output
        cache = self.sync_cache()
        if key in cache:
            return cache[key]
        made = None
        mode = kernels.fbgemm_mode()
        if (
            self._kernel(torch.device("cpu"), _LINEAR_KERNELS) == "fbgemm"
            and out.upper is None
            and (form != "float" or mode == kernels.FULL_RANGE)
        ):
            op = kernels.fbgemm_op(out.relu or out.grid)
            # a float input as torch's fake quantization of it (step times eq. 7's integers, one op) where
            # fbgemm, quantizing that with the same step, gets the integers back (kernels.fake_quant_step)
            fake_step = kernels.fake_quant_step(self._steps()[0], self.input_scale) if form == "float" else None
            if form == "clipped" or fake_step is not None:
                packed, a_scale = self._packed_fbgemm_weight_steps(), self._steps()[0]
                zp = 0 if fake_step is None else kernels.onednn_zero_point(mode)
            else:
                zp = 0 if form == "grid" else kernels.onednn_zero_point(mode)
                packed, a_scale = self._packed_fbgemm(False), 1.0
            # a float input quantized to the grid goes in as integers, with the integer-input weights (also where
            # the step allows fake quantization, from NATIVE_GRID floats on: torch's fake quantization is scalar
            # code, 134 us for 64 x 1024 against 12 us)
            grid_packed = self._packed_fbgemm(False) if form == "float" else None
            inv_in, q_in, name = self.input_scale, self.qmax_input, self.name
            inv_f = float(inv_in)
            smooth = self._buffers.get("input_smoothing")  # lq.smooth_quant's divisor of a float input
            inv_out, top, divisor = out.inv_step, out.qmax, out.divisor
            cap = kernels.fbgemm_grid_cap(out.step, inv_out, top) if out.grid else None
            hands_on = "float" if not out.grid else "grid" if cap is None else "clipped"
            recorders = hw._RECORDERS

            @torch.compiler.disable(recursive=False)  # dynamo skips this frame (marks its code; no wrapper)
            def step(h: torch.Tensor) -> torch.Tensor:
                if recorders:  # hw.ran's test inline: a call costs ~1 us cache-cold, 4 a batch-1 MLP call
                    hw.ran("Int8Linear", "fbgemm")
                if form == "float":
                    if smooth is not None:
                        h = h / smooth
                    fake = fake_step is not None and h.numel() < kernels.NATIVE_GRID  # (torch's op is scalar code)
                    if fake:
                        lo, hi = torch.aminmax(h)
                        # both False for NaN, Inf, or an x * s that overflows fp32: quantize_to_grid raises then
                        ok = -float(lo) * inv_f < kernels.FP32_OVERFLOW and float(hi) * inv_f < kernels.FP32_OVERFLOW
                    if fake and ok:
                        h = torch.fake_quantize_per_tensor_affine(h, fake_step, 0, -q_in, q_in)
                    else:
                        try:
                            h = kernels.quantize_to_grid(h, inv_in, q_in)
                        except FloatingPointError as err:
                            raise FloatingPointError(f"{name}: {err}") from None
                        return finish(op(h, 1.0, zp, grid_packed))
                return finish(op(h, a_scale, zp, packed))

            def finish(y: torch.Tensor) -> torch.Tensor:
                if divisor is not None:  # the next layer's SmoothQuant divisor, as that layer applies it
                    y = y.div_(divisor)
                if cap is not None:
                    return y.clamp_(max=cap)
                if inv_out is None:
                    return y
                return kernels.quantize_to_grid(y, inv_out, top, relu=True, check=False, out=y)

            made = (step, hands_on)
        self._cache[key] = made
        return made

    def _gemv_chain(self, relu: bool) -> gemv.Chain | None:
        """This layer alone as a :class:`lq.deploy.gemv.Chain` (float in, float out, ``relu``), ``None`` where
        the kernel is not available. Kept in the kernel cache."""
        key = ("gemv_chain", relu)
        cache = self.sync_cache()
        if key not in cache:
            part = self.gemv_part(kernels.Output(relu=relu))
            fma = gemv.fbgemm_formula()
            try:
                made = None if part is None or fma is None else gemv.Chain(
                    float(self.input_scale), self.qmax_input, [part], fma)
            except ValueError:  # (too many inputs for its int32 sums: fbgemm runs it)
                made = None
            cache[key] = made
        return cache[key]

    def gemv_part(self, out: kernels.Output) -> tuple | None:
        """This layer's part of a :class:`lq.deploy.gemv.Chain` writing ``out``: ``(int8 weight, eq. 10's
        factor step_x * step_w (fp32, as fbgemm's pack holds it), bias, ReLU, the next layer's (s, qmax) or
        None)``, where fbgemm is this layer's CPU kernel (the chain computes fbgemm's numbers) and ``out`` is a
        float output or a ReLU'd hand-over to the next layer's grid; else ``None``. Kept in the kernel cache."""
        key = ("gemv_part", "", out)  # (the chain reads key[2] as the Output, as for lean_step's keys)
        cache = self.sync_cache()
        if key not in cache:
            part = None
            if (
                self._kernel(torch.device("cpu"), _LINEAR_KERNELS) == "fbgemm"
                and out.upper is None
                and out.divisor is None
                and self.weight.dtype == torch.int8
            ):
                step_x, w_step = self._steps()
                hand_over = (float(out.inv_step), out.qmax) if out.grid else None
                bias = None if self.bias is None else self.bias.detach()
                part = (self.weight.detach(), step_x * w_step, bias, out.relu or out.grid, hand_over)
            cache[key] = part
        return cache[key]

    def _packed_1x1(self, signed: bool, zero_point: int) -> torch.Tensor:
        key = f"packed_1x1_{signed}_{zero_point}"
        if key not in self._cache:
            w = kernels.signed_weight(self.weight) if signed else self.weight
            step_x, w_step = self._steps()
            self._cache[key] = torch.ops.onednn.qconv_prepack(
                w.reshape(w.shape[0], w.shape[1], 1, 1), w_step, step_x, zero_point, [1, 1], [0, 0], [1, 1], 1, None,
            )
        return self._cache[key]

    @torch.compiler.disable  # eager kernels only (see Int8Module._forward)
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def _traced(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if "input_smoothing" in self._buffers:  # lq.smooth_quant: the fake-quant model's x / s
            x2 = x2.float() / self.input_smoothing
        t, poison = traced.quantize(x2, self.input_scale, self.qmax_input, self.name)
        step_x, w_step = self._steps()
        if traced.use_int_mm(x.device, self.backend, self.in_features, self.out_features):
            acc = traced.int_mm_exact(t.to(torch.int8), self.weight.t(), self.qmax_input, self.qmax)
            y = acc * (step_x * w_step)
        else:
            y = self._reference(t, step_x, w_step)
        if self.bias is not None:
            y = y + self.bias
        if poison is not None:
            y = y + poison
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _reference(self, t: torch.Tensor, step_x: float | torch.Tensor, w_step: torch.Tensor) -> torch.Tensor:
        """Eq. 10 without the bias by the exact reference kernel: float math on the integer grid ``t`` (fp32
        where every partial sum stays below 2^24, else fp64), scaled, as fp32."""
        dt = kernels.exact_float_dtype(self.in_features, self.qmax_input, self.qmax, t.device)
        return (F.linear(t.to(dt), self.weight.to(dt)) * (step_x * w_step).to(dt)).float()

    def run(
        self, x: torch.Tensor, grid: bool = False, out: kernels.Output = kernels.FLOAT, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Eq. 10 with a choice of input and output form (``lq.deploy.chain`` hands integers between layers).

        ``grid=False``: ``x`` is a float input, quantized here (eq. 7). ``grid=True``: ``x`` already holds this
        layer's non-negative input integers (uint8 or fp32), e.g. from the previous layer's ``out``.
        ``out``: float output (``dtype``, default ``x.dtype``), optionally after ReLU, or the next layer's
        input integers (``kernels.Output``).
        """
        dtype = dtype or x.dtype
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (at batch 1 every skipped call counts)
        if not grid and "input_smoothing" in self._buffers:  # lq.smooth_quant: the fake-quant model's x / s
            x2 = (x2 if x2.dtype == torch.float32 else x2.float()) / self.input_smoothing
        kernel = self._kernel(x.device, _LINEAR_KERNELS) if x.numel() else "reference"
        if (
            kernel == "fbgemm" and not grid and not out.grid and out.upper is None and x2.shape[0] <= gemv.MAX_ROWS
            and x2.shape[1] == self.in_features and not torch.jit.is_tracing()  # (a trace cannot see the C call)
        ):
            # a few rows: eq. 7, fbgemm's eq. 10 and ReLU in one call of lq/deploy/gemv.c (same numbers)
            chain = self._gemv_chain(out.relu)
            y = None if chain is None else chain(x2 if x2.dtype == torch.float32 else x2.float())
            if y is not None:  # (None: a NaN / Inf input, which quantize_to_grid below reports)
                hw.ran("Int8Linear", "gemv")
                y = y if x.dim() == 2 else y.reshape(*lead, self.out_features)
                return y if y.dtype == dtype else y.to(dtype)
        t = x2 if grid else kernels.quantize_to_grid(x2, self.input_scale, self.qmax_input)
        hw.ran("Int8Linear", kernel)
        step_x, w_step = self._steps()
        act_done = False
        if kernel == "fbgemm":
            # the bias is in the pack; fbgemm fuses ReLU but not the requantization (out.finish does it)
            relu = out.relu or out.grid
            y = kernels.fbgemm_linear(t, self._packed_fbgemm, kernels.fbgemm_mode(), relu=relu, nonneg=grid)
            act_done = relu and out.upper is None  # fbgemm has no clip: ReLU6 / Hardtanh finish in torch
        elif kernel == "onednn":
            u, zp, signed = kernels.u8_operand(t, kernels.onednn_mode(), nonneg=grid)
            if t.shape[0] <= SMALL_BATCH:
                # oneDNN's int8 inner product is slow for a few rows (about 2x its 1x1 convolution at M=1 on
                # AVX2); the same GEMM as a 1x1 convolution over an (M, K, 1, 1) batch is exact and faster
                y = kernels.onednn_conv(
                    u.reshape(-1, u.shape[1], 1, 1), zp, self._packed_1x1(signed, zp), step_x, w_step, self.bias,
                    (1, 1), (0, 0), (1, 1), 1, out,
                ).reshape(-1, self.out_features)
            else:
                y = kernels.onednn_linear(u, zp, self._packed_linear(signed), step_x, w_step, self.bias, out)
            act_done = True
        elif kernel == "int_mm":
            if "padded" not in self._cache:
                self._cache["padded"] = kernels.pad_weight_for_int_mm(self.weight)
            acc = kernels.int_mm_linear(t.float(), self._cache["padded"], self.out_features)
            y = acc.float() * (step_x * w_step)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = self._reference(t, step_x, w_step)
            if self.bias is not None:
                y = y + self.bias
        y = out.finish(y, act_done)
        if x.dim() != 2:
            y = y.reshape(*lead, self.out_features)
        return y if out.grid or y.dtype == dtype else y.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, bits={self.bits}, "
            f"backend={self.backend}"
        )


class Int8ConvNd(Int8Module):
    """Conv1d/2d/3d as eq. 10 (a convolution is a GEMM over input-channel x kernel-window products).

    Non-zero padding modes (reflect, replicate, circular) and string padding pad the *integer* input
    first, which equals padding the real input since the grid is per tensor.
    """

    def __init__(self, conv: nn.Module, name: str, bits: int, backend: str, input_bits: int | None = None) -> None:
        super().__init__(name, bits, backend, input_bits)
        onednn_op.register(self)  # compiled graphs reach the eager oneDNN kernel by id(self)
        dev = conv.weight.device
        self.dims = conv.weight.dim() - 2
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.dilation = tuple(conv.stride), tuple(conv.dilation)
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self.padding = conv.padding  # tuple of ints or "same"/"valid"
        self._pre_pad = None
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            self._pre_pad = tuple(conv._reversed_padding_repeated_twice)
        self.register_buffer("weight", torch.zeros(conv.weight.shape, dtype=torch.int8, device=dev))
        self.register_buffer("weight_scale", torch.ones(self.out_channels, device=dev))
        self.register_buffer("input_scale", torch.ones((), device=dev))
        self.register_buffer("bias", torch.zeros(self.out_channels, device=dev) if conv.bias is not None else None)

    @classmethod
    def from_quant(cls, conv: nn.Module, name: str, weight_amax: torch.Tensor, backend: str = "auto") -> Int8ConvNd:
        """Build from a calibrated ``QuantConv1d/2d/3d`` (``weight_amax``: per output channel)."""
        bits_w, bits_x = conv.weight_quantizer.spec.bits, conv.input_quantizer.spec.bits
        _same_bits(name, bits_w, bits_x)
        m = cls(conv, name, bits_w, backend, bits_x)
        return _load_quantized(m, conv, weight_amax, axis=0)

    def _packed(self, signed: bool, zero_point: int, stride: tuple[int, ...], padding: tuple[int, ...]) -> torch.Tensor:
        key = f"packed_{signed}_{zero_point}_{stride}_{padding}"
        if key not in self._cache:
            w = kernels.signed_weight(self.weight) if signed else self.weight
            step_x, w_step = self._steps()
            self._cache[key] = torch.ops.onednn.qconv_prepack(
                w, w_step, step_x, zero_point,
                list(stride), list(padding), list(self.dilation), self.groups, None,
            )
        return self._cache[key]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        onednn_op.register(self)  # a copy or an unpickled layer is a new object: registered under its own id

    def onednn_u8(
        self, u: torch.Tensor, zp: int, signed: bool = False, out: kernels.Output = kernels.FLOAT
    ) -> torch.Tensor:
        """Eq. 10 with the bias and the output stage ``out`` on oneDNN, for the u8 operand ``u`` with zero point
        ``zp`` (``kernels.u8_operand``; ``signed``: the half-range ``[P, N]`` split). Also what a compiled
        graph calls (``lq.deploy.onednn_op``). The call is bound once per input size (a compiled ResNet makes
        nine of them per forward, where each Python step counts)."""
        scale, dtype, post_op, scalars = kernels.onednn_output(out)  # the output stage by value: callers may
        key = ("onednn_u8", tuple(u.shape[2:]), zp, signed, scale, dtype, post_op, tuple(scalars))  # build `out`s
        call = self._cache.get(key)
        if call is None:
            bound = [k for k in self._cache if isinstance(k, tuple) and k[0] == "onednn_u8"]
            if len(bound) >= _MAX_BOUND_CALLS:  # many input sizes (served images of any size): start over
                for k in bound:
                    del self._cache[k]
            # shape classes oneDNN gets wrong (a single output position with stride > 1, windows all in the
            # padding) run with the same numbers another way (lq.ops.hardware.onednn_conv_plan)
            plan = hw.onednn_conv_plan(u.shape[2:], self.kernel_size, self.stride, self._kernel_padding(), self.dilation)
            step_x, w_step = self._steps()
            call = self._cache[key] = kernels.onednn_conv_call(
                zp, self._packed(signed, zp, tuple(plan.stride), tuple(plan.padding)), step_x, w_step, self.bias,
                plan, self.dilation, self.groups, out,
            )
        return call(u)

    def conv_part(self, out: kernels.Output) -> tuple | None:
        """This convolution's entry of a :class:`lq.deploy.gemv.ConvChain` writing ``out``: ``("conv", int8
        weight, fp32(step_x) * step_w (oneDNN forms it in fp32), bias, ReLU, the next layer's (s, qmax) or None,
        stride, padding, dilation, step_x, step_w, input scale)`` for a 2-D convolution with groups 1 and zero
        padding whose CPU kernel is oneDNN (the chain computes oneDNN's numbers) and an ``out`` that is a float
        output or a ReLU'd hand-over to the next layer's grid; else ``None``. Kept in the kernel cache, under
        the geometry it was made for."""
        geometry = (tuple(self.stride), tuple(self.padding), tuple(self.dilation), self.groups)
        key = ("conv_part", geometry, out)  # (the chain reads key[2] as the Output)
        cache = self.sync_cache()
        if key not in cache:
            part = None
            if (
                self.dims == 2 and self.groups == 1 and self._pre_pad is None and self.weight.dtype == torch.int8
                and all(isinstance(p, int) for p in self.padding)
                and self._kernel(torch.device("cpu"), ("onednn",)) == "onednn"
                and out.upper is None and out.divisor is None
            ):
                step_x, w_step = self._steps()
                sx, sw = torch.tensor(step_x, dtype=torch.float32), w_step.detach().float()
                hand_over = (float(out.inv_step), out.qmax) if out.grid else None
                bias = None if self.bias is None else self.bias.detach()
                part = ("conv", self.weight.detach(), sx * sw, bias, out.relu or out.grid, hand_over,
                        *geometry[:3], float(sx), sw, float(self.input_scale))
            cache[key] = part
        return cache[key]

    def _kernel_padding(self) -> list[int]:
        return [0] * self.dims if self._pre_pad is not None else list(self.padding)

    def _terms(self) -> int:
        """Products each output sums: (in_channels / groups) * kernel window."""
        return (self.in_channels // self.groups) * _prod(self.kernel_size)

    def _reference(self, t: torch.Tensor, step_x: float | torch.Tensor, w_step: torch.Tensor) -> torch.Tensor:
        """Eq. 10 without the bias by the exact reference kernel: the float convolution of the integer grid
        ``t`` (already padded for non-zero padding modes; fp32 where every partial sum stays below 2^24, else
        fp64), scaled per output channel, as fp32."""
        dt = kernels.exact_float_dtype(self._terms(), self.qmax_input, self.qmax, t.device)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        acc = conv(t.to(dt), self.weight.to(dt), None, self.stride, self._kernel_padding(), self.dilation, self.groups)
        return (acc * (step_x * w_step).to(dt).reshape([1, -1] + [1] * self.dims)).float()

    @torch.compiler.disable  # eager kernels only (see Int8Module._forward)
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x).contiguous(memory_format=_memory_format(x))

    def _traced(self, x: torch.Tensor, gemm: bool = True) -> torch.Tensor:
        if x.dim() == self.dims + 1:
            # unbatched input: the float route (the strided im2col view trips torch's symbolic shapes when
            # such an input's sizes are dynamic)
            return self._traced(x.unsqueeze(0), gemm=False).squeeze(0)
        t, poison = traced.quantize(x, self.input_scale, self.qmax_input, self.name)
        if self._pre_pad is not None:
            t = F.pad(t, self._pre_pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        # big convolutions on CPU: the layer's own oneDNN kernel, called from the graph
        y = onednn_op.conv2d(self, t) if gemm and self.dims == 2 else None
        if y is not None:
            return y.to(x.dtype).contiguous(memory_format=_memory_format(x))  # (poison: CUDA only)
        step_x, w_step = self._steps()
        shape = [1, -1] + [1] * self.dims
        terms = self._terms()
        gemm = gemm and self.dims == 2 and self.groups == 1
        if gemm and traced.use_int_mm(x.device, self.backend, terms, self.out_channels):
            w_kn = self.weight.permute(2, 3, 1, 0).reshape(terms, self.out_channels)  # taps outer, channels inner
            acc = traced.conv2d_int_mm(
                t, w_kn, self.kernel_size, self.stride, tuple(self._kernel_padding()), self.dilation,
                self.qmax_input, self.qmax,
            )
            y = acc * (step_x * w_step).reshape(shape)
        else:
            y = self._reference(t, step_x, w_step)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        if poison is not None:
            y = y + poison
        # the eager layer's layout: user code after it may .view() the output
        return y.to(x.dtype).contiguous(memory_format=_memory_format(x))

    def run(
        self, x: torch.Tensor, grid: bool = False, out: kernels.Output = kernels.FLOAT, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Eq. 10 as a convolution, input and output forms as in :meth:`Int8Linear.run`. The output keeps the
        kernel's memory layout (oneDNN: channels-last); ``forward`` restores the input's."""
        dtype = dtype or x.dtype
        if x.dim() == self.dims + 1:  # unbatched input, as nn.Conv accepts it
            return self.run(x.unsqueeze(0), grid, out, dtype).squeeze(0)
        t = x if grid else kernels.quantize_to_grid(x, self.input_scale, self.qmax_input)
        if self._pre_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            t = F.pad(t.float(), self._pre_pad, mode=mode)
        step_x, w_step = self._steps()
        act_done = False
        kernel = self._kernel(x.device, ("onednn",)) if x.numel() else "reference"
        hw.ran(f"Int8Conv{self.dims}d", kernel)
        if kernel == "onednn":
            u, zp, signed = kernels.u8_operand(t, kernels.onednn_mode(), self.groups, nonneg=grid)
            # oneDNN's quantized conv1d/conv3d take no ReLU/clip post-op: floats out, out.finish does the rest
            y = self.onednn_u8(u, zp, signed, out if self.dims == 2 else kernels.FLOAT)
            act_done = self.dims == 2
        else:
            y = self._reference(t, step_x, w_step)
            if self.bias is not None:
                y = y + self.bias.reshape([1, -1] + [1] * self.dims)
        y = out.finish(y, act_done)
        return y if out.grid else y.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"bits={self.bits}, backend={self.backend}"
        )


class Int8ConvTranspose2d(Int8Module):
    """ConvTranspose2d as eq. 10 through the exact reference kernel (per-channel weights on axis 1)."""

    def __init__(self, conv: nn.ConvTranspose2d, name: str, bits: int, backend: str, input_bits: int | None = None) -> None:
        super().__init__(name, bits, backend, input_bits)
        dev = conv.weight.device
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)
        self.output_padding = tuple(conv.output_padding)
        self.groups = conv.groups
        self.register_buffer("weight", torch.zeros(conv.weight.shape, dtype=torch.int8, device=dev))
        self.register_buffer("weight_scale", torch.ones(conv.weight.shape[1], device=dev))
        self.register_buffer("input_scale", torch.ones((), device=dev))
        self.register_buffer("bias", torch.zeros(self.out_channels, device=dev) if conv.bias is not None else None)

    @classmethod
    def from_quant(cls, conv: nn.ConvTranspose2d, name: str, weight_amax: torch.Tensor, backend: str = "auto") -> Int8ConvTranspose2d:
        """Build from a calibrated ``QuantConvTranspose2d`` (``weight_amax``: per output channel, axis 1)."""
        bits_w, bits_x = conv.weight_quantizer.spec.bits, conv.input_quantizer.spec.bits
        _same_bits(name, bits_w, bits_x)
        m = cls(conv, name, bits_w, backend, bits_x)
        return _load_quantized(m, conv, weight_amax, axis=1)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        self._check_inference(x)
        if not torch.compiler.is_compiling():
            self.sync_cache()
        output_padding = nn.modules.conv._ConvTransposeNd._output_padding(
            self, x, output_size, list(self.stride), list(self.padding), list(self.kernel_size), 2, list(self.dilation)
        )
        t = self._to_grid(x, self.input_scale, self.qmax_input)
        # each output sums at most (in/groups) * kH * kW products
        terms = (self.in_channels // self.groups) * _prod(self.kernel_size)
        dt = kernels.exact_float_dtype(terms, self.qmax_input, self.qmax, x.device)
        acc = F.conv_transpose2d(
            t.to(dt), self.weight.to(dt), None, self.stride, self.padding, output_padding, self.groups, self.dilation
        )
        # weight_scale indexes out/groups on axis 1; output channel o = g * (out/groups) + j uses s_w[j]
        step_x, w_step = self._steps()
        y = (acc * (step_x * w_step.repeat(self.groups)).to(dt).reshape(1, -1, 1, 1)).float()
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bits={self.bits}, backend=reference"
        )


class Int8Matmul(Int8Module):
    """``a @ b`` on two per-tensor quantized activations: ``(a_q @ b_q) / (s_a s_b)`` (eq. 10, no weight).

    Runs the exact reference kernel (float math on integers; fp32 when ``K * qmax^2 < 2^24``).
    """

    def __init__(self, name: str, bits_a: int, bits_b: int, backend: str = "auto", device: torch.device | None = None) -> None:
        super().__init__(name, bits_a, backend)
        self.bits_other = int(bits_b)
        self.qmax_other = qmax(self.bits_other)
        self.register_buffer("input_scale", torch.ones((), device=device))
        self.register_buffer("other_scale", torch.ones((), device=device))

    @classmethod
    def from_quant(cls, layer: nn.Module, name: str, backend: str = "auto") -> Int8Matmul:
        """Build from a calibrated ``QuantMatmul`` (both operands' per-tensor ranges)."""
        qa, qb = layer.input_quantizer, layer.other_quantizer
        m = cls(name, qa.spec.bits, qb.spec.bits, backend, qa.amax.device)
        m.input_scale.copy_(1.0 / steps_from_amax(qa.amax, qa.spec.bits).reshape(()))
        m.other_scale.copy_(1.0 / steps_from_amax(qb.amax, qb.spec.bits).reshape(()))
        return m

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self._check_inference(a, b)
        ta = self._to_grid(a, self.input_scale, self.qmax)
        tb = self._to_grid(b, self.other_scale, self.qmax_other)
        k = a.shape[-1] if a.dim() > 0 else 1
        dt = kernels.exact_float_dtype(k, self.qmax, self.qmax_other, a.device)
        acc = torch.matmul(ta.to(dt), tb.to(dt))
        y = (acc * (1.0 / (self.input_scale.to(dt) * self.other_scale.to(dt)))).float()
        return y.to(torch.promote_types(a.dtype, b.dtype))

    def extra_repr(self) -> str:
        return f"bits=({self.bits}, {self.bits_other}), backend=reference"


def _same_bits(name: str, bits_w: int, bits_x: int) -> None:
    if bits_w > 8 or bits_x > 8:
        raise ValueError(
            f"lq.convert: layer '{name}' uses {max(bits_w, bits_x)}-bit quantization; converted int8 layers "
            "hold at most 8 bits. Keep this layer in float (lq.set_quantization(model, False, "
            f"['{name}'])) or skip it in QuantConfig.skip, or deploy the fake-quant model"
        )
    if bits_w != bits_x:
        log.debug("%s: weight bits %d, input bits %d", name, bits_w, bits_x)

@torch.no_grad()
def _load_quantized(m: nn.Module, layer: nn.Module, weight_amax: torch.Tensor, axis: int) -> nn.Module:
    """Fill an inference layer's int8 weight, per-channel weight scales (channels on ``axis``), input scale
    and bias from a calibrated quantized layer (eq. 10's operands)."""
    bits_w, bits_x = layer.weight_quantizer.spec.bits, layer.input_quantizer.spec.bits
    w_q, s_w = quantize_weight(layer.quant_weight(), weight_amax, bits_w, axis=axis)  # W diag(s) if smoothed
    m.weight.copy_(w_q)
    m.weight_scale.copy_(s_w)
    m.input_scale.copy_(1.0 / steps_from_amax(layer.input_quantizer.amax, bits_x).reshape(()))
    s = layer.input_smoothing() if hasattr(layer, "input_smoothing") else None
    if s is not None:  # lq.smooth_quant: the layer quantizes x / s per input channel (Int8Linear.run)
        m.register_buffer("input_smoothing", s.detach().float().clone())
    bias = layer.quantized_bias() if hasattr(layer, "quantized_bias") else layer.bias  # with lq.correct_bias's shift
    if bias is not None:
        if m.bias is None:  # a layer without bias that bias correction gave one
            m.register_buffer("bias", torch.zeros(bias.shape, device=bias.device))
        m.bias.copy_(bias.detach().float())
    return m



def _prod(values: tuple[int, ...]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


__all__ = [
    "Int8ConvNd",
    "Int8ConvTranspose2d",
    "Int8Linear",
    "Int8Matmul",
    "Int8Module",
    "quantize_weight",
    "steps_from_amax",
]
