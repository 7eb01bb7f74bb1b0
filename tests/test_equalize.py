"""Cross-layer equalization (Nagel et al. 2019, eq. 11) and bias correction (eq. 13-15), checked against the
equations on small synthetic models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lq
from lq.models import MobileNetSmall
from lq.nn import ChannelClamp


def _random_bn(model: nn.Module) -> nn.Module:
    """Give every BN non-trivial statistics, so folding yields very unequal per-channel weight ranges."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 4 + 0.01)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.1)
    return model.eval()


def _folded_mobilenet() -> nn.Module:
    torch.manual_seed(0)
    m = _random_bn(MobileNetSmall())
    lq.fold_bn(m)
    return m


def test_equalize_keeps_the_function_and_equalizes_ranges():
    m = _folded_mobilenet()
    x = torch.randn(4, 1, 28, 28)
    before = m(x)
    report = lq.equalize(m)
    # every expand -> depthwise -> project chain of the 6 blocks (block 0 has no expand) + last project -> head conv
    assert len(report) == 2 * 5 + 1 + 1
    assert all(r.range_ratio_before > 1.5 for r in report)
    torch.testing.assert_close(m(x), before, rtol=1e-4, atol=1e-5)
    mods = dict(m.named_modules())
    for r in report:
        a, b = mods[r.first], mods[r.second]
        r1 = a.weight.abs().reshape(a.weight.shape[0], -1).amax(1)
        # input channel i of a depthwise conv is its filter i; of a 1x1 conv, column i
        r2 = b.weight.abs().amax(dim=(1, 2, 3)) if b.groups > 1 else b.weight.abs().amax(dim=(0, 2, 3))
        torch.testing.assert_close(r1, r2, rtol=1e-3, atol=1e-6)  # eq. 11: equal ranges per channel
        assert r.range_ratio_after == pytest.approx(1.0, abs=1e-3)
    # the ReLU6 between equalized layers became exact per-channel clamps
    assert isinstance(mods["features.2.block.0.2"], ChannelClamp)
    assert isinstance(mods["features.2.block.2.1"], nn.Identity)  # linear bottleneck: nothing to clamp


def test_scales_follow_eq_11_on_a_linear_pair():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU6(), nn.Linear(4, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, -2, 0.5], [0.1, 0.2, -0.3], [4.0, 1, 1], [0.5, 0.5, 0.5]]))
        m[2].weight.copy_(torch.tensor([[2.0, 0.1, -0.5, 1], [-1.0, 0.3, 0.25, 0.5]]))
    r1 = torch.tensor([2.0, 0.3, 4.0, 0.5])
    r2 = torch.tensor([2.0, 0.3, 0.5, 1.0])
    s = torch.sqrt(r1 / r2)
    w1, b1, w2 = m[0].weight.clone(), m[0].bias.clone(), m[2].weight.clone()
    x = torch.randn(16, 3) * 4
    before = m(x)
    lq.equalize(m)
    torch.testing.assert_close(m[0].weight, w1 / s[:, None])
    torch.testing.assert_close(m[0].bias, b1 / s)
    torch.testing.assert_close(m[2].weight, w2 * s[None, :])
    assert isinstance(m[1], ChannelClamp) and m[1].channel_dim == -1
    torch.testing.assert_close(m[1].upper, 6.0 / s)
    torch.testing.assert_close(m(x), before)


def test_grouped_conv_maps_input_channels_to_their_group():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3, groups=2))
    with torch.no_grad():
        m[0].weight.mul_(torch.logspace(-2, 1, 8)[:, None, None, None])
    x = torch.randn(3, 2, 10, 10)
    before = m(x)
    (pair,) = lq.equalize(m)
    assert (pair.first, pair.between, pair.second) == ("0", ["1", "2"], "3")
    torch.testing.assert_close(m(x), before, rtol=1e-4, atol=1e-5)


class _FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        g = F.relu(self.b(h)) + h  # h is read by b and by the add: a -> b is not a pair; nor b -> d (the add)
        return self.c(F.relu(self.d(g)))  # d -> F.relu -> c is


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return self.body(x)


def test_pairs_from_the_graph_respect_other_readers():
    torch.manual_seed(0)
    m = _FunctionalRelu()
    x = torch.randn(5, 4)
    before = m(x)
    report = lq.equalize(m)
    assert [(r.first, r.between, r.second) for r in report] == [("d", [], "c")]
    torch.testing.assert_close(m(x), before)


def test_untraceable_model_falls_back_to_sequential_scanning():
    torch.manual_seed(0)
    m = _Untraceable()
    x = torch.randn(5, 4)
    before = m(x)
    (pair,) = lq.equalize(m)
    assert (pair.first, pair.second) == ("body.0", "body.2")
    torch.testing.assert_close(m(x), before)


def test_batchnorm_between_stops_the_pair_and_warns():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with pytest.warns(UserWarning, match="fold_bn"):
        assert lq.equalize(m.eval()) == []


def test_named_pairs_are_checked_against_the_graph_and_the_layer_kinds():
    m = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="does not connect"):  # a Sigmoid between: not homogeneous
        lq.equalize(m, pairs=[("0", [], "2")])
    conv_linear = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Linear(8, 4))  # Linear reads the width
    with pytest.raises(ValueError, match="only Linear -> Linear or Conv -> Conv"):
        lq.equalize(conv_linear, pairs=[("0", ["1"], "2")])
    x = torch.randn(2, 3, 5, 8)
    before = conv_linear(x)
    with pytest.warns(UserWarning, match="nothing equalized"):
        assert lq.equalize(conv_linear) == []
    torch.testing.assert_close(conv_linear(x), before)


def test_named_pair_in_an_untraceable_model_warns_and_checks_what_it_can():
    m = _Untraceable()
    with pytest.warns(UserWarning, match="not checked"), pytest.raises(ValueError, match="not ReLU"):
        lq.equalize(m, pairs=[("body.0", ["body.2"], "body.2")])


def test_tied_weights_clamps_with_a_lower_bound_and_non_finite_weights_are_not_equalized():
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 4))
    tied[3].weight = tied[0].weight  # shared Parameter
    x = torch.randn(3, 4)
    before = tied(x)
    with pytest.warns(UserWarning, match="nothing equalized"):
        assert lq.equalize(tied) == []
    torch.testing.assert_close(tied(x), before)
    clamp = nn.Sequential(nn.Linear(4, 4), ChannelClamp(torch.full((4,), 2.0), lower=-1.0, channel_dim=-1),
                          nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="nothing equalized"):
        assert lq.equalize(clamp) == []
    bad = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        bad[0].weight[1, 1] = float("inf")
    w = bad[2].weight.detach().clone()
    with pytest.raises(ValueError, match=r"0.weight holds NaN or Inf"):
        lq.equalize(bad)
    assert torch.equal(bad[2].weight, w)


def test_failed_quantize_leaves_the_model_unequalized():
    m = _folded_mobilenet()
    with pytest.raises(ValueError):
        lq.quantize(m, lq.QuantConfig(equalize=True, skip=["*"]))
    assert not any(isinstance(mod, ChannelClamp) for mod in m.modules())


def test_int8qat_refuses_equalize_in_fit():
    from lq.callbacks import Int8QAT

    cb = Int8QAT(config=lq.QuantConfig(equalize=True))
    with pytest.raises(ValueError, match="Equalize the float model before the Trainer"):
        cb.setup(_FakeTrainer(), nn.Sequential(nn.Linear(2, 2)), "fit")


class _FakeTrainer:
    """What QuantizationCallback.setup reads before it gets to the config check."""

    class strategy:  # noqa: N801 - attribute access like Lightning's
        root_device = torch.device("cpu")

    is_global_zero = True
    world_size = 1


def test_quant_config_equalize_runs_before_the_swap():
    m = _folded_mobilenet()
    ref = copy.deepcopy(m)
    lq.quantize(m, lq.QuantConfig(equalize=True))
    assert isinstance(dict(m.named_modules())["features.2.block.0.2"], ChannelClamp)
    x = torch.randn(2, 1, 28, 28)
    with lq.quantization_disabled(m):
        torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ bias correction
def _weight_error(w: torch.Tensor) -> torch.Tensor:
    """eps = Q(W) - W for 8-bit symmetric per-output-channel max quantization (the paper's eq. 7-8)."""
    amax = w.abs().reshape(w.shape[0], -1).amax(1).reshape([-1] + [1] * (w.dim() - 1))
    step = amax / 127
    return torch.round(w / step).clamp(-127, 127) * step - w


def test_bias_correction_removes_the_expected_shift_of_a_linear_layer():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 16) * torch.logspace(-1, 1, 16))  # coarse steps in big rows
    model = nn.Sequential(layer)
    mean = torch.linspace(0.5, 3.0, 16)  # inputs with a non-zero mean: E[eps x] = eps E[x] != 0
    data = [mean + 0.1 * torch.randn(64, 16) for _ in range(4)]
    eps = _weight_error(layer.weight.detach())
    bias = layer.bias.detach().clone()
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
    lq.calibrate(model, data, num_samples=256)
    xq = [model[0].input_quantizer(x) for x in data]
    expected = eps @ torch.cat(xq).mean(0)  # eq. 13: the shift per output channel
    assert expected.abs().max() > 1e-3
    (entry,) = lq.correct_bias(model, data, num_samples=256)
    assert entry.layer == "0" and entry.samples == 256
    torch.testing.assert_close(model[0].quantized_bias().detach(), bias - expected, rtol=1e-4, atol=1e-6)
    # after the correction the quantized output is unbiased on that data
    with torch.no_grad():
        q = torch.cat([model(x) for x in data])
        with lq.quantization_disabled(model):
            f = torch.cat([F.linear(x, layer.weight, bias) for x in data])
    assert (q - f).mean(0).abs().max() < 1e-5 + 0.05 * expected.abs().max()


def test_bias_correction_of_a_padded_conv_counts_the_padding():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    model = nn.Sequential(conv)
    data = [torch.rand(8, 3, 6, 6) + 1 for _ in range(2)]
    eps = _weight_error(conv.weight.detach())
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
    lq.calibrate(model, data, num_samples=16)
    xq = torch.cat([model[0].input_quantizer(x) for x in data])
    expected = F.conv2d(xq, eps, padding=1).mean(dim=(0, 2, 3))  # border outputs see fewer taps
    lq.correct_bias(model, data, num_samples=16)
    assert model[0].bias is None  # a conv without bias keeps none: the correction is a buffer
    torch.testing.assert_close(model[0].quantized_bias().detach(), -expected, rtol=1e-4, atol=1e-7)


def test_quant_config_bias_correction_runs_inside_calibrate_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    float_model = copy.deepcopy(model)
    data = [torch.rand(32, 8) + 1 for _ in range(2)]
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max"), bias_correction=True))
    lq.calibrate(model, iter(data), num_samples=64)  # a one-shot iterator: the kept batches are reused
    # layer 0 alone: its input is the data itself, so eq. 13 gives the shift independently of the code
    xq = torch.cat([model[0].input_quantizer(x) for x in data])
    expected = _weight_error(model[0].weight.detach()) @ xq.mean(0)
    torch.testing.assert_close(model[0].quantized_bias().detach(), model[0].bias.detach() - expected,
                               rtol=1e-4, atol=1e-6)
    assert torch.equal(model[0].bias.detach(), float_model[0].bias.detach())  # the float bias is untouched
    assert not any("bias_correction" in n for n, _ in model.named_parameters())  # a buffer, not a Parameter
    first = model[2].quantized_bias().detach().clone()
    lq.calibrate(model, data, num_samples=64)  # again: the correction is replaced, not added twice
    torch.testing.assert_close(model[2].quantized_bias().detach(), first)
    x = torch.rand(5, 8) + 1
    with lq.quantization_disabled(model):  # the float model is the original one
        torch.testing.assert_close(model(x), float_model(x))
    # the correction travels with the state_dict into a freshly quantized model, and into lq.convert
    fresh = copy.deepcopy(float_model)
    lq.quantize(fresh, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max"), bias_correction=True))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))
    converted = lq.convert(copy.deepcopy(model))
    torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)


def test_bias_correction_bad_input():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="lq.quantize"):
        lq.correct_bias(model, [torch.randn(2, 4)])
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
    with pytest.raises(ValueError, match=r"\['0'\] are not calibrated"):
        lq.correct_bias(model, [torch.randn(2, 4)])
    lq.calibrate(model, [torch.randn(8, 4)])
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="num_samples must be a positive int"):
            lq.correct_bias(model, [torch.randn(2, 4)], num_samples=bad)


class _Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.dead = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_bias_correction_names_a_layer_that_never_ran():
    model = _Branch()
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max"), skip=["dead"]))
    lq.calibrate(model, [torch.randn(4, 4)])
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max"), only=["dead"]))
    model.dead.input_quantizer.set_amax(torch.tensor(1.0))
    bias = model.used.quantized_bias().detach().clone()
    with pytest.raises(ValueError, match=r"\['dead'\] never ran"):
        lq.correct_bias(model, [torch.randn(4, 4)])
    assert torch.equal(model.used.quantized_bias().detach(), bias)  # nothing corrected
    assert lq.bias_correction.corrections(model) == {}
