"""Gradient quantization of Zhu et al. 2020, *Towards Unified INT8 Training for Convolutional Neural
Network* (CVPR; arXiv 1912.12607).

* **Per-layer dynamic scale**: the gradient's scale is recomputed from the current gradient at every
  backward (no calibration: gradient ranges change by orders of magnitude during training, their
  Sec. 3 "evolving" observation). ``axis`` optionally keeps one scale per row/channel instead (finer; the
  kept axis must not be the GEMM's reduced dimension, see ``lq.ops.quantize``).
* **Direction-sensitive gradient clipping** (Sec. 4.1): the clipping value ``c`` is the one that minimises
  the cosine distance ``1 - cos(g, Q_c(g))`` between the float gradient and its quantize-dequantize
  ``Q_c(g) = step * clamp(round(g / step), -qmax, qmax)``, ``step = c / qmax``. We search ``c = r * amax``
  over a few ratios ``r``, all candidates at once in fused (compiled) reductions: per-layer scales exactly
  on the whole gradient, per-row/channel scales exactly on a sample of whole rows/channels. A convolution's or
  Linear's gradient on CPU scores its candidates in C instead (``native_quant.conv_clip_search`` /
  ``rows_clip_search``: the same sample, sums in double), 2-5x cheaper.
* **Deviation-counteractive learning-rate scaling** (Sec. 4.2): ``deviation_lr_factor`` returns the factor
  ``phi(d) = max(exp(-alpha * d), beta)`` by which to multiply the learning rate, where ``d`` is the
  gradient's cosine distance (averaged over layers); the paper's defaults are ``alpha = 20``,
  ``beta = 0.1``. (Formula as we read Sec. 4.2 of the paper; check it against the paper before citing
  numbers from it.) ``GradDeviationTracker`` collects ``d`` from the int8 ops for a callback.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lq.ops import fused, native_quant
from lq.ops.quantize import check_finite, quantize_empty, require_finite
from lq.quant.functional import AMAX_EPS

__all__ = [
    "GradDeviationTracker",
    "GradOperand",
    "GradQuantResult",
    "check_unquantized_grad",
    "deviation_lr_factor",
    "direction_sensitive_clip_ratio",
    "layer_clip_state",
    "quantize_grad",
    "quantize_grad_pair",
    "quantize_layer_grads",
    "reset_clip_state",
]


@dataclass
class GradQuantResult:
    """``q`` int8 gradient, ``step`` (real value of one unit, per kept index or ``[1]``), chosen clip
    ``ratio`` and the cosine similarity ``cos`` of the quantized gradient with the float one (on the sample)."""

    q: torch.Tensor
    step: torch.Tensor
    ratio: float
    cos: float


def _index_select(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, index)`` with the same values and result layout, without the full row-major copy
    that ``index_select`` makes of a channels-last ``t`` first (a whole gradient copied to pick a few samples
    or channels: ~3 ms of a SmallResNet int8 step); selected from the NHWC view instead."""
    if fused.is_channels_last(t):
        nhwc = t.permute(0, 2, 3, 1)
        picked = nhwc.index_select((0, 3, 1, 2)[dim], index).permute(0, 3, 1, 2)
        return picked.contiguous()
    return t.index_select(dim, index)


def _constant(cache: dict, key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()`` kept in ``cache`` under ``key`` (at most ~512 entries): the same small index / ratio tensor
    every call. Traced into a compiled graph it is made there as a constant (no cache writes while tracing a
    backward)."""
    if torch.compiler.is_compiling():
        return make()
    t = cache.get(key)
    if t is None:
        if len(cache) > 512:
            cache.clear()
        t = cache[key] = make()
    return t


_SPREAD: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _spread(c: int, n: int, device: torch.device) -> torch.Tensor:
    """``n`` indices evenly spread over ``range(c)`` (rounded half to even, unique, ascending), made in Python
    (the same picks eager and traced into a compiled graph, where ``unique``'s data-dependent size is not
    allowed), cached."""
    return _constant(_SPREAD, (c, n, device), lambda: torch.tensor(
        sorted({round(i * (c - 1) / max(1, n - 1)) for i in range(n)}), dtype=torch.long, device=device
    ))


def _leading_rows(g: torch.Tensor, num: int) -> torch.Tensor | None:
    """Which slices of dim 0 :func:`_leading_slices` scores (``None``: the whole tensor)."""
    if g.numel() <= num or g.dim() < 2 or g.shape[0] == 1:
        return None
    return _spread(g.shape[0], max(1, num // max(1, g[0].numel())), g.device)


def _sample_slices(g: torch.Tensor, axis: int, num: int) -> torch.Tensor:
    """Which slices of ``axis`` :func:`_slice_sample` takes."""
    c = g.shape[axis]
    length = max(1, g.numel() // max(1, c))
    return _spread(c, max(1, min(c, num // length)), g.device)


def _slice_sample(
    g: torch.Tensor, axis: int, num: int, mult: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole slices (index ``i`` of ``axis``), evenly spread, about ``num`` elements in all: ``[C_s, L]`` fp32
    and the indices ``sel [C_s]`` of the slices (which pick their amax). Whole slices keep each slice's tail
    (its largest values), which decides whether clipping pays; a strided element sample would miss those rare
    values."""
    sel = _sample_slices(g, axis, num)
    sub = _index_select(g, axis, sel).float()
    if mult is not None:
        sub = sub * mult  # mult has size 1 along axis: broadcasts onto the selected slices
    return sub.movedim(axis, 0).reshape(sel.numel(), -1), sel


def _leading_slices(
    g: torch.Tensor, mult: torch.Tensor | None, num: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The whole tensor if it has at most ``num`` elements, else evenly spread whole slices of dim 0 (e.g.
    samples of the batch) with about ``num`` elements; ``mult`` follows when it varies along dim 0."""
    sel = _leading_rows(g, num)
    if sel is None:
        return g, mult
    if mult is not None and mult.dim() == g.dim() and mult.shape[0] > 1:
        mult = mult.index_select(0, sel)
    return _index_select(g, 0, sel), mult


def _tensor_clip_cosines(
    g: torch.Tensor, mult: torch.Tensor | None, amax: torch.Tensor, r: torch.Tensor, qmax: int
) -> torch.Tensor:
    """cos(g*mult, Q_r(g*mult)) for every ratio ``r [R]``, one scale per tensor, exact over the whole tensor
    (compiled into fused reductions: no ``[R, numel]`` tensor is materialised). ``g`` keeps its shape and
    layout, the ratios a leading dimension: flattening ``g * mult`` first (a per-channel ``mult``, a
    channels-last gradient) made Inductor copy it and reduce 9x slower (3.1 vs 0.35 ms on SmallResNet's
    gradients, 27% of its int8 training step)."""
    y = (g.float() if mult is None else g.float() * mult).unsqueeze(0)
    step = (r.reshape([-1] + [1] * g.dim()) * amax.reshape([1] * y.dim())).clamp_min(AMAX_EPS) / qmax  # [R, 1...]
    deq = torch.clamp(torch.round(y / step), -qmax, qmax) * step  # [R, *g.shape]
    dims = list(range(1, y.dim()))
    dot = (deq * y).sum(dims)
    norm = torch.sqrt((deq * deq).sum(dims) * (y * y).sum())
    return torch.where(norm > 0, dot / norm.clamp_min(1e-30), torch.ones_like(dot))


def direction_sensitive_clip_ratio(
    sample: torch.Tensor, amax: torch.Tensor, qmax: int, ratios: tuple[float, ...]
) -> tuple[float, float]:
    """Zhu et al. Sec. 4.1: the ratio ``r`` (clip value ``r * amax``) maximising ``cos(g, Q_r(g))``.

    ``sample``: ``[C, L]`` fp32 whole slices, ``amax``: ``[C, 1]`` (each slice clipped at ``r`` times its
    own amax). Returns ``(ratio, cos)``. All ratios are scored in one broadcast ``[R, C, L]`` computation.
    """
    r = torch.tensor(ratios, dtype=torch.float32, device=sample.device).reshape(-1, 1, 1)
    cos = fused.call("clip_cosines", _clip_cosines, sample, amax, r, qmax)
    best = int(torch.argmax(cos))
    return ratios[best], float(cos[best])


def _clip_cosines(sample: torch.Tensor, amax: torch.Tensor, r: torch.Tensor, qmax: int) -> torch.Tensor:
    step = (r * amax.unsqueeze(0)).clamp_min(AMAX_EPS) / qmax  # [R, C, 1]
    deq = torch.clamp(torch.round(sample.unsqueeze(0) / step), -qmax, qmax) * step  # [R, C, L]
    dot = (deq * sample).sum(dim=(1, 2))
    norm = torch.sqrt((deq * deq).sum(dim=(1, 2)) * (sample * sample).sum())
    return torch.where(norm > 0, dot / norm.clamp_min(1e-30), torch.ones_like(dot))


def _fused_search(g, mult, gs, ms, sample, sel, r, qmax: int, axis, noise, seed):
    """One compiled graph for a searched gradient quantization: amax, the candidates' cosines on the sample
    (per layer: ``gs`` / ``ms`` from :func:`_leading_slices`, ``None`` for ``g`` / ``mult`` themselves; per slice:
    ``sample`` from :func:`_slice_sample`, whose slices ``sel`` pick their amax here), the best ratio (first
    maximum, picked by index inside the graph), the scale and the rounding: the same operations as the unfused
    steps, with no host sync between them (the caller reads the chosen index, the cosine and finiteness)."""
    amax = fused._amax_along(g, mult, axis)
    if axis is None:
        cos = _tensor_clip_cosines(g if gs is None else gs, mult if gs is None else ms, amax, r, qmax)
    else:
        cos = _clip_cosines(sample, amax.index_select(0, sel).reshape(-1, 1), r.reshape(-1, 1, 1), qmax)
    best = torch.argmax(cos).reshape(1)
    s = fused.scale_from_amax(amax * r.index_select(0, best), qmax)
    q = fused._quantize_with_scale(g, mult, s, qmax, axis, noise, seed)
    return q, 1.0 / s, amax, torch.isfinite(amax).all(), best, cos.index_select(0, best)


def _fused_fixed(g, mult, r, qmax: int, axis, noise, seed):
    """One compiled graph for a gradient quantization with a known ratio ``r [1]`` (no search)."""
    amax = fused._amax_along(g, mult, axis)
    s = fused.scale_from_amax(amax * r[0], qmax)
    q = fused._quantize_with_scale(g, mult, s, qmax, axis, noise, seed)
    return q, 1.0 / s, amax, torch.isfinite(amax).all()


_RATIOS: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


def _ratio_tensor(cand: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return _constant(_RATIOS, (cand, device), lambda: torch.tensor(cand, dtype=torch.float32, device=device))


def quantize_grad(
    g: torch.Tensor,
    qmax: int,
    axis: int | None,
    ratios: tuple[float, ...] = (1.0,),
    clip: bool = True,
    num_samples: int = 16384,
    name: str | None = None,
    what: str = "output gradient",
    mult: torch.Tensor | None = None,
    every: int = 1,
    state: dict | None = None,
    stochastic: bool | str = False,
) -> GradQuantResult:
    """Quantize the gradient ``g * mult`` to int8 with a dynamic scale per layer (``axis=None``) or per index
    of ``axis``, after direction-sensitive clipping (Zhu et al. Sec. 4.1) when ``clip`` and
    ``len(ratios) > 1``. ``mult`` (broadcastable, size 1 along ``axis``) folds another operand's scale into
    the gradient inside the fused kernels, without materialising ``g * mult``. ``stochastic``: round
    ``floor(g * s + u)``, ``u`` uniform in [0, 1) (unbiased to within 1/256 of a step: ``fused.noise_bits``'
    128 levels; ``Int8ComputeConfig(grad_rounding="stochastic")``;
    ``"hash"``: ``u`` from ``fused.uniform_hash``, ``grad_rounding="stochastic_hash"``).

    ``every > 1`` with a ``state`` dict: search the clip ratio only on every ``every``-th call for this
    ``what`` and reuse the chosen *ratio* in between (the scale itself stays dynamic: ``ratio * amax`` of the
    current gradient). Zhu et al. likewise update the clipping value periodically rather than every
    iteration, to cut the search's cost (their speed section, "periodic update", as we read it). ``state`` is
    the caller's: one dict per layer object (``layer_clip_state(layer)``; the quantized layers pass theirs),
    holding ``{what: [calls since the last search, ratio]}``, so two models with the same layer names never
    share ratios. Without a ``state`` there is nowhere to remember a ratio: every call searches (exact, only
    slower), with a one-time warning. ``reset_clip_state(model)`` forgets a model's ratios.

    Traced by ``torch.compile`` (a compiled model's backward), nothing may live between calls or be read on the
    host: the clip is searched on every call, the result's ``ratio`` and ``cos`` are tensors, stochastic
    rounding's noise comes from the opaque ``lq::noise_bytes`` op (``fused.rounding_inputs``) and NaN/Inf raise
    ``RuntimeError`` from an asynchronous assert (same message).

    Clip search cost: per layer, fused reductions (about one pass per candidate) over at most
    ``16 * num_samples`` elements (whole slices of dim 0, e.g. batch samples, beyond that); per row/channel,
    an exact search on about ``num_samples`` elements of whole rows/channels. ``cos`` is 1.0 when it was not
    measured (no search this call and no ``GradDeviationTracker`` active). Raises ``FloatingPointError``
    naming ``name`` on NaN/Inf.
    """
    _check_args(every, state)
    axis = None if axis is None else axis % g.dim()
    if g.numel() == 0:  # nothing to quantize (an empty batch): amax 0, i.e. the smallest scale's step
        q, step = quantize_empty(g, qmax, axis)
        return GradQuantResult(q=q, step=step, ratio=1.0, cos=1.0)
    plan = _plan(ratios, clip, name, what, every, state)
    return _quantize_planned(g, qmax, axis, mult, num_samples, name, what, stochastic, plan)


def _check_args(every: int, state: dict | None) -> None:
    if every < 1:
        raise ValueError(f"every must be >= 1 (search the clip ratio every n-th call), got {every}")
    if state is not None and not isinstance(state, dict):
        raise TypeError(f"state must be a dict (the layer's clip state) or None, got {type(state).__name__}")


@dataclass
class _Plan:
    """Whether this call searches the clip (``cand``: the candidate ratios) or reuses ``ratio``, and whether
    it restarts the periodic count (``periodic``)."""

    search: bool
    cand: tuple[float, ...]
    ratio: float
    periodic: bool
    state: dict | None = field(default=None, repr=False)
    what: str = ""


def _plan(
    ratios: tuple[float, ...], clip: bool, name: str | None, what: str, every: int, state: dict | None,
    advance: bool = True,
) -> _Plan:
    """The periodic search's decision for one call (advances ``state``'s count for ``what`` unless
    ``advance=False``: a look at the decision the next call will make)."""
    ratio = 1.0
    search = clip and len(ratios) > 1
    cand = tuple(ratios) if search else (1.0,)
    # traced into a compiled graph (once, for every later call): no Python state between calls and no host
    # reads, so the clip is searched on every call and the chosen ratio and cosine stay tensors in the graph
    periodic = search and every > 1 and not torch.compiler.is_compiling()
    if periodic and state is None:
        _warn_no_clip_state(name)
        periodic = False
    if periodic:
        entry = state.get(what)
        if entry is not None and entry[0] < every:
            if advance:
                entry[0] += 1
            search, cand = False, (entry[1],)
            ratio = entry[1]
    return _Plan(search, cand, ratio, periodic, state, what)


def _quantize_planned(
    g: torch.Tensor, qmax: int, axis: int | None, mult: torch.Tensor | None, num_samples: int, name: str | None,
    what: str, stochastic: bool | str, plan: _Plan,
) -> GradQuantResult:
    ratio, cos = plan.ratio, 1.0
    compiling = torch.compiler.is_compiling()
    noise, seed = fused.rounding_inputs(g, stochastic)
    scored = None
    if (plan.search or _ACTIVE) and not compiling and stochastic != "hash":
        scored = _search_native(g, qmax, axis, mult, plan.cand, num_samples)
    if scored is not None:  # a conv's or Linear's gradient on CPU: the candidates scored in C, then quantized
        cosines, amax = scored
        require_finite(torch.isfinite(amax).all(), amax, what, name)
        best = _best_candidate(cosines)
        ratio, cos = plan.cand[best], float(cosines[best])
        q, step, amax, finite = _quantize_fixed(g, qmax, axis, mult, ratio, noise, seed, stochastic)
        require_finite(finite, amax, what, name)
    elif plan.search or _ACTIVE:
        r = _ratio_tensor(plan.cand, g.device)
        gs = ms = sample = sel = None
        if axis is None:
            gs, ms = _leading_slices(g, mult, num_samples * 16)
            if gs is g:  # the whole tensor: not passed twice (Dynamo guards on the aliasing: a second compile)
                gs = ms = None
        else:
            sample, sel = _slice_sample(g, axis, num_samples, mult)
        q, step, amax, finite, best, best_cos = fused.call(
            "grad_quant_search", _fused_search, g, mult, gs, ms, sample, sel, r, qmax, axis, noise, seed
        )
        require_finite(finite, amax, what, name)
        if compiling:
            return GradQuantResult(q=q, step=step, ratio=r.index_select(0, best), cos=best_cos)
        ratio, cos = plan.cand[int(best)], float(best_cos)
    else:
        q, step, amax, finite = _quantize_fixed(g, qmax, axis, mult, plan.cand[0], noise, seed, stochastic)
        require_finite(finite, amax, what, name)
    if plan.periodic and plan.search:  # searched this call (not a reuse): restart the count
        plan.state[plan.what] = [1, ratio]
    if not compiling:
        _report(name, what, 1.0 - cos)
    return GradQuantResult(q=q, step=step, ratio=ratio, cos=cos)


#: cosines this close count as equal in the C search (its double sums are ~1e-9 from float64; the compiled search's fp32
#: sums ~2e-7): a slice of one element scores every ratio 1 +- 1e-8, and the earliest (least clipping) is kept
_TIE = 1e-7


def _best_candidate(cosines: list[float]) -> int:
    """The candidate the C search picks: the earliest within :data:`_TIE` of the best cosine (near-ties below the
    compiled search's own fp32 rounding go to the least clipping), or the first NaN where one is (as ``torch.argmax``:
    squares of gradients beyond ~1e19 overflow fp32, in the compiled search too)."""
    for k, c in enumerate(cosines):
        if c != c:
            return k
    top = max(cosines)
    return next(k for k, c in enumerate(cosines) if c >= top - _TIE)


def _quantize_fixed(g, qmax: int, axis, mult, ratio: float, noise, seed, stochastic):
    """``(q, step, amax, finite)`` of ``g * mult`` clipped at ``ratio * amax``: the C kernels where they apply, else
    the compiled :func:`_fused_fixed` (the same numbers)."""
    done = None if stochastic == "hash" else native_quant.grad_operands(g, qmax, [(axis, mult, ratio, noise, seed)])
    if done is not None:
        return done[0]
    return fused.call("grad_quant_fixed", _fused_fixed, g, mult, _ratio_tensor((ratio,), g.device), qmax, axis, noise,
                      seed)


def _search_native(g, qmax: int, axis, mult, cand: tuple[float, ...], num_samples: int):
    """The clip candidates ``cand`` scored in C for a convolution's gradient operand on CPU
    (``native_quant.conv_clip_search``) on the sample :func:`_fused_search` scores (whole images of at most ``16 *
    num_samples`` elements per layer, whole channels of about ``num_samples`` per channel), or a Linear's per-row /
    per-column operand (``native_quant.rows_clip_search``, whole rows / columns): ``(cosines, amax)``, or ``None``
    where that does not apply. The cosines are ~1e-8 from float64 sums of the same fp32 products (the compiled search's
    fp32 sums: 1e-7 to 1e-6), so only candidates that close could be ranked otherwise (:func:`_best_candidate`).
    64 x 16 x 28 x 28 gradient, 6 candidates, 2 threads: 0.22 / 0.09 ms per layer / per channel scoring against
    0.54 / 0.52 ms for the compiled search and its quantization (AVX-512 Zen 5 host)."""
    if g.device.type != "cpu":
        return None
    if g.dim() == 2 and axis in (0, 1):  # a Linear's per-row / per-column scales: whole rows / columns
        return native_quant.rows_clip_search(g, qmax, axis, mult, cand, _sample_slices(g, axis, num_samples))
    if g.dim() != 4:
        return None
    if axis is None:
        sel = _leading_rows(g, num_samples * 16)
    elif axis == 1 and mult is None:
        sel = _sample_slices(g, 1, num_samples)
    else:
        return None
    return native_quant.conv_clip_search(g, qmax, axis, mult, cand, sel)


def _fused_fixed_pair(g, mult_a, r_a, axis_a, noise_a, seed_a, mult_b, r_b, axis_b, noise_b, seed_b, qmax: int):
    """:func:`_fused_fixed` twice on one gradient in one compiled graph (both backward products' operands)."""
    return (*_fused_fixed(g, mult_a, r_a, qmax, axis_a, noise_a, seed_a),
            *_fused_fixed(g, mult_b, r_b, qmax, axis_b, noise_b, seed_b))


@dataclass(frozen=True, eq=False)
class GradOperand:
    """One backward product's quantization of a gradient: per index of ``axis`` (``None``: per layer), of
    ``g * mult`` (``mult`` another operand's folded scale, or ``None``), labelled ``what``."""

    axis: int | None
    mult: torch.Tensor | None
    what: str


def quantize_grad_pair(
    g: torch.Tensor,
    qmax: int,
    first: GradOperand,
    second: GradOperand,
    ratios: tuple[float, ...] = (1.0,),
    clip: bool = True,
    num_samples: int = 16384,
    name: str | None = None,
    every: int = 1,
    state: dict | None = None,
    stochastic: bool | str = False,
) -> tuple[GradQuantResult, GradQuantResult]:
    """``quantize_grad`` for both backward products of a layer (grad_input's and grad_weight's operands of the
    same gradient), the same results: where neither searches its clip this call (``clip_every`` reuses, or no
    clipping) and no ``GradDeviationTracker`` is active, in one compiled call that reads ``g`` for both
    (one call less: ~70 us of Dynamo's wrapper, and one or two passes over ``g`` less); else one
    ``quantize_grad`` call each, in order. (A NaN in ``g`` raises for the first operand; in the paired call
    both counts have advanced by then, where two calls would have advanced the first only.)"""
    _check_args(every, state)
    if first.what == second.what:
        raise ValueError(f"quantize_grad_pair: the two operands need different labels (their clip state), got "
                         f"{first.what!r} twice")
    ops = [op if op.axis is None or 0 <= op.axis < g.dim() else replace(op, axis=op.axis % g.dim())
           for op in (first, second)]
    plans = [_plan(ratios, clip, name, op.what, every, state, advance=False) for op in ops]
    if g.numel() == 0 or any(p.search for p in plans) or _ACTIVE or torch.compiler.is_compiling():
        # one quantize_grad each, in order (the second decides after the first ran, as two calls would)
        return tuple(quantize_grad(g, qmax, op.axis, ratios, clip, num_samples, name, op.what, op.mult, every,
                                   state, stochastic) for op in ops)
    for p in plans:  # neither searches: each reused ratio's count advances, as _plan(advance=True) would
        if p.periodic:
            p.state[p.what][0] += 1
    inputs, native = [], []
    for op, p in zip(ops, plans):
        noise, seed = fused.rounding_inputs(g, stochastic)
        inputs += [op.mult, _ratio_tensor(p.cand, g.device), op.axis, noise, seed]
        native.append((op.axis, op.mult, p.cand[0], noise, seed))
    done = None if stochastic == "hash" else native_quant.grad_operands(g, qmax, native)  # (C, CPU)
    if done is not None:
        results = []
        for (q, step, amax, finite), op, p in zip(done, ops, plans):
            require_finite(finite, amax, op.what, name)
            results.append(GradQuantResult(q=q, step=step, ratio=p.ratio, cos=1.0))
        return tuple(results)
    # no tensor twice (equal cached ratios or level shifts are the same object): Dynamo guards on which inputs
    # are the same object and would compile the graph again the first time two coincide (review finding)
    seen: set[int] = set()
    for i, a in enumerate(inputs):
        if isinstance(a, torch.Tensor):
            if id(a) in seen:
                inputs[i] = a.clone()
            seen.add(id(a))
    out = fused.call("grad_quant_fixed_pair", _fused_fixed_pair, g, *inputs, qmax)
    results = []
    for i, (op, p) in enumerate(zip(ops, plans)):
        q, step, amax, finite = out[4 * i : 4 * i + 4]
        require_finite(finite, amax, op.what, name)
        results.append(GradQuantResult(q=q, step=step, ratio=p.ratio, cos=1.0))
    return tuple(results)


def quantize_layer_grads(
    g: torch.Tensor, qmax: int, ops: dict[str, GradOperand], config, name: str | None, state: dict | None
) -> dict[str, GradQuantResult]:
    """A layer's gradient operands ``ops`` (by key) quantized under ``config`` (an ``Int8ComputeConfig``: its
    clip ratios, search period and rounding): :func:`quantize_grad_pair` for two, :func:`quantize_grad` for one."""
    common = dict(ratios=config.clip_ratios, clip=config.grad_clip, num_samples=config.clip_samples, name=name,
                  every=config.clip_every, state=state, stochastic=config.rounding_noise)
    if len(ops) == 2:
        return dict(zip(ops, quantize_grad_pair(g, qmax, *ops.values(), **common)))
    return {k: quantize_grad(g, qmax, op.axis, what=op.what, mult=op.mult, **common) for k, op in ops.items()}


# Where a layer object keeps its periodic clip state (a plain attribute in its __dict__: not a buffer, so
# not in state_dict; a deepcopy of the model gets its own copy).
CLIP_STATE_ATTR = "int8_clip_state"
_warned_no_state = False


def _warn_no_clip_state(name: str | None) -> None:
    global _warned_no_state
    if not _warned_no_state:
        _warned_no_state = True
        warnings.warn(
            f"quantize_grad(every > 1) without a state dict (op '{name}'): the clip ratio is searched on every "
            "call. Pass clip_state=lq.ops.grad_quant.layer_clip_state(layer) (or any dict kept per layer) to "
            "int8_linear / int8_conv2d to search only every n-th call",
            stacklevel=3,
        )


def layer_clip_state(layer: nn.Module) -> dict:
    """The periodic clip-search state of one layer object (created empty on first use); pass it as
    ``clip_state`` to ``int8_linear`` / ``int8_conv2d``. Lives with the layer, so it is per model."""
    return layer.__dict__.setdefault(CLIP_STATE_ATTR, {})


def reset_clip_state(model: nn.Module | None = None) -> None:
    """Forget the periodically searched clip ratios (``Int8ComputeConfig(clip_every > 1)``) of every layer of
    ``model``, so they are searched afresh on the next backward (``Int8Training`` calls it at setup).

    The state used to be one process-wide dict keyed by layer name; it now lives with each layer object, so
    ``reset_clip_state()`` without a model has nothing to reset: a no-op kept for backward compatibility,
    with a ``DeprecationWarning``.
    """
    if model is None:
        warnings.warn(
            "reset_clip_state() without a model does nothing: clip state is kept per layer object; "
            "call reset_clip_state(model)",
            DeprecationWarning,
            stacklevel=2,
        )
        return
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for m in model.modules():
        state = m.__dict__.get(CLIP_STATE_ATTR)
        if state is not None:
            state.clear()


def check_unquantized_grad(g: torch.Tensor, needs_input_grad: tuple[bool, ...], config, name: str | None) -> None:
    """NaN/Inf check of the output gradient for a backward in which neither int8 product quantizes it
    (``quantize_grad`` checks it whenever one does): so float backward paths report the layer as well."""
    if not (
        (needs_input_grad[0] and config.int8_grad_input_enabled)
        or (needs_input_grad[1] and config.int8_grad_weight_enabled)
    ):
        check_finite(g.abs().amax().reshape(1), "output gradient", name)


def deviation_lr_factor(deviation: float | torch.Tensor, alpha: float = 20.0, beta: float = 0.1) -> float:
    """Zhu et al. Sec. 4.2, deviation-counteractive learning-rate scaling: ``max(exp(-alpha * d), beta)``.

    ``deviation`` is the cosine distance ``d = 1 - cos(g, g_hat)`` of the quantized gradients (e.g. the
    mean over layers from ``GradDeviationTracker.mean()``). Multiply the learning rate by the result:
    larger deviation -> smaller step, never below ``beta`` times the base rate.
    """
    d = float(deviation)
    if not math.isfinite(d) or d < 0:
        raise ValueError(f"deviation must be a finite cosine distance >= 0, got {deviation!r}")
    if alpha < 0 or not 0 < beta <= 1:
        raise ValueError(f"need alpha >= 0 and 0 < beta <= 1, got alpha={alpha}, beta={beta}")
    return max(math.exp(-alpha * d), beta)


@dataclass
class GradDeviationTracker:
    """Collects the cosine distance of every gradient quantization done by the int8 ops while active.

    ``with GradDeviationTracker() as t: loss.backward()``; then ``t.mean()`` feeds ``deviation_lr_factor``.
    Entries are keyed by the op's ``name`` (``"<unnamed>"`` when none was given). Entering an active tracker
    and exiting an inactive one do nothing, so a callback may close it on every path (after backward, on an
    exception, at teardown) without tracking which one ran. Trackers are matched by identity: two trackers
    with equal contents are still different trackers.
    """

    deviations: dict[str, list[float]] = field(default_factory=dict)

    def __enter__(self) -> GradDeviationTracker:  # noqa: PYI034
        if not self.active:
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for i, tracker in enumerate(_ACTIVE):
            if tracker is self:  # not list.remove: the dataclass __eq__ compares contents
                del _ACTIVE[i]
                break

    @property
    def active(self) -> bool:
        """Whether the int8 ops report to this tracker now."""
        return any(tracker is self for tracker in _ACTIVE)

    def record(self, name: str | None, what: str, deviation: float) -> None:
        """Store one measured deviation of layer ``name``'s quantized gradient ``what`` (e.g. ``grad_output``)."""
        self.deviations.setdefault(f"{name or '<unnamed>'}:{what}", []).append(deviation)

    def mean(self) -> float:
        """The mean of every deviation recorded so far (0.0 when none was)."""
        values = [d for ds in self.deviations.values() for d in ds]
        return sum(values) / len(values) if values else 0.0

    def reset(self) -> None:
        """Forget the recorded deviations."""
        self.deviations.clear()


_ACTIVE: list[GradDeviationTracker] = []


def _report(name: str | None, what: str, deviation: float) -> None:
    for tracker in _ACTIVE:
        tracker.record(name, what, deviation)
