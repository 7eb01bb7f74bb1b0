"""lq.deploy.chain: int8 layers in a Sequential hand each other integers (``lq.convert(fuse=True)``).

The math checked: a layer's grid output is the next layer's eq. 7 applied to ``relu`` of its eq. 10 output,
``clip(round(relu(acc * step_x * step_w + b) / step_next), 0, q)`` (computed here in float64 from the
integer sums), and ReLU / max-pool / flatten commute with that quantizer, so the fused model equals the
unfused converted model and the fake-quant model within one output step (the bound of test_deploy).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lq
from lq.deploy import Int8ConvNd, Int8Linear, convert, gemv, kernels
from lq.deploy.chain import Int8Sequential, max_pool_grid

# the chain's hand-over mechanics (a layer smoothed by SmoothQuant takes floats: tests/test_smoothing.py)
CFG = lq.QuantConfig(activation=lq.QuantSpec(calibrator="max"), smoothquant=False)


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.eval()
    lq.quantize(model, CFG)
    lq.calibrate(model, [x], num_samples=None, method="max")
    return model


def _bound(model: nn.Module) -> float:
    """One quantization step of the outputs: the last quantized layer's input step times its largest |W|."""
    layer = list(lq.quantized_layers(model).values())[-1]
    return layer.input_quantizer.amax.item() / 127 * layer.weight.detach().abs().max().item()


def _cnn(pool_padding: int = 0) -> nn.Module:
    torch.manual_seed(0)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    features = [
        block(1, 8), nn.MaxPool2d(2), block(8, 16), nn.MaxPool2d(3, stride=2, padding=pool_padding, ceil_mode=True),
        nn.Dropout(0.1), block(16, 16), nn.Flatten(),
    ]
    n_flat = nn.Sequential(*features)(torch.zeros(1, 1, 28, 28)).shape[1]
    m = nn.Sequential(*features, nn.Linear(n_flat, 10)).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def _images(n: int) -> torch.Tensor:
    try:
        from lq.data import load_split

        return load_split("fashion_mnist", "test")[0][:n].contiguous()
    except (ImportError, FileNotFoundError):
        return torch.randn(n, 1, 28, 28)


# ------------------------------------------------------------------------------- one layer, the equations
def _expected_grid(acc: torch.Tensor, step_x: float, w_step: torch.Tensor, bias: torch.Tensor, step_next: float,
                   channel_dim: int, upper: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected integers, mask of values within float rounding of a .5 tie) in float64: eq. 7 with the next
    step on the activation ``relu(y)`` or ``clip(y, 0, upper)`` of eq. 10's ``y``."""
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    y = acc * (step_x * w_step.double()).reshape(shape) + bias.double().reshape(shape)
    v = (y.relu() if upper is None else y.clamp(0, upper)) / step_next
    near_tie = (v - v.floor() - 0.5).abs() < 1e-4
    return v.round().clamp(0, 127), near_tie


@pytest.mark.parametrize("clip", [None, 0.8], ids=["relu", "relu6-like"])
@pytest.mark.parametrize(
    "kind,backend,rows",
    [
        ("conv", "auto", 4), ("conv", "reference", 4),
        ("linear", "auto", 9), ("linear", "onednn", 9), ("linear", "onednn", 2), ("linear", "reference", 9),
    ],
)
def test_grid_output_is_the_next_layers_quantization(kind: str, backend: str, rows: int, clip: float | None) -> None:
    torch.manual_seed(3)
    if kind == "conv":
        layer, x = nn.Conv2d(6, 10, 3, padding=1), torch.randn(rows, 6, 9, 9)
    else:
        layer, x = nn.Linear(40, 24), torch.randn(rows, 40)
    model = _calibrated(nn.Sequential(layer), x)
    int8 = convert(copy.deepcopy(model), backend=backend, fuse=False)[0]
    assert isinstance(int8, (Int8ConvNd, Int8Linear))
    step_x, w_step = int8._steps()
    with torch.no_grad():
        y_float = int8(x)
    top = float(y_float.relu().amax())
    step_next = top / 127 * 0.6  # clips the top 40%: the upper clip of eq. 7 is exercised
    upper = None if clip is None else clip * top * 0.6  # a ReLU6-like clip below the grid's top
    inv_next = torch.tensor(1.0 / step_next)
    out = kernels.Output(relu=True, inv_step=inv_next, step=step_next, qmax=127, upper=upper)
    with torch.no_grad():
        grid = int8.run(x, out=out)
    # the exact integer sums of eq. 10 from the input integers (eq. 7) and the int8 weight
    t = kernels.quantize_to_grid(x, int8.input_scale, 127).double()
    acc = F.conv2d(t, int8.weight.double(), None, 1, 1) if kind == "conv" else t @ int8.weight.double().t()
    expected, near_tie = _expected_grid(acc, step_x, w_step, int8.bias, step_next, channel_dim=1, upper=upper)
    got = grid.double()
    assert got.shape == expected.shape
    top_int = 127 if upper is None else round(upper / step_next)
    assert got.min() >= 0 and got.max() == top_int  # clipped at q (or the clip), never the uint8 saturation
    ok = (got == expected) | (near_tie & ((got - expected).abs() <= 1))
    assert bool(ok.all()), f"{int((~ok).sum())} integers differ from eq. 7 of eq. 10"
    fast = ("onednn",) if kind == "conv" else ("fbgemm", "onednn", "int_mm")
    if int8._kernel(x.device, fast) == "onednn":
        assert grid.dtype == torch.uint8  # oneDNN writes the grid in its output stage

    # and a layer started from integers gives what it gives for floats that quantize to those integers
    if kind == "conv":
        nxt_model, x_next = nn.Sequential(nn.Conv2d(10, 4, 3)), torch.randn(2, 10, 9, 9)
    else:
        nxt_model, x_next = nn.Sequential(nn.Linear(24, 7)), torch.randn(5, 24)
    nxt = convert(_calibrated(nxt_model, x_next), backend=backend, fuse=False)[0]
    u = grid.to(torch.uint8)
    with torch.no_grad():
        from_grid = nxt.run(u, grid=True, dtype=torch.float32)
        from_float = nxt(u.float() * nxt._steps()[0])
    torch.testing.assert_close(from_grid, from_float, rtol=0, atol=0)


# ------------------------------------------------------------------------------- pooling on integers
@pytest.mark.parametrize("args", [
    {"kernel_size": 2},
    {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    {"kernel_size": 2, "dilation": 2},
    {"kernel_size": 3, "stride": 1, "padding": 1},
    {"kernel_size": (2, 3), "stride": (1, 2), "padding": (1, 0), "ceil_mode": True},
    {"kernel_size": 3, "stride": 3, "ceil_mode": True},
    {"kernel_size": 1},
])
def test_max_pool_on_integers_equals_float_pool(args: dict) -> None:
    torch.manual_seed(4)
    pool = nn.MaxPool2d(**args)
    u = torch.randint(0, 128, (3, 5, 11, 10), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    for inp in (u, u.contiguous(), u[0], u[:, :, 1:, :9]):  # channels-last, NCHW, unbatched, a strided view
        got = max_pool_grid(inp, pool)
        assert got.dtype == torch.uint8
        torch.testing.assert_close(got.float(), pool(inp.float()), rtol=0, atol=0)
    assert max_pool_grid(u, pool).data_ptr() != u.data_ptr()  # a new tensor, never a view of the input
    torch.testing.assert_close(max_pool_grid(u.float(), pool), pool(u.float()), rtol=0, atol=0)  # float grids


# ------------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("pool_padding", [0, 1])
def test_fused_cnn_matches_unfused_and_fake_quant(pool_padding: int) -> None:
    x = _images(96)
    fq = _calibrated(_cnn(pool_padding), x[:64])
    fused = convert(copy.deepcopy(fq))
    plain = convert(copy.deepcopy(fq), fuse=False)
    assert isinstance(fused, Int8Sequential) and type(plain) is nn.Sequential
    handoffs = [s for s in fused.fused_steps if s.kind == "layer" and s.feeds is not None]
    assert len(handoffs) == 3  # conv1 -> conv2, conv2 -> conv3 (through pools/dropout), conv3 -> flatten -> fc
    assert fused.state_dict().keys() == plain.state_dict().keys()
    bound = _bound(fq)
    with torch.no_grad():
        for xb in (x[64:], x[:1], x[64:].contiguous(memory_format=torch.channels_last)):
            ref, y, y_plain = fq(xb), fused(xb), plain(xb)
            assert y.shape == ref.shape and y.dtype == ref.dtype
            assert (y - ref).abs().max().item() <= bound
            assert (y - y_plain).abs().max().item() <= bound
            assert (y.argmax(1) == y_plain.argmax(1)).float().mean() >= 0.99


def test_fused_chain_keeps_the_input_layout_and_dtype() -> None:
    torch.manual_seed(5)
    x = torch.randn(4, 3, 12, 12)
    fq = _calibrated(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()), x)
    fused = convert(copy.deepcopy(fq))
    assert isinstance(fused, Int8Sequential)
    with torch.no_grad():
        y = fused(x)
        assert y.is_contiguous() and y.dtype == torch.float32
        y.view(4, -1)  # what user code does after a features block: must not fail on a channels-last output
        assert fused(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
        assert fused(x.to(torch.bfloat16)).dtype == torch.bfloat16
        torch.testing.assert_close(fused(x), convert(copy.deepcopy(fq), fuse=False)(x), rtol=0, atol=_bound(fq))


@pytest.mark.parametrize("backend", ["auto", "fbgemm", "onednn", "reference"])
def test_fused_mlp_backends(backend: str) -> None:
    torch.manual_seed(6)
    fq = _calibrated(nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(inplace=True),
                                   nn.Dropout(), nn.Linear(48, 5)), torch.randn(64, 32))
    fused = convert(copy.deepcopy(fq), backend=backend)
    assert isinstance(fused, Int8Sequential)
    bound = _bound(fq)
    with torch.no_grad():
        for x in (torch.randn(17, 32), torch.randn(1, 32), torch.randn(2, 3, 32), torch.randn(0, 32)):
            ref = fq(x)
            y = fused(x)
            assert y.shape == ref.shape
            if x.numel():
                assert (y - ref).abs().max().item() <= bound, backend


def test_fused_path_steps_aside_for_hooks_replaced_children_and_training() -> None:
    torch.manual_seed(7)
    x = torch.randn(8, 16)
    fq = _calibrated(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), x)
    fused = convert(copy.deepcopy(fq))
    plain = convert(copy.deepcopy(fq), fuse=False)
    seen = []
    handle = fused[1].register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)  # plain path: the hook sees floats
    assert len(seen) == 1 and seen[0].is_floating_point() and seen[0].min() >= 0
    handle.remove()

    # a replaced child is planned again, not run from a stale plan
    fused[1] = nn.LeakyReLU(0.5)
    plain[1] = nn.LeakyReLU(0.5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=_bound(fq))
    assert not any(s.feeds is fused[2] for s in fused.fused_steps)  # no hand-over through a LeakyReLU

    fused.train()
    with pytest.raises(RuntimeError, match="convert is for inference"):
        fused(x)
    fused.eval()
    with pytest.raises(RuntimeError, match="convert is for inference"):
        fused(x.requires_grad_())


def test_small_cnn_model_state_dict_round_trip_between_fused_and_unfused() -> None:
    from lq.models import SmallCNN

    torch.manual_seed(8)
    x = _images(32)
    fq = _calibrated(SmallCNN(width=8), x)
    fused, plain = convert(copy.deepcopy(fq)), convert(copy.deepcopy(fq), fuse=False)
    assert isinstance(fused.features, Int8Sequential)
    other = convert(_calibrated(SmallCNN(width=8), torch.randn(8, 1, 28, 28)))
    other.load_state_dict(plain.state_dict())  # same keys: fused and unfused checkpoints are interchangeable
    with torch.no_grad():
        torch.testing.assert_close(other(x), fused(x), rtol=0, atol=0)
        assert (fused(x) - fq(x)).abs().max().item() <= _bound(fq)
    assert math.isfinite(float(fused(x).sum()))


# ------------------------------------------------------------------------------- structures a review found
class _Triple(nn.Identity):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * x


class _Flat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1)  # fails on a channels-last tensor


def _both(model: nn.Module, x: torch.Tensor, backend: str = "auto") -> tuple[nn.Module, nn.Module]:
    fq = _calibrated(model, x)
    return convert(copy.deepcopy(fq), backend=backend), convert(copy.deepcopy(fq), backend=backend, fuse=False)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv1d(6, 4, 3), nn.ReLU()), (5, 3, 20)),
        (lambda: nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3)), (2, 2, 6, 6, 6)),
        (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), _Flat(), nn.Linear(6 * 8 * 8, 4)),
         (3, 3, 12, 12)),
        (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), _Triple(), nn.Linear(16, 4)), (6, 8)),
        (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Flatten(), nn.Linear(16, 4)), (6, 8)),
        (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU6(), nn.MaxPool2d(2), nn.Conv2d(6, 6, 3), nn.ReLU6(),
                               nn.Flatten(), nn.Linear(6 * 3 * 3, 4)), (5, 3, 12, 12)),
        (lambda: nn.Sequential(nn.Linear(8, 16), nn.Hardtanh(0.0, 0.3), nn.Linear(16, 16), nn.Hardtanh(-0.5, 0.5),
                               nn.Linear(16, 16), nn.ReLU(), nn.Hardtanh(0.0, 0.2), nn.Linear(16, 4)), (6, 8)),
    ],
    ids=["conv1d", "conv3d", "view-mid-chain", "identity-subclass", "flatten", "relu6", "hardtanh"],
)
def test_fused_equals_unfused_on_other_structures(make, shape) -> None:
    torch.manual_seed(10)
    x = torch.randn(shape)
    fused, plain = _both(make(), x)
    with torch.no_grad():
        y, ref = fused(x), plain(x)
        assert y.is_contiguous() and y.dtype == ref.dtype
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
        assert fused(x.half()).dtype == torch.float16  # the float dtype survives a Flatten on integers


def test_edits_after_convert_replan_and_the_container_keeps_its_identity() -> None:
    torch.manual_seed(11)
    x = torch.randn(5, 8)
    seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 4))
    seq.register_buffer("mean", torch.ones(1))
    twin = copy.deepcopy(seq)
    fq = _calibrated(seq, x)
    fused = convert(fq)
    assert fused is fq and isinstance(fused, Int8Sequential)  # in place: other references see the int8 model
    assert "mean" in fused.state_dict()
    plain = convert(_calibrated(twin, x), fuse=False)
    plain.load_state_dict(fused.state_dict())
    for edit in (lambda m: m.append(nn.Sigmoid()), lambda m: m[2].append(nn.Tanh()),
                 lambda m: m.__setitem__(3, m[2][0]), lambda m: m.__setitem__(2, nn.Sequential(nn.Tanh()))):
        edit(fused)
        edit(plain)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=1e-6)


def test_nan_input_in_a_chain_names_the_layer() -> None:
    x = torch.randn(4, 8)
    fused, _ = _both(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), x)
    x[1, 2] = float("nan")
    with torch.no_grad(), pytest.raises(FloatingPointError, match="0: NaN"):
        fused(x)


def test_a_used_converted_model_saves_loads_and_copies(tmp_path) -> None:
    """oneDNN's packed weights (opaque tensors) are a cache: pickling drops it, the copy rebuilds it."""
    torch.manual_seed(12)
    x = torch.randn(4, 3, 10, 10)
    fused, _ = _both(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 5)), x)
    with torch.no_grad():
        y = fused(x)  # fills the caches
        torch.save(fused, tmp_path / "int8.pt")
        loaded = torch.load(tmp_path / "int8.pt", weights_only=False)
        assert isinstance(loaded, Int8Sequential)
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(fused)(x), y, rtol=0, atol=0)
        twin = copy.deepcopy(fused)
        assert [s.module for s in twin.fused_steps] == [m for m in twin]  # the copy's plan runs the copy's layers


def test_plan_hands_over_through_relu_like_clips_only() -> None:
    torch.manual_seed(13)
    x = torch.randn(6, 8)
    fused, _ = _both(nn.Sequential(nn.Linear(8, 16), nn.Hardtanh(0.0, 0.3), nn.Linear(16, 16), nn.Hardtanh(-0.5, 0.5),
                                   nn.Linear(16, 16), nn.ReLU(), nn.ReLU6(), nn.Hardtanh(0.0, 0.2), nn.Linear(16, 4)), x)
    layers = [s for s in fused.fused_steps if s.kind == "layer"]
    assert [s.feeds is not None for s in layers] == [True, False, True, False]
    assert layers[0].out.upper == pytest.approx(0.3)
    assert layers[2].out.upper == pytest.approx(0.2)  # ReLU, ReLU6, Hardtanh(0, 0.2) compose to the smallest
    assert not layers[1].out.relu  # Hardtanh(-0.5, 0.5) is signed: no fusion, it runs as itself


def test_clip_edits_after_convert_replan() -> None:
    torch.manual_seed(14)
    x = torch.randn(6, 8)
    fused, plain = _both(nn.Sequential(nn.Linear(8, 16), nn.ReLU6(), nn.Linear(16, 16), nn.Hardtanh(0.0, 1.0),
                                       nn.Linear(16, 4)), x)
    with torch.no_grad():
        fused(x)  # planned with the original clips
        for m in (fused, plain):
            m[1].max_val = 0.05
            m[3].min_val = -1.0  # no longer a ReLU-like clip: the hand-over must stop
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=1e-6)
    assert [s.feeds is not None for s in fused.fused_steps if s.kind == "layer"] == [True, False, False]


@pytest.mark.parametrize("backend", ["auto", "onednn", "reference"])
def test_clip_on_a_rounding_tie_matches_the_unfused_model(backend: str) -> None:
    """Hardtanh(0, 0.5) before a layer whose input scale is 61: 0.5 * 61 = 30.5 is a tie. Every clipped value
    sits on it, so a kernel rounding it the other way would move all of them at once."""
    torch.manual_seed(15)
    x = torch.randn(32, 10) * 3
    fused, plain = _both(nn.Sequential(nn.Linear(10, 64), nn.Hardtanh(0.0, 0.5), nn.Linear(64, 4)), x, backend)
    for m in (fused, plain):
        m[2].input_scale.fill_(61.0)
        m[2]._cache.clear()
    with torch.no_grad():
        for xb in (x, x[:3]):
            torch.testing.assert_close(fused(xb), plain(xb), rtol=0, atol=1e-6)


def test_unbatched_conv_input() -> None:
    torch.manual_seed(16)
    x = torch.randn(4, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.ReLU())
    fq = _calibrated(model, x)
    with torch.no_grad():
        ref = fq(x[0])
        for fuse in (True, False):
            y = convert(copy.deepcopy(fq), fuse=fuse)(x[0])
            assert y.shape == ref.shape == (3, 4, 4)
            assert (y - ref).abs().max().item() <= _bound(fq)


_FBGEMM = pytest.mark.skipif(kernels.fbgemm_mode() == kernels.UNAVAILABLE, reason="needs torch's fbgemm engine")


@_FBGEMM
def test_fbgemm_quantization_at_the_grid_cap_is_eq7_at_every_tie() -> None:
    """kernels.fbgemm_grid_cap: where it gives a clip, fbgemm's own input quantization (read back through an
    identity weight) equals eq. 7 on values at, just above and just below every half-integer and above the top."""
    torch.manual_seed(14)
    k = 128
    packed = kernels.fbgemm_prepack(torch.eye(k, dtype=torch.int8), torch.ones(k))
    op = kernels.fbgemm_op(False)
    checked = refused = 0
    for _ in range(60):
        inv = torch.tensor(127 / (torch.rand(()).item() * 10 + 1e-3))
        step = float(1.0 / inv)
        cap = kernels.fbgemm_grid_cap(step, inv, 127)
        if cap is None:
            refused += 1
            assert float(1.0 / torch.tensor(step)) != float(inv)  # refused only where the round trip fails
            continue
        ties = (torch.arange(127.0) + 0.5) / inv
        big = torch.finfo(torch.float32).max
        y = torch.cat([ties, torch.nextafter(ties, torch.tensor(big)), torch.nextafter(ties, torch.tensor(-big)),
                       torch.rand(4 * k - 3 * 127 - 3) * 2 * cap, torch.tensor([0.0, cap, 1e30])])
        for row in y.reshape(-1, k):
            got = (op(row.clamp(max=cap).reshape(1, k), step, 0, packed) / step).round().reshape(-1)
            assert torch.equal(got, (row * inv).round().clamp(0, 127))
        checked += 1
    assert checked >= 30 and refused < 30


@_FBGEMM
def test_lean_linear_program_equals_the_generic_run(monkeypatch) -> None:
    """The batch-1 path of an all-Linear chain (Int8Linear.lean_step) gives ``run``'s numbers bit for bit, on
    the same kernel, for every hand-over form, and is rebuilt when a scale is reloaded."""
    import lq.ops.hardware as hw

    torch.manual_seed(13)
    x = torch.randn(64, 32)
    fq = _calibrated(nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48),
                                   nn.ReLU(), nn.Linear(48, 5)), x)
    fused = convert(copy.deepcopy(fq))
    generic = convert(copy.deepcopy(fq))
    monkeypatch.setattr(generic, "_lean_program", lambda: None)
    # one hand-over where fbgemm's quantization is eq. 7 ("clipped") and one where it is not ("grid"): nudge
    # the two consumers' scales (same model on both sides) until each gives its form
    for i, clipped in ((2, True), (4, False), (6, True)):
        s0 = fused[i].input_scale.item()
        for j in range(1000):
            s = torch.tensor(s0 * (1 + 1e-4 * j))
            if (kernels.fbgemm_grid_cap(float(1.0 / s), s, 127) is not None) == clipped:
                break
        for model in (fused, generic):
            model[i].input_scale.copy_(s)
            model[i]._cache.clear()
    with torch.no_grad():
        for xb in (x, x[:1], 3 * torch.randn(7, 32)):
            with hw.record_kernels() as ran:
                y = fused(xb)
            # a few rows: the whole program in one call of gemv.c where it is built (same numbers)
            native = len(xb) <= gemv.MAX_ROWS and gemv.fbgemm_formula() is not None
            assert ran == ["Int8Linear:gemv" if native else "Int8Linear:fbgemm"] * 4
            torch.testing.assert_close(y, generic(xb), rtol=0, atol=0)
        if kernels.fbgemm_mode() == kernels.FULL_RANGE:
            forms = [key[1] for _, key, _, _ in fused._lean[1] if key[0] == "lean_step"]
            assert forms == ["float", "clipped", "grid", "clipped"]  # the form each layer is handed
        else:  # half range: a float input needs the sign test of run (no bound fbgemm steps; gemv.c may run)
            assert [b for _, key, _, b in fused._lean[1] if key[0] == "lean_step"] == [None]
        assert generic._lean is None
        # a consumer's input scale reloaded after the program was made: the program is made again
        before = fused(x)
        state = fused.state_dict()
        state["2.input_scale"] = state["2.input_scale"] * 1.5
        fused.load_state_dict(state)
        generic.load_state_dict(state)
        torch.testing.assert_close(fused(x), generic(x), rtol=0, atol=0)
        assert not torch.equal(fused(x), before)  # the reload changed the model


def _ties(inv: float, n: int = 64) -> torch.Tensor:
    """Rows of inputs ``x`` with ``x * inv`` at every half-integer in [-130, 130], just above and just below
    it (one fp32 ulp of ``x``), and far outside the clip."""
    half = (torch.arange(-260, 261, dtype=torch.float32) + 0.5) / inv
    vals = torch.cat([half, torch.nextafter(half, torch.tensor(math.inf)), torch.nextafter(half, torch.tensor(-math.inf)),
                      torch.tensor([0.0, -0.0, 1e30, -1e30])])
    vals = vals[torch.randperm(vals.numel())]
    return vals[: (vals.numel() // n) * n].reshape(-1, n)


@_FBGEMM
@pytest.mark.parametrize("exact", [True, False], ids=["reciprocal-exact", "reciprocal-inexact"])
def test_lean_program_quantizes_a_float_input_as_eq7_at_every_tie(exact: bool, monkeypatch) -> None:
    """The batch-1 program's first layer quantizes a float input with torch's fake quantization and lets fbgemm
    read the integers back (kernels.fake_quant_step) where the step allows it, else (and for inputs of
    ``kernels.NATIVE_GRID`` floats or more) as ``run`` does: equal to ``run`` and to eq. 7 (float64) for inputs at,
    above and below every rounding tie and beyond the clip."""
    torch.manual_seed(17)
    x = torch.randn(64, 64)
    fq = _calibrated(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5)), x)
    fused = convert(copy.deepcopy(fq))
    generic = convert(copy.deepcopy(fq))
    monkeypatch.setattr(generic, "_lean_program", lambda: None)
    s = fused[0].input_scale.clone()
    while (kernels.fake_quant_step(float(1.0 / s), s) is not None) != exact:  # the scale's neighbours
        s = torch.nextafter(s, torch.tensor(math.inf))
    for m in (fused, generic):
        m[0].input_scale.copy_(s)
        m[0]._cache.clear()
    with torch.no_grad():
        xs = _ties(float(s))
        big = xs.repeat(-(-kernels.NATIVE_GRID // xs.numel()), 1)  # quantized to the grid, not fake-quantized
        for xb in (xs, xs[:1], big):
            torch.testing.assert_close(fused(xb), generic(xb), rtol=0, atol=0)
        if kernels.fbgemm_mode() == kernels.FULL_RANGE:
            assert fused._lean[0] is not None  # the program ran
        if exact:  # the premise: torch's fake quantization with that step is eq. 7's integers times the step
            step = torch.tensor(kernels.fake_quant_step(float(1.0 / s), s))
            n = (xs * s).round().clamp(-127, 127)  # eq. 7 (fp32 product, ties to even)
            assert (xs * s - (xs * s).floor() == 0.5).sum() > 100  # real ties among the inputs
            assert torch.equal(torch.fake_quantize_per_tensor_affine(xs, float(step), 0, -127, 127), n * step)


@_FBGEMM
def test_lean_program_raises_for_nan_inf_and_overflowing_inputs() -> None:
    """NaN, Inf and a finite input whose ``x * s`` overflows fp32: the same error as ``run``, naming the layer."""
    torch.manual_seed(18)
    x = torch.randn(16, 8)
    fused, plain = _both(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), x)
    for m in (fused, plain):
        m[0].input_scale.fill_(8.0)
        m[0]._cache.clear()
    with torch.no_grad():
        fused(x[:1])
        for bad, what in ((float("nan"), "NaN"), (float("inf"), "Inf"), (-float("inf"), "Inf"), (3e38, "Inf")):
            for xb in (x[:1].clone(), x.repeat(kernels.NATIVE_GRID // x.numel() + 1, 1)):  # (the large: C's grid)
                xb[-1, 3] = bad
                for m in (fused, plain):
                    with pytest.raises(FloatingPointError, match=f"0: {what}"):
                        m(xb)
        torch.testing.assert_close(fused(x[:1]), plain(x[:1]), rtol=0, atol=0)  # and runs on afterwards


@_FBGEMM
def test_lean_program_notices_every_edit_after_it_ran() -> None:
    """The batch-1 program's guard (chain._Guard): hooks (module and global), train mode, replaced children,
    replaced or reloaded scales, a registered SmoothQuant divisor and a changed class each make the next call
    equal the unfused model's again."""
    torch.manual_seed(19)
    x = torch.randn(32, 16)
    fused, plain = _both(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), x)
    x1 = x[:1]

    def same() -> None:
        with torch.no_grad():
            for _ in range(2):  # the call that takes a new guard and the one that uses it
                torch.testing.assert_close(fused(x1), plain(x1), rtol=0, atol=0)

    same()
    assert fused._guard is not None and fused._guard.holds()
    seen = []
    handle = fused[1].register_forward_hook(lambda mod, inp, out: seen.append(out))
    same()
    assert len(seen) == 2 and seen[0].is_floating_point()
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda mod, inp: seen.append(mod))
    try:
        same()
        assert len(seen) > 4
    finally:
        handle.remove()
    same()
    fused[3].train()
    plain[3].train()
    same()
    fused[3].eval()
    plain[3].eval()
    for m in (fused, plain):
        m.register_buffer("unused", torch.zeros(1))  # not read by the plan: the guard still holds after
    same()
    for m in (fused, plain):  # a scale buffer replaced (not copied into)
        m[2].register_buffer("input_scale", m[2].input_scale * 1.25)
    same()
    state = plain.state_dict()
    state["4.input_scale"] = state["4.input_scale"] * 0.8
    for m in (fused, plain):
        m.load_state_dict(state)
    same()
    for m in (fused, plain):
        m[2].register_buffer("input_smoothing", torch.linspace(0.5, 2, 16))
    same()
    for m in (fused, plain):
        m[1] = nn.LeakyReLU(0.25)
    same()
    for m in (fused, plain):
        m[3].__class__ = nn.Identity
    same()


# ---------------------------------------------- edits behind the batch-1 program's back
def _used_mlp() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(19)
    x = torch.randn(32, 16)
    fused, plain = _both(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), x)
    return fused, plain, x[:1]


@_FBGEMM
@torch.no_grad()
def test_guard_sees_a_replaced_kernel_cache_dict() -> None:
    """(A review found these five edits ran stale numbers on the batch-1 program or the per-layer path.)"""
    fused, plain, x1 = _used_mlp()
    fused(x1), fused(x1)  # the second call runs on the guard
    for m in (fused, plain):
        m[2].input_scale.mul_(0.5)  # in place (not seen by design) ...
        m[2]._cache = {}            # ... then the cache dropped: the old checks rebuilt here
    assert torch.equal(fused(x1), plain(x1))


@_FBGEMM
@torch.no_grad()
def test_guard_sees_a_replaced_modules_dict() -> None:
    fused, plain, x1 = _used_mlp()
    fused(x1), fused(x1)
    for m in (fused, plain):
        mods = OrderedDict(m._modules)
        mods["1"] = nn.LeakyReLU(0.25)
        m._modules = mods
    assert torch.equal(fused(x1), plain(x1))


@_FBGEMM
@torch.no_grad()
def test_second_chain_over_shared_layers_rebinds_after_a_scale_change() -> None:
    fused, plain, x1 = _used_mlp()
    other = Int8Sequential(*fused).eval()
    fused(x1), other(x1), other(x1)
    for m in (fused, plain):
        m[0].input_scale = m[0].input_scale * 0.5  # clears layer 0's cache (new __setattr__)
    fused(x1)  # chain A re-fills layer 0's ("lean_step", ...) key with a new closure
    assert torch.equal(other(x1), plain(x1))  # chain B: key present -> its old closure


@_FBGEMM
@torch.no_grad()
def test_deleting_a_smoothing_divisor_clears_the_cache() -> None:
    fused, plain, x1 = _used_mlp()
    for m in (fused, plain):
        m[0].register_buffer("input_smoothing", torch.linspace(0.5, 2, 16))
    fused(x1), fused(x1)
    for m in (fused, plain):
        del m[0].input_smoothing
    fused(x1)  # re-plan: the plain forward this once
    assert torch.equal(fused(x1), plain(x1))


@_FBGEMM
@torch.no_grad()
def test_directly_replaced_input_scale_of_the_first_layer() -> None:
    fused, plain, x1 = _used_mlp()
    ref = copy.deepcopy(plain)
    fused(x1), fused(x1)
    new = fused[0].input_scale * 0.5
    fused[0]._buffers["input_scale"] = new  # _grid_output handles this for consumers; not for the first layer
    ref[0].input_scale = new.clone()
    assert torch.equal(fused(x1), ref(x1))


@pytest.mark.parametrize("backend", ["auto", "onednn", "reference"])
def test_smoothed_linears_take_the_previous_linears_hand_over(backend: str, monkeypatch) -> None:
    """A Linear smoothed by lq.smooth_quant quantizes ``x / s``: the Linear before it divides its activated
    output by ``s`` and hands over those integers (kernels.Output.divisor), bit for bit what the unfused
    model computes; the batch-1 program (fbgemm) does the same."""
    import lq.ops.hardware as hw

    torch.manual_seed(15)
    gain = torch.ones(32)
    gain[[3, 17]] = 40.0
    x = torch.randn(64, 32) * gain
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 6)).eval()
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
    lq.smooth_quant(model, [x], num_samples=None, alphas=[0.5], min_gain=1.0)  # every Linear that gains
    lq.calibrate(model, [x], num_samples=None, method="max")
    fused = convert(copy.deepcopy(model), backend=backend)
    plain = convert(copy.deepcopy(model), backend=backend, fuse=False)
    assert all("input_smoothing" in fused[i]._buffers for i in (0, 2, 4))
    assert [s.feeds for s in fused.fused_steps if s.kind == "layer"] == [fused[2], fused[4], None]
    generic = convert(copy.deepcopy(model), backend=backend)
    monkeypatch.setattr(generic, "_lean_program", lambda: None)
    with torch.no_grad():
        for xb in (x, x[:1]):
            with hw.record_kernels() as ran:
                y = fused(xb)
            torch.testing.assert_close(y, plain(xb), rtol=0, atol=0)
            torch.testing.assert_close(y, generic(xb), rtol=0, atol=0)
            assert len(ran) == 3
        assert (fused(x) - model(x)).abs().max().item() <= _bound(model)
        if backend == "auto" and kernels.fbgemm_mode() == kernels.FULL_RANGE:
            assert fused._lean is not None and fused._lean[0] is not None  # the program ran


@pytest.mark.parametrize("backend", ["auto", "onednn"])
def test_a_divisor_registered_after_a_fused_call_is_honoured(backend: str) -> None:
    """A SmoothQuant divisor registered (or replaced) on a consumer after the chain ran: the hand-over is
    made again (a review found the cached hand-over kept handing over undivided integers)."""
    torch.manual_seed(16)
    x = torch.randn(64, 32)
    fq = _calibrated(nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 5)), x)
    fused = convert(copy.deepcopy(fq), backend=backend)
    plain = convert(copy.deepcopy(fq), backend=backend, fuse=False)
    with torch.no_grad():
        for xb in (x, x[:1]):
            fused(xb)
        for divisor in (torch.linspace(0.25, 4, 48), torch.linspace(4, 0.25, 48)):
            for m in (fused, plain):
                m[2].register_buffer("input_smoothing", divisor.clone())
            for xb in (x, x[:1]):
                torch.testing.assert_close(fused(xb), plain(xb), rtol=0, atol=0)


@pytest.mark.parametrize("size", [100, kernels.NATIVE_GRID + 5], ids=["torch ops", "native grid"])
def test_quantize_to_grid_is_eq7_and_names_nan_and_inf_on_both_paths(size: int) -> None:
    """``kernels.quantize_to_grid`` below and above ``NATIVE_GRID`` floats (torch ops / ``quant.c``): eq. 7 in fp32
    (ties to even, both clips), and the same error for NaN, Inf and an overflowing ``x * s``, also when asked to
    write in place (the input a caller passes is never the only record of the error)."""
    torch.manual_seed(5)
    s = torch.tensor(9.5)
    x = torch.randn(size) * 20
    x[::3] = (torch.arange(x[::3].numel()) % 41 - 20 + 0.5) / s
    for relu in (False, True):
        ref = (x * s).round().clamp(0 if relu else -127, 127)
        assert torch.equal(kernels.quantize_to_grid(x, s, 127, relu=relu), ref)
        y = x.clone()
        assert torch.equal(kernels.quantize_to_grid(y, s, 127, relu=relu, out=y), ref)
    for bad, what in ((float("nan"), "NaN"), (float("inf"), "Inf"), (-3e38, "Inf")):
        for inplace in (False, True):
            y = x.clone()
            y[-2] = bad
            before = y.clone()
            with pytest.raises(FloatingPointError, match=what):
                kernels.quantize_to_grid(y, s, 127, out=y if inplace else None)
            assert torch.equal(y.nan_to_num(), before.nan_to_num())  # left as it was
    assert torch.equal(kernels.quantize_to_grid(x, 9.5, 127), (x * s).round().clamp(-127, 127))  # a float scale
    assert kernels.quantize_to_grid(x, s.reshape(1, 1), 127).shape == (1, size)  # broadcasts as the torch ops
