"""Sharded training (issue 15): Int8QAT and Int8Training under FSDP on two CPU ranks (gloo).

Lightning's FSDPStrategy (torch FSDP1) does not run on CPU (the first test pins the two errors the README
quotes), so the lq callbacks refuse it (Int8Training warns). torch's FSDP2 does run on CPU, under Lightning's
ModelParallelStrategy with ``fully_shard`` in ``configure_model``: tested like tests/test_ddp.py, against one
process that sees all the data (tests/fsdp_worker.py runs the two ranks).
"""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.nn import functional as F

import lq
from lq.callbacks import Int8PTQ, Int8QAT, Int8Sensitivity, Int8Training
from lq.nn.int8_compute import use_int8_compute
from lq.ops import Int8ComputeConfig
from test_callbacks import Plain, digits

WORKER = Path(__file__).with_name("fsdp_worker.py")


# --------------------------------------------------------------------------- FSDPStrategy (FSDP1)
def test_lightning_fsdp_strategy_does_not_run_on_cpu():
    """What the README's FSDP section quotes: Lightning refuses FSDPStrategy on CPU, and torch's FSDP1 asks
    for an accelerator when Lightning hands it no device (a subclass gets past Lightning's check by type)."""
    with pytest.raises(ValueError, match="The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=FSDPStrategy(process_group_backend="gloo"))
    from torch.distributed.fsdp import FullyShardedDataParallel

    with pytest.raises(RuntimeError, match="FSDP needs a non-CPU accelerator device, but no accelerator device is detected"):
        FullyShardedDataParallel(Plain(), device_id=None)  # what Lightning passes on CPU (root_device.index)


class _FSDPTrainer:
    """The parts of a Trainer the callbacks' setup reads, with an FSDPStrategy (no Trainer runs it on CPU)."""

    class Strategy(FSDPStrategy):
        @property
        def root_device(self):
            return torch.device("cpu")

    def __init__(self):
        self.strategy = self.Strategy()
        self.callbacks = []


@pytest.mark.parametrize("cls", [Int8PTQ, Int8QAT, Int8Sensitivity])
def test_calibrating_callbacks_refuse_fsdp1_naming_the_way_out(cls):
    with pytest.raises(ValueError, match=r"does not support Lightning's FSDPStrategy.*ModelParallelStrategy with torch's fully_shard"):
        cls().setup(_FSDPTrainer(), Plain(), "fit")


def test_int8_training_warns_under_fsdp1():
    module = Plain()
    with pytest.warns(UserWarning, match="Int8Training under Lightning's FSDPStrategy .* is untested"):
        Int8Training().setup(_FSDPTrainer(), module, "fit")
    assert set(lq.quantized_layers(module)) == {"net.0", "net.2", "net.4"}  # and it went on


def test_learned_ranges_refused_under_fsdp2_before_fully_shard():
    """fully_shard refuses scalar Parameters, and a learned amax is one: say so in setup, not in the user's
    configure_model."""
    fake = type("T", (), {"strategy": ModelParallelStrategy(), "callbacks": []})()
    cfg = lq.QuantConfig(activation=lq.QuantSpec(calibrator="max", learn_range=True))
    with pytest.raises(ValueError, match=r"fully_shard doesn't support scalar parameters.*input_quantizer\.amax"):
        Int8QAT(cfg).setup(fake, Plain(), "fit")
    Int8QAT(lq.QuantConfig(activation=lq.QuantSpec(calibrator="max"))).setup(fake, Plain(), "fit")  # fixed: fine


def test_distributed_checkpoint_directory_named_by_load_from_checkpoint(tmp_path):
    (tmp_path / "epoch=0-step=2.ckpt").mkdir()  # ModelParallelStrategy's default: a directory of shards
    with pytest.raises(ValueError, match="is a directory .*save_distributed_checkpoint=False"):
        lq.load_from_checkpoint(Plain, tmp_path / "epoch=0-step=2.ckpt")


# ------------------------------------------------------------------ ModelParallelStrategy (FSDP2)
@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """Both fits of tests/fsdp_worker.py on two CPU ranks, from one float initialisation."""
    out = tmp_path_factory.mktemp("fsdp2")
    torch.manual_seed(0)
    init = Plain().state_dict()
    torch.save(init, out / "init.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, init


def test_fsdp2_two_cpu_ranks_calibrate_like_one_process(fsdp2_run):
    from fsdp_worker import QAT_CONFIG

    out, init = fsdp2_run
    r0, r1 = torch.load(out / "qat_rank0.pt"), torch.load(out / "qat_rank1.pt")
    # the layers were lq's quantized ones, sharded by FSDP2 while calibrating
    assert r0["layers"] == {"net.0": "FSDPQuantLinear", "net.2": "FSDPQuantLinear", "net.4": "FSDPQuantLinear"}
    assert {"net.0.weight", "net.2.weight", "net.4.weight"} <= set(r0["sharded"])
    single = Plain()
    single.load_state_dict(init)
    lq.quantize(single, QAT_CONFIG)
    lq.calibrate(single, [digits("train").tensors[0]], num_samples=None)
    expected = {n: q.amax for n, q in lq.quantizers(single).items() if not q.dynamic}
    # activations (entropy: summed histograms) and weights (per-channel percentile, from the whole weight)
    assert set(r0["amax"]) == set(expected) == {f"net.{i}.{k}_quantizer" for i in (0, 2, 4) for k in ("input", "weight")}
    for name, amax in expected.items():
        torch.testing.assert_close(r0["amax"][name], r1["amax"][name], msg=name)
        torch.testing.assert_close(r0["amax"][name], amax, msg=name)
    assert r0["amax"]["net.0.weight_quantizer"].shape == (64,)  # every output channel, not this rank's half


def test_fsdp2_int8_training_step_equals_one_process_over_both_halves(fsdp2_run):
    """One step on two ranks == one process that runs each rank's batch through the int8 layers (each batch
    with its own dynamic scales) and averages the two gradients, as FSDP2's reduce-scatter does."""
    from fsdp_worker import BATCH

    out, init = fsdp2_run
    r0, r1 = torch.load(out / "training_rank0.pt"), torch.load(out / "training_rank1.pt")
    assert {"net.0.weight", "net.2.weight", "net.4.weight"} <= set(r0["sharded"])
    # three int8 layers: forward and grad_weight each, grad_input for net.2 and net.4 (net.0's input needs none)
    for r in (r0, r1):
        assert sum(n for k, n in r["kernels"].items() if k.startswith("int8_mm:")) == 3 + 3 + 2, r["kernels"]

    model = Plain()
    model.load_state_dict(init)
    lq.quantize(model, lq.QuantConfig(weight=lq.QuantSpec(enabled=False), activation=lq.QuantSpec(enabled=False),
                                      layers=["Linear", "Conv2d"]))
    use_int8_compute(model, Int8ComputeConfig.for_this_machine(grad_rounding="nearest"))
    opt = torch.optim.SGD(model.parameters(), lr=model.hparams.lr, momentum=0.9)
    x, y = digits("train").tensors
    for rank in (0, 1):  # rank r's first batch: samples r, r+2, ... (fsdp_worker.HalfPerRank)
        F.cross_entropy(model(x[rank::2][:BATCH]), y[rank::2][:BATCH]).backward()
    for p in model.parameters():
        p.grad /= 2
    opt.step()
    expected = dict(model.named_parameters())
    assert set(r0["params"]) == set(expected)
    for name, p in expected.items():
        torch.testing.assert_close(r0["params"][name], r1["params"][name], msg=name)
        torch.testing.assert_close(r0["params"][name], p.detach(), msg=name)
        assert not torch.equal(p.detach(), init[name]), name  # the step moved every parameter
