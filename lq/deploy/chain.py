"""Int8 chains: consecutive converted layers hand over integers instead of floats (``lq.convert(fuse=True)``).

A converted layer takes floats, quantizes them (eq. 7) and returns floats (eq. 10). Between two int8 layers
that only ReLU, max pooling, flatten, identity (a folded BatchNorm) or eval-mode dropout separate, that float
round trip is wasted work: those ops commute with the next layer's quantizer ``Q(v) = clip(round(s v), -q, q)``,
because ``Q`` is monotone non-decreasing with ``Q(0) = 0``::

    Q(relu(y)) = clip(round(s y), 0, q),   Q(max_i y_i) = max_i Q(y_i),   Q(flatten(y)) = flatten(Q(y)).

So the first layer's kernel emits the next layer's input integers directly (oneDNN: ReLU, clip and
requantization in the convolution's output stage, uint8 out), max pooling runs on uint8 (4x less memory
than fp32 and a vectorised kernel), and the next layer skips its quantization and its sign test (its
integers are known non-negative). A ReLU after a layer whose output stays float is fused into its kernel.
The integers are those of the unfused model except where ``s y`` sits within float rounding of a
half-integer: the unfused model and the fake-quant model compute ``y`` in different summation orders too.

Only ``nn.Sequential`` containers are fused: their data flow is the order of their children (nested
Sequentials flattened). ``fuse_sequentials`` replaces each Sequential that holds a fusible pattern by an
:class:`Int8Sequential`: a Sequential subclass with the same children under the same names (same
``state_dict``, indexing, iteration). It runs the plain Sequential forward whenever the fused one would
not be equivalent: in train mode or for inputs that require grad (the int8 layers then raise their
inference-only error), when a module on the path has hooks, or when a child has been replaced.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from lq.deploy.int8_layers import Int8ConvNd, Int8Linear, _memory_format
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


def _takes_grid(m: nn.Module) -> bool:
    """An int8 layer that can start from integers: its input padding is plain zero padding."""
    return isinstance(m, Int8Linear) or (isinstance(m, Int8ConvNd) and m._pre_pad is None)


def _between(m: nn.Module) -> str | None:
    """How a module between two int8 layers commutes with the quantizer: "relu", "skip", "pool", "call"
    (Flatten), or None (it does not: the chain ends)."""
    if type(m) is nn.ReLU:
        return "relu"
    if isinstance(m, _PASS):
        return "skip"
    if type(m) is nn.MaxPool2d and not m.return_indices:
        return "pool"
    if type(m) is nn.Flatten:
        return "call"
    return None


def plan(modules: list[nn.Module]) -> list[Step]:
    """The fused forward of a chain of leaf modules (see the module docstring)."""
    steps: list[Step] = []
    grid_in: set[int] = set()
    i, n = 0, len(modules)
    while i < n:
        m = modules[i]
        if not isinstance(m, _LAYERS):
            steps.append(Step("call", m))
            i += 1
            continue
        j, kinds = i + 1, []
        while j < n and _between(modules[j]) is not None:
            kinds.append(_between(modules[j]))
            j += 1
        consumer = modules[j] if j < n and _takes_grid(modules[j]) else None
        grid = id(m) in grid_in
        if "relu" in kinds and consumer is not None:
            # m writes the consumer's input integers; everything up to the consumer runs on them
            steps.append(Step("layer", m, grid, Output(relu=True), feeds=consumer))
            for k, b in zip(kinds, modules[i + 1 : j]):
                steps.append(Step("skip" if k == "relu" else k, b))
            grid_in.add(id(consumer))
            i = j
            continue
        # no hand-over: fuse a ReLU that follows (through eval no-ops) into m's float output
        k = i + 1
        while k < n and _between(modules[k]) == "skip":
            k += 1
        if k < n and type(modules[k]) is nn.ReLU:
            steps.append(Step("layer", m, grid, Output(relu=True)))
            steps.extend(Step("skip", b) for b in modules[i + 1 : k + 1])
            i = k + 1
        else:
            steps.append(Step("layer", m, grid))
            i += 1
    return steps


def _fused(steps: list[Step]) -> bool:
    return any(s.kind == "layer" and (s.out.relu or s.grid) for s in steps)


@functools.cache
def _quantized_max_pool() -> bool:
    """Whether torch's uint8 max pooling (``quantized::max_pool2d``, on a quint8 view) is available."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch._make_per_tensor_quantized_tensor(torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4), 1.0, 0)
            y = torch.ops.quantized.max_pool2d(q, [2, 2], [2, 2], [0, 0], [1, 1], False).int_repr()
        return y.flatten().tolist() == [5, 7, 13, 15]
    except Exception:  # noqa: BLE001 - a missing or changed op means "pool in float"
        return False


def max_pool_grid(t: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
    """``pool`` on integers (uint8 or fp32): max commutes with the quantizer, so this equals quantizing the
    float max pool. uint8 runs torch's quantized kernel (channels-last, vectorised); the rest pools in float."""
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    args = ([*_pair(pool.kernel_size)], [*_pair(stride)], [*_pair(pool.padding)], [*_pair(pool.dilation)], pool.ceil_mode)
    if t.dtype == torch.uint8 and t.device.type == "cpu" and t.dim() in (3, 4) and _quantized_max_pool():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated; this one lives for one call
            q = torch._make_per_tensor_quantized_tensor(t, 1.0, 0)
            return torch.ops.quantized.max_pool2d(q, *args).int_repr()
    y = F.max_pool2d(t.float(), *args)
    return y.to(t.dtype) if t.dtype == torch.uint8 else y


class Int8Sequential(nn.Sequential):
    """An ``nn.Sequential`` of converted layers whose forward hands integers from layer to layer (see the
    module docstring). Same children, names and ``state_dict`` as the Sequential it replaces; the output
    keeps the input's memory format, as the unfused layers do."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._build()

    def _build(self) -> None:
        self._leaf_refs = _leaves(self)
        self._containers = _containers(self)
        self._steps = plan([m for _, _, m in self._leaf_refs])

    @property
    def fused_steps(self) -> list[Step]:
        """The plan the fused forward runs (one :class:`Step` per leaf)."""
        return self._steps

    def _fusable_now(self, x: torch.Tensor) -> bool:
        if self.training or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        mod = torch.nn.modules.module
        if mod._global_forward_hooks or mod._global_forward_pre_hooks:
            return False
        changed = False
        for parent, name, leaf in self._leaf_refs:
            if parent._modules.get(name) is not leaf:
                changed = True
                break
            if leaf.training or leaf._forward_hooks or leaf._forward_pre_hooks:
                return False
        if changed:  # a child was replaced: plan the new structure (a stale plan would run removed modules)
            self._build()
            return self._fusable_now(x)
        return not any(c._forward_hooks or c._forward_pre_hooks for c in self._containers[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable_now(x):
            return super().forward(x)
        layout = _memory_format(x)
        h, dtype = x, x.dtype
        for step in self._steps:
            if step.kind == "layer":
                out = step.out
                if step.feeds is not None:
                    nxt = step.feeds
                    out = Output(relu=True, inv_step=nxt.input_scale, step=nxt._steps()[0], qmax=nxt.qmax_input)
                h = step.module.run(h, grid=step.grid, out=out, dtype=dtype)
                if not out.grid:
                    dtype = h.dtype
            elif step.kind == "pool":
                h = max_pool_grid(h, step.module)
            elif step.kind == "call":
                h = step.module(h)
                if h.is_floating_point():
                    dtype = h.dtype
        if isinstance(h, torch.Tensor) and h.dim() in (4, 5) and not h.is_contiguous(memory_format=layout):
            h = h.contiguous(memory_format=layout)
        return h


def fuse_sequentials(model: nn.Module) -> nn.Module:
    """Replace, in place, each plain ``nn.Sequential`` in ``model`` that holds a fusible int8 pattern (and
    has no hooks of its own) by an :class:`Int8Sequential`; outermost first. Returns ``model``, or the new
    Int8Sequential when ``model`` itself is one such Sequential."""

    def visit(module: nn.Module) -> nn.Module:
        if type(module) is nn.Sequential and not (module._forward_hooks or module._forward_pre_hooks):
            steps = plan([m for _, _, m in _leaves(module)])
            if _fused(steps):
                new = Int8Sequential(OrderedDict((k, v) for k, v in module._modules.items() if v is not None))
                new.train(module.training)
                return new
        for name, child in list(module._modules.items()):
            if child is not None:
                new_child = visit(child)
                if new_child is not child:
                    setattr(module, name, new_child)
        return module

    result = visit(model)
    n = sum(isinstance(m, Int8Sequential) for m in result.modules())
    if n:
        log.info("lq.convert: %d Sequential containers run as int8 chains", n)
    return result


__all__ = ["Int8Sequential", "Step", "fuse_sequentials", "max_pool_grid", "plan"]
