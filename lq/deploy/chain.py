"""Int8 chains: consecutive converted layers hand over integers instead of floats (``lq.convert(fuse=True)``).

A converted layer takes floats, quantizes them (eq. 7) and returns floats (eq. 10). Between two int8 layers
that only ReLU (or ReLU6 / Hardtanh(0, u)), max pooling, flatten, identity (a folded BatchNorm) or eval-mode
dropout separate, that float
round trip is wasted work: those ops commute with the next layer's quantizer ``Q(v) = clip(round(s v), -q, q)``,
because ``Q`` is monotone non-decreasing with ``Q(0) = 0``::

    Q(relu(y)) = clip(round(s y), 0, q),   Q(max_i y_i) = max_i Q(y_i),   Q(flatten(y)) = flatten(Q(y)).

So the first layer's kernel emits the next layer's input integers directly (oneDNN: ReLU, clip and
requantization in the convolution's output stage, uint8 out), max pooling runs on uint8 (4x less memory
than fp32 and a vectorised kernel), and the next layer skips its quantization and its sign test (its
integers are known non-negative). A ReLU after a layer whose output stays float is fused into its kernel. ReLU6 and Hardtanh(0, u) are
clips ``clip(y, 0, u)`` and commute with the quantizer the same way: they fuse like ReLU.
The integers are those of the unfused model except where ``s y`` sits within float rounding of a
half-integer (the unfused model and the fake-quant model compute ``y`` in different summation orders too),
and, for fp16/bf16 inputs, where the unfused model's rounding of ``y`` to half precision before the next
layer quantizes it moves ``s y`` across a half-integer (the chain quantizes the fp32 ``y``; a reviewer
measured 0.2% (fp16) / 1.6% (bf16) of hand-over integers off by one in an MLP).

Only ``nn.Sequential`` containers are fused: their data flow is the order of their children (nested
plain Sequentials flattened). ``fuse_sequentials`` turns each Sequential that holds a fusible pattern into
an :class:`Int8Sequential` in place (the object's class changes; children, buffers, attributes, hooks and
``state_dict`` stay). It runs the plain Sequential forward whenever the fused one would not be equivalent:
in train mode or for inputs that require grad (the int8 layers then raise their inference-only error), or
when a module inside has hooks or is in train mode. Adding, removing or replacing children re-plans it.
Kernels whose oneDNN output stage has no ReLU/clip post-op (quantized conv1d and conv3d) write floats and
the requantization runs as torch ops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from operator import is_

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from lq.deploy import gemv
from lq.deploy.int8_layers import Int8ConvNd, Int8Linear, Int8Module, _memory_format
from lq.deploy.kernels import FLOAT, Output

log = logging.getLogger(__name__)

#: eval-mode no-ops between layers (a folded BatchNorm leaves an Identity)
_PASS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_LAYERS = (Int8Linear, Int8ConvNd)


@dataclass
class Step:
    """One leaf of the flattened Sequential and how the fused forward runs it.

    kind: ``"layer"`` (an int8 layer: ``run`` with ``grid`` input and ``out``), ``"skip"`` (an eval no-op, or
    a ReLU fused into the layer before it), ``"pool"`` (max pooling on the integer grid), ``"call"`` (the
    module's own forward; a Flatten on the grid is one).
    """

    kind: str
    module: nn.Module
    grid: bool = False
    out: Output = FLOAT
    feeds: nn.Module | None = field(default=None, repr=False)  # the layer whose input grid ``out`` is
    on_grid: bool = False  # a skip/pool/call between a grid-writing layer and its consumer
    #: a "call" to one of torch.nn's own modules: they compute the same on any memory layout (others may .view)
    any_layout: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.any_layout = type(self.module).__module__.startswith("torch.nn.modules.")


def _leaves(seq: nn.Sequential) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, module) for each leaf of ``seq`` in data-flow order; plain nested Sequentials are
    flattened (a Sequential subclass may have its own forward: it is a leaf)."""
    out = []
    for name, child in seq._modules.items():
        if child is None:
            continue
        if type(child) is nn.Sequential:
            out.extend(_leaves(child))
        else:
            out.append((seq, name, child))
    return out


def _containers(seq: nn.Sequential) -> list[nn.Module]:
    """``seq`` and the plain Sequentials nested in it (their hooks would be skipped by the fused path)."""
    out = [seq]
    for child in seq._modules.values():
        if type(child) is nn.Sequential:
            out.extend(_containers(child))
    return out


def _structure(seq: nn.Sequential) -> list[tuple[nn.Module, list[tuple[str, nn.Module]]]]:
    """Each container with its (name, child) items: what the plan was made from."""
    return [(c, list(c._modules.items())) for c in _containers(seq)]


def _unchanged(structure: list[tuple[nn.Module, list[tuple[str, nn.Module]]]]) -> bool:
    for c, items in structure:
        mods = c._modules
        if len(mods) != len(items):
            return False
        for name, child in items:
            if mods.get(name) is not child:
                return False
    return True


def _takes_grid(m: nn.Module) -> bool:
    """An int8 layer that can start from integers: its input padding is plain zero padding. (A Linear smoothed
    by ``lq.smooth_quant`` quantizes ``x / s`` per input feature: only a Linear right before it, through
    ReLU-like clips and no-ops, can write those integers, see :func:`_smoothed`.)"""
    return isinstance(m, Int8Linear) or (isinstance(m, Int8ConvNd) and m._pre_pad is None)


def _smoothed(m: nn.Module) -> bool:
    return isinstance(m, Int8Linear) and "input_smoothing" in m._buffers


_NO_CLIP = float("inf")


def _relu_top(m: nn.Module) -> float | None:
    """For ReLU-like clips ``clip(y, 0, top)`` the top (inf for ReLU, 6 for ReLU6, ``max_val`` for
    Hardtanh(0, max_val)); None for anything else. Exact types: a subclass may compute something else."""
    if type(m) is nn.ReLU:
        return _NO_CLIP
    if type(m) in (nn.Hardtanh, nn.ReLU6) and m.min_val == 0 and m.max_val > 0:  # ReLU6 = Hardtanh(0, 6)
        return float(m.max_val)
    return None


def _relu_output(modules: list[nn.Module]) -> Output:
    """The fused activation of the ReLU-like clips in ``modules`` (clips compose to the smallest top)."""
    top = min(t for t in map(_relu_top, modules) if t is not None)
    return Output(relu=True, upper=None if top == _NO_CLIP else top)


def _between(m: nn.Module) -> str | None:
    """How a module between two int8 layers commutes with the quantizer: "relu" (ReLU, ReLU6,
    Hardtanh(0, u)), "skip", "pool", "call" (Flatten), or None (it does not: the chain ends)."""
    if _relu_top(m) is not None:
        return "relu"
    if type(m) in _PASS:  # exact types: a subclass may compute something
        return "skip"
    if type(m) is nn.MaxPool2d and not m.return_indices:
        return "pool"
    if type(m) is nn.Flatten:
        return "call"
    return None


def plan(modules: list[nn.Module]) -> list[Step]:
    """The fused forward of a chain of leaf modules (see the module docstring)."""
    steps: list[Step] = []
    grid_in: set[int] = set()  # positions (not modules: a layer may be used twice) that receive integers
    i, n = 0, len(modules)
    while i < n:
        m = modules[i]
        if not isinstance(m, _LAYERS):
            steps.append(Step("call", m))
            i += 1
            continue
        j, kinds = i + 1, []
        while j < n and (kind := _between(modules[j])) is not None:
            kinds.append(kind)
            j += 1
        consumer = modules[j] if j < n and _takes_grid(modules[j]) else None
        if consumer is not None and _smoothed(consumer) and not (
            isinstance(m, Int8Linear) and all(k in ("relu", "skip") for k in kinds)
        ):
            consumer = None  # its divisor indexes the Linear's features: only a Linear's output has them as is
        grid = i in grid_in
        if "relu" in kinds and consumer is not None:
            # m writes the consumer's input integers; everything up to the consumer runs on them
            steps.append(Step("layer", m, grid, _relu_output(modules[i + 1 : j]), feeds=consumer))
            for k, b in zip(kinds, modules[i + 1 : j]):
                steps.append(Step("skip" if k == "relu" else k, b, on_grid=True))
            grid_in.add(j)
            i = j
            continue
        # no hand-over: fuse a ReLU that follows (through eval no-ops) into m's float output
        k = i + 1
        while k < n and _between(modules[k]) == "skip":
            k += 1
        if k < n and _relu_top(modules[k]) is not None:
            steps.append(Step("layer", m, grid, _relu_output([modules[k]])))
            steps.extend(Step("skip", b) for b in modules[i + 1 : k + 1])
            i = k + 1
        else:
            steps.append(Step("layer", m, grid))
            i += 1
    return steps


def _value(d: dict, key: str) -> object:
    return d.get(key)


def _is_none(d: dict, key: str) -> bool:
    return d.get(key) is None


def _present(d: dict, key: str) -> bool:
    return key in d  # (what plan's _smoothed and Int8Linear.run test)


def _plan_reads(m: nn.Module) -> list[tuple[dict, str, Callable[[dict, str], object]]]:
    """What :func:`plan` reads from a module beyond its exact type, as ``(dict, key, how)``: clip bounds, pooling
    indices, whether a conv pads explicitly, whether a Linear has a SmoothQuant divisor. The one table behind
    :func:`_plan_input` (``how(dict, key)``) and the batch-1 guard's reads (:class:`_Guard`: ``dict.get(key)``
    by identity)."""
    t = type(m)
    if t is nn.Hardtanh or t is nn.ReLU6:
        return [(m.__dict__, "min_val", _value), (m.__dict__, "max_val", _value)]
    if t is nn.MaxPool2d:
        return [(m.__dict__, "return_indices", _value)]
    if isinstance(m, Int8ConvNd):
        return [(m.__dict__, "_pre_pad", _is_none)]
    if isinstance(m, Int8Linear):
        return [(m._buffers, "input_smoothing", _present)]
    return []


def _plan_input(m: nn.Module) -> object:
    """What :func:`plan` reads from a module: its exact type (``_between`` / ``_relu_top`` test exact types)
    and :func:`_plan_reads`' values."""
    reads = _plan_reads(m)
    return type(m) if not reads else (type(m), *(how(d, k) for d, k, how in reads))


def _plan_inputs(modules: list[nn.Module]) -> list[object]:
    """:func:`_plan_input` of each module: a plan is redone when any of it changes (``seq[1].max_val = 0.5``
    after convert). Checked on every fused call, so one cheap read per module."""
    return [_plan_input(m) for m in modules]


@dataclass(eq=False)
class _Guard:
    """What keeps a bound program (:meth:`Int8Sequential._lean_program`) valid, read with C-level calls only.

    At batch 1 a call's bookkeeping runs cache-cold (the GEMVs stream megabytes of weights between calls), so
    each Python object it touches costs: ``_fusable_now`` and ``_lean_program`` took 24 + 13 us of a 270 us
    MLP call on the VNNI host. The guard holds the same facts as three flat tuples of ``(dict, key, object)``
    compared by identity (``training`` flags; hook, children, buffer, parameter and kernel-cache dicts and
    their entries; the layers' cached steps and hand-overs), the containers' child counts, the hook dicts that
    must stay empty and the leaves' exact types. When it fails the full checks run and, if the program still
    stands, a new guard is taken; ``tests/test_deploy_chain.py`` edits a used chain every way it knows."""

    program: list
    dicts: tuple
    keys: tuple
    values: tuple
    children: tuple  # each container's ``_modules``
    counts: tuple  # ... and its length
    hooks: tuple  # hook dicts that must stay empty
    leaves: tuple
    types: tuple

    def holds(self) -> bool:
        return (
            all(map(is_, map(dict.get, self.dicts, self.keys), self.values))
            and not any(map(len, self.hooks))
            and tuple(map(len, self.children)) == self.counts
            and tuple(map(type, self.leaves)) == self.types
        )


def _geometry(m: nn.Module) -> tuple:
    """What the conv chain read from a convolution or pooling beyond its part: its geometry."""
    if isinstance(m, nn.MaxPool2d):
        return (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
    return (tuple(m.stride), tuple(m.padding), tuple(m.dilation), m.groups)


def _gemv_step(
    first: Int8Linear, parts: list, fallback: list | Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The chain as one :mod:`lq.deploy.gemv` call for inputs of a few rows, ``fallback`` (a bound program or
    a forward, same numbers) for the others, where every layer has its part (:meth:`Int8Linear.gemv_part`:
    fbgemm's numbers, a ReLU'd hand-over on the next layer's grid, a float output at the end) and the first
    layer takes its float input unsmoothed. ``None`` otherwise, or where the kernel is not available."""
    if "input_smoothing" in first._buffers or any(p is None for p in parts):
        return None
    if any((p[4] is None) != (i == len(parts) - 1) for i, p in enumerate(parts)):
        return None
    if isinstance(fallback, list):
        steps = fallback

        def fallback(x: torch.Tensor) -> torch.Tensor:
            for step_fn in steps:
                x = step_fn(x)
            return x

    return gemv.chain_step(first.input_scale, first.qmax_input, parts, fallback)


_MODULE_GLOBALS = torch.nn.modules.module.__dict__
_MISSING = object()
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")


def _fused(steps: list[Step]) -> bool:
    return any(s.kind == "layer" and (s.out.relu or s.grid) for s in steps)


def _out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Output length of max pooling along one dim (torch's rule, ``ceil_mode`` included)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside the input or left padding
        out -= 1
    return out


def max_pool_grid(t: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
    """``pool`` on non-negative integers (uint8 or fp32): max commutes with the quantizer, so this equals
    quantizing the float max pool.

    uint8: the elementwise maximum of the ``k * k`` strided views of the window offsets (3 vectorised passes
    for 2x2; about 3x faster here than torch's quantized max pool with its quint8 wrapping, and no
    deprecated API). Padding and ceil-mode overhang are zero padding, exact because every value is >= 0
    and every window holds at least one real element (torch's rule). Other dtypes pool in float.
    """
    k, s, p, d = (_pair(v) for v in (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding, pool.dilation))
    if t.dtype != torch.uint8 or t.dim() not in (3, 4):
        y = F.max_pool2d(t.float(), k, s, p, d, pool.ceil_mode)
        return y.to(t.dtype) if t.dtype == torch.uint8 else y
    h, w = t.shape[-2:]
    oh, ow = (_out_size(n, k[i], s[i], p[i], d[i], pool.ceil_mode) for i, n in enumerate((h, w)))
    need_h, need_w = (oh - 1) * s[0] + d[0] * (k[0] - 1) + 1, (ow - 1) * s[1] + d[1] * (k[1] - 1) + 1
    pad = (p[1], max(0, need_w - w - p[1]), p[0], max(0, need_h - h - p[0]))
    if any(pad):
        t = F.pad(t, pad)
    views = [
        t[..., a * d[0] : a * d[0] + (oh - 1) * s[0] + 1 : s[0], b * d[1] : b * d[1] + (ow - 1) * s[1] + 1 : s[1]]
        for a in range(k[0])
        for b in range(k[1])
    ]
    if len(views) == 1:  # a 1x1 window: a strided view of the input
        return views[0].clone()
    out = torch.maximum(views[0], views[1])
    for v in views[2:]:
        torch.maximum(out, v, out=out)
    return out


class Int8Sequential(nn.Sequential):
    """An ``nn.Sequential`` of converted layers whose forward hands integers from layer to layer (see the
    module docstring). Made in place by :func:`fuse_sequentials`; constructed directly it works as well.
    Modules it calls that are not torch.nn's own (user code may ``.view``), and its own output, get
    tensors in the input's memory format (for a channels-last input this can differ from the unfused
    model's layout, e.g. after a Linear over the last dimension; values are equal); torch.nn modules get
    oneDNN's channels-last tensors (their results do not depend on the layout)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._build()

    def _build(self) -> None:
        self._structure = _structure(self)
        self._leaf_list = [m for _, _, m in _leaves(self)]
        self._plan_inputs = _plan_inputs(self._leaf_list)
        self._steps = plan(self._leaf_list)
        self._lean = None  # (bound steps or None, [(layer, its cache key, the plan step, what it bound)] that keep them valid)
        self._conv = None  # (the conv chain's step or None, the same kind of list; key None: a module's geometry)
        self._guard = None  # _Guard of the bound steps

    def _stale(self) -> bool:
        return not _unchanged(self._structure) or _plan_inputs(self._leaf_list) != self._plan_inputs

    @property
    def fused_steps(self) -> list[Step]:
        """The plan the fused forward runs (one :class:`Step` per leaf)."""
        if self._stale():
            self._build()
        return self._steps

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy`` leave the bound steps behind (closures over this chain's layers)."""
        state = super().__getstate__()
        state["_lean"] = state["_guard"] = state["_conv"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_guard", None)  # pickled before the guard existed
        state.setdefault("_conv", None)  # ... or before the conv chain
        super().__setstate__(state)

    def _lean_program(self) -> list | None:
        """The program of a chain of Linear layers with only ReLUs and eval no-ops between them, each on fbgemm:
        the batch-1 MLP, where per-call bookkeeping rivals the GEMMs. Inputs of a few rows run the whole chain in
        one call of :mod:`lq.deploy.gemv` where it is built (any accumulation mode), more rows the layers' bound
        fbgemm steps (:meth:`Int8Linear.lean_step`; full range) or, without them, :meth:`_fused_forward`.
        ``None`` for any other chain. Rebuilt when a layer's kernel cache was cleared (state_dict load, device
        move), a consumer's hand-over changed (a scale or divisor buffer replaced: ``_grid_output``) or the chain
        was re-planned."""
        made = self._lean
        if made is not None and all(
            layer.sync_cache().get(key, _MISSING) is bound
            and (step.feeds is None or _grid_output(step.out, step.feeds) is key[2])
            for layer, key, step, bound in made[1]
        ):  # (the very steps bound, or the very "no" (None): another chain over the same layers may have bound new
            # ones under the key; a cleared cache is asked again)
            return made[0]
        program, keys, parts, form = [], [], [], "float"
        for step in self._steps:
            if step.kind == "skip":
                continue
            layer = step.module
            if step.kind != "layer" or type(layer) is not Int8Linear:
                self._lean = (None, [])
                return None
            out = _grid_output(step.out, step.feeds) if step.feeds is not None else step.out
            part = layer.gemv_part(out)
            keys.append((layer, ("gemv_part", "", out), step, part))
            parts.append(part)
            if program is not None:
                bound = layer.lean_step(form, out)
                keys.append((layer, ("lean_step", form, out), step, bound))
                if bound is None:  # the layer's cache keeps this answer until it is cleared: planned again then
                    program = None
                else:
                    program.append(bound[0])
                    form = bound[1]
        native = _gemv_step(keys[0][0], parts, program if program is not None else self._fused_forward)
        if native is not None:  # a few rows: the whole chain in one call of lq/deploy/gemv.c, same numbers
            program = [native]
        self._lean = (program, keys)
        return program

    def _take_guard(self, program: list) -> _Guard:
        """A :class:`_Guard` of ``program`` and of everything ``_fusable_now`` just found to hold."""
        dicts, keys, values = [], [], []

        def read(d: dict, key: object) -> None:
            dicts.append(d)
            keys.append(key)
            values.append(d.get(key))

        for key in _GLOBAL_HOOKS:
            read(_MODULE_GLOBALS, key)
        containers = [c for c, _ in self._structure]
        hooks = [_MODULE_GLOBALS[key] for key in _GLOBAL_HOOKS]
        for i, m in enumerate(containers + self._leaf_list):
            read(m.__dict__, "training")
            if i:  # the chain's own hooks run as usual (Module.__call__)
                for key in ("_forward_hooks", "_forward_pre_hooks"):
                    read(m.__dict__, key)
                    hooks.append(m.__dict__[key])
        for c, items in self._structure:
            read(c.__dict__, "_modules")
            for name, _ in items:
                read(c._modules, name)
        for leaf in self._leaf_list:
            for d, key, _ in _plan_reads(leaf):
                read(d, key)
            if isinstance(leaf, Int8Module):  # the tensors its bound step was made from, and its kernel cache
                for attr in ("_parameters", "_buffers", "_cache"):
                    read(leaf.__dict__, attr)
                for d in (leaf._parameters, leaf._buffers):
                    for key in d:
                        read(d, key)
        for layer, key, step, _ in self._lean[1]:
            read(layer._cache, key)
            if step.feeds is not None:  # (the consumer's buffers are read above: it is a leaf of the chain)
                read(step.feeds._cache, ("grid_output", step.out.upper))
        return _Guard(
            program, tuple(dicts), tuple(keys), tuple(values), tuple(c._modules for c in containers),
            tuple(len(c._modules) for c in containers), tuple(hooks), tuple(self._leaf_list),
            tuple(map(type, self._leaf_list)),
        )

    def _fusable_now(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling():  # the layers' traced forms; the compiler fuses across them
            return False
        if self.training or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        mod = torch.nn.modules.module
        if mod._global_forward_hooks or mod._global_forward_pre_hooks:
            return False
        if not _unchanged(self._structure):  # children added, removed or replaced: plan the new structure
            self._build()
        # one pass over the leaves (checked on every call; at batch 1 each Python step counts): in eval mode,
        # no hooks, and what the plan read from them unchanged (``seq[1].max_val = 0.5``: planned again)
        for leaf, seen in zip(self._leaf_list, self._plan_inputs):
            if leaf.training or leaf._forward_hooks or leaf._forward_pre_hooks:
                return False
            if _plan_input(leaf) != seen:
                self._build()  # the plain forward this once; the next call runs the new plan
                return False
        return not any(c._forward_hooks or c._forward_pre_hooks for c, _ in self._structure[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lean = (
            not torch.compiler.is_compiling()
            and type(x) is torch.Tensor
            and x.dtype is torch.float32
            and x.dim() == 2
            and x.is_cpu
            and x.numel()
            and not (x.requires_grad and torch.is_grad_enabled())
        )
        guard = self._guard
        if lean and guard is not None and guard.holds():
            program = guard.program
        else:
            if not self._fusable_now(x):
                return super().forward(x)
            if not lean:
                if x.dim() == 4 and type(x) is torch.Tensor:  # a few small images: the conv chain in one C call
                    program = self._conv_program()  # (called here, not under _fused_forward's ~10 us wrapper)
                    if program is not None:
                        return _in_layout(program(x), 4, _memory_format(x))
                return self._fused_forward(x)
            # an all-Linear chain on fbgemm (the batch-1 MLP): its bound steps, called here rather than under
            # _fused_forward's compiler.disable, whose wrapper alone costs ~10 us a call
            program = self._lean_program()
            if program is None:
                self._guard = None  # (a guard of a program that is gone would only fail on every call)
                return self._fused_forward(x)
            self._guard = self._take_guard(program)
        for step_fn in program:
            x = step_fn(x)
        return x


    def _conv_program(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The chain as one :func:`lq.deploy.gemv.conv_chain_step` (int8 Conv2d layers with ReLU and max
        pooling between them, a float output at the end), or ``None``. Kept while every layer holds the very
        part it gave (its kernel cache is cleared whenever its tensors change), every consumer the same hand-over
        and every pooling and convolution the same geometry."""
        made = self._conv
        if made is not None and all(
            (layer.sync_cache().get(key, _MISSING) is part
             and (step.feeds is None or _grid_output(step.out, step.feeds) is key[2])
             if key is not None else _geometry(layer) == part)
            for layer, key, step, part in made[1]
        ):
            return made[0]
        ops, keys, refs, first = [], [], [], None
        for step in self._steps:
            if step.kind == "skip":
                continue
            m = step.module
            if step.kind == "layer" and type(m) is Int8ConvNd:
                out = _grid_output(step.out, step.feeds) if step.feeds is not None else step.out
                part = m.conv_part(out)
                geometry = _geometry(m)
                keys.append((m, ("conv_part", geometry, out), step, part))
                keys.append((m, None, step, geometry))
                refs.append(m.run)  # (its per-layer forward: the rounding the chain must match, per input size)
                first = first or m
                ops.append(part)
            elif step.kind == "pool" and type(m) is nn.MaxPool2d and first is not None and not m.return_indices:
                keys.append((m, None, step, _geometry(m)))
                k, s, p, d = (_pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
                # torch refuses padding over half the window; the per-layer path raises that
                ops.append(("pool", k, s, p, d, bool(m.ceil_mode)) if all(pi <= ki // 2 for pi, ki in zip(p, k))
                           else None)
            else:
                ops.append(None)
        program = None
        if ops and all(op is not None for op in ops) and "input_smoothing" not in first._buffers:
            program = gemv.conv_chain_step(first.input_scale, first.qmax_input, ops, refs, self._fused_forward)
        self._conv = (program, keys)
        return program

    @torch.compiler.disable  # eager kernels only; under the compiler _fusable_now is False
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = _memory_format(x)
        h, dtype = x, x.dtype
        for step in self._steps:
            if step.kind == "layer":
                layer, out = step.module, step.out
                if step.feeds is not None:
                    out = _grid_output(out, step.feeds)
                layer.sync_cache()
                try:
                    h = layer.run(h, grid=step.grid, out=out, dtype=dtype)
                except FloatingPointError as err:
                    raise FloatingPointError(f"{layer.name}: {err}") from None
                if not out.grid:
                    dtype = h.dtype
            elif step.kind == "pool":
                h = max_pool_grid(h, step.module)
            elif step.kind == "call":
                h = step.module(h if step.any_layout else _in_layout(h, x.dim(), layout))
                if not step.on_grid and h.is_floating_point():
                    dtype = h.dtype
        return _in_layout(h, x.dim(), layout)


def _grid_output(act: Output, consumer: nn.Module) -> Output:
    """``act`` writing ``consumer``'s input grid. Kept in the consumer's kernel cache, which is cleared
    whenever its scales can change (state_dict loads, device moves)."""
    key = ("grid_output", act.upper)
    cache = consumer.sync_cache()  # (a scale or divisor replaced in any way: everything derived from it is stale)
    out = cache.get(key)
    if out is None:
        scale, divisor = consumer._buffers["input_scale"], consumer._buffers.get("input_smoothing")
        out = replace(act, inv_step=scale, step=consumer._steps()[0], qmax=consumer.qmax_input, divisor=divisor)
        cache[key] = out
    return out


def _in_layout(h: torch.Tensor, input_dim: int, layout: torch.memory_format) -> torch.Tensor:
    """``h`` in the memory format the unfused layers would have returned: the input's (same rank), else
    contiguous (oneDNN writes channels-last)."""
    if not isinstance(h, torch.Tensor):
        return h
    fmt = layout if h.dim() == input_dim else torch.contiguous_format
    return h if h.is_contiguous(memory_format=fmt) else h.contiguous(memory_format=fmt)


def fuse_sequentials(model: nn.Module) -> nn.Module:
    """Turn, in place, each plain ``nn.Sequential`` in ``model`` that holds a fusible int8 pattern into an
    :class:`Int8Sequential` (the object's class changes; outermost first: nested plain Sequentials are
    flattened into the outer plan). Sequentials inside other modules are found too. Returns ``model``."""

    def visit(module: nn.Module, covered: bool) -> None:
        if type(module) is nn.Sequential and not covered and _fused(plan([m for _, _, m in _leaves(module)])):
            module.__class__ = Int8Sequential
            module._build()
            covered = True
        for child in module._modules.values():
            if child is not None:
                # plain Sequentials inside a fused one are part of its plan; anything else is looked into
                visit(child, covered and type(child) is nn.Sequential)

    visit(model, False)
    n = sum(isinstance(m, Int8Sequential) for m in model.modules())
    if n:
        log.info("lq.convert: %d Sequential containers run as int8 chains", n)
    return model


__all__ = ["Int8Sequential", "Step", "fuse_sequentials", "max_pool_grid", "plan"]
