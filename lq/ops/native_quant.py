"""The CPU int8 training step's quantizations and GEMM output stage in one C call each (``lq/ops/quant.c``).

On the 2-core AVX-512 host an int8 Linear 1024^3 training step spent ~3.5 ms of its ~9.4 in the compiled
quantization graphs and output stages plus Dynamo's entry per compiled call (``torch.compile`` writes a
reduction loop and a pointwise loop over the whole tensor: 0.88 ms to quantize a 1024 x 1024 input per row,
against ~0.1 ms of memory traffic). ``quant.c`` quantizes row by row while the row is in L1 and is called
through ctypes (~5 us). Each function returns exactly what the torch ops in :mod:`lq.ops.fused`,
:mod:`lq.ops.grad_quant` and :mod:`lq.ops.int8_mm` return for the same inputs (including stochastic rounding's
noise, drawn from torch's generator in the same order), or ``None`` where it does not apply (then the caller
runs those): CPU, fp32, 2-d row-major operands, not while ``torch.compile`` traces, ``LQ_NATIVE`` not ``0``.
``tests/test_native_quant.py`` compares them bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from lq import native
from lq.ops import fused
from lq.quant.functional import AMAX_EPS

__all__ = [
    "amx_conv", "amx_conv_grad_input", "amx_library", "amx_mm", "amx_taps", "amx_usable", "grad_operands", "grid_rows",
    "conv_clip_search", "dequantize", "flip_byte", "grid", "library", "pack_activation",
    "quantize_rows", "quantize_tensor", "rows_clip_search", "scale_sums", "taps_dots", "tile_library", "tile_unit",
    "tile_usable",
]

SOURCE = Path(__file__).with_name("quant.c")
#: the row loops use vector floor (roundps), which GCC emits only when it may assume no FP traps
FLAGS = (*native.FLAGS, "-fno-trapping-math")

_P, _I64, _I32, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


AMX_SOURCE = Path(__file__).with_name("amx.c")


@functools.cache
def _amx_source() -> ctypes.CDLL | None:
    lib = native.load(AMX_SOURCE, "int8 products and convolutions run on torch._int_mm / oneDNN, slower", FLAGS)
    if lib is None:
        return None
    lib.lq_amx_available.restype = _I32
    lib.lq_vnni_available.restype = _I32
    lib.lq_amx_mm.restype = _I64
    lib.lq_amx_mm.argtypes = [_P, _I64, _I64, _I64, _I64, _P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _I32]
    lib.lq_amx_conv.restype = _I64
    lib.lq_amx_conv.argtypes = [_P, _I64, _I64, _I64, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _F, _P, _P,
                                _P, _I64, _I64, _I32, _I64, _I64, _I32, _I32, _I32]
    lib.lq_conv_grid.restype = None
    lib.lq_conv_grid.argtypes = [_P, _I64, _I64, _I64, _I64, _I64, _I64, _I32, _I64, _I64, _I64, _P, _I64, _I32, _I32]
    lib.lq_amx_taps.restype = _I64
    lib.lq_amx_taps.argtypes = [_P, _I64, _I64, _I64, _I64, _P, _P, _I64, _P, _I64, _I64, _I64, _I64, _P, _F, _P,
                                _I32, _I32]
    lib.lq_taps_dots.restype = _I64
    lib.lq_taps_dots.argtypes = [_P, _I64, _I64, _I64, _I64, _P, _P, _I64, _P, _I64, _I64, _P, _F, _P, _I32]
    lib.lq_gather_i8.restype = None
    lib.lq_gather_i8.argtypes = [_P, _I64, _P, _I64, _P]
    return lib


@functools.cache
def tile_unit() -> str | None:
    """The unit ``amx.c``'s convolution kernels (:func:`amx_conv`, :func:`amx_conv_grad_input`, :func:`amx_taps`) run
    on: ``"amx"`` (the tile unit, where the CPU has AMX-INT8 and Linux lets this process use it), ``"vnni"`` (AVX-512
    VNNI on the same packed operands: AMD Zen 4/5, Intel before Sapphire Rapids), or ``None`` (the oneDNN /
    ``torch._int_mm`` kernels). ``LQ_TILE_UNIT=vnni`` runs the VNNI kernels on an AMX host too (tests, comparisons),
    ``LQ_TILE_UNIT=off`` neither."""
    lib = _amx_source()
    if lib is None:
        return None
    forced = os.environ.get("LQ_TILE_UNIT", "").strip().lower()
    if forced not in ("", "amx", "vnni", "off"):
        raise ValueError(f"LQ_TILE_UNIT={forced!r}: use 'amx', 'vnni' or 'off' (or leave it unset)")
    has = {"amx": bool(lib.lq_amx_available()), "vnni": bool(lib.lq_vnni_available())}
    if forced:  # the one asked for, where the CPU has it
        return forced if has.get(forced) else None
    return next((unit for unit in ("amx", "vnni") if has[unit]), None)


def tile_library() -> ctypes.CDLL | None:
    """``lq/ops/amx.c`` where :func:`tile_unit` has a unit for its convolution kernels, else ``None``."""
    return _amx_source() if tile_unit() else None


def amx_library() -> ctypes.CDLL | None:
    """``lq/ops/amx.c`` where its kernels run on the tile unit (AMX-INT8, :func:`tile_unit`), else ``None``."""
    return _amx_source() if tile_unit() == "amx" else None


def flip_byte() -> int:
    """The xor that stores the kernels' first operand (the input grid of :func:`amx_conv`, the gradient rows of
    :func:`amx_taps`): ``0x80`` on VNNI, whose products take it unsigned (``value + 128``; ``amx.c`` subtracts the
    offset again), else 0."""
    return 0x80 if tile_unit() == "vnni" else 0


def amx_conv(
    x: torch.Tensor, w: torch.Tensor, x_step: torch.Tensor, w_step: torch.Tensor, bias: torch.Tensor | None,
    padding: list[int], max_reduction: int, stride: list[int] | tuple[int, int] = (1, 1),
) -> torch.Tensor | None:
    """A one-group, undilated int8 convolution of stride 1 or 2 on the tile unit or VNNI (:func:`tile_unit`; ``amx.c``
    ``lq_amx_conv``: an implicit GEMM over the zero-padded input's grid, each tap a row shift of it, the weight packed
    once a call, the output stage ``((acc * x_step) * w_step[o]) + bias[o]`` applied per block in L1): ``x`` int8
    ``[N, C, H, W]`` (channels-last is read in place, another layout copied to it), ``w`` int8 ``[O, C, kh, kw]``,
    ``x_step [1]``, ``w_step [O]`` or ``[1]``. Returns the fp32 ``[N, O, Ho, Wo]`` output, channels-last, or ``None``
    where the kernel does not apply (no tile unit or VNNI, a reduction ``C * kh * kw`` beyond ``max_reduction``, ...).

    Stride 2 is the stride-1 convolution of the input's space-to-depth grid (2 x 2 pixels -> ``4 C`` channels) with
    the weight cut into its ``ceil(k / 2)^2`` phases (:func:`_phase_weight`)."""
    if x.dim() != 4 or w.dim() != 4 or x.dtype != torch.int8 or w.dtype != torch.int8 or x_step.numel() != 1:
        return None
    n, c, h, wd = x.shape
    o, cw, kh, kw = w.shape
    (ph, pw), (sh, sw) = padding, stride
    hp, wp = h + 2 * ph, wd + 2 * pw
    if (cw != c or n == 0 or o == 0 or c == 0 or ph < 0 or pw < 0 or (sh, sw) not in ((1, 1), (2, 2)) or hp < kh
            or wp < kw or c * kh * kw > max_reduction or w_step.numel() not in (1, o)
            or bias is not None and bias.numel() != o or not tile_usable(x, w, x_step, w_step, bias)):
        return None
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    grid = (-(-hp // 2), -(-wp // 2)) if sh == 2 else (hp, wp)
    y = torch.empty((n, ho, wo, o), dtype=torch.float32, device="cpu")
    ok = _conv_on_grid(x, (ph, pw), sh == 2, grid, w, f"conv{sh}", x_step, _vector(w_step, o), bias, (ho, wo), y,
                       False, (0, 0))
    return y.permute(0, 3, 1, 2) if ok else None


def amx_conv_grad_input(
    g: torch.Tensor, w: torch.Tensor, g_step: torch.Tensor, input_size: list[int], stride: list[int],
    padding: list[int], max_reduction: int, channels_last: bool = True,
) -> torch.Tensor | None:
    """The input gradient of a one-group, undilated convolution of stride 1 or 2 on the tile unit or VNNI, from the int8
    output gradient ``g [N, O, Ho, Wo]`` (per-tensor ``g_step``) and the int8 weight ``w [O, C, kh, kw]``: fp32
    ``input_size`` ``[N, C, H, W]``, channels-last, ``g_step * sum`` (eq. 10 with the weight steps folded into ``g``),
    or ``None`` where the kernel does not apply.

    Stride 1: the ordinary convolution of ``g`` padded by ``k - 1 - p`` with the weight flipped and its channels
    swapped. Stride 2 (no zero-inserted canvas, whose zeros were 3/4 of the work): the padded input's space-to-depth
    grid, ``dx[2u + p, 2v + q, c] = sum_(i', j', o) g'[u + i', v + j', o] w[o, c, 2(k2 - 1 - i') + p, 2(k2 - 1 - j')
    + q]`` with ``g'`` = ``g`` shifted by ``k2 - 1 = ceil(k / 2) - 1``: a stride-1 convolution with ``4 C`` outputs,
    written back depth-to-space (``lq_amx_conv``'s ``s2d`` output) with the padding cropped.

    ``channels_last=False``: the result row-major instead (the kernel's output stage writes that layout: the gradient
    of a row-major leaf input, which autograd would otherwise copy into its input's layout)."""
    if g.dim() != 4 or w.dim() != 4 or g.dtype != torch.int8 or w.dtype != torch.int8 or g_step.numel() != 1:
        return None
    n, c, h, wd = input_size
    o, cw, kh, kw = w.shape
    (ph, pw), (sh, sw) = padding, stride
    hp, wp = h + 2 * ph, wd + 2 * pw
    if (cw != c or n == 0 or o == 0 or c == 0 or g.shape[:2] != (n, o) or (sh, sw) not in ((1, 1), (2, 2)) or hp < kh
            or wp < kw
            or list(g.shape[2:]) != [(hp - kh) // sh + 1, (wp - kw) // sw + 1] or o * kh * kw > max_reduction
            or not 0 <= ph <= kh - 1 or not 0 <= pw <= kw - 1 or not tile_usable(g, w, g_step)):
        return None
    y = torch.empty((n, h, wd, c) if channels_last else (n, c, h, wd), dtype=torch.float32, device="cpu")
    if sh == 1:
        pads, out_hw, crop = (kh - 1 - ph, kw - 1 - pw), (h, wd), (0, 0)
        grid = (g.shape[2] + 2 * pads[0], g.shape[3] + 2 * pads[1])
    else:
        kh2, kw2 = -(-kh // 2), -(-kw // 2)
        pads, out_hw, crop = (kh2 - 1, kw2 - 1), (-(-hp // 2), -(-wp // 2)), (ph, pw)
        grid = (out_hw[0] + kh2 - 1, out_hw[1] + kw2 - 1)
    ok = _conv_on_grid(g, pads, False, grid, w, f"grad{sh}", g_step, _ones(4 * c if sh == 2 else c), None, out_hw, y,
                       sh == 2, crop, not channels_last)
    if not ok:
        return None
    return y.permute(0, 3, 1, 2) if channels_last else y


def _phase_weight(w: torch.Tensor, kind: str) -> torch.Tensor:
    """The stride-1 weight ``[O2, C2, kh2, kw2]`` that ``lq_amx_conv`` runs for a weight ``w [O, C, kh, kw]``:
    ``conv1`` ``w``; ``conv2`` its space-to-depth phases (``[O, (p, q, c), i2, j2] = w[o, c, 2 i2 + p, 2 j2 + q]``);
    ``grad1`` flipped with its channels swapped (the input gradient at stride 1); ``grad2`` the stride-2 input
    gradient's (``[(p, q, c), o, i', j'] = w[o, c, 2 (k2 - 1 - i') + p, 2 (k2 - 1 - j') + q]``). Zeros where a phase
    reaches beyond the kernel. Any dtype (run once per geometry on index codes, :func:`_tap_index`)."""
    o, c, kh, kw = w.shape
    if kind == "conv1":
        return w
    if kind == "grad1":
        return w.transpose(0, 1).flip(2, 3)
    kh2, kw2 = -(-kh // 2), -(-kw // 2)
    wpad = w.new_zeros((o, c, 2 * kh2, 2 * kw2))
    wpad[:, :, :kh, :kw] = w
    phases = wpad.view(o, c, kh2, 2, kw2, 2)  # [o, c, i2, p, j2, q]
    if kind == "conv2":
        return phases.permute(0, 3, 5, 1, 2, 4).reshape(o, 4 * c, kh2, kw2)
    return phases.flip(2, 4).permute(3, 5, 1, 0, 2, 4).reshape(4 * c, o, kh2, kw2)


def _grid_layout(c2: int) -> tuple[int, int]:
    """``(bytes of a grid row, positions a 64-byte step spans)`` for ``c2`` channels: with 64 or more, the channels
    of one position padded to a multiple of 64; with fewer, ``64 / c2`` neighbouring positions of ``c2`` channels
    (padded to a power of two, at least 4), i.e. that many horizontal taps of a kernel row in one step (16 channels: a
    3x3 kernel in 3 steps instead of 9 steps of 16 useful bytes in 64). (The minimum of 4: a first version of the
    kernel summed kernels of several rows wrongly with 1-byte rows, C = 1, never explained; the current one is exact
    with them in a review's sweeps, and 4-byte rows cost the same steps.)"""
    if c2 >= 64:
        return -(-c2 // 64) * 64, 1
    cg = max(4, 1 << (c2 - 1).bit_length())
    return cg, 64 // cg


@functools.lru_cache(maxsize=64)
def _tap_index(kind: str, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor | None, int, int, int, int]:
    """For a weight of ``shape`` and :func:`_phase_weight` ``kind``: ``(index, cg, group, kh2, tj)``, ``index`` the
    int32 ``[O2, kc, kh2 * tj]`` positions in the flat weight (``numel`` = a zero) of the taps' ``[O2, kc, taps]``
    operand of ``lq_amx_conv`` (tap ``(i, j)``: kernel row ``i``, horizontal taps ``j * group ..`` as the 64-byte step's
    positions, :func:`_grid_layout`), or ``None`` where that operand is the weight itself (a forward weight with a
    multiple of 64 channels). One gather a call instead of a chain of small strided copies (a flip and two reshapes
    of a 64 x 32 x 3 x 3 weight took 0.3 ms); int32 and at most 64 geometries (int64 indices of every shape kept for
    a ResNet-50's convs came to 353 MiB: review finding)."""
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    w2 = _phase_weight(torch.arange(1, numel + 1, dtype=torch.int64).view(shape), kind)
    o2, c2, kh2, kw2 = w2.shape
    cg, group = _grid_layout(c2)
    tj = -(-kw2 // group)
    if kind == "conv1" and cg == c2 and group == 1:
        return None, cg, group, kh2, tj
    wk = torch.zeros((o2, cg, kh2, tj * group), dtype=torch.int64)
    wk[:, :c2, :, :kw2] = w2
    wk = wk.view(o2, cg, kh2, tj, group).permute(0, 4, 1, 2, 3).reshape(o2, max(cg, 64), kh2 * tj)
    return torch.where(wk > 0, wk - 1, numel).to(torch.int32).contiguous(), cg, group, kh2, tj


def _conv_on_grid(
    src: torch.Tensor, pads: tuple[int, int], s2d_in: bool, grid: tuple[int, int], w: torch.Tensor, kind: str,
    x_step: torch.Tensor, steps: torch.Tensor, bias: torch.Tensor | None, out_hw: tuple[int, int], y: torch.Tensor,
    s2d_out: bool, crop: tuple[int, int], nchw: bool = False,
) -> bool:
    """Run ``lq_amx_conv`` for the int8 ``src [N, C, H, W]`` (any layout) on its ``grid`` (rows x columns per
    image; zero padding ``pads`` at the top/left; space-to-depth when ``s2d_in``) with the weight ``w`` made a
    stride-1 one by :func:`_phase_weight` ``kind``, outputs at the grid's first ``out_hw`` rows and columns into the
    channels-last fp32 ``y`` ``[N, yh, yw, C]`` (depth-to-space when ``s2d_out``, ``crop`` cut at the top/left), or
    the row-major ``y [N, C, yh, yw]`` with ``nchw``."""
    src = channels_last_i8(src)
    n, c, h, wd = src.shape
    lib, flip = tile_library(), flip_byte()
    index, cg, group, kh2, tj = _tap_index(kind, tuple(w.shape))
    if index is None:
        wk = w.contiguous().view(w.shape[0], w.shape[1], -1)
    else:
        wk = torch.empty(index.shape, dtype=torch.int8, device="cpu")  # (one C gather: a cat + index_select was 7 us)
        w = w.contiguous()
        lib.lq_gather_i8(w.data_ptr(), w.numel(), index.data_ptr(), index.numel(), wk.data_ptr())
    o2, kc, taps = wk.shape
    hs, ws = grid
    t_out = n * hs * ws
    off_arr, rows = _grid_offsets(kh2, tj, ws, group, t_out)
    threads = torch.get_num_threads()
    if (taps == 1 and group == 1 and cg == c and not s2d_in and pads == (0, 0) and (hs, ws) == (h, wd)
            and t_out % 64 == 0 and not flip):
        xg = src  # a 1x1 layer over 64k channels: the channels-last input is its own grid (the blocks end at t_out)
    else:
        xg = torch.empty((rows, cg), dtype=torch.int8, device="cpu")
        lib.lq_conv_grid(src.data_ptr(), n, h, wd, c, pads[0], pads[1], int(s2d_in), hs, ws, cg, xg.data_ptr(), rows,
                         flip, threads)
    res = lib.lq_amx_conv(
        xg.data_ptr(), cg, kc, t_out, taps, off_arr, wk.data_ptr(), o2, kc, hs, ws, out_hw[0], out_hw[1],
        float(x_step), steps.data_ptr(), _ptr(None if bias is None else _vector(bias, o2)), y.data_ptr(),
        y.shape[2 if nchw else 1], y.shape[3 if nchw else 2], int(s2d_out), crop[0], crop[1], threads, int(flip != 0),
        int(nchw),
    )
    return res == 0


@functools.lru_cache(maxsize=256)
def _grid_offsets(kh2: int, tj: int, ws: int, group: int, t_out: int):
    """``lq_amx_conv``'s tap offsets on a grid ``ws`` wide (a ctypes array, read only) and the grid rows it reads."""
    offs = [i * ws + j * group for i in range(kh2) for j in range(tj)]
    return (ctypes.c_int64 * len(offs))(*offs), -(-t_out // 64) * 64 + max(offs) + group


@functools.lru_cache(maxsize=64)
def _ones(n: int) -> torch.Tensor:
    """``n`` fp32 ones on CPU, read only (unit steps of a kernel's output stage)."""
    return torch.ones(n, dtype=torch.float32, device="cpu")


def channels_last_i8(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous(memory_format=torch.channels_last)``; a row-major int8 ``[N, C, H, W]`` on CPU in one C pass of
    16 x 16 byte transposes (``quant.c`` ``lq_to_nhwc_i8``: torch's permuted int8 copy took 1.3 ms for 32 x 128 x 28
    x 28, slower than an fp32 one)."""
    if (t.dtype == torch.int8 and t.dim() == 4 and t.numel() >= 4096 and t.is_contiguous()
            and not t.is_contiguous(memory_format=torch.channels_last) and _usable(t)):
        n, c, h, w = t.shape
        out = torch.empty((n, h, w, c), dtype=torch.int8, device="cpu")
        library().lq_to_nhwc_i8(t.data_ptr(), n, c, h * w, out.data_ptr(), torch.get_num_threads())
        return out.permute(0, 3, 1, 2)
    return t.contiguous(memory_format=torch.channels_last)


def phase_grids(x: torch.Tensor, padding, stride, grid: tuple[int, int], rows: int) -> dict | None:
    """The stride phases of the zero-padded int8 ``x [N, C, H, W]`` (channels-last) position-major for the weight
    gradient's taps (``lq.ops.int8_conv_kernels._input_phases``' dict ``{(p, q): [rows, C]}``) as views of one grid
    built in C (``lq_conv_grid``: the padded input at stride 1, its space-to-depth grid at stride 2, rows after the
    ``N * grid`` positions zero), or ``None`` where that does not apply (other strides, no AMX, another layout)."""
    n, c, h, w = x.shape
    s = tuple(stride)
    if (s not in ((1, 1), (2, 2)) or x.dtype != torch.int8 or not fused.is_channels_last(x) or min(padding) < 0
            or grid != (-(-(h + 2 * padding[0]) // s[0]), -(-(w + 2 * padding[1]) // s[1]))
            or rows < n * grid[0] * grid[1] or not tile_usable(x)):
        return None
    f = s[0]
    buf = torch.empty((rows, f * f * c), dtype=torch.int8, device="cpu")
    tile_library().lq_conv_grid(x.data_ptr(), n, h, w, c, padding[0], padding[1], int(f == 2), grid[0], grid[1],
                                f * f * c, buf.data_ptr(), rows, 0, torch.get_num_threads())
    return {(p, q): buf[:, (p * f + q) * c : (p * f + q + 1) * c] for p in range(f) for q in range(f)}


def amx_usable(*tensors: torch.Tensor) -> bool:
    """Whether :func:`amx_mm` may run on these tensors: AMX and the kernels built, plain CPU tensors, not traced
    (``None`` entries are skipped)."""
    return _usable(*[t for t in tensors if t is not None]) and amx_library() is not None


def tile_usable(*tensors: torch.Tensor) -> bool:
    """Whether the convolution kernels (:func:`amx_conv`, :func:`amx_conv_grad_input`, :func:`amx_taps`) may run on
    these tensors: a :func:`tile_unit`, plain CPU tensors, not traced (``None`` entries are skipped)."""
    return _usable(*[t for t in tensors if t is not None]) and tile_library() is not None


def amx_taps(
    ge: torch.Tensor, o: int, lead: int, offs: list[int], phase_of: list[int], phases: list[torch.Tensor],
    position_major: bool, c: int, tx: int, g_step: torch.Tensor, x_step: torch.Tensor, weight_size: list[int],
) -> torch.Tensor | None:
    """A convolution's weight gradient by taps on the tile unit or VNNI (``amx.c`` ``lq_amx_taps``; the algorithm of
    ``lq.ops.int8_conv_kernels._grad_weight_taps``, each phase packed once for all its taps, each tap's gradient
    operand a shifted view of ``ge``): ``ge`` int8 ``[rows >= o rounded up to 32, lead + tx rounded up to 64]``,
    the gradient on the grid at columns ``[lead, lead + T)``, zero elsewhere; ``phases`` int8 ``[tx, C]``
    (``position_major``) or ``[C, tx]``; ``g_step`` ``[O]`` or ``[1]``, ``x_step`` ``[1]``. Returns the fp32
    ``weight_size`` gradient, or ``None`` where the kernel does not apply. On VNNI ``ge`` is stored xor
    :func:`flip_byte` (every byte, the zeros too: ``grid_rows(..., flip=flip_byte())``)."""
    if not _taps_consistent(ge, o, lead, offs, phase_of, phases, c, g_step, x_step, weight_size):
        return None
    if ge.shape[0] < -(-o // 32) * 32 or ge.shape[1] < lead + -(-tx // 64) * 64:
        return None
    xc, xt = (1, phases[0].stride(0)) if position_major else (tx, 1)
    for buf in phases:  # position-major rows may be strided (views of a space-to-depth grid), all alike
        if (buf.dtype != torch.int8 or buf.shape != ((tx, c) if position_major else (c, tx))
                or buf.stride() != ((xt, 1) if position_major else (tx, 1)) or position_major and xt < c):
            return None
    steps, out, off_arr, phase_arr, ptrs = _taps_arguments(o, offs, phase_of, phases, g_step, weight_size)
    res = tile_library().lq_amx_taps(
        ge.data_ptr(), o, ge.shape[1], lead, len(offs), off_arr, phase_arr, len(phases), ptrs, xc, xt, c, tx,
        steps.data_ptr(), float(x_step), out.data_ptr(), torch.get_num_threads(), int(flip_byte() != 0),
    )
    return out if res == 0 else None


def taps_dots(
    ge: torch.Tensor, o: int, lead: int, offs: list[int], phase_of: list[int], phases: list[torch.Tensor], c: int,
    tx: int, g_step: torch.Tensor, x_step: torch.Tensor, weight_size: list[int],
) -> torch.Tensor | None:
    """:func:`amx_taps` for few input channels (``C * taps <= O``: a 1-channel stem) as one VNNI dot product per output
    channel, input channel and tap (``amx.c`` ``lq_taps_dots``): ``ge`` int8 ``[>= o, >= lead + tx]`` (contiguous)
    the gradient on the grid at columns ``[lead, lead + T)``, every byte xor 0x80 (``grid_rows(..., flip=0x80)``),
    ``phases`` int8 channel rows ``[C, tx]`` (contiguous). Returns the fp32 ``weight_size`` gradient, or ``None`` where
    the kernel does not apply (no VNNI, other layouts, inconsistent sizes)."""
    if not _taps_consistent(ge, o, lead, offs, phase_of, phases, c, g_step, x_step, weight_size):
        return None
    if ge.shape[0] < o or ge.shape[1] < lead + tx:
        return None
    if any(b.dtype != torch.int8 or b.shape != (c, tx) or not b.is_contiguous() for b in phases):
        return None
    steps, out, off_arr, phase_arr, ptrs = _taps_arguments(o, offs, phase_of, phases, g_step, weight_size)
    res = _amx_source().lq_taps_dots(ge.data_ptr(), o, ge.shape[1], lead, len(offs), off_arr, phase_arr, len(phases),
                                     ptrs, c, tx, steps.data_ptr(), float(x_step), out.data_ptr(),
                                     torch.get_num_threads())
    if res == -2:
        raise MemoryError("lq taps_dots: could not allocate its channel sums")
    return out if res == 0 else None


def _taps_consistent(ge, o: int, lead: int, offs, phase_of, phases, c: int, g_step, x_step, weight_size) -> bool:
    """What :func:`amx_taps` and :func:`taps_dots` both require of their arguments (each then checks the sizes and
    layouts its own kernel reads): a tile unit or VNNI and plain CPU tensors, one input step, ``[1]`` or ``[O]``
    gradient steps, ``weight_size`` ``[O, C, kh, kw]`` with a tap per offset, each tap's phase among ``phases``, the
    offsets within the gradient's zero lead, ``ge`` a contiguous 2-d int8 buffer."""
    taps = len(offs)
    return (taps > 0 and x_step.numel() == 1 and g_step.numel() in (1, o) and tile_usable(ge, *phases, g_step, x_step)
            and len(weight_size) == 4 and list(weight_size[:2]) == [o, c] and weight_size[2] * weight_size[3] == taps
            and len(phase_of) == taps and len(phases) > 0 and min(phase_of) >= 0 and max(phase_of) < len(phases)
            and min(offs) >= 0 and max(offs) <= lead and ge.dtype == torch.int8 and ge.dim() == 2
            and ge.is_contiguous())


def _taps_arguments(o: int, offs, phase_of, phases, g_step, weight_size) -> tuple:
    """The taps kernels' shared arguments: ``(steps, out, offsets, phase indices, phase pointers)``, the fp32 output
    ``weight_size`` allocated."""
    off_arr, phase_arr = _taps_arrays(tuple(offs), tuple(phase_of))
    ptrs = (ctypes.c_void_p * len(phases))(*[b.data_ptr() for b in phases])
    return _vector(g_step, o), torch.empty(weight_size, dtype=torch.float32, device="cpu"), off_arr, phase_arr, ptrs


@functools.lru_cache(maxsize=256)
def _taps_arrays(offs: tuple[int, ...], phase_of: tuple[int, ...]):
    """:func:`amx_taps`' offsets and phase indices as ctypes arrays (read only)."""
    return (ctypes.c_int64 * len(offs))(*offs), (ctypes.c_int32 * len(phase_of))(*phase_of)


def amx_mm(
    a: torch.Tensor, b: torch.Tensor, a_step: torch.Tensor, b_step: torch.Tensor, bias: torch.Tensor | None,
    max_k: int,
) -> torch.Tensor | None:
    """``lq::int8_mm`` on the tile unit (``amx.c``): ``(a @ b^T) * a_step[:, None] * b_step[None, :] + bias`` for
    int8 ``a [M, K]``, ``b [N, K]`` of any strides, the output stage applied to each block of int32 sums in L1;
    ``None`` where it does not apply (no AMX, ``K > max_k`` (int32 headroom), not CPU, empty, or traced)."""
    m, k = a.shape
    n = b.shape[0]
    if (k > max_k or m == 0 or n == 0 or k == 0 or a_step.numel() not in (1, m) or b_step.numel() not in (1, n)
            or bias is not None and bias.numel() != n or not amx_usable(a, b, a_step, b_step, bias)):
        return None
    sa, sb = _vector(a_step, a_step.numel()), _vector(b_step, n)
    c = None if bias is None else _vector(bias, n)
    out = _floats(m, n)
    res = _amx_source().lq_amx_mm(
        a.data_ptr(), m, k, a.stride(0), a.stride(1), b.data_ptr(), n, b.stride(0), b.stride(1), sa.data_ptr(),
        0 if sa.numel() == 1 else 1, sb.data_ptr(), _ptr(c), out.data_ptr(),
        torch.get_num_threads(),
    )
    return out if res == 0 else None


@functools.cache
def library() -> ctypes.CDLL | None:
    """``lq/ops/quant.c`` built and loaded (``None`` with ``LQ_NATIVE=0`` or without a C compiler; warned once)."""
    lib = native.load(SOURCE, "int8 training's quantizations run as compiled torch graphs, slower", FLAGS)
    if lib is None:
        return None
    lib.lq_quant_rows.restype = _I64
    lib.lq_quant_rows.argtypes = [_P, _I64, _I64, _I64, _I32, _F, _P, _P, _P, _I32]
    lib.lq_dequant.restype = None
    lib.lq_dequant.argtypes = [_P, _I64, _I64, _I64, _I32, _P, _P, _I32]
    lib.lq_pack_activation.restype = _I64
    lib.lq_pack_activation.argtypes = [_P, _I64, _I32, _F, _P, _P, _P, _P, _I32]
    lib.lq_quant_tensor.restype = _I64
    lib.lq_quant_tensor.argtypes = [_P, _I64, _I32, _F, _I32, _F, _P, _P, _P, _I32]
    lib.lq_grid.restype = _I64
    lib.lq_grid.argtypes = [_P, _I64, _F, _F, _F, _P, _I32]
    lib.lq_grad_pair.restype = _I64
    lib.lq_grad_pair.argtypes = [
        _P, _I64, _I64, _I64, _I32, _F,
        _P, _F, _P, _F, _P, _P, _P,
        _P, _I64, _F, _P, _F, _P, _P, _P, _I32,
    ]
    lib.lq_grad_conv.restype = _I64
    lib.lq_grad_conv.argtypes = [
        _P, _I64, _I64, _I32, _I64, _I32, _F,
        _P, _F, _P, _F, _P, _P, _P,
        _F, _P, _F, _P, _P, _P, _I32,
    ]
    lib.lq_grad_conv_search.restype = _I64
    lib.lq_grad_conv_search.argtypes = [_P, _I64, _I64, _I64, _I32, _I32, _F, _P, _P, _I64, _P, _I64, _P, _I64, _P, _P,
                                        _P, _P, _I32]
    lib.lq_grad_rows_search.restype = _I64
    lib.lq_grad_rows_search.argtypes = [_P, _I64, _I64, _I64, _I32, _I32, _F, _P, _I64, _P, _I64, _P, _I64, _P, _P,
                                        _I32]
    lib.lq_grid_rows.restype = None
    lib.lq_grid_rows.argtypes = [_P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _P, _I32, _I32]
    lib.lq_to_nhwc_i8.restype = None
    lib.lq_to_nhwc_i8.argtypes = [_P, _I64, _I64, _I64, _P, _I32]
    lib.lq_scale_sums.restype = None
    lib.lq_scale_sums.argtypes = [_P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _I32]
    return lib


def _floats(*shape: int) -> torch.Tensor:
    """An fp32 CPU buffer for the kernels to write (never the default dtype or device: a user's float64 default or
    ``set_default_device`` would hand C memory of another type or none at all)."""
    return torch.empty(*shape, dtype=torch.float32, device="cpu")


def _vector(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` (``[n]`` or ``[1]``, any float dtype) as a contiguous fp32 vector of ``n`` for the kernels."""
    return t.float().reshape(-1).expand(n).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _noise_fits(noise: torch.Tensor | None, shift: torch.Tensor | None, g: torch.Tensor) -> bool:
    """Whether ``(noise, shift)`` from :func:`fused.rounding_inputs` is something the kernels read: both ``None``
    (round to nearest), or int8 bytes laid out as ``g`` and a 0-d fp32 level shift."""
    if noise is None or shift is None:
        return noise is None and shift is None
    return (noise.dtype == torch.int8 and noise.shape == g.shape and noise.stride() == g.stride()
            and shift.dtype == torch.float32 and shift.numel() == 1)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _usable(*tensors: torch.Tensor) -> bool:
    """Plain CPU tensors (not fake, functional or other subclasses whose data pointer is not their data) outside a
    compiled trace, with the kernel built. (Called several times per kernel call: a loop and ``is_cpu`` rather than
    ``all()`` over a generator and ``device.type``, ~3x cheaper.)"""
    for t in tensors:
        if type(t) not in _PLAIN or not t.is_cpu:
            return False
    return not torch.compiler.is_compiling() and native.enabled() and library() is not None


def _rows(t: torch.Tensor) -> bool:
    """2-d with unit column stride (any row stride: a row-major tensor or a view of its leading columns)."""
    return t.dim() == 2 and t.stride(1) == 1 and t.shape[1] > 0 and t.stride(0) >= t.shape[1]


def quantize_rows(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None:
    """``fused.quantize_dynamic(x, qmax, keep_dim=0)`` (eq. 6-7 with a scale per row) of an fp32 ``[m, k]``:
    ``(q, step, amax, finite)`` with ``finite`` a Python bool, or ``None`` where the kernel does not apply."""
    if x.dtype != torch.float32 or not _rows(x) or x.requires_grad and torch.is_grad_enabled() or not _usable(x):
        return None
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device="cpu")
    step, amax = _floats(m), _floats(m)
    bad = library().lq_quant_rows(x.data_ptr(), m, k, x.stride(0), qmax, AMAX_EPS, q.data_ptr(), step.data_ptr(),
                                  amax.data_ptr(), torch.get_num_threads())
    return q, step, amax, bad == 0


def _int8_like(x: torch.Tensor) -> torch.Tensor | None:
    """An int8 buffer with the strides of a dense ``x`` (row-major or channels-last), or ``None`` for another layout."""
    q = torch.empty_like(x, dtype=torch.int8)
    if q.stride() != x.stride() or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return None
    return q


def quantize_tensor(
    x: torch.Tensor, qmax: int, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None:
    """``fused.quantize_dynamic(x, qmax, keep_dim=None, amax)`` (eq. 6-7, one scale for the tensor, from its own
    amax or the calibrated ``amax [1]``) of a dense fp32 ``x`` of any shape and memory format (row-major,
    channels-last: ``q`` gets ``x``'s strides): ``(q, step, data_amax, finite)``, or ``None`` where the kernel does
    not apply."""
    if x.dtype != torch.float32 or x.numel() == 0 or x.requires_grad and torch.is_grad_enabled() or not _usable(x):
        return None
    if amax is not None and (amax.numel() != 1 or amax.dtype != torch.float32 or not _usable(amax)
                             or amax.requires_grad and torch.is_grad_enabled()):  # (a learned range keeps its graph)
        return None
    q = _int8_like(x)
    if q is None:
        return None
    step, data_amax = _floats(1), _floats(1)
    bad = library().lq_quant_tensor(x.data_ptr(), x.numel(), qmax, AMAX_EPS, amax is not None,
                                    0.0 if amax is None else float(amax), q.data_ptr(), step.data_ptr(),
                                    data_amax.data_ptr(), torch.get_num_threads())
    return q, step, data_amax, bad == 0


#: floats below which :func:`grid` runs on one thread (an OpenMP region costs more than it saves)
GRID_SERIAL = 1 << 15


def grid(
    x: torch.Tensor, s: float, lo: int, hi: int, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool] | None:
    """Eq. 7 with one scale as fp32 integers, ``clamp(round(x * s), lo, hi)`` (fp32 product, ties to even: the
    values of ``(x * s).round_().clamp_(lo, hi)``), one pass over a dense fp32 ``x`` of any memory format, into
    ``out`` (may be ``x``; default a new tensor with ``x``'s strides). ``(out, finite)``: ``finite`` is False when
    some ``x * s`` is NaN or infinite (``out`` is then meaningless). ``None`` where the kernel does not apply
    (another dtype or device, a view with gaps, autograd recording, no kernel)."""
    if x.dtype != torch.float32 or x.requires_grad and torch.is_grad_enabled() or not _usable(x):
        return None
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return None
    out = torch.empty_like(x) if out is None else out
    if (type(out) is not torch.Tensor or out.device != x.device or out.dtype != torch.float32 or out.shape != x.shape
            or out.stride() != x.stride()):
        return None
    n = x.numel()
    threads = 1 if n < GRID_SERIAL else torch.get_num_threads()
    bad = library().lq_grid(x.data_ptr(), n, s, float(lo), float(hi), out.data_ptr(), threads) if n else 0
    return out, bad == 0


def dequantize(q: torch.Tensor, step: torch.Tensor, axis: int | None) -> torch.Tensor | None:
    """Eq. 8, ``q * step`` as fp32 in ``q``'s layout, one pass (``lq.ops.quantize.dequantize_along``): one step
    (``axis`` None or a single step), or a step per index of ``axis`` 1 of a dense 2-d ``[M, N]`` or 4-d
    (row-major or channels-last) ``q``; ``None`` where the kernel does not apply."""
    if (q.dtype != torch.int8 or q.numel() == 0 or step.dtype != torch.float32 or not _usable(q, step)
            or step.requires_grad and torch.is_grad_enabled()  # (a learned step keeps its graph: review finding)
            or axis is None and step.numel() != 1):  # (torch's reshape raises there)
        return None
    per_tensor = axis is None or step.numel() == 1
    last = q.dim() == 4 and fused.is_channels_last(q) and not q.is_contiguous()
    if not (q.is_contiguous() or last) or not per_tensor and (axis % q.dim() != 1 or q.dim() not in (2, 4)
                                                             or step.numel() != q.shape[1]):
        return None
    out = torch.empty_like(q, dtype=torch.float32)
    if out.stride() != q.stride():
        return None
    c = 0 if per_tensor else q.shape[1]
    if per_tensor:
        rows, cols, on_cols = 1, q.numel(), 1
    elif q.dim() == 2 or last:  # the channel is the fastest dimension
        rows, cols, on_cols = q.numel() // c, c, 1
    else:  # row-major [N, C, H, W]: rows of H * W with one channel each
        rows, cols, on_cols = q.shape[0] * c, q.shape[2] * q.shape[3], 0
    library().lq_dequant(q.data_ptr(), rows, cols, c, on_cols, _vector(step, step.numel()).data_ptr(),
                         out.data_ptr(), torch.get_num_threads())
    return out


def pack_activation(x: torch.Tensor, qmax: int) -> str | tuple[torch.Tensor, torch.Tensor] | None:
    """A saved activation's per-tensor int8 form where it has no negative element (``lq.ops.saved_int8``: a ReLU's
    output, quantized as the next int8 conv quantizes its input, :func:`quantize_tensor`'s ``q`` and ``step`` bit for
    bit) in one C call (its minimum, maximum and finiteness in one pass, the integers in a second): ``(q, step)``,
    ``"negative"``, ``"nonfinite"``, or ``None`` where the kernel does not apply (then ``torch.aminmax`` and the
    compiled quantization cost ~1 ms a tensor on a SmallResNet step)."""
    if x.dtype != torch.float32 or x.numel() == 0 or not _usable(x):
        return None
    q = _int8_like(x)
    if q is None:
        return None
    step, lo, hi = _floats(1), _floats(1), _floats(1)
    res = library().lq_pack_activation(x.data_ptr(), x.numel(), qmax, AMAX_EPS, q.data_ptr(), step.data_ptr(),
                                       lo.data_ptr(), hi.data_ptr(), torch.get_num_threads())
    return (q, step) if res == 0 else "negative" if res == 1 else "nonfinite"


def grad_operands(
    g: torch.Tensor, qmax: int,
    ops: list[tuple[int, torch.Tensor | None, float, torch.Tensor | None, torch.Tensor | None]],
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] | None:
    """``grad_quant._fused_fixed`` for the operands ``ops`` of one gradient ``g [m, n]`` (fp32, row-major): each
    ``(axis, mult, ratio, noise, shift)`` with a scale per row (``axis`` 0, ``mult`` of shape ``[1, n]`` or
    ``None``) or per column (``axis`` 1, ``mult`` ``[m, 1]``, ``[1, 1]`` or ``None``), at most one of each;
    ``noise, shift`` what :func:`fused.rounding_inputs` drew for it (:func:`fused.noise_bits`' bytes and level
    shift for stochastic rounding, ``None, None`` for round to nearest; the in-kernel hash is not done here).
    Returns ``(q, step, amax, finite)`` per operand, or ``None`` where the kernel does not apply."""
    if g.dim() == 4:
        return _conv_grad_operands(g, qmax, ops)
    if g.dtype != torch.float32 or g.dim() != 2 or not g.is_contiguous() or g.numel() == 0 or not _usable(g):
        return None
    m, n = g.shape
    args: dict[int, tuple] = {}
    for axis, mult, ratio, noise, shift in ops:
        if axis in args or not _noise_fits(noise, shift, g):
            return None
        if mult is not None and (mult.dtype != torch.float32 or not _usable(mult)):
            return None
        if axis == 0 and (mult is None or mult.shape == (1, n)):
            mult = _ones(n) if mult is None else mult.reshape(n).contiguous()
        elif axis == 1 and (mult is None or mult.shape in ((m, 1), (1, 1))):
            mult = _ones(1) if mult is None else mult.reshape(-1).contiguous()
        else:
            return None
        size = m if axis == 0 else n
        q, step, amax = torch.empty(m, n, dtype=torch.int8, device="cpu"), _floats(size), _floats(size)
        args[axis] = (mult, float(ratio), noise, 0.0 if shift is None else float(shift), q, step, amax)
    ma, ra, na, sa, qa, step_a, amax_a = args.get(0, _NO_OPERAND)
    mb, rb, nb, sb, qb, step_b, amax_b = args.get(1, _NO_OPERAND)
    res = library().lq_grad_pair(
        g.data_ptr(), m, n, n, qmax, AMAX_EPS,
        _ptr(ma), ra, _ptr(na), sa, _ptr(qa), _ptr(step_a), _ptr(amax_a),
        _ptr(mb), 0 if mb is None or mb.numel() == 1 else 1, rb, _ptr(nb), sb, _ptr(qb), _ptr(step_b), _ptr(amax_b),
        torch.get_num_threads(),
    )
    return _operand_results(res, args, 0, 1, ops, f"{n} column maxima")


def _conv_grad_operands(g: torch.Tensor, qmax: int, ops: list[tuple]) -> list[tuple] | None:
    """:func:`grad_operands` for a convolution's output gradient ``g [N, O, H, W]`` (row-major or channels-last):
    grad_input's operand one scale for the tensor (``axis`` None, ``mult`` ``[1, O, 1, 1]`` or None), grad_weight's
    a scale per channel (``axis`` 1, ``mult`` None); ``q`` in ``g``'s layout."""
    if g.dtype != torch.float32 or g.numel() == 0 or not _usable(g):
        return None
    n, o, h, w = g.shape
    last = fused.is_channels_last(g)
    if not (last or g.is_contiguous()):
        return None
    args: dict = {}
    for axis, mult, ratio, noise, shift in ops:
        if axis in args or not _noise_fits(noise, shift, g):
            return None
        if axis is None and (mult is None or (mult.shape == (1, o, 1, 1) and mult.dtype == torch.float32
                                              and _usable(mult))):
            mult = _ones(o) if mult is None else mult.reshape(o).contiguous()
        elif axis != 1 or mult is not None:
            return None
        q = torch.empty_like(g, dtype=torch.int8)
        if q.stride() != g.stride():
            return None
        size = 1 if axis is None else o
        shift_value = 0.0 if shift is None else float(shift)
        args[axis] = (mult, float(ratio), noise, shift_value, q, _floats(size), _floats(size))
    ma, ra, na, sa, qa, step_a, amax_a = args.get(None, _NO_OPERAND)
    _, rb, nb, sb, qb, step_b, amax_b = args.get(1, _NO_OPERAND)
    rows, cols = (n * h * w, o) if last else (n * o, h * w)
    res = library().lq_grad_conv(
        g.data_ptr(), rows, cols, last, o, qmax, AMAX_EPS,
        _ptr(ma), ra, _ptr(na), sa, _ptr(qa), _ptr(step_a), _ptr(amax_a),
        rb, _ptr(nb), sb, _ptr(qb), _ptr(step_b), _ptr(amax_b), torch.get_num_threads(),
    )
    return _operand_results(res, args, None, 1, ops, f"{o} channel maxima")


def conv_clip_search(
    g: torch.Tensor, qmax: int, axis: int | None, mult: torch.Tensor | None, ratios: tuple[float, ...],
    sel: torch.Tensor | None,
) -> tuple[list[float], torch.Tensor] | None:
    """The cosines of Zhu et al.'s clip candidates ``ratios`` for one operand of a convolution's output gradient ``g
    [N, O, H, W]`` (fp32, row-major or channels-last), as ``grad_quant._fused_search`` scores them: grad_input's
    (``axis`` None: ``g * mult``, ``mult`` ``[1, O, 1, 1]`` or None, one scale, on the images ``sel`` or all with
    ``None``) or grad_weight's (``axis`` 1, no ``mult``, a scale per channel, on the whole channels ``sel``), in C
    (``lq_grad_conv_search``: the sums in double). Returns ``(cosines, amax)`` (``amax`` ``[1]`` or ``[O]``, from every
    element), or ``None`` where the kernel does not apply."""
    if g.dim() != 4 or g.dtype != torch.float32 or g.numel() == 0 or not 1 <= len(ratios) <= 64 or not _usable(g):
        return None
    n, o, h, w = g.shape
    last = fused.is_channels_last(g)
    if not (last or g.is_contiguous()) or axis not in (None, 1) or axis == 1 and mult is not None:
        return None
    if mult is not None and (mult.shape != (1, o, 1, 1) or mult.dtype != torch.float32 or not _usable(mult)):
        return None
    m = _ones(o) if mult is None else mult.reshape(o).contiguous()
    if sel is None:
        sel = torch.arange(n if axis is None else o, dtype=torch.int64)
    sel = sel.to(torch.int64).contiguous()
    r = torch.tensor(ratios, dtype=torch.float32)
    amax, cos = _floats(1 if axis is None else o), torch.empty(len(ratios), dtype=torch.float64)
    a, b = (amax, cos) if axis is None else (None, None), (amax, cos) if axis == 1 else (None, None)
    res = library().lq_grad_conv_search(
        g.data_ptr(), n, h * w, o, last, qmax, AMAX_EPS, m.data_ptr(),
        sel.data_ptr() if axis is None else None, sel.numel() if axis is None else 0,
        sel.data_ptr() if axis == 1 else None, sel.numel() if axis == 1 else 0, r.data_ptr(), len(ratios),
        _ptr(a[0]), _ptr(b[0]), _ptr(a[1]), _ptr(b[1]), torch.get_num_threads(),
    )
    if res & 4:
        raise MemoryError("lq clip search: could not allocate its per-thread sums")
    return (cos.tolist(), amax) if res == 0 else None


def rows_clip_search(
    g: torch.Tensor, qmax: int, axis: int, mult: torch.Tensor | None, ratios: tuple[float, ...], sel: torch.Tensor,
) -> tuple[list[float], torch.Tensor] | None:
    """:func:`conv_clip_search` for a Linear's gradient ``g [m, n]`` (fp32, row-major): grad_input's operand (``axis``
    0: a scale per row, ``mult`` ``[1, n]`` or None) or grad_weight's (``axis`` 1: a scale per column, ``mult`` ``[m,
    1]``, ``[1, 1]`` or None) on the whole rows / columns ``sel`` (``lq_grad_rows_search``). Returns ``(cosines, amax
    of the sampled slices)``, or ``None`` where the kernel does not apply."""
    if (g.dim() != 2 or g.dtype != torch.float32 or not g.is_contiguous() or g.numel() == 0 or axis not in (0, 1)
            or not 1 <= len(ratios) <= 64 or not _usable(g)):
        return None
    m, n = g.shape
    stride = 0
    if mult is not None:
        if mult.dtype != torch.float32 or not _usable(mult):
            return None
        if axis == 0 and mult.shape == (1, n):
            mult = mult.reshape(n).contiguous()
        elif axis == 1 and mult.shape in ((m, 1), (1, 1)):
            stride = 1 if mult.numel() > 1 else 0
            mult = mult.reshape(-1).contiguous()
        else:
            return None
    sel = sel.to(torch.int64).contiguous()
    r = torch.tensor(ratios, dtype=torch.float32)
    amax, cos = _floats(sel.numel()), torch.empty(len(ratios), dtype=torch.float64)
    res = library().lq_grad_rows_search(g.data_ptr(), m, n, n, int(axis == 0), qmax, AMAX_EPS, _ptr(mult), stride,
                                        sel.data_ptr(), sel.numel(), r.data_ptr(), len(ratios), amax.data_ptr(),
                                        cos.data_ptr(), torch.get_num_threads())
    if res & 4:
        raise MemoryError("lq clip search: could not allocate its per-thread sums")
    return (cos.tolist(), amax) if res == 0 else None


#: an operand the kernels skip: (mult, ratio, noise, shift, q, step, amax)
_NO_OPERAND = (None, 1.0, None, 0.0, None, None, None)


def _operand_results(res: int, args: dict, first, second, ops: list[tuple], partials: str) -> list[tuple]:
    """``(q, step, amax, finite)`` per operand of ``ops`` (in their order) from a gradient kernel's return value
    ``res`` (bit 0 / bit 1: the ``first`` / ``second`` operand's amax is not finite; 4: no memory)."""
    if res & 4:
        raise MemoryError(f"lq grad quantization: could not allocate {partials} per thread")
    done = {}
    for key, bit in ((first, 1), (second, 2)):
        if key in args:
            q, step, amax = args[key][4:]
            done[key] = (q, step, amax, not res & bit)
    return [done[axis] for axis, *_ in ops]


def grid_rows(g: torch.Tensor, dst: torch.Tensor, hs: int, ws: int, lead: int = 0, flip: int = 0) -> bool:
    """Write a channels-last int8 gradient ``g [N, O, Ho, Wo]`` into the channel rows of ``dst`` (int8, contiguous,
    ``[>= O, >= lead + N * hs * ws]``) on the ``hs x ws`` grid: ``dst[o, lead + n * hs * ws + a * ws + b] = g[n, o, a,
    b]``, and zeros in every other byte of ``dst``, every byte xor ``flip`` (:func:`flip_byte`); ``False`` (nothing
    written) where the kernel does not apply."""
    if (g.dtype != torch.int8 or dst.dtype != torch.int8 or not fused.is_channels_last(g) or dst.dim() != 2
            or not dst.is_contiguous() or not _usable(g, dst)):
        return False
    n, o, ho, wo = g.shape
    if ho > hs or wo > ws or dst.shape[0] < o or lead < 0 or dst.shape[1] < lead + n * hs * ws:
        return False
    library().lq_grid_rows(g.data_ptr(), n, ho, wo, o, hs, ws, lead, dst.shape[1], dst.shape[0], dst.data_ptr(),
                           flip, torch.get_num_threads())
    return True


def scale_sums(
    acc: torch.Tensor, a_step: torch.Tensor, b_step: torch.Tensor, bias: torch.Tensor | None, in_place: bool
) -> torch.Tensor | None:
    """``int8_mm.scale_sums`` of int32 sums ``acc [m, n]`` (unit column stride): ``acc * a_step[:, None] *
    b_step[None, :] + bias`` as fp32 (over ``acc``'s own memory when ``in_place`` and ``acc`` is contiguous),
    or ``None`` where the kernel does not apply."""
    if acc.dtype != torch.int32 or not _rows(acc) or not _usable(acc, a_step, b_step):
        return None
    m, n = acc.shape
    if (a_step.numel() not in (1, m) or b_step.numel() not in (1, n)
            or bias is not None and (bias.numel() != n or not _usable(bias))):
        return None
    a, b = _vector(a_step, a_step.numel()), _vector(b_step, n)
    c = None if bias is None else _vector(bias, n)
    if in_place and acc.is_contiguous():
        out = acc.view(torch.float32)
    else:
        out = _floats(m, n)
    library().lq_scale_sums(acc.data_ptr(), m, n, acc.stride(0), a.data_ptr(), 0 if a.numel() == 1 else 1,
                            b.data_ptr(), _ptr(c), out.data_ptr(), torch.get_num_threads())
    return out
