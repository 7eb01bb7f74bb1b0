"""lq.deploy: convert (int8 inference layers, eq. 10) and export_onnx (Q/DQ graphs), against the fake-quant model.

Tolerance ("one quantization step of the outputs"): a converted layer and ONNX Runtime see the same
integers as the fake-quant layer, so outputs differ by float rounding only; the bound allowed is what one
flipped input integer of the last layer can change in an output: ``input_step * max|W|`` (input step
``amax_x / 127``, largest weight range of the last layer), derived from that layer's calibrated scales.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lq
from lq.deploy import (
    Int8ConvNd,
    Int8Linear,
    Int8Matmul,
    convert,
    count_qdq,
    export_onnx,
    kernels,
)
from lq.nn import Matmul, QuantLinear
from lq.quant.functional import qmax

try:
    import onnx
    import onnxruntime as ort
except ImportError:  # the convert tests still run; the ONNX ones skip
    onnx = ort = None
needs_onnx = pytest.mark.skipif(ort is None or onnx is None, reason="onnx and onnxruntime are not installed")

CFG = lq.QuantConfig(activation=lq.QuantSpec(calibrator="max"))


def _quantize_calibrate(model: nn.Module, *batches: torch.Tensor | tuple) -> nn.Module:
    model.eval()
    lq.quantize(model, CFG)
    lq.calibrate(model, list(batches), num_samples=None, method="max")
    return model


def _last_layer_bound(model: nn.Module) -> float:
    """One quantization step of the outputs: input step of the last quantized layer times its largest |W|."""
    layer = list(lq.quantized_layers(model).values())[-1]
    x_step = layer.input_quantizer.amax.item() / qmax(layer.input_quantizer.spec.bits)
    if hasattr(layer, "weight"):
        w_max = layer.weight.detach().abs().max().item()
    else:  # Matmul: the other operand's range plays the weight's part
        w_max = layer.other_quantizer.amax.item()
    return x_step * w_max


def _session(path, optimize: bool = False):
    """ONNX Runtime session. By default with graph optimizations off: that runs the graph's own semantics
    (QuantizeLinear -> DequantizeLinear -> float op). With them on, ORT fuses Q/DQ into its int8 kernels;
    on x86 CPUs without VNNI those add u8 x s8 pairs in saturating int16 (vpmaddubsw), which rounds some
    outputs differently from the graph, a property of ORT on that CPU and not of the exported model."""
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run_ort(path, *inputs: torch.Tensor) -> torch.Tensor:
    sess = _session(path)
    names = [i.name for i in sess.get_inputs()]
    return torch.from_numpy(sess.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0])


def _onnx_constant(model_proto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    for init in model_proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model_proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------- models
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = SmallCNN().eval()
    for bn in (m.bn1, m.bn2):  # non-trivial statistics so folding changes the weights
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0, 0.1)
    return m


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(20, 33), nn.ReLU(), nn.Linear(33, 17), nn.GELU(), nn.Linear(17, 5)).eval()


class Attention(nn.Module):
    """Q K^T and P V through lq.nn.Matmul, so both become QuantMatmul."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.qk, self.pv = Matmul(), Matmul()
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.qk(self.q(x), self.k(x).transpose(-2, -1)).softmax(-1)
        return self.out(self.pv(a, self.v(x)))


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


LAYERS = {
    "linear_odd": (lambda: nn.Linear(37, 19), (6, 5, 37)),  # 3-D input, odd sizes
    "linear_nobias": (lambda: nn.Linear(64, 24, bias=False), (7, 64)),
    "conv2d_stride2": (lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1), (4, 3, 11, 11)),
    "conv2d_groups": (lambda: nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=4), (3, 8, 9, 9)),
    "conv2d_depthwise": (lambda: nn.Conv2d(8, 8, 5, padding=2, groups=8), (3, 8, 10, 10)),
    "conv2d_same_reflect": (lambda: nn.Conv2d(4, 6, (3, 4), padding="same", padding_mode="reflect"), (2, 4, 9, 8)),
    "conv1d": (lambda: nn.Conv1d(5, 7, 3, stride=2, padding=1), (4, 5, 23)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1), (2, 2, 5, 6, 7)),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2), (3, 6, 5, 5)),
}


@pytest.mark.parametrize("nonneg", [False, True], ids=["signed", "relu"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_convert_matches_fake_quant(kind: str, nonneg: bool) -> None:
    torch.manual_seed(2)
    make, shape = LAYERS[kind]
    model = Wrap(make())
    x = torch.randn(shape)
    if nonneg:
        x = x.relu()
    _quantize_calibrate(model, x)
    with torch.no_grad():
        ref, ref1 = model(x), model(x[:1])
    bound = _last_layer_bound(model)
    for backend in ("auto", "reference"):
        m = convert(copy.deepcopy(model), backend=backend)
        with torch.no_grad():
            y, y1 = m(x), m(x[:1])
        assert y.shape == ref.shape and y.dtype == ref.dtype
        assert (y - ref).abs().max().item() <= bound, (kind, backend)
        assert (y1 - ref1).abs().max().item() <= bound, (kind, backend, "batch 1")


def test_convert_linear_int_mm_padding() -> None:
    """The torch._int_mm path (CUDA's kernel) pads rows/inner/output sizes; on CPU it runs the same code."""
    torch.manual_seed(3)
    model = Wrap(nn.Linear(13, 11))
    x = torch.randn(3, 13)
    _quantize_calibrate(model, x)
    with torch.no_grad():
        ref = model(x)
        y = convert(copy.deepcopy(model), backend="int_mm")(x)
    assert (y - ref).abs().max().item() <= _last_layer_bound(model)
    assert kernels.pad_weight_for_int_mm(torch.ones(11, 13, dtype=torch.int8)).shape == (16, 16)


def test_convert_matmul_attention() -> None:
    torch.manual_seed(4)
    model = Attention()
    x = torch.randn(3, 7, 16)
    _quantize_calibrate(model, x)
    assert {type(m) for m in lq.quantized_layers(model).values()} >= {lq.nn.QuantMatmul}
    with torch.no_grad():
        ref = model(x)
        m = convert(copy.deepcopy(model))
        y, y1 = m(x), m(x[:1])
    assert isinstance(m.qk, Int8Matmul) and isinstance(m.q, Int8Linear)
    bound = _last_layer_bound(model)
    assert (y - ref).abs().max().item() <= bound
    assert (y1 - ref[:1]).abs().max().item() <= bound


def test_onednn_kernels_exact_at_extremes() -> None:
    """Worst case for int8 kernels: every weight and input at +-qmax (saturating int16 paths would fail)."""
    if kernels.onednn_mode() == kernels.UNAVAILABLE:
        pytest.skip("no exact oneDNN int8 kernel on this CPU (reference kernels are used)")
    torch.manual_seed(5)
    for layer, shape in (
        (nn.Linear(256, 32), (9, 256)),
        (nn.Conv2d(32, 16, 3, padding=1), (2, 32, 6, 6)),
        (nn.Conv2d(16, 16, 3, padding=1, groups=16), (2, 16, 6, 6)),
        (nn.Conv2d(1, 8, 3, padding=1), (2, 1, 9, 9)),  # a first layer: one input channel
        (nn.Conv2d(8, 12, 3, padding=1, groups=4), (2, 8, 6, 6)),  # grouped: [P, N] is split per group
    ):
        with torch.no_grad():
            layer.weight.copy_(torch.sign(torch.randn_like(layer.weight)))
        model = Wrap(layer)
        x = torch.sign(torch.randn(shape)) * 3.0
        _quantize_calibrate(model, x)
        with torch.no_grad():
            ref = convert(copy.deepcopy(model), backend="reference")(x)
            fast = convert(copy.deepcopy(model), backend="onednn")(x)
            fast_pos = convert(copy.deepcopy(model), backend="onednn")(x.abs())
            ref_pos = convert(copy.deepcopy(model), backend="reference")(x.abs())
            fast1 = convert(copy.deepcopy(model), backend="onednn")(x[:1])  # batch 1: the 1x1-conv Linear path
        torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(fast_pos, ref_pos, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(fast1, ref[:1], rtol=1e-6, atol=1e-4)


def test_fbgemm_linear_exact_at_extremes_and_equal_to_fake_quant() -> None:
    """fbgemm's fp32-in/fp32-out int8 linear (the auto Linear kernel on CPU): worst-case +-qmax operands,
    signed and non-negative inputs, batch 1, fp16 input, and the fake-quant model's own numbers."""
    if kernels.fbgemm_mode() == kernels.UNAVAILABLE:
        pytest.skip("no exact fbgemm int8 kernel here")
    torch.manual_seed(8)
    layer = nn.Linear(256, 32)
    with torch.no_grad():
        layer.weight.copy_(torch.sign(torch.randn_like(layer.weight)))
    model = Wrap(layer)
    x = torch.sign(torch.randn(9, 256)) * 3.0
    _quantize_calibrate(model, x)
    with torch.no_grad():
        fb = convert(copy.deepcopy(model), backend="fbgemm")
        ref = convert(copy.deepcopy(model), backend="reference")
        assert isinstance(fb.layer, Int8Linear) and fb.layer._kernel(x.device, ("fbgemm",)) == "fbgemm"
        for inp in (x, x.abs(), x[:1], x * 10):  # x * 10: beyond the calibrated range (eq. 7's clip)
            torch.testing.assert_close(fb(inp), ref(inp), rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(fb(x.half()).float(), ref(x.half()).float(), rtol=1e-3, atol=1e-2)
        # ordinary data against the fake-quant model: same integers, so float rounding only
        layer2 = nn.Linear(64, 16)
        model2 = Wrap(layer2)
        x2 = torch.randn(200, 64)
        _quantize_calibrate(model2, x2)
        y_fq = model2(x2)
        y_fb = convert(copy.deepcopy(model2), backend="fbgemm")(x2)
        assert (y_fb - y_fq).abs().max().item() < 1e-5


def test_full_range_zero_point_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The VNNI code path (u8 = x_q + 128, zero point 128), checked here with weights small enough
    (|w_q| <= 64) that even an AVX2 CPU accumulates exactly; padding must mean real zero."""
    if kernels.onednn_mode() == kernels.UNAVAILABLE:
        pytest.skip("no oneDNN int8 kernels")
    monkeypatch.setattr(kernels, "onednn_mode", lambda: kernels.FULL_RANGE)
    fbgemm = kernels.fbgemm_mode() != kernels.UNAVAILABLE
    monkeypatch.setattr(kernels, "fbgemm_mode", lambda: kernels.FULL_RANGE)
    torch.manual_seed(6)
    for layer, shape in ((nn.Linear(40, 24), (5, 40)), (nn.Conv2d(4, 8, 3, padding=1), (2, 4, 7, 7))):
        model = Wrap(layer)
        x = torch.randn(shape)
        _quantize_calibrate(model, x)
        wq = layer.weight_quantizer
        wq.dynamic = False
        wq.set_amax(2 * layer.weight.detach().abs().amax(dim=list(range(1, layer.weight.dim()))))
        with torch.no_grad():
            ref = model(x)
            y = convert(copy.deepcopy(model), backend="onednn")(x)
            assert (y - ref).abs().max().item() <= _last_layer_bound(model)
            if fbgemm and isinstance(layer, nn.Linear):  # fbgemm with zero point 128 (u8 up to 255)
                y = convert(copy.deepcopy(model), backend="fbgemm")(x)
                assert (y - ref).abs().max().item() <= _last_layer_bound(model)


@needs_onnx
def test_cnn_with_bn_onnx_and_convert() -> None:
    model = _small_cnn()
    torch.manual_seed(7)
    x = torch.randn(32, 1, 14, 14)
    lq.fold_bn(model)
    _quantize_calibrate(model, x)
    with torch.no_grad():
        ref = model(x)
    bound = _last_layer_bound(model)
    path = export_onnx(model, x[:4], _tmp("cnn.onnx"))
    counts = count_qdq(path)
    assert counts == {"QuantizeLinear": 6, "DequantizeLinear": 6}  # 3 layers x (input + weight)
    y_ort = _run_ort(path, x)  # dynamic batch: exported at 4, run at 32 and 1
    assert (y_ort - ref).abs().max().item() <= bound
    assert (_run_ort(path, x[:1]) - ref[:1]).abs().max().item() <= bound
    m = convert(model)
    with torch.no_grad():
        assert (m(x) - ref).abs().max().item() <= bound


def test_convert_folds_bn_itself() -> None:
    model = _small_cnn()
    x = torch.randn(8, 1, 14, 14)
    _quantize_calibrate(model, x)  # BN still in place
    with torch.no_grad():
        ref = model(x)
    m = convert(model)
    assert isinstance(m.bn1, nn.Identity) and isinstance(m.conv1, Int8ConvNd)
    with torch.no_grad():
        y = m(x)
    # folding changes the weight grid (per-channel ranges of W' = c W), so only closeness is expected
    assert (y - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@needs_onnx
def test_mlp_onnx_qdq_and_dynamic_weight_scale() -> None:
    model = _mlp()
    x = torch.randn(64, 20)
    _quantize_calibrate(model, x)
    with torch.no_grad():
        ref = model(x)
    path = export_onnx(model, x, _tmp("mlp.onnx"))
    assert count_qdq(path) == {"QuantizeLinear": 6, "DequantizeLinear": 6}
    assert (_run_ort(path, x) - ref).abs().max().item() <= _last_layer_bound(model)
    proto = onnx.load(str(path))
    dq_weight = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert len(dq_weight) == 3  # per-channel weights
    scale = _onnx_constant(proto, dq_weight[0].input[1])
    expected = model[0].weight.detach().abs().amax(dim=1) / 127
    np.testing.assert_allclose(scale, expected.numpy(), rtol=1e-6)
    dq_act = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n not in dq_weight]
    assert all(_onnx_constant(proto, n.input[1]).shape == () for n in dq_act)  # per-tensor activations
    assert all(_onnx_constant(proto, n.input[2]).dtype == np.int8 for n in proto.graph.node if n.op_type == "QuantizeLinear")
    # no Q/DQ on the graph output
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    assert producers[proto.graph.output[0].name] not in ("QuantizeLinear", "DequantizeLinear")


@needs_onnx
@pytest.mark.parametrize(
    "kind,shape,n_qdq",
    [
        # 4 Linear x (input + weight) + 2 Matmul x (both inputs) = 12 pairs, less 2: q, k and v read the same
        # tensor with the same range, and the exporter keeps one Q/DQ pair for it (TensorRT shares it too)
        ("attention", (3, 7, 16), 10),
        ("convtranspose2d", (3, 6, 5, 5), 2),
        ("conv1d", (4, 5, 23), 2),
        ("conv2d_depthwise", (3, 8, 10, 10), 2),
    ],
)
def test_onnx_other_layers(kind: str, shape: tuple, n_qdq: int) -> None:
    torch.manual_seed(9)
    model = Attention() if kind == "attention" else Wrap(LAYERS[kind][0]())
    x = torch.randn(shape)
    _quantize_calibrate(model, x)
    with torch.no_grad():
        ref = model(x)
    path = export_onnx(model, x, _tmp(f"{kind}.onnx"))
    assert count_qdq(path) == {"QuantizeLinear": n_qdq, "DequantizeLinear": n_qdq}
    assert (_run_ort(path, x) - ref).abs().max().item() <= _last_layer_bound(model)


@needs_onnx
def test_partial_quantization_stays_float() -> None:
    model = _mlp()
    x = torch.randn(32, 20)
    _quantize_calibrate(model, x)
    lq.set_quantization(model, False, ["2"])
    with torch.no_grad():
        ref = model(x)
    bound = _last_layer_bound(model)
    assert count_qdq(export_onnx(model, x, _tmp("partial.onnx"))) == {"QuantizeLinear": 4, "DequantizeLinear": 4}
    m = convert(model)
    assert type(m[2]) is nn.Linear and isinstance(m[0], Int8Linear)
    with torch.no_grad():
        assert (m(x) - ref).abs().max().item() <= bound + 1e-5


@needs_onnx
def test_half_precision_models() -> None:
    torch.manual_seed(8)
    for dtype in (torch.bfloat16, torch.float16):
        model = _mlp().to(dtype)
        x = torch.randn(16, 20).to(dtype)
        _quantize_calibrate(model, x)
        with torch.no_grad():
            ref = model(x).float()
        path = export_onnx(model, x, _tmp(f"half_{dtype}.onnx"))
        assert model[0].weight.dtype == dtype  # restored after the fp32 export
        y_ort = _run_ort(path, x.float())
        tol = 0.05 * ref.abs().max().item()  # the fake-quant model itself computes in half
        assert (y_ort - ref).abs().max().item() <= tol
        m = convert(model)
        with torch.no_grad():
            y = m(x)
        assert y.dtype == dtype
        assert (y.float() - ref).abs().max().item() <= tol


def test_state_dict_int8_and_roundtrip() -> None:
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    fp32_weight_bytes = sum(m.weight.numel() * 4 for m in model if isinstance(m, nn.Linear))
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    x = torch.randn(16, 128)
    _quantize_calibrate(model, x)
    twin = copy.deepcopy(model)
    m = convert(model)
    sd = m.state_dict()
    assert sd["0.weight"].dtype == torch.int8 and sd["2.weight"].dtype == torch.int8
    assert sd["0.weight_scale"].dtype == torch.float32 and sd["0.input_scale"].dtype == torch.float32
    int8_weight_bytes = sum(v.numel() * v.element_size() for k, v in sd.items() if k.endswith(".weight"))
    assert int8_weight_bytes * 4 == fp32_weight_bytes
    total = sum(v.numel() * v.element_size() for v in sd.values())
    assert total < 0.27 * fp32_bytes  # 4x on weights; scales and biases stay fp32
    # load into another model converted the same way (its own weights differ)
    other = convert(twin)
    with torch.no_grad():
        other[0].weight.zero_()
    other.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(other(x), m(x))
    # .half() must leave the int8 weights and fp32 scales alone; outputs follow the input dtype
    other.half()
    assert other[0].weight.dtype == torch.int8 and other[0].weight_scale.dtype == torch.float32
    with torch.no_grad():
        y16 = other(x.half())
    assert y16.dtype == torch.float16
    assert (y16.float() - m(x)).abs().max().item() < 0.02 * m(x).abs().max().item()


def test_inference_only_errors() -> None:
    model = _mlp()
    x = torch.randn(8, 20)
    _quantize_calibrate(model, x)
    m = convert(model)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    m(x)  # eval mode without no_grad is fine
    with pytest.raises(RuntimeError, match="convert is for inference"):
        m(x.requires_grad_())
    m.train()
    with pytest.raises(RuntimeError, match="convert is for inference"):
        m(torch.randn(8, 20))
    with pytest.raises(ValueError, match="already converted"):
        convert(m)
    with pytest.raises(ValueError, match="fake-quant"):
        export_onnx(m, x, _tmp("bad.onnx"))


def test_uncalibrated_errors_name_the_layer() -> None:
    model = _mlp()
    lq.quantize(model, CFG)
    with pytest.raises(RuntimeError, match=r"layer '0'.*lq\.calibrate"):
        convert(copy.deepcopy(model))
    with pytest.raises(RuntimeError, match=r"layer '0'.*never calibrated"):
        export_onnx(model, torch.randn(2, 20), _tmp("uncal.onnx"))
    with pytest.raises(ValueError, match="no quantized layers"):
        convert(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no quantized layers"):
        export_onnx(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2), _tmp("none.onnx"))
    with pytest.raises(ValueError, match="backend"):
        convert(model, backend="tensorrt")


@needs_onnx
def test_export_unsupported_operator_named() -> None:
    class FFTHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.fft.fft(self.fc(x)).real

    model = FFTHead().eval()
    x = torch.randn(4, 8)
    _quantize_calibrate(model, x)
    with pytest.raises(RuntimeError, match="aten::fft_fft"):
        export_onnx(model, x, _tmp("fft.onnx"))
    assert isinstance(model.fc, QuantLinear) and type(model.fc.input_quantizer).__name__ == "TensorQuantizer"


@needs_onnx
@pytest.mark.parametrize(
    "n_test", [pytest.param(1000, id="1k"), pytest.param(None, id="10k", marks=pytest.mark.slow)]
)
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_mnist_real_data_accuracy(n_test: int | None) -> None:
    """PTQ of the pretrained MNIST CNN (1024 train samples, max calibration): converted int8 accuracy equals
    the fake-quant accuracy within 0.1% on the MNIST test split, and ONNX Runtime agrees. The full 10k split
    is marked slow (about 3 x 13 s on 2 busy cores); the first 1000 test images run by default."""
    try:
        from lq.data import load_split
        from lq.models import pretrained_mnist_cnn

        model = pretrained_mnist_cnn()
        x_train, _ = load_split("mnist", "train", limit_train=1024, seed=0)
        x_test, y_test = load_split("mnist", "test")
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"real MNIST data / pretrained weights not installed: {err}")
    if n_test is not None:
        x_test, y_test = x_test[:n_test], y_test[:n_test]
    lq.quantize(model, CFG)  # per-channel max weights, per-tensor max activations
    lq.calibrate(model, [x_train[i : i + 256] for i in range(0, 1024, 256)], num_samples=1024, method="max")

    def accuracy(f) -> float:
        with torch.no_grad():
            pred = torch.cat([f(x_test[i : i + 1000]).argmax(1) for i in range(0, len(x_test), 1000)])
        return (pred == y_test).float().mean().item()

    acc_fq = accuracy(model)
    path = export_onnx(model, x_test[:2], _tmp("mnist.onnx"))
    sess = _session(path)
    acc_ort = accuracy(lambda xb: torch.from_numpy(sess.run(None, {"input": xb.numpy()})[0]))
    m = convert(model)
    acc_int8 = accuracy(m)
    assert acc_fq > 0.98
    assert abs(acc_int8 - acc_fq) <= 0.001, (acc_fq, acc_int8)
    assert abs(acc_ort - acc_fq) <= 0.001, (acc_fq, acc_ort)


# ---------------------------------------------------------------------------------------------- helpers
_TMP: list = []


@pytest.fixture(autouse=True)
def _tmpdir(tmp_path) -> None:
    _TMP[:] = [tmp_path]


def _tmp(name: str):
    return _TMP[0] / name


def test_nan_input_to_converted_model_names_the_layer() -> None:
    """On the fast CPU kernels a NaN would become a number in the uint8 cast: it must be an error instead,
    naming the layer, on every host (full-range VNNI CPUs run no sign test that could catch it by chance)."""
    torch.manual_seed(9)
    for layer, shape in ((nn.Linear(16, 8), (4, 16)), (nn.Conv2d(3, 4, 3), (2, 3, 6, 6))):
        model = Wrap(layer)
        x = torch.randn(shape)
        _quantize_calibrate(model, x)
        m = convert(copy.deepcopy(model))
        x[0, 1] = float("nan")
        with torch.no_grad(), pytest.raises(FloatingPointError, match="layer.*NaN"):
            m(x)
