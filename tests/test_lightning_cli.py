"""The lq callbacks driven from a LightningCLI YAML (issue 15): typed arguments, built by jsonargparse.

``trainer.callbacks`` entries name the callbacks by class_path; nested mappings become the dataclasses the
signatures name (``Int8ComputeConfig`` for ``Int8Training(compute=...)``, ``QuantConfig`` / ``QuantSpec``
for ``config=``), and a value outside a ``Literal`` fails while the YAML is parsed, before any Trainer exists.
"""

import typing

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.cli import LightningCLI  # needs jsonargparse[signatures] (the test extra)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lq
from lq.callbacks import Int8QAT, Int8Training
from lq.nn.int8_compute import int8_compute_config
from lq.ops import Int8ComputeConfig
from lq.ops.hardware import record_kernels

STEPS = 3
CALIBRATION_SAMPLES = 64


# ------------------------------------------------------------------- what the YAML names by class_path
def synthetic(n: int, seed: int) -> TensorDataset:
    """16 features, 4 classes: the label is the largest of the first four features."""
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, x[:, :4].argmax(1))


class TinyClassifier(pl.LightningModule):
    """A user's module, nothing about quantization in it."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class TinyData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(synthetic(256, 0), batch_size=self.batch_size)  # not shuffled: calibration sees [:64]

    def val_dataloader(self):
        return DataLoader(synthetic(64, 1), batch_size=self.batch_size)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv holds arguments too (here: pytest's own)."""
    monkeypatch.setattr("sys.argv", ["lightning-cli"])


def run_config(tmp_path, callbacks: list[dict], run: bool = True) -> LightningCLI:
    """``<prog> fit --config <tmp>/config.yaml`` through LightningCLI, model and data by class_path."""
    config = {
        "seed_everything": 0,
        "model": {"class_path": f"{__name__}.TinyClassifier"},
        "data": {"class_path": f"{__name__}.TinyData"},
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": STEPS, "limit_val_batches": 1,
            "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False,
            "enable_checkpointing": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "callbacks": callbacks,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(path)] if run else ["--config", str(path)]
    return LightningCLI(args=args, run=run, save_config_kwargs={"overwrite": True})


def only(cli: LightningCLI, cls: type):
    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, cls)]
    assert len(found) == 1, cli.trainer.callbacks
    return found[0]


def int8_gemms(ran: list[str]) -> int:
    return sum(entry.startswith("int8_mm:") for entry in ran)


# ------------------------------------------------------------------------------------------- fit
def test_cli_fit_int8_qat_from_yaml(tmp_path):
    qat_yaml = {
        "class_path": "lq.callbacks.Int8QAT",
        "init_args": {
            "num_samples": CALIBRATION_SAMPLES,
            "compute": "int8",
            "lr_scale": 0.1,
            "config": {"activation": {"calibrator": "max", "bits": 7}, "skip": ["net.4"]},
        },
    }
    with record_kernels() as ran:
        cli = run_config(tmp_path, [qat_yaml])
    qat = only(cli, Int8QAT)
    # Built with the YAML's values, as the typed objects the signature names
    assert type(qat.config) is lq.QuantConfig and type(qat.config.activation) is lq.QuantSpec
    assert (qat.config.activation.calibrator, qat.config.activation.bits, qat.config.skip) == ("max", 7, ["net.4"])
    assert qat.config.weight == lq.QuantConfig().weight  # what the YAML left out keeps its default
    assert (qat.compute, qat.num_samples, qat.lr_scale) == ("int8", CALIBRATION_SAMPLES, 0.1)
    # ... and the run used them: net.4 kept in float, the others calibrated with "max" on the first 64 training
    # samples (the default calibrator would choose per layer), then trained on int8 GEMMs.
    model = cli.model
    assert set(lq.quantized_layers(model)) == {"net.0", "net.2"} and type(model.net[4]) is nn.Linear
    first_input = synthetic(256, 0).tensors[0][:CALIBRATION_SAMPLES]
    net0 = lq.quantizers(model)["net.0.input_quantizer"]
    assert net0.mode == "quantize" and net0.spec.bits == 7
    torch.testing.assert_close(net0.amax, first_input.abs().max())
    assert cli.trainer.global_step == STEPS
    assert int8_gemms(ran) >= 2 * STEPS, ran  # at least the forward of both int8 layers in every step


def test_cli_fit_int8_training_from_yaml_with_nested_compute(tmp_path):
    training_yaml = {
        "class_path": "lq.callbacks.Int8Training",
        "init_args": {
            "compute": {"grad_rounding": "stochastic", "clip_ratios": [1.0, 0.8], "grad_granularity": "tensor"},
            "skip": ["net.4"],
        },
    }
    with record_kernels() as ran:
        cli = run_config(tmp_path, [training_yaml])
    training = only(cli, Int8Training)
    compute = training.compute
    assert type(compute) is Int8ComputeConfig, type(compute)
    assert (compute.grad_rounding, compute.clip_ratios, compute.grad_granularity) == ("stochastic", (1.0, 0.8), "tensor")
    assert compute.act_scale == "dynamic" and compute.grad_bits == 8  # defaults of the fields not named
    model = cli.model
    assert set(lq.quantized_layers(model)) == {"net.0", "net.2"} and type(model.net[4]) is nn.Linear
    assert int8_compute_config(model.net[0]) is compute and int8_compute_config(model.net[2]) is compute
    # every step: forward of both layers, grad_weight of both, grad_input of net.2 (net.0's input needs none)
    assert int8_gemms(ran) == STEPS * 5, ran
    assert cli.trainer.global_step == STEPS


def test_cli_compute_by_class_path(tmp_path):
    """``compute`` as a class_path entry (no fit: run=False instantiates only)."""
    entry = {
        "class_path": "lq.callbacks.Int8Training",
        "init_args": {"compute": {"class_path": "lq.ops.Int8ComputeConfig", "init_args": {"act_bits": 7}}},
    }
    cli = run_config(tmp_path, [entry], run=False)
    assert only(cli, Int8Training).compute == Int8ComputeConfig(act_bits=7)


# ---------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    "entry, key, value",
    [
        ({"class_path": "lq.callbacks.Int8Training", "init_args": {"compute": {"grad_rounding": "banana"}}},
         "grad_rounding", "banana"),
        ({"class_path": "lq.callbacks.Int8QAT", "init_args": {"compute": "banana"}}, "compute", "banana"),
        ({"class_path": "lq.callbacks.Int8PTQ", "init_args": {"method": "maxx"}}, "method", "maxx"),
        ({"class_path": "lq.callbacks.Int8QAT", "init_args": {"mode": "maximum"}}, "mode", "maximum"),
        ({"class_path": "lq.callbacks.Int8QAT", "init_args": {"config": {"skip": "net.4"}}}, "skip", "net.4"),
    ],
    ids=["grad_rounding", "qat_compute", "ptq_method", "qat_mode", "skip_not_a_list"],
)
def test_cli_bad_value_fails_at_parse_time(tmp_path, capsys, entry, key, value):
    # The parser's own error (usage, the key, the value, exit code 2), raised before LightningCLI instantiates
    # anything; a check in the constructor would raise ValueError from instantiation instead.
    with pytest.raises(SystemExit) as exit_info:
        run_config(tmp_path, [entry])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f'Parser key "{key}"' in err and value in err, err


def test_cli_bad_quant_spec_value_fails_before_fit_with_allowed_values(tmp_path):
    """QuantSpec's fields are plain str (Hydra's structured configs take no Literal): jsonargparse parses them,
    and the dataclass's own check names the allowed values when the callback is built, before fit."""
    entry = {"class_path": "lq.callbacks.Int8QAT", "init_args": {"config": {"activation": {"calibrator": "banana"}}}}
    with pytest.raises(ValueError, match=r"calibrator must be one of \('max', 'entropy'"):
        run_config(tmp_path, [entry])


def test_int8_training_refuses_other_lq_callbacks_in_the_same_trainer(tmp_path):
    """Int8QAT + Int8Training in one YAML: a clear error in setup, not a calibration failure later."""
    entries = [
        {"class_path": "lq.callbacks.Int8QAT", "init_args": {"num_samples": CALIBRATION_SAMPLES}},
        {"class_path": "lq.callbacks.Int8Training"},
    ]
    with pytest.raises(ValueError, match=r"Int8Training cannot share a Trainer with Int8QAT.*Int8QAT\(compute='int8'\)"):
        run_config(tmp_path, entries)


def test_literal_calibrator_names_match_the_config():
    from lq.callbacks.ptq import CalibratorName
    from lq.quant.config import CALIBRATORS

    assert typing.get_args(CalibratorName) == CALIBRATORS
