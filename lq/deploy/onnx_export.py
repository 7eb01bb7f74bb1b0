"""``lq.export_onnx``: the fake-quant model as ONNX with QuantizeLinear/DequantizeLinear pairs (TensorRT style).

Every quantized op gets a Q/DQ pair on each of its inputs (paper Section 4: "an operation is quantized by
quantizing all of its inputs"); outputs carry none (the next op quantizes its own input). Activations are
per tensor (scalar scale), weights per output channel (``axis`` attribute, hence opset >= 13); int8,
symmetric (zero point 0), scale = the step ``amax / 127`` (``1 / s`` of eq. 6). A builder such as TensorRT
fuses ``DQ -> Conv/Gemm`` with the Q of the next layer and runs eq. 10 in int8.

Exported with torch's TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), which turns torch's
fake-quant ops into Q/DQ natively and needs nothing beyond ``onnx`` (offline). ``runtime="onnxruntime"``
then rewrites that graph into the form onnxruntime's CPU provider fuses into its int8 kernels
(``lq.deploy.onnx_ort_form``: uint8 activations with lq's clip, int8 weight initializers, int32 biases,
each layer's output Q right after it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from lq.deploy.int8_layers import Int8Module, steps_from_amax
from lq.deploy.onnx_ort_form import rewrite_for_onnxruntime
from lq.extras import import_extra
from lq.nn.swap import quantized_layers
from lq.quant.functional import qmax
from lq.quant.quantizer import TensorQuantizer

log = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)
MIN_OPSET = 13  # per-channel QuantizeLinear (axis attribute)
Runtime = Literal["tensorrt", "onnxruntime"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)


class _OnnxQuantizer(TensorQuantizer):
    """Export-time stand-in for ``TensorQuantizer``: fake quantization with constant scales.

    The step is a precomputed constant tensor (so Q/DQ scales become initializers, as TensorRT requires),
    dynamic weight ranges are frozen at their current value, and the integer range is ONNX's int8
    ``[-128, 127]`` (the symmetric ``[-127, 127]`` grid of eq. 7 is kept by the scale: values within
    ``[-amax, amax]`` never reach -128). Fewer than 8 bits add a Clip to ``[-qmax, qmax]`` steps.
    """

    _lq_export_step: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "off":
            return x
        step = self._lq_export_step
        q = qmax(self.spec.bits)
        if q < 127:
            bound = step * q if self.axis is None else (step * q).reshape(_bshape(x, self.axis))
            x = torch.maximum(torch.minimum(x, bound), -bound)
        if self.axis is None:
            zero = torch.zeros((), dtype=torch.int32, device=step.device)
            return torch.fake_quantize_per_tensor_affine(x, step, zero, -128, 127)
        zero = torch.zeros(step.shape, dtype=torch.int32, device=step.device)
        return torch.fake_quantize_per_channel_affine(x, step, zero, self.axis % x.dim(), -128, 127)


def _bshape(x: torch.Tensor, axis: int) -> list[int]:
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return shape


def _check_exportable(model: nn.Module, opset: int) -> dict[str, nn.Module]:
    if opset < MIN_OPSET:
        raise ValueError(f"export_onnx: per-channel QuantizeLinear needs opset >= {MIN_OPSET}, got opset={opset}")
    if any(isinstance(m, Int8Module) for m in model.modules()):
        raise ValueError(
            "export_onnx: this model was converted with lq.convert; export the fake-quant model instead "
            "(before lq.convert): ONNX Q/DQ graphs are built from the fake-quant layers"
        )
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("export_onnx: the model has no quantized layers; call lq.quantize and lq.calibrate first")
    for name, layer in layers.items():
        for qname, q in layer.quantizers().items():
            if q.mode == "calibrate":
                raise RuntimeError(
                    f"export_onnx: layer '{name}' is still in calibrate mode; run lq.calibrate(model, data) first"
                )
            if q.mode == "quantize" and not q.dynamic and not q.is_calibrated:
                raise RuntimeError(
                    f"export_onnx: layer '{name}' was never calibrated ({qname} has no amax). Run "
                    f"lq.calibrate(model, data) first, or keep it in float with lq.set_quantization(model, False, ['{name}'])"
                )
            if q.mode == "quantize" and q.spec.bits > 8:
                raise ValueError(
                    f"export_onnx: layer '{name}' uses {q.spec.bits}-bit quantization; ONNX Q/DQ export here is "
                    "int8 only. Use bits <= 8 or keep the layer in float"
                )
    return layers


def _smoothing(layer: nn.Module) -> torch.Tensor | None:
    """The per-input-channel divisor of ``lq.smooth_quant`` (``QuantMixin.input_smoothing``), or None."""
    f = getattr(layer, "input_smoothing", None)
    return None if f is None else f()


def _quantized_weight(layer: nn.Module) -> torch.Tensor:
    """What the weight quantizer sees: ``W diag(s)`` for a layer smoothed by ``lq.smooth_quant``, else ``W``."""
    f = getattr(layer, "quant_weight", None)
    return layer.weight if f is None else f()


@contextlib.contextmanager
def _export_state(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[int]:
    """Eval mode, fp32, export quantizers and frozen weight ranges; everything restored on exit."""
    was_training = model.training
    half: list[tuple[nn.Module, str, str, torch.dtype]] = []
    for mod in model.modules():
        for kind, store in (("p", mod._parameters), ("b", mod._buffers)):
            for n, t in store.items():
                if t is not None and t.dtype in _HALF:
                    half.append((mod, kind, n, t.dtype))
    swapped: list[TensorQuantizer] = []
    clamped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        model.eval()
        for mod, kind, n, _ in half:  # only the half tensors: fp64 ones (if any) are left as they are
            if kind == "p":
                mod._parameters[n].data = mod._parameters[n].data.float()
            else:
                mod._buffers[n] = mod._buffers[n].float()
        count = 0
        for layer in layers.values():
            weight_q = getattr(layer, "weight_quantizer", None)
            for q in layer.quantizers().values():
                if q.mode != "quantize":
                    continue
                if q is weight_q and q.dynamic:
                    w = _quantized_weight(layer).detach()
                    amax = w.abs().amax() if q.axis is None else w.abs().amax(dim=[d for d in range(w.dim()) if d != q.axis % w.dim()])
                    q.set_amax(amax)  # what the next forward would compute: the current range, as a constant
                step = steps_from_amax(q.amax, q.spec.bits).detach().cpu()
                step = step.reshape(()) if q.axis is None else step.reshape(-1)
                if q is weight_q and not q.dynamic:
                    # a static (non-max) weight range can clip: clamp the exported weight so ONNX's -128 is
                    # never reached and the graph keeps the [-qmax, qmax] grid of the fake-quant model
                    w = layer.weight
                    bound = (step * qmax(q.spec.bits)).to(w.device, w.dtype)
                    bound = bound if q.axis is None else bound.reshape(_bshape(w, q.axis))
                    smoothing = _smoothing(layer)
                    if smoothing is not None:  # the quantizer sees W diag(s): clamp W to bound / s
                        bound = bound / smoothing.to(w.device, w.dtype).reshape(1, -1)
                    clamped.append((w, w.detach().clone()))
                    with torch.no_grad():
                        w.copy_(torch.maximum(torch.minimum(w, bound), -bound))
                q._lq_export_step = step.to(q.amax.device)
                q.__class__ = _OnnxQuantizer
                swapped.append(q)
                count += 1
        yield count
    finally:
        for q in swapped:
            q.__class__ = TensorQuantizer
            del q._lq_export_step
        with torch.no_grad():
            for w, orig in clamped:
                w.copy_(orig)
        for mod, kind, n, dt in half:
            if kind == "p":
                mod._parameters[n].data = mod._parameters[n].data.to(dt)
            else:
                mod._buffers[n] = mod._buffers[n].to(dt)
        model.train(was_training)


def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors (the model's positional inputs)")
    return tuple(a.float() if a.dtype in _HALF else a for a in args)


def count_qdq(path: str | os.PathLike) -> dict[str, int]:
    """``{"QuantizeLinear": n, "DequantizeLinear": m}`` in an ONNX file (main graph)."""
    onnx = import_extra("onnx", "lq.deploy.count_qdq")
    graph = onnx.load(str(path), load_external_data=False).graph
    return {op: sum(n.op_type == op for n in graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike,
    opset: int = 17,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    runtime: Runtime = "tensorrt",
) -> Path:
    """Export a calibrated fake-quant model to ONNX with QuantizeLinear/DequantizeLinear pairs.

    Export the fake-quant model (after ``lq.quantize`` + ``lq.calibrate`` / QAT), *not* the output of
    ``lq.convert``. Each quantized Linear/Conv gets Q/DQ on its input (per tensor) and on its weight (per
    output channel, ``axis`` 0, or 1 for ConvTranspose); ``lq.nn.Matmul`` gets Q/DQ on both inputs, average
    pooling quantized with ``QuantConfig(quantize_pooling=True)`` on its input. Layers whose quantizers are
    off stay float. Dynamic (max) weight ranges are exported at their current value, as constants. Scales
    are ``amax / 127`` (the step), zero points int8 0.

    Half-precision models (fp16/bf16) are exported as an fp32 graph (the parameters are cast for the
    export and restored after; half example inputs are cast too): ONNX QuantizeLinear below opset 19 takes
    fp32 only, and an fp32 Q/DQ graph is what TensorRT expects; ask the builder for fp16 to run the float
    layers in half. The model is put in eval mode for the export and its mode restored.

    ``runtime`` picks the graph's form; both compute lq's model:

    - ``"tensorrt"`` (default): int8 Q/DQ pairs as above, float biases, ReLU / pooling left where the model has
      them; TensorRT's builder moves and fuses them itself. One difference from the fake-quant model is
      ONNX's int8 range: an *activation* below ``-amax`` quantizes to -128 in ONNX and to -127 in lq
      (weights are clamped so they never differ).
    - ``"onnxruntime"``: the form onnxruntime's CPU provider fuses into ``QLinearConv`` / ``QGemm`` /
      ``MatMulIntegerToFloat`` (``lq.deploy.onnx_ort_form``): int8 weight initializers + DequantizeLinear
      (``axis``), int32 biases, uint8 activations with an integer Clip that keeps lq's ``[-127, 127]`` grid
      exactly, and each layer's output quantized by the next layer's scale right after it (across ReLU and
      max pooling, which commute with the quantizer). Outputs differ from the fake-quant model only where
      a hidden value sits within half an accumulator unit ``s_x s_w / 2`` of a rounding boundary (the
      int32 bias rounding ORT's fused kernels need; ORT does the same to float biases when it fuses the
      TensorRT form) or within float rounding of one (ORT's requantization order).
      A Conv whose output reaches a non-commuting op (global average pooling, a residual add) before the
      next quantizer stays a float Conv on int8-grid inputs (with ``QuantConfig(quantize_pooling=True)`` the
      pooling's input quantizer gives it an output Q: ``QLinearConv`` + ``QLinearGlobalAveragePool``): lq's
      model keeps that output in float; its weight is written as the fp32 values its DequantizeLinear gives
      (same numbers), so ORT sees constant weights and uses its fast (NCHWc) float conv. Not for TensorRT
      (no uint8 Q/DQ there).

    Deploy with TensorRT (explicit quantization from the Q/DQ nodes; no calibration cache needed)::

        trtexec --onnx=m.onnx --int8                  # int8 where Q/DQ say so, fp32 elsewhere
        trtexec --onnx=m.onnx --int8 --fp16           # mixed: non-quantized layers in fp16
        # dynamic batch: --minShapes=input:1x3x224x224 --optShapes=input:64x3x224x224 --maxShapes=input:256x3x224x224

    With onnxruntime (default graph optimizations fuse the int8 kernels)::

        lq.export_onnx(model, x, "m.onnx", runtime="onnxruntime")
        onnxruntime.InferenceSession("m.onnx", providers=["CPUExecutionProvider"])

    Args:
        model: a quantized, calibrated model.
        example_inputs: a tensor or tuple of tensors for one forward pass (the model's positional inputs).
        path: the .onnx file to write.
        opset: ONNX opset, >= 13 (per-channel Q/DQ).
        dynamic_batch: make dim 0 of every input and output dynamic ("batch").
        input_names / output_names: graph names (default ``input``/``input_i`` and ``output``/``output_i``).
        runtime: ``"tensorrt"`` or ``"onnxruntime"``: the form of the Q/DQ graph (above).

    Returns the path written.

    Raises:
        ImportError: onnx is not installed (``pip install 'lq[onnx]'``).
        ValueError: no quantized layers, a converted model, opset < 13, more than 8 bits, an unknown runtime.
        RuntimeError: a layer was never calibrated (named), or the model uses an operator ONNX cannot
            express at this opset (the operator is named).
    """
    onnx = import_extra("onnx", "lq.export_onnx")  # torch's exporter writes the file with it; fail before exporting
    if runtime not in RUNTIMES:
        raise ValueError(f"export_onnx: runtime must be one of {RUNTIMES}, got {runtime!r}")
    path = Path(path)
    layers = _check_exportable(model, opset)
    args = _as_tuple(example_inputs)
    if input_names is None:
        input_names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    input_names = list(input_names)
    with _export_state(model, layers) as n_quantizers:
        with torch.no_grad():
            out = model(*args)
        n_out = 1 if isinstance(out, torch.Tensor) else len(out)
        if output_names is None:
            output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        output_names = list(output_names)
        dynamic_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
                torch.onnx.export(
                    model,
                    args,
                    str(path),
                    opset_version=opset,
                    dynamo=False,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
        except Exception as err:
            op = _operator_name(str(err))
            if op is not None or "not supported" in str(err).lower():
                raise RuntimeError(
                    f"export_onnx: the model uses an operator ONNX opset {opset} cannot express: "
                    f"{op or 'see the cause below'}. Try a higher opset (opset=...), replace the operator, or "
                    f"keep that part of the model outside the exported module. Cause: {err}"
                ) from err
            raise
    form = ""
    if runtime == "onnxruntime":
        proto = onnx.load(str(path))
        report = rewrite_for_onnxruntime(proto, onnx)
        onnx.save(proto, str(path))
        form = (f", onnxruntime form: {len(report.hoisted)} layers with their output quantized, "
                f"{len(report.int32_biases)} int32 biases, {len(report.float_weights)} float layers with "
                f"fp32 weight initializers")
    counts = count_qdq(path)
    log.info(
        "export_onnx: wrote %s (opset %d, %d quantizers, %d QuantizeLinear / %d DequantizeLinear%s)",
        path, opset, n_quantizers, counts["QuantizeLinear"], counts["DequantizeLinear"], form,
    )
    return path


def _operator_name(message: str) -> str | None:
    m = re.search(r"operator '?([A-Za-z_]+::[A-Za-z0-9_.]+)'?", message)
    if m:
        return m.group(1)
    m = re.search(r"\b(aten::[A-Za-z0-9_.]+)", message)
    return m.group(1) if m else None


__all__ = ["RUNTIMES", "count_qdq", "export_onnx"]
