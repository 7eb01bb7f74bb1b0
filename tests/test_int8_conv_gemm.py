"""lq.ops.int8_conv_gemm (int8 im2col + int8 GEMM, the CUDA kernels of the three int8 conv ops) against the
exact float64 references, on CPU: the same code a GPU runs, with ``lq::int8_mm`` either on its CPU route or
on its CUDA kernel (``torch._int_mm`` with cuBLASLt's shape rules, reached on CPU tensors by dispatching to
the CUDA key). Seeded random geometries plus the edge classes: K = 1, batch 1, tiny M, 1x1, depthwise,
output_padding, channels_last and non-contiguous views. Unit scales: outputs are the integer sums
themselves (< 2^24 here, exact in fp32), so "equal" is bit-equal; scaled outputs agree within fp32 rounding.
"""

from __future__ import annotations

import os

os.environ.setdefault("LQ_COMPILE_QUANT", "0")  # eager quantizers (see tests/test_ops_conv.py)

import random
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from lq.ops import Int8ComputeConfig, int8_conv2d
from lq.ops import hardware as hw
from lq.ops import int8_conv_gemm as G
from lq.ops import int8_conv_kernels as K
from lq.quant.functional import qmax

from kernel_routing import expected_mm_kernel

CUDA_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
OPS = ("int8_conv2d", "int8_conv2d_grad_input", "int8_conv2d_grad_weight")


def _on_cuda_kernel(op: str):
    """``torch.ops.lq.<op>`` sent straight to its CUDA kernel, whatever device its tensors are on: on CPU
    tensors it runs exactly the code a GPU runs (the device only matters inside ``torch._int_mm``)."""
    overload = getattr(torch.ops.lq, op).default
    return lambda *args: overload.redispatch(CUDA_KEYS, *args)


def _ints(shape, q, gen):
    return torch.randint(-q, q + 1, shape, dtype=torch.int8, generator=gen)


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if how == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if how == "strided":  # every other column of a wider buffer
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if how == "transposed":  # H and W strides swapped
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


# N, C, O, H, W, (kh, kw), stride, padding, dilation, groups
EDGE_CASES = {
    "k1": (2, 1, 8, 5, 6, (1, 1), [1, 1], [0, 0], [1, 1], 1),  # K = C/g*kh*kw = 1
    "k1_grouped": (2, 3, 6, 5, 5, (1, 1), [2, 1], [0, 1], [1, 1], 3),
    "batch1_one_position": (1, 4, 5, 3, 3, (3, 3), [1, 1], [0, 0], [1, 1], 1),  # M = R = 1
    "batch1_odd": (1, 3, 5, 7, 9, (3, 3), [1, 1], [1, 1], [1, 1], 1),
    "one_by_one": (3, 16, 24, 4, 4, (1, 1), [1, 1], [0, 0], [1, 1], 1),  # K, N multiples of 8 already
    "depthwise": (2, 6, 6, 9, 9, (3, 3), [1, 1], [2, 2], [2, 2], 6),  # O/g = 1
    "depthwise_stride2": (2, 5, 10, 8, 7, (3, 3), [2, 2], [1, 1], [1, 1], 5),
    "output_padding": (2, 4, 6, 10, 11, (3, 3), [2, 3], [1, 1], [1, 1], 1),  # (H+2p-k) % s != 0
    "crop": (2, 3, 4, 6, 6, (1, 2), [3, 2], [2, 1], [1, 2], 1),  # padding > dilation*(k-1): negative pads
    "wide": (2, 24, 20, 6, 5, (3, 3), [1, 1], [1, 1], [1, 1], 1),  # K = 216, O = 20
    "grouped": (3, 8, 12, 11, 8, (3, 2), [2, 1], [0, 1], [1, 1], 4),
}


def _random_case(seed: int):
    rng = random.Random(seed)
    kind = rng.choice(["dense", "dense", "grouped", "depthwise"])
    if kind == "dense":
        groups, c = 1, rng.randint(1, 10)
    elif kind == "grouped":
        groups = rng.choice([2, 3])
        c = groups * rng.randint(1, 4)
    else:
        c = rng.randint(1, 8)
        groups = c
    o = groups * rng.randint(1, 3)
    kh, kw = rng.choice([1, 2, 3, 5]), rng.choice([1, 3, 4])
    stride = [rng.randint(1, 3), rng.randint(1, 3)]
    padding = [rng.randint(0, 2), rng.randint(0, 2)]
    dilation = [rng.randint(1, 2), rng.randint(1, 2)]
    h = rng.randint(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 12)
    w = rng.randint(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 12)
    n = rng.choice([1, 1, 2, 3, 5])
    return n, c, o, h, w, (kh, kw), stride, padding, dilation, groups


CASES = [pytest.param(case, id=name) for name, case in EDGE_CASES.items()]
CASES += [pytest.param(_random_case(seed), id=f"random{seed}") for seed in range(48)]
LAYOUTS = ["contiguous", "channels_last", "strided", "transposed"]


@pytest.fixture(autouse=True)
def _no_fallback_warnings():
    """A fallback (``lq.ops.hardware.warn_once``) would mean some GEMM left the int8 kernel: none may fire."""
    hw.reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield
    hw.reset_warnings()
    assert not [w for w in caught if "lq::" in str(w.message)], [str(w.message) for w in caught]


@pytest.fixture(params=["cpu_int8_mm", "cuda_int8_mm"])
def mm_route(request, monkeypatch):
    """Which ``lq::int8_mm`` kernel the GEMM conv calls: its CPU route, or its CUDA kernel run on the CPU
    tensors (``torch._int_mm`` behind cuBLASLt's shape checks, falling back to the reference -- recorded and
    warned -- on any shape outside them)."""
    if request.param == "cuda_int8_mm":
        monkeypatch.setattr(G, "int8_mm", _on_cuda_kernel("int8_mm"))
    return request.param


def _expected_mm(route: str, qa: int, qb: int, k: int = 8) -> str:
    # Every padded GEMM has K >= 8 (never the CPU's K = 1 class) and meets the CUDA rules.
    return "int8_mm:" + ("int_mm" if route == "cuda_int8_mm" else expected_mm_kernel(17, k, 8, qa, qb))


def _geometry(case, layout, seed, qa=127, qw=127):
    n, c, o, h, w, k, s, p, d, grp = case
    gen = torch.Generator().manual_seed(seed)
    x = _layout(_ints((n, c, h, w), qa, gen), layout)
    wt = _ints((o, c // grp, *k), qw, gen)
    if layout in ("strided", "transposed"):
        wt = _layout(wt, layout)
    y_shape = F.conv2d(x.double(), wt.double(), None, s, p, d, grp).shape
    g = _layout(_ints(tuple(y_shape), 127, gen), layout)
    return x, wt, g, (s, p, d, grp)


@pytest.mark.parametrize("case", CASES)
def test_gemm_kernels_equal_exact_integer_convolutions(case, mm_route):
    layout = LAYOUTS[sum(case[:5]) % len(LAYOUTS)]
    x, wt, g, args = _geometry(case, layout, seed=sum(case[:5]))
    one, ones = torch.ones(1), torch.ones(wt.shape[0])
    with hw.record_kernels() as ran:
        y = G.conv2d_fwd_gemm(x, wt, one, ones, 127, 127, None, *args)
    assert torch.equal(y, K.conv2d_fwd_reference(x, wt, one, ones, 127, 127, None, *args)), layout
    assert y.is_contiguous()
    assert set(ran) == {_expected_mm(mm_route, 127, 127)}

    with hw.record_kernels() as ran:
        gx = G.conv2d_grad_input_gemm(g, wt, one, 127, 127, list(x.shape), *args)
    assert torch.equal(gx, K.conv2d_grad_input_reference(g, wt, one, 127, 127, list(x.shape), *args)), layout
    assert gx.is_contiguous()
    assert set(ran) == {_expected_mm(mm_route, 127, 127)}

    with hw.record_kernels() as ran:
        gw = G.conv2d_grad_weight_gemm(g, x, ones, one, 127, 127, list(wt.shape), *args)
    assert torch.equal(gw, K.conv2d_grad_weight_reference(g, x, ones, one, 127, 127, list(wt.shape), *args)), layout
    assert set(ran) == {_expected_mm(mm_route, 127, 127)}


def _assert_within_fp32_rounding(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor) -> None:
    """Exact integer sums, then a few fp32 roundings (scales, bias) on each side: a few ulps of the terms."""
    err = (got.cpu().double() - want.double()).abs()
    bound = 4 * 2.0**-24 * magnitude
    assert (err <= bound).all(), f"max error {err.max().item()} vs bound {bound.flatten()[err.argmax()].item()}"


def _check_scaled(fwd, grad_input, grad_weight, x, wt, g, args, q, seed, device="cpu"):
    """The three ops (callables, any device) with real steps -- per-tensor input and input-gradient steps,
    per-channel or per-tensor weight and weight-gradient steps, a bias or none -- against the references."""
    gen = torch.Generator().manual_seed(seed)
    (qa, qw, qg), o = q, wt.shape[0]
    xs, gs = torch.rand(1, generator=gen) * 0.1 + 1e-3, torch.rand(1, generator=gen) * 0.1 + 1e-3
    ws = torch.rand(o if seed % 2 else 1, generator=gen) * 0.1 + 1e-3
    gs_o = torch.rand(o if seed % 4 else 1, generator=gen) * 0.1 + 1e-3
    bias = torch.randn(o, generator=gen) if seed % 2 else None
    x_, wt_, g_, xs_, gs_, ws_, gs_o_, bias_ = (
        None if t is None else t.to(device) for t in (x, wt, g, xs, gs, ws, gs_o, bias)
    )
    per_o = [t.double().expand(o) for t in (ws, gs_o)]

    y = fwd(x_, wt_, xs_, ws_, qa, qw, bias_, *args)
    acc = F.conv2d(x.double(), wt.double(), None, *args) * xs.double() * per_o[0].reshape(1, -1, 1, 1)
    b = torch.zeros(o, dtype=torch.float64) if bias is None else bias.double()
    want = K.conv2d_fwd_reference(x, wt, xs, ws, qa, qw, bias, *args)
    _assert_within_fp32_rounding(y, want, acc.abs() + b.abs().reshape(1, -1, 1, 1))

    gx = grad_input(g_, wt_, gs_, qg, qw, list(x.shape), *args)
    acc = conv2d_input(list(x.shape), wt.double(), g.double(), *args) * gs.double()
    _assert_within_fp32_rounding(gx, K.conv2d_grad_input_reference(g, wt, gs, qg, qw, list(x.shape), *args), acc.abs())

    gw = grad_weight(g_, x_, gs_o_, xs_, qg, qa, list(wt.shape), *args)
    acc = conv2d_weight(x.double(), list(wt.shape), g.double(), *args)
    acc = acc * per_o[1].reshape(-1, 1, 1, 1) * xs.double()
    want = K.conv2d_grad_weight_reference(g, x, gs_o, xs, qg, qa, list(wt.shape), *args)
    _assert_within_fp32_rounding(gw, want, acc.abs())


@pytest.mark.parametrize("seed", range(12))
def test_gemm_kernels_scaled_within_fp32_rounding(seed, mm_route):
    """Real steps and bias, 8-bit and 7-bit activations."""
    q = (63, 127, 127) if seed % 3 == 0 else (127, 127, 127)
    x, wt, g, args = _geometry(_random_case(1000 + seed), LAYOUTS[seed % len(LAYOUTS)], seed, q[0], q[1])
    _check_scaled(G.conv2d_fwd_gemm, G.conv2d_grad_input_gemm, G.conv2d_grad_weight_gemm, x, wt, g, args, q, seed)


def test_grad_weight_int32_overflow_worst_case_chunked(mm_route):
    """Reduction N*H*W = 180,000 of 127 * 127 products: 2.9e9 > 2^31 in one int32 sum. ``lq::int8_mm``
    cuts it into chunks of at most 133,144 terms (multiples of 8: the padded reduction, 180,000, is one)."""
    x = torch.full((2, 1, 300, 300), 127, dtype=torch.int8)
    one = torch.ones(1)
    for g_val in (127, -127):
        g = torch.full((2, 1, 300, 300), g_val, dtype=torch.int8)
        with hw.record_kernels() as ran:
            out = G.conv2d_grad_weight_gemm(g, x, one, one, 127, 127, [1, 1, 1, 1], [1, 1], [0, 0], [1, 1], 1)
        torch.testing.assert_close(out, torch.full((1, 1, 1, 1), float(g_val * 127 * 180_000)), rtol=1e-6, atol=0)
        assert ran == [_expected_mm(mm_route, 127, 127, k=180_000)]


@pytest.mark.parametrize("groups", [1, 2])
def test_padding_meets_cuda_int_mm_shape_rules(monkeypatch, groups):
    """The operands handed to ``lq::int8_mm`` are padded to ``torch._int_mm``'s CUDA rules (M > 16; K, N
    positive multiples of 8), contiguous and 256-byte aligned within their buffer, for a geometry that
    violates every rule in all three GEMMs."""
    seen = []

    def spy(a, b, *rest):
        seen.append((tuple(a.shape), tuple(b.shape)))
        for t in (a, b):
            assert t.is_contiguous() and t.storage_offset() % G.ALIGN == 0
        return torch.ops.lq.int8_mm(a, b, *rest)

    monkeypatch.setattr(G, "int8_mm", spy)
    case = (1, 4 * groups, 5 * groups, 3, 3, (3, 3), [1, 1], [0, 0], [1, 1], groups)  # M = 1, K = 36, N = 5
    x, wt, g, args = _geometry(case, "contiguous", 0)
    one, ones = torch.ones(1), torch.ones(wt.shape[0])
    G.conv2d_fwd_gemm(x, wt, one, ones, 127, 127, None, *args)
    G.conv2d_grad_input_gemm(g, wt, one, 127, 127, list(x.shape), *args)
    G.conv2d_grad_weight_gemm(g, x, ones, one, 127, 127, list(wt.shape), *args)
    assert seen == [((17, 40), (8, 40))] * groups + [((17, 48), (8, 48))] * groups + [((17, 8), (40, 8))] * groups


# ------------------------------------------------------------------------------------ registration
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_is_the_gemm_kernel(op):
    """Without a GPU: the dispatcher has a CUDA kernel for each op, and dispatching to the CUDA key (here with
    CPU tensors) runs the im2col + int8 GEMM kernel."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lq::{op}", "CUDA")
    x, wt, g, args = _geometry(EDGE_CASES["grouped"], "contiguous", 3)
    one, ones = torch.ones(1), torch.ones(wt.shape[0])
    call = {
        "int8_conv2d": (x, wt, one, ones, 127, 127, None, *args),
        "int8_conv2d_grad_input": (g, wt, one, 127, 127, list(x.shape), *args),
        "int8_conv2d_grad_weight": (g, x, ones, one, 127, 127, list(wt.shape), *args),
    }[op]
    with hw.record_kernels() as ran:
        out = _on_cuda_kernel(op)(*call)
    assert ran[0] == f"{op}:{G.KERNEL}"
    reference = {
        "int8_conv2d": K.conv2d_fwd_reference,
        "int8_conv2d_grad_input": K.conv2d_grad_input_reference,
        "int8_conv2d_grad_weight": K.conv2d_grad_weight_reference,
    }[op]
    assert torch.equal(out, reference(*call))


# --------------------------------------------------------------------------- Int8Conv2dFunction end to end
def _train_step(x, w, b, args, cfg, g):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    torch.manual_seed(11)  # the same stochastic-rounding noise on both paths
    y = int8_conv2d(x, w, b, *args, config=cfg, name="conv")
    y.backward(g)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_int8_conv2d_with_cuda_kernels_matches_reference_path(monkeypatch, rounding, channels_last):
    """``Int8Conv2dFunction`` forward + backward with the three ops dispatched to their CUDA (GEMM) kernels
    and ``lq::int8_mm`` to its CUDA kernel, all on CPU tensors, against ``use_fast_kernels=False``."""
    monkeypatch.setattr(G, "int8_mm", _on_cuda_kernel("int8_mm"))
    for op, name in zip(OPS, ("int8_conv2d_fwd", "int8_conv2d_grad_input", "int8_conv2d_grad_weight")):
        monkeypatch.setattr(K, name, _on_cuda_kernel(op))
    cfg = Int8ComputeConfig(grad_clip=False, grad_rounding=rounding)
    torch.manual_seed(4)
    x, w, b = torch.randn(3, 8, 9, 10), torch.randn(12, 4, 3, 3), torch.randn(12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (2, 1, 1, 2)
    g = torch.randn_like(F.conv2d(x, w, b, *args))
    with hw.record_kernels() as ran:
        fast = _train_step(x, w, b, args, cfg, g)
    assert {f"{op}:{G.KERNEL}" for op in OPS} <= set(ran)
    assert "int8_mm:reference" not in ran and "int8_mm:int_mm" in ran
    ref = _train_step(x, w, b, args, replace(cfg, use_fast_kernels=False), g)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES[:35])
def test_cuda_ops_equal_reference(case):
    """On a GPU: the registered ops (CUDA kernels, ``torch._int_mm``) against the CPU float64 references,
    bit-equal with unit steps, within fp32 rounding with real steps and a bias; the kernels that ran recorded."""
    seed = sum(case[:5])
    x, wt, g, args = _geometry(case, LAYOUTS[seed % len(LAYOUTS)], seed)
    one, ones = torch.ones(1, device="cuda"), torch.ones(wt.shape[0], device="cuda")
    xc, wc, gc = x.cuda(), wt.cuda(), g.cuda()
    with hw.record_kernels() as ran:
        y = torch.ops.lq.int8_conv2d(xc, wc, one, ones, 127, 127, None, *args)
        gx = torch.ops.lq.int8_conv2d_grad_input(gc, wc, one, 127, 127, list(x.shape), *args)
        gw = torch.ops.lq.int8_conv2d_grad_weight(gc, xc, ones, one, 127, 127, list(wt.shape), *args)
    assert set(ran) == {f"{op}:{G.KERNEL}" for op in OPS} | {"int8_mm:int_mm"}
    one, ones = torch.ones(1), torch.ones(wt.shape[0])
    assert torch.equal(y.cpu(), K.conv2d_fwd_reference(x, wt, one, ones, 127, 127, None, *args))
    assert torch.equal(gx.cpu(), K.conv2d_grad_input_reference(g, wt, one, 127, 127, list(x.shape), *args))
    assert torch.equal(gw.cpu(), K.conv2d_grad_weight_reference(g, x, ones, one, 127, 127, list(wt.shape), *args))
    ops = (torch.ops.lq.int8_conv2d, torch.ops.lq.int8_conv2d_grad_input, torch.ops.lq.int8_conv2d_grad_weight)
    _check_scaled(*ops, x, wt, g, args, (127, 127, 127), seed, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_int8_conv2d_training_step_matches_reference_path():
    cfg = Int8ComputeConfig(grad_clip=False, grad_rounding="nearest")
    torch.manual_seed(4)
    x, w, b = (torch.randn(3, 8, 9, 10).cuda(), torch.randn(12, 4, 3, 3).cuda(), torch.randn(12).cuda())
    args = (2, 1, 1, 2)
    g = torch.randn_like(F.conv2d(x, w, b, *args))
    with hw.record_kernels() as ran:
        fast = _train_step(x, w, b, args, cfg, g)
    assert {f"{op}:{G.KERNEL}" for op in OPS} <= set(ran)
    ref = _train_step(x, w, b, args, replace(cfg, use_fast_kernels=False), g)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("m,k,n", [(1, 1, 3), (5, 7, 9), (16, 8, 8), (17, 16, 8), (33, 1030, 13)])
def test_int8_mm_cuda_kernel_pads_any_shape_exactly(m, k, n):
    """lq::int8_mm's CUDA kernel (torch._int_mm, here on CPU tensors) zero-pads shapes outside cuBLASLt's
    rules (M > 16, K and N multiples of 8) instead of leaving them to the float64 reference."""
    from lq.ops.int8_mm import int8_mm_reference

    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    a_step, b_step = torch.rand(m, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    bias = torch.randn(n, generator=g)
    with hw.record_kernels() as ran:
        out = _on_cuda_kernel("int8_mm")(a, b, a_step, b_step, 127, 127, bias)
    assert "int8_mm:int_mm" in ran and not any("reference" in r for r in ran), ran
    torch.testing.assert_close(out, int8_mm_reference(a, b, a_step, b_step, 127, 127, bias), rtol=1e-6, atol=1e-4)
    assert out.shape == (m, n) and out.is_contiguous()
