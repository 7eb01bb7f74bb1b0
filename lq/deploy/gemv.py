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


__all__ = ["Chain", "MAX_ROWS", "cache_dir", "chain_step", "fbgemm_formula", "isas", "library"]
