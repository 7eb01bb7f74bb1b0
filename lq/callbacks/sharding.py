"""Sharded strategies: which FSDP the lq callbacks run under, and what they do about sharded parameters.

Supported: Lightning's ``ModelParallelStrategy`` with torch's FSDP2 (``fully_shard`` applied in the module's
``configure_model``, data parallel only). It runs on CPU with gloo and is tested there with two ranks
(tests/test_fsdp.py). The callbacks swap the layers in ``setup``, before ``configure_model`` shards them, so
FSDP2 shards the quantized layers with the very Parameters of the float ones; the quantizers' amax are
buffers, which FSDP2 leaves unsharded, and calibration statistics are reduced across ranks as under DDP.
FSDP2 hooks each sharded module's own forward, so the calibration forward on the LightningModule gathers the
parameters it needs; code that reads ``layer.weight`` outside a forward (static weight calibration) sees a
local ``DTensor`` shard unless the parameters are gathered first (``unsharded``).

Learned ranges (``QuantSpec(learn_range=True)``) are scalar Parameters, which ``fully_shard`` refuses
("fully_shard doesn't support scalar parameters"): refused in ``setup`` with that explanation.

Not supported: Lightning's ``FSDPStrategy`` (torch's FSDP1 ``FullyShardedDataParallel``). Lightning refuses
it on CPU ("The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`"), and torch's
FSDP1, given no device id (Lightning passes the device index, None on CPU), looks for an accelerator ("FSDP
needs a non-CPU accelerator device, but no accelerator device is detected"), so no test of lq can run under
it here. Forced onto CPU in an experiment, FSDP1's default wrapping (the root module only) made calibration
fail: the calibration forward runs on the LightningModule, not through FSDP1's root wrapper, so the layers
still hold flat shards ("mat2 must be a matrix, got 1-D tensor"). The calibrating callbacks therefore refuse
FSDPStrategy with that explanation; ``Int8Training``, which needs no calibration forward (it trained through
the wrapper in that experiment), warns that it is untested there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

SUPPORTED = (
    "use ModelParallelStrategy with torch's fully_shard (FSDP2) in your LightningModule's configure_model "
    "(tested on CPU with 2 ranks), or strategy='ddp'"
)


def fsdp2_modules(module: nn.Module) -> list[nn.Module]:
    """The submodules of ``module`` (itself included) that torch's ``fully_shard`` (FSDP2) has sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextmanager
def unsharded(module: nn.Module) -> Iterator[None]:
    """Gather FSDP2's sharded parameters of ``module`` for the block, shard them again after.

    Outside a forward FSDP2 registers each parameter as this rank's ``DTensor`` shard; inside this block
    ``layer.weight`` is the whole tensor, so a per-channel weight calibration sees every output channel
    (calibrated on the shard it would fail with DTensor's "Replicate to Partial(product) conversion is not
    supported"). A collective: every rank must enter, as every rank calibrates. A no-op without FSDP2.
    """
    sharded = fsdp2_modules(module)
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


def check_strategy(trainer: pl.Trainer, name: str, calibrates: bool) -> None:
    """Refuse (callbacks that calibrate) or warn about (``Int8Training``) Lightning's FSDPStrategy (FSDP1)."""
    try:
        from lightning.pytorch.strategies import FSDPStrategy
    except ImportError:  # pragma: no cover - Lightning without FSDP
        return
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, FSDPStrategy):
        return
    if calibrates:
        raise ValueError(
            f"{name} does not support Lightning's FSDPStrategy (torch FSDP1): calibration runs the "
            "LightningModule's forward outside FSDP1's root wrapper, where the layers hold flat parameter shards "
            f"(FSDP1 also runs on CUDA only, so lq cannot test it on CPU). Instead {SUPPORTED}"
        )
    rank_zero_warn(
        f"{name} under Lightning's FSDPStrategy (torch FSDP1) is untested: Lightning runs it on CUDA only and "
        f"lq's tests run on CPU. For a tested sharded run {SUPPORTED}"
    )


def check_fsdp2_parameters(trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
    """Under ModelParallelStrategy, refuse what ``fully_shard`` (run later, in ``configure_model``) cannot shard:
    the scalar amax Parameters of learned ranges."""
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # pragma: no cover - Lightning without ModelParallelStrategy
        return
    if not isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy):
        return
    scalars = [n for n, p in pl_module.named_parameters() if p.dim() == 0 and n.endswith("amax")]
    if scalars:
        raise ValueError(
            f"{name}: under ModelParallelStrategy, torch's fully_shard (FSDP2) refuses scalar parameters (\"fully_shard "
            f"doesn't support scalar parameters\"), and learned ranges (QuantSpec(learn_range=True)) are scalar "
            f"Parameters: {scalars[:5]}. Use fixed calibrated ranges (learn_range=False, the paper's Section 5.2 QAT) "
            "under FSDP2, or learned ranges with strategy='ddp'"
        )
