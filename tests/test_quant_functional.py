"""The quantization math against the paper's equations, on hand-computed cases (Wu et al. 2020, Sec. 3)."""

import pytest
import torch

from lq.quant import functional as F


def test_scale_eq6_and_quantize_eq7_hand_values():
    # eq. 6: s = (2^(b-1) - 1) / alpha = 127 / 2 = 63.5
    s = F.scale_from_amax(torch.tensor(2.0), bits=8)
    assert s.item() == pytest.approx(63.5)
    x = torch.tensor([0.5, -0.5, 1.9, 2.0, 3.0, -3.0, 0.0])
    # eq. 7: clip(round(63.5 x), -127, 127): 31.75->32, -31.75->-32, 120.65->121, 127, clip 190.5->127, -127 (not -128)
    q = F.quantize(x, s, bits=8)
    assert q.dtype == torch.int8
    assert q.tolist() == [32, -32, 121, 127, 127, -127, 0]
    # eq. 8: x_hat = x_q / s
    assert F.dequantize(q, s)[0].item() == pytest.approx(32 / 63.5)


def test_low_bit_range():
    # 4 bits: range [-7, 7]; alpha = 1 -> s = 7
    q = F.quantize(torch.tensor([0.3, -1.5, 0.99]), F.scale_from_amax(torch.tensor(1.0), 4), bits=4)
    assert q.tolist() == [2, -7, 7]  # 2.1 -> 2, clip, 6.93 -> 7
    assert F.qmax(4) == 7 and F.qmax(16) == 32767


def test_affine_eq1_eq2_eq4_eq5():
    # range [beta, alpha] = [-1, 2], b = 8: s = 255 / 3 = 85, z = -round(-1 * 85) - 128 = -43
    s, z = F.affine_params(torch.tensor(-1.0), torch.tensor(2.0), bits=8)
    assert s.item() == pytest.approx(85.0)
    assert z.item() == -43
    q = F.quantize(torch.tensor([0.0, 2.0, -1.0, 5.0, 0.1]), s, bits=8, z=z)
    # eq. 4: clip(round(85 x - 43), -128, 127): 0 -> -43, 2 -> 127, -1 -> -128, clip, 8.5-43 = -34.5 -> -34 (half to even)
    assert q.tolist() == [-43, 127, -128, 127, -34]
    # eq. 5: (x_q - z) / s ; real zero is exact
    assert F.dequantize(torch.tensor([-43]), s, z).item() == 0.0
    # 0.13 * 85 = 11.05 -> 11 levels above zero (no tie: torch rounds s*x before adding z)
    fq = F.fake_quant_affine(torch.tensor([0.0, 0.13, 3.0]), torch.tensor(-1.0), torch.tensor(2.0))
    assert fq.tolist() == pytest.approx([0.0, 11 / 85, 170 / 85])


def test_fake_quant_is_eq12_dequantize_of_quantize():
    torch.manual_seed(0)
    x = torch.randn(1000) * 3
    amax = torch.tensor(2.5)
    s = 127 / 2.5
    expected = torch.clamp(torch.round(x * s), -127, 127) / s  # eq. 7 then eq. 8, written out
    assert torch.allclose(F.fake_quant(x, amax), expected, atol=1e-6)
    assert F.fake_quant(torch.tensor([0.3]), torch.tensor(1.0)).item() == pytest.approx(38 / 127)


def test_ste_eq13_gradient_one_inside_zero_outside():
    x = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.7, 1.0, 1.5], requires_grad=True)
    F.fake_quant(x, torch.tensor(1.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_per_channel_matches_per_tensor_on_each_slice(axis):
    torch.manual_seed(axis + 5)
    x = torch.randn(3, 4, 5) * torch.arange(1, 6).float()
    n = x.shape[axis]
    amax = x.abs().amax(dim=[d for d in range(3) if d != axis % 3])
    assert amax.numel() == n
    out = F.fake_quant(x, amax, axis=axis)
    for c in range(n):
        sl = x.select(axis, c)
        s = 127 / amax[c]
        ref = torch.clamp(torch.round(sl * s), -127, 127) / s
        assert torch.allclose(out.select(axis, c), ref, atol=1e-6)
    # the per-channel max of each slice is representable exactly
    assert torch.allclose(out.abs().amax(dim=[d for d in range(3) if d != axis % 3]), amax)


def test_all_zero_tensor_and_zero_amax_are_finite():
    x = torch.zeros(10, requires_grad=True)
    y = F.fake_quant(x, torch.tensor(0.0))
    y.sum().backward()
    assert torch.equal(y, torch.zeros(10)) and torch.isfinite(x.grad).all()
    assert torch.isfinite(F.scale_from_amax(torch.tensor(0.0)))
    assert F.quantize(torch.zeros(3), F.scale_from_amax(torch.tensor(0.0))).tolist() == [0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_inputs(dtype):
    x = torch.linspace(-2, 2, 101).to(dtype)
    y = F.fake_quant(x, torch.tensor(1.0))
    assert y.dtype == dtype
    ref = torch.clamp(torch.round(x.float() * 127), -127, 127) / 127
    assert torch.allclose(y.float(), ref, atol=1e-2)


@pytest.mark.parametrize("bits", [1, 17, 0, 8.0, True, "8"])
def test_bits_validation(bits):
    with pytest.raises(ValueError, match="bits"):
        F.qmax(bits)


def test_learned_range_gradient_pact_for_clipped_values():
    # PACT: d x_hat / d alpha = sign(x) for |x| > alpha, so 5 values above alpha give +5, 2 below give -2
    x = torch.tensor([3.0, 4.0, 5.0, 6.0, 7.0, -3.0, -9.0])
    amax = torch.tensor(2.0, requires_grad=True)
    y = F.fake_quant_learned_range(x, amax)
    assert torch.allclose(y, torch.clamp(x, -2, 2))
    y.sum().backward()
    assert amax.grad.item() == pytest.approx(3.0, abs=1e-4)


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_fake_quant_matches_torch_fused_kernel_values_and_eq13_gradient(axis, dtype):
    torch.manual_seed(3)
    x = (torch.randn(6, 5, 4) * 3).to(dtype).requires_grad_()
    amax = torch.tensor(2.0) if axis is None else torch.rand(x.shape[axis]) * 3 + 0.5
    step = amax / 127
    y = F.fake_quant(x, amax, axis=axis)
    y.backward(torch.ones_like(y))
    x2 = x.detach().clone().requires_grad_()
    if axis is None:
        ref = torch.fake_quantize_per_tensor_affine(x2, step.reshape(()), torch.zeros((), dtype=torch.int32), -127, 127)
    else:
        ref = torch.fake_quantize_per_channel_affine(x2, step, torch.zeros(step.shape, dtype=torch.int32), axis, -127, 127)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    # eq. 13: 1 on [-amax, amax], 0 outside. (torch's kernel masks on the *rounded* value, so it passes the
    # gradient up to half a step beyond amax; lq follows the paper.)
    a = amax if axis is None else amax.reshape([-1 if d == axis else 1 for d in range(3)])
    inside = (x.detach().float() >= -a) & (x.detach().float() <= a)
    torch.testing.assert_close(x.grad, inside.to(dtype), atol=0, rtol=0)


def test_cpu_fake_quant_compiled_equals_eager(monkeypatch):
    from lq.quant import fake_quant_cpu

    x = torch.randn(3, 7, 5) * 4
    step = torch.tensor(2.5 / 127)
    eager = fake_quant_cpu._forward_eager(x, 1 / step, step, 127)
    monkeypatch.setenv("LQ_COMPILE_FAKE_QUANT", "1")
    compiled = fake_quant_cpu._forward(x, 1 / step, step, 127)
    torch.testing.assert_close(compiled[0], eager[0], atol=0, rtol=0)
    assert torch.equal(compiled[1], eager[1])


def test_in_range_fake_quant_equals_masked_one_when_amax_is_the_max():
    """Dynamic max weights: amax = max |w| per channel, so the STE mask is all ones and the shortcut path
    (no mask) must give the same values and gradients as the general one."""
    from lq.quant.functional import fake_quant

    torch.manual_seed(3)
    w = torch.randn(8, 4, 3, 3)
    amax = w.abs().amax(dim=(1, 2, 3))
    a = w.clone().requires_grad_()
    b = w.clone().requires_grad_()
    ya = fake_quant(a, amax, 8, 0)
    yb = fake_quant(b, amax, 8, 0, in_range=True)
    assert torch.equal(ya, yb)
    g = torch.randn_like(w)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(b.grad, g)  # eq. 13: every |w| <= amax
    # The general path decides the range on w * (1 / step) in fp32, which can land a hair above qmax for
    # the element equal to amax; everywhere else both agree.
    at_max = w.abs() == amax.reshape(-1, 1, 1, 1)
    assert torch.equal(a.grad[~at_max], g[~at_max])
