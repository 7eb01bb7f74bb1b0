"""Progress bars with ETA on the long loops (issue 15): the sensitivity sweep and partial quantization
(``Int8Sensitivity`` / ``lq.sensitivity``), calibrator "auto" (``lq.calibrate`` / ``choose_calibration``);
shown when the Trainer shows progress bars (or ``progress=True``), never when they are off. And the nested
evaluation runs print none of Lightning's banners ("GPU available: ...") once per layer."""

from __future__ import annotations

import logging
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lq
from lq.callbacks import Int8Sensitivity
from lq.callbacks.evaluation import BANNER_LOGGERS

LAYERS = ["net.0", "net.2", "net.4"]
ETA = re.compile(r"\[\d\d:\d\d<\d\d:\d\d")  # tqdm's "[elapsed<remaining": an ETA was computed


def data(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return TensorDataset(x, (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long())


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(data(), batch_size=64)

    def val_dataloader(self):
        return DataLoader(data(128, seed=1), batch_size=64)


def run_sensitivity(tmp_path, progress_bar: bool, calibrator: str = "entropy") -> Int8Sensitivity:
    torch.manual_seed(0)
    cfg = lq.QuantConfig(activation=lq.QuantSpec(calibrator=calibrator))
    sens = Int8Sensitivity(monitor="val_acc", target=0.0, config=cfg, num_samples=128)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress_bar, default_root_dir=tmp_path, callbacks=[sens],
    )
    trainer.validate(Tiny(), verbose=False)
    return sens


def test_int8_sensitivity_and_auto_calibration_show_bars_with_eta_when_the_trainer_shows_progress(tmp_path, capsys):
    sens = run_sensitivity(tmp_path, progress_bar=True, calibrator="auto")
    err = capsys.readouterr().err
    assert sorted(sens.report.ranking()) == LAYERS
    assert "lq: sensitivity" in err and "lq: partial quantization" in err and "lq: calibrator auto" in err
    sweep = err[err.index("lq: sensitivity"):]
    # the sweep's bar: 2 reference evaluations + one per layer, each layer named as it is measured
    assert "/5 [" in sweep and all(f", {name}]" in sweep for name in LAYERS), sweep[:2000]
    auto = err[err.index("lq: calibrator auto"):]
    assert "/7 [" in auto and "percentile_99.99]" in auto and "mse]" in auto
    assert ETA.search(sweep) and ETA.search(auto)


def test_no_bars_when_the_user_disabled_progress_bars(tmp_path, capsys):
    sens = run_sensitivity(tmp_path, progress_bar=False, calibrator="auto")
    out = capsys.readouterr()
    assert sens.report is not None and sens.result is not None
    for text in ("lq: sensitivity", "lq: partial quantization", "lq: calibrator auto", "eval/s", "it/s"):
        assert text not in out.err and text not in out.out


def quantized_tiny() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = Tiny().net
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="entropy")))
    x = data().tensors[0]
    lq.calibrate(model, [x[i : i + 64] for i in range(0, 256, 64)], num_samples=256)
    with torch.no_grad(), lq.quantization_disabled(model):
        ref = model(x)

    def evaluate(m: nn.Module) -> float:  # minus the error against the fp32 outputs: 0 only without int8
        with torch.no_grad():
            return -F.mse_loss(m(x), ref).item()

    return model, evaluate


def test_functions_take_progress_true_false_or_terminal_only(capsys):
    model, evaluate = quantized_tiny()
    names = ["0", "2", "4"]
    lq.sensitivity(model, evaluate, progress=True)
    err = capsys.readouterr().err
    assert "lq: sensitivity" in err and all(f", {n}]" in err for n in names) and ETA.search(err)
    result = lq.partial_quantize(model, evaluate, target=0.0, progress=True)
    err = capsys.readouterr().err
    assert "lq: sensitivity" in err and "lq: partial quantization" in err
    assert f"+{result.report.ranking()[0]} in float" in err  # the layer just kept in float names the step
    lq.set_quantization(model, True)  # partial quantization left the skipped layers in float
    lq.choose_calibration(model, evaluate, progress=True)
    err = capsys.readouterr().err
    assert "lq: calibrator auto" in err and "entropy]" in err
    for show in (False, None):  # None: only on a terminal, and pytest's captured stderr is none
        lq.sensitivity(model, evaluate, progress=show)
        lq.partial_quantize(model, evaluate, progress=show)
        lq.calibrate(model, [data().tensors[0]], num_samples=64, method="auto", evaluate=evaluate, progress=show)
        assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        lq.partial_quantize(model, evaluate, progress="yes")


def test_sensitivity_still_takes_a_wrapper_and_drives_it_lazily():
    model, evaluate = quantized_tiny()
    seen: list[tuple[str, float]] = []

    def wrapper(names):
        for name in names:
            seen.append((name, evaluate(model)))  # the model as the loop leaves it before measuring `name`
            yield name

    report = lq.sensitivity(model, evaluate, progress=wrapper)
    assert [n for n, _ in seen] == ["0", "2", "4"] and sorted(report.layers) == ["0", "2", "4"]


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_nested_evaluation_runs_print_no_trainer_banners(tmp_path):
    """One "GPU available" line: the user's own Trainer's. The sweep runs 1 probe + 5 + up to 3 nested
    validations; before, each printed the device banner and the logger tip."""
    loggers = [logging.getLogger(name) for name in BANNER_LOGGERS]
    levels = [lg.level for lg in loggers]
    handler = Collect()
    for lg in loggers:
        lg.setLevel(logging.INFO)  # as Lightning leaves them (a recipe's setup may have raised them)
        lg.addHandler(handler)
    try:
        sens = run_sensitivity(tmp_path, progress_bar=False)
        assert [lg.level for lg in loggers] == [logging.INFO] * len(loggers)  # put back after each nested run
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    assert sens.report is not None
    gpu = [m for m in handler.messages if m.startswith("GPU available")]
    tpu = [m for m in handler.messages if m.startswith("TPU available")]
    assert len(gpu) == 1 and len(tpu) == 1, handler.messages  # the outer Trainer's, and nothing from the sweep
    assert sum("litlogger" in m for m in handler.messages) <= 1
    # lq's own summary still reaches the same logger (only the nested runs are quiet)
    assert any(m.startswith("Int8Sensitivity (val_acc)") for m in handler.messages)
