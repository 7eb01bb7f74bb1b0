"""``export_onnx(runtime="onnxruntime")``: the Q/DQ graph onnxruntime fuses into its int8 kernels, with lq's numbers.

Evidence of fusion is onnxruntime's own optimized graph (``SessionOptions.optimized_model_filepath``, default
optimizations, CPU provider): its node types per quantized layer.

"Within one output step", precisely: the bound is one quantization step of the last quantized layer's input
times that layer's largest ``|W|`` (what one flipped input integer of the last layer changes in an output;
the float output of the last layer has no output quantizer of its own), as in ``test_deploy.py``. The
reference is lq's fake-quant model in PyTorch with one change: each bias the export made int32 is rounded
to its grid ``s_x * s_w`` (``|db| <= s_x s_w / 2``), because onnxruntime's fused kernels add an int32 bias
(its own optimizer rounds float biases the same way when it fuses lq's TensorRT-form graph). On the
synthetic models here every output is within one step of that reference, with graph optimizations off (the
graph's semantics) and on (ORT's int8 kernels). On real data a hidden value sitting within float rounding of
a half step may requantize to the neighbouring integer (ORT sums in another order), which moves a few rows
further: at most 0.5% of rows beyond one step and none beyond four (``test_real_data.py``'s rule). Against
the fake-quant model with its float biases, the int32 rounding moves a hidden integer wherever its value sits
within ``s_x s_w / 2`` of a rounding boundary: on the pretrained MNIST CNN 2 of 2000 top-1 predictions change
(the reference's too). Fused runs are compared on VNNI hosts only (``ORT_INT8_EXACT``).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import lq
from lq.deploy import count_qdq, export_onnx, onednn_mode
from lq.deploy.int8_layers import steps_from_amax

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402
from test_deploy import LAYERS, Attention, Wrap  # noqa: E402
from test_real_data import mnist_ptq  # noqa: E402, F401 - module-scoped fixture: the pretrained MNIST CNN after PTQ

#: max calibration, and no SmoothQuant where the option exists: the layers here are plain quantized layers
CFG = lq.QuantConfig(
    activation=lq.QuantSpec(calibrator="max"),
    **({"smoothquant": False} if "smoothquant" in {f.name for f in dataclasses.fields(lq.QuantConfig)} else {}),
)
#: onnxruntime's u8 x s8 kernels sum exactly with VNNI; without it (AVX2) they saturate int16 pair sums of
#: large uint8 inputs (ORT's documented issue, its remedy 7-bit weights), as oneDNN does (test_deploy._session):
#: there the fused runs are not compared, only the graph's semantics and which kernels ORT picks
ORT_INT8_EXACT = onednn_mode() == "full_range"
OPTIMIZATIONS = (False, True) if ORT_INT8_EXACT else (False,)
INT8_NODES = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat"}
#: ORT's float forms of the same layers (Fused*: with an activation; Conv also as its NCHWc kernel)
FLOAT_NODES = {"Conv": "float Conv", "FusedConv": "float Conv", "Gemm": "float Gemm", "FusedGemm": "float Gemm",
               "MatMul": "float MatMul", "FusedMatMul": "float MatMul"}


# ---------------------------------------------------------------------------------------------- models
class MnistLike(nn.Module):
    """conv-ReLU-pool x2, flatten, Linear-ReLU-Linear: every layer's output reaches the next quantizer through
    ops that commute with it, so every layer can fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 3 * 3, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Dropout(0.1), nn.Linear(40, 6))


def _small_cnn() -> nn.Module:
    """lq.models.SmallCNN (conv-BN-ReLU x3, max-pools, global average pool, Linear), BN folded."""
    from lq.models import SmallCNN

    m = SmallCNN(width=8).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    lq.fold_bn(m)
    return m


def _chain(kind: str) -> nn.Module:
    """Two layers of one kind with a ReLU between (the first one's output is requantized by the second)."""
    if kind == "conv1d":
        return nn.Sequential(nn.Conv1d(5, 7, 3, padding=1), nn.ReLU(), nn.Conv1d(7, 4, 3, stride=2))
    if kind == "conv3d":
        return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(4, 3, 1))
    if kind == "conv2d_groups":
        return nn.Sequential(
            nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=4), nn.ReLU6(), nn.Conv2d(12, 12, 3, groups=12)
        )
    raise KeyError(kind)


CHAIN_INPUTS = {"conv1d": (4, 5, 23), "conv3d": (2, 2, 6, 6, 6), "conv2d_groups": (3, 8, 9, 9)}


# ---------------------------------------------------------------------------------------------- helpers
def _quantize_calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.eval()
    lq.quantize(model, CFG)
    lq.calibrate(model, [x], num_samples=None, method="max")
    return model


def _weight_seen(layer: nn.Module) -> torch.Tensor:
    """The tensor the weight quantizer quantizes (``W diag(s)`` where ``lq.smooth_quant`` smoothed the layer)."""
    f = getattr(layer, "quant_weight", None)
    return (layer.weight if f is None else f()).detach()


def _bound(model: nn.Module) -> float:
    """One output step: the last quantized layer's input step times its largest |W| (see the module doc)."""
    layer = list(lq.quantized_layers(model).values())[-1]
    x_step = layer.input_quantizer.amax.item() / 127
    if hasattr(layer, "weight"):
        return x_step * _weight_seen(layer).abs().max().item()
    return x_step * layer.other_quantizer.amax.item()  # Matmul: the other operand plays the weight


def _int32_bias_reference(model: nn.Module, path) -> nn.Module:
    """The fake-quant model with every bias that the export wrote as int32 rounded to its grid ``s_x * s_w``.

    A layer's bias counts as exported int32 when the graph holds an int32 DequantizeLinear input equal to
    ``round(b / (s_x s_w))`` computed here from the layer's own quantizers."""
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    int32 = {name for name, t in inits.items() if t.data_type == onnx.TensorProto.INT32}
    grids = [numpy_helper.to_array(inits[n.input[0]]) for n in proto.graph.node
             if n.op_type == "DequantizeLinear" and n.input[0] in int32]
    ref = copy.deepcopy(model)
    for layer in lq.quantized_layers(ref).values():
        if getattr(layer, "bias", None) is None or getattr(layer, "weight_channel_axis", None) != 0:
            continue
        w, wq = _weight_seen(layer), layer.weight_quantizer
        amax = w.abs().amax(dim=list(range(1, w.dim()))) if wq.dynamic else wq.amax
        s_b = steps_from_amax(layer.input_quantizer.amax, 8).reshape(()) * steps_from_amax(amax, 8).reshape(-1)
        b_q = torch.round(layer.bias.detach().double() / s_b.double())
        if any(g.shape == tuple(b_q.shape) and np.array_equal(g, b_q.numpy()) for g in grids):
            with torch.no_grad():
                layer.bias.copy_(b_q.float() * s_b)
    return ref


def _session(path, optimize: bool):
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path, x: torch.Tensor, optimize: bool) -> torch.Tensor:
    return torch.from_numpy(_session(path, optimize).run(None, {"input": x.numpy()})[0])


def _optimized_nodes(path, tmp_path) -> list[str]:
    """Node types of onnxruntime's optimized graph (what its CPU provider runs)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def _layer_kernels(nodes: list[str]) -> dict[str, int]:
    """How many of the optimized graph's nodes are int8 kernels (by type) and float conv / GEMM / matmul."""
    out: dict[str, int] = {}
    for op in nodes:
        kind = op if op in INT8_NODES else FLOAT_NODES.get(op)
        if kind is not None:
            out[kind] = out.get(kind, 0) + 1
    return out


def _export(model: nn.Module, x: torch.Tensor, tmp_path, name: str):
    path = export_onnx(model, x[:2], tmp_path / f"{name}.onnx", runtime="onnxruntime")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def _assert_within_one_step(model: nn.Module, path, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = _int32_bias_reference(model, path)(x)
    bound = _bound(model)
    for optimize in OPTIMIZATIONS:
        err = (_run(path, x, optimize) - ref).abs().max().item()
        assert err <= bound, (f"optimizations {'on' if optimize else 'off'}", err / bound)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "name,make,shape,expected",
    [
        ("mlp", _mlp, (64, 24), {"QGemm": 3}),
        ("mnist_like", MnistLike, (32, 1, 12, 12), {"QLinearConv": 2, "QGemm": 2}),
        # the last conv feeds global average pooling: lq keeps that output in float (no quantizer until the
        # head's input), and ORT has no fast int8 conv with a float output, so it stays a float Conv
        ("small_cnn", _small_cnn, (16, 1, 16, 16), {"QLinearConv": 2, "QGemm": 1, "float Conv": 1}),
    ],
)
def test_fused_int8_nodes_and_outputs(name, make, shape, expected, tmp_path) -> None:
    torch.manual_seed(0)
    model = make()
    x = torch.randn(shape)
    _quantize_calibrate(model, x)
    path = _export(model, x, tmp_path, name)
    nodes = _optimized_nodes(path, tmp_path)
    assert _layer_kernels(nodes) == expected, nodes
    # every activation Q/DQ is uint8; int8 weight initializers feed DequantizeLinear (axis 0, per channel),
    # except for the layers ORT runs in float, whose weight is an fp32 initializer (the DQ's output)
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert all(inits[n.input[2]].dtype == np.uint8 for n in proto.graph.node if n.op_type == "QuantizeLinear")
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].dtype == np.int8]
    float_weights = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits]
    assert len(float_weights) == expected.get("float Conv", 0)
    assert len(weight_dq) + len(float_weights) == len(lq.quantized_layers(model))
    axes = [next(a.i for a in n.attribute if a.name == "axis") for n in weight_dq]
    assert axes == [0] * len(weight_dq) and all(inits[n.input[1]].ndim == 1 for n in weight_dq)
    # within one output step, also beyond the calibrated range (the integer clips at +-amax carry lq's grid)
    _assert_within_one_step(model, path, torch.cat([x, 3 * x]))


def _weight_producers(path) -> list[tuple[str, str]]:
    """``(layer op, what its weight input is)`` per Conv / Gemm / MatMul of a graph (ORT's optimized ones
    included: FusedConv, its NCHWc Conv, QLinearConv...): the producing node's type, or the initializer's
    dtype."""
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t).dtype.name for t in proto.graph.initializer}
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    layers = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "QLinearConv", "QGemm", "MatMulIntegerToFloat"}
    out = []
    for n in proto.graph.node:
        if n.op_type in layers:
            w = n.input[3] if n.op_type == "QLinearConv" else n.input[1]  # QLinearConv: x, x_scale, x_zp, w, ...
            out.append((n.op_type, producer.get(w) or inits.get(w, "graph input")))
    return out


def test_float_conv_gets_constant_fp32_weights(tmp_path, monkeypatch) -> None:
    """SmallCNN's last conv feeds global average pooling (float in lq's model), so ORT runs it in float. Its
    weight is written as an fp32 initializer, the exact output of the DequantizeLinear it replaces: ORT's
    optimized graph has no DequantizeLinear on a conv weight (a constant weight lets ORT's NCHWc conv
    apply) and the outputs are those of the export with the DQ (rule 7 off), graph optimizations off."""
    from lq.deploy import onnx_ort_form
    from lq.models import SmallCNN

    torch.manual_seed(9)
    model = SmallCNN().eval()  # BN left in: the export folds it (rule 5) before rule 7 reads the scales
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(16, 1, 28, 28)
    _quantize_calibrate(model, x)
    path = _export(model, x, tmp_path, "cnn")
    optimized = tmp_path / "cnn.optimized.onnx"
    nodes = _optimized_nodes(path, tmp_path)
    assert _layer_kernels(nodes) == {"QLinearConv": 2, "QGemm": 1, "float Conv": 1}, nodes
    weights = _weight_producers(optimized)
    assert all(w != "DequantizeLinear" for op, w in weights if "Conv" in op), weights
    # in the exported graph: the float conv reads an fp32 initializer, the fused ones int8 through a DQ
    assert sorted(_weight_producers(path)) == [("Conv", "DequantizeLinear")] * 2 + [("Conv", "float32"),
                                                                                   ("Gemm", "DequantizeLinear")]
    with monkeypatch.context() as m:
        m.setattr(onnx_ort_form, "_float_weights_for_float_layers", lambda g, report: None)
        before = export_onnx(model, x[:2], tmp_path / "cnn_dq.onnx", runtime="onnxruntime")
    assert sorted(_weight_producers(before))[2] == ("Conv", "DequantizeLinear")  # the previous form
    xs = torch.cat([x, 3 * x])
    y, y_before = _run(path, xs, False), _run(before, xs, False)
    assert (y - y_before).abs().max().item() <= 1e-6 * y_before.abs().max().item()


def test_layer_with_quantized_output_keeps_int8_weight(tmp_path) -> None:
    """Rule 7 applies only to layers ORT leaves in float: a conv whose output the next layer quantizes keeps
    its int8 weight DQ (ORT's QLinearConv takes it), the last conv (a graph output, float) gets fp32 weights,
    and a Linear at the graph output keeps its int8 weight (QGemm has a float-output form)."""
    torch.manual_seed(10)
    convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(8, 3, 10, 10)
    _quantize_calibrate(convs, x)
    path = _export(convs, x, tmp_path, "convs")
    assert _weight_producers(path) == [("Conv", "DequantizeLinear"), ("Conv", "float32")]
    nodes = _optimized_nodes(path, tmp_path)
    assert _layer_kernels(nodes) == {"QLinearConv": 1, "float Conv": 1}, nodes
    assert ("QLinearConv", "int8") in _weight_producers(tmp_path / "convs.optimized.onnx")
    _assert_within_one_step(convs, path, x)

    linear = _quantize_calibrate(_mlp(), torch.randn(32, 24))
    path = _export(linear, torch.randn(32, 24), tmp_path, "mlp")
    assert [w for _, w in _weight_producers(path)] == ["DequantizeLinear"] * 3
    assert _layer_kernels(_optimized_nodes(path, tmp_path)) == {"QGemm": 3}


def test_same_fused_layers_as_quantize_static(tmp_path) -> None:
    """The anchor: onnxruntime.quantization.quantize_static of the fp32 model with the same calibration data
    gives one fused int8 node per layer on this model; lq's export gives the same ones."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    torch.manual_seed(1)
    model = MnistLike().eval()
    x = torch.randn(64, 1, 12, 12)
    fp32 = tmp_path / "fp32.onnx"
    torch.onnx.export(model, (x[:2],), str(fp32), dynamo=False, opset_version=17, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x.numpy()}])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    static = tmp_path / "static.onnx"
    quantize_static(str(fp32), str(static), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8)
    ours = _export(_quantize_calibrate(model, x), x, tmp_path, "lq")

    kernels = [_layer_kernels(_optimized_nodes(p, tmp_path)) for p in (ours, static)]
    assert kernels[0] == kernels[1] == {"QLinearConv": 2, "QGemm": 2}


def test_integer_clip_keeps_the_symmetric_grid(tmp_path) -> None:
    """lq clips at +-127 steps. A uint8 Q alone reaches 255 steps (zero point 0) or -128 (zero point 128):
    the export puts an integer Clip between Q and DQ, [0, 127] after a ReLU and [1, 255] otherwise, so
    inputs far beyond the calibrated range give lq's numbers. (The TensorRT form keeps ONNX's -128.)"""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 16)
    _quantize_calibrate(model, x)
    path = _export(model, x, tmp_path, "clip")
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    clips = sorted((int(inits[n.input[1]]), int(inits[n.input[2]])) for n in proto.graph.node if n.op_type == "Clip")
    assert clips == [(0, 127), (1, 255)]
    far = 6 * x  # most inputs beyond amax: signed ones below -amax too
    with torch.no_grad():
        ref = _int32_bias_reference(model, path)(far)
    for optimize in OPTIMIZATIONS:
        assert (_run(path, far, optimize) - ref).abs().max().item() <= _bound(model)
    trt = export_onnx(model, x[:2], tmp_path / "trt.onnx")  # default form: int8, -128 reachable
    assert (_run(trt, far, False) - ref).abs().max().item() > _bound(model)


@pytest.mark.parametrize("kind", [*LAYERS, "attention"])
def test_every_layer_kind_exports(kind: str, tmp_path) -> None:
    """Single layers and attention: the graph checks, ORT runs it with and without optimizations within one
    output step (a lone layer's output is the graph output: float, as lq's)."""
    torch.manual_seed(2)
    if kind == "attention":
        model, x = Attention(), torch.randn(3, 7, 16)
    else:
        make, shape = LAYERS[kind]
        model, x = Wrap(make()), torch.randn(shape)
    _quantize_calibrate(model, x)
    path = _export(model, x, tmp_path, kind)
    _assert_within_one_step(model, path, torch.cat([x, 3 * x]))
    nodes = _optimized_nodes(path, tmp_path)
    if kind.startswith("linear") or kind == "attention":  # Linear on 3-D input is MatMul (+ Add): int8 too
        assert set(_layer_kernels(nodes)) <= INT8_NODES, nodes


@pytest.mark.parametrize("kind", list(CHAIN_INPUTS))
def test_conv_chains_fuse(kind: str, tmp_path) -> None:
    """Conv1d, Conv3d (through a 3-D max-pool) and grouped / depthwise Conv2d (through ReLU6, a clip the
    integer Clip carries out) fuse into QLinearConv when the next layer requantizes their output."""
    torch.manual_seed(4)
    model = _chain(kind)
    x = torch.randn(CHAIN_INPUTS[kind])
    _quantize_calibrate(model, x)
    path = _export(model, x, tmp_path, kind)
    nodes = _optimized_nodes(path, tmp_path)
    assert _layer_kernels(nodes) == {"QLinearConv": 1, "float Conv": 1}, nodes
    _assert_within_one_step(model, path, torch.cat([x, 3 * x]))


def test_batchnorm_before_fold_goes_into_the_scales(tmp_path) -> None:
    """A model quantized with its BatchNorms in place: the export folds each BN into the conv's weight scale
    and bias (the weight integers stay lq's, negative gammas flip their sign), so the conv fuses (a BN
    between the conv and its output Q keeps ORT from fusing). Outputs: ORT's fused kernels within one step
    of the graph's own semantics (optimizations off), and that within two of the fake-quant model (the
    BN-folded bias is rounded to int32, which the reference of the other tests does not mirror here)."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 4, 1),
    )
    for bn in (model[1], model[4]):
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(-1.5, 1.5)  # negative gammas too: the integers' sign flips, scales stay > 0
        bn.bias.data.normal_(0, 0.1)
    x = torch.randn(16, 3, 10, 10)
    _quantize_calibrate(model, x)
    path = _export(model, x, tmp_path, "bn")
    nodes = _optimized_nodes(path, tmp_path)
    assert nodes.count("QLinearConv") == 2 and "BatchNormalization" not in nodes, nodes
    scales = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if "weight_scale_bn" in t.name]
    assert len(scales) == 2 and all((s > 0).all() for s in scales)
    bound = _bound(model)
    y_graph, y_fused = _run(path, x, False), _run(path, x, ORT_INT8_EXACT)
    assert (y_fused - y_graph).abs().max().item() <= bound
    with torch.no_grad():
        assert (y_graph - model(x)).abs().max().item() <= 2 * bound


def test_residual_adds_stay_float_as_in_lq(tmp_path) -> None:
    """SmallResNet (BN folded): a conv whose output goes into a residual add, and the stem (its output feeds a
    conv and a shortcut), keep float outputs in lq's model, where the add is a float op with no quantizer;
    the export keeps them float Convs on int8-grid inputs (exact). Each block's first conv (ReLU, then the
    second conv's quantizer) fuses. Quantized adds (QLinearAdd) would need quantizers on the add's inputs
    in lq's model."""
    from lq.models import SmallResNet

    torch.manual_seed(6)
    model = SmallResNet().eval()
    lq.fold_bn(model)
    x = torch.randn(8, 1, 16, 16)
    _quantize_calibrate(model, x)
    path = _export(model, x, tmp_path, "resnet")
    nodes = _optimized_nodes(path, tmp_path)
    blocks = sum(1 for n in dict(model.named_modules()) if n.count(".") == 2 and n.startswith("stages."))
    assert nodes.count("QLinearConv") == blocks and nodes.count("QGemm") == 1, nodes
    assert "QLinearAdd" not in nodes
    _assert_within_one_step(model, path, x)


def test_partial_and_half_precision(tmp_path) -> None:
    """A layer left in float (partial quantization) stays float and breaks no fusion around it; an fp16
    model exports as an fp32 graph."""
    torch.manual_seed(7)
    model = _mlp()
    x = torch.randn(32, 24)
    _quantize_calibrate(model, x)
    lq.set_quantization(model, False, ["2"])
    path = _export(model, x, tmp_path, "partial")
    assert count_qdq(path)["QuantizeLinear"] == 2  # layers 0 and 5: their inputs (weights are initializers)
    nodes = _optimized_nodes(path, tmp_path)
    assert _layer_kernels(nodes) == {"QGemm": 2, "float Gemm": 1}, nodes
    _assert_within_one_step(model, path, x)
    half = _quantize_calibrate(_mlp().half(), x.half())
    path = _export(half, x.half(), tmp_path, "half")
    with torch.no_grad():
        ref = half(x.half()).float()
    assert (_run(path, x, ORT_INT8_EXACT) - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("runtime", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("weight_range", ["dynamic", "static"])
def test_smoothed_layers(runtime: str, weight_range: str, tmp_path) -> None:
    """A layer smoothed by SmoothQuant quantizes ``x / s`` and ``W diag(s)``: the export freezes the weight
    range of ``W diag(s)`` (dynamic max) or clamps ``W`` so that ``W diag(s)`` stays within a static range."""
    smoothing = pytest.importorskip("lq.smoothing")
    torch.manual_seed(8)
    model = _mlp()
    x = torch.randn(32, 24) * torch.linspace(0.1, 8.0, 24)  # outlier channels, as SmoothQuant expects
    lq.quantize(model.eval(), CFG)
    smoothing.set_smoothing(model[0], torch.linspace(0.5, 3.0, 24))
    lq.calibrate(model, [x], num_samples=None, method="max")
    if weight_range == "static":  # a range that clips the largest weights of each row
        wq = model[0].weight_quantizer
        wq.dynamic = False
        wq.set_amax(0.7 * _weight_seen(model[0]).abs().amax(dim=1))
    path = export_onnx(model, x[:2], tmp_path / f"smoothed_{runtime}.onnx", runtime=runtime)
    with torch.no_grad():
        ref = _int32_bias_reference(model, path)(x)
    for optimize in OPTIMIZATIONS:
        if runtime == "tensorrt" and optimize:
            continue  # ORT rounds the float biases itself when it fuses that form (module doc)
        assert (_run(path, x, optimize) - ref).abs().max().item() <= _bound(model)


def test_runtime_argument_is_checked(tmp_path) -> None:
    model = _quantize_calibrate(_mlp(), torch.randn(8, 24))
    with pytest.raises(ValueError, match="runtime must be one of"):
        export_onnx(model, torch.randn(2, 24), tmp_path / "m.onnx", runtime="tensorrt8")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_pretrained_mnist_cnn_real_data(mnist_ptq, tmp_path) -> None:
    """The pretrained MNIST CNN (PTQ, entropy calibration on 1024 training images: ``test_real_data``'s
    fixture) on 2000 test images: every layer runs as a fused int8 node, ORT's fused outputs are within one
    output step of the int32-bias reference (ties aside, module doc) with its top-1 predictions, and the
    accuracy is the fake-quant model's within 0.2%."""
    model, _, x_test, y_test, _ = mnist_ptq
    x_test, y_test = x_test[:2000], y_test[:2000]
    path = _export(model, x_test, tmp_path, "mnist")
    nodes = _optimized_nodes(path, tmp_path)
    assert _layer_kernels(nodes) == {"QLinearConv": 2, "QGemm": 2}, nodes
    with torch.no_grad():
        fq = model(x_test)
        ref = _int32_bias_reference(model, path)(x_test)
    y = _run(path, x_test, ORT_INT8_EXACT)
    steps = (y - ref).abs().amax(1) / _bound(model)
    assert (steps > 1).float().mean().item() <= 0.005 and steps.max().item() <= 4, steps.max().item()
    assert (y.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.999
    # the int32 biases alone move 2 of these 2000 predictions (87.55% -> 87.45%, entropy ranges clip the
    # first layer's input hard): the same in the reference, which ORT's outputs follow
    acc = [(t.argmax(1) == y_test).float().mean().item() for t in (fq, y)]
    assert abs(acc[0] - acc[1]) <= 0.002, acc
