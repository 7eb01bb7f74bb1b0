"""Int8Training and Int8QAT(compute="int8") on a plain LightningModule (issue 4)."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

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


def test_int8_training_skip_and_config_validation(monkeypatch):
    from lq.ops import Int8ComputeConfig

    with pytest.raises(ValueError, match="dynamic"):
        Int8Training(compute=Int8ComputeConfig(act_scale="static"))
    with pytest.raises(TypeError, match="Int8ComputeConfig"):
        Int8Training(compute="stochastic")
    # a mapping of its fields (a YAML or Hydra override: OmegaConf's DictConfig too) builds the config
    from omegaconf import OmegaConf

    for mapping in ({"grad_rounding": "stochastic_hash"}, OmegaConf.create({"grad_rounding": "stochastic_hash"})):
        cb = Int8Training(compute=mapping)  # over this machine's defaults (7-bit operands without VNNI)
        assert cb.compute == Int8ComputeConfig.for_this_machine(grad_rounding="stochastic_hash")
    from lq.ops import hardware

    with monkeypatch.context() as m:  # a CPU without VNNI: the fields not named keep for_cpu_without_vnni's
        m.setattr(hardware, "onednn_mode", lambda: hardware.HALF_RANGE)
        cb = Int8Training(compute={"clip_every": 16})
        assert cb.compute == Int8ComputeConfig.for_cpu_without_vnni(clip_every=16) and cb.compute.act_bits == 7
        assert Int8Training(compute={"clip_every": 16, "act_bits": 8}).compute.act_bits == 8
    with pytest.raises(TypeError, match="nope"):
        Int8Training(compute={"nope": 1})
    with pytest.raises(ValueError, match="grad_rounding"):
        Int8Training(compute={"grad_rounding": "up"})


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
    monkeypatch.setenv("LQ_NATIVE", "0")  # (the compiled quantizers; lq/ops/quant.c takes the Linear head's)
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


# --------------------------------------------------------------- clip state per layer object (issue 11)
def test_periodic_clip_state_is_per_layer_object_for_models_with_the_same_names(monkeypatch):
    """Two models with identical layer names ("0"), trained alternately with clip_every=4: model A sees
    heavy-tailed output gradients (a search clips, ratio < 1), model B uniform ones (a search keeps 1.0).
    Each keeps its own counter and ratio. With state shared by layer name, B's first backward would reuse
    A's ratio and A's counter would be restarted by B's searches."""
    from torch import nn

    import sys

    from lq.ops import Int8ComputeConfig, quantize_grad
    from lq.ops.grad_quant import layer_clip_state

    torch.manual_seed(0)
    # 6-bit gradients (qmax 31): where clipping pays for a heavy tail and not for a uniform gradient
    cfg = Int8ComputeConfig(grad_bits=6, clip_every=4, grad_granularity="tensor", use_fast_kernels=False)
    off = lq.QuantSpec(enabled=False)

    def model():
        m = nn.Sequential(nn.Linear(64, 32, bias=False))
        with torch.no_grad():  # equal amax per output channel: the folded weight steps are one constant
            m[0].weight.copy_(torch.sign(torch.randn(32, 64)) * 0.1)
        lq.quantize(m, lq.QuantConfig(weight=off, activation=off, layers=["Linear"]))
        assert use_int8_compute(m, cfg) == ["0"]
        return m

    a, b = model(), model()
    x = torch.sign(torch.randn(128, 64))  # every row's amax is 1: the folded activation steps are one constant
    grads = {"A": torch.randn(128, 32) ** 3, "B": torch.rand(128, 32) * 2 - 1}
    # Independent expectation: one fresh search on each gradient (the constant folded steps do not change it).
    fresh_ratio = {k: quantize_grad(g, 31, None, cfg.clip_ratios).ratio for k, g in grads.items()}
    assert fresh_ratio["A"] < 1.0 and fresh_ratio["B"] == 1.0

    seen = []
    int8_linear_mod = sys.modules["lq.ops.int8_linear"]  # lq.ops.int8_linear is also the function's name
    real = int8_linear_mod.quantize_layer_grads

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.extend(r.ratio for r in out.values())
        return out

    monkeypatch.setattr(int8_linear_mod, "quantize_layer_grads", spy)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-7) for k, m in (("A", a), ("B", b))}
    for step in range(1, 9):
        for key, m in (("A", a), ("B", b)):
            seen.clear()
            xi = x.clone().requires_grad_(True)  # grad_input GEMM too
            (m(xi) * grads[key]).sum().backward()
            opts[key].step()
            opts[key].zero_grad()
            assert seen == [fresh_ratio[key]] * 2, (step, key, seen)
            count = (step - 1) % 4 + 1  # searched on this model's steps 1 and 5, reused in between
            assert layer_clip_state(m[0]) == {
                "output gradient (grad_input GEMM)": [count, fresh_ratio[key]],
                "output gradient (grad_weight GEMM)": [count, fresh_ratio[key]],
            }, (step, key)
    lq.ops.reset_clip_state(a)  # one model's reset leaves the other alone
    assert layer_clip_state(a[0]) == {} and len(layer_clip_state(b[0])) == 2


# ------------------------------------------------------------ deviation tracker closed on every path
class _RaiseInBackward(torch.autograd.Function):
    active_during_backward: list = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        from lq.ops import grad_quant

        _RaiseInBackward.active_during_backward.append(len(grad_quant._ACTIVE))
        raise RuntimeError("backward failed on purpose")


class BackwardRaises(Plain):
    def training_step(self, batch, batch_idx):
        x, y = batch
        h = _RaiseInBackward.apply(self.net[0](x))  # the int8 layers after it have run their backward first
        return torch.nn.functional.cross_entropy(self.net[1:](h), y)


def test_deviation_tracker_closed_when_backward_raises(tmp_path):
    from lq.ops import grad_quant

    assert not grad_quant._ACTIVE
    _RaiseInBackward.active_during_backward.clear()
    t = trainer(tmp_path, [Int8Training(deviation_lr_scaling=True)], max_epochs=1, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="backward failed on purpose"):
        t.fit(BackwardRaises(), DigitsData())
    assert _RaiseInBackward.active_during_backward == [1]  # the tracker was collecting when backward raised
    assert grad_quant._ACTIVE == []  # ... and is closed once the exception has propagated


def test_deviation_tracker_closed_at_teardown_and_exit_idempotent():
    from lq.ops import GradDeviationTracker, grad_quant

    cb = Int8Training(deviation_lr_scaling=True)
    cb.on_before_backward(None, None, None)
    assert len(grad_quant._ACTIVE) == 1
    cb.teardown(type("T", (), {})(), Plain(), "fit")  # a run that ended between backward hooks
    assert grad_quant._ACTIVE == [] and cb._tracker is None

    first, second = GradDeviationTracker(), GradDeviationTracker()  # equal contents, different trackers
    with first:
        with second:
            pass
        assert len(grad_quant._ACTIVE) == 1 and grad_quant._ACTIVE[0] is first  # not removed by equality
        second.__exit__(None, None, None)  # exiting an inactive tracker: nothing happens
        with first:  # re-entering an active one does not register it twice
            pass
        assert not first.active
    first.__exit__(None, None, None)
    assert grad_quant._ACTIVE == []


def test_torch_compile_of_an_int8_model_trains_and_reports_nan():
    """``torch.compile`` of a model on int8 compute (as ``Int8Training`` prepares it): one graph (no breaks), the
    backward traced too, gradients equal to eager's within float reordering (nearest rounding and no clip search
    make both deterministic), and NaN still an error naming the layer. Before, the conv ops' fake kernels
    promised contiguous outputs where oneDNN writes channels-last, and the compiled step crashed."""
    import torch._dynamo

    from lq.nn.int8_compute import use_int8_compute
    from lq.ops import Int8ComputeConfig

    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )
    off = lq.QuantSpec(enabled=False)
    lq.quantize(base, lq.QuantConfig(weight=off, activation=off, layers=["Linear", "Conv2d"]))
    cfg = Int8ComputeConfig.for_this_machine(grad_rounding="nearest", grad_clip=False)
    use_int8_compute(base, cfg)
    eager, compiled_model = base, copy.deepcopy(base)
    x = torch.randn(4, 3, 8, 8)
    explained = torch._dynamo.explain(compiled_model)(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    compiled = torch.compile(compiled_model)
    for model in (eager, compiled):
        model(x).square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"non-finite values .* layer '0'"):
        compiled(bad).sum().backward()
    # the default stochastic rounding, compiled: its noise bytes come from the opaque lq::noise_bytes op (windows
    # of the noise table, as eager), reproducible with torch.manual_seed, and the gradients point where eager's do
    use_int8_compute(compiled_model, Int8ComputeConfig.for_this_machine(grad_clip=False))
    use_int8_compute(eager, Int8ComputeConfig.for_this_machine(grad_clip=False))
    stochastic = torch.compile(compiled_model)
    runs = []
    for _ in range(2):
        compiled_model.zero_grad()
        torch.manual_seed(5)
        stochastic(x).square().sum().backward()
        runs.append(torch.cat([p.grad.reshape(-1) for p in compiled_model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    eager.zero_grad()
    eager(x).square().sum().backward()
    g_eager = torch.cat([p.grad.reshape(-1) for p in eager.parameters()])
    assert torch.nn.functional.cosine_similarity(runs[0], g_eager, dim=0) > 0.99


def test_compiled_int8_layers_keep_the_relu_output_not_a_bool_mask():
    """Compiled on CPU, an int8 Linear / conv after a ReLU keeps its float input for backward (lq.ops.partitioner),
    so AOT's partitioner reads ReLU's mask from that fp32 tensor instead of saving a bool mask (torch 2.13's
    Inductor writes bool masks 20-70x slower than fp32 on CPU: a compiled int8 MLP step took 55 ms against 31
    with this). Checked on what the compiled step saves for backward (saved_tensors_hooks see it), and the
    gradients equal eager's (the kept input only adds an exact zero). (Not covered: a ReLU whose output reaches
    the layer through a view, e.g. ReLU -> Flatten -> Linear: the partitioner then keeps the view and still
    saves the mask; small tensors at a CNN's head.)"""
    from lq.nn.int8_compute import use_int8_compute
    from lq.ops import Int8ComputeConfig
    from lq.ops.partitioner import keep

    g = torch.randn(5, 7)
    assert torch.equal(keep(torch.randn(3), g), g)
    torch.manual_seed(0)
    for base, x in (
        (nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)),
         torch.randn(32, 64)),
        (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(8, 4, 3, stride=2, padding=1)), torch.randn(4, 3, 6, 6)),
    ):
        off = lq.QuantSpec(enabled=False)
        lq.quantize(base, lq.QuantConfig(weight=off, activation=off, layers=["Linear", "Conv2d"]))
        use_int8_compute(base, Int8ComputeConfig.for_this_machine(grad_rounding="nearest", grad_clip=False))
        compiled_model = copy.deepcopy(base)
        compiled = torch.compile(compiled_model)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.dtype), t)[1], lambda t: t):
            y = compiled(x)
        y.square().sum().backward()
        assert saved and torch.bool not in saved and torch.uint8 not in saved, saved
        base(x).square().sum().backward()
        for (name, p), q in zip(base.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_noise_bytes_op_is_seeded_and_in_memory_order():
    """``lq::noise_bytes`` (compiled graphs' noise): the same seed gives the same bytes, laid out like the
    tensor it is for (channels-last: in memory order, as ``fused.noise_bits`` lays them)."""
    from lq.ops import fused  # noqa: F401 (registers lq::noise_bytes)

    like = torch.empty(4, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    seed = torch.tensor([123 + (5 << 7)])
    a, b = torch.ops.lq.noise_bytes(like, seed), torch.ops.lq.noise_bytes(like, seed)
    assert a.dtype == torch.int8 and a.shape == like.shape and a.stride() == like.stride() and torch.equal(a, b)
    assert not torch.equal(a, torch.ops.lq.noise_bytes(like, seed + (1 << 7)))  # the low 7 bits: the level shift
    plain = torch.ops.lq.noise_bytes(torch.empty(4, 6, 5, 5), seed)
    assert torch.equal(a.permute(0, 2, 3, 1).reshape(-1), plain.reshape(-1))  # the same bytes in memory order
    counts = torch.bincount(torch.ops.lq.noise_bytes(torch.empty(512, 512), seed).reshape(-1).long() & 127)
    assert (counts.float() - 2048).abs().max() < 6 * 2048**0.5
