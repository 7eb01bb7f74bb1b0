"""Converted models under torch.compile / torch.export (``lq.convert(compile=True)``, ``lq.deploy.traced``).

The integer kernels are checked against integer math done another way (float64 convolution of the same
integers, Python ints); whole models against the eager per-layer path (``fuse=False``), which the other deploy
tests check against eq. 10.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lq
from lq.deploy import traced
from lq.models import SmallCNN, SmallResNet
from lq.ops import hardware as hw


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
    lq.calibrate(model, [x], num_samples=None)
    return model


def _randomise_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize(
    "c, o, hw_in, k, stride, pad, dil",
    [
        (3, 5, (9, 7), (3, 3), (1, 1), (1, 1), (1, 1)),
        (2, 4, (10, 10), (3, 3), (2, 2), (0, 0), (1, 1)),
        (4, 3, (11, 9), (3, 3), (1, 2), (2, 1), (2, 1)),
        (5, 6, (8, 8), (1, 1), (2, 2), (0, 0), (1, 1)),
        (2, 7, (6, 12), (1, 5), (1, 1), (0, 2), (1, 1)),
    ],
)
def test_conv2d_int_mm_equals_integer_convolution(c, o, hw_in, k, stride, pad, dil):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(-127, 128, (2, c, *hw_in), generator=g).float()
    w = torch.randint(-127, 128, (o, c, *k), generator=g, dtype=torch.int8)
    w_kn = w.permute(2, 3, 1, 0).reshape(-1, o)
    got = traced.conv2d_int_mm(t, w_kn, k, stride, pad, dil, 127, 127)
    want = F.conv2d(t.double(), w.double(), None, stride, pad, dil)
    assert got.shape == want.shape
    assert torch.equal(got.double(), want)


def test_int_mm_exact_splits_reductions_that_overflow_int32_and_pads_to_cuda_shapes():
    k = 140_000  # 127 * 127 * k > 2^31: one int32 GEMM would overflow
    a = torch.full((3, k), 127, dtype=torch.int8)
    a[1] = -127
    w = torch.full((k, 2), 127, dtype=torch.int8)
    got = traced.int_mm_exact(a, w, 127, 127)
    exact = torch.tensor(127 * 127 * k, dtype=torch.float64).float().item()  # the fp32 output's rounding of it
    assert got[0, 0].item() == exact and got[1, 1].item() == -exact
    # cuBLASLt's shape rules met by zero padding (M > 16, K and N multiples of 8); the same numbers
    g = torch.Generator().manual_seed(0)
    a2 = torch.randint(-127, 128, (5, 13), generator=g, dtype=torch.int8)
    w2 = torch.randint(-127, 128, (13, 3), generator=g, dtype=torch.int8)
    want = (a2.long() @ w2.long()).float()
    assert torch.equal(traced.int_mm_exact(a2, w2, 127, 127, cuda_shapes=True), want)


class _Net(nn.Module):
    """Paths a converted model takes: a 1x1 conv on one channel (K = 1: the float route), a strided conv, a
    residual add and functional ReLU in forward, a transposed conv, flatten and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv2d(1, 6, 1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.pre(x))
        h = F.relu(self.conv(h) + h)
        h = self.up(F.relu(self.down(h)))
        return self.head(torch.flatten(h, 1))


@pytest.fixture(scope="module")
def net_pair():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    fq = _calibrated(_Net().eval(), x)
    return fq, lq.convert(copy.deepcopy(fq), fuse=False), x


def test_compiled_model_equals_per_layer_path_in_one_graph(net_pair):
    fq, eager, x = net_pair
    compiled = lq.convert(copy.deepcopy(fq), compile=True)
    assert traced.graph_breaks(compiled, x[:2]) == []
    with torch.no_grad():
        for batch in (x[:1], x):  # the second shape recompiles (dynamic batch)
            want = eager(batch)
            torch.testing.assert_close(compiled(batch), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(compiled(batch), fq(batch), rtol=1e-4, atol=1e-4)


def test_compiled_model_names_the_layer_on_nan(net_pair):
    fq, _, x = net_pair
    compiled = lq.convert(copy.deepcopy(fq), compile=True)
    bad = x[:2].clone()
    bad[1, 0, 3, 3] = float("nan")
    with torch.no_grad():
        compiled(x[:2])
        with pytest.raises(RuntimeError, match="pre: NaN or Inf"):
            compiled(bad)


def test_converted_model_exports_with_torch_export(net_pair):
    _, eager, x = net_pair
    with torch.no_grad():
        program = torch.export.export(eager, (x[:4],))
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        if hw.cpu_int_mm_is_fast():
            assert "aten._int_mm.default" in targets  # the integer GEMM is in the graph
        torch.testing.assert_close(program.module()(x[4:8]), eager(x[4:8]), rtol=1e-5, atol=1e-6)


def test_compiled_resnet_equals_per_layer_path_channels_last():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 12, 12)
    fq = _calibrated(_randomise_bn(SmallResNet(widths=(4, 8))), x)
    eager = lq.convert(copy.deepcopy(fq), fuse=False)
    compiled = lq.convert(copy.deepcopy(fq), compile=True)
    assert all(not m.training for m in compiled.modules())
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(compiled(xc), eager(xc), rtol=1e-5, atol=1e-6)


def test_convert_leaves_every_module_in_eval_so_sequential_chains_fuse():
    """fold_bn's Identity used to be made in train mode after convert's eval(): every Int8Sequential then
    fell back to float between layers (CNN batch 64: 4.8x fp32 -> 1.1x)."""
    torch.manual_seed(0)
    x = torch.randn(8, 1, 12, 12)
    model = lq.convert(_calibrated(_randomise_bn(SmallCNN(width=4)), x))
    assert all(not m.training for m in model.modules())
    with torch.no_grad():
        assert model.features._fusable_now(x)
        assert any(s.kind == "layer" and s.feeds is not None for s in model.features.fused_steps)  # hand-over


def test_convert_refuses_non_bool_switches(net_pair):
    fq, _, _ = net_pair
    with pytest.raises(TypeError, match="compile"):
        lq.convert(copy.deepcopy(fq), compile="yes")


def test_compiled_model_keeps_working_after_an_input_it_refuses(net_pair):
    """An error raised while dynamo traces ``forward`` makes dynamo skip that code for good; the eager kernels
    below it must then run eagerly, not be traced (oneDNN's prepacking crashed on fake tensors)."""
    fq, eager, x = net_pair
    a = lq.convert(copy.deepcopy(fq), compile=True)
    b = lq.convert(copy.deepcopy(fq), compile=True)
    with pytest.raises(RuntimeError, match="asked for gradients"):
        a(x[:2].clone().requires_grad_())
    with torch.no_grad():
        for m in (a, b):
            torch.testing.assert_close(m(x[:2]), eager(x[:2]), rtol=1e-5, atol=1e-6)


def test_compiled_half_precision_rounds_between_layers_as_eager():
    """Without Inductor's emulate_precision_casts the fp16 cast between two layers was fused away and the
    next layer quantized unrounded values (59 of 256 rows differed)."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    fq = _calibrated(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval(), x)
    eager = lq.convert(copy.deepcopy(fq), fuse=False)
    compiled = lq.convert(copy.deepcopy(fq), compile=True)
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16):
            xh = x.to(dtype)
            torch.testing.assert_close(compiled(xh), eager(xh), rtol=0, atol=0)


def test_compiled_conv_takes_empty_unbatched_and_dynamic_inputs():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 9, 9)
    eager = lq.convert(_calibrated(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), x), fuse=False)
    compiled = torch.compile(copy.deepcopy(eager), dynamic=True)
    with torch.no_grad():
        for shape in ((2, 3, 7, 5), (0, 3, 9, 9), (3, 7, 5), (1, 3, 9, 9)):
            xi = torch.randn(shape)
            got, want = compiled(xi), eager(xi)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


_ONEDNN = hw.onednn_mode() != hw.UNAVAILABLE  # compiled graphs call oneDNN's conv (lq.deploy.onednn_op)


def test_large_compiled_convs_run_onednn_on_the_right_layer_and_equal_the_per_layer_path(tmp_path):
    """Convolutions big enough for oneDNN's set-up (``onednn_op.prefer_onednn``) call the layer's eager oneDNN kernel
    from the graph, with the per-layer path's numbers; a copy, a reloaded layer and an unpickled model each
    run their own weights; torch.export keeps the portable form."""
    torch._dynamo.reset()
    from lq.deploy import Int8ConvNd, onednn_op

    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    fq = _calibrated(_randomise_bn(SmallResNet(widths=(16, 32))), x)
    eager = lq.convert(copy.deepcopy(fq), fuse=False)
    compiled = lq.convert(copy.deepcopy(fq), compile=True)
    outputs = []  # each conv's output size, for the rule's count
    hooks = [m.register_forward_hook(lambda mod, inp, out: outputs.append((mod, out.shape)))
             for m in eager.modules() if isinstance(m, Int8ConvNd)]
    with torch.no_grad():
        with hw.record_kernels() as ran:
            got = compiled(x)
        want = eager(x)
        for h in hooks:
            h.remove()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        big = sum(onednn_op.prefer_onednn(s[0] * s[2] * s[3], m.kernel_size[0] * m.kernel_size[1], m.in_channels)
                  for m, s in outputs)
        assert big >= 2
        # oneDNN in the graph on every host that has it (half range: the signed split, one group only)
        assert ran.count("Int8Conv2d:onednn (compiled graph)") == (big if _ONEDNN else 0)
        with hw.record_kernels() as ran:
            compiled(x[:1])  # batch 1: below the size where oneDNN pays off
        assert "Int8Conv2d:onednn (compiled graph)" not in ran

        # a copy is a new set of layers: its graph must reach them, not the original's
        twin = copy.deepcopy(eager)
        state = twin.state_dict()
        state["stem.0.bias"] = torch.full_like(state["stem.0.bias"], 0.5)
        twin.load_state_dict(state)
        twin_compiled = torch.compile(twin)
        torch.testing.assert_close(twin_compiled(x), twin(x), rtol=1e-5, atol=1e-6)
        assert (twin(x) - eager(x)).abs().max() > 1e-3
        torch.save(eager, tmp_path / "int8.pt")
        loaded = torch.load(tmp_path / "int8.pt", weights_only=False)
        torch.testing.assert_close(torch.compile(loaded)(x), eager(x), rtol=1e-5, atol=1e-6)

        program = torch.export.export(eager, (x,))
        assert not any("onednn_conv" in str(n.target) for n in program.graph.nodes)
        torch.testing.assert_close(program.module()(x), eager(x), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(hw.onednn_mode() == hw.UNAVAILABLE, reason="needs oneDNN's int8 convolution")
def test_compiled_onednn_conv_half_range_split_is_exact(monkeypatch):
    """The AVX2 form of the graph's oneDNN call (signed integers split into ``[max(t, 0), max(-t, 0)]`` against
    ``[W, -W]``, every u8 <= 127), run here on whatever host: the per-layer path's numbers."""
    from lq.deploy import onednn_op

    torch._dynamo.reset()
    monkeypatch.setattr(onednn_op, "_mode", lambda: hw.HALF_RANGE)
    torch.manual_seed(2)
    x = torch.randn(32, 3, 20, 20)  # big enough for oneDNN (onednn_op.prefer_onednn)
    fq = _calibrated(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)).eval(), x)
    eager = lq.convert(copy.deepcopy(fq), fuse=False)
    compiled = torch.compile(copy.deepcopy(eager))
    with torch.no_grad(), hw.record_kernels() as ran:
        got = compiled(x)
    assert ran.count("Int8Conv2d:onednn (compiled graph)") == 2
    torch.testing.assert_close(got, eager(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_compiled_conv_sees_a_scale_replaced_through_buffers() -> None:
    """A converted conv's input scale replaced behind the module's back (``_buffers[...] = t``): the compiled
    graph quantizes with the new scale, and the oneDNN op inside it re-packs to match (``sync_cache``); a
    review found it kept the old pack's step (max error 1.4 on outputs up to 2.8)."""
    torch.manual_seed(23)
    x = torch.randn(16, 16, 28, 28)  # big enough for the oneDNN op inside the graph (hw.ran says so)
    fq = _calibrated(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)).eval(), x)
    model = lq.convert(copy.deepcopy(fq), fuse=False)
    compiled = torch.compile(model)
    with torch.no_grad():
        with hw.record_kernels() as ran:
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
        if "Int8Conv2d:onednn (compiled graph)" not in ran:
            pytest.skip(f"the compiled graph took another conv kernel here ({ran})")
        new = model[0].input_scale * 0.5
        model[0]._buffers["input_scale"] = new
        reference = lq.convert(copy.deepcopy(fq), fuse=False)
        reference[0].input_scale = new.clone()
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)
