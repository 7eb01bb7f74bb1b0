"""Small-batch int8 chains in one call of a small C kernel (``lq/deploy/gemv.c``), built at first use.

**Linear chains** (:class:`Chain`, up to :data:`MAX_ROWS` rows). At batch 1 an int8 Linear layer is a
matrix-vector product that reads its weight once. On the 2-core AVX-512 VNNI host fbgemm, oneDNN and
``torch._int_mm`` take 37-57 us for a 1024 x 1024 int8 weight that the caches deliver in ~10 us, and an MLP adds a
Python call and an output-stage op per layer: lq's fbgemm program ran the 4 x 1024 MLP in ~200 us, torch.ao's
dynamic quantization in ~200 us. ``gemv.c`` runs the whole chain in one call (eq. 7 on the float input, then per
layer the exact int32 sums, eq. 10's ``acc * step_x * step_w[j] + bias[j]`` as fbgemm computes it, ReLU and the
next layer's eq. 7), each thread streaming its fixed slice of every weight: ~65-85 us for that MLP. The numbers
are fbgemm's, bit for bit: :func:`fbgemm_formula` finds once per process whether fbgemm's output stage rounds
``acc * mult + bias`` once (a fused multiply-add) or twice, and the chain uses that one.

**Conv2d chains** (:class:`ConvChain`, up to :data:`MAX_MACS` multiply-adds a call; VNNI hosts): a Sequential of
int8 Conv2d with ReLU and max pooling between them, im2col of the uint8 integers and the sums with the output
channels in the VNNI lanes; oneDNN's rounding of the output stage depends on the shape and the thread count, so
each convolution's is found per input size by running the layer itself on probes (:meth:`ConvChain._probe`).

``tests/test_deploy_gemv.py`` compares every instruction set this CPU has with fbgemm / oneDNN and with eq. 7 /
eq. 10 in float64. The kernel is C because no library has a fast exact int8 matrix-vector product (or a
set-up-free small convolution) for CPUs; :mod:`lq.native` builds it at first use (without a compiler the chains
run fbgemm / oneDNN as before, after one warning; ``LQ_NATIVE=0`` turns it off quietly).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lq import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
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
        ("mode", ctypes.c_int32), ("sx", ctypes.c_float), ("wstep", ctypes.c_void_p),  # (convolutions)
    ]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (``None`` where it cannot be built or ``LQ_NATIVE=0``; warned once)."""
    lib = native.load(SOURCE, "small-batch Linear and Conv2d chains run on fbgemm / oneDNN, slower")
    if lib is None:
        return None
    lib.lq_conv_chain.restype = ctypes.c_int64
    lib.lq_conv_chain.argtypes = [
        ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
    ]
    lib.lq_isa.restype = ctypes.c_int32
    lib.lq_chain.restype = ctypes.c_int64
    lib.lq_chain.argtypes = [
        ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
        ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
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
    input's ``x * s`` is not finite (the caller raises its own error, naming the layer). ``ValueError`` for
    layers that do not connect or sums that int32 cannot hold (more than :data:`MAX_K` inputs)."""

    def __init__(
        self, input_scale: float, input_qmax: int,
        layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool, tuple[float, int] | None]],
        fma: bool, isa: int | None = None,
    ) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("the batch-1 int8 kernel is not available here")
        if any(w.shape[1] > MAX_K for w, *_ in layers):
            raise ValueError(f"gemv.Chain: more than {MAX_K} inputs to a layer: its int32 sums could overflow")
        self._lib, self._isa = lib, lib.lq_isa() if isa is None else isa
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
                                     None if b is None else b.data_ptr(), n, k, kp, int(relu), s, q, int(fma))
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
                                 out.data_ptr(), work.data_ptr(), self._width, self._isa, torch.get_num_threads())
        return None if bad else out


_MISSING = object()


class _ConvOp(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("gemm", _Layer)] + [
        (name, ctypes.c_int64) for name in ("cin", "h", "w", "oh", "ow", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw")
    ] + [("wv", ctypes.c_void_p), ("wsum16", ctypes.c_void_p), ("mult16", ctypes.c_void_p), ("bias16", ctypes.c_void_p),
         ("wstep16", ctypes.c_void_p), ("kq", ctypes.c_int64)]


def _lanes(t: torch.Tensor, n16: int) -> torch.Tensor:
    """``t`` (per output channel) zero-padded to ``n16`` channels, contiguous."""
    out = torch.zeros(n16, dtype=t.dtype)
    out[: t.numel()] = t
    return out


def _pool_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Output length of max pooling along one dim: the chains' rule (``lq.deploy.chain``, which imports this
    module)."""
    from lq.deploy.chain import _out_size

    return _out_size(size, k, s, p, d, ceil_mode)


#: how a convolution's output stage rounds (``gemv.c``): acc * mult + bias, fma(acc, mult, bias), and
#: (acc * step_x) * step_w + bias; oneDNN uses more than one, depending on the shape and the thread count
MODES = (0, 1, 2)


class ConvChain:
    """Int8 Conv2d layers (groups 1, zero padding) with ReLU and max pooling between them, run by one kernel
    call for a few images: eq. 7 on the float input with ``(input_scale, qmax)``, then per entry of ``ops``
    either ``("conv", w int8 [cout, cin, kh, kw], mult [cout] = fp32(step_x) * step_w, bias or None, relu, next
    (s, qmax) or None, stride, padding, dilation, step_x, step_w [cout], input scale s)`` or ``("pool", kernel,
    stride, padding, dilation, ceil_mode)``; every convolution but the last hands over to the next grid, the last
    has a float output.

    How each convolution's output stage rounds (:data:`MODES`) is what its per-layer kernel does: oneDNN picks
    other implementations for other shapes, and they round differently (1x1 convolutions over a channel count
    that is not a multiple of 4, or outputs of 1 or 2 pixels, multiply by the two steps one after the other; some
    1x1 convolutions round differently at 1 and 2 threads). ``references[i]`` (the i-th convolution's per-layer
    forward, float in and out) is run per input size and thread count on probes of integers until one mode
    gives its numbers bit for bit (:meth:`_probe`); where none does, that size is not run here (:meth:`runs` is
    False). Without references, every convolution rounds with ``mode``.

    ``__call__`` returns the NCHW float output (contiguous for a contiguous input on the VNNI kernel, else
    channels-last strides), or ``None`` when an input's ``x * s`` is not finite."""

    def __init__(
        self, input_scale: float, input_qmax: int, ops: Sequence[tuple], references: Sequence[Callable] | None = None,
        mode: int = 0, isa: int | None = None,
    ) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("the batch-1 int8 kernel is not available here")
        convs = [op for op in ops if op[0] == "conv"]
        if not ops or ops[0][0] != "conv" or ops[-1][0] != "conv" or ops[-1][5] is not None:
            raise ValueError("gemv.ConvChain: starts with a convolution and ends with one of float output")
        if any(op[5] is None for op in convs[:-1]):
            raise ValueError("gemv.ConvChain: every convolution but the last hands over to the next one's grid")
        if references is not None and len(references) != len(convs):
            raise ValueError("gemv.ConvChain: one reference per convolution")
        if any(op[1][0].numel() > MAX_K for op in convs):
            raise ValueError(f"gemv.ConvChain: more than {MAX_K} products per output: its int32 sums could overflow")
        self._lib, self._isa = lib, lib.lq_isa() if isa is None else isa
        self._s, self._qmax = float(input_scale), int(input_qmax)
        self._ops, self._refs, self._mode = list(ops), references, int(mode)
        self._keep: list[torch.Tensor] = []
        self._tables: dict = {}
        self._geometry: dict = {}
        self._convs: list[tuple] = []
        channels = ops[0][1].shape[1]
        for op in convs:
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
            wstep = op[10].detach().to(torch.float32).contiguous()
            b = None if bias is None else bias.detach().to(torch.float32).contiguous()
            # the VNNI kernel's copy: output channels in the lanes, [cout16 / 16][kq / 4][16][4] (kq: k to 4)
            n16, kq = -(-cout // 16) * 16, -(-k // 4) * 4
            lanes = torch.zeros(n16, kq, dtype=torch.int8)
            lanes[:cout, :k] = padded[:, :k]
            lanes = lanes.reshape(n16 // 16, 16, kq // 4, 4).permute(0, 2, 1, 3).contiguous()
            extra = [lanes, _lanes(wsum, n16), _lanes(mult, n16), None if b is None else _lanes(b, n16),
                     _lanes(wstep, n16)]
            self._keep += [t for t in (padded, wsum, mult, wstep, b, *extra) if t is not None]
            s, q = (0.0, 0) if nxt is None else (float(nxt[0]), int(nxt[1]))
            layer = _Layer(padded.data_ptr(), wsum.data_ptr(), mult.data_ptr(), None if b is None else b.data_ptr(),
                           cout, k, kp, int(relu), s, q, self._mode, float(op[9]), wstep.data_ptr())
            vnni = [None if t is None else t.data_ptr() for t in extra] + [kq]
            q_in = int(input_qmax) if not self._convs else int(self._convs[-1][0].next_qmax)
            self._convs.append((layer, vnni, float(op[11]), q_in))
            channels = cout
        self.in_channels, self.out_channels = ops[0][1].shape[1], channels
        self._kp_max = max(c[0].kp for c in self._convs)

    def _shapes(self, h: int, w: int) -> list[tuple[int, int, int, int]] | None:
        """Each op's (input height, width, output height, width) for ``h x w`` images, ``None`` where an output
        would be empty (the per-layer path reports it); torch's pooling rule, which without ceil mode is also
        the convolution's."""
        key = (h, w)
        if key not in self._geometry:
            shapes: list | None = []
            for op in self._ops:
                if op[0] == "conv":
                    (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil = op[1].shape[2:], op[6], op[7], op[8], False
                else:
                    (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil = op[1:6]
                oh, ow = _pool_size(h, kh, sh, ph, dh, ceil), _pool_size(w, kw, sw, pw, dw, ceil)
                if oh <= 0 or ow <= 0:
                    shapes = None
                    break
                shapes.append((h, w, oh, ow))
                h, w = oh, ow
            if len(self._geometry) >= 64:  # many image sizes: start over
                self._geometry.clear()
            self._geometry[key] = shapes
        return self._geometry[key]

    def macs(self, h: int, w: int) -> int | None:
        """Multiply-adds of one ``h x w`` image through the chain (``None``: a layer's output would be empty);
        from the geometry alone (no probe)."""
        shapes = self._shapes(h, w)
        if shapes is None:
            return None
        return sum(oh * ow * op[1][0].numel() * op[1].shape[0]
                   for op, (_, _, oh, ow) in zip(self._ops, shapes) if op[0] == "conv")

    def _table(self, n: int, h: int, w: int) -> tuple | None:
        """(ops array, per-image largest integer tensor, per-image largest im2col, output size) for ``n``
        ``h x w`` images; ``None`` where a layer's output would be empty (the per-layer path reports it) or a
        convolution's rounding matches no mode."""
        # oneDNN's implementation (and its rounding) may depend on the batch and the thread count
        key = (n, h, w, torch.get_num_threads()) if self._refs is not None else (0, h, w, 0)
        made = self._tables.get(key, _MISSING)
        if made is not _MISSING:
            return made
        shapes = self._shapes(h, w)
        table = (_ConvOp * len(self._ops))()
        c, act, col, conv = self.in_channels, h * w * self.in_channels, 0, 0
        made = None
        for i, op in enumerate(self._ops if shapes is not None else ()):
            h, w, oh, ow = shapes[i]
            if op[0] == "conv":
                layer, vnni, s_in, q_in = self._convs[conv]
                (kh, kw), (sh, sw), (ph, pw), (dh, dw) = op[1].shape[2:], op[6], op[7], op[8]
                table[i] = _ConvOp(0, layer, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, *vnni)
                if self._refs is not None:
                    mode = self._probe(table[i], n, s_in, q_in, conv == 0, self._refs[conv])
                    if mode is None:
                        break
                    table[i].gemm.mode = mode
                conv += 1
                col = max(col, oh * ow * layer.kp)
                c = layer.n
            else:
                (kh, kw), (sh, sw), (ph, pw), (dh, dw) = op[1:5]
                table[i] = _ConvOp(1, _Layer(), c, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw)
            act = max(act, oh * ow * c)
        else:
            if shapes is not None:
                made = (table, act, col, (c, *shapes[-1][2:]))
        if len(self._tables) >= 16:  # many input sizes: start over
            self._tables.clear()
        self._tables[key] = made
        return made

    def _run(self, table, count: int, x: torch.Tensor, s: float, qmax: int, act: int, col: int,
             out_chw: tuple) -> torch.Tensor | None:
        n = x.shape[0]
        c, h, w = out_chw
        nchw = self._isa == VNNI and x.is_contiguous()  # (the output in the input's layout: no copy after)
        out = torch.empty((n, c, h, w) if nchw else (n, h, w, c), dtype=torch.float32, device="cpu")
        work = torch.empty(2 * n * act + n * col + 3 * self._kp_max, dtype=torch.uint8, device="cpu")  # (3 spare rows)
        base = work.data_ptr()
        bad = self._lib.lq_conv_chain(
            ctypes.addressof(table), count, n, x.data_ptr(), *x.stride(), s, qmax, out.data_ptr(), base, n * act,
            base + 2 * n * act, self._isa, torch.get_num_threads(), nchw,
        )
        return None if bad else out if nchw else out.permute(0, 3, 1, 2)

    def _probe(self, op: _ConvOp, n: int, s_in: float, q_in: int, signed: bool, reference: Callable) -> int | None:
        """The mode whose numbers equal ``reference``'s (the convolution's per-layer forward) on probes of this
        input size: eq. 7 integers in [-q_in, q_in] (``signed``, the first convolution) or [0, q_in] (the others
        take ReLU'd integers) as ``q / s``, which eq. 7 gives back. Probes again with new integers while more
        than one mode matches (a few outputs may not tell two roundings apart), up to 32 times; ``None`` if no
        mode or still more than one distinct mode matches."""
        from lq.ops import hardware as hw

        single = (_ConvOp * 1)(op)
        single[0].gemm.relu, single[0].gemm.next_s = 0, 0.0  # float output, no ReLU: the whole output stage seen
        rows, alive = op.oh * op.ow, set(MODES)
        if not op.gemm.bias:
            alive.discard(1)  # (no bias: fma(acc, mult, 0) is acc * mult, mode 0)
        for attempt in range(32):
            g = torch.Generator().manual_seed(attempt * 1_000_003 + n * 7919 + op.h * 31 + op.w)
            q = torch.randint(-q_in if signed else 0, q_in + 1, (n, op.cin, op.h, op.w), generator=g).to(torch.float32)
            xf = q / torch.tensor(s_in, dtype=torch.float32)
            try:
                with torch.no_grad(), hw.recording_suspended():  # (a probe, not a call of the model)
                    ref = reference(xf).float()
            except Exception as err:  # noqa: BLE001 - the layer cannot take this size: the fallback says why
                log.info("lq.deploy: probing a convolution on %s inputs failed (%s)", (n, op.cin, op.h, op.w), err)
                return None
            for mode in sorted(alive):
                single[0].gemm.mode = mode
                y = self._run(single, 1, xf.contiguous(), s_in, q_in, op.h * op.w * max(op.cin, op.gemm.n),
                              rows * op.gemm.kp, (op.gemm.n, op.oh, op.ow))
                if y is None or y.shape != ref.shape or not torch.equal(y, ref):
                    alive.discard(mode)
            if len(alive) <= 1:
                break
        if len(alive) == 1:
            return alive.pop()
        log.info("lq.deploy: a %dx%d convolution's oneDNN rounding on %s inputs is %s of gemv.c's modes; oneDNN "
                 "runs it", op.kh, op.kw, (n, op.cin, op.h, op.w), "none" if not alive else "not one")
        return None

    def _made(self, x: torch.Tensor) -> tuple | None:
        """:meth:`_table` for ``x``, or ``None`` where ``x`` is not a 4-D CPU float32 input of this chain's
        channels."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.dtype != torch.float32 or not x.is_cpu:
            return None
        return self._table(x.shape[0], x.shape[2], x.shape[3])

    def runs(self, x: torch.Tensor) -> bool:
        """Whether :meth:`__call__` takes ``x`` (4-D CPU float32 with this chain's channels, big enough, every
        convolution's rounding known for its size)."""
        return self._made(x) is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        made = self._made(x)
        if made is None:
            raise ValueError(f"gemv.ConvChain: cannot run a {x.dtype} {tuple(x.shape)} input on {x.device} (expected "
                             f"CPU float32 (N, {self.in_channels}, H, W), big enough for the chain)")
        table, act, col, out_chw = made
        return self._run(table, len(self._ops), x, self._s, self._qmax, act, col, out_chw)


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


#: multiply-adds per call up to which a Conv2d chain runs here rather than on oneDNN (VNNI host, SmallCNN 28 x 28,
#: 7.4M per image, us per call, kernel / oneDNN chain: 1 image 213 / 719, 4: 384 / 852, 8: 569 / 991, 16: 1003 /
#: 1191, 32: 1937 / 1564; ``benchmarks/RESULTS.md``): about 16 such images
MAX_MACS = 120_000_000


def conv_chain_step(
    first_scale: torch.Tensor, first_qmax: int, ops: Sequence[tuple], references: Sequence[Callable],
    fallback: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A step for 4-D inputs of up to :data:`MAX_MACS` multiply-adds: the :class:`ConvChain` (each convolution
    rounding as its per-layer forward in ``references`` does), ``fallback`` (the chain's oneDNN forward, same
    numbers) for bigger inputs, sizes the chain does not run and to raise its own error for a non-finite input.
    ``None`` where the kernel cannot run these layers."""
    from lq.deploy import kernels
    from lq.ops import hardware as hw

    # full range only: on a half-range (AVX2) host the per-layer path splits a signed input into [P, N] with the
    # weight [W, -W], a different oneDNN convolution whose rounding would depend on the data's sign
    if library() is None or not hw.onednn_available() or kernels.onednn_mode() != kernels.FULL_RANGE:
        return None
    try:
        chain = ConvChain(float(first_scale), first_qmax, ops, references)
    except ValueError:  # (layers that do not chain, or too wide: the fallback runs them, with the per-layer errors)
        return None

    def takes(x: torch.Tensor) -> bool:
        if x.dim() != 4:
            return False
        macs = chain.macs(x.shape[2], x.shape[3])  # (the geometry first: the probes only for sizes run here)
        return macs is not None and x.shape[0] * macs <= MAX_MACS and chain.runs(x)

    return _step(chain, takes, fallback, "Int8Conv2d", sum(op[0] == "conv" for op in ops))


def _step(
    chain: Callable[[torch.Tensor], torch.Tensor | None], takes: Callable[[torch.Tensor], bool],
    fallback: Callable[[torch.Tensor], torch.Tensor], layer: str, count: int,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``chain(x)`` where ``takes(x)``, else ``fallback(x)`` (the same numbers by the per-layer kernels, which
    also raise the error naming the layer for a non-finite input, where ``chain`` returns None); never under
    ``torch.jit.trace``, which cannot see a ctypes call (it would record an empty output)."""
    from lq.ops import hardware as hw

    recorders = hw._RECORDERS

    @torch.compiler.disable(recursive=False)
    def step(x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or not takes(x):
            return fallback(x)
        y = chain(x)
        if y is None:
            return fallback(x)
        if recorders:
            for _ in range(count):
                hw.ran(layer, "gemv")
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
    if fma is None:
        return None
    try:
        chain = Chain(float(first_scale), first_qmax, layers, fma)
    except ValueError:  # (layers that do not connect, or too wide: the fallback raises the per-layer path's error)
        return None

    def takes(x: torch.Tensor) -> bool:
        return x.shape[0] <= MAX_ROWS and x.shape[1] == chain.in_features

    return _step(chain, takes, fallback, "Int8Linear", len(layers))


__all__ = [
    "MAX_MACS", "MAX_ROWS", "MODES", "Chain", "ConvChain", "chain_step", "conv_chain_step",
    "fbgemm_formula", "isas", "library",
]
