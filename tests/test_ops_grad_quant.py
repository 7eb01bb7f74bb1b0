"""Zhu et al. 2020 gradient quantization: per-layer dynamic scale, direction-sensitive clipping,
deviation-counteractive learning-rate factor, NaN/Inf errors."""

from __future__ import annotations

import os

# Eager quantization kernels in tests: torch.compile of the fused kernels costs ~20 s per variant on a
# loaded 2-core machine; test_compiled_quantizers_match_eager covers the compiled path once.
os.environ.setdefault("LQ_COMPILE_QUANT", "0")

import math

import pytest
import torch

from lq.ops import GradDeviationTracker, deviation_lr_factor, quantize_grad
from lq.ops.grad_quant import direction_sensitive_clip_ratio

RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.1)


def _cos(g, r):
    deq = r.q.float() * (r.step if r.step.numel() == 1 else r.step.reshape(-1, 1))
    return torch.nn.functional.cosine_similarity(deq.reshape(1, -1), g.reshape(1, -1)).item()


def test_per_layer_dynamic_scale_without_clipping():
    g = torch.randn(64, 32) * 1e-4  # gradients are tiny: the scale follows the data, no calibration
    r = quantize_grad(g, 127, None, clip=False)
    assert r.q.dtype == torch.int8 and r.step.numel() == 1
    torch.testing.assert_close(r.step, g.abs().max().reshape(1) / 127)
    assert r.q.abs().max() == 127


def test_clipping_helps_heavy_tailed_gradients_and_is_skipped_for_uniform_ones():
    torch.manual_seed(0)
    heavy = torch.randn(256, 256) ** 3  # heavy tails: Zhu et al.'s "sharp and wide" gradient distribution
    for q in (127, 31, 7):
        r = quantize_grad(heavy, q, None, RATIOS, clip=True)
        assert r.ratio < 1.0
        unclipped = quantize_grad(heavy, q, None, clip=False)
        assert _cos(heavy, r) > _cos(heavy, unclipped)  # better on the full tensor, not only the estimate
        assert abs(_cos(heavy, r) - r.cos) < 1e-4  # the search scores the whole tensor
    uniform = torch.rand(256, 256) * 2 - 1
    assert quantize_grad(uniform, 127, None, RATIOS, clip=True).ratio == 1.0


def test_periodic_clip_search_reuses_the_ratio_between_searches():
    """every=3 with a layer's state dict: search on calls 1, 4, 7; in between the chosen ratio is reused while
    the scale follows the current gradient's amax (Zhu et al.'s periodic clipping update)."""
    torch.manual_seed(2)
    heavy = torch.randn(128, 128) ** 3
    uniform = torch.rand(128, 128) * 2 - 1
    state: dict = {}
    first = quantize_grad(heavy, 127, None, RATIOS, name="fc", every=3, state=state)
    assert first.ratio < 1.0
    assert state == {"output gradient": [1, first.ratio]}
    for _ in range(2):  # a search would pick 1.0 for the uniform gradient; the stored ratio is reused
        r = quantize_grad(uniform, 127, None, RATIOS, name="fc", every=3, state=state)
        assert r.ratio == first.ratio
        torch.testing.assert_close(r.step, first.ratio * uniform.abs().max().reshape(1) / 127)
    assert quantize_grad(uniform, 127, None, RATIOS, name="fc", every=3, state=state).ratio == 1.0  # 4th: search
    other = quantize_grad(uniform, 127, None, RATIOS, name="fc", what="grad_weight", every=3, state=state)
    assert other.ratio == 1.0  # each gradient use of the layer has its own ratio
    assert quantize_grad(uniform, 127, None, RATIOS, name="fc", every=1, state=state).ratio == 1.0  # always search
    # Another layer object with the same name has its own dict: it searches (heavy -> < 1) while "fc" reuses 1.0.
    twin: dict = {}
    assert quantize_grad(heavy, 127, None, RATIOS, name="fc", every=3, state=twin).ratio == first.ratio
    assert quantize_grad(heavy, 127, None, RATIOS, name="fc", every=3, state=state).ratio == 1.0
    state.clear()  # what reset_clip_state(model) does to each layer's dict: the next call searches
    assert quantize_grad(uniform, 127, None, RATIOS, name="fc", every=3, state=state).ratio == 1.0
    with pytest.raises(ValueError, match="every"):
        quantize_grad(uniform, 127, None, RATIOS, name="fc", every=0)
    with pytest.raises(TypeError, match="state"):
        quantize_grad(uniform, 127, None, RATIOS, name="fc", every=3, state=[1, 0.5])


def test_periodic_clip_search_without_state_searches_every_call_and_warns_once(monkeypatch):
    """No state dict (a functional call): nowhere to keep a ratio, so every call searches (exact), with one
    warning per process that names the op."""
    from lq.ops import grad_quant

    monkeypatch.setattr(grad_quant, "_warned_no_state", False)
    torch.manual_seed(2)
    heavy = torch.randn(128, 128) ** 3
    uniform = torch.rand(128, 128) * 2 - 1
    with pytest.warns(UserWarning, match="'fc'.*searched on every call"):
        assert quantize_grad(heavy, 127, None, RATIOS, name="fc", every=3).ratio < 1.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call does not warn again
        assert quantize_grad(uniform, 127, None, RATIOS, name="fc", every=3).ratio == 1.0  # searched, not reused


def test_reset_clip_state_clears_one_models_layers():
    from torch import nn

    from lq.ops import reset_clip_state
    from lq.ops.grad_quant import layer_clip_state

    a, b = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
    layer_clip_state(a[0])["output gradient"] = [2, 0.5]
    layer_clip_state(b[0])["output gradient"] = [2, 0.5]
    assert layer_clip_state(a[0]) is layer_clip_state(a[0])  # one dict per layer object, kept
    reset_clip_state(a)
    assert layer_clip_state(a[0]) == {} and layer_clip_state(b[0]) == {"output gradient": [2, 0.5]}
    with pytest.warns(DeprecationWarning, match="per layer"):
        reset_clip_state()
    assert layer_clip_state(b[0]) == {"output gradient": [2, 0.5]}  # the no-argument form is a no-op
    with pytest.raises(TypeError, match="model"):
        reset_clip_state("a")


def test_clip_search_picks_the_best_candidate():
    torch.manual_seed(1)
    sample = torch.randn(4, 1000) ** 3
    amax = sample.abs().amax(1, keepdim=True)
    ratio, cos = direction_sensitive_clip_ratio(sample, amax, 127, RATIOS)
    for rr in RATIOS:  # brute force, one candidate at a time
        step = rr * amax / 127
        deq = torch.clamp(torch.round(sample / step), -127, 127) * step
        c = torch.nn.functional.cosine_similarity(deq.reshape(1, -1), sample.reshape(1, -1)).item()
        assert c <= cos + 1e-6
    assert ratio in RATIOS


def test_per_row_scale_and_zero_rows():
    g = torch.randn(10, 20)
    g[3] = 0.0
    r = quantize_grad(g, 127, 0, RATIOS, clip=True)
    assert r.step.shape == (10,) and torch.isfinite(r.step).all()
    assert (r.q[3] == 0).all()


def test_all_zero_gradient():
    r = quantize_grad(torch.zeros(5, 5), 127, None, RATIOS, clip=True)
    assert (r.q == 0).all() and r.ratio == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_raises_naming_layer(bad):
    g = torch.randn(4, 4)
    g[1, 2] = bad
    with pytest.raises(FloatingPointError, match="head.proj"):
        quantize_grad(g, 127, 1, name="head.proj")


def test_deviation_lr_factor():
    assert deviation_lr_factor(0.0) == 1.0
    assert deviation_lr_factor(0.01) == pytest.approx(math.exp(-0.2))
    assert deviation_lr_factor(1.0) == 0.1  # floor beta
    values = [deviation_lr_factor(d) for d in (0.0, 0.01, 0.05, 0.1, 0.5)]
    assert values == sorted(values, reverse=True)
    assert deviation_lr_factor(torch.tensor(0.02), alpha=10.0, beta=0.5) == pytest.approx(max(math.exp(-0.2), 0.5))
    with pytest.raises(ValueError):
        deviation_lr_factor(float("nan"))
    with pytest.raises(ValueError):
        deviation_lr_factor(0.1, beta=0.0)


def test_tracker_records_cosine_distance():
    g = torch.randn(32, 32)
    with GradDeviationTracker() as t:
        r = quantize_grad(g, 127, None, RATIOS, clip=True, name="l1")
    assert list(t.deviations) == ["l1:output gradient"]
    assert t.mean() == pytest.approx(1 - r.cos)
    quantize_grad(g, 127, None, RATIOS, clip=True, name="l2")  # outside the context: not recorded
    assert len(t.deviations) == 1


def test_stochastic_gradient_rounding_is_unbiased_and_stays_on_neighbouring_integers():
    """floor(g * s + u), u ~ U[0, 1): each value lands on one of its two neighbouring integers, with the
    probabilities that make the mean exact (E[q] = g * s), where round-to-nearest sends every |g * s| < 0.5
    to 0 (the bias that costs int8 training its accuracy, benchmarks/RESULTS.md)."""
    torch.manual_seed(0)
    g = torch.cat([torch.full((1,), 127.0), torch.linspace(-0.45, 0.45, 63)])  # amax 127 -> s = 1: y = g
    for noise in (True, "hash"):
        draws = torch.stack([quantize_grad(g, 127, None, clip=False, stochastic=noise).q.float() for _ in range(4000)])
        assert ((draws == torch.floor(g)) | (draws == torch.floor(g) + 1)).all()
        mean = draws.mean(0)
        # each mean is of 4000 Bernoulli draws: standard error <= 0.5 / sqrt(4000) ~ 0.008
        assert (mean - g).abs().max().item() < 0.04
    nearest = quantize_grad(g, 127, None, clip=False).q.float()
    assert nearest[1:].abs().max().item() == 0.0  # round-to-nearest: all of them 0


def test_stochastic_rounding_noise_is_uniform_independent_and_seeded():
    """lq.ops.fused.uniform_hash, the noise of stochastic rounding: U[0, 1) moments and histogram, no
    correlation between neighbouring elements or between two seeds, multiples of 2^-24 in [0, 1), the same
    noise for the same seed and torch.manual_seed."""
    from lq.ops.fused import uniform_hash

    like = torch.empty(400, 1000)
    u = uniform_hash(like, torch.tensor(12345)).reshape(-1)
    assert u.shape == (400_000,) and u.min().item() >= 0.0 and u.max().item() < 1.0
    assert torch.equal(u * (1 << 24), (u * (1 << 24)).round())
    # moments of U[0, 1): mean 1/2, variance 1/12 (standard errors 4.6e-4 and 1.3e-4 at 400k draws)
    assert abs(u.mean().item() - 0.5) < 3e-3 and abs(u.var().item() - 1 / 12) < 1e-3
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)  # 20k expected per bin, sd ~138
    assert (counts - 20_000).abs().max().item() < 1_000
    lag = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()
    other = uniform_hash(like, torch.tensor(12346)).reshape(-1)
    across = torch.corrcoef(torch.stack([u, other]))[0, 1].item()
    assert abs(lag) < 0.01 and abs(across) < 0.01  # sd of a correlation at 400k: 0.0016
    assert torch.equal(uniform_hash(like, torch.tensor(12345)).reshape(-1), u)
    # a channels-last tensor takes the counters in memory order: the same values, permuted
    plain = torch.empty(8, 16, 10, 10)
    cl = plain.contiguous(memory_format=torch.channels_last)
    a, b = uniform_hash(plain, torch.tensor(7)), uniform_hash(cl, torch.tensor(7))
    assert not torch.equal(a, b) and torch.equal(a.reshape(-1).sort().values, b.reshape(-1).sort().values)
    g = torch.randn(64, 32)
    for noise in (True, "hash"):  # grad_rounding "stochastic" (noise_bits) and "stochastic_hash"
        torch.manual_seed(3)
        a = quantize_grad(g, 127, None, clip=False, stochastic=noise).q
        torch.manual_seed(3)
        assert torch.equal(quantize_grad(g, 127, None, clip=False, stochastic=noise).q, a)
        assert not torch.equal(quantize_grad(g, 127, None, clip=False, stochastic=noise).q, a)  # a new draw
        assert ((a.float() - g * 127 / g.abs().max()).abs() < 1).all()  # a neighbouring integer


def test_stochastic_rounding_bits_are_uniform_and_bound_the_bias():
    """lq.ops.fused.noise_bits, the default noise of stochastic rounding (one random byte per element, on CPU a
    window of a fixed table of random bytes at an offset drawn from torch's generator, and a level shift per
    call): u = frac(b / 128 + shift) takes the 128 bin midpoints of [0, 1) equally often, so E[floor(y + u)] =
    floor(y) + frac(y) rounded to a multiple of 1/128 (worked out here over the 128 values, not from the
    kernel): within 1/256 of a step of y."""
    from lq.ops.fused import NOISE_BITS, _uniform_from_bits, noise_bits, quantize_with_scale

    torch.manual_seed(0)
    like = torch.empty(640, 1000)
    b, shift = noise_bits(like)
    assert b.shape == like.shape and b.dtype == torch.int8 and shift.shape == () and shift.dtype == torch.float32
    u = _uniform_from_bits(b, shift).reshape(-1)
    k = u * (1 << NOISE_BITS) - 0.5
    assert torch.equal(k, k.round()) and k.min().item() == 0 and k.max().item() == (1 << NOISE_BITS) - 1
    counts = torch.bincount(k.long(), minlength=128).float()  # 5000 expected per value, sd ~70
    assert (counts - 5000).abs().max().item() < 400
    for lag in (1, 2, 3, 4, 7, 8, 9):  # neighbours share one 64-bit draw for lags 1-7
        assert abs(torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1].item()) < 0.01
    # the exact expectation over the 128 equally likely u, from the definition: within 1/256 of y
    ys = torch.linspace(-3, 3, 1201, dtype=torch.float64)
    us = (torch.arange(128, dtype=torch.float64) + 0.5) / 128
    expected = torch.floor(ys[:, None] + us[None, :]).mean(1)
    assert (expected - ys).abs().max().item() <= 1 / 256 + 1e-12
    # the kernel's rounding, 4M draws per value (standard error <= 2.5e-4), matches that expectation and not
    # y itself where the two differ: y = 0.3 -> 38/128 = 0.2969 (a U[0, 1) noise would give 0.3000)
    for y_val, mean in ((0.3, 38 / 128), (-1.3, -2 + 90 / 128), (2.001, 2.0), (0.999, 1.0), (0.5, 0.5)):
        q = quantize_with_scale(torch.full((2000, 2000), y_val), torch.ones(1), 127, None, stochastic=True).float()
        assert set(q.unique().tolist()) == {math.floor(y_val), math.floor(y_val) + 1} or y_val in (2.001, 0.999)
        assert abs(q.mean().item() - mean) < 1.2e-3, (y_val, q.mean().item(), mean)
    # channels-last: bits in memory order (a sequential read in the kernel), same draws for the same seed
    cl = torch.empty(8, 16, 10, 10).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(5)
    a, shift_a = noise_bits(cl)
    torch.manual_seed(5)
    plain, shift_plain = noise_bits(torch.empty(8, 16, 10, 10))
    assert torch.equal(a.permute(0, 2, 3, 1).reshape(-1), plain.reshape(-1)) and torch.equal(shift_a, shift_plain)


def test_noise_level_bias_is_not_shared_by_elements_64_bytes_apart():
    """The noise table's windows start at multiples of 64 bytes, so without the per-call level shift each
    element's noise over many calls would follow the table bytes at its position modulo 64: a rounding bias
    per gradient column (most widths are multiples of 64) that two independent runs would share (a review
    measured a correlation of 0.5 between two seeds' per-column biases). With the shift an element's level is
    uniform on every call: the per-column biases of two seeds are uncorrelated (sd of the correlation at
    1024 columns: 0.03), and each is within sampling error of zero."""
    from lq.ops import fused

    def column_bias(seed: int, rows: int = 512, cols: int = 1024, calls: int = 400) -> torch.Tensor:
        torch.manual_seed(seed)
        acc = torch.zeros(cols, dtype=torch.float64)
        for _ in range(calls):
            u = fused._uniform_from_bits(*fused.noise_bits(torch.empty(rows, cols)))
            acc += torch.floor(0.5 + u).double().sum(0)
        return acc / (rows * calls) - 0.5

    a, b = column_bias(1), column_bias(2)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.15
    assert a.abs().max().item() < 6 * (0.25 / (512 * 400)) ** 0.5  # 6 sd of a Bernoulli(1/2) mean


def test_grad_rounding_option_validated_and_used_by_the_ops():
    from lq.ops import Int8ComputeConfig, int8_linear

    with pytest.raises(ValueError, match="grad_rounding"):
        Int8ComputeConfig(grad_rounding="up")
    torch.manual_seed(1)
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    g = torch.randn(8, 4) * 1e-3
    g[0, 0] = 1.0  # one large entry: the rest sit far below one quantization step
    grads = []
    for rounding in ("nearest", "stochastic", "stochastic", "stochastic_hash", "stochastic_hash"):
        cfg = Int8ComputeConfig(grad_clip=False, grad_rounding=rounding, grad_granularity="tensor")
        xi = x.clone().requires_grad_()
        int8_linear(xi, w, None, cfg).backward(g)
        grads.append(xi.grad)
    assert not torch.equal(grads[1], grads[2]) and not torch.equal(grads[3], grads[4])  # random draws differ
    assert not torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[3])


def test_sample_selection_of_a_channels_last_gradient_equals_index_select():
    """The clip search's samples (whole batch samples or channels) are picked from a channels-last gradient's
    NHWC view: the same values in the same (row-major) layout as ``index_select``, which copies the whole
    tensor first."""
    from lq.ops.grad_quant import _index_select

    g = torch.randn(6, 5, 4, 3).contiguous(memory_format=torch.channels_last)
    for dim, index in ((0, torch.tensor([0, 2, 5])), (1, torch.tensor([1, 4])), (2, torch.tensor([3])), (3, torch.tensor([0, 2]))):
        ours, ref = _index_select(g, dim, index), g.index_select(dim, index)
        assert torch.equal(ours, ref) and ours.stride() == ref.stride()
    plain = torch.randn(6, 5)
    assert torch.equal(_index_select(plain, 1, torch.tensor([0, 3])), plain[:, [0, 3]])


def test_empty_tensors_quantize_without_disabling_the_compiled_kernels():
    """An empty batch has no amax (a max over nothing): the step is the smallest scale's (amax 0, or the
    calibrated amax), the int8 tensor empty; nothing reaches the compiled kernels, whose failure would have
    switched them to eager ops for the rest of the process."""
    from lq.ops import fused
    from lq.ops.quantize import quantize_along

    for axis in (None, 0, 1):
        r = quantize_grad(torch.empty(0, 4), 127, axis, RATIOS, clip=True, name="fc")
        n = 1 if axis is None else (0, 4)[axis]
        assert r.q.shape == (0, 4) and r.q.dtype == torch.int8 and r.step.shape == (n,) and r.ratio == 1.0
        q, step = quantize_along(torch.empty(0, 4), 127, axis)
        assert q.shape == (0, 4) and step.shape == (n,)
    failed_before = set(fused._failed)
    _, step = quantize_along(torch.empty(0, 4), 127, None, amax=torch.tensor(2.54))
    torch.testing.assert_close(step, torch.tensor([0.02]))
    for axis in (None, 1):
        quantize_grad(torch.empty(0, 4), 127, axis, RATIOS, clip=True, name="fc")
    assert fused._failed == failed_before


@pytest.mark.parametrize(("shape", "axis"), [((64, 16, 9, 9), None), ((64, 16, 9, 9), 1), ((300, 40), 0)])
def test_fused_gradient_quantization_equals_the_step_by_step_ops(shape, axis, monkeypatch):
    """quantize_grad's single compiled call (amax, cosines of every candidate, the best ratio, scale, rounding)
    gives the integers, step and ratio of the separate eager ops it fuses, bit for bit: amax_along, the
    clip-cosine search, scale_from_amax and quantize_with_scale (nearest rounding, so no noise is involved)."""
    from lq.ops import fused
    from lq.ops.grad_quant import _clip_cosines, _leading_slices, _slice_sample, _tensor_clip_cosines

    torch.manual_seed(7)
    g = torch.randn(shape) * torch.rand(shape[1]).reshape([1, -1] + [1] * (len(shape) - 2))
    g[0, 0] = 40.0  # an outlier that makes clipping pay
    if len(shape) == 4:
        g = g.contiguous(memory_format=torch.channels_last)
    mult = torch.rand([1, shape[1]] + [1] * (len(shape) - 2)) + 0.5 if axis != 1 else None
    monkeypatch.setenv("LQ_COMPILE_QUANT", "1")
    failed_before = set(fused._failed)
    r = quantize_grad(g, 127, axis, RATIOS, clip=True, num_samples=2048, mult=mult)
    assert fused._failed == failed_before  # it ran compiled
    monkeypatch.setenv("LQ_COMPILE_QUANT", "0")
    amax = fused.amax_along(g, axis, mult)
    ratios = torch.tensor(RATIOS)
    if axis is None:
        gs, ms = _leading_slices(g, mult, 2048 * 16)
        cos = _tensor_clip_cosines(gs, ms, amax, ratios, 127)
    else:
        sample, sel = _slice_sample(g, axis, 2048, mult)
        cos = _clip_cosines(sample, amax[sel].reshape(-1, 1), ratios.reshape(-1, 1, 1), 127)
    ratio = RATIOS[int(torch.argmax(cos))]
    s = fused.scale_from_amax(amax * ratio, 127)
    assert r.ratio == ratio
    assert torch.equal(r.q, fused.quantize_with_scale(g, s, 127, axis, mult))
    assert torch.equal(r.step, 1.0 / s)


def test_random_bytes_are_reproducible_windows_of_a_fixed_table():
    """lq.ops.fused.random_bytes on CPU: a window of the noise table at an offset drawn from torch's generator
    (64-byte steps, so compiled kernels get aligned inputs). Reproduces under torch.manual_seed and for a seed;
    every 7-bit value (what the noise uses) about equally often within a call; the table is one fixed stream
    (lengthening keeps its bytes); and at a fixed element, over all 2^18 offsets, the noise levels' cumulative
    frequencies stay within 0.6% of uniform (the Kolmogorov-Smirnov 6-sd bound is 6 * sqrt(1/4 / 2^18) =
    0.59%), which bounds that element's rounding bias."""
    from lq.ops import fused

    cpu = torch.device("cpu")
    for n in (1000, 1 << 18):
        torch.manual_seed(11)
        a = fused.random_bytes(n, cpu)
        torch.manual_seed(11)
        b = fused.random_bytes(n, cpu)
        assert a.dtype == torch.int8 and a.shape == (n,) and torch.equal(a, b)
        assert not torch.equal(a, fused.random_bytes(n, cpu))  # the generator moved on
        assert a.data_ptr() % 64 == fused.noise_pool(n).data_ptr() % 64
        assert torch.equal(fused.random_bytes(n, cpu, seed=77), fused.random_bytes(n, cpu, seed=77))
        counts = torch.bincount((a.long() & 127), minlength=128).float()
        expected = n / 128
        assert (counts - expected).abs().max().item() < 6 * expected**0.5  # 6 sd
    table = fused.noise_pool(0).clone()
    longer = fused.noise_pool(table.numel())  # lengthened: the same bytes first
    assert longer.numel() > table.numel() and torch.equal(longer[: table.numel()], table)
    span = 64 * fused.POOL_WINDOWS
    for i in (0, 1, 63, 1000, 123457):
        levels = table[i : i + span : 64].long() & 127
        freq = torch.bincount(levels, minlength=128).double() / fused.POOL_WINDOWS
        deviation = (freq.cumsum(0) - torch.arange(1, 129).double() / 128).abs().max().item()
        assert deviation < 0.0059


@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_grad_pair_equals_two_quantize_grad_calls(stochastic: bool, monkeypatch) -> None:
    """quantize_grad_pair (both backward products' operands of one gradient): bit for bit the results of two
    quantize_grad calls, the same periodic-search decisions and state, and one compiled call on the steps where
    neither searches its clip (the searching steps make one call each, or none where the C search scores them)."""
    from lq.ops import fused, native_quant
    from lq.ops.grad_quant import GradOperand, quantize_grad_pair

    torch.manual_seed(21)
    w_step = torch.rand(1, 48) + 0.5
    x_step = torch.rand(64, 1) + 0.5
    a = GradOperand(0, w_step, "output gradient (grad_input GEMM)")
    b = GradOperand(1, x_step, "output gradient (grad_weight GEMM)")
    ratios = (1.0, 0.8, 0.6, 0.4)
    paired, single = {}, {}
    names = []
    real_call = fused.call

    def spy(name, fn, *args):
        names.append(name)
        return real_call(name, fn, *args)

    monkeypatch.setattr(fused, "call", spy)
    for step in range(6):
        g = torch.randn(64, 48) ** 3  # heavy tails at 3 bits: a ratio below 1 wins the search
        torch.manual_seed(100 + step)
        names.clear()
        got = quantize_grad_pair(g, 3, a, b, ratios, True, 16384, "fc", every=4, state=paired, stochastic=stochastic)
        pair_names = list(names)
        torch.manual_seed(100 + step)
        want = [quantize_grad(g, 3, op.axis, ratios, True, 16384, "fc", op.what, op.mult, every=4, state=single,
                              stochastic=stochastic) for op in (a, b)]
        for r, w in zip(got, want):
            assert torch.equal(r.q, w.q) and torch.equal(r.step, w.step) and r.ratio == w.ratio
        assert paired == single
        searched = step % 4 == 0
        # (between searches one call: the C kernel's where it is built, else the compiled pair; searching steps score
        # the candidates in C where it is built, else one compiled search each)
        built = native_quant.library() is not None
        paired_call = [] if built else ["grad_quant_fixed_pair"]
        assert pair_names == (([] if built else ["grad_quant_search"] * 2) if searched else paired_call)
    assert any(ratio != 1.0 for _, ratio in paired.values())


def test_quantize_grad_pair_does_not_recompile_when_its_two_operands_coincide(monkeypatch) -> None:
    """Equal level shifts or ratios of the two operands are one cached tensor object; Dynamo guards on inputs
    being the same object, so the paired graph compiled again the first time two coincided (1 call in 128 for
    the shifts; a review found it). The pair passes no tensor twice."""
    import torch._dynamo.utils as dynamo_utils

    from lq.ops import fused
    from lq.ops.grad_quant import GradOperand, quantize_grad_pair

    monkeypatch.setenv("LQ_COMPILE_QUANT", "1")
    monkeypatch.setenv("LQ_NATIVE", "0")  # (the compiled pair, not the C kernel)
    real = fused.noise_bits
    coincide = {"on": False}

    def noise(like):
        bits, shift = real(like)
        return bits, (fused._shift(5, like.device) if coincide["on"] else shift)

    monkeypatch.setattr(fused, "noise_bits", noise)
    torch.manual_seed(22)
    g = torch.randn(48, 40)
    a = GradOperand(0, torch.rand(1, 40) + 0.5, "a (recompile test)")
    b = GradOperand(1, torch.rand(48, 1) + 0.5, "b (recompile test)")
    quantize_grad_pair(g, 127, a, b, stochastic=True)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    coincide["on"] = True
    for _ in range(2):
        quantize_grad_pair(g, 127, a, b, stochastic=True)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("layout", ["channels-last", "row-major"])
@pytest.mark.parametrize("shape", [(64, 16, 28, 28), (3, 5, 7, 9), (40, 24, 10, 10), (2, 130, 5, 3)])
def test_convolution_clip_search_in_c_matches_the_compiled_search(shape, layout, monkeypatch) -> None:
    """A convolution's gradient operands on CPU score their clip candidates in C (``lq_grad_conv_search``): the same
    sample (whole images per layer, whole channels per channel), amax and cosines as the compiled search to within
    float rounding of the sums, so the same ratio (on gradients whose best candidates differ by more than that),
    the same integers and steps after the same noise draws, and the tracker gets the same cosine distance."""
    from lq.ops import grad_quant as gq
    from lq.ops import native_quant

    if native_quant.library() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(shape[1])
    g = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).pow(6) * 10  # heavy tails: clipping pays
    if layout == "channels-last":
        g = g.contiguous(memory_format=torch.channels_last)
    mult = torch.rand(1, shape[1], 1, 1, generator=gen) + 0.5
    calls = []
    native = gq._search_native
    monkeypatch.setattr(gq, "_search_native", lambda *a: calls.append(1) or native(*a))
    results = {}
    for way in ("c", "compiled"):
        if way == "compiled":
            monkeypatch.setattr(gq, "_search_native", lambda *a: None)
        torch.manual_seed(0)
        with GradDeviationTracker() as tracker:
            a = quantize_grad(g, 127, None, RATIOS, mult=mult, stochastic=True, name="conv", what="x")
            b = quantize_grad(g, 127, 1, RATIOS, stochastic=True, name="conv", what="w")
        results[way] = (a, b, tracker.deviations)
    assert len(calls) == 2  # both operands scored in C on the first pass
    for c_res, t_res in zip(results["c"][:2], results["compiled"][:2]):
        assert c_res.ratio == t_res.ratio
        assert abs(c_res.cos - t_res.cos) < 1e-6
        assert torch.equal(c_res.q, t_res.q) and torch.equal(c_res.step, t_res.step)
    for key, devs in results["c"][2].items():
        assert devs == pytest.approx(results["compiled"][2][key], abs=1e-6)
    if g.numel() > 10000:  # (on the larger gradients clipping pays: a search that chose something)
        assert results["c"][0].ratio < 1.0 or results["c"][1].ratio < 1.0


def test_convolution_clip_search_in_c_raises_on_non_finite_gradients() -> None:
    g = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    g[2, 3, 1, 1] = float("nan")
    for axis, mult in ((None, torch.ones(1, 8, 1, 1)), (1, None)):
        with pytest.raises(FloatingPointError, match="layer 'conv3'"):
            quantize_grad(g, 127, axis, RATIOS, mult=mult, name="conv3")


@pytest.mark.parametrize("shape", [(64, 10), (1024, 256), (2000, 33)])
@pytest.mark.parametrize("axis", [0, 1])
def test_linear_clip_search_in_c_matches_the_compiled_search(shape, axis, monkeypatch) -> None:
    """A Linear's per-row (grad_input's) and per-column (grad_weight's) operands score their candidates in C too
    (``lq_grad_rows_search``): the same whole rows / columns and per-slice amax as the compiled search, the same
    ratio, integers and steps after the same noise draws."""
    from lq.ops import grad_quant as gq
    from lq.ops import native_quant

    if native_quant.library() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(shape[0] + axis)
    g = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).pow(6) * 10
    mult = torch.rand((1, shape[1]) if axis == 0 else (shape[0], 1), generator=gen) + 0.5
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(gq, "_search_native", lambda *a: None)
        torch.manual_seed(0)
        results.append(quantize_grad(g, 127, axis, RATIOS, mult=mult, stochastic=True, name="fc"))
    c_res, t_res = results
    assert c_res.ratio == t_res.ratio and abs(c_res.cos - t_res.cos) < 1e-6
    assert torch.equal(c_res.q, t_res.q) and torch.equal(c_res.step, t_res.step)


def test_clip_search_in_c_keeps_the_least_clipping_on_ties() -> None:
    """Slices of one element score every candidate 1 (each element is its own amax): the C search keeps the first
    candidate (no clipping) instead of following the sums' last-bit rounding (the compiled fp32 search picked 0.9 on
    such a gradient), and a non-finite value raises naming the layer."""
    g = torch.randn(300, 1)
    assert quantize_grad(g, 127, 0, RATIOS).ratio == 1.0
    g[7, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="layer 'fc7'"):
        quantize_grad(g, 127, 0, RATIOS, name="fc7")


def test_clip_search_in_c_with_overflowing_squares_picks_as_the_compiled_search(monkeypatch) -> None:
    """Gradients beyond ~1e19 overflow fp32 squares, so some cosines are NaN: the C search then picks the first NaN
    candidate as ``torch.argmax`` does in the compiled search (review finding), the same ratio and step."""
    from lq.ops import grad_quant as gq

    g = torch.zeros(2, 4, 3, 3)
    g[0, 0, 0, 0], g[1, 2, 1, 1] = 2e19, -1e19
    mult = torch.ones(1, 4, 1, 1)
    c_res = quantize_grad(g, 127, None, (0.5, 1.0), mult=mult, name="L")
    monkeypatch.setattr(gq, "_search_native", lambda *a: None)
    t_res = quantize_grad(g, 127, None, (0.5, 1.0), mult=mult, name="L")
    assert c_res.ratio == t_res.ratio and torch.equal(c_res.step, t_res.step)
