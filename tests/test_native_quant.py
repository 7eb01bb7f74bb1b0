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


@pytest.fixture(params=["amx", "vnni"])
def unit(request, monkeypatch):
    """Each unit ``amx.c``'s convolution kernels can run on where this CPU has it (``native_quant.tile_unit``): the
    tile unit, and AVX-512 VNNI (also forced on an AMX host with ``LQ_TILE_UNIT=vnni``), else skipped."""
    monkeypatch.setenv("LQ_TILE_UNIT", request.param)
    native_quant.tile_unit.cache_clear()
    try:
        if native_quant.tile_unit() != request.param:
            pytest.skip(f"no {request.param.upper()} on this CPU (or not permitted)")
        yield request.param
    finally:
        native_quant.tile_unit.cache_clear()  # (the environment is restored after this fixture's teardown)


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


@pytest.mark.parametrize("shape", [(1,), (5, 3), (64, 16, 9, 9), (3, 5, 7, 2), (40000,)])
def test_tensors_quantize_as_the_torch_ops_in_their_memory_order(shape, threads) -> None:
    """One scale per tensor (a conv input, a static calibrated amax): the same integers, step and amax as the torch
    ops, for row-major and channels-last tensors (``q`` keeps ``x``'s layout), ties included."""
    torch.manual_seed(len(shape))
    x = torch.randn(*shape) * 2
    flat = x.view(-1)
    s = 127 / flat.abs().max()
    flat[1::7] = (torch.arange(flat[1::7].numel()) % 40 + 0.5) / s  # ties of eq. 7
    layouts = [x] + ([x.contiguous(memory_format=torch.channels_last)] if x.dim() == 4 else [])
    for xx in layouts:
        for static in (None, torch.tensor([1.5]), torch.tensor([0.0])):
            q, step, amax, finite = native_quant.quantize_tensor(xx, 127, static)
            q2, step2, amax2, finite2 = fused._quantize_dynamic(xx, static, 127, None)
            assert q.stride() == xx.stride() and torch.equal(q, q2)
            assert torch.equal(step, step2) and torch.equal(amax, amax2) and finite is True and bool(finite2)
    assert native_quant.quantize_tensor(x.t() if x.dim() == 2 else x[..., ::2], 127) is None or x.dim() == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_row_is_reported_and_raises_naming_the_layer(bad) -> None:
    x = torch.randn(8, 40)
    x[5, 33] = bad
    _, _, amax, finite = native_quant.quantize_rows(x, 127)
    assert finite is False and not torch.isfinite(amax[5]) and torch.isfinite(amax[torch.arange(8) != 5]).all()
    with pytest.raises(FloatingPointError, match="fc3"):
        quantize_along(x, 127, 0, name="fc3")
    assert native_quant.quantize_tensor(x, 127)[3] is False
    with pytest.raises(FloatingPointError, match="conv2"):
        quantize_along(x.reshape(2, 4, 5, 8), 127, None, name="conv2")
    with pytest.raises(FloatingPointError, match="conv3"):  # also with a calibrated amax
        quantize_along(x, 127, None, amax=torch.tensor([2.0]), name="conv3")


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


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (4, 16, 9, 9), (8, 64, 6, 6), (16, 24, 14, 14)])
@pytest.mark.parametrize("layout", ["row-major", "channels-last"])
def test_convolution_gradient_operands_quantize_as_the_torch_ops(shape, layout, stochastic, threads) -> None:
    """A conv's output gradient [N, O, H, W]: grad_input's operand with one scale (of ``g * step_w[o]``) and
    grad_weight's with a scale per channel, both layouts, ties included; ``q`` keeps ``g``'s layout. The C kernel
    cuts channels-last rows into spans of whole rows (~1024 floats): the shapes leave spans short at the end and
    (24 channels) not dividing 1024."""
    torch.manual_seed(sum(shape))
    g = torch.randn(*shape) * 1e-3
    step_w = torch.rand(1, shape[1], 1, 1) + 0.1
    flat = g.view(-1)
    flat[::5] = (torch.arange(flat[::5].numel()) % 30 + 0.5) / (127 / (flat.abs().max() * 0.8))  # near ties
    if layout == "channels-last":
        g = g.contiguous(memory_format=torch.channels_last)
    for order in ((None, 1), (1, None), (None,), (1,)):
        torch.manual_seed(2)
        ops = []
        for axis in order:
            noise, shift = fused.rounding_inputs(g, stochastic)
            ops.append((axis, step_w if axis is None else None, 0.8 if axis is None else 0.6, noise, shift))
        done = native_quant.grad_operands(g, 127, ops)
        assert done is not None
        for (axis, mult, ratio, noise, shift), (q, step, amax, finite) in zip(ops, done):
            q2, step2, amax2, finite2 = gq._fused_fixed(g, mult, torch.tensor([ratio]), 127, axis, noise, shift)
            assert q.stride() == g.stride() and torch.equal(q, q2)
            assert torch.equal(step, step2) and torch.equal(amax, amax2) and finite is True and bool(finite2)
    bad = g.clone()
    bad[0, -1, 0, 0] = float("nan")
    (_, _, amax_a, fa), (_, _, amax_b, fb) = native_quant.grad_operands(
        bad, 127, [(None, step_w, 1.0, None, None), (1, None, 1.0, None, None)])
    assert fa is False and fb is False and torch.isnan(amax_a).all() and torch.isnan(amax_b).tolist() == [
        c == shape[1] - 1 for c in range(shape[1])]


def test_a_conv_weight_quantizes_per_output_channel_as_the_torch_ops() -> None:
    w = torch.randn(16, 8, 3, 3)
    q, step = quantize_along(w, 127, 0)
    q2, step2, _, _ = fused._quantize_dynamic(w, None, 127, 0)
    assert q.shape == w.shape and torch.equal(q, q2) and torch.equal(step, step2)


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
    calls = []
    amx = native_quant.amx_library()
    product = "lq_amx_mm" if amx is not None else "lq_scale_sums"  # (the output stage: inside the AMX kernel)
    for lib in {native_quant.library(), amx} - {None}:
        for fn in ("lq_quant_rows", "lq_grad_pair", "lq_scale_sums", "lq_amx_mm"):
            if hasattr(lib, fn):
                real = getattr(lib, fn)
                monkeypatch.setattr(lib, fn, lambda *a, _real=real, _fn=fn: (calls.append(_fn), _real(*a))[1])
    with_kernel = _linear_step(0, config)
    assert {"lq_quant_rows", "lq_grad_pair", product} <= set(calls)
    monkeypatch.setenv("LQ_NATIVE", "0")
    calls.clear()
    without = _linear_step(0, config)
    assert calls == []
    for got, want in zip(with_kernel, without):
        assert torch.equal(got, want)


def _layouts(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` row-major, as a transposed view of its transpose (column-major), and as a view with a row stride of its
    own."""
    wide = torch.zeros(t.shape[0], t.shape[1] + 5, dtype=t.dtype)
    wide[:, 3 : 3 + t.shape[1]] = t
    return [t, t.t().contiguous().t(), wide[:, 3 : 3 + t.shape[1]]]


@pytest.mark.skipif(native_quant.amx_library() is None, reason="no AMX-INT8 on this CPU (or not permitted)")
@pytest.mark.parametrize("mkn", [(1, 1, 1), (1, 3, 1), (33, 65, 17), (64, 64, 32), (200, 1000, 77), (128, 512, 96)])
def test_amx_product_and_output_stage_are_exact_for_every_layout(mkn, threads) -> None:
    """The tile kernel's sums equal int64 sums for every shape (padding to 32 x 32 blocks and 64-deep steps) and
    operand layout (the transposed operands of the backward products), the extreme values -128 and 127
    included, and its output stage is eq. 10's fp32 operations bit for bit."""
    m, k, n = mkn
    gen = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    a[0, 0], b[0, 0] = -128, -128
    sums = (a.long() @ b.long().t()).int()
    a_step, b_step, bias = torch.rand(m, generator=gen) + 0.01, torch.rand(n, generator=gen), torch.randn(n)
    for sa, c in ((a_step, bias), (a_step[:1], None)):
        want = im._epilogue(sums, sa, b_step, c)
        for aa in _layouts(a):
            for bb in _layouts(b):
                got = native_quant.amx_mm(aa, bb, sa, b_step, c, im.hw.max_exact_reduction(128, 128))
                assert got is not None and torch.equal(got, want)


@pytest.mark.skipif(native_quant.amx_library() is None, reason="no AMX-INT8 on this CPU (or not permitted)")
def test_amx_declines_reductions_whose_int32_sums_could_overflow() -> None:
    a, b = torch.ones(2, 70, dtype=torch.int8), torch.ones(3, 70, dtype=torch.int8)
    assert native_quant.amx_mm(a, b, torch.ones(2), torch.ones(3), None, max_k=69) is None
    with im.hw.record_kernels() as ran:  # lq::int8_mm then splits the reduction on another kernel
        out = im.int8_mm(torch.full((2, 70000), 127, dtype=torch.int8), torch.full((3, 70000), 127, dtype=torch.int8),
                         torch.ones(2), torch.ones(3), 127, 127, None)
    assert ran == ["int8_mm:amx"]  # 70000 * 127 * 127 < 2^31: one call
    assert torch.equal(out, torch.full((2, 3), 70000.0 * 127 * 127))


# ---- inputs the kernels must not take (found by review) ---------------------------------------------------------
def test_a_float64_default_dtype_leaves_the_kernels_fp32(monkeypatch) -> None:
    """Buffers the C code writes are fp32 whatever ``torch.set_default_dtype`` says (a float64 default made them
    float64: garbage steps, a mult of ones read as other numbers, half-garbage outputs)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x, g = torch.randn(4, 8, dtype=torch.float32), torch.randn(6, 9, dtype=torch.float32)
        acc = torch.randint(-100, 100, (3, 5), dtype=torch.int32)
        a8, b8 = torch.randint(-5, 5, (3, 8), dtype=torch.int8), torch.randint(-5, 5, (5, 8), dtype=torch.int8)
        ones3, ones5 = torch.ones(3, dtype=torch.float32), torch.ones(5, dtype=torch.float32)
        ops = (gq.GradOperand(0, None, "grad_input"), gq.GradOperand(1, None, "grad_weight"))

        def run():
            return (quantize_along(x, 127, 0), quantize_along(x, 127, None), gq.quantize_grad_pair(g, 127, *ops),
                    im.scale_sums(acc, ones3, ones5, None), im.int8_mm(a8, b8, ones3, ones5, 127, 127, None))

        native = run()
        monkeypatch.setenv("LQ_NATIVE", "0")
        plain = run()
    finally:
        torch.set_default_dtype(before)
    (q, s), (qt, st), pair, sums, mm = native
    (q2, s2), (qt2, st2), pair2, sums2, mm2 = plain
    assert s.dtype == st.dtype == sums.dtype == mm.dtype == torch.float32
    assert torch.equal(q, q2) and torch.equal(s, s2) and torch.equal(qt, qt2) and torch.equal(st, st2)
    assert all(torch.equal(r.q, w.q) and torch.equal(r.step, w.step) for r, w in zip(pair, pair2))
    assert torch.equal(sums, sums2) and torch.equal(mm, (a8.long() @ b8.long().t()).float())


def _subprocess(code: str):
    import subprocess
    import sys
    import textwrap

    env = dict(os.environ, OMP_NUM_THREADS="1", LQ_COMPILE_QUANT="0")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=env)


def test_default_device_and_fake_tensors_do_not_reach_the_c_code() -> None:
    """``torch.set_default_device("meta")`` (or cuda) must not place the kernels' buffers off the CPU, and fake
    tensors (shape propagation outside Dynamo) have no memory behind their pointers: both crashed the process
    (segfault) before; now the torch ops run (and raise their own error for fake tensors)."""
    done = _subprocess("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from lq.ops.quantize import quantize_along
        x = torch.randn(4, 8)
        with FakeTensorMode() as mode:
            try:
                quantize_along(mode.from_tensor(x), 127, 0)
            except Exception as err:
                print("raised", type(err).__name__)
        torch.set_default_device("meta")
        q, step = quantize_along(torch.randn(4, 8, device="cpu"), 127, 0)
        assert step.device.type == "cpu" and q.device.type == "cpu"
    """)
    assert done.returncode == 0, (done.returncode, done.stderr[-1500:])


def test_a_learned_amax_keeps_its_gradient(monkeypatch) -> None:
    x = torch.randn(4, 8)
    amax = torch.nn.Parameter(torch.tensor([2.0]))
    _, step = quantize_along(x, 127, None, amax=amax)
    monkeypatch.setenv("LQ_NATIVE", "0")
    _, step2 = quantize_along(x, 127, None, amax=amax)
    assert step.requires_grad and step2.requires_grad and torch.equal(step, step2)


@pytest.mark.skipif(native_quant.amx_library() is None, reason="no AMX-INT8 on this CPU (or not permitted)")
def test_amx_packing_buffers_do_not_outlive_their_thread_or_a_large_call() -> None:
    """The AMX kernel keeps its packing buffers per thread (fresh ones cost page faults every call); they go with
    the thread (a service running products on short-lived threads leaked ~2 MiB a thread, found by review), and a
    product larger than the kept size frees them after the call."""
    import ctypes
    import threading

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2")
    libc.mallinfo2.restype = MallInfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def product(m=1024, k=1024, n=1024):
        a, b = torch.ones(m, k, dtype=torch.int8), torch.ones(n, k, dtype=torch.int8)
        assert native_quant.amx_mm(a, b, torch.ones(m), torch.ones(n), None, 1 << 20) is not None

    product()  # this thread's own buffers are in the baseline
    before = in_use()
    for _ in range(16):
        t = threading.Thread(target=product)
        t.start()
        t.join()
    assert in_use() - before < 8 * 2**20
    product(m=32, k=80000, n=1024)  # 80 MB of packed b: freed after the call
    assert in_use() - before < 8 * 2**20


@pytest.mark.parametrize("geometry", [
    (8, 64, 64, 14, 14, 3, 1, 1), (4, 16, 32, 9, 9, 3, 2, 1), (2, 40, 70, 7, 5, 3, 1, 1), (3, 33, 17, 8, 8, 1, 2, 0),
    (2, 8, 8, 6, 6, 5, 1, 2), (4, 40, 33, 6, 6, 1, 1, 0), (2, 3, 5, 4, 7, 1, 1, 0),
    (2, 16, 16, 9, 9, 3, 2, 1), (3, 12, 10, 7, 8, 3, 1, 1), (40, 16, 16, 12, 12, 3, 1, 1),
    (24, 256, 256, 14, 14, 3, 2, 1),  # (3 reduction chunks rounded up to 4 for two threads: 6/6/6/7 steps)
    (4, 1, 16, 9, 9, 3, 1, 1), (2, 2, 32, 7, 8, 3, 2, 1), (3, 1, 9, 6, 5, 3, 1, 0),  # (few input channels: dots)
])
@pytest.mark.parametrize("layout", ["row-major", "channels-last"])
def test_amx_conv_weight_gradients_equal_the_int_mm_paths(geometry, layout, monkeypatch, unit) -> None:
    """The tile unit's (and VNNI's: ``unit``) conv weight gradients (every tap from each phase packed once, the
    reduction in chunks shared by the threads; at most 16 x 16 channels four taps at a time, several chunks and
    phases included; 1x1 layers on channels-last operands as one product of transposed views) give the numbers of
    the `_int_mm` tap and im2col paths (tested against the reference elsewhere) bit for bit, and the
    float64 convolution's within fp32 scaling; the channels-last gradient reaches the grid by 16 x 16 transposes."""
    from lq.ops import hardware as hw
    from lq.ops import int8_conv_kernels as K

    n, c, o, h, w, k, s, p = geometry
    gen = torch.Generator().manual_seed(sum(geometry))
    x = torch.randint(-127, 128, (n, c, h, w), dtype=torch.int8, generator=gen)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    g = torch.randint(-127, 128, (n, o, ho, wo), dtype=torch.int8, generator=gen)
    if layout == "channels-last":
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    g_step, x_step = torch.rand(o, generator=gen) + 0.1, torch.rand(1, generator=gen) + 0.1
    args = (g, x, g_step, x_step, 127, 127, [o, c, k, k], [s, s], [p, p], [1, 1], 1)
    with hw.record_kernels() as ran:
        got = K._conv_grad_weight_cpu(*args)
    monkeypatch.setenv("LQ_NATIVE", "0")
    with hw.record_kernels() as ran_plain:
        want = K._conv_grad_weight_cpu(*args)
    sr = 1 if k == 1 and p == 0 else s  # (a 1x1 strided layer runs as the stride-1 one on its subsampled input)
    stacked = c * k * k <= o and (k > 1 or sr > 1)  # (a 1x1 stride-1 layer has nothing to stack)
    pointwise = k == 1 and sr == 1 and layout == "channels-last" and unit == "amx"  # (one AMX product)
    kernel = "pointwise_amx" if pointwise else "taps_dots" if stacked else f"taps_{unit}"
    # (on AMX a row-major 1x1 stride-1 layer runs the im2col lq::int8_mm; VNNI takes it by taps)
    amx_im2col = k == 1 and sr == 1 and unit == "amx" and not pointwise
    assert ran == [f"int8_conv2d_grad_weight:{kernel}"] or amx_im2col, (ran, ran_plain)
    assert torch.equal(got, want)
    exact = torch.nn.grad.conv2d_weight(x.double(), [o, c, k, k], g.double(), (s, s), (p, p))
    scaled = exact * g_step.double().reshape(-1, 1, 1, 1) * x_step.double()
    assert torch.allclose(got.double(), scaled, rtol=1e-6, atol=0)


@pytest.mark.parametrize("geometry", [(2, 16, 32, 28, 28, (2, 2)), (3, 33, 17, 9, 8, (2, 2)), (2, 5, 7, 7, 10, (3, 3)),
                                      (2, 16, 16, 8, 8, (1, 2)), (4, 3, 9, 1, 5, (2, 2)), (2, 70, 40, 13, 11, (2, 2))])
@pytest.mark.parametrize("layout", ["row-major", "channels-last"])
def test_strided_pointwise_layers_run_the_stride_1_products_on_the_subsampled_input(geometry, layout,
                                                                                    monkeypatch) -> None:
    """A 1x1 unpadded strided layer (a ResNet shortcut) reads only the pixels ``x[:, :, ::sh, ::sw]``: its CPU kernels
    compute the three products there at stride 1 (``pointwise_subsampled``), so each equals the stride-1 kernel on
    that subsampled input bit for bit, the input gradient is exactly zero at every other pixel, and all three match
    the float64 strided convolution within fp32 scaling and the strided kernels that ran before bit for bit, in the
    layouts the op promises (channels-last, or row-major where the backward of a row-major input asks for it), at odd
    sizes and unequal strides too."""
    from lq.ops import int8_conv_kernels as K

    n, c, o, h, w, s = geometry
    gen = torch.Generator().manual_seed(n * c + o)
    x = torch.randint(-127, 128, (n, c, h, w), dtype=torch.int8, generator=gen)
    ho, wo = -(-h // s[0]), -(-w // s[1])
    g = torch.randint(-127, 128, (n, o, ho, wo), dtype=torch.int8, generator=gen)
    if layout == "channels-last":
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    wt = torch.randint(-127, 128, (o, c, 1, 1), dtype=torch.int8, generator=gen)
    x_step, g_step, w_step = (torch.rand(k, generator=gen) + 0.1 for k in (1, 1, o))
    geo, one = (list(s), [0, 0], [1, 1], 1), ([1, 1], [0, 0], [1, 1], 1)
    sub = x[:, :, :: s[0], :: s[1]]
    y = K._conv_fwd_cpu(x, wt, x_step, w_step, 127, 127, None, *geo)
    assert torch.equal(y, K._conv_fwd_cpu(sub, wt, x_step, w_step, 127, 127, None, *one))
    want = torch.nn.functional.conv2d(x.double(), wt.double(), None, s) * x_step.double() * w_step.double().reshape(
        1, -1, 1, 1)
    assert torch.allclose(y.double(), want, rtol=1e-6, atol=0)
    assert y.is_contiguous(memory_format=torch.channels_last)
    gw = K._conv_grad_weight_cpu(g, x, w_step, x_step, 127, 127, [o, c, 1, 1], *geo)
    assert torch.equal(gw, K._conv_grad_weight_cpu(g, sub, w_step, x_step, 127, 127, [o, c, 1, 1], *one))
    want = torch.nn.grad.conv2d_weight(x.double(), [o, c, 1, 1], g.double(), s) * w_step.double().reshape(
        -1, 1, 1, 1) * x_step.double()
    assert torch.allclose(gw.double(), want, rtol=1e-6, atol=0)
    want = torch.nn.grad.conv2d_input([n, c, h, w], wt.double(), g.double(), s) * g_step.double()
    for channels_last in (True, False):
        gi = K._conv_grad_input_cpu(g, wt, g_step, 127, 127, [n, c, h, w], *geo, channels_last=channels_last)
        small = K._conv_grad_input_cpu(g, wt, g_step, 127, 127, [n, c, ho, wo], *one)
        assert torch.equal(gi[:, :, :: s[0], :: s[1]], small)
        assert torch.allclose(gi.double(), want, rtol=1e-6, atol=0)
        skipped = torch.ones(h, w, dtype=torch.bool)
        skipped[:: s[0], :: s[1]] = False
        assert not gi[:, :, skipped].any()
        assert gi.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # the strided kernels (space-to-depth, zero-inserted gradient, stride phases) give the same numbers bit for bit
    monkeypatch.setattr(K, "pointwise_subsampled", lambda *args: False)
    assert torch.equal(y, K._conv_fwd_cpu(x, wt, x_step, w_step, 127, 127, None, *geo))
    assert torch.equal(gw, K._conv_grad_weight_cpu(g, x, w_step, x_step, 127, 127, [o, c, 1, 1], *geo))
    assert torch.equal(gi, K._conv_grad_input_cpu(g, wt, g_step, 127, 127, [n, c, h, w], *geo))


def test_the_conv_wrappers_decline_inconsistent_sizes_and_overlapping_rows() -> None:
    """Found by review: ``amx_taps`` wrote ``O * C * taps`` floats whatever ``weight_size`` said (a heap overflow
    for a smaller one), and ``grid_rows`` wrote a destination whose rows overlap (an expanded one)."""
    o, c, tx = 32, 32, 64
    ge, phase = torch.zeros(32, 64, dtype=torch.int8), torch.ones(c, tx, dtype=torch.int8)
    for size, phase_of in (([1, 1, 1, 1], [0] * 9), ([o, c, 3, 3], [0] * 8), ([o, c, 3, 3], [1] * 9)):
        assert native_quant.amx_taps(ge, o, 0, [0] * 9, phase_of, [phase], False, c, tx, torch.ones(o),
                                     torch.ones(1), size) is None
    g = torch.randint(-100, 100, (2, 32, 4, 4), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    assert not native_quant.grid_rows(g, torch.zeros(1, 32, dtype=torch.int8).expand(32, 32), 4, 4)
    # the dot-product taps (few input channels): a weight size, gradient rows or phase rows that disagree with the
    # sizes it reads are declined, not read past
    o, c, tx, lead = 16, 1, 100, 3
    ge, phase = torch.zeros(o, lead + tx, dtype=torch.int8), torch.ones(c, tx, dtype=torch.int8)
    args = (o, lead, [0, 1, 2], [0, 0, 0], [phase], c, tx, torch.ones(o), torch.ones(1))
    assert native_quant.taps_dots(ge[:, : lead + tx - 1].contiguous(), *args, [o, c, 1, 3]) is None
    assert native_quant.taps_dots(ge, *args, [o, c, 3, 3]) is None
    assert native_quant.taps_dots(ge, o, lead, [0, 1, 4], [0, 0, 0], [phase], c, tx, torch.ones(o), torch.ones(1),
                                  [o, c, 1, 3]) is None  # (an offset beyond the lead)
    assert native_quant.taps_dots(ge, *args[:4], [phase[:, :-1]], c, tx, *args[7:], [o, c, 1, 3]) is None
    if native_quant.tile_unit() is not None:
        assert native_quant.taps_dots(ge, *args, [o, c, 1, 3]) is not None


def test_amx_taps_scratch_does_not_grow_with_idle_threads(unit) -> None:
    """One reduction chunk (a 512 x 512 3x3 layer at batch 1, 7x7): threads without a chunk no longer get an
    accumulator of O * C * taps int32 each (9 MiB a thread, found by review)."""
    code = """
        import sys, torch
        from lq.ops import int8_conv_kernels as K
        torch.set_num_threads(int(sys.argv[1]))
        o = c = 512
        x = torch.randint(-127, 128, (1, c, 7, 7), dtype=torch.int8)
        g = torch.randint(-127, 128, (1, o, 7, 7), dtype=torch.int8)
        args = (g, x, torch.rand(o) + .1, torch.rand(1) + .1, 127, 127, [o, c, 3, 3], [1, 1], [1, 1], [1, 1], 1)
        def kb(key):
            return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(key))
        before = max(kb('VmHWM'), kb('VmRSS'))
        K._conv_grad_weight_cpu(*args)
        print("EXTRA", (kb('VmHWM') - before) / 1024)
    """
    import subprocess
    import sys
    import textwrap

    extra = {}
    for t in (1, 3):
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(t)], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(t), LQ_TILE_UNIT=unit), timeout=300)
        extra[t] = float(done.stdout.split("EXTRA")[1])
    assert extra[3] < extra[1] + 9, extra


@pytest.mark.parametrize("geometry", [(2, 64, 64, 7, 9, 3, 1), (2, 3, 5, 7, 9, 3, 1), (2, 70, 33, 6, 5, 3, 0),
                                      (1, 16, 8, 5, 5, 5, 2), (3, 128, 96, 4, 4, 1, 0), (2, 130, 129, 5, 5, 3, 1),
                                      (2, 16, 16, 9, 9, 3, 1), (2, 32, 40, 8, 7, 3, 1), (2, 1, 16, 9, 9, 3, 1),
                                      (2, 48, 20, 6, 6, 1, 0), (2, 8, 24, 7, 10, 5, 2), (2, 2, 3, 6, 5, 2, 0),
                                      (4, 64, 128, 4, 4, 1, 0)])  # (1x1, 64 positions: the input is its own grid)
@pytest.mark.parametrize("layout", ["row-major", "channels-last"])
def test_amx_convolution_is_exact_and_scales_as_eq10(geometry, layout, threads, unit) -> None:
    """The tile unit's (and VNNI's: ``unit``; its unsigned input grid and the offset it subtracts) convolution
    (implicit GEMM over the padded input's grid; fewer than 64 channels as several taps a step, stride 2 on the
    space-to-depth grid): the integer sums of the convolution exactly (unit steps, -128
    and 127 included) at strides 1 and 2, eq. 10's output stage ((acc * x_step) * w_step[o] + bias[o]) within fp32
    rounding, a channels-last output; and the grad-input route (a transposed convolution on the zero-inserted
    gradient) for strides 1 and 2."""
    import torch.nn.functional as F

    from lq.ops import int8_conv_kernels as K

    n, c, o, h, w, k, p = geometry
    gen = torch.Generator().manual_seed(sum(geometry))
    x = torch.randint(-128, 128, (n, c, h, w), dtype=torch.int8, generator=gen)
    wt = torch.randint(-128, 128, (o, c, k, k), dtype=torch.int8, generator=gen)
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    for stride in (2, 1):
        exact = F.conv2d(x.double(), wt.double(), None, stride, p)
        y = native_quant.amx_conv(x, wt, torch.ones(1), torch.ones(o), None, [p, p], 1 << 20, [stride] * 2)
        assert torch.equal(y.double(), exact) and y.is_contiguous(memory_format=torch.channels_last)
    xs, ws, b = torch.rand(1, generator=gen) + 0.01, torch.rand(o, generator=gen) + 0.01, torch.randn(o, generator=gen)
    y = native_quant.amx_conv(x, wt, xs, ws, b, [p, p], 1 << 20)
    want = exact * xs.double() * ws.double().reshape(1, -1, 1, 1) + b.double().reshape(1, -1, 1, 1)
    assert torch.allclose(y.double(), want, rtol=1e-6, atol=1e-5 * want.abs().max().item())
    assert native_quant.amx_conv(x, wt, xs, ws, b, [p, p], c * k * k - 1) is None  # beyond the int32 headroom
    for stride in (1, 2):
        ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
        g = torch.randint(-127, 128, (n, o, ho, wo), dtype=torch.int8, generator=gen)
        canvas, pad = K.transposed_conv_input(g, wt.shape, [n, c, h, w], [stride] * 2, [p, p], [1, 1])
        gx = native_quant.amx_conv(canvas, K.transposed_conv_weight(wt, 1), torch.ones(1), torch.ones(c), None, pad,
                                   1 << 20)
        want = torch.nn.grad.conv2d_input([n, c, h, w], wt.double(), g.double(), [stride] * 2, [p, p])
        assert torch.equal(gx.double(), want)
        if layout == "channels-last":
            g = g.contiguous(memory_format=torch.channels_last)
        # the direct route (stride 2 on the space-to-depth grid, written back depth-to-space)
        gx = native_quant.amx_conv_grad_input(g, wt, torch.ones(1), [n, c, h, w], [stride] * 2, [p, p], 1 << 20)
        assert torch.equal(gx.double(), want) and gx.is_contiguous(memory_format=torch.channels_last)
        # written row-major by the kernel's output stage (the gradient of a row-major input)
        gx = native_quant.amx_conv_grad_input(g, wt, torch.ones(1), [n, c, h, w], [stride] * 2, [p, p], 1 << 20,
                                              channels_last=False)
        assert torch.equal(gx.double(), want) and gx.is_contiguous()


@pytest.mark.parametrize("channels", [(1, 16), (3, 8), (16, 16), (16, 32), (128, 130)])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv_ops_run_the_tile_unit_exactly(stride, channels, unit) -> None:
    """The custom ops route undilated one-group layers to the tile unit (forward at strides 1 and 2; grad-input at
    every stride: strides 1-2 directly, others through the zero-inserted gradient; output-padding cases included)
    with exact integer results, few channels (several taps a step; on VNNI the steps' all-zero 4-byte rows skipped:
    a 1- or 3-channel input fills 3 of 16) and many; the same on VNNI."""
    import torch.nn.functional as F

    from lq.ops import hardware as hw
    from lq.ops import int8_conv_kernels as K

    gen = torch.Generator().manual_seed(stride)
    (c, o), n, h, w, k, p = channels, 2, 8, 7, 3, 1
    x = torch.randint(-127, 128, (n, c, h, w), dtype=torch.int8, generator=gen).contiguous(
        memory_format=torch.channels_last)
    wt = torch.randint(-127, 128, (o, c, k, k), dtype=torch.int8, generator=gen)
    one, ones = torch.ones(1), torch.ones(o)
    args = ([stride] * 2, [p, p], [1, 1], 1)
    with hw.record_kernels() as ran:
        y = K.int8_conv2d_fwd(x, wt, one, ones, 127, 127, None, *args)
    assert ran == ["int8_conv2d:" + (unit if stride < 3 else "onednn")]
    assert torch.equal(y.double(), F.conv2d(x.double(), wt.double(), None, stride, p))
    g = torch.randint(-127, 128, tuple(y.shape), dtype=torch.int8, generator=gen)
    with hw.record_kernels() as ran:
        gx = K.int8_conv2d_grad_input(g, wt, one, 127, 127, [n, c, h, w], *args)
    assert ran == ["int8_conv2d_grad_input:" + unit]
    assert tuple(gx.shape) == (n, c, h, w)
    assert torch.equal(gx.double(), torch.nn.grad.conv2d_input([n, c, h, w], wt.double(), g.double(), stride, p))


@pytest.mark.parametrize("geometry", [(16, 16, 28, 28, 3, 1, 1), (5, 7, 9, 11, 3, 1, 1), (32, 16, 14, 13, 3, 2, 1),
                                      (40, 3, 7, 9, 1, 1, 0), (24, 48, 11, 13, 5, 2, 2), (17, 33, 6, 5, 3, 2, 0)])
def test_row_major_input_gradient_is_written_row_major(geometry, unit, threads) -> None:
    """The input gradient of a row-major input comes out of the tile unit's (or VNNI's) output stage row-major (runs of
    each image row copied out per channel, depth-to-space with the crop at stride 2), the same numbers as the
    channels-last result and as the exact float64 transposed convolution, at 1 and 2 threads; through the op,
    ``x.grad`` of a row-major leaf is row-major with the same values as for a channels-last one."""
    (o, c, h, w, k, stride, p), n = geometry, 2
    gen = torch.Generator().manual_seed(o * h + k)
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    g = torch.randint(-127, 128, (n, o, ho, wo), dtype=torch.int8, generator=gen)
    wt = torch.randint(-127, 128, (o, c, k, k), dtype=torch.int8, generator=gen)
    step = torch.tensor([0.03])
    args = (g, wt, step, [n, c, h, w], [stride] * 2, [p, p], 1 << 20)
    last, rows = native_quant.amx_conv_grad_input(*args), native_quant.amx_conv_grad_input(*args, channels_last=False)
    want = torch.nn.grad.conv2d_input([n, c, h, w], wt.double(), g.double(), [stride] * 2, [p, p]) * 0.03
    assert rows.is_contiguous() and not rows.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(rows, last) and torch.allclose(rows.double(), want, rtol=1e-6, atol=1e-4)

    from lq.ops import Int8ComputeConfig, int8_conv2d

    xf = torch.randn(n, c, h, w, generator=gen)
    wf = torch.randn(o, c, k, k, generator=gen)
    gf = torch.randn(n, o, ho, wo, generator=gen)
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = xf.clone(memory_format=fmt).requires_grad_()
        cfg = Int8ComputeConfig(grad_rounding="nearest")
        int8_conv2d(x, wf, None, stride, p, config=cfg, clip_state={}).backward(gf)
        grads.append(x.grad)
    assert grads[0].is_contiguous() and grads[1].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(grads[0], grads[1])


def test_conv_weights_with_zero_rows_stay_exact(unit) -> None:
    """The VNNI kernels skip the 4-byte rows of a step that are zero in every output channel (``amx.c`` ``kn``): a
    weight whose trailing input channels, right-hand taps or every entry are zero, by data rather than by layout,
    still gives the exact convolution plus bias (the skipped rows add nothing to the sums nor to the +128 offset's
    correction)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-127, 128, (2, 16, 9, 9), dtype=torch.int8, generator=gen).contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(24, generator=gen)
    for zero in ("channels", "taps", "all"):
        w = torch.randint(-127, 128, (24, 16, 3, 3), dtype=torch.int8, generator=gen)
        if zero == "channels":
            w[:, 10:] = 0
        elif zero == "taps":
            w[:, :, :, 1:] = 0
        else:
            w.zero_()
        y = native_quant.amx_conv(x, w, torch.ones(1), torch.ones(24), bias, [1, 1], 1 << 20)
        acc = F.conv2d(x.double(), w.double(), None, 1, 1)  # (exact: integer sums far below 2^53)
        want = acc.float() + bias.reshape(1, -1, 1, 1)  # the kernel's fp32 output stage, steps 1
        assert y is not None and torch.equal(y, want), zero


def test_a_reduction_beyond_onednns_limit_runs_the_tile_unit_exactly(unit) -> None:
    """C * kh * kw = 73,728 is beyond what oneDNN's biased-uint8 product keeps exact (66,313 for 8-bit operands) but
    within the tile unit's signed limit (133,144): forward and grad-input run the tile unit, exactly, instead of the
    float64 reference (review finding: the oneDNN check ran first)."""
    import torch.nn.functional as F

    from lq.ops import hardware as hw
    from lq.ops import int8_conv_kernels as K

    gen = torch.Generator().manual_seed(5)
    n, c, o, h = 1, 8192, 16, 3
    x = torch.randint(-127, 128, (n, c, h, h), dtype=torch.int8, generator=gen)
    wt = torch.randint(-127, 128, (o, c, 3, 3), dtype=torch.int8, generator=gen)
    args = ([1, 1], [1, 1], [1, 1], 1)
    with hw.record_kernels() as ran:
        y = K.int8_conv2d_fwd(x, wt, torch.ones(1), torch.ones(o), 127, 127, None, *args)
    assert ran == [f"int8_conv2d:{unit}"] and torch.equal(y.double(), F.conv2d(x.double(), wt.double(), None, 1, 1))
    wt2 = wt.transpose(0, 1).contiguous()  # [8192, 16, 3, 3]: grad-input reduces 8192 * 9
    g = torch.randint(-127, 128, (n, c, h, h), dtype=torch.int8, generator=gen)
    with hw.record_kernels() as ran:
        gx = K.int8_conv2d_grad_input(g, wt2, torch.ones(1), 127, 127, [n, o, h, h], *args)
    assert ran == [f"int8_conv2d_grad_input:{unit}"]
    assert torch.equal(gx.double(), torch.nn.grad.conv2d_input([n, o, h, h], wt2.double(), g.double(), 1, 1))


@pytest.mark.parametrize(("shape", "layout"), [((64, 300), "row-major")] + [
    (shape, layout) for shape in ((2, 16, 9, 9), (3, 70, 5, 6)) for layout in ("row-major", "channels-last")])
def test_per_channel_activations_quantize_as_the_torch_ops(shape, layout, threads) -> None:
    """quantize_along(x, qmax, 1) (a scale per column / channel: lq.ops.saved_int8's BatchNorm inputs) through the
    gradient-operand kernel gives the compiled torch path's integers and steps, ties and a zero channel included."""
    torch.manual_seed(len(shape))
    x = torch.randn(*shape)
    x.view(-1)[::7] = torch.round(x.view(-1)[::7] * 4) / 4  # ties after scaling are likelier
    x.select(1, 1).zero_()
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    q, step = quantize_along(x, 127, 1)
    q2, step2, _, _ = fused._quantize_dynamic(x, None, 127, 1)
    assert torch.equal(q, q2) and torch.equal(step.reshape(-1), step2.reshape(-1)) and q.stride() == x.stride()


@pytest.mark.parametrize("case", ["relu", "negative", "nan", "channels-last"])
def test_saved_activation_packing_matches_the_torch_ops(case, threads) -> None:
    """native_quant.pack_activation: a non-negative tensor's per-tensor int8 form as quantize_along makes it (the
    conv's own input quantization, shared with it), "negative" / "nonfinite" otherwise, in one call."""
    torch.manual_seed(3)
    x = torch.randn(8, 16, 7, 9)
    if case in ("relu", "channels-last"):
        x = x.relu()
    if case == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    if case == "nan":
        x = x.relu()
        x[1, 2, 3, 4] = float("nan")
    done = native_quant.pack_activation(x, 127)
    if case == "negative":
        assert done == "negative"
    elif case == "nan":
        assert done == "nonfinite"
    else:
        q, step = done
        q2, step2 = quantize_along(x, 127, None)
        assert torch.equal(q, q2) and torch.equal(step, step2) and q.stride() == x.stride()


@pytest.mark.parametrize(("shape", "layout"), [((64, 300), "row-major")] + [
    (shape, layout) for shape in ((2, 16, 9, 9), (3, 70, 5, 6), (4, 3, 1, 1))
    for layout in ("row-major", "channels-last")])
@pytest.mark.parametrize("axis", [None, 1])
def test_dequantization_is_the_torch_product(shape, layout, axis, threads) -> None:
    """Eq. 8 in one C pass (dequantize_along): (float) q * step bit for bit, per tensor and per channel, q's
    layout kept."""
    from lq.ops.quantize import dequantize_along

    gen = torch.Generator().manual_seed(len(shape))
    q = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
    if layout == "channels-last":
        q = q.contiguous(memory_format=torch.channels_last)
    step = torch.rand(1 if axis is None else shape[1], generator=gen) / 100
    got = native_quant.dequantize(q, step, axis)
    view = [1] * q.dim()
    if axis is not None:
        view[1] = -1
    want = q.float() * (step.reshape(()) if axis is None else step.reshape(view))
    assert got is not None and torch.equal(got, want) and got.stride() == q.stride()
    assert torch.equal(dequantize_along(q, step, axis), want)


def test_dequantization_keeps_a_learned_steps_gradient_and_refuses_a_bad_step() -> None:
    """A step that requires grad keeps its graph (the C pass is skipped), and several steps with keep_dim None raise
    as the torch expression does (review findings)."""
    from lq.ops.quantize import dequantize_along

    q = torch.randint(-127, 128, (4, 3, 5, 5), dtype=torch.int8)
    step = torch.full((3,), 0.1, requires_grad=True)
    out = dequantize_along(q, step, 1)
    out.sum().backward()
    assert out.grad_fn is not None and torch.equal(step.grad, q.float().sum((0, 2, 3)))
    with pytest.raises(RuntimeError):
        dequantize_along(q, torch.rand(3), None)


def test_sums_whose_unsigned_form_passes_int32_stay_exact(unit) -> None:
    """VNNI multiplies the input stored as ``x + 128`` and subtracts ``128 * sum(w)`` afterwards; with every operand
    at 127 and a reduction of 126,000 (the true sums 2.03e9, within int32; their offset form 4.1e9, beyond it) the
    wrapping int32 lanes and corrections must still give the exact sums, in the forward convolution (its weights'
    offset) and in the weight gradient (the input columns' offset, over several reduction chunks)."""
    from lq.ops import hardware as hw
    from lq.ops import int8_conv_kernels as K

    c = 14000  # 14,000 channels x 9 taps
    x = torch.full((1, c, 3, 3), 127, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    wt = torch.full((16, c, 3, 3), 127, dtype=torch.int8)
    y = native_quant.amx_conv(x, wt, torch.ones(1), torch.ones(16), None, [0, 0], 133_144)
    assert y is not None and torch.equal(y.double(), torch.full((1, 16, 1, 1), 126_000 * 127 * 127.0))
    n, hw_ = 1, 355  # the weight gradient of a 32 -> 16 channel 1x1 stride-2 layer: 126,025 positions, one tap
    x = torch.full((n, 32, 2 * hw_ - 1, 2 * hw_ - 1), 127, dtype=torch.int8).contiguous(
        memory_format=torch.channels_last)
    g = torch.full((n, 16, hw_, hw_), 127, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    with hw.record_kernels() as ran:
        gw = K._conv_grad_weight_cpu(g, x, torch.ones(16), torch.ones(1), 127, 127, [16, 32, 1, 1], [2, 2], [0, 0],
                                     [1, 1], 1)
    # (the stride-1 product on the subsampled input: on AMX one product of the channels-last operands)
    assert ran == [f"int8_conv2d_grad_weight:{'taps_vnni' if unit == 'vnni' else 'pointwise_amx'}"]
    assert torch.equal(gw.double(), torch.full((16, 32, 1, 1), hw_ * hw_ * 127 * 127.0))
    # a 1-channel 3x3 stem's weight gradient by dot products (126,025 positions per interior tap; the gradient rows'
    # unsigned form passes int32 in every sum)
    x = torch.full((1, 1, hw_, hw_), 127, dtype=torch.int8)
    g = torch.full((1, 16, hw_, hw_), 127, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    with hw.record_kernels() as ran:
        gw = K._conv_grad_weight_cpu(g, x, torch.ones(16), torch.ones(1), 127, 127, [16, 1, 3, 3], [1, 1], [1, 1],
                                     [1, 1], 1)
    assert ran == ["int8_conv2d_grad_weight:taps_dots"]
    exact = torch.nn.grad.conv2d_weight(x.double(), [16, 1, 3, 3], g.double(), 1, 1)
    assert exact.max() * 255 / 127 > 2**31  # (the sums of the gradient's unsigned form, 255 for 127, pass int32)
    assert torch.equal(gw, exact.float())  # (the int32 sums, rounded to fp32)


@pytest.mark.parametrize("flip", [0, 0x80])
def test_grid_rows_writes_every_byte_for_any_width_and_channel_count(flip, threads) -> None:
    """``grid_rows`` (the taps' gradient operand): the gradient at its grid positions and zeros everywhere else, each
    byte xor ``flip`` (VNNI's unsigned form), for rows and channel counts that are and are not multiples of 16 (the
    16 x 16 transposes' partial blocks overlap the previous block), a grid wider and taller than the gradient, and
    fewer grid rows than threads (the zeros are split between the threads by bytes, not by channel rows)."""
    gen = torch.Generator().manual_seed(flip)
    for n, o, ho, wo, hs, ws, lead in ((2, 16, 28, 28, 30, 30, 31), (1, 17, 5, 31, 6, 33, 0), (3, 40, 7, 7, 9, 9, 10),
                                       (1, 33, 16, 16, 16, 16, 3), (2, 8, 3, 20, 4, 21, 2), (1, 64, 1, 2, 1, 2, 0),
                                       (1, 3, 1, 2, 3, 5, 1), (2, 33, 5, 3, 6, 4, 3), (1, 16, 4, 1, 4, 2, 0),
                                       (4, 20, 3, 15, 3, 15, 5), (3, 48, 14, 14, 16, 16, 34)):
        g = torch.randint(-128, 128, (n, o, ho, wo), dtype=torch.int8, generator=gen).contiguous(
            memory_format=torch.channels_last)
        rows, width = -(-o // 32) * 32, lead + n * hs * ws + 37
        dst = torch.full((rows, width), 55, dtype=torch.int8)
        assert native_quant.grid_rows(g, dst, hs, ws, lead, flip)
        want = torch.zeros((rows, width), dtype=torch.int8)
        want[:o, lead : lead + n * hs * ws].view(o, n, hs, ws)[:, :, :ho, :wo] = g.permute(1, 0, 2, 3)
        assert torch.equal(dst, want.view(torch.uint8).bitwise_xor(flip).view(torch.int8)), (n, o, ho, wo)


@pytest.mark.parametrize("shape", [(1,), (17,), (64, 1024), (3, 5, 7, 2), (70001,)])
def test_grid_is_the_torch_ops_and_reports_non_finite_products(shape, threads) -> None:
    """``native_quant.grid`` (the converted layers' eq. 7 as fp32 integers) equals ``(x * s).round_().clamp_()``
    in fp32 (ties to even) for row-major and channels-last tensors, in place too, and flags a NaN, an Inf and a
    finite input whose product with ``s`` overflows fp32."""
    torch.manual_seed(len(shape))
    s = 37.25
    x = torch.randn(*shape) * 3
    flat = x.view(-1)
    flat[1::5] = (torch.arange(flat[1::5].numel()) % 300 - 150 + 0.5) / s  # ties of eq. 7, some beyond the clip
    layouts = [x] + ([x.contiguous(memory_format=torch.channels_last)] if x.dim() == 4 else [])
    for xx in layouts:
        for lo, hi in ((-127, 127), (0, 127), (0, 255)):
            ref = (xx * torch.tensor(s)).round_().clamp_(lo, hi)
            out, finite = native_quant.grid(xx, s, lo, hi)
            assert finite and out.stride() == xx.stride() and torch.equal(out, ref)
            inplace = xx.clone()
            assert native_quant.grid(inplace, s, lo, hi, out=inplace)[0] is inplace and torch.equal(inplace, ref)
    ties = flat[1::5] * s - (flat[1::5] * s).floor() == 0.5
    assert flat.numel() < 5 or ties.float().mean() > 0.8  # real ties, most of them
    for bad in (float("nan"), float("inf"), -float("inf"), 3e38):
        y = x.clone()
        y.view(-1)[-1] = bad
        assert native_quant.grid(y, s, -127, 127)[1] is False
    assert native_quant.grid(x.half(), s, -127, 127) is None
    if x.dim() == 2:
        assert native_quant.grid(x.t(), s, -127, 127) is None  # a transposed view
        assert native_quant.grid(x, s, -127, 127, out=torch.empty(x.shape[::-1]).t()) is None


@pytest.mark.parametrize("shape", [(2, 17, 5, 7), (3, 40, 14, 14), (1, 3, 100, 100), (4, 16, 28, 28), (2, 130, 4, 4)])
def test_channels_last_i8_is_torchs_layout_copy(shape, threads) -> None:
    """``channels_last_i8`` (``quant.c`` ``lq_to_nhwc_i8``: 16 x 16 byte transposes, a channel tail as an overlapping
    block, a position tail bytewise) gives exactly ``contiguous(memory_format=torch.channels_last)``: values and
    strides, for channel and position counts that are and are not multiples of 16; other tensors go to torch."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
    want = x.contiguous(memory_format=torch.channels_last)
    got = native_quant.channels_last_i8(x)
    assert torch.equal(got, want) and got.stride() == want.stride()
    assert native_quant.channels_last_i8(want) is want  # (already channels-last: no copy)
    f = x.float()
    assert torch.equal(native_quant.channels_last_i8(f), f.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("flip", [0, 0x80])
def test_conv_grid_writes_every_byte(flip, threads, unit) -> None:
    """``amx.c`` ``lq_conv_grid`` (the convolution kernels' input grid): row ``(n, u, v)`` holds ``x[n, u - ph, v - pw]``
    (its ``C`` bytes, then zeros up to ``cg``), zeros outside the image and in the rows past the grid, every byte xor
    ``flip``, for paddings 0-3, grids wider and taller than the padded image, channel counts equal to ``cg`` (the
    row copy with only the borders filled) and not."""
    gen = torch.Generator().manual_seed(flip + threads)
    lib = native_quant.tile_library()
    for n, c, cg, h, w, ph, pw, hs, ws in ((2, 16, 16, 5, 7, 1, 1, 7, 9), (1, 64, 64, 4, 4, 0, 0, 4, 4),
                                           (2, 16, 16, 3, 3, 3, 2, 8, 9), (1, 3, 4, 6, 5, 2, 0, 9, 6),
                                           (1, 32, 32, 2, 9, 0, 3, 3, 16), (1, 16, 16, 4, 4, 1, 1, 3, 3)):
        x = torch.randint(-128, 128, (n, c, h, w), dtype=torch.int8, generator=gen).contiguous(
            memory_format=torch.channels_last)
        rows = n * hs * ws + 5
        xg = torch.full((rows, cg), 55, dtype=torch.int8)
        lib.lq_conv_grid(x.data_ptr(), n, h, w, c, ph, pw, 0, hs, ws, cg, xg.data_ptr(), rows, flip,
                         torch.get_num_threads())
        want = torch.zeros((rows, cg), dtype=torch.int8)
        grid = want[: n * hs * ws].view(n, hs, ws, cg)
        xl = x.permute(0, 2, 3, 1)  # [N, H, W, C]
        u1, v1 = min(hs, h + ph), min(ws, w + pw)
        if u1 > ph and v1 > pw:
            grid[:, ph:u1, pw:v1, :c] = xl[:, : u1 - ph, : v1 - pw]
        assert torch.equal(xg, want.view(torch.uint8).bitwise_xor(flip).view(torch.int8)), (n, c, h, w, ph, pw, hs, ws)
