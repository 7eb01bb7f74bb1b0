"""``lq-train``'s structured configs (``lq.conf_schema``) and pre-run checks (``lq.conf_check``), issue 15: a
typo in ``quant.*``, a recipe's keys or ``recipe`` fails while Hydra composes (or, for what a schema cannot
say, before the runner is called), naming the key; every shipped recipe composes and passes.

Composition uses Hydra's compose API on ``lq.cli.conf_dir()`` (importing ``lq.cli`` registers the schemas);
the ``lq.cli.main`` runs are in-process with the recipe runner replaced by a recorder, so "the job never
started" is observed, not timed.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import lq
import lq.recipes
from lq import cli
from lq.calib import CALIBRATOR_NAMES, make_calibrator
from lq.conf_check import ConfigError, check
from lq.conf_schema import (
    TASK_SCHEMAS,
    CalibratorName,
    Granularity,
    LayerKind,
    OpenConfig,
    QuantConfigSchema,
    QuantSpecSchema,
    plain,
)
from lq.quant.config import CALIBRATORS, GRANULARITIES, LAYER_KINDS
from lq.recipes import RUNNERS
from lq.recipes.common import plain_config, quant_config

TINY = ["logger=none"]


def _compose(overrides: list[str], config_dir: Path | None = None):
    GlobalHydra.instance().clear()
    extra = [f"hydra.searchpath=[file://{config_dir}]"] if config_dir else []
    with initialize_config_dir(config_dir=str(cli.conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=[*extra, *overrides])


def _messages(err: BaseException) -> str:
    """The exception and its causes, as Hydra prints them with HYDRA_FULL_ERROR."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


def _user_recipe(tmp_path: Path, name: str, text: str) -> Path:
    """A config folder of the user's (``--config-dir``) holding ``recipe/<name>.yaml``."""
    (tmp_path / "recipe").mkdir(parents=True, exist_ok=True)
    (tmp_path / "recipe" / f"{name}.yaml").write_text("# @package _global_\n" + text)
    return tmp_path


# ---------------------------------------------------------------- the schema is the code's, not a copy


def test_quant_schema_is_derived_from_the_dataclasses() -> None:
    for schema, cls in ((QuantSpecSchema, lq.QuantSpec), (QuantConfigSchema, lq.QuantConfig)):
        names = [f.name for f in dataclasses.fields(schema)]
        assert names == ["_target_", *(f.name for f in dataclasses.fields(cls))], (schema, cls)
    # the schema's defaults build the dataclass's defaults
    built = instantiate(plain(OmegaConf.structured(QuantConfigSchema)), _convert_="all")
    assert built == lq.QuantConfig()
    assert [m.value for m in CalibratorName] == list(CALIBRATORS)
    assert [m.value for m in Granularity] == list(GRANULARITIES)
    assert [m.value for m in LayerKind] == list(LAYER_KINDS)


def test_calibrator_choices_are_the_ones_lq_builds() -> None:
    assert set(CALIBRATORS) == set(CALIBRATOR_NAMES)  # QuantSpec's check and make_calibrator agree
    for name in CALIBRATORS:
        make_calibrator(name)  # each choice the schema allows builds a calibrator
    with pytest.raises(ValueError):
        make_calibrator("maxx")


def test_every_runner_has_a_schema() -> None:
    assert set(RUNNERS) <= set(TASK_SCHEMAS)


# ---------------------------------------------------------------- shipped recipes compose and pass


@pytest.mark.parametrize("recipe", cli.available_recipes())
def test_shipped_recipe_composes_typed_and_passes_the_checks(recipe: str) -> None:
    cfg = _compose([f"recipe={recipe}", *TINY])
    schema = OmegaConf.get_type(cfg)
    assert schema is TASK_SCHEMAS[str(cfg.task)], f"{recipe}: add `- override /schema: {cfg.task}`"
    if cfg.quant is not None:
        assert OmegaConf.get_type(cfg.quant) is QuantConfigSchema
        assert OmegaConf.get_type(cfg.quant.activation) is QuantSpecSchema
    check(cfg)


def test_quant_choices_reach_quant_config_as_plain_strings() -> None:
    """The schema's enums must not leak into a QuantConfig (its dict goes into checkpoints) or the logs."""
    cfg = _compose(["recipe=mnist_ptq", "quant.activation.calibrator=percentile", *TINY])
    assert cfg.quant.activation.calibrator == "percentile"  # what the runners compare
    qcfg = quant_config(cfg)
    assert qcfg.activation.calibrator == "percentile" and type(qcfg.activation.calibrator) is str
    assert type(qcfg.weight.granularity) is str and all(type(k) is str for k in qcfg.layers)
    logged = plain_config(cfg)["quant"]
    assert type(logged["activation"]["calibrator"]) is str and type(logged["layers"][0]) is str


# ---------------------------------------------------------------- mistakes fail at compose, naming the key


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["recipe=fashion_qat", "quant.activation.calibrator=maxx"], ["full_key: quant.activation.calibrator", "maxx"]),
        (["recipe=fashion_qat", "quant.activation.bits=eight"], ["full_key: quant.activation.bits", "eight"]),
        (["recipe=mnist_ptq", "quant.activation.num_bits=eight"], ["num_bits", "QuantSpecSchema"]),
        (["recipe=mnist_ptq", "quant.weight.granularity=per_row"], ["full_key: quant.weight.granularity", "per_row"]),
        (["recipe=mnist_ptq", "quant.layers=[Linear,Conv5d]"], ["quant.layers", "Conv5d"]),
        (["recipe=mnist_ptq", "quant.gelu10=sometimes"], ["full_key: quant.gelu10"]),
        (["recipe=fashion_qat", "fold_bn=maybe"], ["full_key: fold_bn"]),
        (["recipe=fashion_qat", "qat_fraction=a_tenth"], ["full_key: qat_fraction"]),
        (["recipe=mnist_ptq", "tracking.percentiles=[high]"], ["tracking.percentiles"]),
        (["recipe=mnist_ptq", "seed=zero"], ["full_key: seed"]),
        (["recipe=mnist_ptq", "logger.ofline=false"], ["logger.ofline", "LoggerSchema"]),
        (["recipe=mnist_ptq", "logger.kind=tensorboard"], ["full_key: logger.kind", "tensorboard"]),
        (["recipe=mnist_ptq", "logger=csv", "logger.offline=sometimes"], ["full_key: logger.offline"]),
    ],
)
def test_bad_key_type_or_choice_fails_at_compose(overrides: list[str], expected: list[str]) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        _compose([*overrides, *TINY])
    text = _messages(err.value)
    assert all(e in text for e in expected), text
    if "calibrator=maxx" in overrides[1]:
        assert all(name in text for name in CALIBRATORS)  # the message lists the allowed names


def test_typos_in_a_recipe_file_fail_at_compose(tmp_path: Path) -> None:
    """YAML typos (a recipe of the user's, or an edited shipped one) were merged silently before the schema."""
    ptq = "defaults:\n  - override /schema: ptq_table\ntask: ptq_table\n"
    conf = _user_recipe(tmp_path, "quant_typo", ptq + "quant:\n  activation:\n    calibratr: max\n")
    _user_recipe(tmp_path, "top_typo", ptq + "candidate: [max]\n")
    _user_recipe(tmp_path, "other_runners_key", ptq + "qat_steps: 3\n")
    open_ = "defaults:\n  - override /schema: open\ntask: ptq_table\n"
    _user_recipe(tmp_path, "spec_typo", open_ + "quant:\n  weight:\n    bitz: 4\n")
    for recipe, key in (
        ("quant_typo", "quant.activation.calibratr"),
        ("top_typo", "candidate"),
        ("other_runners_key", "qat_steps"),
        ("spec_typo", "quant.weight.bitz"),  # schema=open opens the top level only
    ):
        with pytest.raises(ConfigCompositionException) as err:
            _compose([f"recipe={recipe}", *TINY], conf)
        assert f"full_key: {key}" in _messages(err.value), (recipe, _messages(err.value))


def test_unknown_recipe_fails_at_compose() -> None:
    with pytest.raises(MissingConfigException) as err:
        _compose(["recipe=no_such_recipe", *TINY])
    text = str(err.value)
    assert "recipe/no_such_recipe" in text and all(name in text for name in cli.available_recipes())


def test_open_schema_takes_keys_of_a_runner_of_your_own(tmp_path: Path) -> None:
    body = "task: mypkg.run\nmy_option: 3\n"
    conf = _user_recipe(tmp_path, "mine", "defaults:\n  - override /schema: open\n" + body)
    _user_recipe(tmp_path, "mine_closed", body)
    cfg = _compose(["recipe=mine", *TINY], conf)
    assert OmegaConf.get_type(cfg) is OpenConfig and cfg.my_option == 3
    assert OmegaConf.get_type(cfg.quant) is QuantConfigSchema  # still typed below the top level
    with pytest.raises(ConfigCompositionException, match="my_option"):
        _compose(["recipe=mine_closed", *TINY], conf)


# ---------------------------------------------------------------- what the checks before the job catch


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["recipe=mnist_ptq", "+quant.activation.calibratr=max"], "quant.activation.calibratr: not a key"),
        (["recipe=mnist_ptq", "+callback.num_sample=64"], "callback.num_sample: lq.callbacks.Int8PTQ takes no"),
        (["recipe=mnist_ptq", "+trainer.max_epoch=1"], "trainer.max_epoch: lightning.pytorch.Trainer takes no"),
        (["recipe=mnist_ptq", "+model.lrr=0.1"], "model.lrr:"),
        (["recipe=mnist_ptq", "quant.activation.bits=40"], "quant: bits must be"),
        (["recipe=mnist_ptq", "quant.activation.percentile=101"], "quant: percentile must be"),
        (["recipe=fashion_qat", "calibrators=[max,entrpy]"], "calibrators[1]: calibrator candidate 'entrpy'"),
        (["recipe=fashion_mobilenet", "ptq_variants=[equalize,bias_corection]"], "ptq_variants[1]: ptq variant"),
    ],
)
def test_check_names_what_would_fail_in_the_job(overrides: list[str], expected: str) -> None:
    cfg = _compose([*overrides, *TINY])
    with pytest.raises(ConfigError) as err:
        check(cfg)
    assert expected in str(err.value), str(err.value)


def test_check_wants_the_schema_of_the_task(tmp_path: Path) -> None:
    """A recipe that names a runner but not its schema would miss that runner's keys (workflow reads
    ``calibrators`` only after the fp32 training)."""
    conf = _user_recipe(tmp_path, "no_schema", "task: workflow\n")
    wanted = r"task 'workflow' needs the schema of its runner, not 'base'.*override /schema: workflow"
    with pytest.raises(ConfigError, match=wanted):
        check(_compose(["recipe=no_schema", *TINY], conf))


def test_a_config_folder_without_schema_still_runs_untyped(tmp_path: Path) -> None:
    """An edited copy of conf/ from before the schemas (``$LQ_CONF_DIR``): composes untyped, passes the checks."""
    copy = tmp_path / "conf"
    shutil.copytree(cli.conf_dir(), copy)  # follows conf/recipe -> recipes
    for path in [copy / "config.yaml", *(copy / "recipe").glob("*.yaml")]:
        path.write_text("".join(line for line in path.read_text().splitlines(True) if "schema" not in line))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(copy), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["recipe=fashion_qat", *TINY])
    assert OmegaConf.get_type(cfg) is dict
    check(cfg)


# ---------------------------------------------------------------- lq-train exits before the runner


@pytest.fixture
def runner_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace the recipe runner (what ``lq.cli`` calls) by a recorder."""
    calls: list = []
    monkeypatch.setattr(lq.recipes, "run_recipe", lambda cfg: calls.append(cfg) or {})
    return calls


def _main(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> int:
    """``lq-train ARGS`` in this process; its exit code (0 when it returns)."""
    argv = ["lq-train", *args, "logger=none", f"hydra.run.dir={tmp_path / 'run'}", "hydra/job_logging=none",
            "hydra/hydra_logging=none"]
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    try:
        cli.main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        GlobalHydra.instance().clear()
    return 0


def test_lq_train_runs_the_runner_when_the_config_is_right(monkeypatch, tmp_path, runner_calls) -> None:
    """The control for the tests below: the recorder does see a job that passes."""
    assert _main(monkeypatch, tmp_path, "recipe=fashion_qat", "quant.activation.calibrator=max") == 0
    assert len(runner_calls) == 1 and runner_calls[0].quant.activation.calibrator == "max"


def test_lq_train_multirun_sweeps(monkeypatch, tmp_path, runner_calls) -> None:
    """``lq-train -m``: the shipped sweep directory resolves (it once used ``${hydra:...}``, which the sweeper
    cannot resolve before a job exists) and each job reaches the runner with its own value."""
    monkeypatch.chdir(tmp_path)  # the sweep writes multirun/<date>/<recipe>/<n> here
    assert _main(monkeypatch, tmp_path, "-m", "recipe=fashion_qat", "seed=0,1") == 0
    assert sorted(c.seed for c in runner_calls) == [0, 1]
    assert len(list((tmp_path / "multirun").glob("*/fashion_qat/[01]"))) == 2


@pytest.mark.parametrize(
    "args",
    [
        ["recipe=fashion_qat", "quant.activation.calibrator=maxx"],  # compose: not a calibrator
        ["recipe=fashion_qat", "quant.activation.num_bits=eight"],  # compose: not a key
        ["recipe=fashion_qat", "quant.activation.bits=eight"],  # compose: not an int
        ["recipe=fashion_qat", "+quant.activation.calibratr=max"],  # check: appended typo
        ["recipe=fashion_qat", "+callback.lr_scal=0.1"],  # check: Int8QAT has no lr_scal (built after fp32 training)
        ["recipe=fashion_qat", "calibrators=[max,entrpy]"],  # check: parsed after fp32 training
        ["recipe=no_such_recipe"],
    ],
)
def test_lq_train_with_a_mistake_exits_before_the_runner(monkeypatch, tmp_path, runner_calls, capsys, args) -> None:
    code = _main(monkeypatch, tmp_path, *args)
    assert code != 0 and runner_calls == []
    assert "Available recipes" in capsys.readouterr().err


def test_lq_train_with_a_typo_in_a_recipe_file_exits_before_the_runner(monkeypatch, tmp_path, runner_calls, capsys):
    conf = _user_recipe(
        tmp_path / "conf", "mine", "defaults:\n  - override /quant: qat\n  - override /schema: workflow\n"
        "task: workflow\ncalibrators: [max]\nquant:\n  activation:\n    calibratr: max\n"
    )
    assert _main(monkeypatch, tmp_path, "--config-dir", str(conf), "recipe=mine") != 0 and runner_calls == []
    assert "calibratr" in capsys.readouterr().err


def test_lq_train_help_still_lists_the_recipes(monkeypatch, tmp_path, runner_calls, capsys) -> None:
    assert _main(monkeypatch, tmp_path, "--help") == 0 and runner_calls == []
    out = capsys.readouterr().out
    assert "Available recipes" in out and all(name in out for name in cli.available_recipes())
