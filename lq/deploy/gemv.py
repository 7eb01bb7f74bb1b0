"""Batch-1 int8 Linear chains in one call of a small C kernel (``lq/deploy/gemv.c``), built at first use.

At batch 1 an int8 Linear layer is a matrix-vector product that reads its weight once. On the 2-core AVX-512
VNNI host fbgemm, oneDNN and ``torch._int_mm`` take 37-57 us for a 1024 x 1024 int8 weight that the caches
deliver in ~10 us, and an MLP adds a Python call and an output-stage op per layer: lq's fbgemm program ran the
4 x 1024 MLP in ~200 us, torch.ao's dynamic quantization in ~200 us. ``gemv.c`` runs the whole chain in one
call (eq. 7 on the float input, then per layer the exact int32 sums, eq. 10's ``acc * step_x * step_w[j] +
bias[j]`` as fbgemm computes it, ReLU and the next layer's eq. 7), each thread streaming its fixed slice of
every weight: ~65 us for that MLP (``benchmarks/bench_convert.py``).

The numbers are fbgemm's, bit for bit: :func:`fbgemm_formula` finds once per process whether fbgemm's output
stage rounds ``acc * mult + bias`` once (a fused multiply-add) or twice, and the chain uses that one;
``tests/test_deploy_gemv.py`` compares every instruction set this CPU has with fbgemm and with eq. 7 / eq. 10
in float64. The kernel is C because no library has a fast exact int8 matrix-vector product for CPUs: it is
compiled with the C compiler Inductor uses too (``$CC``, else ``cc``/``gcc``/``clang``), ``-O3 -fopenmp
-ffp-contract=off``, once per source and compiler into ``$LQ_CACHE_DIR`` (default ``~/.cache/lq``), and its
OpenMP threads are torch's (the loader resolves ``libgomp.so.1`` to the copy torch loaded). Without a compiler
the chains run fbgemm's program as before, after one warning; ``LQ_NATIVE=0`` turns the kernel off quietly.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]
#: instruction sets of ``lq_isa`` (``gemv.c``): the integer sums are the same on each
SCALAR, AVX2, VNNI = 0, 1, 2
ISA_NAMES = {SCALAR: "scalar", AVX2: "avx2", VNNI: "avx512-vnni"}
#: rows up to which the chain runs here rather than on fbgemm's program (VNNI host, 4 x 1024 MLP, us per call,
#: kernel / fbgemm's program / torch.ao dynamic: 1 row 73 / 166 / 164, 8 rows 242 / 332 / 292, 16 rows 395-413 /
#: 439-488 / 377-419, 24 rows 572 / 574 / 500, 32 rows 709 / 678 / 591: bandwidth-bound at 1 row, compute above)
MAX_ROWS = 16
#: the int32 sums are exact while ``kp * 255 * 128 < 2**31``
MAX_K = 65536


class _Layer(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p), ("wsum", ctypes.c_void_p), ("mult", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("kp", ctypes.c_int64), ("relu", ctypes.c_int32),
        ("next_s", ctypes.c_float), ("next_qmax", ctypes.c_int32),
    ]


def _compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (split as a shell would: ``ccache gcc`` works), else the first of
    ``cc`` / ``gcc`` / ``clang`` on the path."""
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    found = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    return None if found is None else [found]


def cache_dir() -> Path:
    root = os.environ.get("LQ_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lq"
    return Path(root)


def _build(cc: list[str]) -> Path:
    """The shared library for this source and compiler, compiled unless the cache holds it (into a fresh
    temporary folder when the cache folder cannot be written)."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = SOURCE.read_text() + " ".join(cc) + version + " ".join(FLAGS) + sys.platform
    name = f"lq_gemv_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / name).exists():
            return folder / name
        tmp = tempfile.mkdtemp(dir=folder)  # the rename below makes concurrent builds safe
    except OSError as err:
        log.info("lq.deploy: cache folder %s not writable (%s); building in a temporary folder", cache_dir(), err)
        folder = Path(tempfile.mkdtemp(prefix="lq_gemv_"))
        tmp = tempfile.mkdtemp(dir=folder)
    built = Path(tmp) / name
    try:
        done = subprocess.run([*cc, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cc)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(built, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / name


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (``None`` where it cannot be built or ``LQ_NATIVE=0``; warned once)."""
    if os.environ.get("LQ_NATIVE", "1") == "0":
        return None
    cc = _compiler()
    try:
        if not cc:
            raise RuntimeError("no C compiler found (set CC)")
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as err:
        warnings.warn(
            f"lq.deploy: the batch-1 int8 kernel (lq/deploy/gemv.c) could not be built ({err}); batch-1 Linear "
            "chains run fbgemm's slower program. Install a C compiler or set CC to use it.",
            RuntimeWarning, stacklevel=2,
        )
        return None
    lib.lq_conv_chain.restype = ctypes.c_int64
    lib.lq_conv_chain.argtypes = [
        ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
    ]
    lib.lq_isa.restype = ctypes.c_int32
    lib.lq_chain.restype = ctypes.c_int64
    lib.lq_chain.argtypes = [
        ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
        ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
        ctypes.c_int32,
    ]
    log.info("lq.deploy: batch-1 int8 kernel loaded (%s)", ISA_NAMES[lib.lq_isa()])
    return lib


def isas() -> list[int]:
    """The instruction sets the kernel can use on this CPU (every one up to the best)."""
    lib = library()
    return [] if lib is None else list(range(lib.lq_isa() + 1))


class Chain:
    """Int8 Linear layers run by one kernel call: eq. 7 on the float input with ``(input_scale, qmax)``, then
    per layer ``(w int8 [n, k], mult [n] fp32, bias [n] fp32 or None, relu, next layer's (s, qmax) or None)``.
    Keeps its own padded copies of the weights. ``__call__`` returns the float output, or ``None`` when an
    input's ``x * s`` is not finite (the caller raises its own error, naming the layer)."""

    def __init__(
        self, input_scale: float, input_qmax: int,
        layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool, tuple[float, int] | None]],
        fma: bool, isa: int | None = None,
    ) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("the batch-1 int8 kernel is not available here")
        self._lib, self._fma, self._isa = lib, int(fma), lib.lq_isa() if isa is None else isa
        self._s, self._qmax = float(input_scale), int(input_qmax)
        self._keep: list[torch.Tensor] = []
        self._layers = (_Layer * len(layers))()
        width = 0
        for i, (w, mult, bias, relu, nxt) in enumerate(layers):
            n, k = w.shape
            kp = -(-k // 64) * 64
            padded = torch.zeros(n, kp, dtype=torch.int8)
            padded[:, :k] = w
            wsum = (128 * w.to(torch.int32).sum(1)).to(torch.int32).contiguous()
            mult = mult.detach().to(torch.float32).contiguous()
            b = None if bias is None else bias.detach().to(torch.float32).contiguous()
            self._keep += [padded, wsum, mult] + ([] if b is None else [b])
            s, q = (0.0, 0) if nxt is None else (float(nxt[0]), int(nxt[1]))
            self._layers[i] = _Layer(padded.data_ptr(), wsum.data_ptr(), mult.data_ptr(),
                                     None if b is None else b.data_ptr(), n, k, kp, int(relu), s, q)
            width = max(width, kp)
        for (w, *_), (nxt, *_) in zip(layers, layers[1:]):
            if w.shape[0] != nxt.shape[1]:
                raise ValueError(f"gemv.Chain: a layer of {w.shape[0]} outputs feeds one of {nxt.shape[1]} inputs")
        self.in_features, self.out_features = layers[0][0].shape[1], layers[-1][0].shape[0]
        self._width, self._count = width, len(layers)
        self._ptr = ctypes.addressof(self._layers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != torch.float32 or not x.is_cpu:
            raise ValueError(f"gemv.Chain: expected a CPU float32 (rows, {self.in_features}) input, got "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
        if not x.is_contiguous():
            x = x.contiguous()
        m = x.shape[0]
        out = torch.empty(m, self.out_features, dtype=torch.float32, device="cpu")  # (not the default dtype)
        work = torch.empty(2 * m * self._width, dtype=torch.uint8, device="cpu")
        bad = self._lib.lq_chain(self._ptr, self._count, m, x.data_ptr(), x.shape[1], self._s, self._qmax,
                                 out.data_ptr(), work.data_ptr(), self._width, self._isa, self._fma,
                                 torch.get_num_threads())
        return None if bad else out


class _ConvOp(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("gemm", _Layer)] + [
        (name, ctypes.c_int64) for name in ("cin", "h", "w", "oh", "ow", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw")
    ] + [("wv", ctypes.c_void_p), ("wsum16", ctypes.c_void_p), ("mult16", ctypes.c_void_p), ("bias16", ctypes.c_void_p),
         ("kq", ctypes.c_int64)]


def _lanes(t: torch.Tensor, n16: int) -> torch.Tensor:
    """``t`` (per output channel) zero-padded to ``n16`` channels, contiguous."""
    out = torch.zeros(n16, dtype=t.dtype)
    out[: t.numel()] = t
    return out


def _pool_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Output length of max pooling along one dim (torch's rule, ``ceil_mode`` included)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside the input or left padding
        out -= 1
    return out


class ConvChain:
    """Int8 Conv2d layers (groups 1, zero padding) with ReLU and max pooling between them, run by one kernel
    call for a few images: eq. 7 on the float input with ``(input_scale, qmax)``, then per entry of ``ops``
    either ``("conv", w int8 [cout, cin, kh, kw], mult [cout], bias or None, relu, next (s, qmax) or None,
    stride, padding, dilation)`` or ``("pool", kernel, stride, padding, dilation, ceil_mode)``; the last entry is
    a convolution with a float output. ``__call__`` returns the NCHW float output (contiguous for a contiguous
    input on the VNNI kernel, else channels-last strides), or
    ``None`` when an input's ``x * s`` is not finite. The kernel's tables are made once per input size."""

    def __init__(self, input_scale: float, input_qmax: int, ops: Sequence[tuple], fma: bool, isa: int | None = None):
        lib = library()
        if lib is None:
            raise RuntimeError("the batch-1 int8 kernel is not available here")
        if not ops or ops[0][0] != "conv" or ops[-1][0] != "conv" or ops[-1][5] is not None:
            raise ValueError("gemv.ConvChain: starts with a convolution and ends with one of float output")
        self._lib, self._fma, self._isa = lib, int(fma), lib.lq_isa() if isa is None else isa
        self._s, self._qmax = float(input_scale), int(input_qmax)
        self._ops, self._keep, self._tables = list(ops), [], {}
        self._convs: list[tuple] = []
        channels = ops[0][1].shape[1]
        for op in ops:
            if op[0] != "conv":
                continue
            w, mult, bias, relu, nxt = op[1:6]
            if w.shape[1] != channels:
                raise ValueError(f"gemv.ConvChain: a convolution of {w.shape[1]} input channels gets {channels}")
            cout, cin, kh, kw = w.shape
            k = kh * kw * cin
            kp = -(-k // 64) * 64
            padded = torch.zeros(cout, kp, dtype=torch.int8)
            padded[:, :k] = w.permute(0, 2, 3, 1).reshape(cout, k)  # taps (kh, kw) outer, input channels inner
            wsum = (128 * w.to(torch.int32).sum((1, 2, 3))).to(torch.int32).contiguous()
            mult = mult.detach().to(torch.float32).contiguous()
            b = None if bias is None else bias.detach().to(torch.float32).contiguous()
            # the VNNI kernel's copy: output channels in the lanes, [cout16 / 16][kq / 4][16][4] (kq: k to 4)
            n16, kq = -(-cout // 16) * 16, -(-k // 4) * 4
            lanes = torch.zeros(n16, kq, dtype=torch.int8)
            lanes[:cout, :k] = padded[:, :k]
            lanes = lanes.reshape(n16 // 16, 16, kq // 4, 4).permute(0, 2, 1, 3).contiguous()
            extra = [lanes, _lanes(wsum, n16), _lanes(mult, n16)] + ([] if b is None else [_lanes(b, n16)])
            self._keep += [padded, wsum, mult] + ([] if b is None else [b]) + extra
            s, q = (0.0, 0) if nxt is None else (float(nxt[0]), int(nxt[1]))
            self._convs.append((_Layer(padded.data_ptr(), wsum.data_ptr(), mult.data_ptr(),
                                       None if b is None else b.data_ptr(), cout, k, kp, int(relu), s, q),
                                [t.data_ptr() for t in extra[:3]] + [None if b is None else extra[3].data_ptr(), kq]))
            channels = cout
        self.in_channels, self.out_channels = ops[0][1].shape[1], channels

    def macs(self, h: int, w: int) -> int | None:
        """Multiply-adds of one ``h x w`` image through the chain (``None``: too small for it)."""
        made = self._table(h, w)
        return None if made is None else made[4]

    def _table(self, h: int, w: int) -> tuple | None:
        """(ops array, per-image largest integer tensor, per-image largest im2col, output size, multiply-adds
        per image) for ``h x w`` images; ``None`` where a layer's output would be empty (the per-layer path
        reports it)."""
        key = (h, w)
        if key not in self._tables:
            table = (_ConvOp * len(self._ops))()
            c, act, col, conv, macs = self.in_channels, h * w * self.in_channels, 0, 0, 0
            for i, op in enumerate(self._ops):
                if op[0] == "conv":
                    layer, vnni = self._convs[conv]
                    conv += 1
                    kh, kw = op[1].shape[2:]
                    (sh, sw), (ph, pw), (dh, dw) = op[6], op[7], op[8]
                    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
                    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
                    table[i] = _ConvOp(0, layer, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, *vnni)
                    col = max(col, oh * ow * layer.kp)
                    macs += oh * ow * layer.k * layer.n
                    c = layer.n
                else:
                    (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil = op[1:6]
                    oh = _pool_size(h, kh, sh, ph, dh, ceil)
                    ow = _pool_size(w, kw, sw, pw, dw, ceil)
                    table[i] = _ConvOp(1, _Layer(), c, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw)
                if oh <= 0 or ow <= 0:
                    self._tables[key] = None
                    return None
                h, w = oh, ow
                act = max(act, h * w * c)
            if len(self._tables) >= 16:  # many image sizes: start over
                self._tables.clear()
            self._tables[key] = (table, act, col, (c, h, w), macs)
        return self._tables[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.dtype != torch.float32 or not x.is_cpu:
            raise ValueError(f"gemv.ConvChain: expected a CPU float32 (N, {self.in_channels}, H, W) input, got "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
        made = self._table(x.shape[2], x.shape[3])
        if made is None:
            raise ValueError(f"gemv.ConvChain: input {tuple(x.shape)} too small for the chain")
        table, act, col, (c, h, w), _ = made
        n = x.shape[0]
        nchw = self._isa == VNNI and x.is_contiguous()  # (the output in the input's layout: no copy after)
        out = torch.empty((n, c, h, w) if nchw else (n, h, w, c), dtype=torch.float32, device="cpu")
        kp_max = max(layer.kp for layer, _ in self._convs)
        work = torch.empty(2 * n * act + n * col + 3 * kp_max, dtype=torch.uint8, device="cpu")  # (+ 3 spare rows)
        base = work.data_ptr()
        bad = self._lib.lq_conv_chain(
            ctypes.addressof(table), len(self._ops), n, x.data_ptr(), *x.stride(), self._s, self._qmax,
            out.data_ptr(), base, n * act, base + 2 * n * act, self._isa, self._fma, torch.get_num_threads(), nchw,
        )
        return None if bad else out if nchw else out.permute(0, 3, 1, 2)


@functools.cache
def fbgemm_formula() -> bool | None:
    """Whether fbgemm's float output stage on this CPU computes ``acc * mult + bias`` with one rounding
    (``True``: a fused multiply-add) or two (``False``), found on a random layer against fbgemm itself;
    ``None`` where neither matches bit for bit (then the chains keep fbgemm's program) or fbgemm is missing."""
    from lq.deploy import kernels

    if library() is None or kernels.fbgemm_mode() == kernels.UNAVAILABLE:
        return None
    g = torch.Generator().manual_seed(0)
    n, k, f32 = 67, 200, torch.float32  # (explicit dtypes: the caller's default dtype may be float64)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    mult = torch.rand(n, generator=g, dtype=f32) * 1e-3 + 1e-5
    bias = torch.randn(n, generator=g, dtype=f32)
    # integers (eq. 7 with s = 1 gives them back), non-negative: fbgemm takes them in either accumulation mode
    x = torch.randint(0, 128, (3, k), generator=g).to(f32)
    packed = kernels.fbgemm_prepack(w, mult, bias)
    found = None
    for relu in (False, True):
        ref = kernels.fbgemm_op(relu)(x, 1.0, 0, packed)
        matches = [fma for fma in (True, False)
                   if torch.equal(Chain(1.0, 127, [(w, mult, bias, relu, None)], fma)(x), ref)]
        if not matches or (found is not None and found not in matches):
            log.info("lq.deploy: fbgemm's output stage matches no formula of gemv.c; batch-1 chains use fbgemm")
            return None
        found = matches[0]
    return found


@functools.cache
def onednn_conv_formula() -> bool | None:
    """As :func:`fbgemm_formula`, for oneDNN's int8 convolution with a float output (the kernel of lq's
    per-layer Conv2d on CPU): ``True`` if it rounds ``acc * mult + bias`` once, ``False`` if twice (what the
    VNNI host's oneDNN does), ``None`` where neither matches or oneDNN is missing."""
    from lq.deploy import kernels
    from lq.ops import hardware as hw

    if library() is None or not hw.onednn_available():
        return None
    g = torch.Generator().manual_seed(1)
    f32 = torch.float32
    w = torch.randint(-127, 128, (19, 5, 3, 3), generator=g, dtype=torch.int8)
    w_step = torch.rand(19, generator=g, dtype=f32) * 1e-2 + 1e-4
    step_x = 0.0371
    bias = torch.randn(19, generator=g, dtype=f32)
    q = torch.randint(0, 128, (2, 5, 9, 7), generator=g).to(f32)  # non-negative integers: zero point 0 anywhere
    try:
        packed = torch.ops.onednn.qconv_prepack(w, w_step, step_x, 0, [1, 1], [1, 1], [1, 1], 1, None)
        ref = kernels.onednn_conv(q.to(torch.uint8), 0, packed, step_x, w_step, bias, (1, 1), (1, 1), (1, 1), 1)
    except Exception as err:  # noqa: BLE001 - no usable oneDNN: the chains keep the per-layer kernels
        log.info("lq.deploy: oneDNN conv self-test failed (%s)", err)
        return None
    mult = torch.tensor(step_x, dtype=f32) * w_step
    for fma in (False, True):
        chain = ConvChain(1.0, 127, [("conv", w, mult, bias, False, None, (1, 1), (1, 1), (1, 1))], fma)
        if torch.equal(chain(q), ref.float()):
            return fma
    log.info("lq.deploy: oneDNN's conv output stage matches no formula of gemv.c; conv chains use oneDNN")
    return None


#: multiply-adds per call up to which a Conv2d chain runs here rather than on oneDNN (VNNI host, SmallCNN 28 x 28,
#: 7.4M per image, us per call, kernel / oneDNN chain: 1 image 213 / 719, 4: 384 / 852, 8: 569 / 991, 16: 1003 /
#: 1191, 32: 1937 / 1564; ``benchmarks/RESULTS.md``): about 16 such images
MAX_MACS = 120_000_000


def conv_chain_step(
    first_scale: torch.Tensor, first_qmax: int, ops: Sequence[tuple], fallback: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A step for 4-D inputs of up to :data:`MAX_MACS` multiply-adds: the :class:`ConvChain`, ``fallback``
    (the chain's oneDNN forward, same numbers) for bigger inputs, too-small ones and to raise its own error for
    a non-finite input. ``None`` where the kernel cannot run these layers."""
    fma = onednn_conv_formula()
    if fma is None or any(op[0] == "conv" and op[1][0].numel() > MAX_K for op in ops):
        return None
    try:
        chain = ConvChain(float(first_scale), first_qmax, ops, fma)
    except ValueError:  # (channels that do not connect: the fallback raises the per-layer path's error)
        return None
    from lq.ops import hardware as hw

    recorders, count = hw._RECORDERS, sum(op[0] == "conv" for op in ops)

    @torch.compiler.disable(recursive=False)
    def step(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != chain.in_channels or x.dtype != torch.float32 or not x.is_cpu:
            return fallback(x)
        macs = chain.macs(x.shape[2], x.shape[3])
        if macs is None or x.shape[0] * macs > MAX_MACS or torch.jit.is_tracing():
            return fallback(x)
        y = chain(x)
        if y is None:  # NaN / Inf: the per-layer kernels raise the error that names the layer
            return fallback(x)
        if recorders:
            for _ in range(count):
                hw.ran("Int8Conv2d", "gemv")
        return y

    return step


def chain_step(
    first_scale: torch.Tensor, first_qmax: int,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool, tuple[float, int] | None]],
    fallback: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A batch-1 program step: the chain for inputs of up to :data:`MAX_ROWS` rows, ``fallback`` (fbgemm's
    program, same numbers) for more rows and to raise its own error for a non-finite input. ``None`` where
    the kernel cannot run these layers (not built, fbgemm's formula unknown, a dimension too large)."""
    fma = fbgemm_formula()
    if fma is None or any(w.shape[1] > MAX_K for w, *_ in layers):
        return None
    if any(w.shape[0] != nxt.shape[1] for (w, *_), (nxt, *_) in zip(layers, layers[1:])):
        return None  # (layers that do not connect: the fallback raises the per-layer path's error)
    chain = Chain(float(first_scale), first_qmax, layers, fma)
    from lq.ops import hardware as hw

    recorders, count = hw._RECORDERS, len(layers)

    @torch.compiler.disable(recursive=False)
    def step(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > MAX_ROWS or x.shape[1] != chain.in_features or torch.jit.is_tracing():
            return fallback(x)  # (torch.jit.trace cannot see a ctypes call: it would record an empty output)
        y = chain(x)
        if y is None:  # NaN / Inf: fbgemm's program raises the error that names the layer
            return fallback(x)
        if recorders:
            for _ in range(count):
                hw.ran("Int8Linear", "gemv")
        return y

    return step


__all__ = [
    "MAX_MACS", "MAX_ROWS", "Chain", "ConvChain", "cache_dir", "chain_step", "conv_chain_step", "fbgemm_formula",
    "isas", "library", "onednn_conv_formula",
]
