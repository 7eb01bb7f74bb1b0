"""Int8Training and Int8QAT(compute="int8") on a plain LightningModule (issue 4)."""

import lightning.pytorch as pl
import pytest
import torch

import lq
import lq.ops
from lq.callbacks import Int8QAT, Int8Training
from lq.nn.int8_compute import int8_compute_config, use_int8_compute
from test_callbacks import DigitsData, Plain, fresh, pretrained, trainer  # noqa: F401 - fixture


def count_calls(monkeypatch):
    calls = {"n": 0}
    real = lq.ops.int8_linear

    def spy(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(lq.ops, "int8_linear", spy)
    return calls


def test_int8_training_runs_int8_ops_and_learns(tmp_path, monkeypatch):
    calls = count_calls(monkeypatch)
    pl.seed_everything(0)
    fp32 = Plain(lr=0.2)
    pl.seed_everything(0)
    int8 = Plain(lr=0.2)
    int8.load_state_dict(fp32.state_dict())
    trainer(tmp_path, [], max_epochs=2, enable_checkpointing=False).fit(fp32, DigitsData(shuffle=False))
    t = trainer(tmp_path, [Int8Training()], max_epochs=2, enable_checkpointing=False)
    t.fit(int8, DigitsData(shuffle=False))
    assert calls["n"] >= 3 * 28  # three Linear layers, 28 steps
    assert all(int8_compute_config(m) is not None for m in lq.quantized_layers(int8).values())
    acc = {n: trainer(tmp_path, []).validate(m, DigitsData(), verbose=False)[0]["val_acc"] for n, m in
           (("fp32", fp32), ("int8", int8))}
    assert acc["int8"] > 0.5 and abs(acc["int8"] - acc["fp32"]) < 0.05, acc


def test_int8_training_skip_and_config_validation():
    from lq.ops import Int8ComputeConfig

    with pytest.raises(ValueError, match="dynamic"):
        Int8Training(compute=Int8ComputeConfig(act_scale="static"))
    with pytest.raises(TypeError, match="Int8ComputeConfig"):
        Int8Training(compute={"act_bits": 8})


def test_deviation_lr_scaling_applies_per_step_and_restores(tmp_path):
    seen = []

    class Rec(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    m = Plain(lr=0.2)
    cb = Int8Training(deviation_lr_scaling=True)
    t = trainer(tmp_path, [cb, Rec()], max_steps=3, enable_checkpointing=False)
    t.fit(m, DigitsData())
    assert all(0 < lr < 0.2 for lr in seen)  # scaled down by the measured deviation
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 ** 0)  # restored (StepLR per epoch)


def test_qat_int8_compute_gives_the_fake_quant_numbers(tmp_path, pretrained):  # noqa: F811
    m = fresh(pretrained)
    t = trainer(tmp_path, [Int8QAT(num_samples=256, compute="int8")], max_steps=2, enable_checkpointing=False)
    t.fit(m, DigitsData())
    assert all(int8_compute_config(layer) is not None for layer in lq.quantized_layers(m).values())
    x = torch.rand(16, 64)
    m.eval()
    with torch.no_grad():
        out_int8 = m(x)
        use_int8_compute(m, False)
        out_fake = m(x)
    torch.testing.assert_close(out_int8, out_fake, atol=1e-4, rtol=1e-4)


def test_compiled_quantizers_stay_compiled_through_a_resnet(monkeypatch):
    """A ResNet needs more variants of the fused quantizers (ranks, kept dims, sizes of 1, grad/inference
    modes) than Dynamo's per-code recompile limit (8). Each variant must get its own compiled copy; before,
    the 9th variant hit the limit and the helper fell back to eager ops for the rest of the run. Dynamo's
    guards are what matter, so the cheap ``eager`` backend stands in for Inductor."""
    import functools

    from lq.models import SmallResNet
    from lq.ops import Int8ComputeConfig, fused

    monkeypatch.setenv("LQ_COMPILE_QUANT", "1")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_failed", set())
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 16, 16))
    off = lq.QuantSpec(enabled=False)
    lq.quantize(model, lq.QuantConfig(weight=off, activation=off, layers=["Linear", "Conv2d"]))
    use_int8_compute(model, Int8ComputeConfig.for_this_machine())
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        model(x[:1])
    with torch.inference_mode():
        model(x)
    assert not fused._failed, fused._failed
    assert len(fused._compiled) > 8  # more variants than one code object could have held
