"""Int8PTQ / Int8QAT / Int8Sensitivity on a plain LightningModule that knows nothing of lq (issue 3)."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelPruning
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lq
from lq.callbacks import Int8PTQ, Int8QAT, Int8Sensitivity


def digits(split):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    sl = slice(0, 1400) if split == "train" else slice(1400, None)
    return TensorDataset(x[sl], y[sl])


class Plain(pl.LightningModule):
    """A user's module: nothing about quantization in it."""

    def __init__(self, lr=0.5):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)]


class ReleaseProcessGroup(Callback):
    """Destroy the gloo process group in each worker once fit is over. Lightning registers that clean-up only for
    NCCL; a spawned worker that exits with the gloo group alive can abort in gloo's threads at interpreter exit
    ("terminate called without an active exception", pytorch/pytorch#190489): on the Zen 5 host of 2026-11-30
    two runs in ten did. Runs after the strategy's own teardown; nothing after it communicates. (No barrier first: a
    rank that failed would leave the others waiting in it for gloo's 30-minute timeout.)"""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class DigitsData(pl.LightningDataModule):
    def __init__(self, batch_size=100, shuffle=True):
        super().__init__()
        self.batch_size = batch_size
        self.shuffle = shuffle

    def train_dataloader(self):
        return DataLoader(digits("train"), batch_size=self.batch_size, shuffle=self.shuffle,
                          generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return DataLoader(digits("val"), batch_size=200)

    def test_dataloader(self):
        return DataLoader(digits("val"), batch_size=200)


def trainer(tmp_path, callbacks, **kw):
    args = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, deterministic=True,
    )
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    pl.seed_everything(0)
    m = Plain()
    t = trainer(tmp_path_factory.mktemp("pre"), [], max_epochs=4, enable_checkpointing=False)
    t.fit(m, DigitsData())
    return m.state_dict()


def fresh(pretrained):
    m = Plain()
    m.load_state_dict(pretrained)
    return m


class LRRecorder(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_qat_lr_schedule_paper_appendix_a2(tmp_path, pretrained):
    rec = LRRecorder()
    qat = Int8QAT(num_samples=256)
    t = trainer(tmp_path, [qat, rec], enable_checkpointing=False)
    with pytest.warns(UserWarning, match="replaces the 1 LR scheduler"):
        t.fit(fresh(pretrained), DigitsData())
    total = 2 * math.ceil(1400 / 100)
    assert len(rec.lrs) == total
    start = 0.5 * 0.01
    final = start * 0.01
    # cosine: lr(k) = final + (start - final) (1 + cos(pi k / T)) / 2 ; the user's StepLR is gone
    assert rec.lrs[0] == pytest.approx(start)
    assert rec.lrs[total // 2] == pytest.approx(final + (start - final) * 0.5, rel=1e-6)
    assert rec.lrs[-1] == pytest.approx(final + (start - final) * 0.5 * (1 + math.cos(math.pi * (total - 1) / total)))
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(final)
    assert all(a >= b for a, b in zip(rec.lrs, rec.lrs[1:]))


def test_qat_trains_and_test_ckpt_best_is_quantized(tmp_path, pretrained):
    fp32 = trainer(tmp_path, []).validate(fresh(pretrained), DigitsData(), verbose=False)[0]["val_acc"]
    pl.seed_everything(1)
    qat = Int8QAT(num_samples=512)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc", mode="max", save_last=True)
    t = trainer(tmp_path, [qat, ckpt])
    m = fresh(pretrained)
    t.fit(m, DigitsData())
    assert set(lq.quantized_layers(m)) == {"net.0", "net.2", "net.4"}
    x = digits("val").tensors[0]
    m.eval()
    out_end = m(x).detach()
    acc_fit = t.validate(m, DigitsData(), verbose=False)[0]["val_acc"]
    # trainer.test(ckpt_path="best") with the callback: the quantized model (Lightning 1.x #12896)
    res = t.test(m, DigitsData(), ckpt_path="best", verbose=False)[0]["test_acc"]
    assert res >= 0.98 * fp32  # same split as val: QAT keeps fp32 accuracy
    assert all(q.is_calibrated for q in lq.quantizers(m).values())
    # the user's own load_from_checkpoint does not trip on quantizer keys (#6457)
    plain = Plain.load_from_checkpoint(ckpt.last_model_path)
    assert not lq.quantized_layers(plain)
    # one lq call gives the quantized model back with its ranges: same outputs as at the end of fit
    back = lq.load_from_checkpoint(Plain, ckpt.last_model_path)
    assert set(lq.quantized_layers(back)) == {"net.0", "net.2", "net.4"}
    torch.testing.assert_close(back(x), out_end)
    with lq.quantization_disabled(back):
        assert not torch.allclose(back(x), out_end)
    assert acc_fit >= 0.98 * fp32


class Interrupt(Exception):
    pass


class InterruptAtEpoch(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Interrupt


def test_resume_matches_uninterrupted_run(tmp_path, pretrained):
    def run(root, ckpt_path=None, interrupt=None):
        pl.seed_everything(3)
        m = fresh(pretrained)
        ck = ModelCheckpoint(dirpath=root, save_last=True, every_n_epochs=1)
        extra = [InterruptAtEpoch(interrupt)] if interrupt is not None else []
        t = trainer(root, [Int8QAT(num_samples=256), ck] + extra, max_epochs=3)
        # no shuffling: a fresh DataLoader generator on resume would reorder epochs (not lq's business)
        t.fit(m, DigitsData(shuffle=False), ckpt_path=ckpt_path)
        return m, ck

    full, _ = run(tmp_path / "a")
    with pytest.raises(Interrupt):
        run(tmp_path / "b", interrupt=1)  # killed after epoch 0's checkpoint
    resumed, _ = run(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert full.state_dict().keys() == resumed.state_dict().keys()
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)  # weights and every quantizer's amax


def test_forward_with_keyword_arguments(tmp_path):
    class KW(Plain):
        def forward(self, x, *, scale=1.0):
            return self.net(x) * scale

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x=x, scale=2.0), y)

    m = KW()
    t = trainer(tmp_path, [Int8QAT(num_samples=128)], max_epochs=1, enable_checkpointing=False)
    t.fit(m, DigitsData())
    assert m(x=torch.randn(2, 64), scale=3.0).shape == (2, 10)


def test_qat_with_model_pruning(tmp_path, pretrained):
    m = fresh(pretrained)
    prune = ModelPruning("l1_unstructured", amount=0.3, use_global_unstructured=False, verbose=0)
    t = trainer(tmp_path, [Int8QAT(num_samples=128), prune], max_epochs=1, enable_checkpointing=False)
    t.fit(m, DigitsData())
    assert isinstance(m.net[0], lq.nn.QuantLinear)
    assert (m.net[0].weight == 0).float().mean() >= 0.29


def test_ptq_in_one_line_with_trainer_test(tmp_path, pretrained):
    m = fresh(pretrained)
    t = trainer(tmp_path, [Int8PTQ(num_samples=512)])
    fp32 = trainer(tmp_path, []).test(fresh(pretrained), DigitsData(), verbose=False)[0]["test_acc"]
    int8 = t.test(m, DigitsData(), verbose=False)[0]["test_acc"]
    assert lq.quantized_layers(m) and all(q.is_calibrated for q in lq.quantizers(m).values())
    assert abs(int8 - fp32) / fp32 < 0.02


def test_sensitivity_ranks_layers_and_applies_partial_quantization(tmp_path, pretrained):
    m = fresh(pretrained)
    sens = Int8Sensitivity(monitor="val_acc", target=0.0, num_samples=256)
    t = trainer(tmp_path, [sens])
    t.validate(m, DigitsData(), verbose=False)
    assert sorted(sens.report.ranking()) == ["net.0", "net.2", "net.4"]
    values = list(sens.report.layers.values())
    assert values == sorted(values)
    assert sens.result.reached
    assert sens.result.metric >= sens.report.fp32
    assert lq.enabled_layers(m) == [n for n in ["net.0", "net.2", "net.4"] if n not in sens.result.skipped]
    assert (tmp_path / "lq_sensitivity.png").exists()


# ------------------------------------------------------------------------------------- bad input
def test_monitor_never_logged_lists_logged_keys(tmp_path, pretrained):
    t = trainer(tmp_path, [Int8Sensitivity(monitor="val_accuracy", num_samples=64)])
    with pytest.raises(ValueError, match=r"val_accuracy.*logged keys: \['val_acc'\]"):
        t.validate(fresh(pretrained), DigitsData(), verbose=False)


def test_no_train_dataloader_is_a_clear_error(tmp_path, pretrained):
    class NoTrain(DigitsData):
        train_dataloader = None

    dm = DigitsData()
    t = trainer(tmp_path, [Int8QAT()], max_steps=1)
    with pytest.raises(ValueError, match="calibration_data"):
        Int8QAT()._calibration_source(t, fresh(pretrained))
    del dm, NoTrain


def test_constructor_validation():
    with pytest.raises(ValueError, match="lr_scale"):
        Int8QAT(lr_scale=0)
    with pytest.raises(ValueError, match="compute"):
        Int8QAT(compute="int4")
    with pytest.raises(ValueError, match="num_samples"):
        Int8PTQ(num_samples=0)
    with pytest.raises(ValueError, match="method"):
        Int8PTQ(method="kl")
    with pytest.raises(ValueError, match="target"):
        Int8Sensitivity(target=2)


def test_nothing_to_quantize(tmp_path):
    class NoLayers(Plain):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Identity())
            self.w = nn.Parameter(torch.zeros(64, 10))

        def forward(self, x):
            return self.net(x) @ self.w

    with pytest.raises(ValueError, match="nothing to quantize"):
        trainer(tmp_path, [Int8QAT()], max_steps=1).fit(NoLayers(), DigitsData())


def test_optimizer_without_lr(tmp_path, pretrained):
    class NoLR(Plain):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            for g in opt.param_groups:
                del g["lr"]
            return opt

    m = NoLR()
    m.load_state_dict(pretrained)
    with pytest.raises(ValueError, match="no 'lr'"):
        trainer(tmp_path, [Int8QAT(num_samples=64)], max_steps=1).fit(m, DigitsData())


def test_qat_learned_ranges_get_own_group_without_weight_decay(tmp_path, pretrained):
    class WD(Plain):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)

    m = WD()
    m.load_state_dict(pretrained)
    cfg = lq.QuantConfig(activation=lq.QuantSpec(calibrator="max", learn_range=True))
    t = trainer(tmp_path, [Int8QAT(cfg, num_samples=256, range_lr=0.01)], max_epochs=1, enable_checkpointing=False)
    t.fit(m, DigitsData())
    groups = t.optimizers[0].param_groups
    ranges = [q.amax for q in lq.quantizers(m).values() if isinstance(q.amax, nn.Parameter)]
    assert len(ranges) == 3
    range_group = [g for g in groups if g.get("lq_range")]
    assert len(range_group) == 1 and range_group[0]["weight_decay"] == 0.0
    assert {id(p) for p in range_group[0]["params"]} == {id(p) for p in ranges}
    assert all(id(p) not in {id(r) for r in ranges} for g in groups if not g.get("lq_range") for p in g["params"])
    # the ranges were trained: max calibration of digits' first input gives exactly 1.0
    assert m.net[0].input_quantizer.amax.item() != 1.0


def test_auto_calibration_picks_best_on_validation_metric(tmp_path, pretrained):
    m = fresh(pretrained)
    cfg = lq.QuantConfig(activation=lq.QuantSpec(calibrator="auto"))
    t = trainer(tmp_path, [Int8QAT(cfg, num_samples=256)], max_steps=1, enable_checkpointing=False)
    t.fit(m, DigitsData())
    choice = m._lq_calibration
    assert len(choice.scores) == 7 and choice.scores[choice.best] == max(choice.scores.values())


def test_export_onnx_and_converted_model_at_fit_end(tmp_path, pretrained):
    import onnxruntime as ort

    m = fresh(pretrained)
    onnx_path, conv_path = tmp_path / "m.onnx", tmp_path / "m_int8.pt"
    cb = Int8QAT(num_samples=256, export_onnx=str(onnx_path), export_converted=str(conv_path))
    trainer(tmp_path, [cb], max_steps=2, enable_checkpointing=False).fit(m, DigitsData())
    x = digits("val").tensors[0][:8]
    m.eval()
    ref = m(x).detach()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(out - ref.numpy()).max() < 0.05 * abs(ref.numpy()).max()
    converted = torch.load(conv_path, weights_only=False)
    torch.testing.assert_close(converted(x), ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    assert isinstance(m.net[0], lq.nn.QuantLinear) and m.net[0].weight.requires_grad  # the module stays trainable


def test_export_onnx_in_onnxruntime_form_at_fit_end(tmp_path, pretrained):
    import onnx

    m = fresh(pretrained)
    onnx_path = tmp_path / "m_ort.onnx"
    with pytest.raises(ValueError, match="onnx_runtime"):
        Int8PTQ(onnx_runtime="tvm")
    cb = Int8PTQ(num_samples=256, export_onnx=str(onnx_path), onnx_runtime="onnxruntime")
    trainer(tmp_path, [cb], max_steps=1, enable_checkpointing=False).fit(m, DigitsData())
    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    q_zero_points = [inits.get(n.input[2]) for n in graph.node if n.op_type == "QuantizeLinear"]
    # the onnxruntime form: every activation QuantizeLinear is uint8 (the TensorRT form's are int8)
    assert q_zero_points and set(q_zero_points) == {onnx.TensorProto.UINT8}


class _FakeLibc:
    """Stands in for glibc in lq.cpu_memory: records mallopt calls, never touches the real allocator."""

    def __init__(self, ok=1):
        self.calls, self.ok = [], ok

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.ok


# <malloc.h>: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3, M_MMAP_MAX -4; glibc's documented defaults 128 KiB each
# and 65536 mmapped blocks (mallopt(3))
KEEP = [(-3, 32 * 2**20), (-1, 2**30), (-4, 0)]
GLIBC_DEFAULTS = [(-3, 128 * 1024), (-1, 128 * 1024), (-4, 65536)]


class _Device:
    def __init__(self, kind):
        self.strategy = type("S", (), {"root_device": torch.device(kind)})()


@pytest.fixture
def fake_libc(monkeypatch):
    from lq import cpu_memory

    libc = _FakeLibc()
    monkeypatch.setattr(cpu_memory, "_libc", lambda: libc)
    monkeypatch.setattr(cpu_memory, "_holders", 0)
    monkeypatch.delenv("LQ_CPU_MALLOC", raising=False)
    return libc


def test_cpu_malloc_is_opt_in_and_restored_at_teardown(tmp_path, pretrained, fake_libc):
    """lq.cpu_memory: process-wide, so a callback leaves malloc alone unless given cpu_malloc=True; then the
    setting is in effect during the run and glibc's defaults are back after teardown."""
    from lq import cpu_memory

    kw = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=False)
    trainer(tmp_path, [Int8QAT(num_samples=64)], **kw).fit(fresh(pretrained), DigitsData())
    assert fake_libc.calls == []  # the default: nothing process-wide changes

    during = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            during.append((list(fake_libc.calls), cpu_memory.holders()))

    t = trainer(tmp_path, [Int8QAT(num_samples=64, cpu_malloc=True), Probe()], **kw)
    t.fit(fresh(pretrained), DigitsData())
    assert during == [(KEEP, 1)] * 2  # applied once, before the first step, held through the run
    assert fake_libc.calls == KEEP + GLIBC_DEFAULTS and cpu_memory.holders() == 0


def test_cpu_malloc_released_when_the_run_raises(tmp_path, pretrained, fake_libc):
    """Lightning runs no teardown hook when fit raises: on_exception gives the setting back."""
    from lq import cpu_memory

    t = trainer(tmp_path, [Int8QAT(num_samples=64, cpu_malloc=True), InterruptAtEpoch(0)], max_epochs=1,
                enable_checkpointing=False)
    with pytest.raises(Interrupt):
        t.fit(fresh(pretrained), DigitsData())
    assert fake_libc.calls == KEEP + GLIBC_DEFAULTS and cpu_memory.holders() == 0


def test_cpu_malloc_counted_across_callbacks_env_opt_out_and_devices(monkeypatch, fake_libc):
    """Several callbacks/trainers: applied with the first holder, restored only when the last lets go (one
    trainer's teardown does not undo another's); a callback set up for several stages holds once;
    LQ_CPU_MALLOC=0 wins over cpu_malloc=True; nothing happens off CPU."""
    from lq import cpu_memory
    from lq.callbacks import Int8Training

    a, b = Int8QAT(cpu_malloc=True), Int8Training(cpu_malloc=True)
    cpu, ma, mb = _Device("cpu"), Plain(), Plain()
    a.setup(cpu, ma, "fit")
    a.setup(cpu, ma, "validate")  # a second stage of the same callback: still one holder
    b.setup(cpu, mb, "fit")
    assert fake_libc.calls == KEEP and cpu_memory.holders() == 2
    b.teardown(cpu, mb, "fit")
    assert fake_libc.calls == KEEP and cpu_memory.holders() == 1  # a's run still has it
    a.on_exception(cpu, ma, RuntimeError())
    a.teardown(cpu, ma, "fit")  # after on_exception: harmless
    assert fake_libc.calls == KEEP + GLIBC_DEFAULTS and cpu_memory.holders() == 0

    fake_libc.calls.clear()
    Int8PTQ(cpu_malloc=True).setup(_Device("cuda"), Plain(), "fit")
    Int8PTQ().setup(cpu, Plain(), "fit")
    monkeypatch.setenv("LQ_CPU_MALLOC", "0")
    c = Int8Sensitivity(cpu_malloc=True)
    c.setup(cpu, Plain(), "validate")
    c.teardown(cpu, Plain(), "validate")
    assert fake_libc.calls == [] and cpu_memory.holders() == 0
    with pytest.raises(RuntimeError, match="keep_freed_cpu_memory"):
        cpu_memory.release_freed_cpu_memory()


def test_cpu_malloc_refused_by_mallopt_restores_defaults(monkeypatch):
    from lq import cpu_memory

    libc = _FakeLibc(ok=0)
    monkeypatch.setattr(cpu_memory, "_libc", lambda: libc)
    monkeypatch.setattr(cpu_memory, "_holders", 0)
    monkeypatch.delenv("LQ_CPU_MALLOC", raising=False)
    assert cpu_memory.keep_freed_cpu_memory() is False and cpu_memory.holders() == 0
    assert libc.calls == KEEP[:1] + GLIBC_DEFAULTS[:1]  # the first refusal stops; defaults are put back


@pytest.mark.parametrize("cls", [Int8PTQ, Int8QAT, Int8Sensitivity, "Int8Training"])
def test_cpu_malloc_argument_validated_and_passed_through(cls):
    if cls == "Int8Training":
        from lq.callbacks import Int8Training as cls
    assert cls().cpu_malloc is False and cls(cpu_malloc=True).cpu_malloc is True
    with pytest.raises(TypeError, match="cpu_malloc"):
        cls(cpu_malloc="yes")
