"""Checkpoints that survive other callbacks, faults and foreign files (issue 11).

Every expectation here is captured independently of lq's checkpoint code: the module's weights, ranges and
outputs are read off the live module by a small callback at the moment a checkpoint is written (or an
exception hits), and compared with what comes back from the file.
"""

import signal

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import (
    Callback,
    ModelCheckpoint,
    ModelPruning,
    OnExceptionCheckpoint,
    StochasticWeightAveraging,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lq
from lq.callbacks import Int8PTQ, Int8QAT, Int8Training
from test_callbacks import DigitsData, Plain, ReleaseProcessGroup, digits, trainer

LAYERS = ("net.0", "net.2", "net.4")
AMAX_KEYS = {f"{layer}.{kind}_quantizer.amax" for layer in LAYERS for kind in ("input", "weight")}
# max calibration: the entropy search is the slow part of a calibration and is not what these tests are about
FAST = lq.QuantConfig(activation=lq.QuantSpec(calibrator="max"))
X = digits("val").tensors[0][:64]


def quick(root, callbacks, **kw):
    args = dict(max_epochs=3, limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0)
    args.update(kw)
    return trainer(root, callbacks, **args)


def effective_weights(module):
    """The weights the layers compute with: ``weight_orig * weight_mask`` while ModelPruning's
    reparametrization is on (its ``weight`` attribute is only refreshed at the next forward)."""
    out = {}
    for name in LAYERS:
        layer = module.get_submodule(name)
        for p in ("weight", "bias"):
            orig = getattr(layer, f"{p}_orig", None)
            w = orig * getattr(layer, f"{p}_mask") if orig is not None else getattr(layer, p)
            out[f"{name}.{p}"] = w.detach().clone()
    return out


def live_state(pl_module):
    """Effective weights, every quantizer's amax and the eval outputs on X, read off the live module."""
    weights = effective_weights(pl_module)
    amax = {n: q.amax.detach().clone() for n, q in lq.quantizers(pl_module).items()}
    was_training = pl_module.training
    pl_module.eval()
    with torch.no_grad():
        out = pl_module(X).clone()
        for name, q in lq.quantizers(pl_module).items():  # undo the forward's refresh of the dynamic
            q.amax.copy_(amax[name])  # (weight) ranges: the capture must not change what gets saved
    pl_module.train(was_training)
    return weights, amax, out


class StateAtSave(Callback):
    """The module's state whenever a checkpoint is written (the last write wins)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.weights, self.amax, self.out = live_state(pl_module)


class StateAtException(Callback):
    """The module's state at the moment an exception reaches the Trainer (before OnExceptionCheckpoint,
    which Lightning runs last as a Checkpoint callback)."""

    def on_exception(self, trainer, pl_module, exception):
        self.weights, self.amax, self.out = live_state(pl_module)
        self.step = trainer.global_step


def assert_restores(back, weights, amax, out):
    for name, w in weights.items():
        torch.testing.assert_close(back.get_parameter(name), w, msg=name)
    back_amax = {n: q.amax for n, q in lq.quantizers(back).items()}
    assert back_amax.keys() == amax.keys()
    for name, a in amax.items():
        torch.testing.assert_close(back_amax[name], a, msg=name, equal_nan=True)
    torch.testing.assert_close(back(X), out)


def lq_callback(kind):
    return {
        "ptq": lambda: Int8PTQ(FAST, num_samples=128),
        "qat": lambda: Int8QAT(FAST, num_samples=128),
        "training": lambda: Int8Training(),
    }[kind]()


def other_callback(kind):
    if kind == "pruning":  # make_pruning_permanent=True (default): rebuilds checkpoint["state_dict"]
        return ModelPruning("l1_unstructured", amount=0.2, use_global_unstructured=False, verbose=0)
    return StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)  # averages at epochs 1 and 2 of 3


# ------------------------------------------------------------------- 1. float-compatible in any order
@pytest.mark.parametrize("lq_first", [True, False], ids=["lq_first", "lq_last"])
@pytest.mark.parametrize("other", ["pruning", "swa"])
@pytest.mark.parametrize("kind", ["ptq", "qat", "training"])
def test_user_load_from_checkpoint_next_to_state_dict_rebuilding_callbacks(tmp_path, kind, other, lq_first):
    """ModelPruning rebuilds checkpoint["state_dict"] from pl_module.state_dict() in its on_save_checkpoint;
    after lq's callback (lq_first) it used to put the quantizer keys back and the user's strict
    Plain.load_from_checkpoint failed with 'Unexpected key(s) ... input_quantizer.amax'. SWA deep-copies the
    module (and its state_dict hooks) in setup."""
    pl.seed_everything(0)
    callbacks = [lq_callback(kind), other_callback(other)]
    if not lq_first:
        callbacks.reverse()
    at_save, ckpt = StateAtSave(), ModelCheckpoint(dirpath=tmp_path, save_last=True)
    m = Plain()
    quick(tmp_path, callbacks + [at_save, ckpt]).fit(m, DigitsData())
    if other == "swa":
        swa = next(c for c in callbacks if isinstance(c, StochasticWeightAveraging))
        assert swa.n_averaged.item() >= 2  # SWA really averaged weights of several epochs

    saved = torch.load(ckpt.last_model_path, weights_only=False)["state_dict"]
    assert set(saved) == set(effective_weights(m))  # float keys only, whoever wrote them last
    plain = Plain.load_from_checkpoint(ckpt.last_model_path)  # the user's class, strict
    assert not lq.quantized_layers(plain)
    for name, w in at_save.weights.items():
        torch.testing.assert_close(plain.state_dict()[name], w, msg=name)

    back = lq.load_from_checkpoint(Plain, ckpt.last_model_path)
    assert set(lq.quantized_layers(back)) == set(LAYERS)
    assert_restores(back, at_save.weights, at_save.amax, at_save.out)
    assert not torch.allclose(back(X), plain.eval()(X))  # it is the quantized (or int8) model, not the float one
    # outside the Trainer the quantized module's own state_dict holds its quantizers again
    assert AMAX_KEYS <= set(m.state_dict())


# ------------------------------------------------------------------------- 2. resume after an exception
class Boom(Exception):
    pass


class Crashing(Plain):
    """Plain that raises (``crash``: an exception type) inside training_step at global step ``crash_at``."""

    crash_at = None
    crash = Boom

    def training_step(self, batch, batch_idx):
        if self.global_step == self.crash_at:
            raise self.crash("crash inside training_step")
        return super().training_step(batch, batch_idx)


class SameBatches(DigitsData):
    """Four identical training batches per epoch. Lightning cannot resume a plain DataLoader mid-epoch (it
    replays the epoch from its first batch; a float run without lq differs by 1e-2 after such a resume), so
    with identical batches any difference after a mid-epoch resume is lq's: ranges or the QAT schedule."""

    def train_dataloader(self):
        x, y = digits("train").tensors
        return DataLoader(TensorDataset(x[:100].repeat(4, 1), y[:100].repeat(4)), batch_size=100)


def test_resume_from_exception_checkpoint_mid_qat_matches_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    start = Plain().state_dict()

    def run(root, crash_at=None, ckpt_path=None):
        pl.seed_everything(3)
        m = Crashing()
        m.load_state_dict(start)
        m.crash_at = crash_at
        callbacks = [Int8QAT(FAST, num_samples=128), OnExceptionCheckpoint(root)]
        quick(root, callbacks, limit_train_batches=4).fit(
            m, SameBatches(), ckpt_path=ckpt_path
        )
        return m

    full = run(tmp_path / "full")
    with pytest.raises(Boom):
        run(tmp_path / "cut", crash_at=6)  # epoch 1, third batch
    resumed = run(tmp_path / "cut", ckpt_path=tmp_path / "cut" / "on_exception.ckpt")
    assert full.state_dict().keys() == resumed.state_dict().keys()
    assert AMAX_KEYS <= set(full.state_dict())
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)  # weights and every quantizer's amax


# ---------------------------------------------------------------------------------------- 3. faults
def test_exception_mid_qat_leaves_checkpoint_that_restores_exactly(tmp_path):
    """(a) OnExceptionCheckpoint saves in on_exception, after lq's on_exception; ModelPruning after lq
    rebuilds the state_dict from the module right then: the hook must still be active."""
    pl.seed_everything(1)
    m = Crashing()
    m.crash_at = 3  # epoch 1, after one pruning pass at the end of epoch 0
    at_exception = StateAtException()
    prune = ModelPruning("l1_unstructured", amount=0.3, use_global_unstructured=False, verbose=0)
    callbacks = [Int8QAT(FAST, num_samples=128), prune, at_exception, OnExceptionCheckpoint(tmp_path)]
    with pytest.raises(Boom):
        quick(tmp_path, callbacks).fit(m, DigitsData())
    assert at_exception.step == 3
    path = tmp_path / "on_exception.ckpt"
    Plain.load_from_checkpoint(path)  # strict: float-compatible although pruning ran after lq
    back = lq.load_from_checkpoint(Plain, path)
    assert_restores(back, at_exception.weights, at_exception.amax, at_exception.out)
    assert (back.net[0].weight == 0).float().mean() >= 0.29  # the pruned weights, made permanent
    # once the exception has left the Trainer, the module's state_dict is complete again
    assert AMAX_KEYS <= set(m.state_dict())


def test_keyboard_interrupt_mid_qat_shuts_down_gracefully_with_exact_checkpoint(tmp_path):
    """(b) Lightning 2.x catches KeyboardInterrupt (trainer/call.py ``_call_and_handle_interrupt``): it runs
    the callbacks' on_exception (OnExceptionCheckpoint saves), tears down, ignores further SIGINTs and
    calls sys.exit(1)."""
    pl.seed_everything(2)
    m = Crashing()
    m.crash_at, m.crash = 3, KeyboardInterrupt
    at_exception = StateAtException()
    callbacks = [Int8QAT(FAST, num_samples=128), at_exception, OnExceptionCheckpoint(tmp_path)]
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:
            quick(tmp_path, callbacks).fit(m, DigitsData())
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning set SIG_IGN for its shutdown
    assert exit_info.value.code == 1
    assert isinstance(exit_info.value.__context__, KeyboardInterrupt)
    path = tmp_path / "on_exception.ckpt"
    assert not AMAX_KEYS & set(torch.load(path, weights_only=False)["state_dict"])
    back = lq.load_from_checkpoint(Plain, path)
    assert_restores(back, at_exception.weights, at_exception.amax, at_exception.out)
    assert AMAX_KEYS <= set(m.state_dict())  # the stage stays set after a KeyboardInterrupt: still complete


@pytest.fixture(scope="module")
def qat_checkpoint(tmp_path_factory):
    """An lq QAT checkpoint with net.4 kept in float."""
    root = tmp_path_factory.mktemp("qat_skip")
    pl.seed_everything(4)
    cfg = lq.QuantConfig(activation=lq.QuantSpec(calibrator="max"), skip=["net.4"])
    ckpt = ModelCheckpoint(dirpath=root, save_last=True)
    quick(root, [Int8QAT(cfg, num_samples=128), ckpt], max_epochs=1).fit(Plain(), DigitsData())
    return ckpt.last_model_path


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("float")
    pl.seed_everything(5)
    ckpt = ModelCheckpoint(dirpath=root, save_last=True)
    quick(root, [ckpt], max_epochs=1).fit(Plain(), DigitsData())
    return ckpt.last_model_path


def test_float_checkpoint_is_a_clear_error_for_lq_load_and_qat_resume(tmp_path, float_checkpoint):
    """(c) A checkpoint written without lq."""
    with pytest.raises(ValueError, match=r"(?s)no lq quantizer state.*Module\.load_from_checkpoint") as err:
        lq.load_from_checkpoint(Plain, float_checkpoint)
    assert str(float_checkpoint) in str(err.value)
    with pytest.raises(ValueError, match=r"Int8QAT: trainer\.fit\(ckpt_path=\.\.\.\) resumes.*without ckpt_path"):
        quick(tmp_path, [Int8QAT(FAST, num_samples=128)]).fit(Plain(), DigitsData(), ckpt_path=float_checkpoint)
    # testing a float checkpoint with Int8PTQ is post-training quantization of it: allowed, calibrated afresh
    m = Plain()
    quick(tmp_path, [Int8PTQ(FAST, num_samples=128)]).test(m, DigitsData(), ckpt_path=float_checkpoint, verbose=False)
    assert all(q.is_calibrated for q in lq.quantizers(m).values())
    torch.testing.assert_close(m.net[0].weight, Plain.load_from_checkpoint(float_checkpoint).net[0].weight)


def test_weights_only_checkpoints_hold_no_ranges_and_say_so(tmp_path):
    """ModelCheckpoint(save_weights_only=True) writes no callback section and calls no on_save_checkpoint: with
    a float-compatible state_dict the ranges are in no checkpoint. lq warns at setup."""
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    with pytest.warns(UserWarning, match=r"save_weights_only=True.*hold no quantizer ranges"):
        quick(tmp_path, [Int8QAT(FAST, num_samples=128), ckpt], max_epochs=1).fit(Plain(), DigitsData())
    assert not AMAX_KEYS & set(torch.load(ckpt.best_model_path, weights_only=False)["state_dict"])
    Plain.load_from_checkpoint(ckpt.best_model_path)
    with pytest.raises(ValueError, match="no lq quantizer state"):
        lq.load_from_checkpoint(Plain, ckpt.best_model_path)


def test_checkpoint_from_another_config_names_the_difference(tmp_path, qat_checkpoint):
    """(c) An lq checkpoint written with skip=["net.4"], resumed by callbacks with other configs."""
    with pytest.raises(ValueError, match=r"Int8QAT: .*skip: checkpoint \['net\.4'\], model \[\].*config="):
        quick(tmp_path, [Int8QAT(FAST, num_samples=128)]).fit(Plain(), DigitsData(), ckpt_path=qat_checkpoint)
    bits6 = lq.QuantConfig(activation=lq.QuantSpec(calibrator="max", bits=6), skip=["net.4"])
    with pytest.raises(ValueError, match=r"activation\.bits: checkpoint 8, model 6"):
        quick(tmp_path, [Int8QAT(bits6, num_samples=128)]).fit(Plain(), DigitsData(), ckpt_path=qat_checkpoint)
    # lq.load_from_checkpoint rebuilds the model with the checkpoint's own config
    back = lq.load_from_checkpoint(Plain, qat_checkpoint)
    assert set(lq.quantized_layers(back)) == {"net.0", "net.2"}


class Wide(Plain):
    def __init__(self, lr=0.5):
        super().__init__(lr)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10))


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, qat_checkpoint):
    """(c) An lq checkpoint given with another LightningModule class."""
    with pytest.raises(RuntimeError, match=r"(?s)do not fit Wide.*size mismatch for net\.0\.weight.*Pass the") as err:
        lq.load_from_checkpoint(Wide, qat_checkpoint)
    assert err.value.__cause__ is not None
    # the Trainer loads the module weights strictly before any callback sees the checkpoint: Lightning's own
    # error names the mismatching tensors
    with pytest.raises(RuntimeError, match=r"size mismatch for net\.0\.weight"):
        quick(tmp_path, [Int8QAT(FAST, num_samples=128)]).fit(Wide(), DigitsData(), ckpt_path=qat_checkpoint)


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_corrupt_checkpoint_file_names_the_path(tmp_path, qat_checkpoint, keep):
    """(d) A truncated file (an interrupted save) or an empty one."""
    data = open(qat_checkpoint, "rb").read()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="cannot read .*truncated.ckpt.*truncated or corrupt") as err:
        lq.load_from_checkpoint(Plain, bad)
    assert err.value.__cause__ is not None  # torch's own error is kept as the cause
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        lq.load_from_checkpoint(Plain, tmp_path / "missing.ckpt")
    with pytest.raises(TypeError, match="module_cls"):
        lq.load_from_checkpoint(Plain(), qat_checkpoint)


# (e) A NaN calibration batch keeps the previous calibration: tests/test_workflow.py
# test_nan_in_calibration_batch_names_the_layer_and_leaves_model_usable (lq.calibrate, which the callbacks call).


# -------------------------------------------------------------------------------------- 4. ddp_spawn
class RankZeroRecorder(Callback):
    """In the spawned workers: the warnings rank 0 emits from ``setup`` (this callback comes first, so it
    starts recording before the lq callback's setup) and rank 0's quantized outputs at the end of fit."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def setup(self, trainer, pl_module, stage):
        import warnings

        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")

    def on_fit_start(self, trainer, pl_module):
        self._catcher.__exit__(None, None, None)
        if trainer.global_rank == 0:
            (self.out_dir / "warnings.txt").write_text("\n".join(str(w.message) for w in self._records))

    def on_fit_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            _, _, out = live_state(pl_module)
            torch.save({"out": out, "weights": effective_weights(pl_module)}, self.out_dir / "rank0.pt")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_spawn_main_process_module_stays_float_with_a_warning(tmp_path):
    """Under ddp_spawn the callbacks' setup runs only in the workers; Lightning loads rank 0's weights back into
    the main process's module with strict=False, which silently drops the quantizer keys. What lq does about
    it: a warning from rank 0 naming the way out, which must work."""
    pl.seed_everything(6)
    m = Plain()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=2,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[RankZeroRecorder(tmp_path), Int8QAT(FAST, num_samples=128), ckpt, ReleaseProcessGroup()],
    )
    t.fit(m, DigitsData())  # no error
    warned = (tmp_path / "warnings.txt").read_text()
    assert "Int8QAT: strategy DDPStrategy (start method 'spawn'" in warned
    assert "stays float" in warned and "lq.load_from_checkpoint" in warned and "strategy='ddp'" in warned
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert not lq.quantized_layers(m)  # float in the main process ...
    for name, w in rank0["weights"].items():
        torch.testing.assert_close(m.state_dict()[name], w, msg=name)  # ... with rank 0's trained weights
    back = lq.load_from_checkpoint(Plain, tmp_path / "last.ckpt")  # the way out the warning names
    torch.testing.assert_close(back(X), rank0["out"])
