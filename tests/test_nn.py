"""Quantized layers, swapping rules, BN folding (Appendix C), GELU10 (Appendix D)."""

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

import lq
from lq.nn import GELU10, Matmul, QuantConv2d, QuantConvTranspose2d, QuantLinear, QuantMatmul, restore


def fq(x, amax, axis=None):
    """Independent eq. 7 + eq. 8 (scale quantization, int8), written out."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        amax = amax.reshape(shape)
    s = 127 / amax
    return torch.clamp(torch.round(x * s), -127, 127) / s


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False))
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_swap_keeps_objects_and_parameters():
    net = Net()
    head = net.head
    params = {n: p for n, p in net.named_parameters()}
    lq.quantize(net)
    assert net.head is head and isinstance(head, QuantLinear) and isinstance(head, nn.Linear)
    for n, p in params.items():
        assert net.get_parameter(n) is p
    assert list(lq.quantized_layers(net)) == ["features.0", "features.2", "head"]
    assert isinstance(net.features[0], QuantConv2d)


def test_skip_only_and_report():
    net = lq.quantize(Net(), lq.QuantConfig(skip=["head"]))
    rep = lq.quantization_report(net)
    assert rep.swapped == ["features.0", "features.2"]
    assert "skip" in rep.skipped["head"]
    assert "head" in str(rep) and "float" in str(rep)
    net2 = lq.quantize(Net(), lq.QuantConfig(only=["features.*"]))
    assert list(lq.quantized_layers(net2)) == ["features.0", "features.2"]


def test_pattern_matching_nothing_lists_close_names():
    with pytest.raises(ValueError, match="heads.*closest.*head"):
        lq.quantize(Net(), lq.QuantConfig(skip=["heads"]))
    with pytest.raises(ValueError, match="only pattern"):
        lq.quantize(Net(), lq.QuantConfig(only=["nothing.here"]))


def test_nothing_to_quantize_is_an_error():
    with pytest.raises(ValueError, match="nothing to quantize"):
        lq.quantize(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="nothing to quantize"):
        lq.quantize(Net(), lq.QuantConfig(skip=["*"]))


def test_multihead_attention_and_subclasses_are_skipped_with_reason():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "lin": MyLinear(8, 8), "ok": nn.Linear(8, 8)})
    lq.quantize(m)
    rep = lq.quantization_report(m)
    assert rep.swapped == ["ok"]
    assert "MultiheadAttention" in rep.skipped["attn.out_proj"]
    assert "subclasses" in rep.skipped["lin"]


def _calibrate_with_max(net, x):
    lq.calibrate(net, [x], method="max")


def test_quant_linear_is_eq9_on_fake_quantized_operands():
    torch.manual_seed(0)
    lin = nn.Linear(16, 5)
    x = torch.randn(8, 16)
    ref_w = lin.weight.detach().clone()
    m = nn.Sequential(lin)
    lq.quantize(m, lq.QuantConfig(smoothquant=False))  # eq. 9 itself (SmoothQuant: tests/test_smoothing.py)
    _calibrate_with_max(m, x)
    y = m(x)
    amax_x = x.abs().max()
    amax_w = ref_w.abs().amax(1)
    expected = F.linear(fq(x, amax_x), fq(ref_w, amax_w, axis=0), lin.bias)
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(m[0].input_quantizer.amax, amax_x)


def test_conv_transpose_quantizes_weight_per_output_channel_axis1():
    torch.manual_seed(1)
    ct = nn.ConvTranspose2d(3, 6, 3, stride=2)
    m = nn.Sequential(ct)
    lq.quantize(m)
    assert isinstance(ct, QuantConvTranspose2d)
    x = torch.randn(2, 3, 5, 5)
    _calibrate_with_max(m, x)
    y = m(x)
    amax_w = ct.weight.detach().abs().amax(dim=(0, 2, 3))
    assert ct.weight_quantizer.amax.shape == (6,)
    expected = F.conv_transpose2d(fq(x, x.abs().max()), fq(ct.weight.detach(), amax_w, axis=1), ct.bias, stride=2)
    assert torch.allclose(y, expected, atol=1e-5)


def test_conv1d_and_conv3d_swap_and_run():
    m = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(0), nn.Unflatten(0, (1, 2, 3, 2, 2)), nn.Conv3d(2, 2, 1))
    lq.quantize(m)
    x = torch.randn(2, 2, 6)
    lq.calibrate(m, [x], method="max")
    assert m(x).shape == (1, 2, 3, 2, 2)


def test_quant_matmul_quantizes_both_inputs():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mm = Matmul()

        def forward(self, q):
            return self.mm(q, q.transpose(-1, -2))

    m = Attn()
    lq.quantize(m)
    assert isinstance(m.mm, QuantMatmul)
    q = torch.randn(2, 4, 8)
    lq.calibrate(m, [q], method="max")
    a = q.abs().max()
    assert torch.allclose(m(q), fq(q, a) @ fq(q.transpose(-1, -2), a), atol=1e-5)


def test_uncalibrated_forward_fails_with_layer_name():
    net = lq.quantize(Net())
    with pytest.raises(RuntimeError, match="features.0.input.*lq.calibrate"):
        net(torch.randn(1, 1, 8, 8))


def test_integer_input_rejected():
    m = lq.quantize(nn.Sequential(nn.Linear(4, 2)))
    lq.calibrate(m, [torch.randn(3, 4)], method="max")
    with pytest.raises(TypeError, match="0.input.*floating-point"):
        m[0].input_quantizer(torch.ones(3, 4, dtype=torch.int64))


def test_extra_repr_shows_bits_axis_range_calibrator():
    m = lq.quantize(nn.Sequential(nn.Linear(4, 2)))
    lq.calibrate(m, [torch.randn(3, 4)], method="max")
    r = repr(m)
    assert "bits=8" in r and "per_channel(axis=0)" in r and "calibrator=layerwise" in r and "amax=" in r


def test_restore_returns_float_layer():
    net = Net()
    w = net.head.weight
    lq.quantize(net)
    restore(net.head)
    assert type(net.head) is nn.Linear and net.head.weight is w
    assert not hasattr(net.head, "input_quantizer")


def test_pruning_works_on_quantized_layer():
    # Lightning's ModelPruning uses torch.nn.utils.prune, which re-registers `weight` (#11047)
    m = lq.quantize(nn.Sequential(nn.Linear(8, 4)), lq.QuantConfig(smoothquant=False))
    x = torch.randn(5, 8)
    lq.calibrate(m, [x], method="max")
    torch.nn.utils.prune.l1_unstructured(m[0], "weight", amount=0.5)
    assert (m[0].weight == 0).sum() == 16
    y = m(x)
    w = m[0].weight.detach()
    expected = F.linear(fq(x, x.abs().max()), fq(w, w.abs().amax(1), axis=0), m[0].bias)
    assert torch.allclose(y, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------- GELU10
def test_gelu10_clips_at_10_and_is_gelu_below():
    x = torch.tensor([-3.0, -0.5, 0.0, 2.0, 9.9, 10.5, 50.0])
    y = GELU10()(x)
    ref = 0.5 * x * (1 + torch.erf(x / 2**0.5))  # eq. 18
    assert torch.allclose(y[:5], ref[:5], atol=1e-6)
    assert y[5].item() == 10.0 and y[6].item() == 10.0


def test_config_gelu10_replaces_gelu_modules():
    m = nn.Sequential(nn.Linear(4, 4), nn.GELU(approximate="tanh"), nn.Linear(4, 2))
    lq.quantize(m, lq.QuantConfig(gelu10=True))
    assert isinstance(m[1], GELU10) and m[1].approximate == "tanh"
    assert lq.quantization_report(m).gelu10 == ["1"]


# ---------------------------------------------------------------------------------------- fold_bn
def _bn_stats(bn, c):
    torch.manual_seed(c)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)


def test_fold_bn_sequential_conv_matches_eq14_16():
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1, bias=False), nn.BatchNorm2d(3))
    _bn_stats(m[1], 1)
    _bn_stats(m[4], 2)
    m.eval()
    x = torch.randn(3, 2, 7, 7)
    ref = m(x)
    conv_w = m[0].weight
    bn = m[1]
    c = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    expected_w = conv_w.detach() * c.reshape(-1, 1, 1, 1)
    folded = lq.fold_bn(m)
    assert folded == [("0", "1"), ("3", "4")]
    assert isinstance(m[1], nn.Identity) and isinstance(m[4], nn.Identity)
    assert m[0].weight is conv_w
    assert torch.allclose(m[0].weight, expected_w, atol=1e-6)
    assert torch.allclose(m(x), ref, atol=1e-5)


def test_fold_bn_traced_attribute_model_and_linear_bn1d():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 6)
            self.bn = nn.BatchNorm1d(6)
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn2 = nn.BatchNorm2d(2)  # conv output also read by the residual: must NOT be folded

        def forward(self, x, img):
            y = self.conv(img)
            return self.bn(self.fc(x)).sum() + (self.bn2(y) + y).sum()

    m = M()
    _bn_stats(m.bn, 3)
    _bn_stats(m.bn2, 4)
    m.eval()
    x, img = torch.randn(4, 5), torch.randn(2, 1, 5, 5)
    ref = m(x, img)
    assert lq.fold_bn(m) == [("fc", "bn")]
    assert isinstance(m.bn2, nn.BatchNorm2d)
    assert torch.allclose(m(x, img), ref, atol=1e-4)


def test_fold_bn_recalibrates_quantized_static_weight_ranges():
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))
    _bn_stats(m[1], 5)
    m.eval()
    cfg = lq.QuantConfig(weight=lq.QuantSpec(granularity="per_channel", calibrator="percentile", percentile=100.0))
    lq.quantize(m, cfg)
    lq.calibrate(m, [torch.randn(2, 2, 6, 6)], method="max")
    lq.fold_bn(m)
    w = m[0].weight.detach().abs().amax(dim=(1, 2, 3))
    assert torch.allclose(m[0].weight_quantizer.amax, w, rtol=2e-3)


def test_fold_bn_warns_when_nothing_to_fold():
    with pytest.warns(UserWarning, match="nothing folded"):
        assert lq.fold_bn(nn.Sequential(nn.Linear(2, 2)).eval()) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_quantize_and_calibrate(dtype):
    torch.manual_seed(0)
    m = Net().to(dtype)
    x = torch.randn(4, 1, 8, 8).to(dtype)
    ref = m(x).float()
    lq.quantize(m)
    lq.calibrate(m, [x])
    y = m(x)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    assert m.head.input_quantizer.amax.dtype == torch.float32
    # int8 rounding is far below the fp16/bf16 output spread
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_eval_weight_cache_follows_in_place_updates():
    m = lq.quantize(nn.Sequential(nn.Linear(6, 3)))
    x = torch.randn(4, 6)
    lq.calibrate(m, [x], method="max")
    with torch.no_grad():
        y1 = m(x)
        assert torch.equal(m(x), y1)  # cached fake-quantized weight
        m[0].weight.mul_(2.0)  # optimizer steps / fold_bn / load_state_dict update in place
        w = m[0].weight
        expected = F.linear(fq(x, x.abs().max()), fq(w, w.abs().amax(1), axis=0), m[0].bias)
        torch.testing.assert_close(m(x), expected)
