"""Activations saved for backward as int8 under Int8Training (lq.ops.saved_int8): the saved bytes of a ResNet
with BN and identity shortcuts, the sharing with the int8 conv's own input, and the backward's accuracy."""

from __future__ import annotations

import copy
from dataclasses import replace

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

import lq
from lq.models import SmallResNet
from lq.nn.int8_compute import use_int8_compute
from lq.ops import Int8ComputeConfig
from lq.ops import saved_int8
from lq.ops.saved_int8 import int8_saved_activations
from lq.quant.functional import qmax

CONFIG = replace(Int8ComputeConfig.for_this_machine(), grad_rounding="nearest")


def _int8_resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = SmallResNet().train()  # BN, identity shortcuts (x + shortcut), stride-2 stages
    lq.quantize(model, lq.QuantConfig(weight=lq.QuantSpec(enabled=False), activation=lq.QuantSpec(enabled=False),
                                      layers=["Linear", "Conv2d"]))
    use_int8_compute(model, CONFIG)
    return model


def _stored(obj) -> list[torch.Tensor]:
    return [obj.q, obj.step] if hasattr(obj, "q") else [obj]


def _saved_bytes(model, x, saved_int8_on: bool) -> tuple[int, dict]:
    """Bytes autograd keeps for backward (each storage once; parameters excluded), as
    torch.autograd.graph.saved_tensors_hooks sees them."""
    params = {p.data_ptr() for p in model.parameters()}
    kept: dict = {}

    def count(obj):
        for t in _stored(obj):
            if isinstance(t, torch.Tensor) and t.data_ptr() not in params:
                kept[(t.data_ptr(), t.dtype)] = t.numel() * t.element_size()

    if saved_int8_on:
        with int8_saved_activations(qmax(CONFIG.act_bits), on_pack=count):
            y = model(x)
    else:
        def pack(t):
            count(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
    y.sum().backward()
    return sum(kept.values()), kept


def test_saved_bytes_of_a_resnet_with_bn_and_shortcuts_are_at_most_035x_fp32():
    x = torch.randn(16, 1, 28, 28)
    torch.manual_seed(0)
    fp32 = SmallResNet().train()
    fp32_bytes, _ = _saved_bytes(fp32, x, False)
    model = _int8_resnet()
    plain, _ = _saved_bytes(model, x, False)
    compact, kept = _saved_bytes(model, x, True)
    assert plain > fp32_bytes  # without it the int8 step keeps its int8 inputs on top of BN's/ReLU's fp32 tensors
    assert compact <= 0.35 * fp32_bytes, (compact / fp32_bytes)
    big = [k for k, n in kept.items() if n >= saved_int8.MIN_NUMEL]
    assert all(dtype == torch.int8 for _, dtype in big)  # every activation-sized tensor kept is int8


def test_relu_output_and_the_next_int8_conv_share_one_int8_tensor():
    model = _int8_resnet()
    x = torch.randn(8, 1, 28, 28)
    packed = []
    with int8_saved_activations(qmax(CONFIG.act_bits), on_pack=packed.append):
        model(x).sum().backward()
    relu_out = [p.q.data_ptr() for p in packed if hasattr(p, "q") and p.axis is None]
    int8_inputs = [t.data_ptr() for t in packed if isinstance(t, torch.Tensor) and t.dtype == torch.int8]
    shared = set(relu_out) & set(int8_inputs)
    assert len(shared) >= 4  # each conv after a ReLU reuses the ReLU output's int8 form (no second copy)


def test_forward_unchanged_and_gradients_close_to_float_saved():
    model = _int8_resnet()
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))

    def grads(on: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        if on:
            with int8_saved_activations(qmax(CONFIG.act_bits)):
                out = model(x)
        else:
            out = model(x)
        F.cross_entropy(out, y).backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    out_a, g_a = grads(False)
    out_b, g_b = grads(True)
    assert torch.equal(out_a, out_b)  # the forward computes with the same values
    assert float(F.cosine_similarity(g_a, g_b, dim=0)) > 0.97
    assert saved_int8._active == []


def test_int8_training_callback_saves_int8_and_cleans_up():
    from lq.callbacks import Int8Training

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = SmallResNet(widths=(8, 16))

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))
    seen = []
    original = saved_int8._Session.pack

    def spy(self, t):
        out = original(self, t)
        seen.append(out)
        return out

    saved_int8._Session.pack = spy
    try:
        trainer = pl.Trainer(max_steps=2, callbacks=[Int8Training(compute=CONFIG, int8_saved=True)], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=16))
    finally:
        saved_int8._Session.pack = original
    assert any(hasattr(p, "q") for p in seen)  # the steps' activations were packed as int8
    assert saved_int8._active == []  # no session left open after fit
    x = torch.relu(torch.randn(5000, requires_grad=True) * 1.0)  # a packable producer (ReLU), non-leaf
    assert torch.equal((x * x).grad_fn._saved_self, x)  # autograd outside fit saves float tensors again


def test_only_the_int8_dataflow_is_packed_float_layers_and_the_loss_stay_exact():
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten())
    head = torch.nn.Linear(8 * 28 * 28, 1000)  # a float layer (skipped), a 1000-class loss
    model = torch.nn.Sequential(body, head).train()
    lq.quantize(model, lq.QuantConfig(weight=lq.QuantSpec(enabled=False), activation=lq.QuantSpec(enabled=False),
                                      layers=["Conv2d"]))
    use_int8_compute(model, CONFIG)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 1000, (16,))

    def grads(on: bool):
        model.zero_grad()
        if on:
            with int8_saved_activations(qmax(CONFIG.act_bits)):
                logits = model(x)
                p = torch.softmax(logits, 1)
                loss = F.cross_entropy(logits, y) - (p * torch.log(p)).sum(1).mean()  # entropy term: log of softmax
        else:
            logits = model(x)
            p = torch.softmax(logits, 1)
            loss = F.cross_entropy(logits, y) - (p * torch.log(p)).sum(1).mean()
        loss.backward()
        return head.weight.grad.clone(), body[0].weight.grad.clone()

    head_a, conv_a = grads(False)
    head_b, conv_b = grads(True)
    assert torch.equal(head_a, head_b)  # the float head's weight gradient: its input and the loss kept exact
    assert torch.isfinite(conv_b).all()
    assert float(F.cosine_similarity(conv_a.flatten(), conv_b.flatten(), dim=0)) > 0.97
    # outside the block no module hook is left behind
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_int8_training_refuses_a_non_bool_switch():
    import pytest

    from lq.callbacks import Int8Training

    for bad in ("maybe", 1, None):
        with pytest.raises(TypeError, match="int8_saved"):
            Int8Training(int8_saved=bad)
    with pytest.raises(TypeError, match="deviation_lr_scaling"):
        Int8Training(deviation_lr_scaling="yes")


def test_a_shared_nchw_activation_is_saved_once() -> None:
    """A ReLU's int8 form shared with the next int8 conv is kept once for backward whatever the layout: the conv does
    not keep a channels-last copy of a row-major shared tensor beside it (review finding: the conv's layout change made
    an NCHW activation's saved bytes 1.9x those of a channels-last one)."""
    from lq.ops import int8_conv2d

    saved = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        storages = {}

        def on_pack(p, storages=storages):
            t = getattr(p, "q", p)
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= 4096:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

        torch.manual_seed(0)
        x = torch.randn(4, 32, 16, 16).contiguous(memory_format=fmt).requires_grad_()
        w = torch.randn(32, 32, 3, 3, requires_grad=True)
        with int8_saved_activations(127, on_pack):
            h = F.relu(x * 1.0)
            int8_conv2d(h, w, None, 1, 1, config=Int8ComputeConfig()).sum().backward()
        saved[fmt] = sum(storages.values())
    assert saved[torch.contiguous_format] == saved[torch.channels_last] < 1.5 * 4 * 32 * 16 * 16, saved  # (+ weight)
