"""W&B (issue 15): artifacts for the ONNX file, the converted model and the amax table; the calibration
histograms and the sensitivity chart as native W&B charts; online mode decided by wandb's own credential
lookup (a self-hosted server via ``WANDB_BASE_URL``).

The runs are offline; what they recorded is read back from the run's ``run-<id>.wandb`` file (the records
``wandb sync`` would upload, ``tests/wandb_records.py``) and the staged artifact files.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lq
from lq import plots, tracking
from lq.callbacks import Int8QAT, Int8Sensitivity
from lq.workflow import PartialQuantization, SensitivityReport

sys.path.insert(0, str(Path(__file__).parent))
import wandb_records  # noqa: E402
from test_progress import Tiny  # noqa: E402

wandb = pytest.importorskip("wandb")

SELF_HOSTED = "https://wandb.example.com"
KEY = "local-" + "0123456789" * 4  # the format of a self-hosted server's key (wandb checks the format only)


@pytest.fixture
def clean_wandb(tmp_path, monkeypatch):
    """No W&B variable or login of the user's; wandb's files under tmp_path. wandb reads its environment once
    per process (its settings singleton): ``wandb.teardown()`` before and after, so each test sees its own."""
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    yield tmp_path
    wandb.teardown()


def md5_b64(path: Path) -> str:
    """The digest W&B puts in an artifact manifest for a file."""
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()


# ------------------------------------------------------------------------------------ credentials
def write_netrc(path: Path, host: str, key: str) -> Path:
    path.write_text(f"machine {host}\n  login user\n  password {key}\n")
    path.chmod(0o600)
    return path


def test_self_hosted_server_key_in_netrc_goes_online(clean_wandb, monkeypatch):
    netrc = write_netrc(clean_wandb / "netrc", "wandb.example.com", KEY)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("WANDB_BASE_URL", SELF_HOSTED)
    assert tracking.wandb_base_url() == SELF_HOSTED
    assert tracking.wandb_logged_in()
    assert tracking.wandb_mode(offline=False) == "online"
    assert tracking.wandb_mode(offline=True) == "offline"  # online only when asked
    # another server: that netrc holds no key for it
    monkeypatch.setenv("WANDB_BASE_URL", "https://other.example.com")
    assert not tracking.wandb_logged_in() and tracking.wandb_mode(offline=False) == "offline"


def test_key_for_public_server_does_not_log_in_to_a_self_hosted_one(clean_wandb, monkeypatch):
    netrc = write_netrc(clean_wandb / "netrc", "api.wandb.ai", "a" * 40)
    monkeypatch.setenv("NETRC", str(netrc))
    assert tracking.wandb_logged_in()  # wandb's default server (the public one behind it)
    wandb.teardown()
    monkeypatch.setenv("WANDB_BASE_URL", SELF_HOSTED)
    assert not tracking.wandb_logged_in() and tracking.wandb_mode(offline=False) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", KEY)  # wandb's lookup takes the key from the environment for any server
    assert tracking.wandb_logged_in() and tracking.wandb_mode(offline=False) == "online"


def test_malformed_key_is_no_login(clean_wandb, monkeypatch):
    """wandb rejects a key of the wrong format before any network call: online would fail, so offline."""
    monkeypatch.setenv("NETRC", str(write_netrc(clean_wandb / "netrc", "wandb.example.com", "short")))
    monkeypatch.setenv("WANDB_BASE_URL", SELF_HOSTED)
    assert not tracking.wandb_logged_in()


def test_fallback_when_wandb_lookup_api_is_gone(clean_wandb, monkeypatch):
    """The lookup is private API: without it, WANDB_API_KEY or the netrc entry of the configured host."""
    import wandb.sdk.lib as wandb_lib

    with monkeypatch.context() as m:  # undone before the fixture's wandb.teardown(), which imports wbauth
        for name in ("wbauth", "apikey"):  # `from wandb.sdk.lib import ...` of either fails
            m.delattr(wandb_lib, name, raising=False)
            m.setitem(sys.modules, f"wandb.sdk.lib.{name}", None)
        assert tracking._wandb_lookup(SELF_HOSTED) is None  # noqa: SLF001 - the fallback is what is tested
        m.setenv("NETRC", str(write_netrc(clean_wandb / "netrc", "wandb.example.com", KEY)))
        m.setenv("WANDB_BASE_URL", SELF_HOSTED)
        assert tracking.wandb_logged_in()
        m.setenv("WANDB_BASE_URL", "https://other.example.com")
        assert not tracking.wandb_logged_in()
        m.setenv("WANDB_API_KEY", KEY)
        assert tracking.wandb_logged_in()


# -------------------------------------------------------------------- artifacts and native charts
def test_amax_artifact_histogram_and_sensitivity_charts_in_offline_run(clean_wandb):
    out = clean_wandb / "run"
    logger = tracking.make_logger({"kind": "wandb"}, out, "t")
    assert tracking.log_artifact([], out, "x", "model") == []  # no W&B logger: nothing, no error
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="entropy")))
    lq.calibrate(model, [torch.randn(64, 8) for _ in range(8)], num_samples=512)
    tracking.log_amax(logger, model, str(out))
    ranges = tracking.log_calibration_histograms(logger, model, str(out), layers=1)
    report = SensitivityReport(fp32=0.9, int8=0.5, layers={"2": 0.7, "0": 0.88})
    result = PartialQuantization(["2"], 0.89, 0.9, 0.01, False, [(0, 0.5), (1, 0.89), (2, 0.9)])

    class Trainer:  # what log_sensitivity reads from a Lightning Trainer
        log_dir = default_root_dir = str(out)
        loggers = [logger]
        global_step = 0

    plots.log_sensitivity(Trainer(), report, result, "val_acc")
    run_id = logger.experiment.id
    tracking.finish(logger)
    wandb.teardown()  # an offline run's records reach its .wandb file only once wandb's service is done

    run = wandb_records.offline_run(out)
    arts = wandb_records.artifacts(run)
    amax = arts[f"lq-amax-{run_id}"]
    assert amax["type"] == "amax-table" and amax["metadata"]["quantizers"] == 2
    staged, digest = amax["files"]["lq_amax.csv"]
    assert digest == md5_b64(out / "lq_amax.csv") and Path(staged).read_bytes() == (out / "lq_amax.csv").read_bytes()
    assert str(clean_wandb / "data") in staged  # staged under WANDB_DATA_DIR until `wandb sync`

    hist = wandb_records.history(run)
    charts = wandb_records.charts(run)
    # Fig. 2: a native histogram (counts kept, <= 512 bins), the log-count line and the candidate ranges
    counts, _ = model[0].input_quantizer.calibrator.histogram()
    native = hist["lq/calibration_histogram/0/histogram"]
    assert native["_type"] == "histogram" and len(native["values"]) <= 512
    assert len(native["bins"]) == len(native["values"]) + 1 and sum(native["values"]) == int(counts.sum())
    assert charts["lq/calibration_histogram/0/log_counts"]["panelDefId"] == "wandb/line/v0"
    table = wandb_records.table(run, hist["lq/calibration_histogram/0/ranges"])
    assert table["columns"] == ["calibrator", "amax"]
    assert {r[0]: r[1] for r in table["data"]} == pytest.approx(ranges["0.input_quantizer"])
    assert "lq/calibration_histogram/0" in hist  # the PNG as before
    # Fig. 3: a native bar chart (most sensitive first) and the partial-quantization line
    bar = charts["lq/sensitivity_bar"]
    assert bar["panelDefId"] == "wandb/bar/v0" and bar["fieldSettings"] == {"label": "layer", "value": "val_acc"}
    bars = wandb_records.table(run, hist["lq/sensitivity_bar_table"])
    assert bars["data"] == [["2", 0.7], ["0", 0.88]]
    assert charts["lq/partial_quantization"]["panelDefId"] == "wandb/line/v0"
    line = wandb_records.table(run, hist["lq/partial_quantization_table"])
    assert line["data"] == [[0, 0.5], [1, 0.89], [2, 0.9]]
    assert "lq/sensitivity_chart" in hist and "lq/sensitivity" in hist  # the PNG and the table as before


def test_export_callback_logs_onnx_converted_and_amax_artifacts(clean_wandb):
    pytest.importorskip("onnx")
    out = clean_wandb / "run"
    logger = tracking.make_logger({"kind": "wandb"}, out, "t")
    onnx_path, conv_path = out / "export" / "m.onnx", out / "export" / "m_int8.pt"
    torch.manual_seed(0)
    model = Tiny()
    qat = Int8QAT(num_samples=128, export_onnx=str(onnx_path), export_converted=str(conv_path))
    args = dict(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=out)
    pl.Trainer(max_steps=2, callbacks=[qat], **args).fit(model)
    # the Int8Sensitivity chart of the same run, natively
    pl.Trainer(callbacks=[Int8Sensitivity(monitor="val_acc", num_samples=128)], **args).validate(model, verbose=False)
    run_id = logger.experiment.id
    tracking.finish(logger)
    wandb.teardown()  # an offline run's records reach its .wandb file only once wandb's service is done

    run = wandb_records.offline_run(out)
    arts = wandb_records.artifacts(run)
    onnx_art, conv_art = arts[f"lq-onnx-{run_id}"], arts[f"lq-converted-{run_id}"]
    assert onnx_art["type"] == conv_art["type"] == "model"
    assert onnx_art["metadata"]["format"] == "onnx"
    assert onnx_art["metadata"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    for art, path in ((onnx_art, onnx_path), (conv_art, conv_path)):
        staged, digest = art["files"][path.name]
        assert digest == md5_b64(path) and Path(staged).read_bytes() == path.read_bytes()
    amax = arts[f"lq-amax-{run_id}"]
    (name, (staged, _)), = amax["files"].items()
    assert name == "lq_amax.csv" and "net.0.input_quantizer" in Path(staged).read_text()
    assert wandb_records.charts(run)["lq/sensitivity_bar"]["panelDefId"] == "wandb/bar/v0"


def test_artifacts_skip_other_loggers_and_failures_do_not_raise(tmp_path, caplog):
    from lightning.pytorch.loggers import CSVLogger

    f = tmp_path / "m.onnx"
    f.write_bytes(b"x")
    assert tracking.log_artifact([CSVLogger(tmp_path), None], f, "lq-onnx", "model") == []

    class Broken(tracking_wandb_logger()):  # a W&B logger whose run fails
        def __init__(self):
            pass

        @property
        def experiment(self):
            raise RuntimeError("no network")

    with caplog.at_level("WARNING"):
        assert tracking.log_artifact([Broken()], f, "lq-onnx", "model") == []
    assert "could not log artifact lq-onnx" in caplog.text and "no network" in caplog.text


def tracking_wandb_logger():
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger
