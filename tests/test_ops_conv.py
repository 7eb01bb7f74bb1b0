"""lq.ops.int8_conv2d: forward, grad_input, grad_weight against fp32 within the bound int8 rounding
predicts; fast (oneDNN / int8 im2col) kernels == exact references; overflow; memory; errors."""

from __future__ import annotations

import os

# Eager quantization kernels in tests: torch.compile of the fused kernels costs ~20 s per variant on a
# loaded 2-core machine; test_compiled_quantizers_match_eager covers the compiled path once.
os.environ.setdefault("LQ_COMPILE_QUANT", "0")

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from lq.ops import Int8ComputeConfig, int8_conv2d
from lq.ops import hardware as hw
from lq.ops import int8_conv_kernels as K
from lq.ops.quantize import quantize_along
from lq.quant.functional import qmax

from kernel_routing import expected_conv_kernel

# Round-to-nearest gradients: the bounds below are eq. 7's (half a step). The default stochastic rounding is
# checked fast-vs-reference with the same noise ("stochastic" in test_fast_path_matches_reference_path).
CONFIGS = {
    "8bit": Int8ComputeConfig(grad_clip=False, grad_rounding="nearest"),
    "7bit": Int8ComputeConfig.for_cpu_without_vnni(grad_clip=False, grad_rounding="nearest"),
}
FAST_VS_REFERENCE = {**CONFIGS, "stochastic": Int8ComputeConfig.for_this_machine(grad_clip=False)}
# N, C, O, H, W, (kh, kw), stride, padding, dilation, groups
CASES = [
    (1, 3, 5, 7, 9, (3, 3), 1, 1, 1, 1),  # batch 1, odd sizes
    (2, 8, 8, 10, 11, (3, 3), 2, 1, 1, 1),  # stride 2 (output_padding needed on W)
    (2, 6, 6, 9, 9, (3, 3), 1, 2, 2, 6),  # depthwise, dilation 2
    (3, 8, 12, 11, 8, (3, 2), (2, 1), (0, 1), 1, 4),  # groups, non-square kernel/stride/padding
    (2, 4, 6, 8, 8, (1, 1), 1, 0, 1, 1),  # 1x1
    (1, 5, 4, 12, 12, (5, 5), 3, 3, 1, 1),  # padding > dilation*(k-1)/2, stride 3
]


def _run(x, w, b, args, cfg, g):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_()
    y = int8_conv2d(x, w, b, *args, config=cfg, name="conv")
    y.backward(g)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("case", CASES)
def test_forward_and_grads_within_rounding_bound(case, cfg_name):
    cfg = CONFIGS[cfg_name]
    n, c, o, h, wd, k, s, p, d, grp = case
    args = (s, p, d, grp)
    torch.manual_seed(sum(case[:5]))
    x = torch.randn(n, c, h, wd)
    w = torch.randn(o, c // grp, *k)
    b = torch.randn(o)
    ref = F.conv2d(x, w, b, *args)
    g = torch.randn_like(ref)
    y, gx, gw, gb = _run(x, w, b, args, cfg, g)
    qa, qw, qg = qmax(cfg.act_bits), qmax(cfg.weight_bits), qmax(cfg.grad_bits)
    xq, sx = quantize_along(x, qa, None)  # per-tensor step
    wq, sw = quantize_along(w, qw, 0)  # per-output-channel step
    sw4 = sw.reshape(1, -1, 1, 1)
    ones_x, ones_w, ones_g = torch.ones_like(x), torch.ones_like(w), torch.ones_like(g)

    # forward: sum over the receptive field of |x| sw/2 + |w| sx/2 + sx sw/4 (padding is exact zero)
    bound = (
        F.conv2d(x.abs(), ones_w, None, *args) * sw4 / 2
        + F.conv2d(ones_x, w.abs(), None, *args) * sx / 2
        + F.conv2d(ones_x, ones_w, None, *args) * sx * sw4 / 4
    )
    slack = 1e-5 * (F.conv2d(x.abs(), w.abs(), None, *args) + 1)
    assert ((y - ref).abs() <= bound + slack).all()

    # grad_input = convT(g * sw + e, wq), |e| <= sg/2 with sg = max|g * sw| / qg (per layer)
    #           -> |err vs convT(g, w)| <= convT(|g| sw/2, 1) + sg/2 convT(1, |wq|)
    sg = (g.abs() * sw4).amax() / qg
    gx_ref = conv2d_input(x.shape, w, g, *args)
    bound_x = conv2d_input(x.shape, ones_w, g.abs() * sw4 / 2, *args) + sg / 2 * conv2d_input(
        x.shape, wq.abs().float(), ones_g, *args
    )
    slack_x = 1e-5 * (conv2d_input(x.shape, w.abs(), g.abs(), *args) + 1)
    assert ((gx - gx_ref).abs() <= bound_x + slack_x).all()

    # grad_weight = corr(g + e, x_hat), |e| <= sg_o/2 (per output channel), x_hat = x + dx, |dx| <= sx/2
    sgo = g.abs().amax(dim=(0, 2, 3)).reshape(-1, 1, 1, 1) / qg
    gw_ref = conv2d_weight(x, w.shape, g, *args)
    bound_w = conv2d_weight(ones_x * sx / 2, w.shape, g.abs(), *args) + sgo / 2 * conv2d_weight(
        xq.abs().float() * sx, w.shape, ones_g, *args
    )
    slack_w = 1e-5 * (conv2d_weight(x.abs(), w.shape, g.abs(), *args) + 1)
    assert ((gw - gw_ref).abs() <= bound_w + slack_w).all()
    torch.testing.assert_close(gb, g.sum((0, 2, 3)))


def _ints(shape, q, gen):
    return torch.randint(-q, q + 1, shape, dtype=torch.int8, generator=gen)


@pytest.mark.parametrize("case", CASES)
def test_fast_kernels_equal_reference_integers(case):
    """Unit scales: every kernel returns the integer sums themselves (< 2^24 here, exact in fp32)."""
    n, c, o, h, wd, k, s, p, d, grp = case
    from torch.nn.modules.utils import _pair

    st, pa, di = (list(_pair(v)) for v in (s, p, d))
    gen = torch.Generator().manual_seed(7)
    qx, qw, qg = 63, 127, 127  # exact on every x86 CPU (7-bit shifted source)
    xq, wq = _ints((n, c, h, wd), qx, gen), _ints((o, c // grp, *k), qw, gen)
    one, ones = torch.ones(1), torch.ones(o)
    with hw.record_kernels() as ran:
        fwd = torch.ops.lq.int8_conv2d(xq, wq, one, ones, qx, qw, None, st, pa, di, grp)
    geometry = (xq.shape, wq.shape, st, pa, di, grp)
    assert ran == [f"int8_conv2d:{expected_conv_kernel('int8_conv2d', qx, qw, c // grp * k[0] * k[1], geometry)}"]
    assert torch.equal(fwd, K.conv2d_fwd_reference(xq, wq, one, ones, qx, qw, None, st, pa, di, grp))
    gq = _ints(tuple(fwd.shape), qg, gen)
    wq7 = _ints((o, c // grp, *k), 63, gen)  # grad_input: g is oneDNN's unsigned source (8-bit x 7-bit)
    with hw.record_kernels() as ran:
        gi = torch.ops.lq.int8_conv2d_grad_input(gq, wq7, one, qg, 63, list(xq.shape), st, pa, di, grp)
    op = "int8_conv2d_grad_input"
    assert ran == [f"{op}:{expected_conv_kernel(op, qg, 63, o // grp * k[0] * k[1], geometry)}"]
    assert torch.equal(gi, K.conv2d_grad_input_reference(gq, wq7, one, qg, 63, list(xq.shape), st, pa, di, grp))
    with hw.record_kernels() as ran:
        gw = torch.ops.lq.int8_conv2d_grad_weight(gq, xq, ones, one, qg, qx, list(wq.shape), st, pa, di, grp)
    op = "int8_conv2d_grad_weight"
    assert ran[0] == f"{op}:{expected_conv_kernel(op, qx, qg, 0, geometry)}"
    assert torch.equal(gw, K.conv2d_grad_weight_reference(gq, xq, ones, one, qg, qx, list(wq.shape), st, pa, di, grp))


@pytest.mark.parametrize("cfg_name", list(FAST_VS_REFERENCE))
def test_fast_path_matches_reference_path(cfg_name):
    cfg = FAST_VS_REFERENCE[cfg_name]
    torch.manual_seed(4)
    x, w, b = torch.randn(2, 8, 9, 9), torch.randn(8, 4, 3, 3), torch.randn(8)
    args = (2, 1, 1, 2)
    g = torch.randn_like(F.conv2d(x, w, b, *args))
    torch.manual_seed(11)  # the same stochastic-rounding noise for both paths
    with hw.record_kernels() as ran:
        fast = _run(x, w, b, args, cfg, g)
    qa, qw, qg = qmax(cfg.act_bits), qmax(cfg.weight_bits), qmax(cfg.grad_bits)
    geometry = (x.shape, w.shape, (2, 2), (1, 1), (1, 1), 2)
    assert f"int8_conv2d:{expected_conv_kernel('int8_conv2d', qa, qw, 4 * 9, geometry)}" in ran
    assert f"int8_conv2d_grad_input:{expected_conv_kernel('int8_conv2d_grad_input', qg, qw, 4 * 9, geometry)}" in ran
    assert f"int8_conv2d_grad_weight:{expected_conv_kernel('int8_conv2d_grad_weight', qa, qg, 0, geometry)}" in ran
    torch.manual_seed(11)
    ref = _run(x, w, b, args, replace(cfg, use_fast_kernels=False), g)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-5)


def test_grad_weight_int32_overflow_worst_case():
    """All values at the extremes, reduction N*H*W = 180,000. Without VNNI oneDNN accumulates the
    uint8-shifted gradient (127 + 128 = 255) * 63 * 180,000 = 2.9e9 > 2^31 before subtracting the zero
    point; only the chunked reduction keeps it exact (with VNNI: 127 * 63 * 180,000 = 1.4e9, one chunk)."""
    x = torch.full((2, 1, 300, 300), 63, dtype=torch.int8)
    for g_val in (127, -127):
        g = torch.full((2, 1, 300, 300), g_val, dtype=torch.int8)
        one = torch.ones(1)
        out = torch.ops.lq.int8_conv2d_grad_weight(g, x, one, one, 127, 63, [1, 1, 1, 1], [1, 1], [0, 0], [1, 1], 1)
        torch.testing.assert_close(out, torch.full((1, 1, 1, 1), float(g_val * 63 * 180_000)), rtol=1e-6, atol=0)


def test_reference_backward_equals_autograd_of_dequantized_computation():
    cfg = Int8ComputeConfig(quantize_grad=False, use_fast_kernels=False)
    torch.manual_seed(5)
    x, w = torch.randn(2, 4, 7, 7), torch.randn(6, 2, 3, 3)
    args = (2, 1, 1, 2)
    g = torch.randn_like(F.conv2d(x, w, None, *args))
    y, gx, gw, _ = _run(x, w, torch.zeros(6), args, cfg, g)
    xq, sx = quantize_along(x, 127, None)
    wq, sw = quantize_along(w, 127, 0)
    x64 = (xq.double() * sx.double()).requires_grad_()
    w64 = (wq.double() * sw.double().reshape(-1, 1, 1, 1)).requires_grad_()
    y64 = F.conv2d(x64, w64, None, *args)
    y64.backward(g.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx.double(), x64.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw.double(), w64.grad, rtol=1e-6, atol=1e-6)


def test_saved_activation_memory_is_int8():
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = int8_conv2d(x, w, padding=1, config=CONFIGS["7bit"])
    act = sum(t.numel() * t.element_size() for t in saved if t.dim() == 4 and t.shape[0] == 8)
    assert act <= 0.35 * x.numel() * 4
    assert not any(t.dtype.is_floating_point and t.numel() == x.numel() for t in saved)
    y.sum().backward()


def test_nan_gradient_error_names_layer():
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    y = int8_conv2d(x, w, name="backbone.layer1.0.conv1")
    g = torch.zeros_like(y)
    g[0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"backbone\.layer1\.0\.conv1"):
        y.backward(g)


def test_fallback_warning_fires_once(monkeypatch):
    monkeypatch.setattr(hw, "u8s8_exact", lambda u, s: False)
    monkeypatch.setenv("LQ_NATIVE", "0")  # (a CPU without VNNI has no tile unit either, which would take the conv)
    hw.reset_warnings()
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = int8_conv2d(x, w, padding=1)
        b = int8_conv2d(x, w, padding=1)
    assert len([r for r in rec if "lq::int8_conv2d:" in str(r.message)]) == 1
    torch.testing.assert_close(a, b)
    hw.reset_warnings()


def test_argument_errors():
    with pytest.raises(ValueError, match="string padding"):
        int8_conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), padding="same")
    with pytest.raises(ValueError, match="groups"):
        int8_conv2d(torch.randn(1, 4, 5, 5), torch.randn(3, 2, 3, 3), groups=2)


def test_plain_eager_calls_the_cpu_kernels_and_equals_the_ops(monkeypatch):
    """In plain eager use int8_conv2d calls its ops' CPU kernels directly (no custom-op dispatch); under a torch
    function mode (what tracers install) its forward goes through the op. Same outputs, gradients and kernels
    either way (stochastic rounding drawn from the same seed)."""
    from torch.overrides import TorchFunctionMode

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def step():
        torch.manual_seed(3)
        x = torch.randn(4, 16, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(32, 16, 3, 3, requires_grad=True)
        y = int8_conv2d(x, w, None, 2, 1, config=Int8ComputeConfig.for_this_machine(), name="c")
        y.backward(torch.randn_like(y))
        return y.detach(), x.grad, w.grad

    import lq.ops.int8_conv as conv_module

    seen = []

    def recording(*tensors):
        seen.append(conv_module.__dict__["_plain"](*tensors))
        return seen[-1]

    monkeypatch.setitem(conv_module.__dict__, "_plain", conv_module.plain_cpu_eager)
    monkeypatch.setattr(conv_module, "plain_cpu_eager", recording)
    with hw.record_kernels() as direct_ran:
        direct = step()
    assert seen == [True] * 3
    seen.clear()
    with Passthrough(), hw.record_kernels() as op_ran:
        through_ops = step()
    assert seen[0] is False and direct_ran == op_ran  # (the mode is not active in autograd's backward calls)
    for a, b in zip(direct, through_ops):
        assert torch.equal(a, b)
