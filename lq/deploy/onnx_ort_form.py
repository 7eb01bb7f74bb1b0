"""lq's Q/DQ graph rewritten into the form onnxruntime's CPU provider fuses (``export_onnx(runtime="onnxruntime")``).

torch's exporter writes lq's fake-quant model as int8 zero-point-0 ``QuantizeLinear -> DequantizeLinear`` on
each quantized input and weight, float biases, and the ReLU / max pooling between two layers in float before
the next layer's Q (TensorRT's form). onnxruntime (CPU, x86) fuses a ``DQ -> Conv/Gemm/MatMul [-> Q]`` group
into ``QLinearConv`` / ``QGemm`` / ``QLinearMatMul`` / ``MatMulIntegerToFloat`` only when (ORT's
``qdq_selectors.cc``): every input of the op comes from a DQ, so the bias too (int32); Conv has a Q right
after it (a ReLU between them only when the Q's zero point is the type's minimum); and activations are
uint8 (int8 activations are refused on x86, and ORT's own int8 -> uint8 pass gives zero point 128, after
which a ReLU before the Q stays). It never fuses lq's ``Conv -> Relu -> MaxPool -> Q``.

The rewrites, each one exact for lq's grid (eq. 7: ``clip(round(x / step), -127, 127)``, symmetric):

1. Weights: ``Q(float initializer) -> DQ`` becomes an int8 initializer ``-> DQ`` (per channel: ``axis``), the
   integers of torch's fake-quant kernel, which is what the traced model computed with.
2. Activations: uint8, zero point 0 after a ReLU (or a clip whose lower end is >= 0), else zero point 128
   (the int8 grid shifted by 128). The symmetric clip at ``+-amax`` (and a ReLU / clip / ``Min`` / ``Max``
   between the layers) is an integer ``Clip`` between the Q and its DQ: ``[0, 127]`` after a ReLU,
   ``[1, 255]`` otherwise. That is the grid of lq, where a plain uint8 Q would reach 255 steps (and an
   int8 one -128).
3. The next layer's Q moves up to the output of the layer that produces its input, across ReLU / clips
   (carried out by the uint8 Q and the integer clip, so those nodes go) and max pooling, flatten, reshape,
   transpose, squeeze, unsqueeze, identity (monotone or data movement: ``Q(op(y)) = op(Q(y))``), when each
   tensor on the way has that one consumer. The original Q stays after those ops: it requantizes values
   already on its grid (exact), and ORT drops that ``DQ -> MaxPool/Flatten -> Q`` and runs the op on uint8.
   An average pooling whose input is a DQ (``QuantConfig(quantize_pooling=True)``) counts as such a layer:
   the Q after its flatten moves up to its output, and ORT fuses ``DQ -> GlobalAveragePool/AveragePool -> Q``
   into ``QLinearGlobalAveragePool`` / ``QLinearAveragePool``.
4. Biases of Conv/Gemm whose inputs are both DQs: int32 with scale ``s_x * s_w`` (per channel, ``axis`` 0),
   as ORT's fused group needs; only for a Conv that got its output Q, and every Gemm (``QGemm`` has a float
   output form). This rounding, at most half of ``s_x * s_w`` per output (half an accumulator unit), is the
   one change to lq's numbers: an integer of the next layer moves where its input sits within that much of
   a rounding boundary. ORT makes the same change itself when it fuses a graph with float biases (its
   ``WeightBiasQuantization`` pass, e.g. on the TensorRT form), and ORT's kernels requantize in their own
   float order (ties). ``tests/test_onnx_runtime_form.py`` states the tolerance.
5. A BatchNormalization after a quantized Conv (a model quantized before ``lq.fold_bn``) goes into that
   conv's weight scales (``s_w |a|``, integers negated where ``a < 0``) and bias: lq's integers, fp32
   rounding. Left in place, the BN between the conv and its output Q keeps ORT from fusing the conv.
6. A ReLU after a Gemm / MatMul whose output stays float becomes ``Max(y, 0)``: ORT reads a ReLU after a
   fusable op as a clip for an output Q, and without one refuses the float-output int8 kernel.
7. Float weights where ORT runs the layer in float: a quantized layer (input and weight from DQs, the
   weight an int8 initializer) that ORT's selectors leave unfused gets a float32 initializer holding its
   weight DQ's output instead of that DQ. Those layers are: a Conv whose output is not followed by a Q
   (directly, or through one ReLU / Clip), and a Conv or Gemm with an input that is not a DQ (a bias that
   rule 4 left float: no output Q, an int32 overflow, a per-channel axis that does not index the outputs)
   or a Gemm with ``beta != 1`` and a bias. A MatMul with both inputs from DQs always fuses (``QLinearMatMul``
   or ``MatMulIntegerToFloat``), a Gemm with all inputs from DQs too (``QGemm`` has a float output): they
   keep their int8 weight. The numbers do not change: the initializer is ``(q - zp) * scale`` computed
   exactly as ORT's DequantizeLinear kernel does (``float(int32(q) - zp) * scale``, one fp32 product per
   element, the scale and zero point taken along ``axis`` when per channel), so the float op sees the same
   weight tensor bit for bit; the activation Q/DQ on its input stays (lq quantizes that input). What
   changes is the speed: with a DQ output as weight ORT keeps a plain ``FusedConv`` whose weight it
   dequantizes every run, with a constant weight its NCHWc transformer applies (reordered, blocked weights).

A layer whose output reaches a non-commuting op before the next quantizer (global average pooling, a
residual add, a softmax, a Conv's graph output) has a float output in lq's model. Gemm and MatMul have
float-output int8 kernels (``QGemm``, ``MatMulIntegerToFloat``); Conv has only ``ConvInteger`` (per-tensor
weight zero point, and measured here ~6x slower than ORT's float Conv for a 64->128 3x3 conv at 7x7, batch
64), so such a Conv runs as a float Conv on its int8-grid input and lq's weights (rule 7): exact, not int8.
Running it in int8 needs a quantizer on that output in lq's model (as ``quantize_static`` puts one before
global average pooling and around adds). ``QuantConfig(quantize_pooling=True)`` gives average pooling one:
the Conv before global average pooling then has its output Q (rule 3) and fuses into ``QLinearConv``, and the
pooling runs as ``QLinearGlobalAveragePool`` when its output reaches the next layer's Q through ops that
commute with it (a SmoothQuant divisor on that layer's input, ``x / s``, does not: the pooling then runs in
float on its DQ's output, the Conv stays ``QLinearConv``). Residual adds still have no quantizer.

Not for TensorRT: it takes int8 Q/DQ only (no uint8, no integer Clip); ``runtime="tensorrt"`` keeps
torch's form.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: ops the next layer's quantizer commutes with (monotone, or moving data): Q(op(y)) = op(Q(y))
_COMMUTING = frozenset({"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"})
#: quantized ops ORT fuses
_LAYERS = frozenset({"Conv", "Gemm", "MatMul"})
#: average poolings ORT fuses with a DQ on the input and a Q on the output (``QLinear[Global]AveragePool``)
_POOLS = frozenset({"GlobalAveragePool", "AveragePool"})
_QMAX = 127
_INT32_MAX = 2**31 - 1


@dataclass
class RewriteReport:
    """What the rewrite did, for the export's log line and tests."""

    weights: int = 0  #: weight Q/DQ pairs turned into int8 initializers + DQ
    activations: int = 0  #: activation Q/DQ pairs turned into uint8
    hoisted: list[str] = field(default_factory=list)  #: layers (node names) that got their output Q
    int32_biases: list[str] = field(default_factory=list)  #: layers whose bias became int32 + DQ
    folded_batchnorms: list[str] = field(default_factory=list)  #: Convs whose BatchNormalization went into scales
    float_weights: list[str] = field(default_factory=list)  #: layers ORT runs in float: weight DQ -> fp32 initializer


class _Graph:
    """Producer / consumer maps and initializers (as numpy) of an ONNX graph being edited."""

    def __init__(self, graph: Any, onnx: Any) -> None:
        self.g = graph
        self.onnx = onnx
        self.nh = onnx.numpy_helper
        self.outputs = {o.name for o in graph.output}
        self._count = 0
        self._constants_to_initializers()
        self.inits = {t.name: t for t in graph.initializer}
        self.refresh()

    def _constants_to_initializers(self) -> None:
        """Constant nodes, and Identity nodes of initializers (torch's exporter shares equal parameters,
        e.g. BatchNorm statistics, that way), become initializers, so every constant is looked up alike."""
        inits = {t.name: t for t in self.g.initializer}
        keep = []
        for n in self.g.node:
            source = None
            if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
                source = n.attribute[0].t
            elif n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in self.outputs:
                source = inits[n.input[0]]
            if source is None:
                keep.append(n)
                continue
            t = self.onnx.TensorProto()
            t.CopyFrom(source)
            t.name = n.output[0]
            self.g.initializer.append(t)
            inits[t.name] = t
        del self.g.node[:]
        self.g.node.extend(keep)

    def refresh(self) -> None:
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)

    def array(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else self.nh.to_array(t)

    def new_name(self, base: str) -> str:
        self._count += 1
        return f"lq_ort/{base}_{self._count}"

    def add_initializer(self, array: np.ndarray, base: str) -> str:
        name = self.new_name(base)
        t = self.nh.from_array(array, name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def add_node(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> Any:
        node = self.onnx.helper.make_node(op, inputs, outputs, name=self.new_name(op), **attrs)
        self.g.node.append(node)
        return node

    def remove(self, node: Any) -> None:
        self.g.node.remove(node)

    def single_consumer(self, tensor: str) -> Any | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                return self.onnx.helper.get_attribute_value(a)
        return default

    def finish(self) -> None:
        """Topological node order (new nodes were appended), unused initializers dropped, stale value_info
        (tensor types changed) cleared."""
        ready = {i.name for i in self.g.input} | set(self.inits) | {""}
        pending, ordered = list(self.g.node), []
        while pending:
            rest = []
            for n in pending:
                if all(i in ready for i in n.input):
                    ordered.append(n)
                    ready.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                raise RuntimeError(f"export_onnx: the rewritten graph has a cycle or a missing input at {rest[0].name}")
            pending = rest
        del self.g.node[:]
        self.g.node.extend(ordered)
        used = {i for n in self.g.node for i in n.input} | self.outputs
        kept = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(kept)
        del self.g.value_info[:]


def _is_symmetric_int8(g: _Graph, node: Any) -> bool:
    """A Q or DQ with lq's export parameters: int8 zero point(s) 0."""
    zp = g.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return zp is not None and zp.dtype == np.int8 and not zp.any() and g.array(node.input[1]) is not None


def _weight_integers(w: np.ndarray, step: np.ndarray, axis: int) -> np.ndarray:
    """int8 ``w / step`` exactly as torch's fake-quant kernel rounds it (``x * (1 / step)``, half to even),
    the kernel the exported model was traced with (``lq.deploy.onnx_export._OnnxQuantizer``)."""
    wt = torch.from_numpy(np.array(w, dtype=np.float32))  # copies: initializer arrays are read-only
    st = torch.from_numpy(np.array(step, dtype=np.float32))
    if st.dim() == 0:
        fq = torch.fake_quantize_per_tensor_affine(wt, st, torch.zeros((), dtype=torch.int32), -128, 127)
        return torch.round(fq / st).to(torch.int8).numpy()
    axis %= wt.dim()
    fq = torch.fake_quantize_per_channel_affine(wt, st, torch.zeros(st.shape, dtype=torch.int32), axis, -128, 127)
    shape = [1] * wt.dim()
    shape[axis] = -1
    return torch.round(fq / st.reshape(shape)).to(torch.int8).numpy()


def _rewrite_weights(g: _Graph, report: RewriteReport) -> None:
    for q in [n for n in g.g.node if n.op_type == "QuantizeLinear"]:
        w = g.array(q.input[0])
        users = g.consumers.get(q.output[0], [])
        if w is None or not users or not all(u.op_type == "DequantizeLinear" for u in users):
            continue
        if not _is_symmetric_int8(g, q) or q.output[0] in g.outputs:
            continue
        w_q = _weight_integers(w, g.array(q.input[1]), g.attr(q, "axis", 1))
        name = g.add_initializer(w_q, "weight_int8")
        for dq in users:
            dq.input[0] = name
        g.remove(q)
        report.weights += 1
    g.refresh()


def _clip_bounds(g: _Graph, node: Any) -> tuple[str, float, float] | None:
    """``(data input, lower, upper)`` of a ReLU, or a Clip / Min / Max with constant scalar bounds."""
    if node.op_type == "Relu":
        return node.input[0], 0.0, math.inf
    if node.op_type == "Clip" and len(node.input) >= 1:
        lo = g.array(node.input[1]) if len(node.input) > 1 and node.input[1] else np.array(-math.inf)
        hi = g.array(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(math.inf)
        if lo is None or hi is None or lo.size != 1 or hi.size != 1:
            return None
        return node.input[0], float(lo), float(hi)
    if node.op_type in ("Min", "Max") and len(node.input) == 2:
        consts = [g.array(i) for i in node.input]
        data = [i for i, c in zip(node.input, consts) if c is None]
        bound = [c for c in consts if c is not None]
        if len(data) != 1 or len(bound) != 1 or bound[0].size != 1:
            return None
        b = float(bound[0])
        return (data[0], -math.inf, b) if node.op_type == "Min" else (data[0], b, math.inf)
    return None


def _is_quantized_layer(g: _Graph, node: Any) -> bool:
    if node.op_type not in _LAYERS or len(node.input) < 2:
        return False
    return all(g.producer.get(i) is not None and g.producer[i].op_type == "DequantizeLinear" for i in node.input[:2])


def _is_quantized_pooling(g: _Graph, node: Any) -> bool:
    """An average pooling whose input is a per-tensor DQ (lq's ``QuantConfig(quantize_pooling=True)``)."""
    if node.op_type not in _POOLS or not node.input:
        return False
    dq = g.producer.get(node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear":
        return False
    scale = g.array(dq.input[1])
    return scale is not None and scale.size == 1


def _walk_up(g: _Graph, q: Any) -> tuple[list[Any], Any | None, float, float]:
    """From a Q's input up through single-consumer clips and commuting ops: ``(chain from the top, the
    node producing the chain's input, lower bound, upper bound)``. ``producer`` is None where the walk stops
    at a tensor with other consumers (or a graph input / output)."""
    chain: list[Any] = []
    lo, hi = -math.inf, math.inf
    tensor = q.input[0]
    while True:
        node = g.producer.get(tensor)
        if node is None or g.single_consumer(tensor) is None:
            return chain[::-1], None, lo, hi
        clip = _clip_bounds(g, node)
        if clip is not None:
            lo, hi = max(lo, clip[1]), min(hi, clip[2])
            data = clip[0]
        elif node.op_type in _COMMUTING and len([o for o in node.output if o]) == 1:
            data = node.input[0]
        else:
            return chain[::-1], node, lo, hi
        chain.append(node)
        tensor = data


def _integer_clip(step: float, lo: float, hi: float, zero: int) -> tuple[int, int]:
    """uint8 bounds of ``Q(clip(y, lo, hi))`` on lq's grid: ``clip(Q(y), Q(lo), Q(hi))`` (Q is monotone),
    within ``[-127, 127]``, plus the zero point."""
    s = np.float32(step)

    def q(v: float) -> float:
        return float(np.round(np.float32(v) / s)) if math.isfinite(v) else v

    lo_q = max(-_QMAX, q(lo))
    hi_q = min(_QMAX, q(hi))
    return int(min(max(lo_q + zero, 0), 255)), int(min(max(hi_q + zero, 0), 255))


def _rewrite_activation(g: _Graph, q: Any, report: RewriteReport) -> None:
    dqs = g.consumers.get(q.output[0], [])
    if (
        g.array(q.input[0]) is not None
        or not dqs
        or q.output[0] in g.outputs
        or not _is_symmetric_int8(g, q)
        or g.array(q.input[1]).size != 1
        or not all(d.op_type == "DequantizeLinear" and d.input[1:3] == q.input[1:3] for d in dqs)
    ):
        return
    step = float(g.array(q.input[1]))
    chain, producer, lo, hi = _walk_up(g, q)
    zero = 0 if lo >= 0 else 128
    zp = g.add_initializer(np.array(zero, dtype=np.uint8), "zero_point")
    clip_lo, clip_hi = _integer_clip(step, lo, hi, zero)
    scale = q.input[1]

    def clipped(tensor: str) -> str:
        if clip_lo == 0 and clip_hi == 255:
            return tensor
        bounds = [g.add_initializer(np.array(b, dtype=np.uint8), "clip") for b in (clip_lo, clip_hi)]
        out = g.new_name("clipped")
        g.add_node("Clip", [tensor, *bounds], [out])
        return out

    q.input[2] = zp
    for d in dqs:
        d.input[2] = zp
    hoist = (
        producer is not None
        and (_is_quantized_layer(g, producer) or _is_quantized_pooling(g, producer))
        and g.single_consumer(producer.output[0]) is not None
    )
    if not hoist:
        # the Q stays where torch put it; the clips before it (if any) stay in float too
        grid = clipped(q.output[0])
        for d in dqs:
            d.input[0] = grid
        report.activations += 1
        return
    # drop the ReLU / clips of the chain: the uint8 Q and the integer clip carry them out
    for node in [n for n in chain if _clip_bounds(g, n) is not None]:
        data = _clip_bounds(g, node)[0]
        for user in g.consumers.get(node.output[0], []):
            user.input[:] = [data if i == node.output[0] else i for i in user.input]
        g.remove(node)
        g.refresh()
    moving = [n for n in chain if n in g.g.node]
    if not moving:  # the Q follows the layer directly now
        grid = clipped(q.output[0])
        for d in dqs:
            d.input[0] = grid
    else:
        # a Q/DQ after the layer; the original Q after the moving ops requantizes on the same grid, and the
        # integer clip goes after it (it commutes with them too): on the smaller tensor after max pooling,
        # and not between the fused layer and the pooling that ORT then runs on uint8 in NHWC
        q_out, dq_out = g.new_name("quantized"), g.new_name("dequantized")
        g.add_node("QuantizeLinear", [producer.output[0], scale, zp], [q_out])
        g.add_node("DequantizeLinear", [q_out, scale, zp], [dq_out])
        moving[0].input[0] = dq_out
        grid = clipped(q.output[0])
        for d in dqs:
            d.input[0] = grid
    g.refresh()
    report.activations += 1
    report.hoisted.append(producer.name or producer.output[0])


def _rewrite_bias(g: _Graph, node: Any, report: RewriteReport) -> None:
    if not _is_quantized_layer(g, node) or len(node.input) < 3 or not node.input[2]:
        return
    bias = g.array(node.input[2])
    if bias is None or bias.dtype != np.float32 or bias.ndim != 1:
        return
    if node.op_type == "Conv" and not _fuses_as_qlinear_conv(g, node):
        return  # stays a float Conv (no fused form with a float output): keep the float bias, exact
    elif node.op_type == "Gemm" and g.attr(node, "beta", 1.0) != 1.0:
        return
    x_dq, w_dq = g.producer[node.input[0]], g.producer[node.input[1]]
    s_x, s_w = g.array(x_dq.input[1]), g.array(w_dq.input[1])
    if s_x is None or s_w is None or s_x.size != 1 or g.array(w_dq.input[0]) is None:
        return
    if s_w.ndim == 1 and (g.attr(w_dq, "axis", 1) != 0 or (node.op_type == "Gemm" and g.attr(node, "transB", 0) != 1)):
        return  # per-channel along an axis that does not index the outputs: the bias cannot take that scale
    s_b = (np.float32(s_x) * s_w.astype(np.float32)).astype(np.float32)
    b_q = np.round(bias.astype(np.float64) / s_b.astype(np.float64))
    if not np.all(np.isfinite(b_q)) or np.abs(b_q).max(initial=0) > _INT32_MAX:
        return
    b_name = g.add_initializer(b_q.astype(np.int32), "bias_int32")
    s_name = g.add_initializer(s_b, "bias_scale")
    z_name = g.add_initializer(np.zeros(s_b.shape, dtype=np.int32), "bias_zero_point")
    out = g.new_name("bias")
    attrs = {"axis": 0} if s_b.ndim == 1 else {}
    g.add_node("DequantizeLinear", [b_name, s_name, z_name], [out], **attrs)
    node.input[2] = out
    g.refresh()
    report.int32_biases.append(node.name or node.output[0])


def _fuses_as_qlinear_conv(g: _Graph, node: Any) -> bool:
    users = g.consumers.get(node.output[0], [])
    return len(users) == 1 and users[0].op_type == "QuantizeLinear" and node.output[0] not in g.outputs


def _fold_batchnorm(g: _Graph, bn: Any, report: RewriteReport) -> None:
    """``Conv -> BatchNormalization`` (a model quantized before ``lq.fold_bn``): the BN's per-channel
    ``a = gamma / sqrt(var + eps)`` goes into the weight's DQ scale, ``s_w |a|`` (with the integers' sign
    flipped where ``a < 0``, so scales stay positive), and ``a b + beta - a mean`` into the bias. The weight
    integers stay lq's; the conv computes ``a (s_x s_w acc + b) + beta - a mean``, the fake-quant model's
    numbers up to fp32 rounding, and can take the next layer's Q."""
    conv = g.producer.get(bn.input[0])
    if conv is None or conv.op_type != "Conv" or not _is_quantized_layer(g, conv):
        return
    if g.single_consumer(conv.output[0]) is None or len([o for o in bn.output if o]) != 1:
        return
    params = [g.array(i) for i in bn.input[1:5]]
    w_dq = g.producer[conv.input[1]]
    if len(g.consumers[w_dq.output[0]]) != 1:
        return  # a weight shared with another layer keeps its scales
    w_q, s_w = g.array(w_dq.input[0]), g.array(w_dq.input[1])
    if any(p is None for p in params) or w_q is None or s_w is None or (s_w.ndim == 1 and g.attr(w_dq, "axis", 1) != 0):
        return
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    a = gamma / np.sqrt(var + g.attr(bn, "epsilon", 1e-5))
    channels = w_q.shape[0]
    bias = g.array(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(channels)
    if bias is None or a.shape != (channels,):
        return
    sign = np.where(a < 0, -1, 1)
    w_q = (w_q.astype(np.int16) * sign.reshape(-1, *[1] * (w_q.ndim - 1))).astype(np.int8)
    scale = (np.broadcast_to(s_w.astype(np.float64), (channels,)) * np.abs(a)).astype(np.float32)
    w_dq.input[0] = g.add_initializer(w_q, "weight_int8_bn")
    w_dq.input[1] = g.add_initializer(scale, "weight_scale_bn")
    w_dq.input[2] = g.add_initializer(np.zeros(channels, dtype=np.int8), "weight_zero_point_bn")
    if s_w.ndim == 0:
        w_dq.attribute.append(g.onnx.helper.make_attribute("axis", 0))
    new_bias = g.add_initializer((a * bias.astype(np.float64) + beta - a * mean).astype(np.float32), "bias_bn")
    if len(conv.input) > 2:
        conv.input[2] = new_bias
    else:
        conv.input.append(new_bias)
    conv.output[0] = bn.output[0]
    g.remove(bn)
    g.refresh()
    report.folded_batchnorms.append(conv.name or conv.output[0])


def _relu_after_float_output(g: _Graph, node: Any) -> None:
    """A ReLU right after a Gemm / MatMul whose output stays float becomes ``Max(y, 0)``: ORT takes a ReLU
    after a fusable op for a clip that the op's output Q makes redundant, and with no Q there it refuses
    the float-output ``QGemm`` / ``MatMulIntegerToFloat`` altogether."""
    relu = g.single_consumer(node.output[0])
    if relu is None or relu.op_type != "Relu" or not _is_quantized_layer(g, node):
        return
    zero = g.add_initializer(np.array(0.0, dtype=np.float32), "zero")
    relu.op_type = "Max"
    relu.input.append(zero)


def _ort_fuses(g: _Graph, node: Any) -> bool:
    """Whether ORT's QDQ selectors (``qdq_selectors.cc``: Conv, Gemm, MatMul node group selectors) take this
    quantized layer into an int8 kernel. Every present input must come from a DQ (the bias too); a Conv
    needs a Q on its output, alone or after one ReLU / Clip (which that Q makes redundant); a Gemm with a
    bias needs ``beta == 1``; a MatMul with a float output becomes ``MatMulIntegerToFloat``. Where unsure
    (types, clip bounds) this says "fuses": the layer then keeps its int8 weight DQ, exact either way."""
    inputs = [i for i in node.input if i]
    if not all(g.producer.get(i) is not None and g.producer[i].op_type == "DequantizeLinear" for i in inputs):
        return False
    if node.op_type == "Conv":
        after = g.single_consumer(node.output[0])
        if after is not None and after.op_type in ("Relu", "Clip"):
            after = g.single_consumer(after.output[0])
        return after is not None and after.op_type == "QuantizeLinear"
    if node.op_type == "Gemm":
        return len(inputs) < 3 or g.attr(node, "beta", 1.0) == 1.0
    return True


def _dequantized_weight(g: _Graph, dq: Any) -> np.ndarray | None:
    """The fp32 output of a weight DequantizeLinear on an int8 initializer, computed as ORT's kernel does:
    ``float(int32(q) - zp) * scale`` (one fp32 product, round to nearest even), per channel along ``axis``.
    None where the DQ is not of that kind (non-constant, non-int8, fp16 scale, blocked)."""
    q, scale = g.array(dq.input[0]), g.array(dq.input[1])
    if scale is None:
        return None
    zp = g.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(scale.shape, dtype=np.int8)
    if q is None or zp is None or q.dtype != np.int8 or scale.dtype != np.float32:
        return None
    if zp.shape != scale.shape or scale.ndim > 1 or g.attr(dq, "block_size", 0):
        return None
    if scale.ndim == 1:  # per channel: scale and zero point index dimension ``axis`` of the weight
        shape = [1] * q.ndim
        shape[g.attr(dq, "axis", 1) % q.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    diff = q.astype(np.int32) - zp.astype(np.int32)  # |q - zp| <= 255: exact in fp32
    return diff.astype(np.float32) * scale


def _float_weights_for_float_layers(g: _Graph, report: RewriteReport) -> None:
    """Rule 7 (module docstring): a quantized layer ORT leaves unfused reads its weight as an fp32
    initializer, the weight DQ's exact output, so ORT sees a float layer with constant weights."""
    for node in [n for n in g.g.node if n.op_type in _LAYERS]:
        if not _is_quantized_layer(g, node) or _ort_fuses(g, node):
            continue
        dq = g.producer[node.input[1]]
        w = _dequantized_weight(g, dq)
        if w is None:
            continue
        node.input[1] = g.add_initializer(w, "weight_float")
        g.refresh()
        if not g.consumers.get(dq.output[0]) and dq.output[0] not in g.outputs:
            g.remove(dq)  # its int8 initializer goes in finish() unless another DQ still reads it
            g.refresh()
        report.float_weights.append(node.name or node.output[0])


def rewrite_for_onnxruntime(model: Any, onnx: Any) -> RewriteReport:
    """Rewrite ``model`` (an ``onnx.ModelProto`` from lq's TensorRT-form export) in place; see the module
    docstring for the rules. Returns what changed."""
    g = _Graph(model.graph, onnx)
    report = RewriteReport()
    _rewrite_weights(g, report)
    for bn in [n for n in g.g.node if n.op_type == "BatchNormalization"]:
        _fold_batchnorm(g, bn, report)
    for q in [n for n in g.g.node if n.op_type == "QuantizeLinear"]:
        _rewrite_activation(g, q, report)
    for node in [n for n in g.g.node if n.op_type in ("Conv", "Gemm")]:
        _rewrite_bias(g, node, report)
    for node in [n for n in g.g.node if n.op_type in ("Gemm", "MatMul")]:
        _relu_after_float_output(g, node)
    _float_weights_for_float_layers(g, report)  # last: it reads the final Q placement and biases
    g.finish()
    return report


__all__ = ["RewriteReport", "rewrite_for_onnxruntime"]
