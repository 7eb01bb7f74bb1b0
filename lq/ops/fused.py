"""Fused quantization kernels (amax reduction + scale + round + clamp + int8 cast in one or two loops).

In eager mode quantizing one tensor is ~6 separate passes over it (abs, amax, mul, round, clamp, cast);
quantize/dequantize overhead decides whether int8 training is faster than fp32 at all, so these helpers
are compiled with ``torch.compile`` (Inductor generates one C++/OpenMP loop per reduction and per
elementwise chain). Compilation is lazy and ``dynamic=True`` (not one compile per shape; Inductor's
on-disk cache makes later processes start fast). Each static variant of a helper (tensor ranks and dtypes,
which optional operands are given, the int arguments such as ``qmax`` or the kept dim) gets its own copy of
the function's code object, hence its own Dynamo cache: a network whose layers need more variants than
Dynamo's per-code recompile limit (8) would otherwise fall back to eager ops after the 8th. Compiling can be
switched off with the environment variable ``LQ_COMPILE_QUANT=0``. If compiling fails the eager versions run, with a one-time
warning. Results are identical either way (tests compare against the eager math).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Hashable

import torch

from lq.ops import hardware as hw

try:  # numpy's PCG64 makes the CPU noise table (noise_pool) at twice the speed of torch's mt19937
    import numpy as _np
except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
    _np = None
from lq.quant.functional import AMAX_EPS

__all__ = ["amax_along", "compile_enabled", "noise_bits", "quantize_dynamic", "quantize_with_scale", "uniform_hash"]


def compile_enabled() -> bool:
    return os.environ.get("LQ_COMPILE_QUANT", "1") != "0" and hasattr(torch, "compile")


def _reduce_dims(ndim: int, keep_dim: int | None) -> list[int]:
    return [d for d in range(ndim) if d != keep_dim]


def _amax_along(x: torch.Tensor, mult: torch.Tensor | None, keep_dim: int | None) -> torch.Tensor:
    y = x.float() if mult is None else x.float() * mult
    if keep_dim is None:
        return y.abs().amax().reshape(1)
    return y.abs().amax(dim=_reduce_dims(x.dim(), keep_dim))


_M32 = 0xFFFFFFFF


def uniform_hash(like: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Uniform noise in [0, 1) of ``like``'s shape (fp32, multiples of 2^-24) from a counter-based hash: element
    ``i`` gets ``lowbias32(i * 0x9E3779B1 + seed)`` (C. Wellons' 32-bit integer hash: xor-shifts and two
    multiplies, low 32 bits kept; int64 products wrap, which keeps those bits exact), top 24 bits scaled.

    For stochastic rounding inside a compiled kernel: Inductor fuses these integer ops into the quantizing loop,
    so no noise tensor is written or read and no generator runs per element. 4x cheaper than ``torch.rand`` +
    the fused quantization on a 64x16x28x28 gradient (0.61 vs 2.4 ms, AVX-512 host, 2 threads; ``torch.rand``'s
    mt19937 is 16% of an int8 training step); torch's own compiled ``rand`` (Philox per element) was slower
    still; the default's :func:`noise_bits` (one random byte an element) now costs about as much.
    Used by ``Int8ComputeConfig(grad_rounding="stochastic_hash")``, opt-in: seven seeds of fashion_int8_train
    averaged 1.6 points below ``torch.rand`` noise (benchmarks/RESULTS.md). Statistics checked in
    ``tests/test_ops_grad_quant.py`` (moments, histogram, lag correlation, unbiased rounding). ``seed`` (0-d
    int64, drawn from torch's generator per call) makes calls differ and ``torch.manual_seed`` reproduce them;
    the pattern repeats after 2^32 elements."""
    # counters in memory order, so the fused loop walks the gradient's own layout (2.2x faster on a
    # channels-last 64x16x28x28 gradient than counters in logical order)
    i = _memory_order(torch.arange(like.numel(), device=like.device, dtype=torch.int64), like)
    h = ((i & _M32) * 0x9E3779B1 + seed) & _M32
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _M32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


NOISE_BITS = 7


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is a 4-d tensor stored channels-last (NHWC) and not also row-major (e.g. one channel)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _memory_order(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``flat`` (``like.numel()`` elements) viewed in ``like``'s shape with consecutive elements in ``like``'s
    memory order (channels-last 4-d tensors), so a fused loop over ``like`` reads ``flat`` sequentially."""
    if is_channels_last(like):
        n, c, h, w = like.shape
        return flat.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return flat.reshape(like.shape)


def noise_bits(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bits for stochastic rounding, ``(bits, shift)``: an int8 tensor of ``like``'s shape whose low
    ``NOISE_BITS`` (7) bits give the noise level, and a 0-d fp32 ``shift`` = ``(k + 1/2) / 128`` with ``k``
    uniform in 0..127, drawn per call; both reproducible with ``torch.manual_seed``. The fused quantization
    kernel reads 1 byte an element instead of ``torch.rand``'s 4 (whose per-element mt19937 draws were 20% of
    an int8 SmallResNet step; int16 bits, 15 of them, took 1.3 ms on a 64x16x28x28 gradient: Inductor's CPU
    loops do not vectorize int16 -> float). The kernel makes ``u = frac(b / 2^7 + shift)`` of byte ``b``: the
    midpoint of bin ``(b + k) mod 128`` of 2^7 equal bins of [0, 1). With ``k`` uniform and drawn afresh every
    call, that bin is uniform at every element on every call, whatever the bytes are, so ``floor(y + u)`` has
    expectation ``floor(y)`` plus ``frac(y)`` rounded to the nearest 1/128: unbiased within 1/256 of a step,
    that error zero-mean over the fractions; only entries below 1/256 of a step (in magnitude) always round
    to 0. The bytes make the elements of one call independent of each other.

    Where the bytes come from (:func:`random_bytes`): on CPU, a window of a fixed table of random bytes at an
    offset drawn from torch's generator (no bytes made per call: the per-call PCG64 draw cost 0.4 ms per MiB,
    8% of an int8 Linear step); on other devices torch's generator (Philox on CUDA). The shift is what makes
    the table's windows safe: without it an element's level over many calls would follow the table's bytes at
    its position modulo 64 (the offsets' step), a bias of ~0.1% of a step shared by every element 64 bytes
    apart, i.e. by whole gradient columns of most layers (a review measured it)."""
    r = int(torch.randint(0, POOL_WINDOWS << NOISE_BITS, (1,)))  # one draw: the window and the level shift
    window = (r >> NOISE_BITS) if like.device.type == "cpu" else None
    bits = _memory_order(random_bytes(like.numel(), like.device, window), like)
    return bits, _shift(r & ((1 << NOISE_BITS) - 1), like.device)


_SHIFTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _level_shift(k):
    """``(k + 1/2) / 128`` for a level ``k`` (an int, or a tensor in a compiled graph)."""
    return (k + 0.5) / (1 << NOISE_BITS)


def _shift(k: int, device: torch.device) -> torch.Tensor:
    """:func:`_level_shift` of ``k`` as a 0-d fp32 tensor on ``device`` (cached: 128 values a device)."""
    t = _SHIFTS.get((k, device))
    if t is None:
        with torch.inference_mode(False):  # never an inference tensor (a first call under inference_mode)
            t = torch.tensor(_level_shift(k), dtype=torch.float32, device=device)
        _SHIFTS[(k, device)] = t
    return t


#: CPU noise offsets: multiples of 64 bytes (the compiled kernels' inputs stay aligned) below 64 * POOL_WINDOWS (16 MiB)
POOL_WINDOWS = 1 << 18
_POOL_SEED = 0x1A5EED_0B17E5  # the table is the same in every process (numpy's PCG64 stream of this seed)
_pool: torch.Tensor | None = None


def noise_pool(n: int) -> torch.Tensor:
    """The CPU noise table: at least ``64 * POOL_WINDOWS + n`` random bytes (int8), a fixed stream (numpy's
    PCG64 of ``_POOL_SEED``, every byte uniform; without numpy torch's mt19937 of it, whose every fourth byte
    is uniform over 0..127 only, all the noise uses) made once and lengthened when a
    larger tensor needs it (a longer table starts with the same bytes). 16 MiB plus twice the largest tensor
    quantized so far, made in ~5 ms."""
    global _pool
    need = 64 * POOL_WINDOWS + n
    if _pool is None or _pool.numel() < need:
        size = -(-max(need, 2 * n + 64 * POOL_WINDOWS) // 8) * 8
        with torch.inference_mode(False):  # never an inference tensor (a first call under inference_mode)
            _pool = _make_pool(size)
    return _pool


def _make_pool(size: int) -> torch.Tensor:
    if _np is not None:
        return torch.from_numpy(_np.random.PCG64(_POOL_SEED).random_raw(size // 8)).view(torch.int8)
    gen = torch.Generator().manual_seed(_POOL_SEED)
    return torch.empty(size // 4, dtype=torch.int32).random_(generator=gen).view(torch.int8)


def random_bytes(n: int, device: torch.device, seed: int | None = None) -> torch.Tensor:
    """``n`` uniformly random bytes as int8, a deterministic function of torch's generator for ``device``
    (``torch.manual_seed`` reproduces them; each call draws once from it, so later draws move on as usual), or
    of ``seed`` when given (then torch's generator is not touched).

    CPU: the window of :func:`noise_pool` at a random offset (``64 * w``, ``w`` uniform below
    ``POOL_WINDOWS``, or ``seed % POOL_WINDOWS``), read-only (a view of the shared table). Neighbouring
    elements get independent bytes (the table's); over calls an element sees the 2^18 bytes the windows put at
    its position, which alone would leave each position modulo 64 a small rounding bias of its own:
    :func:`noise_bits` adds a level shift drawn per call, which makes every element's noise level exactly
    uniform on every call (tested). Two calls' windows overlap in shifted copies, so an element's bytes in one
    call are another element's in another. Other devices: torch's generator (31-bit int32 draws, whose top
    byte is uniform over 0..127 only: still every 7-bit value equally often, which is what NOISE_BITS uses)."""
    if device.type == "cpu":
        w = int(torch.randint(0, POOL_WINDOWS, (1,))) if seed is None else seed % POOL_WINDOWS
        return noise_pool(n)[64 * w : 64 * w + n]
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    r = torch.empty((n + 3) // 4, dtype=torch.int32, device=device).random_(generator=gen)
    return r.view(torch.int8)[:n]


@torch.library.custom_op("lq::noise_bytes", mutates_args=())
def noise_bytes(like: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """:func:`noise_bits` as an op for compiled graphs: an int8 tensor laid out like ``like`` (its bytes in
    ``like``'s memory order) of uniformly random bytes, a deterministic function of ``seed`` (an int64 ``[1]``
    drawn in the graph, so ``torch.manual_seed`` reproduces a compiled run; the draws differ from eager's,
    whose seed comes from torch's generator outside the graph). The bytes of :func:`random_bytes` for
    ``seed >> 7`` (on CPU a window of the noise table; the low 7 bits make the level shift in the graph), not
    an in-graph hash. Opaque to the compiler, which cannot trace numpy."""
    out = torch.empty_like(like, dtype=torch.int8)
    n = out.numel()
    flat = random_bytes(n, like.device, int(seed.reshape(-1)[0]) >> NOISE_BITS)  # (the low bits: the shift)
    out.as_strided((n,), (1,)).copy_(flat)  # (empty_like of a dense tensor: its memory in order)
    return out


@noise_bytes.register_fake
def _(like, seed):
    return torch.empty_like(like, dtype=torch.int8)


def _uniform_from_bits(bits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``u = frac(b / 128 + shift)`` (exact in fp32: every term a multiple of 1/256 below 2), see noise_bits."""
    w = bits.to(torch.float32) * (1.0 / (1 << NOISE_BITS)) + shift
    return w - torch.floor(w)


def _quantize_with_scale(
    x: torch.Tensor,
    mult: torch.Tensor | None,
    s: torch.Tensor,
    qmax: int,
    keep_dim: int | None,
    noise: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    y = x.float() if mult is None else x.float() * mult
    if keep_dim is None:
        sb = s.reshape(())
    else:
        shape = [1] * x.dim()
        shape[keep_dim] = -1
        sb = s.reshape(shape)
    # stochastic rounding floor(y + u), u uniform in [0, 1): E = y (to within 1/256 of a step for noise_bits'
    # 128 levels); u from ``noise`` (noise_bits' bytes, ``seed`` then being its level shift) or made here from
    # ``seed`` alone (uniform_hash)
    if noise is not None:
        r = torch.floor(y * sb + _uniform_from_bits(noise, seed))
    elif seed is not None:
        r = torch.floor(y * sb + uniform_hash(y, seed))
    else:
        r = torch.round(y * sb)
    return torch.clamp(r, -qmax, qmax).to(torch.int8)


_compiled: dict[tuple[str, Hashable], Callable] = {}


def _static_key(args: tuple) -> Hashable:
    """What Dynamo guards on besides sizes: grad/inference/autocast modes, deterministic algorithms,
    dtypes/devices/requires_grad/inference-ness of tensors, which sizes are 0 or 1, the memory layout
    (contiguity, order of the strides, zero strides of expanded tensors), None-ness and other values."""
    key: list = [
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled("cpu"),
        torch.is_autocast_enabled("cuda"),
        torch.are_deterministic_algorithms_enabled(),
    ]
    for a in args:
        if isinstance(a, torch.Tensor):
            layout = () if a.is_contiguous() else (
                tuple(sorted(range(a.dim()), key=lambda d: (a.stride(d), d))), tuple(s == 0 for s in a.stride())
            )
            key.append((
                a.dtype, a.device.type, a.requires_grad, a.is_inference(),
                tuple(min(n, 2) for n in a.shape),  # Dynamo specialises sizes 0 and 1 even with dynamic=True
                layout,
            ))
        elif a is None or isinstance(a, (bool, int, float, str)):
            key.append(a)
        else:
            key.append(type(a).__name__)
    return tuple(key)


def _fresh_copy(fn: Callable) -> Callable:
    """``fn`` with its own code object (Dynamo keys its cache and recompile limit on the code object)."""
    code = fn.__code__.replace()
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


_failed: set[str] = set()

# Eager's IEEE division and denormals in the generated GPU code too (Triton lowers fp32 ``/`` to an approximate
# divide and flushes denormals by default): scales and steps computed in a compiled graph (``qmax / amax``,
# ``1 / s``) must equal the eager ones bit for bit, which ``lq.ops.saved_int8`` and the tests rely on. The C++
# code Inductor writes for CPUs divides exactly either way.
_EXACT = {"eager_numerics.division_rounding": True, "eager_numerics.disable_ftz": True}


def call(name: str, fn: Callable, *args):
    """Run ``fn(*args)`` compiled (one compiled copy per ``name`` and static variant of ``args``), or
    eagerly when compiling is off or has failed once for ``name`` (warned once; an error the eager ops raise
    as well propagates and leaves the compiled copies in use). Called while ``torch.compile`` traces a caller
    (a compiled int8 model), ``fn`` is traced into the caller's graph."""
    if torch.compiler.is_compiling() or not compile_enabled() or name in _failed:
        return fn(*args)  # (inside a compiled caller the function is traced into the caller's graph)
    # nn.Parameter inputs get static shapes in Dynamo (one compile per weight shape): pass plain tensors
    # (``type(a) is not torch.Tensor`` first: Parameter's isinstance goes through a metaclass hook, ~1 us)
    args = tuple(a.detach() if type(a) is not torch.Tensor and isinstance(a, torch.nn.Parameter) else a for a in args)
    key = (name, _static_key(args))
    compiled = _compiled.get(key)
    if compiled is None:
        compiled = _compiled[key] = torch.compile(_fresh_copy(fn), dynamic=True, fullgraph=True, options=_EXACT)
    try:
        return compiled(*args)
    except Exception as err:  # noqa: BLE001 - any compiler failure: fall back to eager, once loudly
        # inputs the eager ops reject too (a data error, e.g. an index out of range) raise the eager error and
        # keep the compiled kernels; only a failure of the compiled path itself switches ``name`` to eager
        out = fn(*args)
        hw.warn_once(f"fused:{name}", f"lq.ops.fused: torch.compile of {name} failed ({err!r}); using eager ops.")
        _failed.add(name)
        return out


def amax_along(x: torch.Tensor, keep_dim: int | None, mult: torch.Tensor | None = None) -> torch.Tensor:
    """``max |x * mult|`` over every dimension but ``keep_dim`` (``None``: the whole tensor, shape [1])."""
    keep_dim = None if keep_dim is None else keep_dim % x.dim()
    return call("amax_along", _amax_along, x, mult, keep_dim)


def _quantize_dynamic(x: torch.Tensor, amax: torch.Tensor | None, qmax: int, keep_dim: int | None):
    data_amax = _amax_along(x, None, None if amax is not None else keep_dim)
    s = scale_from_amax(data_amax if amax is None else amax, qmax)
    q = _quantize_with_scale(x, None, s, qmax, keep_dim)
    return q, 1.0 / s, data_amax, torch.isfinite(data_amax).all()


def quantize_dynamic(
    x: torch.Tensor, qmax: int, keep_dim: int | None, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 6-7 in one compiled call: the amax of ``x`` (per index of ``keep_dim``), the scale from it (or from
    ``amax``, a calibrated one, given as fp32 ``[1]``), the int8 values and their step ``1 / s``. Returns
    ``(q, step, data_amax, finite)``; ``finite`` (0-d bool) says whether ``data_amax`` is finite (else ``q`` is
    meaningless: the caller raises). The same operations as :func:`amax_along`, :func:`scale_from_amax` and
    :func:`quantize_with_scale` one after the other (bit-identical), in one call instead of two compiled calls
    and five eager ops: ~115 -> ~45 us a quantization of a small tensor, 20 of them in a SmallResNet forward."""
    keep_dim = None if keep_dim is None else keep_dim % x.dim()
    return call("quantize_dynamic", _quantize_dynamic, x, amax, qmax, keep_dim)


def quantize_with_scale(
    x: torch.Tensor,
    s: torch.Tensor,
    qmax: int,
    keep_dim: int | None,
    mult: torch.Tensor | None = None,
    stochastic: bool | str = False,
) -> torch.Tensor:
    """Eq. 7: ``clamp(round(x * mult * s), -qmax, qmax)`` as int8, ``s`` per index of ``keep_dim``;
    ``stochastic``: ``floor(x * mult * s + u)`` with ``u`` uniform in [0, 1) instead of round (unbiased; to
    within 1/256 of a step with :func:`noise_bits`' 128 levels),
    ``u`` from :func:`noise_bits` (``True`` / ``"rand"``: random bytes, :func:`random_bytes`) or from
    :func:`uniform_hash` inside the kernel (``"hash"``, see ``Int8ComputeConfig.grad_rounding``)."""
    keep_dim = None if keep_dim is None else keep_dim % x.dim()
    noise, seed = rounding_inputs(x, stochastic)
    return call("quantize_with_scale", _quantize_with_scale, x, mult, s, qmax, keep_dim, noise, seed)


def rounding_inputs(x: torch.Tensor, stochastic: bool | str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(noise, seed)`` for ``_quantize_with_scale``: random bits and their level shift (:func:`noise_bits`)
    for ``True`` / ``"rand"`` (traced into a compiled graph: the bits from :func:`noise_bytes`, an opaque op,
    and the shift from the same in-graph draw), no bits and a 0-d int64 seed for the in-kernel hash
    (``"hash"``), neither for round-to-nearest."""
    if stochastic not in (False, True, "rand", "hash"):
        raise ValueError(f"stochastic must be False, True, 'rand' or 'hash', got {stochastic!r}")
    if stochastic == "hash":
        return None, torch.randint(0, 1 << 32, (), dtype=torch.int64).to(x.device)
    if stochastic and torch.compiler.is_compiling():  # noise bytes from an op the compiler keeps opaque
        seed = torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=x.device)
        shift = _level_shift((seed & ((1 << NOISE_BITS) - 1)).to(torch.float32).reshape(()))
        return torch.ops.lq.noise_bytes(x, seed), shift
    if stochastic:
        return noise_bits(x)
    return None, None


def scale_from_amax(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Eq. 6: ``s = qmax / amax`` (amax floored at ``AMAX_EPS``), fp32."""
    return qmax / amax.float().clamp_min(AMAX_EPS)
