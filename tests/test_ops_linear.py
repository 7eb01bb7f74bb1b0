"""lq.ops.int8_linear: forward and both gradients against fp32 within the bound int8 rounding predicts,
fast kernel == reference, reference backward == autograd of the dequantized computation, memory, errors."""

from __future__ import annotations

import os

# Eager quantization kernels in tests: torch.compile of the fused kernels costs ~20 s per variant on a
# loaded 2-core machine; test_compiled_quantizers_match_eager covers the compiled path once.
os.environ.setdefault("LQ_COMPILE_QUANT", "0")

import warnings

import pytest
import torch
import torch.nn.functional as F

from lq.ops import GradDeviationTracker, Int8ComputeConfig, int8_linear
from lq.ops import hardware as hw
from lq.ops.grad_quant import quantize_grad
from lq.ops.int8_mm import int8_mm_reference
from lq.ops.quantize import quantize_along
from lq.quant.functional import qmax

from kernel_routing import expected_mm_kernel

# 8/8/8 bits (the default; on CPUs without VNNI the GEMMs run the exact reference kernel) and 7/7/8 bits
# (the configuration whose oneDNN kernels are exact on CPUs without VNNI).
# Round-to-nearest gradients: the bounds below are eq. 7's (half a step). The default stochastic rounding is
# checked fast-vs-reference with the same noise ("stochastic" in test_fast_path_matches_reference_path).
CONFIGS = {
    "8bit": Int8ComputeConfig(grad_clip=False, grad_rounding="nearest"),
    "7bit": Int8ComputeConfig.for_cpu_without_vnni(grad_clip=False, grad_rounding="nearest"),
}
FAST_VS_REFERENCE = {**CONFIGS, "stochastic": Int8ComputeConfig.for_this_machine(grad_clip=False)}
SHAPES = [(1, 7, 5), (33, 70, 20), (64, 129, 31), (5, 1, 3)]


def _run(x, w, b, cfg, g):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_()
    y = int8_linear(x, w, b, cfg, name="fc")
    y.backward(g)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_forward_and_grads_within_rounding_bound(m, k, n, cfg_name):
    cfg = CONFIGS[cfg_name]
    torch.manual_seed(m * 1000 + k + n)
    x, w, b, g = torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(m, n)
    y, gx, gw, gb = _run(x, w, b, cfg, g)
    qa, qw, qg = qmax(cfg.act_bits), qmax(cfg.weight_bits), qmax(cfg.grad_bits)
    xq, sx = quantize_along(x, qa, 0)  # steps: sx [M], sw [N]
    wq, sw = quantize_along(w, qw, 0)
    ax, aw, ag = x.abs(), w.abs(), g.abs()

    # forward: x_hat = x + dx, |dx| <= sx/2; w_hat = w + dw, |dw| <= sw/2; sum_k (x dw + dx w + dx dw)
    bound = (ax @ torch.ones(k, n)) * sw / 2 + sx[:, None] / 2 * (torch.ones(m, k) @ aw.t()) + k * sx[:, None] * sw / 4
    slack = 1e-5 * (ax @ aw.t() + 1)
    ref = F.linear(x, w, b)
    assert ((y - ref).abs() <= bound + slack).all()

    # grad_input = sum_n (g_n * sw_n + e_n) wq_n, |e| <= sg/2, sg = max_n |g * sw| / qg (per row)
    #            = g @ w_hat + e @ wq  ->  |err| <= sum_n |g| sw/2 + sg/2 * sum_n |wq|
    sg = (ag * sw).amax(1) / qg
    bound_x = (ag * sw / 2) @ torch.ones(n, k) + sg[:, None] / 2 * (torch.ones(m, n) @ wq.abs().float())
    assert ((gx - g @ w).abs() <= bound_x + 1e-5 * (ag @ aw + 1)).all()

    # grad_weight = sum_m (g_m * sx_m + e_m) xq_m, |e| <= sg'/2, sg' = max_m |g * sx| / qg (per column)
    sg2 = (ag * sx[:, None]).amax(0) / qg
    bound_w = (ag * sx[:, None] / 2).t() @ torch.ones(m, k) + sg2[:, None] / 2 * (torch.ones(n, m) @ xq.abs().float())
    assert ((gw - g.t() @ x).abs() <= bound_w + 1e-5 * (ag.t() @ ax + 1)).all()
    torch.testing.assert_close(gb, g.sum(0))


def test_batched_input_and_dtype():
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    y = int8_linear(x, w, config=CONFIGS["7bit"])
    assert y.shape == (2, 3, 8) and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16 and w.grad.shape == w.shape


@pytest.mark.parametrize("a_q,b_q", [(63, 127), (127, 63), (63, 63), (127, 127)])
@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (37, 300, 29), (17, 1040, 64)])
def test_fast_kernel_equals_reference_integers(m, k, n, a_q, b_q):
    torch.manual_seed(k)
    a = torch.randint(-a_q, a_q + 1, (m, k), dtype=torch.int8)
    b = torch.randint(-b_q, b_q + 1, (n, k), dtype=torch.int8)
    one = torch.ones(1)
    with hw.record_kernels() as ran:
        fast = torch.ops.lq.int8_mm(a, b, one, one, a_q, b_q, None)
    assert ran == [f"int8_mm:{expected_mm_kernel(m, k, n, a_q, b_q)}"]
    exact = a.long() @ b.long().t()
    assert torch.equal(fast, exact.float())  # |sums| < 2^24 here: fp32 holds the int32 result exactly
    assert torch.equal(int8_mm_reference(a, b, one, one, a_q, b_q, None), exact.float())


@pytest.mark.parametrize("cfg_name", list(FAST_VS_REFERENCE))
def test_fast_path_matches_reference_path(cfg_name):
    from dataclasses import replace

    cfg = FAST_VS_REFERENCE[cfg_name]
    torch.manual_seed(1)
    x, w, b, g = torch.randn(40, 50), torch.randn(24, 50), torch.randn(24), torch.randn(40, 24)
    torch.manual_seed(11)  # the same stochastic-rounding noise for both paths
    with hw.record_kernels() as ran:
        fast = _run(x, w, b, cfg, g)
    qa, qw, qg = qmax(cfg.act_bits), qmax(cfg.weight_bits), qmax(cfg.grad_bits)
    # forward [40, 50] x [24, 50]; grad_input [40, 24] x [50, 24]; grad_weight [24, 40] x [50, 40]
    assert ran == [f"int8_mm:{expected_mm_kernel(*s)}" for s in ((40, 50, 24, qa, qw), (40, 24, 50, qg, qw), (24, 40, 50, qg, qa))]
    torch.manual_seed(11)
    ref = _run(x, w, b, replace(cfg, use_fast_kernels=False), g)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-6)  # same integers, scaled in another order


def test_int32_overflow_worst_case_is_chunked():
    # every product at its maximum: 127 * 63 * 140,000 = 1.12e9 fits int32, but oneDNN accumulates the
    # uint8-shifted operand (63 + 64 = 127) * 127 * 140,000 = 2.26e9 > 2^31: only chunking keeps it exact.
    k = 140_000
    one = torch.ones(1)
    for a_val, b_val, a_q, b_q in [(127, 63, 127, 63), (-127, 63, 127, 63), (127, -127, 127, 127)]:
        a = torch.full((2, k), a_val, dtype=torch.int8)
        b = torch.full((3, k), b_val, dtype=torch.int8)
        out = torch.ops.lq.int8_mm(a, b, one, one, a_q, b_q, None)
        expected = float(a_val * b_val * k)
        torch.testing.assert_close(out, torch.full((2, 3), expected), rtol=1e-6, atol=0)


def test_reference_backward_equals_autograd_of_dequantized_computation():
    """gradcheck-style: the reference path's backward equals float64 autograd of the dequantized forward,
    with the same quantized gradients (so only fp32 rounding separates them)."""
    cfg = Int8ComputeConfig(grad_clip=False, use_fast_kernels=False, grad_rounding="nearest")
    torch.manual_seed(2)
    x, w, g = torch.randn(12, 9), torch.randn(6, 9), torch.randn(12, 6)
    _, gx, gw, _ = _run(x, w, torch.zeros(6), cfg, g)
    xq, sx = quantize_along(x, 127, 0)
    wq, sw = quantize_along(w, 127, 0)
    # float64 autograd of y = x_hat w_hat^T: d/dx = g w_hat, d/dw = g^T x_hat. Writing w_hat = wq * sw and
    # x_hat = xq * sx, the int8 backward quantizes (g * sw) per row and (g * sx) per column:
    gi = quantize_grad(g * sw, 127, 0, clip=False)
    gwq = quantize_grad(g * sx[:, None], 127, 1, clip=False)
    x64 = (xq.double() * sx.double()[:, None]).requires_grad_()
    w64 = (wq.double() * sw.double()[:, None]).requires_grad_()
    (x64 @ w64.t()).backward(g.double())
    # the exact gradient of the dequantized computation, with g replaced by its int8 version
    exp_gx = (gi.q.double() * gi.step.double()[:, None]) @ wq.double()
    exp_gw = (gwq.q.double() * gwq.step.double()[None, :]).t() @ xq.double()
    torch.testing.assert_close(gx.double(), exp_gx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw.double(), exp_gw, rtol=1e-6, atol=1e-6)
    # and with float gradients the op is exactly float64 autograd of the dequantized forward
    _, gx_f, gw_f, _ = _run(x, w, torch.zeros(6), Int8ComputeConfig(quantize_grad=False, use_fast_kernels=False), g)
    torch.testing.assert_close(gx_f.double(), x64.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw_f.double(), w64.grad, rtol=1e-6, atol=1e-6)
    # and the integer-valued gradient's error to float64 autograd obeys the gradient rounding bound
    assert (gx.double() - x64.grad).abs().max() <= (gi.step.double()[:, None] / 2 * (wq.abs().double().sum(0))).max()


def test_saved_activation_memory_is_int8():
    m, k, n = 4096, 256, 64
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = int8_linear(x, w, config=CONFIGS["7bit"])
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    weight_bytes = sum(t.numel() * t.element_size() for t in saved if t.shape and t.shape[0] == n)
    activation_bytes = nbytes - weight_bytes
    assert activation_bytes <= 0.35 * x.numel() * 4, (activation_bytes, x.numel() * 4)
    assert not any(t.dtype.is_floating_point and t.numel() == x.numel() for t in saved)  # no float copy of x
    y.sum().backward()


def test_nan_gradient_error_names_layer():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    y = int8_linear(x, w, name="encoder.fc1")
    with pytest.raises(FloatingPointError, match="encoder.fc1"):
        y.backward(torch.full_like(y, float("nan")))
    with pytest.raises(FloatingPointError, match="encoder.fc2"):
        int8_linear(torch.full((2, 8), float("inf")), w, name="encoder.fc2")


def test_fallback_warning_fires_once(monkeypatch):
    monkeypatch.setenv("LQ_NATIVE", "0")  # (a CPU without the AMX kernel)
    monkeypatch.setattr(hw, "cpu_int_mm_is_fast", lambda: False)
    monkeypatch.setattr(hw, "u8s8_exact", lambda u, s: False)
    hw.reset_warnings()
    x, w = torch.randn(5, 6), torch.randn(4, 6)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = int8_linear(x, w)
        b = int8_linear(x, w)
    msgs = [r for r in rec if "reference kernel" in str(r.message)]
    assert len(msgs) == 1
    torch.testing.assert_close(a, b)
    hw.reset_warnings()


def test_static_activation_scale_clips_and_masks_gradient():
    x = torch.tensor([[0.5, -3.0, 0.1, 2.0]], requires_grad=True)
    w = torch.eye(4)
    y = int8_linear(x, w, act_amax=1.0, config=CONFIGS["8bit"])
    assert y[0, 1].item() == pytest.approx(-1.0) and y[0, 3].item() == pytest.approx(1.0)
    y.sum().backward()
    assert x.grad[0, 1] == 0 and x.grad[0, 3] == 0 and x.grad[0, 0] != 0
    with pytest.raises(ValueError, match="act_amax"):
        int8_linear(x, w, config=Int8ComputeConfig(act_scale="static"))


def test_float_backward_options_and_tracker():
    torch.manual_seed(3)
    x, w, g = torch.randn(20, 16), torch.randn(8, 16), torch.randn(20, 8)
    full = _run(x, w, torch.zeros(8), Int8ComputeConfig(quantize_grad=False), g)
    gi_only = _run(x, w, torch.zeros(8), Int8ComputeConfig(int8_grad_weight=False, grad_clip=False), g)
    torch.testing.assert_close(gi_only[2], full[2])  # grad_weight in float in both
    with GradDeviationTracker() as t:
        _run(x, w, torch.zeros(8), Int8ComputeConfig(), g)
    assert len(t.deviations) == 2 and 0 <= t.mean() < 0.05


def test_config_for_this_machine_runs_fast_kernels(monkeypatch):
    cfg = Int8ComputeConfig.for_this_machine()
    qa, qw, qg = qmax(cfg.act_bits), qmax(cfg.weight_bits), qmax(cfg.grad_bits)
    # every GEMM of int8_linear has an exact fast kernel with this config (no reference fallback)
    for a_q, b_q in [(qa, qw), (qg, qw), (qg, qa)]:
        assert hw.cpu_int_mm_is_fast() or hw.u8s8_exact(a_q, b_q) or hw.u8s8_exact(b_q, a_q)
    assert Int8ComputeConfig.for_this_machine("cuda") == Int8ComputeConfig()


def test_config_validation():
    with pytest.raises(ValueError, match="act_scale"):
        Int8ComputeConfig(act_scale="sometimes")
    with pytest.raises(ValueError, match="grad_bits"):
        Int8ComputeConfig(grad_bits=12)
    with pytest.raises(ValueError, match="clip_ratios"):
        Int8ComputeConfig(clip_ratios=(1.5,))


def test_compiled_quantizers_match_eager(monkeypatch):
    from lq.ops import fused

    torch.manual_seed(6)
    x = torch.randn(37, 53)
    monkeypatch.setenv("LQ_NATIVE", "0")  # (the torch ops, not lq/ops/quant.c)
    monkeypatch.setenv("LQ_COMPILE_QUANT", "0")
    q_eager, s_eager = quantize_along(x, 127, 0)
    monkeypatch.setenv("LQ_COMPILE_QUANT", "1")
    q_comp, s_comp = quantize_along(x, 127, 0)
    assert fused.compile_enabled()
    assert torch.equal(q_eager, q_comp)
    torch.testing.assert_close(s_eager, s_comp, rtol=0, atol=0)


def test_fused_variants_get_their_own_code_object(monkeypatch):
    """Dynamo's recompile limit (8) is per code object: each static variant (ranks, None-ness, int args such
    as qmax / kept dim) must compile its own copy, or a network with > 8 variants silently falls back to eager."""
    from lq.ops import fused

    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(fn.__code__)
        return fn

    monkeypatch.setenv("LQ_COMPILE_QUANT", "1")
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(fused, "_compiled", {})
    x2, x4 = torch.randn(5, 6), torch.randn(2, 3, 4, 4)
    variants = [(x2, None), (x2, 0), (x2, 1), (x4, None), (x4, 1), (x4, 0)]
    for x, keep in variants:
        expected = fused._amax_along(x, None, keep)
        torch.testing.assert_close(fused.amax_along(x, keep), expected, rtol=0, atol=0)
    fused.amax_along(x2, 0)  # same variant again: no new copy
    assert len(seen) == len(variants)
    assert len({id(c) for c in seen}) == len(variants)
    assert all(c is not fused._amax_along.__code__ for c in seen)


def test_u8s8_exact_follows_the_measured_onednn_mode(monkeypatch):
    """One self-test (lq.ops.hardware.onednn_mode) decides for the training ops and lq.deploy alike."""
    from lq.deploy import kernels

    assert kernels.onednn_mode is hw.onednn_mode
    monkeypatch.setattr(hw, "onednn_mode", lambda: hw.FULL_RANGE)
    assert hw.u8s8_exact(127, 127)
    assert Int8ComputeConfig.for_this_machine().act_bits == 8
    monkeypatch.setattr(hw, "onednn_mode", lambda: hw.HALF_RANGE)
    assert hw.u8s8_exact(63, 127) and not hw.u8s8_exact(127, 127)  # 2 * 255 * 127 > 32767 (vpmaddubsw)
    assert Int8ComputeConfig.for_this_machine().act_bits == 7
    assert Int8ComputeConfig.for_this_machine("cuda").act_bits == 8
    monkeypatch.setattr(hw, "onednn_mode", lambda: hw.UNAVAILABLE)
    assert not hw.u8s8_exact(63, 63)
