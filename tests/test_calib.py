"""Calibrators (lq.calib) against independent references: numpy maxima, histograms and percentiles,
brute-force KL (TensorRT's algorithm written as plain loops) and brute-force MSE over a grid of ranges."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch

from lq.calib import (
    Calibrator,
    HistogramCalibrator,
    MaxCalibrator,
    entropy_amax,
    kl_divergences,
    make_calibrator,
    mse_amax,
    mse_errors,
    percentile_amax,
)
from lq.quant.functional import fake_quant

B = 2048


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pow2_range(maxval: float) -> float:
    """Smallest power of two strictly above ``maxval`` (numpy, independent of the library)."""
    return float(np.ldexp(1.0, np.frexp(np.float64(maxval))[1]))


def np_hist(absx: np.ndarray, rng: float, bins: int = B) -> np.ndarray:
    return np.histogram(absx, bins=bins, range=(0.0, rng))[0]


# ------------------------------------------------------------------------------------------------ max
@pytest.mark.parametrize("axis", [None, 0, 1, -1, -3])
def test_max_streaming_matches_numpy(axis):
    g = gen(0)
    batches = [torch.randn(4, 6, 5, 7, generator=g) * s for s in (1.0, 3.0, 0.5)]
    batches[1][2, 3, 1, 4] = -50.0  # one large negative value: |x| matters
    cal = MaxCalibrator(axis=axis)
    for b in batches:
        cal.collect(b)
    # Streaming == one big batch (concatenate along a dim that is not the channel axis).
    cat_dim = 0 if axis not in (0, -4) else 1
    full = torch.cat(batches, dim=cat_dim).numpy()
    if axis is None:
        ref = np.abs(full).max()
        assert cal.compute_amax().shape == ()
    else:
        ax = axis % 4
        ref = np.abs(full).max(axis=tuple(d for d in range(4) if d != ax))
        assert cal.compute_amax().shape == (full.shape[ax],)
    amax = cal.compute_amax()
    assert amax.dtype == torch.float32
    np.testing.assert_array_equal(amax.numpy(), ref.astype(np.float32))
    # The histogram calibrator tracks the same true maximum exactly.
    hist = HistogramCalibrator(axis=axis)
    for b in batches:
        hist.collect(b)
    np.testing.assert_array_equal(hist.compute_amax("max").numpy(), ref.astype(np.float32))


def test_max_calibrator_rejects_histogram_methods():
    cal = MaxCalibrator()
    cal.collect(torch.ones(3))
    assert float(cal.compute_amax(method="max", bits=8)) == 1.0  # same keywords as the histogram accepted
    with pytest.raises(ValueError, match="HistogramCalibrator"):
        cal.compute_amax(method="entropy", bits=8)


# ---------------------------------------------------------------------------------------- histogram
def test_histogram_counts_match_numpy_histogram():
    x = torch.randn(50_000, generator=gen(1)) * 2.5
    cal = HistogramCalibrator()
    cal.collect(x)
    counts, rng = cal.histogram()
    absx = np.abs(x.numpy()).astype(np.float64)
    assert float(rng) == pow2_range(absx.max())
    np.testing.assert_array_equal(counts.numpy(), np_hist(absx, float(rng)))


def test_growing_range_preserves_counts():
    """Batches with increasing maxima == one batch binned at the final range."""
    g = gen(2)
    batches = [torch.randn(3000, generator=g) * s for s in (0.01, 0.3, 1.0, 7.0, 300.0)]
    streamed = HistogramCalibrator()
    for b in batches:
        streamed.collect(b)
    single = HistogramCalibrator()
    single.collect(torch.cat(batches))
    c_stream, r_stream = streamed.histogram()
    c_single, r_single = single.histogram()
    absx = np.abs(torch.cat(batches).numpy()).astype(np.float64)
    assert float(r_stream) == float(r_single) == pow2_range(absx.max())
    assert int(c_stream.sum()) == absx.size
    np.testing.assert_array_equal(c_stream.numpy(), c_single.numpy())
    np.testing.assert_array_equal(c_stream.numpy(), np_hist(absx, float(r_stream)))
    for p in (99.0, 99.9):
        assert float(streamed.compute_amax("percentile", percentile=p)) == float(
            single.compute_amax("percentile", percentile=p)
        )


def test_growing_range_per_channel_independent_ranges():
    """Per-channel ranges grow independently; every channel keeps its own power-of-two range."""
    g = gen(3)
    scales = torch.tensor([0.01, 1.0, 100.0])
    batches = [torch.randn(3, 400, generator=g) * scales[:, None] * f for f in (1.0, 5.0, 0.2, 40.0)]
    batches[2][0] *= 1000.0  # channel 0 grows in the third batch only
    cal = HistogramCalibrator(axis=0)
    for b in batches:
        cal.collect(b)
    counts, ranges = cal.histogram()
    full = np.abs(torch.cat(batches, dim=1).numpy()).astype(np.float64)
    for c in range(3):
        rng = pow2_range(full[c].max())
        assert float(ranges[c]) == rng
        np.testing.assert_array_equal(counts[c].numpy(), np_hist(full[c], rng))


# --------------------------------------------------------------------------------------- percentile
@pytest.mark.parametrize("dist", ["gauss", "laplace"])
@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_vs_numpy(dist, p):
    g = gen(4)
    if dist == "gauss":
        x = torch.randn(200_000, generator=g)
    else:
        u = torch.rand(200_000, generator=g, dtype=torch.float64) - 0.5
        x = (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()  # Laplace(0, 1) by inversion
    cal = HistogramCalibrator()
    for chunk in x.split(50_000):
        cal.collect(chunk)
    absx = np.abs(x.numpy()).astype(np.float64)
    width = pow2_range(absx.max()) / B
    got = float(cal.compute_amax("percentile", percentile=p))
    assert abs(got - np.percentile(absx, p)) <= width
    # The pure function on the same histogram.
    counts, rng = cal.histogram()
    assert abs(float(percentile_amax(counts, float(rng) / B, p)) - np.percentile(absx, p)) <= width


def test_percentile_per_channel_vs_numpy_rows():
    g = gen(5)
    scales = torch.tensor([0.001, 0.1, 1.0, 10.0, 100.0])  # channels differing 1e5 in scale
    x = torch.randn(5, 50_000, generator=g) * scales[:, None]
    cal = HistogramCalibrator(axis=0)
    cal.collect(x[:, :20_000])
    cal.collect(x[:, 20_000:])
    got = cal.compute_amax("percentile", percentile=99.9)
    assert got.shape == (5,)
    absx = np.abs(x.numpy()).astype(np.float64)
    for c in range(5):
        ref = np.percentile(absx[c], 99.9)
        assert abs(float(got[c]) - ref) <= pow2_range(absx[c].max()) / B, c


def test_percentile_100_is_max_and_never_above_max():
    x = torch.randn(10_000, generator=gen(6))
    cal = HistogramCalibrator()
    cal.collect(x)
    mx = float(x.abs().max())
    assert float(cal.compute_amax("percentile", percentile=100.0)) == mx
    for method in ("entropy", "mse", "percentile"):
        assert float(cal.compute_amax(method)) <= mx


# ------------------------------------------------------------------------------------------ entropy
def reference_kl(hist: np.ndarray, bits: int, floor: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """TensorRT's KL search written as plain loops (GTC 2017 slides), with bin 0 replaced by bin 1 and the
    smoothing floor for Q where P has mass and Q has none, as documented in lq.calib.entropy."""
    h = np.asarray(hist, dtype=np.float64).copy()
    h[0] = h[1]
    n = 2 ** (bits - 1)
    out = []
    for i in range(n, len(h) + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()  # outliers clipped into the last kept bin
        q = np.zeros(i)
        level = [(j * n) // i for j in range(i)]
        for g in range(n):
            members = [j for j in range(i) if level[j] == g]
            mass = sum(h[j] for j in members)  # the level's mass without the outliers
            nonzero = [j for j in members if p[j] > 0]
            for j in nonzero:
                q[j] = mass / len(nonzero)
        p_norm = p / p.sum()
        q_sum = q.sum()
        kl = 0.0
        for j in range(i):
            if p_norm[j] > 0:
                qj = q[j] / q_sum if q[j] > 0 else floor / q_sum
                kl += p_norm[j] * math.log(p_norm[j] / qj)
        out.append(kl)
    return np.arange(n, len(h) + 1), np.array(out)


@pytest.mark.parametrize("case", ["gauss", "outliers", "uniform", "relu", "sparse"])
def test_entropy_matches_bruteforce_kl(case):
    g = gen(7)
    bits, bins = 5, 120  # 16 levels: small enough for the loop reference
    if case == "gauss":
        x = torch.randn(5000, generator=g).abs()
    elif case == "outliers":
        x = torch.cat([torch.randn(5000, generator=g).abs(), torch.tensor([30.0, 35.0, 41.0])])
    elif case == "uniform":
        x = torch.rand(5000, generator=g)
    elif case == "relu":
        x = torch.relu(torch.randn(5000, generator=g))
    else:
        x = torch.randn(300, generator=g).abs() ** 3
    hist = np.histogram(x.numpy(), bins=bins, range=(0.0, float(x.max()) * 1.0001))[0]
    cand, kl = kl_divergences(torch.from_numpy(hist), bits)
    ref_cand, ref_kl = reference_kl(hist, bits)
    np.testing.assert_array_equal(cand.numpy(), ref_cand)
    np.testing.assert_allclose(kl.numpy(), ref_kl, rtol=1e-9, atol=1e-12)
    width = 0.37
    best = float(entropy_amax(torch.from_numpy(hist), width, bits)) / width
    k = int(round(best)) - ref_cand[0]
    assert ref_kl[k] <= ref_kl.min() + 1e-12


def test_entropy_uniform_keeps_the_max():
    x = torch.rand(200_000, generator=gen(8))
    cal = HistogramCalibrator()
    cal.collect(x)
    amax = float(cal.compute_amax("entropy"))
    assert abs(amax - float(x.max())) <= 0.03 * float(x.max())


def test_entropy_clips_far_outliers():
    x = torch.randn(200_000, generator=gen(9))
    x[:4] = torch.tensor([1000.0, -1000.0, 950.0, 1020.0])  # a few 1e3-sigma outliers
    cal = HistogramCalibrator()
    cal.collect(x)
    amax = float(cal.compute_amax("entropy"))
    assert 3.0 < amax < 0.2 * 1020.0


def test_entropy_few_bins_gives_max_edge():
    hist = torch.zeros(B)
    hist[:50] = 10.0
    assert float(entropy_amax(hist, 0.5)) == 25.0  # 50 bins < 128 levels: nothing to clip
    assert float(entropy_amax(torch.zeros(B), 0.5)) == 0.0


def test_per_channel_methods_scale_with_each_channel():
    """Channels that are one tensor scaled by powers of two (1e-2 ... 1e2 apart) get that tensor's per-tensor
    amax scaled exactly: each channel keeps its own power-of-two range, so its histogram is identical."""
    base = torch.randn(3000, generator=gen(15)) * torch.linspace(0.5, 2.0, 3000)
    scales = [2.0**-7, 1.0, 2.0**6]
    x = torch.stack([base * s for s in scales], dim=1)  # (3000, 3): channels on axis 1
    per_channel = HistogramCalibrator(axis=1)
    per_channel.collect(x[:1000])
    per_channel.collect(x[1000:])
    per_tensor = HistogramCalibrator()
    per_tensor.collect(base)
    for method in ("entropy", "mse", "percentile", "max"):
        ref = float(per_tensor.compute_amax(method))
        got = per_channel.compute_amax(method)
        assert got.shape == (3,)
        assert got.tolist() == [ref * s for s in scales], method


# ---------------------------------------------------------------------------------------------- mse
@pytest.mark.parametrize("kind", ["gauss", "laplace_outliers"])
def test_mse_close_to_bruteforce_grid(kind):
    g = gen(10)
    if kind == "gauss":
        x = torch.randn(10_000, generator=g)
    else:
        u = torch.rand(10_000, generator=g) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs())
        x[:3] = torch.tensor([60.0, -45.0, 50.0])
    cal = HistogramCalibrator()
    cal.collect(x)
    mx = float(x.abs().max())
    grid = torch.linspace(0.01 * mx, mx, 600)
    for bits in (4, 8):
        chosen = cal.compute_amax("mse", bits=bits)
        # Every grid range at once: the grid is the channel axis of a per-channel fake quantization.
        err = (x[None, :] - fake_quant(x[None, :].expand(grid.numel(), -1), grid, bits, axis=0)) ** 2
        mse_grid = err.mean(dim=1)
        mse_chosen = float(((x - fake_quant(x, chosen, bits)) ** 2).mean())
        assert mse_chosen <= 1.02 * float(mse_grid.min()), (bits, float(chosen), float(grid[mse_grid.argmin()]))


def test_mse_errors_match_numerical_integration():
    """The closed-form expected error per candidate vs a midpoint-rule integral of (x - fake_quant(x))^2."""
    rng = np.random.default_rng(0)
    hist = rng.integers(0, 50, size=40).astype(np.float64)
    hist[25:35] = 0.0
    hist[38] = 3.0
    bits = 3  # qmax = 3: a coarse grid, where rounding inside a bin matters most
    cand, errors = mse_errors(torch.from_numpy(hist), bits)
    q = 2 ** (bits - 1) - 1
    pts = (np.arange(4000) + 0.5) / 4000  # midpoints inside one bin
    for i, err in zip(cand.tolist(), errors.tolist()):
        step = i / q
        ref = 0.0
        for j in np.nonzero(hist)[0]:
            xs = j + pts
            xq = np.clip(np.round(xs / step), -q, q) * step
            ref += hist[j] * np.mean((xs - xq) ** 2)
        assert err == pytest.approx(ref, rel=1e-4, abs=1e-6), i


def test_mse_pure_function_empty():
    assert float(mse_amax(torch.zeros(16), 1.0)) == 0.0


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("cls", [MaxCalibrator, HistogramCalibrator])
def test_integer_input_type_error(cls, dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        cls().collect(torch.ones(4, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("cls", [MaxCalibrator, HistogramCalibrator])
def test_nan_inf_value_error(cls, axis, bad):
    x = torch.randn(3, 4)
    x[1, 2] = bad
    cal = cls(axis=axis)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cal.collect(x)
    assert not cal.has_data  # nothing half-collected


def test_float64_beyond_float32_range():
    with pytest.raises(ValueError, match="float32 range"):
        HistogramCalibrator().collect(torch.tensor([1.0, 1e300], dtype=torch.float64))


@pytest.mark.parametrize("cls", [MaxCalibrator, HistogramCalibrator])
def test_compute_before_collect(cls):
    with pytest.raises(RuntimeError, match="collect"):
        cls().compute_amax()


def test_unknown_names():
    cal = HistogramCalibrator()
    cal.collect(torch.ones(3))
    with pytest.raises(ValueError, match="entropy.*percentile.*mse.*max"):
        cal.compute_amax("kl")
    with pytest.raises(ValueError, match="percentile"):
        cal.compute_amax("percentile", percentile=100.5)
    with pytest.raises(ValueError, match="max.*entropy.*percentile.*mse.*auto"):
        make_calibrator("minmax")
    with pytest.raises(ValueError, match="num_bins"):
        HistogramCalibrator(num_bins=1)


def test_channel_errors():
    cal = HistogramCalibrator(axis=1)
    cal.collect(torch.ones(2, 3))
    with pytest.raises(ValueError, match="channels"):
        cal.collect(torch.ones(2, 4))
    with pytest.raises(ValueError, match="axis"):
        MaxCalibrator(axis=2).collect(torch.ones(2, 3))


@pytest.mark.parametrize("axis", [None, 0])
def test_all_zero_input(axis):
    for cal in (MaxCalibrator(axis=axis), HistogramCalibrator(axis=axis)):
        cal.collect(torch.zeros(4, 5))
        methods = ["max"] if isinstance(cal, MaxCalibrator) else ["max", "entropy", "percentile", "mse"]
        for m in methods:
            amax = cal.compute_amax(method=m)
            assert torch.isfinite(amax).all() and (amax == 0).all(), m
    # Zeros first, then data: the range grows from the smallest range without losing the zeros.
    cal = HistogramCalibrator()
    cal.collect(torch.zeros(1000))
    x = torch.randn(1000, generator=gen(11))
    cal.collect(x)
    counts, rng = cal.histogram()
    ref = np_hist(np.abs(np.concatenate([np.zeros(1000), x.numpy()])), float(rng))
    np.testing.assert_array_equal(counts.numpy(), ref)


# ------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("axis", [None, 1])
def test_low_and_high_precision_inputs(dtype, axis):
    x = torch.randn(64, 8, 9, generator=gen(12)).to(dtype)
    x32 = x.float()  # the same values, exactly representable in fp32
    for name in ("max", "entropy"):
        a, b = make_calibrator(name, axis=axis), make_calibrator(name, axis=axis)
        a.collect(x)
        b.collect(x32)
        kwargs = {} if name == "max" else {"method": "percentile", "percentile": 99.0}
        ra, rb = a.compute_amax(**kwargs), b.compute_amax(**kwargs)
        assert ra.dtype == torch.float32
        assert ra.shape == rb.shape and torch.equal(ra, rb), (ra, rb)
        ref = np.abs(x32.numpy()).max(axis=None if axis is None else (0, 2))
        np.testing.assert_array_equal(a.compute_amax(**({} if name == "max" else {"method": "max"})).numpy(), ref)


def test_make_calibrator_and_reset():
    assert isinstance(make_calibrator("max", axis=0), MaxCalibrator)
    for name in ("entropy", "percentile", "mse", "auto"):
        cal = make_calibrator(name, num_bins=512)
        assert isinstance(cal, HistogramCalibrator) and isinstance(cal, Calibrator) and cal.num_bins == 512
    cal = HistogramCalibrator()
    cal.collect(torch.ones(3) * 5)
    cal.reset()
    cal.collect(torch.ones(3))
    assert float(cal.compute_amax("max")) == 1.0
    cal.sync()  # no process group: a no-op


def test_non_contiguous_and_empty_inputs():
    x = torch.randn(6, 5, 4, generator=gen(13)).permute(2, 0, 1)  # non-contiguous
    cal = HistogramCalibrator(axis=0)
    cal.collect(x)
    cal.collect(torch.empty(4, 0, 3))  # empty: ignored
    ref = np.abs(x.numpy()).max(axis=(1, 2))
    np.testing.assert_array_equal(cal.compute_amax("max").numpy(), ref)
    counts, ranges = cal.histogram()
    for c in range(4):
        np.testing.assert_array_equal(counts[c].numpy(), np_hist(np.abs(x[c].numpy()).ravel(), float(ranges[c])))


def test_per_tensor_scratch_buffers_reused_across_shapes():
    """Per-tensor fp32 collection reuses scratch buffers: a large batch, then a smaller non-contiguous one,
    must still count exactly the values given (vs numpy), and release_scratch() frees them."""
    from lq.calib import histogram

    big = torch.randn(40, 50, generator=gen(14)) * 3
    small = torch.randn(7, 9, generator=gen(15)).t()  # non-contiguous, fewer elements than the scratch
    relu = torch.randn(30, 20, generator=gen(17)).relu()  # all >= 0: the abs pass is skipped
    cal = HistogramCalibrator()
    cal.collect(big)
    cal.collect(small)
    cal.collect(relu)
    counts, rng = cal.histogram()
    absx = np.abs(np.concatenate([t.numpy().ravel() for t in (big, small, relu)])).astype(np.float64)
    np.testing.assert_array_equal(counts.numpy(), np_hist(absx, float(rng)))
    assert histogram._scratch
    histogram.release_scratch()
    assert not histogram._scratch


# --------------------------------------------------------------------------------------------- sync
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_data() -> list[torch.Tensor]:
    """Four batches; rank r gets batches r and r + 2 (rank 1's maxima are larger: the range grows in sync)."""
    g = gen(14)
    scales = torch.tensor([1.0, 0.01, 10.0])[None, :, None]
    return [torch.randn(16, 3, 50, generator=g) * scales * f for f in (1.0, 30.0, 2.0, 0.5)]


def _make_sync_calibrators() -> dict[str, Calibrator]:
    return {
        "max": MaxCalibrator(),
        "max_ch": MaxCalibrator(axis=1),
        "hist": HistogramCalibrator(),
        "hist_ch": HistogramCalibrator(axis=1),
        "hist_rank0_only": HistogramCalibrator(),  # rank 1 collects nothing for this one
    }


def _amaxes(cals: dict[str, Calibrator]) -> dict[str, torch.Tensor]:
    out = {}
    for name, cal in cals.items():
        if isinstance(cal, MaxCalibrator):
            out[name] = cal.compute_amax()
        else:
            for m in ("max", "entropy"):  # equal counts (checked too) make every other method equal
                out[f"{name}/{m}"] = cal.compute_amax(m)
            out[f"{name}/p99.9"] = cal.compute_amax("percentile", percentile=99.9)
            out[f"{name}/counts"] = cal.histogram()[0]
    return out


def _sync_worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = _sync_data()
        cals = _make_sync_calibrators()
        for batch in data[rank::2]:
            for name, cal in cals.items():
                if name == "hist_rank0_only" and rank != 0:
                    continue
                cal.collect(batch)
        for cal in cals.values():
            cal.sync()
        torch.save(_amaxes(cals), os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_two_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    # fork (where available) instead of spawn: the workers start in well under a second instead of
    # re-importing torch; each worker uses one intra-op thread, as DataLoader workers do.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_sync_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method)
    data = _sync_data()
    ref_cals = _make_sync_calibrators()
    for i, batch in enumerate(data):
        for name, cal in ref_cals.items():
            if name == "hist_rank0_only" and i % 2 != 0:
                continue
            cal.collect(batch)
    ref = _amaxes(ref_cals)
    # Independent checks of the reference itself.
    full = np.abs(torch.cat(data).numpy())
    np.testing.assert_array_equal(ref["max"].numpy(), full.max())
    np.testing.assert_array_equal(ref["max_ch"].numpy(), full.max(axis=(0, 2)))
    full64 = full.ravel().astype(np.float64)
    np.testing.assert_array_equal(ref["hist/counts"].numpy(), np_hist(full64, pow2_range(full.max())))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == ref.keys()
        for key in ref:
            assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), f"rank {rank}: {key}"


@pytest.mark.parametrize("cls", [MaxCalibrator, HistogramCalibrator])
def test_collect_inside_then_outside_inference_mode(cls):
    """Lightning validates/tests under torch.inference_mode; state created there must stay updatable by
    a later collection outside it (and the histogram's reused scratch buffers too)."""
    from lq.calib import histogram

    histogram.release_scratch()
    cal = cls()
    a, b = torch.randn(1000, generator=gen(18)), torch.randn(500, generator=gen(19)) * 3
    with torch.inference_mode():
        cal.collect(a)
    with torch.no_grad():
        cal.collect(b)
    assert float(cal.compute_amax("max")) == float(torch.cat([a, b]).abs().max())

