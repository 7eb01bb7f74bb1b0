"""Randomized differential tests: every fast int8 kernel against its exact reference, on the host that runs
the tests, over the shape classes where kernels are known to go wrong (K = 1, M = 1, N = 1, odd sizes),
non-contiguous and channels-last layouts, and fp16/bf16 inputs (issue 11).

Each test also asserts *which* kernel ran (``lq.ops.hardware.record_kernels``), from the routing rule the
host's measured capabilities imply (``onednn_mode``, ``cpu_int_mm_is_fast``): a differential test whose
"fast" side silently took the reference path would compare the reference with itself and could never fail.
Integer products are compared with unit scales, so "equal" means bit-equal integer sums; scaled outputs
are compared within fp32 rounding.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lq
from lq.ops import Int8ComputeConfig, int8_conv2d, int8_linear
from lq.ops import hardware as hw
from lq.ops import int8_conv_kernels as K
from lq.ops.int8_mm import int8_mm, int8_mm_reference, reduction_chunks
from lq.quant.functional import qmax

from kernel_routing import expected_conv_kernel, expected_mm_kernel

SETTINGS = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
BITS = st.sampled_from([(8, 8), (7, 7), (7, 8), (8, 7)])


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Fallback warnings are part of the contract (one per shape class): record them, never hide them."""
    hw.reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield caught
    hw.reset_warnings()


def _ints(shape, q, gen):
    return torch.randint(-q, q + 1, shape, generator=gen, dtype=torch.int8)


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if how == "strided":  # every other column of a wider buffer
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if how == "transposed":  # column-major storage
        return t.t().contiguous().t()
    return t


# ------------------------------------------------------------------------------------- lq::int8_mm (CPU)
@SETTINGS
@given(
    m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 40), bits=BITS,
    layout=st.sampled_from(["contiguous", "strided", "transposed"]),
    b_layout=st.sampled_from(["contiguous", "strided", "transposed"]), seed=st.integers(0, 2**16),
)
def test_int8_mm_equals_exact_integer_sums(m, k, n, bits, layout, b_layout, seed):
    """Both operands in any layout: int8_linear's backward passes transposed views (read in place)."""
    qa, qb = qmax(bits[0]), qmax(bits[1])
    gen = torch.Generator().manual_seed(seed)
    a, b = _layout(_ints((m, k), qa, gen), layout), _layout(_ints((n, k), qb, gen), b_layout)
    a[0, 0], b[-1, -1] = qa, -qb  # the extremes are where saturating kernels go wrong
    one = torch.ones(1)
    with hw.record_kernels() as ran:
        out = int8_mm(a, b, torch.ones(m), one, qa, qb, None)
    exact = (a.long() @ b.long().t()).float()  # |sum| <= 300 * 127^2 < 2^24: exact in fp32
    assert torch.equal(out, exact), f"M={m} K={k} N={n} bits={bits} {layout}/{b_layout}: kernel {ran}"
    assert ran == [f"int8_mm:{expected_mm_kernel(m, k, n, qa, qb)}"]


@SETTINGS
@given(m=st.integers(1, 20), k=st.integers(1, 64), n=st.integers(1, 20), bits=BITS, seed=st.integers(0, 2**16))
def test_int8_mm_scales_and_bias_match_reference(m, k, n, bits, seed):
    qa, qb = qmax(bits[0]), qmax(bits[1])
    gen = torch.Generator().manual_seed(seed)
    a, b = _ints((m, k), qa, gen), _ints((n, k), qb, gen)
    a_step = torch.rand(m, generator=gen) + 0.01 if seed % 2 else torch.rand(1, generator=gen) + 0.01
    b_step, bias = torch.rand(n, generator=gen) + 0.01, torch.randn(n, generator=gen)
    out = int8_mm(a, b, a_step, b_step, qa, qb, bias)
    ref = int8_mm_reference(a, b, a_step, b_step, qa, qb, bias)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("m,k,n", [(1, 2, 1), (1, 5, 3), (4, 7, 1), (1, 64, 1)])
def test_size_one_operands_with_odd_strides_are_exact(m, k, n):
    """A ``[1, K]`` operand made by transposing a ``[K, 1]`` column has strides ``(1, 1)`` (torch calls it
    contiguous): CPU ``torch._int_mm`` read it as garbage and wrote nothing into ``out=`` (AVX-512 VNNI host;
    ``int8_linear``'s grad-weight GEMM makes it for a batch of one output feature). Run after a different
    product, so a kernel that leaves a reused output buffer alone shows the stale sums."""
    gen = torch.Generator().manual_seed(m * 100 + k * 10 + n)
    a, b = _ints((k, m), 127, gen).t(), _ints((k, n), 127, gen).t()  # [m, k] and [n, k], transposed views
    one = torch.ones(1)
    int8_mm(_ints((m, k), 127, gen), _ints((n, k), 127, gen), torch.ones(m), one, 127, 127, None)
    out = int8_mm(a, b, torch.ones(m), one, 127, 127, None)
    assert torch.equal(out, (a.long() @ b.long().t()).float())


def test_sums_buffer_made_under_inference_mode_serves_training_later():
    """``lq::int8_mm``'s reused int32 buffer, first made inside ``torch.inference_mode`` (Lightning's sanity-check
    validation runs there before the first training step): a later training call writes into it (an inference
    tensor would raise 'Inplace update to inference tensor outside InferenceMode')."""
    from lq.ops import int8_mm as mm_module

    mm_module._workspace.__dict__.clear()  # the next product makes the buffer
    gen = torch.Generator().manual_seed(3)
    a, b = _ints((24, 40), 127, gen), _ints((16, 40), 127, gen)
    one = torch.ones(1)
    with torch.inference_mode():
        int8_mm(a, b, torch.ones(24), one, 127, 127, None)
    out = int8_mm(a, b, torch.ones(24), one, 127, 127, None)
    assert torch.equal(out, (a.long() @ b.long().t()).float())


def test_int_mm_k1_shape_class_is_routed_away_and_exact():
    """``torch._int_mm`` on CPU returns wrong sums for K = 1, N > 1 (measured on the AVX-512 VNNI host)."""
    a, b = torch.full((5, 1), 127, dtype=torch.int8), torch.full((3, 1), -127, dtype=torch.int8)
    with hw.record_kernels() as ran:
        out = int8_mm(a, b, torch.ones(5), torch.ones(1), 127, 127, None)
    assert torch.equal(out, torch.full((5, 3), -127.0 * 127))
    assert ran != ["int8_mm:int_mm"]


@pytest.mark.parametrize("k,chunk", [(10, 3), (133145, 133144), (7, 7), (17, 8), (1000, 64)])
def test_reduction_chunks_cover_k_without_a_single_column_tail(k, chunk):
    parts = reduction_chunks(k, chunk)
    assert parts[0][0] == 0 and parts[-1][1] == k
    assert all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
    assert all(1 <= e - s <= chunk for s, e in parts)
    assert len(parts) == 1 or min(e - s for s, e in parts) >= 2
    for s, e in reduction_chunks(k, chunk, multiple=8)[:-1]:
        assert (e - s) % 8 == 0


# --------------------------------------------------------------------------------- int8 conv2d kernels
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(
    "height,width,kernel,stride,padding",
    [(3, 5, (1, 5), (1, 2), (0, 0)), (3, 3, (1, 3), (1, 2), (0, 0)), (3, 6, (1, 5), (1, 3), (0, 0)),
     (1, 5, (2, 1), (1, 1), (2, 0)), (1, 3, (2, 3), (1, 1), (3, 2)), (2, 5, (3, 1), (1, 1), (3, 1))],
)
def test_onednn_conv_shape_classes_found_wrong_are_exact(groups, height, width, kernel, stride, padding):
    """Shape classes where oneDNN's int8 conv returned wrong values on the AVX-512 VNNI host (found by the
    hypothesis tests below): one output position with stride > 1, and windows lying entirely in the padding.
    The training op and the converted layer both route around them (``lq.ops.hardware.onednn_conv_plan``)."""
    gen = torch.Generator().manual_seed(height * width + sum(kernel))
    x, wt = _ints((2, 2, height, width), 127, gen), _ints((4, 2 // groups, *kernel), 127, gen)
    args = (list(stride), list(padding), [1, 1], groups)
    y = K.int8_conv2d_fwd(x, wt, torch.ones(1), torch.ones(4), 127, 127, None, *args)
    assert torch.equal(y.double(), F.conv2d(x.double(), wt.double(), None, *args))
    width = max(width, kernel[1])  # nn.Conv2d needs the padded input to fit the kernel as well
    conv = nn.Conv2d(2, 4, kernel, stride=stride, padding=padding, groups=groups)
    fast, ref, _ = _converted_pair(nn.Sequential(conv), torch.randn(2, 2, height, width, generator=gen))
    xf = torch.randn(2, 2, height, width, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(fast(xf), ref(xf), rtol=1e-5, atol=1e-5)



@st.composite
def conv_cases(draw):
    kind = draw(st.sampled_from(["dense", "dense", "grouped", "depthwise"]))
    if kind == "dense":
        c, groups = draw(st.integers(1, 6)), 1
    elif kind == "grouped":
        groups = 2
        c = groups * draw(st.integers(1, 3))
    else:
        c = draw(st.integers(1, 6))
        groups = c
    o = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 3, 5]))
    stride = [draw(st.integers(1, 3)), draw(st.integers(1, 2))]
    dilation = [draw(st.integers(1, 2)), 1]
    padding = [draw(st.integers(0, 2)), draw(st.integers(0, 2))]
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 11))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 11))
    n = draw(st.integers(1, 3))
    return n, c, o, h, w, (kh, kw), stride, padding, dilation, groups


@pytest.mark.parametrize("o,c,kernel,padding,stride", [
    (16, 1, (3, 3), (1, 1), (1, 1)), (9, 1, (3, 3), (0, 2), (1, 1)), (5, 7, (3, 3), (1, 1), (1, 1)),
    (12, 2, (2, 3), (1, 0), (1, 1)), (3, 4, (1, 3), (0, 1), (1, 1)), (2, 1, (3, 3), (1, 1), (1, 1)),
    (5, 7, (3, 3), (1, 1), (2, 2)), (20, 2, (3, 3), (1, 1), (2, 2)), (6, 4, (1, 1), (0, 0), (2, 2)),
    (8, 3, (1, 1), (0, 0), (2, 2)), (5, 6, (3, 2), (2, 0), (3, 2)), (4, 5, (2, 2), (0, 1), (2, 1)),
    (3, 4, (2, 2), (0, 0), (4, 3)), (4, 3, (3, 3), (4, 4), (2, 2)), (1, 1, (3, 3), (1, 1), (2, 2)),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grad_weight_taps_both_forms_are_exact(o, c, kernel, padding, stride, channels_last):
    """``_grad_weight_taps``' forms (one GEMM per tap on shifted views of the input's stride phases,
    position-major rows for a channels-last input, channel rows else; or, with ``C * taps <= O``, dot products of the
    rows where the CPU has VNNI, else the taps' shifted input rows stacked into one GEMM), strides 1-3, against float64
    ``conv2d_weight`` on the same integers."""
    if not hw.cpu_int_mm_is_fast():
        pytest.skip("the taps kernel runs where CPU torch._int_mm is fast (VNNI)")
    from lq.ops.int8_conv_kernels import _grad_weight_taps, grad_weight_taps_apply

    gen = torch.Generator().manual_seed(o * 31 + c)
    n, h, w = 3, 7, 6
    kh, kw = kernel
    x = _ints((n, c, h, w), 127, gen)
    ho, wo = ((size + 2 * p - k) // s + 1 for size, p, k, s in zip((h, w), padding, kernel, stride))
    g = _ints((n, o, ho, wo), 127, gen)
    if channels_last:
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    assert grad_weight_taps_apply(x.shape, (o, c, kh, kw), stride, padding, (1, 1), 1, 127, 127)
    g_step, x_step = torch.rand(o, generator=gen) + 0.5, torch.rand(1, generator=gen) + 0.5
    got = _grad_weight_taps(g, x, g_step, x_step, (o, c, kh, kw), padding, stride)
    exact = torch.nn.grad.conv2d_weight(x.double(), [o, c, kh, kw], g.double(), stride, padding)
    assert torch.equal(got, exact.float().mul_(g_step.reshape(-1, 1, 1, 1)).mul_(x_step.reshape(1, -1, 1, 1)))


def test_grad_input_with_dilation_over_padding_is_exact():
    """The input-gradient convolution (stride 1, padding d*(k-1)-p) can itself have windows entirely in the
    padding: a (2, 5) kernel dilated by 2 on a height-1 input (found by the hypothesis test below)."""
    gen = torch.Generator().manual_seed(2)
    x, wt = _ints((2, 3, 1, 5), 127, gen), _ints((3, 3, 2, 5), 127, gen)
    args = ([1, 1], [1, 1], [2, 1], 1)
    g = _ints((2, 3, 1, 3), 127, gen)
    gx = K.int8_conv2d_grad_input(g, wt, torch.ones(1), 127, 127, list(x.shape), *args)
    assert torch.equal(gx.double(), torch.nn.grad.conv2d_input(list(x.shape), wt.double(), g.double(), *args))


@SETTINGS
@given(case=conv_cases(), bits=BITS, channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_conv_kernels_equal_exact_integer_convolutions(case, bits, channels_last, seed):
    n, c, o, h, w, (kh, kw), stride, padding, dilation, groups = case
    qa, qw = qmax(bits[0]), qmax(bits[1])
    gen = torch.Generator().manual_seed(seed)
    x, wt = _ints((n, c, h, w), qa, gen), _ints((o, c // groups, kh, kw), qw, gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    one, ones_o = torch.ones(1), torch.ones(o)
    args = (stride, padding, dilation, groups)

    with hw.record_kernels() as ran:
        y = K.int8_conv2d_fwd(x, wt, one, ones_o, qa, qw, None, *args)
    exact = F.conv2d(x.double(), wt.double(), None, *args)
    assert torch.equal(y.double(), exact), f"forward {case} {bits}: {ran}"
    geometry = (x.shape, wt.shape, *args)
    assert ran == [f"int8_conv2d:{expected_conv_kernel('int8_conv2d', qa, qw, c // groups * kh * kw, geometry)}"]

    g = _ints(tuple(y.shape), qa, gen)  # an output gradient on the activation grid
    if channels_last:
        g = g.contiguous(memory_format=torch.channels_last)
    with hw.record_kernels() as ran:
        gx = K.int8_conv2d_grad_input(g, wt, one, qa, qw, list(x.shape), *args)
    exact_gx = torch.nn.grad.conv2d_input(list(x.shape), wt.double(), g.double(), *args)
    assert torch.equal(gx.double(), exact_gx), f"grad_input {case} {bits}: {ran}"
    op = "int8_conv2d_grad_input"
    assert ran == [f"{op}:{expected_conv_kernel(op, qa, qw, o // groups * kh * kw, geometry)}"]

    with hw.record_kernels() as ran:
        gw = K.int8_conv2d_grad_weight(g, x, ones_o, one, qa, qa, list(wt.shape), *args)
    exact_gw = torch.nn.grad.conv2d_weight(x.double(), list(wt.shape), g.double(), *args)
    assert torch.equal(gw.double(), exact_gw), f"grad_weight {case} {bits}: {ran}"
    op = "int8_conv2d_grad_weight"
    assert ran[0] == f"{op}:{expected_conv_kernel(op, qa, qa, 0, (x.shape, wt.shape, *args))}"


# ----------------------------------------------------------------------- training ops: fast == reference
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _fast_and_reference(fn, x, weight, bias, cfg, g):
    outs = []
    for fast in (True, False):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        c = Int8ComputeConfig(**{**cfg.__dict__, "use_fast_kernels": fast})
        torch.manual_seed(0)  # the default stochastic gradient rounding draws the same noise on both paths
        with hw.record_kernels() as ran:
            y = fn(xi, wi, bi, c)
            y.backward(g)
        outs.append((y.detach().float(), xi.grad.float(), wi.grad, bi.grad, ran))
    return outs


@SETTINGS
@given(
    m=st.integers(1, 24), k=st.integers(1, 80), n=st.integers(1, 24), dtype=DTYPES,
    strided=st.booleans(), eight_bit=st.booleans(), seed=st.integers(0, 2**16),
)
def test_int8_linear_fast_kernels_equal_reference(m, k, n, dtype, strided, eight_bit, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    if strided:
        x = _layout(x, "strided")
    weight, bias, g = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen), torch.randn(m, n, generator=gen)
    cfg = Int8ComputeConfig(grad_clip=False) if eight_bit else Int8ComputeConfig.for_cpu_without_vnni(grad_clip=False)
    fast, ref = _fast_and_reference(lambda a, w, b, c: int8_linear(a, w, b, c, name="fc"), x, weight, bias, cfg, g.to(dtype))
    rtol, atol = TOL[dtype]
    for got, want in zip(fast[:4], ref[:4]):  # y and grad_x in x's dtype: one rounding step of it apart at most
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert ref[4] == []  # use_fast_kernels=False calls the references directly, no custom op
    expected = {f"int8_mm:{expected_mm_kernel(mm, kk, nn_, qa, qb)}" for mm, kk, nn_, qa, qb in (
        (m, k, n, qmax(cfg.act_bits), qmax(cfg.weight_bits)),
        (m, n, k, qmax(cfg.grad_bits), qmax(cfg.weight_bits)),
        (n, m, k, qmax(cfg.grad_bits), qmax(cfg.act_bits)),
    )}
    assert set(fast[4]) == expected


@SETTINGS
@given(case=conv_cases(), dtype=DTYPES, channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_conv2d_fast_kernels_equal_reference(case, dtype, channels_last, seed):
    n, c, o, h, w, (kh, kw), stride, padding, dilation, groups = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(o, c // groups, kh, kw, generator=gen), torch.randn(o, generator=gen)
    y_shape = F.conv2d(x.float(), weight, None, stride, padding, dilation, groups).shape
    g = torch.randn(y_shape, generator=gen).to(dtype)
    cfg = Int8ComputeConfig.for_this_machine(grad_clip=False)

    def fn(a, wt, b, cf):
        return int8_conv2d(a, wt, b, stride=stride, padding=padding, dilation=dilation, groups=groups, config=cf, name="conv")

    fast, ref = _fast_and_reference(fn, x, weight, bias, cfg, g)
    rtol, atol = TOL[dtype]
    for got, want in zip(fast[:4], ref[:4]):
        torch.testing.assert_close(got, want, rtol=rtol, atol=max(atol, 1e-4))
    assert ref[4] == []
    qa, qw, qg = qmax(cfg.act_bits), qmax(cfg.weight_bits), qmax(cfg.grad_bits)
    geometry = (x.shape, weight.shape, _pair(stride), _pair(padding), _pair(dilation), groups)
    assert f"int8_conv2d:{expected_conv_kernel('int8_conv2d', qa, qw, c // groups * kh * kw, geometry)}" in fast[4]
    op = "int8_conv2d_grad_input"
    assert f"{op}:{expected_conv_kernel(op, qg, qw, o // groups * kh * kw, geometry)}" in fast[4]
    op = "int8_conv2d_grad_weight"
    assert f"{op}:{expected_conv_kernel(op, qa, qg, 0, geometry)}" in fast[4]


# ------------------------------------------------------------------------- converted inference layers
def expected_deploy_kernel(layer: str, in_features: int = 0, rows: int | None = None) -> str:
    from lq.deploy import gemv, kernels

    if layer == "Int8Linear" and kernels.fbgemm_mode() != hw.UNAVAILABLE and 2 * in_features <= hw.max_exact_reduction(255, 127):
        # a few rows: the same numbers from lq/deploy/gemv.c where it is built
        few = rows is not None and rows <= gemv.MAX_ROWS and gemv.fbgemm_formula() is not None
        return "gemv" if few else "fbgemm"
    return "onednn" if hw.onednn_mode() != hw.UNAVAILABLE else "reference"


def _converted_pair(model, x):
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
    lq.calibrate(model, [x.float()])
    model.eval()
    with torch.no_grad():
        fake = model(x)
    return lq.convert(copy.deepcopy(model)), lq.convert(copy.deepcopy(model), backend="reference"), fake


@SETTINGS
@given(
    m=st.integers(1, 20), k=st.integers(1, 70), n=st.integers(1, 20), dtype=DTYPES, strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_converted_linear_fast_equals_reference(m, k, n, dtype, strided, seed):
    torch.manual_seed(seed)
    x = torch.randn(m, k)
    fast, ref, _ = _converted_pair(nn.Sequential(nn.Linear(k, n)), x)
    x = x.to(dtype)
    if strided:
        x = _layout(x, "strided")
    with torch.no_grad(), hw.record_kernels() as ran:
        y = fast(x)
    with torch.no_grad():
        y_ref = ref(x)
    assert y.dtype == dtype
    rtol, atol = TOL[dtype]  # fp32 values one rounding of the output dtype apart at most
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol)
    assert ran == [f"Int8Linear:{expected_deploy_kernel('Int8Linear', k, m)}"]


@SETTINGS
@given(case=conv_cases(), dtype=DTYPES, channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_converted_conv_fast_equals_reference(case, dtype, channels_last, seed):
    n, c, o, h, w, kernel, stride, padding, dilation, groups = case
    torch.manual_seed(seed)
    x = torch.randn(n, c, h, w)
    conv = nn.Conv2d(c, o, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    fast, ref, _ = _converted_pair(nn.Sequential(conv), x)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), hw.record_kernels() as ran:
        y = fast(x)
    with torch.no_grad():
        y_ref = ref(x)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol)
    assert ran == [f"Int8Conv2d:{expected_deploy_kernel('Int8Conv2d')}"]


# ----------------------------------------------------------------------- NaN/Inf on every path, any host
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_names_the_layer_on_every_path(bad):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    x = torch.randn(6, 1, 8, 8)
    fused, plain, _ = _converted_pair(model, x)
    unfused = lq.convert(copy.deepcopy(model), fuse=False)
    x[2, 0, 3, 3] = bad
    kind = "NaN" if bad != bad else "Inf"
    with torch.no_grad():
        for name, m in (("fake quant", model), ("int8 chain", fused), ("converted", unfused), ("reference", plain)):
            with pytest.raises(FloatingPointError, match=rf"0.*{kind}"):
                m(x)
    # int8 training: forward input and output gradient
    train = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    lq.quantize(train, lq.QuantConfig(weight=lq.QuantSpec(enabled=False), activation=lq.QuantSpec(enabled=False)))
    from lq.nn.int8_compute import use_int8_compute

    use_int8_compute(train)
    with pytest.raises(FloatingPointError, match="'0'"):
        train(x)
    y = train(torch.randn(6, 1, 8, 8))
    g = torch.ones_like(y)
    g[0, 0] = bad
    with pytest.raises(FloatingPointError, match="'3'"):
        y.backward(g)


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_int8_mm_output_stage_in_place_equals_the_fused_one(per_row, bias, dtype, monkeypatch):
    """Outputs of IN_PLACE_BYTES and more are scaled over the integer sums' own memory, 1 MiB of rows at a
    time (fresh pages for a second big tensor cost as much as the scaling): the same values, bit for bit, as
    the one-pass output stage (threshold lowered here so that small matrices take that path)."""
    from lq.ops import int8_mm as mm

    gen = torch.Generator().manual_seed(3)
    acc = torch.randint(-(10**6), 10**6, (700, 389), generator=gen, dtype=torch.int32).to(dtype)
    a = torch.rand(700 if per_row else 1, generator=gen) + 0.01
    b = torch.rand(389, generator=gen) + 0.01
    c = torch.randn(389, generator=gen) if bias else None
    expected = mm._epilogue(acc, a, b, c)
    monkeypatch.setattr(mm, "IN_PLACE_BYTES", 1024)
    src = acc.clone()
    out = mm.scale_sums(src, a, b, c)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert out.data_ptr() == src.data_ptr()  # written over the sums: no second big allocation
