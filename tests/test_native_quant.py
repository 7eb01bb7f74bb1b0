"""lq/ops/quant.c (the CPU int8 training step's quantizations and output stage in C) against the torch ops it
replaces, bit for bit: eq. 6-7 per row (Wu et al. 2020), the gradient operands with their clip ratio and
stochastic rounding (Zhu et al. 2020), eq. 10's output stage."""

from __future__ import annotations

import os

os.environ.setdefault("LQ_COMPILE_QUANT", "0")  # the reference: the eager torch ops

import pytest
import torch

from lq.ops import Int8ComputeConfig, fused, int8_linear, native_quant
from lq.ops import grad_quant as gq
from lq.ops import int8_mm as im
from lq.ops.quantize import quantize_along

pytestmark = pytest.mark.skipif(native_quant.library() is None, reason="no C compiler: the torch ops run")


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _with_ties(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """``x`` with some entries at exact rounding ties of eq. 7 (``x * s`` = n + 1/2) and a zero row."""
    x = x.clone()
    if x.shape[1] > 2:
        s = qmax / x.abs().amax(1, keepdim=True)
        x[:, 1] = (torch.arange(x.shape[0]) % 50 + 0.5) / s[:, 0]
        x[:, 2] = -(torch.arange(x.shape[0]) % 7 + 0.5) / s[:, 0]
    if x.shape[0] > 3:
        x[3] = 0.0
    return x


@pytest.mark.parametrize("shape", [(1, 1), (3, 1000), (1024, 17), (64, 256), (5, 3)])
def test_rows_quantize_as_the_torch_ops(shape, threads) -> None:
    torch.manual_seed(sum(shape))
    x = _with_ties(torch.randn(*shape) * 3, 127)
    for qmax in (127, 63):
        q, step, amax, finite = native_quant.quantize_rows(x, qmax)
        q2, step2, amax2, finite2 = fused._quantize_dynamic(x, None, qmax, 0)
        assert torch.equal(q, q2) and torch.equal(step, step2) and torch.equal(amax, amax2)
        assert finite is True and bool(finite2)
    wide = torch.randn(shape[0], shape[1] + 9)
    view = wide[:, 2 : 2 + shape[1]]  # rows with a stride of their own
    assert torch.equal(native_quant.quantize_rows(view, 127)[0], fused._quantize_dynamic(view, None, 127, 0)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_row_is_reported_and_raises_naming_the_layer(bad) -> None:
    x = torch.randn(8, 40)
    x[5, 33] = bad
    _, _, amax, finite = native_quant.quantize_rows(x, 127)
    assert finite is False and not torch.isfinite(amax[5]) and torch.isfinite(amax[torch.arange(8) != 5]).all()
    with pytest.raises(FloatingPointError, match="fc3"):
        quantize_along(x, 127, 0, name="fc3")


def test_the_kernel_declines_what_it_does_not_cover() -> None:
    x = torch.randn(6, 8)
    assert native_quant.quantize_rows(x.half(), 127) is None
    assert native_quant.quantize_rows(x.t(), 127) is None  # column-major
    assert native_quant.quantize_rows(torch.randn(2, 3, 4), 127) is None
    g = torch.randn(6, 8)
    assert native_quant.grad_operands(g.t(), 127, [(0, None, 1.0, None, None)]) is None
    assert native_quant.grad_operands(g, 127, [(0, torch.ones(6, 1), 1.0, None, None)]) is None  # mult along rows
    assert native_quant.grad_operands(g, 127, [(0, None, 1.0, None, None), (0, None, 1.0, None, None)]) is None
    assert native_quant.scale_sums(torch.zeros(6, 8), torch.ones(6), torch.ones(8), None, False) is None  # fp32 sums


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (256, 512), (2, 1000)])
def test_gradient_operands_quantize_as_the_torch_ops(shape, stochastic, threads) -> None:
    m, n = shape
    torch.manual_seed(m * n)
    g = _with_ties(torch.randn(m, n) * 1e-3, 127)
    mults = {0: [None, torch.rand(1, n) + 0.1], 1: [None, torch.rand(m, 1) + 0.1, torch.rand(1, 1) + 0.1]}
    for mult_a in mults[0]:
        for mult_b in mults[1]:
            for order in ((0, 1), (1, 0), (0,), (1,)):
                torch.manual_seed(1)
                ops = []
                for axis, ratio in zip(order, (0.7, 1.0)):
                    noise, shift = fused.rounding_inputs(g, stochastic)
                    ops.append((axis, mult_a if axis == 0 else mult_b, ratio, noise, shift))
                done = native_quant.grad_operands(g, 127, ops)
                for (axis, mult, ratio, noise, shift), (q, step, amax, finite) in zip(ops, done):
                    q2, step2, amax2, finite2 = gq._fused_fixed(g, mult, torch.tensor([ratio]), 127, axis, noise, shift)
                    assert torch.equal(q, q2) and torch.equal(step, step2) and torch.equal(amax, amax2)
                    assert finite is True and bool(finite2)


def test_a_non_finite_gradient_flags_each_operand() -> None:
    g = torch.randn(6, 9)
    g[2, 4] = float("nan")
    (qa, sa, aa, fa), (qb, sb, ab, fb) = native_quant.grad_operands(
        g, 127, [(0, None, 1.0, None, None), (1, None, 1.0, None, None)])
    assert fa is False and fb is False
    assert torch.isnan(aa[2]) and torch.isfinite(aa[torch.arange(6) != 2]).all()
    assert torch.isnan(ab[4]) and torch.isfinite(ab[torch.arange(9) != 4]).all()


@pytest.mark.parametrize("in_place", [False, True])
def test_output_stage_equals_the_torch_ops(in_place, threads) -> None:
    torch.manual_seed(3)
    for m, n in ((1, 1), (37, 200), (300, 64)):
        acc = torch.randint(-(2**24), 2**24, (m, n), dtype=torch.int32)
        a, b, c = torch.rand(m) + 1e-3, torch.rand(n) + 1e-3, torch.randn(n)
        for a_step, bias in ((a, c), (a[:1], None), (a, None)):
            want = im._epilogue(acc, a_step, b, bias)
            got = native_quant.scale_sums(acc.clone(), a_step, b, bias, in_place)
            assert torch.equal(got, want)
    wide = torch.randint(-100, 100, (5, 12), dtype=torch.int32)
    view = wide[:, :7]
    assert torch.equal(native_quant.scale_sums(view, torch.ones(5), torch.ones(7), None, True), view.float())
    assert torch.equal(wide[:, :7].float(), view.float())  # a view is never written over


def _linear_step(seed: int, config: Int8ComputeConfig):
    torch.manual_seed(seed)
    x = torch.randn(48, 96, requires_grad=True)
    w = (torch.randn(80, 96) / 10).requires_grad_()
    b = torch.randn(80, requires_grad=True)
    state: dict = {}
    outs = []
    for _ in range(3):  # the clip search on the first, the kept ratio on the others
        y = int8_linear(x, w, b, config, "fc", clip_state=state)
        y.backward(torch.randn(48, 80))
        outs += [y.detach().clone(), x.grad.clone(), w.grad.clone(), b.grad.clone()]
        x.grad = w.grad = b.grad = None
    y = int8_linear(x.detach(), w, b, config, "fc", clip_state=state)  # one operand: grad_weight's alone
    y.backward(torch.randn(48, 80))
    return [*outs, w.grad]


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_int8_linear_training_is_the_same_with_and_without_the_kernel(rounding, monkeypatch) -> None:
    """The whole int8 Linear step (forward, both backward GEMMs, periodic clip) with the C kernel equals the
    torch ops' step bit for bit, the same draws of torch's generator included; and the kernel ran."""
    config = Int8ComputeConfig(grad_rounding=rounding, clip_every=2)
    lib = native_quant.library()
    calls = []
    for fn in ("lq_quant_rows", "lq_grad_pair", "lq_scale_sums"):
        real = getattr(lib, fn)
        monkeypatch.setattr(lib, fn, lambda *a, _real=real, _fn=fn: (calls.append(_fn), _real(*a))[1])
    with_kernel = _linear_step(0, config)
    assert {"lq_quant_rows", "lq_grad_pair", "lq_scale_sums"} <= set(calls)
    monkeypatch.setenv("LQ_NATIVE", "0")
    calls.clear()
    without = _linear_step(0, config)
    assert calls == []
    for got, want in zip(with_kernel, without):
        assert torch.equal(got, want)
