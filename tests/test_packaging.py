"""The package users install (issue 15): the wheel carries the Hydra configs and recipes, so ``lq-train`` of a
plain ``pip install <wheel>`` works from any directory; and the core imports and runs without the extras.

The wheel test builds the wheel from a copy of the source tree (offline, ``--no-build-isolation``), installs it
with ``--no-deps`` into a fresh venv that sees this machine's site-packages (torch & co. come from there), and
runs the venv's ``lq-train`` from an empty directory. This machine's site-packages also holds the editable
install of the checkout, so every run checks that the venv imports the wheel's ``lq``, not the checkout's.

The extras test hides hydra-core, omegaconf, wandb, onnx, onnxruntime and matplotlib for real (a copy of
site-packages as links, without those packages and their metadata: libraries that probe with
``importlib.metadata`` see them missing too) and runs the core API there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"mnist_ptq", "fashion_qat", "fashion_mobilenet", "fashion_int8_train", "minilm_ptq"}
#: what the extras cli / onnx / plots install: top-level modules and distribution names (normalised)
EXTRA_MODULES = ("hydra", "omegaconf", "wandb", "onnx", "onnxruntime", "matplotlib")
EXTRA_NAMES = set(EXTRA_MODULES) | {"hydra_core", "mpl_toolkits", "pylab"}


def _site_dirs() -> list[str]:
    """This interpreter's site-packages folders (a venv's too, when the suite runs in one)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return dirs


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """This environment without anything that could put the checkout on the path or pick the configs."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "LQ_CONF_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", NETRC=str(tmp / "no-netrc"), PYTHONNOUSERSITE="1", **extra)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _ok(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# ------------------------------------------------------------------------------------------------ the wheel
@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the wheel from a copy of the tree and install it into a fresh venv (``--system-site-packages``,
    ``--no-deps``). Returns the wheel, the venv, its python and lq-train, and an empty working directory."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("lq", "conf", "recipes"):  # conf/recipe stays a link to ../recipes, as in the repository
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=skip)
    assert (src / "conf" / "recipe").is_symlink()
    env = _env(tmp)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _ok(_run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src], tmp, env),
        "pip wheel")
    (wheel,) = (tmp / "dist").glob("lq-*.whl")
    venv = tmp / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp, env), "venv")
    python = venv / "bin" / "python"
    # --system-site-packages sees the base interpreter's packages; when the suite itself runs in a venv, its
    # packages are elsewhere: add this interpreter's folders too (after the venv's own, so the wheel comes first)
    (site_packages,) = venv.glob("lib/python*/site-packages")
    (site_packages / "_lq_test_parent_site.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in _site_dirs())
    )
    # this machine's pip (seen through --system-site-packages) installs into the venv; --ignore-installed: the
    # editable lq of the system site-packages is neither uninstalled nor taken as "already satisfied"
    _ok(_run([python, "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--no-index",
              "--ignore-installed", wheel], tmp, env), "pip install <wheel>")
    work = tmp / "work"  # an unrelated directory: no lq/ or conf/ next to it
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "lq_train": venv / "bin" / "lq-train", "work": work}


def test_wheel_carries_packages_configs_and_recipes(installed: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "lq").rglob("__init__.py")}
    missing = {p for p in packages if f"{p}/__init__.py" not in names}
    assert not missing, f"lq subpackages missing from the wheel (setup.py): {sorted(missing)}"
    # every config of conf/ (recipe/ through the link) and every recipe, as plain files under lq/_conf
    conf = {f"lq/_conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").glob("*.yaml")}
    conf |= {f"lq/_conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").glob("*/*.yaml")}
    conf |= {f"lq/_conf/recipe/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")}
    assert {f"lq/_conf/recipe/{r}.yaml" for r in RECIPES} <= conf
    assert conf <= names, sorted(conf - names)
    assert not {n for n in names if n.startswith(("conf/", "recipes/", "tests/", "benchmarks/"))}
    assert "lq/deploy/gemv.c" in names  # the batch-1 kernel's source, built at first use (lq.native)
    assert "lq/ops/quant.c" in names  # the training step's quantizations (lq.ops.native_quant)
    assert "lq/ops/amx.c" in names and "lq/ops/lq_simd.h" in names  # the AMX products and their shared helpers
    (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = zipfile.ZipFile(installed["wheel"]).read(meta_name).decode()
    requires = re.findall(r"^Requires-Dist: (.*)$", meta, flags=re.M)
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if re.match(r"(hydra|wandb|onnx|matplotlib)", r)], core
    assert {"cli", "onnx", "plots", "test", "all"} <= set(re.findall(r"^Provides-Extra: (\S+)$", meta, flags=re.M))


def test_venv_imports_the_wheel_not_the_checkout(installed: dict[str, Path]) -> None:
    code = "import json, lq, lq.cli; print(json.dumps([lq.__file__, str(lq.cli.conf_dir())]))"
    proc = _ok(_run([installed["python"], "-c", code], installed["work"], _env(installed["work"])), "import lq")
    lq_file, conf = json.loads(proc.stdout.strip().splitlines()[-1])
    venv = installed["venv"].resolve()
    assert Path(lq_file).resolve().is_relative_to(venv), f"the venv imported {lq_file}, not the wheel's lq"
    assert Path(conf).resolve().is_relative_to(venv) and Path(conf).name == "_conf", conf
    assert sorted(p.stem for p in (Path(conf) / "recipe").glob("*.yaml")) == sorted(RECIPES)


def test_installed_lq_train_runs_mnist_ptq(installed: dict[str, Path]) -> None:
    """``lq-train recipe=mnist_ptq`` (tiny) from an unrelated directory: the result table, the run's files,
    and Hydra read the configs of the installed package."""
    work, run = installed["work"], installed["work"] / "run"
    cmd = [
        installed["lq_train"],
        "recipe=mnist_ptq",
        f"hydra.run.dir={run}",
        "data.limit_train=256",
        "data.limit_test=128",
        "callback.num_samples=32",
        "candidates=[max,percentile_99.99]",
        "tracking.histogram_layers=1",
        "logger=csv",
    ]
    proc = _ok(_run(cmd, work, _env(work)), "lq-train recipe=mnist_ptq")
    assert "fp32" in proc.stdout and "percentile 99.99%" in proc.stdout and "best:" in proc.stdout, proc.stdout
    assert (run / "lq_ptq_results.csv").read_text().startswith("calibration,test_acc,relative")
    assert len(list(run.glob("lq_hist_*.png"))) == 1
    hydra_yaml = (run / ".hydra" / "hydra.yaml").read_text()
    lq_conf = str(installed["venv"] / "lib")  # the main config source: <venv>/lib/python3.X/site-packages/lq/_conf
    assert re.search(rf"path: {re.escape(lq_conf)}\S*/lq/_conf\s+schema: file\s+provider: main", hydra_yaml), (
        hydra_yaml
    )


def test_installed_lq_train_help_and_user_configs(installed: dict[str, Path], tmp_path: Path) -> None:
    """``--help`` lists the recipes; ``--config-dir`` adds a recipe on top of the shipped ones; ``$LQ_CONF_DIR``
    replaces the shipped configs."""
    lq_train, work = installed["lq_train"], installed["work"]
    proc = _ok(_run([lq_train, "--help"], work, _env(work)), "lq-train --help")
    assert f"recipe: {', '.join(sorted(RECIPES))}" in proc.stdout  # Hydra's group list
    assert "Available recipes" in proc.stdout and all(f"  {r} " in proc.stdout for r in RECIPES)

    mine = tmp_path / "mine"
    (mine / "recipe").mkdir(parents=True)
    (mine / "recipe" / "my_ptq.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        # my PTQ: mnist_ptq with max only
        defaults:
          - mnist_ptq
        candidates: [max]
        seed: 1234
    """))
    proc = _ok(_run([lq_train, "--config-dir", mine, "recipe=my_ptq", "--cfg", "job"], work, _env(work)),
               "lq-train --config-dir")
    assert "seed: 1234" in proc.stdout and "task: ptq_table" in proc.stdout, proc.stdout  # mine on top of mnist_ptq
    assert re.search(r"^candidates:\n- max\n(?!- )", proc.stdout, flags=re.M), proc.stdout

    copy = tmp_path / "conf_copy"
    shutil.copytree(next(installed["venv"].glob("lib/python*/site-packages/lq/_conf")), copy)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace("seed: 0", "seed: 4321"))
    proc = _ok(_run([lq_train, "recipe=mnist_ptq", "--cfg", "job"], work, _env(work, LQ_CONF_DIR=str(copy))),
               "LQ_CONF_DIR lq-train")
    assert "seed: 4321" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------------- without the extras
def _site_without_extras(dest: Path) -> Path:
    """``dest``: links to every entry of this interpreter's site-packages except the extras' packages and
    their metadata, so the extras are missing as if never installed."""
    dest.mkdir()
    for sp in _site_dirs():
        for entry in sorted(os.listdir(sp)):
            stem = re.split(r"[-.]", entry, maxsplit=1)[0].lower()
            if stem in EXTRA_NAMES or (dest / entry).exists():
                continue
            (dest / entry).symlink_to(Path(sp) / entry)
    return dest


PROBE = textwrap.dedent(
    """
    import json, sys, site, warnings
    site.addsitedir(sys.argv[1])           # the site-packages without the extras (python -S: no other one)
    sys.path.insert(0, sys.argv[2])        # the checkout
    for name in {extras!r}:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{{name}} is still importable: the probe does not hide the extras")

    import torch
    from torch import nn
    import lq
    out = {{"lq": lq.__file__}}

    # the core API on a tiny model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ref = model(x := torch.randn(32, 8)).detach()
    lq.quantize(model, lq.QuantConfig())
    lq.calibrate(model, [torch.randn(16, 8) for _ in range(4)], num_samples=64)
    out["layers"] = sorted(lq.quantized_layers(model))
    out["err"] = float((model(x) - ref).abs().max() / ref.abs().max())
    with lq.quantization_disabled(model):
        out["float_err"] = float((model(x) - ref).abs().max())

    def message(fn):
        try:
            fn()
        except ImportError as err:
            return str(err)
        return None

    out["export_onnx"] = message(lambda: lq.export_onnx(model, x[:1], sys.argv[3] + "/m.onnx"))

    # the Lightning callbacks: Int8PTQ(export_onnx=) fails at construction; Int8Sensitivity runs, no chart
    import lightning.pytorch as pl
    from lq.callbacks import Int8PTQ, Int8Sensitivity
    out["ptq_export_onnx"] = message(lambda: Int8PTQ(export_onnx="m.onnx"))
    out["new_figure"] = message(lambda: __import__("lq.plots").plots.new_figure((2, 2)))

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        def forward(self, x):
            return self.net(x)
        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_acc", (self(x).argmax(1) == y).float().mean())
        def val_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(64, 8, generator=g)
            return torch.utils.data.DataLoader(list(zip(x, (x[:, 0] > 0).long())), batch_size=32)
        train_dataloader = val_dataloader

    cb = Int8Sensitivity(monitor="val_acc", num_samples=32)
    trainer = pl.Trainer(callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=sys.argv[3])
    trainer.validate(Tiny(), verbose=False)
    out["sensitivity"] = sorted(cb.report.layers)

    # lq-train and its runners name the extra
    from lq import cli
    from lq.recipes import get_runner
    out["runner"] = message(lambda: get_runner("ptq_table"))
    sys.argv = ["lq-train", "recipe=mnist_ptq"]
    try:
        cli.main()
    except SystemExit as exit_:
        out["cli_exit"] = exit_.code
    out["loaded"] = sorted({{m.split(".")[0] for m in sys.modules}} & set({extras!r}))
    print(json.dumps(out))
    """
).format(extras=EXTRA_MODULES)


def test_core_works_without_the_extras(tmp_path: Path) -> None:
    """``import lq``, quantize / calibrate, the callbacks (Int8Sensitivity without its chart) with hydra, wandb,
    onnx, onnxruntime and matplotlib absent; what needs them raises an ImportError naming the extra."""
    sitedir = _site_without_extras(tmp_path / "site")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    proc = _run([sys.executable, "-S", probe, sitedir, ROOT, tmp_path], tmp_path, _env(tmp_path), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["lq"]).resolve() == (ROOT / "lq" / "__init__.py").resolve()
    assert out["layers"] == ["0", "2"] and out["err"] < 0.1 and out["float_err"] < 1e-6
    assert out["export_onnx"] == "lq.export_onnx needs onnx, which is not installed: pip install 'lq[onnx]'"
    assert "pip install 'lq[onnx]'" in out["ptq_export_onnx"] and "Int8PTQ(export_onnx=...)" in out["ptq_export_onnx"]
    assert "pip install 'lq[plots]'" in out["new_figure"]
    assert out["sensitivity"] == ["net.0", "net.2"]
    assert not list(tmp_path.rglob("lq_sensitivity.png"))
    assert "no sensitivity chart" in proc.stderr and "pip install 'lq[plots]'" in proc.stderr
    assert out["cli_exit"] == 2 and "lq-train needs hydra, which is not installed: pip install 'lq[cli]'" in proc.stderr
    assert out["runner"] == "the 'ptq_table' runner needs hydra, which is not installed: pip install 'lq[cli]'"
    assert out["loaded"] == []
