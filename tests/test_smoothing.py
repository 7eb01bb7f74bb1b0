"""SmoothQuant (Xiao et al. 2023, eq. 4) with per-layer smoothing factors, checked against the equation on small
synthetic layers whose inputs have outlier channels (the transformer case)."""

from __future__ import annotations

import copy
import pytest
import torch
from torch import nn

import lq
from lq.checkpoint import apply_quantizer_state, quantizer_state
from lq.smoothing import ALPHAS, smoothings
from test_equalize import _Branch  # a Linear that never runs (a dead branch)

MAX = lq.QuantSpec(calibrator="max")


def _outlier_batches(n: int = 4, rows: int = 64, features: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Inputs whose channels 3 and 17 are 60x the others in every row (LLM/BERT-style outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    gain = torch.ones(features)
    gain[[3, 17]] = 60.0
    return [torch.randn(rows, features, generator=g) * gain for _ in range(n)]


def _model(features: int = 32, out: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, out), nn.ReLU(), nn.Linear(out, 8))


def _quantized(smooth: bool, data: list[torch.Tensor]) -> nn.Module:
    model = _model()
    lq.quantize(model, lq.QuantConfig(activation=MAX, smoothquant=smooth))
    lq.calibrate(model, data, num_samples=None)
    return model


def test_smoothing_factors_follow_eq4_and_keep_the_float_function():
    data = _outlier_batches()
    model = _model()
    float_model = copy.deepcopy(model)
    lq.quantize(model, lq.QuantConfig(activation=MAX))
    report = lq.smooth_quant(model, data, num_samples=None, alphas=[0.5])
    first = {r.layer: r for r in report}["0"]
    assert first.alpha == 0.5
    x_max = torch.cat(data).abs().amax(0)
    w_max = float_model[0].weight.detach().abs().amax(0)
    expected = (x_max.sqrt() / w_max.sqrt()).clamp(1e-5, 1e5)  # eq. 4 with alpha = 0.5
    torch.testing.assert_close(smoothings(model)["0"], expected, rtol=1e-6, atol=0)
    assert first.outlier_ratio_after < first.outlier_ratio_before / 3  # the outlier channels shrank
    x = data[0][:5]
    with lq.quantization_disabled(model):  # quantizers off: the original float layer, bit for bit
        assert torch.equal(model(x), float_model(x))
    assert not any("smoothing" in n for n, _ in model.named_parameters())  # a buffer, not a Parameter


def test_smoothing_cuts_the_output_error_of_outlier_inputs():
    data = _outlier_batches()
    test = _outlier_batches(n=1, seed=1)[0]
    ref = _model()(test).detach()
    errors = {}
    for smooth in (False, True):
        model = _quantized(smooth, data)
        with torch.no_grad():
            errors[smooth] = float((model(test) - ref).pow(2).mean())
    assert smoothings(model)["0"].numel() == 32
    assert errors[True] < errors[False] / 4, errors


def test_no_smoothing_where_it_cannot_help_and_min_gain_keeps_it_off():
    # channels alike and a constant weight: eq. 4 gives the same s for every channel, a global rescale that
    # per-tensor / per-row quantization ignores, so no candidate gains anything and min_gain keeps s = 1
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.25)
    lq.quantize(model, lq.QuantConfig(activation=MAX, smoothquant=False))
    base = torch.tensor([1.0, -1.0]).repeat(4)
    data = [base * torch.linspace(0.1, 1.0, 16).reshape(-1, 1)]  # every channel's max |x| is 1
    (entry,) = lq.smooth_quant(model, data, min_gain=1.01)
    assert entry.alpha is None and smoothings(model) == {}
    assert entry.error_after == entry.error_before
    # the outlier case passes the same bar easily (a 4x gain at least, test above)
    model2 = _model()
    lq.quantize(model2, lq.QuantConfig(activation=MAX, smoothquant=False))
    first = {r.layer: r for r in lq.smooth_quant(model2, _outlier_batches(), min_gain=2.0)}["0"]
    assert first.alpha is not None and first.error_before >= 2.0 * first.error_after


def test_smoothed_model_converts_and_checkpoints():
    data = _outlier_batches()
    model = _quantized(True, data)
    assert set(smoothings(model)) >= {"0"}
    x = _outlier_batches(n=1, seed=2)[0][:7]
    with torch.no_grad():
        fake = model(x)
    converted = lq.convert(copy.deepcopy(model))
    assert any(n.endswith("input_smoothing") for n, _ in converted.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(converted(x), fake, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # Lightning's test loop: W diag(s) is an inference tensor (no version counter)
        torch.testing.assert_close(model(x), fake)
    # quantizer state (what lq's Lightning callbacks checkpoint) into a freshly quantized model
    fresh = _model()
    apply_quantizer_state(fresh, quantizer_state(model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), fake)
    # a plain state_dict too (the buffer is created on load)
    fresh2 = _model()
    lq.quantize(fresh2, lq.QuantConfig(activation=MAX, smoothquant=True))
    fresh2.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh2(x), fake)
    # a converted model's state_dict loads into a converted model of an unsmoothed twin
    plain = lq.convert(_quantized(False, data))
    plain.load_state_dict(converted.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), converted(x))


def test_smoothed_layer_under_int8_compute_matches_fake_quant():
    from lq.nn.int8_compute import use_int8_compute
    from lq.ops import Int8ComputeConfig

    data = _outlier_batches()
    model = _quantized(True, data)
    x = data[0][:16]
    with torch.no_grad():
        fake = model(x)
    use_int8_compute(model, Int8ComputeConfig(act_scale="static"))
    with torch.no_grad():
        int8 = model(x)
    torch.testing.assert_close(int8, fake, rtol=1e-4, atol=1e-4)


def test_calibrate_with_smoothquant_takes_a_one_shot_iterator_and_restores_on_failure():
    data = _outlier_batches()
    model = _model()
    lq.quantize(model, lq.QuantConfig(activation=MAX, smoothquant=True))
    lq.calibrate(model, iter(data), num_samples=None)  # smoothing and calibration read the same batches
    twin = _quantized(True, data)
    torch.testing.assert_close(smoothings(model)["0"], smoothings(twin)["0"])
    before = {n: s.clone() for n, s in smoothings(model).items()}
    amax = {n: q.amax.clone() for n, q in lq.quantizers(model).items()}

    def bad_loop(m: nn.Module) -> None:
        m(data[0])
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        lq.calibrate(model, bad_loop)
    after = smoothings(model)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    for n, q in lq.quantizers(model).items():
        assert torch.equal(q.amax, amax[n]) or (q.amax.isnan().all() and amax[n].isnan().all())


def test_smooth_quant_after_calibration_resets_the_stale_ranges():
    data = _outlier_batches()
    model = _model()
    lq.quantize(model, lq.QuantConfig(activation=MAX, smoothquant=False))
    lq.calibrate(model, data)
    with pytest.warns(UserWarning, match="run lq.calibrate"):
        lq.smooth_quant(model, data)
    assert not model[0].input_quantizer.is_calibrated
    with pytest.raises(RuntimeError, match="calibrat"):
        model(data[0])  # never silently run on a range measured before smoothing
    lq.calibrate(model, data)
    model(data[0])


def test_smooth_quant_bad_input_names_the_problem_and_changes_nothing():
    data = _outlier_batches()
    with pytest.raises(ValueError, match="lq.quantize"):
        lq.smooth_quant(_model(), data)
    model = _model()
    lq.quantize(model, lq.QuantConfig(activation=MAX))
    for bad in ([], [1.5], [-0.1]):
        with pytest.raises(ValueError, match="alphas"):
            lq.smooth_quant(model, data, alphas=bad)
    with pytest.raises(ValueError, match=r"\['nope'\] are not quantized Linear"):
        lq.smooth_quant(model, data, layers=["nope"])
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            lq.smooth_quant(model, data, num_samples=bad)
    lq.smooth_quant(model, data)
    saved = {n: s.clone() for n, s in smoothings(model).items()}
    poisoned = [data[0].clone()]
    poisoned[0][2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in the input of layer '0'"):
        lq.smooth_quant(model, poisoned)
    assert all(torch.equal(smoothings(model)[n], saved[n]) for n in saved)  # the previous smoothing is back
    with pytest.raises(ValueError, match="calibration data is empty"):
        lq.smooth_quant(model, [])


def test_smooth_quant_names_a_layer_that_never_ran():
    model = _Branch()
    lq.quantize(model, lq.QuantConfig(activation=MAX))
    with pytest.raises(ValueError, match=r"\['dead'\] never ran"):
        lq.smooth_quant(model, [torch.randn(4, 4)])
    assert smoothings(model) == {}


def test_default_alphas_are_in_the_unit_interval():
    assert all(0 < a < 1 for a in ALPHAS) and 0.5 in ALPHAS  # the paper's default is among them


def test_smoothquant_is_a_quant_config_field_and_survives_to_dict():
    cfg = lq.QuantConfig(smoothquant=True)
    assert lq.QuantConfig.from_dict(cfg.to_dict()).smoothquant is True


def test_a_second_smooth_quant_that_removes_smoothing_resets_the_ranges():
    data = _outlier_batches()
    model = _model()
    lq.quantize(model, lq.QuantConfig(activation=MAX, smoothquant=False))
    lq.smooth_quant(model, data)
    lq.calibrate(model, data, num_samples=None)
    assert "0" in smoothings(model)
    with pytest.warns(UserWarning, match="run lq.calibrate"):
        lq.smooth_quant(model, data, min_gain=1e9)  # nothing qualifies: the smoothing is removed
    assert smoothings(model) == {} and not model[0].input_quantizer.is_calibrated


def test_calibrate_keeps_an_explicit_smooth_quant():
    data = _outlier_batches()
    model = _model()
    lq.quantize(model, lq.QuantConfig(activation=MAX))  # smoothquant=True: the default
    lq.smooth_quant(model, data, alphas=[0.5])
    chosen = {n: s.clone() for n, s in smoothings(model).items()}
    lq.calibrate(model, data, num_samples=None)
    assert smoothings(model).keys() == chosen.keys()
    assert all(torch.equal(smoothings(model)[n], s) for n, s in chosen.items())


def test_static_weight_range_of_a_smoothed_layer_whatever_its_mode_during_calibrate():
    data = _outlier_batches()
    spec_w = lq.QuantSpec(granularity="per_channel", calibrator="percentile", percentile=100.0)
    model = _model()
    lq.quantize(model, lq.QuantConfig(weight=spec_w, activation=MAX, smoothquant=False))
    lq.smooth_quant(model, data, alphas=[0.5])
    with lq.quantization_disabled(model, layers=["0"]):  # layer 0 is off while the others calibrate
        lq.calibrate(model, data, num_samples=None)
    w = model[0].weight.detach() * smoothings(model)["0"]
    torch.testing.assert_close(model[0].weight_quantizer.amax.reshape(-1), w.abs().amax(1))


def test_a_quantizer_state_without_smoothquant_reads_as_written_before_it_existed():
    d = lq.QuantConfig().to_dict()
    del d["smoothquant"]
    assert lq.QuantConfig.from_dict(d).smoothquant is False


def test_the_choice_is_reported_in_the_model_and_the_amax_table():
    from lq.tracking import calibration_label

    model = _quantized(True, _outlier_batches())
    report = {r.layer: r for r in model._lq_smoothing}
    assert report["0"].alpha is not None and report["0"].error_after * 2 <= report["0"].error_before
    assert calibration_label(model[0].input_quantizer) == "max + SmoothQuant"
    assert "SmoothQuant" not in calibration_label(model[0].weight_quantizer)


def test_quant_config_switches_must_be_bool():
    for name in ("smoothquant", "equalize", "bias_correction", "gelu10"):
        with pytest.raises(TypeError, match=f"QuantConfig.{name}"):
            lq.QuantConfig(**{name: "maybe"})
