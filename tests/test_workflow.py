"""calibrate / sensitivity / partial_quantize / quantization_disabled (paper Sections 3.4, 5.1, 6)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lq


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def loader(n=40, bs=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.zeros(n)), batch_size=bs)


def layer_inputs(model, batches):
    """Independent record of each Linear's input, by forward hooks on the float model."""
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: seen.setdefault(n, []).append(inp[0].detach()))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_max_calibration_equals_abs_max_of_each_layer_input():
    m = mlp()
    batches = [x for x, _ in loader()]
    inputs = layer_inputs(m, batches)
    lq.quantize(m, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
    lq.calibrate(m, loader(), num_samples=None)
    for name, layer in lq.quantized_layers(m).items():
        assert torch.allclose(layer.input_quantizer.amax, inputs[name].abs().max())
        assert layer.input_quantizer.mode == "quantize"


def test_num_samples_stops_mid_batch():
    m = mlp()
    x_all = torch.cat([x for x, _ in loader()])
    inputs = layer_inputs(m, [x_all[:15]])
    lq.quantize(m, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
    lq.calibrate(m, loader(), num_samples=15)
    assert torch.allclose(m[0].input_quantizer.amax, inputs["0"].abs().max())


def test_forward_loop_callable_and_train_mode_restored():
    m = mlp().train()
    lq.quantize(m, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
    calls = []

    def forward_loop(model):
        calls.append(model.training)
        for x, _ in loader():
            model(x)

    lq.calibrate(m, forward_loop)
    assert calls == [False] and m.training
    assert m[2].input_quantizer.is_calibrated


def test_short_loader_warns_and_uses_what_there_is():
    m = lq.quantize(mlp())
    with pytest.warns(UserWarning, match="asked for 1024 samples but the data held 40"):
        lq.calibrate(m, loader(), num_samples=1024)
    assert all(layer.input_quantizer.is_calibrated for layer in lq.quantized_layers(m).values())


def test_empty_or_exhausted_data_is_an_error():
    m = lq.quantize(mlp())
    with pytest.raises(ValueError, match="empty"):
        lq.calibrate(m, [])
    it = iter(loader())
    list(it)
    with pytest.raises(ValueError, match="exhausted"):
        lq.calibrate(m, it)


def test_nan_in_calibration_batch_names_the_layer_and_leaves_model_usable():
    m = lq.quantize(mlp())
    lq.calibrate(m, loader())
    amax_before = m[0].input_quantizer.amax.clone()
    x = torch.randn(4, 8)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="layer '0.input'.*NaN"):
        lq.calibrate(m, [x])
    # the previous calibration is intact and the model still quantizes
    assert torch.equal(m[0].input_quantizer.amax, amax_before)
    assert m[0].input_quantizer.mode == "quantize"
    assert torch.isfinite(m(torch.randn(2, 8))).all()


def _ranges(m):
    return {n: (q.amax.clone(), q.calib_choice) for n, q in lq.quantizers(m).items()}


def _same_ranges(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[n][0], b[n][0]) or (a[n][0].isnan().all() and b[n][0].isnan().all()) for n in a
    ) and all(a[n][1] == b[n][1] for n in a)


def test_forward_loop_that_raises_leaves_the_previous_calibration_whole():
    """Issue 13 bad input: every range and per-layer choice is what it was before the failed call, for a
    failure in the collection pass and in the per-layer scoring pass alike."""
    m = lq.quantize(mlp())  # default activation calibrator: layerwise
    lq.calibrate(m, loader())
    before = _ranges(m)
    assert any(c is not None for _, c in before.values())

    def broken(model):
        model(torch.randn(4, 8) * 50)  # would change the ranges if it got through
        raise RuntimeError("the user's loop failed")

    with pytest.raises(RuntimeError, match="user's loop failed"):
        lq.calibrate(m, broken)
    assert _same_ranges(_ranges(m), before)
    calls = []

    def fails_second_time(model):  # collection pass runs, the scoring pass (second call) raises
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("second pass")
        model(torch.randn(16, 8) * 50)

    with pytest.raises(RuntimeError, match="second pass"):
        lq.calibrate(m, fails_second_time)
    assert len(calls) == 2 and _same_ranges(_ranges(m), before)
    assert torch.isfinite(m(torch.randn(2, 8))).all()


def test_layer_no_batch_reaches_is_an_error_naming_it():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.body(x)

    m = lq.quantize(TwoHeads())
    with pytest.raises(ValueError, match=r"\['unused.input_quantizer'\].*QuantConfig.skip"):
        lq.calibrate(m, loader())
    assert m.body.input_quantizer.amax.isnan().all()  # nothing half-calibrated


def test_too_few_samples_for_a_histogram_warns_with_layer_and_count():
    m = lq.quantize(mlp(), lq.QuantConfig(activation=lq.QuantSpec(calibrator="entropy")))
    with pytest.warns(UserWarning, match=r"layer '0' collected only 16 values for a 2048-bin histogram"):
        lq.calibrate(m, [torch.randn(2, 8)])


def test_calibrate_requires_a_quantized_model_and_valid_num_samples():
    with pytest.raises(ValueError, match="lq.quantize"):
        lq.calibrate(mlp(), loader())
    m = lq.quantize(mlp())
    with pytest.raises(ValueError, match="num_samples"):
        lq.calibrate(m, loader(), num_samples=0)


def test_quantization_disabled_gives_float_reference_and_restores():
    m = mlp()
    x = torch.randn(5, 8)
    ref = m(x)
    lq.quantize(m)
    lq.calibrate(m, loader())
    q = m(x)
    assert not torch.allclose(q, ref)
    with lq.quantization_disabled(m):
        assert torch.equal(m(x), ref)
    assert torch.equal(m(x), q)
    with lq.quantization_disabled(m, keep=["2"]):
        assert lq.enabled_layers(m) == ["2"]
    assert lq.enabled_layers(m) == ["0", "2", "4"]


def neg_mse_to(reference_out, x):
    def evaluate(model):
        with torch.no_grad():
            return -torch.mean((model(x) - reference_out) ** 2).item()

    return evaluate


def fidelity_to(reference_out, x):
    """1 - relative L2 error to the fp32 outputs: 1.0 for the float model, a higher-is-better metric."""

    def evaluate(model):
        with torch.no_grad():
            return 1 - (torch.linalg.norm(model(x) - reference_out) / torch.linalg.norm(reference_out)).item()

    return evaluate


def test_sensitivity_ranks_the_damaged_layer_first_and_partial_quantize_skips_it():
    m = mlp()
    x = torch.randn(64, 8)
    ref = m(x).detach()
    lq.quantize(m)
    lq.calibrate(m, loader())
    # Damage layer "2": a range 1000x too small clips almost everything (its input is post-ReLU, > 0).
    m[2].input_quantizer.set_amax(m[2].input_quantizer.amax / 1000)
    evaluate = fidelity_to(ref, x)
    report = lq.sensitivity(m, evaluate)
    assert report.ranking()[0] == "2"
    assert report.fp32 == 1.0
    assert report.layers["2"] < 0.8 < 0.95 < min(report.layers["0"], report.layers["4"])
    assert lq.enabled_layers(m) == ["0", "2", "4"]  # modes restored
    result = lq.partial_quantize(m, evaluate, target=0.05, report=report)
    # Only the damaged layer needs to stay in float for a relative error within 5%.
    assert result.skipped == ["2"] and result.reached
    assert result.history[0] == (0, report.int8) and result.history[1][1] > 0.95
    assert lq.enabled_layers(m) == ["0", "4"]


def test_partial_quantize_relative_target_on_accuracy_like_metric():
    m = mlp()
    lq.quantize(m)
    lq.calibrate(m, loader())
    scores = {(): 0.80, ("0",): 0.85, ("0", "4"): 0.995}

    def evaluate(model):
        off = tuple(n for n in ["0", "2", "4"] if n not in lq.enabled_layers(model))
        return 1.0 if off == ("0", "2", "4") else scores.get(off, 0.5)

    # one at a time: only "0" quantized -> 0.5, only "2" -> 0.5 ... sorted ties keep order: make "0" worst
    report = lq.workflow.SensitivityReport(fp32=1.0, int8=0.80, layers={"0": 0.6, "4": 0.9, "2": 0.99})
    result = lq.partial_quantize(m, evaluate, target=0.01, report=report)
    assert result.skipped == ["0", "4"] and result.reached
    assert result.history == [(0, 0.80), (1, 0.85), (2, 0.995)]
    assert lq.enabled_layers(m) == ["2"]


def test_evaluate_must_return_a_finite_number():
    m = lq.quantize(mlp())
    lq.calibrate(m, loader())
    with pytest.raises(ValueError, match="finite"):
        lq.sensitivity(m, lambda model: float("nan"))
    with pytest.raises(TypeError, match="number"):
        lq.sensitivity(m, lambda model: "good")


def test_auto_calibration_keeps_the_best_candidate():
    m = mlp()
    x = torch.randn(64, 8)
    ref = m(x).detach()
    lq.quantize(m, lq.QuantConfig(activation=lq.QuantSpec(calibrator="auto")))
    evaluate = neg_mse_to(ref, x)
    with pytest.raises(ValueError, match="evaluate"):
        lq.calibrate(m, loader())
    lq.calibrate(m, loader(), evaluate=evaluate)
    choice = m._lq_calibration
    assert set(choice.scores) == {"max", "entropy", "percentile_99.9", "percentile_99.99", "percentile_99.999",
                                  "percentile_99.9999", "mse"}
    assert choice.scores[choice.best] == max(choice.scores.values())
    assert evaluate(m) == pytest.approx(choice.scores[choice.best])
