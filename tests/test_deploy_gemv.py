"""lq.deploy.gemv: the batch-1 int8 Linear chain kernel (lq/deploy/gemv.c).

Checked on every instruction set this CPU has (VNNI, AVX2 and plain C run on an AVX-512 VNNI host; an AVX2 host
runs the last two): the integer sums against int64 math, eq. 7 on a float input against float64 at every
rounding tie, the output stage and hand-overs against fbgemm (whose numbers the per-layer path gives) and
against eq. 10 / eq. 7 in float64, odd sizes (padding), several rows, one and two threads; a build that fails
leaves the chains on fbgemm with the same numbers and one warning.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lq
from lq.deploy import convert, gemv, kernels

pytestmark = pytest.mark.skipif(gemv.library() is None, reason="no C compiler: the chains run fbgemm's program")

CFG = lq.QuantConfig(activation=lq.QuantSpec(calibrator="max"), smoothquant=False)


def _layer(g: torch.Generator, n: int, k: int, bias: bool = True) -> tuple:
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    mult = torch.rand(n, generator=g) * 1e-3 + 1e-5
    b = torch.randn(n, generator=g) if bias else None
    return w, mult, b


def _eq10(q: torch.Tensor, w: torch.Tensor, mult: torch.Tensor, b: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """Eq. 10 with fbgemm's rounding on this CPU, from int64 sums: one fp32 rounding of ``acc * mult + b``
    (float64 holds the product of a 24-bit sum and a 24-bit factor exactly) or two."""
    acc = (q.long() @ w.long().t()).double()
    m = mult.double()
    if b is None:
        y = (acc * m).float()
    elif gemv.fbgemm_formula():
        y = (acc * m + b.double()).float()  # exact product, one rounding of the sum (exact in float64 here)
    else:
        y = (acc * m).float() + b
    return y.clamp(min=0) if relu else y


@pytest.mark.parametrize("isa", gemv.isas(), ids=lambda i: gemv.ISA_NAMES[i])
@pytest.mark.parametrize("n,k,rows", [(1, 1, 1), (5, 3, 2), (67, 130, 3), (256, 512, 1), (33, 64, 9)])
def test_integer_sums_are_exact_on_every_instruction_set(isa: int, n: int, k: int, rows: int) -> None:
    """With step 1 and no bias the output is the int32 sum itself (|sum| < 2**24, exact in fp32): equal to
    int64 math for the extreme operands (+-127 weights, inputs at +-127) and random ones."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w[0] = 127 if n > 1 else -127
    x = torch.randint(-127, 128, (rows, k), generator=g).float()
    x[0] = -127
    chain = gemv.Chain(1.0, 127, [(w, torch.ones(n), None, False, None)], fma=True, isa=isa)
    assert torch.equal(chain(x), (x.long() @ w.long().t()).float())


def _ties(inv: float) -> torch.Tensor:
    """Inputs whose ``x * inv`` is at every half-integer in [-130, 130], one fp32 ulp above and below, and far
    outside the clip."""
    half = (torch.arange(-260, 261, dtype=torch.float32) + 0.5) / inv
    return torch.cat([half, torch.nextafter(half, torch.tensor(math.inf)), torch.nextafter(half, torch.tensor(-math.inf)),
                      torch.tensor([0.0, -0.0, 1e30, -1e30, 3e-39])])


@pytest.mark.parametrize("isa", gemv.isas(), ids=lambda i: gemv.ISA_NAMES[i])
def test_float_input_is_quantized_as_eq7_at_every_tie(isa: int) -> None:
    """Eq. 7 on the float input: ``clip(round(x * s), -q, q)`` with the fp32 product, ties to even; read back
    through an identity weight."""
    s = torch.tensor(1 / 0.0371, dtype=torch.float32)
    x = _ties(float(s))
    k = x.numel()
    eye = torch.eye(k, dtype=torch.int8)
    for q in (127, 7):
        chain = gemv.Chain(float(s), q, [(eye, torch.ones(k), None, False, None)], fma=True, isa=isa)
        want = (x * s).round().clamp(-q, q)  # fp32 product, round half to even
        assert ((x * s) - (x * s).floor() == 0.5).sum() > 200  # real ties among the inputs
        assert torch.equal(chain(x[None])[0], want)


@pytest.mark.parametrize("isa", gemv.isas(), ids=lambda i: gemv.ISA_NAMES[i])
@pytest.mark.parametrize("bias", [True, False])
def test_chain_equals_fbgemm_and_eq10_with_hand_overs(isa: int, bias: bool) -> None:
    """Two layers, hand-over on the second one's grid (clip at q, values far above it included), float output
    with and without ReLU: equal to fbgemm's op layer by layer and to float64 eq. 10 / eq. 7."""
    g = torch.Generator().manual_seed(3)
    w1, m1, b1 = _layer(g, 70, 100, bias)
    w2, m2, b2 = _layer(g, 9, 70, bias)
    s_in, s_mid = 2.5, float(torch.tensor(40.0))
    x = torch.randn(5, 100, generator=g) * 20
    for relu_last in (False, True):
        chain = gemv.Chain(s_in, 127, [(w1, m1, b1, True, (s_mid, 127)), (w2, m2, b2, relu_last, None)],
                           fma=gemv.fbgemm_formula(), isa=isa)
        q1 = (x * torch.tensor(s_in)).round().clamp(-127, 127)
        h = _eq10(q1, w1, m1, b1, relu=True)
        q2 = (h * torch.tensor(s_mid)).round().clamp(0, 127)
        assert (h * s_mid > 127.5).any() and (q2 > 0).float().mean() > 0.2  # the clip and real values are hit
        want = _eq10(q2, w2, m2, b2, relu_last)
        got = chain(x)
        assert torch.equal(got, want)
        # and fbgemm itself, the kernel of the per-layer path, on the same integers
        ref1 = kernels.fbgemm_op(True)(q1, 1.0, 128, kernels.fbgemm_prepack(w1, m1, b1)) \
            if kernels.fbgemm_mode() == kernels.FULL_RANGE else None
        if ref1 is not None:
            assert torch.equal(ref1, h)
            ref2 = kernels.fbgemm_op(relu_last)(q2, 1.0, 0, kernels.fbgemm_prepack(w2, m2, b2))
            assert torch.equal(ref2, got)


def test_non_finite_input_or_product_returns_none() -> None:
    g = torch.Generator().manual_seed(4)
    w, m, b = _layer(g, 8, 16)
    chain = gemv.Chain(8.0, 127, [(w, m, b, False, None)], fma=True)
    x = torch.randn(2, 16, generator=g)
    assert chain(x) is not None
    for bad in (float("nan"), float("inf"), -float("inf"), 3e38):  # 3e38 * 8 overflows fp32: eq. 7 cannot hold it
        xb = x.clone()
        xb[1, 5] = bad
        assert chain(xb) is None


def _mlp() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(96, 130), nn.ReLU(), nn.Linear(130, 67), nn.ReLU(), nn.Linear(67, 10)).eval()
    x = torch.randn(128, 96)
    lq.quantize(model, CFG)
    lq.calibrate(model, [x], num_samples=None, method="max")
    return model, convert(copy.deepcopy(model), fuse=False), x


@pytest.mark.skipif(gemv.fbgemm_formula() is None, reason="fbgemm missing, or its output stage not gemv.c's")
def test_converted_mlp_runs_the_kernel_for_few_rows_with_the_per_layer_numbers() -> None:
    """A converted MLP: up to MAX_ROWS rows run gemv.c (1 and 2 threads), more rows fbgemm's program; both give
    the per-layer path's numbers bit for bit, and stay within one output step of the fake-quant model."""
    import lq.ops.hardware as hw

    fq, plain, x = _mlp()
    fused = convert(copy.deepcopy(fq))
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            for t in (1, 2):
                torch.set_num_threads(t)
                for rows in (1, 3, gemv.MAX_ROWS, gemv.MAX_ROWS + 1):
                    xb = x[:rows] * 1.7  # beyond the calibrated range too: clips on every layer
                    with hw.record_kernels() as ran:
                        y = fused(xb)
                    kind = "gemv" if rows <= gemv.MAX_ROWS else "fbgemm"
                    assert ran == [f"Int8Linear:{kind}"] * 3
                    assert torch.equal(y, plain(xb))
                    step = list(lq.quantized_layers(fq).values())[-1]
                    bound = step.input_quantizer.amax.item() / 127 * step.weight.detach().abs().max().item()
                    assert (y - fq(xb)).abs().max() <= bound * 1.01
    finally:
        torch.set_num_threads(threads)


def test_a_failed_build_warns_and_leaves_the_chain_on_fbgemm(monkeypatch, tmp_path) -> None:
    fq, plain, x = _mlp()
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("LQ_CACHE_DIR", str(tmp_path))
    gemv.library.cache_clear()
    gemv.fbgemm_formula.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built"):
            assert gemv.library() is None
        fused = convert(copy.deepcopy(fq))
        with torch.no_grad():
            assert torch.equal(fused(x[:1]), plain(x[:1]))
    finally:
        monkeypatch.undo()
        gemv.library.cache_clear()
        gemv.fbgemm_formula.cache_clear()
    assert gemv.library() is not None  # (the real build again, for the tests after this one)


@pytest.mark.skipif(gemv.fbgemm_formula() is None, reason="fbgemm missing, or its output stage not gemv.c's")
def test_half_range_hosts_run_the_kernel_where_fbgemm_needs_a_sign_test(monkeypatch) -> None:
    """On an AVX2 host (fbgemm in half range) a signed float input costs the per-layer path two GEMMs and the
    bound fbgemm steps do not apply; the kernel's sums are exact either way, so the chain runs it there too
    with the per-layer numbers (fbgemm's half-range path, run on this CPU)."""
    import lq.ops.hardware as hw

    monkeypatch.setattr(kernels, "fbgemm_mode", lambda: kernels.HALF_RANGE)
    fq, _, x = _mlp()
    fused, plain = convert(copy.deepcopy(fq)), convert(copy.deepcopy(fq), fuse=False)
    with torch.no_grad():
        for rows in (1, 5, gemv.MAX_ROWS + 3):
            xb = x[:rows]
            assert (xb < 0).any()  # signed: the sign test's two GEMMs on the per-layer path
            with hw.record_kernels() as ran:
                y = fused(xb)
            assert ran == ["Int8Linear:gemv" if rows <= gemv.MAX_ROWS else "Int8Linear:fbgemm"] * 3
            assert torch.equal(y, plain(xb))
    assert [b for _, key, _, b in fused._lean[1] if key[0] == "lean_step"] == [None]


@pytest.mark.skipif(gemv.fbgemm_formula() is None, reason="fbgemm missing, or its output stage not gemv.c's")
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smoothquant"])
def test_single_layer_few_rows_equal_fbgemm(monkeypatch, smooth: bool) -> None:
    """A converted Linear on its own (per-layer path) with a few rows runs the kernel: the same numbers as
    fbgemm's per-layer path (forced with MAX_ROWS = 0), 2-D and 3-D inputs, a SmoothQuant divisor included;
    NaN still raises naming the layer."""
    import lq.ops.hardware as hw

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 7)).eval()
    x = torch.randn(64, 40)
    x[:, 3] *= 30  # an outlier channel
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max"), smoothquant=False))
    if smooth:
        lq.smooth_quant(model, [x], num_samples=None, alphas=[0.5])
    lq.calibrate(model, [x], num_samples=None, method="max")
    conv = convert(copy.deepcopy(model), fuse=False)
    assert ("input_smoothing" in conv[0]._buffers) == smooth
    with torch.no_grad():
        for xb in (x[:1], x[:5], x[:16].reshape(2, 8, 40)):
            with hw.record_kernels() as ran:
                y = conv(xb)
            assert ran == ["Int8Linear:gemv"] * 2
            monkeypatch.setattr(gemv, "MAX_ROWS", 0)
            with hw.record_kernels() as ran:
                want = conv(xb)
            monkeypatch.undo()
            assert ran == ["Int8Linear:fbgemm"] * 2
            assert y.shape == want.shape and torch.equal(y, want)
        bad = x[:2].clone()
        bad[1, 3] = float("nan")
        with pytest.raises(FloatingPointError, match="0: NaN"):
            conv(bad)


@pytest.mark.skipif(gemv.fbgemm_formula() is None, reason="fbgemm missing, or its output stage not gemv.c's")
def test_a_float64_default_dtype_changes_nothing() -> None:
    """The kernel writes fp32: its output is allocated as fp32 whatever torch's default dtype (review: a
    float64 default had it write fp32 bits into a float64 tensor)."""
    fq, plain, x = _mlp()
    fused = convert(copy.deepcopy(fq))
    previous = torch.get_default_dtype()
    with torch.no_grad():
        want = plain(x[:2])
        torch.set_default_dtype(torch.float64)
        try:
            got, single = fused(x[:2]), plain(x[:2])
        finally:
            torch.set_default_dtype(previous)
    assert got.dtype == single.dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(single, want)


@pytest.mark.parametrize("n1,k2", [(130, 64), (64, 130)])
def test_layers_that_do_not_connect_raise_as_the_per_layer_path_does(n1: int, k2: int) -> None:
    """An Int8Sequential whose Linear sizes do not connect: the per-layer path's shape error, never a read
    or write past the kernel's buffers (review: 130 -> 64 crashed the process, 64 -> 130 returned numbers)."""
    from lq.deploy import Int8Linear
    from lq.deploy.chain import Int8Sequential

    torch.manual_seed(0)
    a, b = Int8Linear(96, n1), Int8Linear(k2, 10)
    for layer in (a, b):
        layer.weight.copy_(torch.randint(-127, 128, layer.weight.shape, dtype=torch.int8))
        layer.input_scale.fill_(20.0)
        layer.weight_scale.fill_(100.0)
    seq = Int8Sequential(a, nn.ReLU(), b).eval()
    with torch.no_grad(), pytest.raises(RuntimeError):
        seq(torch.randn(1, 96))
    with pytest.raises(ValueError, match="feeds one of"):
        gemv.Chain(1.0, 127, [(a.weight, torch.ones(n1), None, True, (1.0, 127)), (b.weight, torch.ones(10), None,
                                                                                   False, None)], fma=True)


@pytest.mark.skipif(gemv.fbgemm_formula() is None, reason="fbgemm missing, or its output stage not gemv.c's")
def test_jit_trace_records_the_torch_ops_not_the_c_call() -> None:
    """torch.jit.trace cannot see a ctypes call (it would record an empty output): traced, the chain and the
    single layer run their torch ops, and the trace computes the per-layer numbers for other inputs."""
    import warnings

    fq, plain, x = _mlp()
    fused = convert(copy.deepcopy(fq))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (fused, plain):
            traced = torch.jit.trace(model, x[:1], check_trace=False)
            assert torch.equal(traced(x[5:6]), plain(x[5:6]))


# ------------------------------------------------------------------------------------------ Conv2d chains
def _conv_ref(x: torch.Tensor, s_in: float, ops: list, mode: int) -> torch.Tensor:
    """Eq. 7, then per op eq. 10 (from float64 sums, with the rounding ``mode`` of gemv.MODES), ReLU, the next
    eq. 7, or max pooling of the integers: the chain in float64 / fp32 torch ops."""
    import torch.nn.functional as F

    h = (x * torch.tensor(s_in)).round().clamp(-127, 127)
    for op in ops:
        if op[0] == "pool":
            k, st, p, d, ceil = op[1:]
            h = F.max_pool2d(h, k, st, p, d, ceil)
            continue
        w, mult, b, relu, nxt, st, p, d, sx, sw = op[1:11]
        acc = F.conv2d(h.double(), w.double(), None, st, p, d).float()
        m, bias = mult.view(1, -1, 1, 1), None if b is None else b.view(1, -1, 1, 1)
        if mode == 2:
            y = (acc * torch.tensor(sx)) * sw.view(1, -1, 1, 1)
            y = y if bias is None else y + bias
        elif bias is None:
            y = acc * m
        elif mode == 1:
            y = (acc.double() * m.double() + bias.double()).float()
        else:
            y = acc * m + bias
        y = y.clamp(min=0) if relu else y
        h = y if nxt is None else (y * torch.tensor(nxt[0])).round().clamp(0, nxt[1])
    return h


def _conv_op(g: torch.Generator, cout: int, cin: int, kh: int, kw: int, relu: bool, nxt, st, p, d,
             bias: bool = True) -> tuple:
    w = torch.randint(-127, 128, (cout, cin, kh, kw), generator=g, dtype=torch.int8)
    sx, sw = torch.tensor(0.0371), torch.rand(cout, generator=g) * 5e-2 + 3e-3
    b = torch.randn(cout, generator=g) if bias else None
    return ("conv", w, sx * sw, b, relu, nxt, st, p, d, float(sx), sw, 1.0)


@pytest.mark.parametrize("isa", gemv.isas(), ids=lambda i: gemv.ISA_NAMES[i])
@pytest.mark.parametrize("mode", gemv.MODES)
def test_conv_chain_equals_eq7_eq10_on_every_instruction_set(isa: int, mode: int) -> None:
    """Odd channel counts (not multiples of 4 or 16), 1x1 / 3x3 / 5x1 kernels, strides, padding, dilation,
    pooling with padding and ceil mode, 1-3 images in NCHW, channels-last and a strided view: equal to eq. 7 /
    eq. 10 with each rounding mode, the clip at q reached."""
    g = torch.Generator().manual_seed(8)
    ops = [
        _conv_op(g, 17, 3, 3, 3, True, (25.0, 127), (1, 1), (1, 1), (1, 1)),
        ("pool", (3, 3), (2, 2), (1, 1), (1, 1), True),
        _conv_op(g, 33, 17, 5, 1, True, (7.0, 63), (2, 1), (2, 0), (1, 2), bias=False),
        ("pool", (2, 2), (1, 1), (0, 0), (1, 1), False),
        _conv_op(g, 6, 33, 1, 1, False, None, (1, 1), (0, 0), (1, 1)),
    ]
    chain = gemv.ConvChain(3.0, 127, ops, mode=mode, isa=isa)
    for n, (hh, ww) in ((1, (13, 11)), (3, (9, 16))):
        x = torch.randn(n, 3, hh, ww, generator=g) * 30
        want = _conv_ref(x, 3.0, ops, mode)
        for xb in (x, x.contiguous(memory_format=torch.channels_last)):
            y = chain(xb)
            assert y.shape == want.shape and torch.equal(y, want)
        wide = torch.randn(n, 3, hh, 2 * ww, generator=g)[..., ::2] * 30  # a strided view
        assert torch.equal(chain(wide), _conv_ref(wide, 3.0, ops, mode))
    mid = _conv_ref(x, 3.0, ops[:1], mode)
    assert (mid == 127).any() and (mid > 0).float().mean() > 0.2  # the clip and real values


def test_conv_chain_refuses_layers_that_do_not_chain() -> None:
    """A convolution with a float output before another one (review: the chain wrote past its output), channels
    that do not connect, a chain ending in pooling: ValueError, so the Sequential keeps its per-layer path."""
    g = torch.Generator().manual_seed(10)
    a = _conv_op(g, 8, 3, 3, 3, False, None, (1, 1), (0, 0), (1, 1))
    b = _conv_op(g, 4, 8, 3, 3, True, None, (1, 1), (0, 0), (1, 1))
    c = _conv_op(g, 4, 5, 3, 3, True, None, (1, 1), (0, 0), (1, 1))
    pool = ("pool", (2, 2), (2, 2), (0, 0), (1, 1), False)
    handing = a[:5] + ((5.0, 127),) + a[6:]
    for ops in ([a, b], [handing, c], [handing, b, pool]):
        with pytest.raises(ValueError):
            gemv.ConvChain(1.0, 127, ops)


def _cnn_model() -> nn.Module:
    torch.manual_seed(9)

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    m = nn.Sequential(*block(1, 8), nn.MaxPool2d(2), *block(8, 20), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
                      nn.Dropout(0.1), *block(20, 16)).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def _converted_pair(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    lq.quantize(model, CFG)
    lq.calibrate(model, [x], num_samples=None, method="max")
    return convert(copy.deepcopy(model)), convert(copy.deepcopy(model), fuse=False)


# the conv chain runs on full-range (VNNI) hosts: on half range the per-layer path's sign split changes oneDNN's kernel
_ONEDNN = pytest.mark.skipif(kernels.onednn_mode() != kernels.FULL_RANGE, reason="needs oneDNN in full range (VNNI)")


@_ONEDNN
def test_converted_cnn_runs_the_conv_chain_for_small_inputs_with_the_per_layer_numbers(monkeypatch) -> None:
    """A converted Sequential CNN: a few small images run gemv.c (both layouts, 1 and 2 threads), a big batch
    oneDNN; the per-layer path's numbers bit for bit; NaN raises naming the layer; a pooling or a convolution
    edited after the chain ran is seen (review: a conv's padding edit was not)."""
    import lq.ops.hardware as hw

    x = torch.randn(32, 1, 20, 20)
    fused, plain = _converted_pair(_cnn_model(), x)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            for t in (1, 2):
                torch.set_num_threads(t)
                for n in (1, 3):
                    for xb in (x[:n] * 1.5, (x[:n] * 1.5).contiguous(memory_format=torch.channels_last)):
                        with hw.record_kernels() as ran:
                            y = fused(xb)
                        assert ran == ["Int8Conv2d:gemv"] * 3
                        want = plain(xb)
                        assert torch.equal(y, want) and y.is_contiguous(memory_format=torch.channels_last) == \
                            want.is_contiguous(memory_format=torch.channels_last)
            monkeypatch.setattr(gemv, "MAX_MACS", 0)
            with hw.record_kernels() as ran:
                y = fused(x[:2])
            assert ran == ["Int8Conv2d:onednn"] * 3 and torch.equal(y, plain(x[:2]))
            monkeypatch.undo()
            bad = x[:2].clone()
            bad[1, 0, 3, 4] = float("inf")
            with pytest.raises(FloatingPointError, match="0: Inf"):
                fused(bad)
            fused(x[:1])
            for m in (fused, plain):
                m[7].kernel_size = 2  # the second pooling (3x3, stride 2), edited after the chain ran
            assert torch.equal(fused(x[:1]), plain(x[:1]))
            for m in (fused, plain):
                m[4].padding = (0, 0)  # the second convolution
            y = fused(x[:2])
            assert y.shape == plain(x[:2]).shape and torch.equal(y, plain(x[:2]))
    finally:
        torch.set_num_threads(threads)


@_ONEDNN
@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 10, 1)), (3, 10, 10)),  # 1x1 over 6 channels
    (lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 10, 4)), (3, 10, 10)),
    (lambda: nn.Sequential(nn.Conv2d(5, 12, 1, stride=2), nn.ReLU(), nn.Conv2d(12, 7, 3, padding=1)), (5, 9, 9)),
], ids=["1x1_cin6", "one_output_pixel", "1x1_stride2_cin5"])
def test_conv_chain_rounds_as_onednn_does_for_each_shape(make, shape) -> None:
    """oneDNN's float output stage rounds differently for some shapes (1x1 convolutions over a channel count
    that is not a multiple of 4, a single output pixel: two scale multiplies); the chain finds each layer's
    rounding per input size against the layer itself (review: one global formula gave 176 of 640 outputs off)."""
    import lq.ops.hardware as hw

    torch.manual_seed(0)
    x = torch.randn(20, *shape) * 2
    fused, plain = _converted_pair(make().eval(), x)
    with torch.no_grad():
        for n in (1, 4):
            with hw.record_kernels() as ran:
                y = fused(x[:n])
            assert ran == ["Int8Conv2d:gemv"] * 2
            assert torch.equal(y, plain(x[:n]))


@_ONEDNN
def test_conv_chain_of_a_float64_model() -> None:
    """A model converted under a float64 default dtype has float64 scales; oneDNN forms step_x * step_w in
    fp32, and so does the chain (review: 183 of 864 outputs differed)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3)).eval()
        x = torch.randn(8, 3, 12, 12)
    finally:
        torch.set_default_dtype(previous)
    model.float()
    fused, plain = _converted_pair(model, x.float())
    for m in (fused, plain):  # float64 scale buffers, as a float64 default gives them
        for layer in m.modules():
            for name in ("weight_scale", "input_scale"):
                if name in getattr(layer, "_buffers", {}):
                    layer._buffers[name] = layer._buffers[name].double()
    with torch.no_grad():
        assert torch.equal(fused(x[:2].float()), plain(x[:2].float()))


@_ONEDNN
def test_conv_chain_probes_until_one_rounding_is_left() -> None:
    """A conv with one output value per image (cout 1, a 1x1 output): one probe cannot tell two roundings apart;
    the chain probes again until one is left (review: 18 of 64 images differed with a single probe)."""
    import lq.ops.hardware as hw

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x = torch.randn(64, 3, 10, 10)
        fused, plain = _converted_pair(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 1, 8)).eval(), x)
        with torch.no_grad():
            for i in range(64):
                with hw.record_kernels() as ran:
                    y = fused(x[i:i + 1])
                assert ran == ["Int8Conv2d:gemv"] * 2 and torch.equal(y, plain(x[i:i + 1]))
    finally:
        torch.set_num_threads(threads)


@_ONEDNN
def test_conv_chain_rounding_follows_the_thread_count() -> None:
    """oneDNN's rounding of a 1x1 conv over 8 channels at batch 1 depends on the thread count: the chain's
    rounding is found per thread count too (review: 109 of 490 outputs differed after a switch)."""
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(0)
        x = torch.randn(8, 3, 9, 9)
        fused, plain = _converted_pair(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1)).eval(), x)
        with torch.no_grad():
            for t in (2, 1, 2):
                torch.set_num_threads(t)
                assert torch.equal(fused(x[:1]), plain(x[:1]))
    finally:
        torch.set_num_threads(threads)


def test_suspended_recording_is_per_thread() -> None:
    """The probes run the per-layer kernels with recording suspended in their own thread only; another
    thread's record_kernels block records and ends as usual (review: the probe emptied the global list)."""
    import threading

    import lq.ops.hardware as hw

    inside, done, seen = threading.Event(), threading.Event(), []

    def other() -> None:
        with hw.record_kernels() as ran:
            inside.wait(10)
            hw.ran("op", "kernel")
        seen.append(ran)
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with hw.record_kernels() as mine, hw.recording_suspended():
        inside.set()
        done.wait(10)
        hw.ran("probe", "kernel")
    thread.join(10)
    # (recorders are process-wide: each list sees every thread's kernels, but none sees the suspended probe's)
    assert seen == [["op:kernel"]] and mine == ["op:kernel"] and hw._RECORDERS == []
