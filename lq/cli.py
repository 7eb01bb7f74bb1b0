"""``lq-train``: the Hydra entry point that runs a recipe.

    lq-train recipe=mnist_ptq
    lq-train recipe=mnist_ptq quant.activation.calibrator=max logger=csv
    lq-train -m recipe=mnist_ptq quant.activation.calibrator=max,entropy,percentile
    lq-train --help                    # Hydra's help (the config groups and their options), then the recipes

Where the configs live: ``conf/`` (groups model/, data/, quant/, trainer/, logger/) and ``recipes/`` at the
repository root. ``conf/recipe`` is a link to ``../recipes``, so the recipes are Hydra's ``recipe`` group
(``recipe=NAME``, sweepable in a multirun). lq-train takes the first of:

1. ``$LQ_CONF_DIR``: a folder with its own ``config.yaml`` (e.g. an edited copy of ``conf/``);
2. ``lq/_conf`` inside the installed package (``pip install lq`` / a wheel: setup.py packs ``conf/`` there, the
   recipes as its ``recipe/`` folder), found with ``importlib.resources``;
3. ``conf/`` beside the ``lq`` package (``<root>/lq/cli.py`` -> ``<root>/conf``): a source checkout or
   ``pip install -e .``.

Hydra's own ``--config-dir DIR`` puts a folder of your configs on top of that one (``DIR/recipe/mine.yaml`` is
``recipe=mine``; a file named like a shipped one replaces it).

The composed config is typed (``lq.conf_schema``, registered in Hydra's ConfigStore when this module is imported):
a wrong key, type or calibrator name under ``quant``, ``tracking`` or a recipe's own keys fails while Hydra
composes, and ``lq.conf_check`` checks the rest (``_target_`` arguments, value ranges, candidate names) before
the runner is called. A recipe picks its runner's schema (``- override /schema: workflow``); a recipe of your
own whose runner reads keys of its own uses ``- override /schema: open``.

Needs the ``cli`` extra (``pip install 'lq[cli]'``: hydra-core, wandb, matplotlib).
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.resources import files
from pathlib import Path

from lq.extras import import_extra

#: environment variable naming a config folder to use instead of the shipped one
CONF_ENV = "LQ_CONF_DIR"
#: the shipped configs inside the installed ``lq`` package (see setup.py)
PACKAGED_CONF = "_conf"

log = logging.getLogger(__name__)
_STARTED = False  # set once a job runs: failures after that are the job's, not the command line's


def register_schemas() -> bool:
    """Put lq's structured configs into Hydra's ConfigStore (``lq.conf_schema``); False when hydra-core is not
    installed (``main`` then says which extra to install)."""
    try:
        from lq.conf_schema import register
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in ("hydra", "omegaconf"):
            raise
        return False
    register()
    return True


# Hydra composes against the ConfigStore: register on import, so that any hydra.compose of conf_dir() is typed.
register_schemas()


def packaged_conf_dir() -> Path | None:
    """``lq/_conf`` of an installed (non-editable) ``lq``, or None (a source checkout has no such folder)."""
    path = files("lq").joinpath(PACKAGED_CONF)
    # a real folder for any unzipped install; Hydra reads config folders from the file system
    return path if isinstance(path, Path) and (path / "config.yaml").is_file() else None


def conf_dir() -> Path:
    """The Hydra config folder: ``$LQ_CONF_DIR``, else the installed package's ``lq/_conf``, else ``conf/``
    beside the ``lq`` package (a source checkout or an editable install).

    Raises:
        FileNotFoundError: no ``config.yaml`` there; the message says how to get one.
    """
    env = os.environ.get(CONF_ENV)
    if env:
        path = Path(env)
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(
                f"lq-train: no Hydra config at {path}/config.yaml ({CONF_ENV}): point {CONF_ENV} at a copy of "
                f"the repository's conf/ folder, or unset it and add your own configs with --config-dir DIR"
            )
        return path
    packaged = packaged_conf_dir()
    if packaged is not None:
        return packaged
    path = Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"lq-train: no Hydra config: neither lq/{PACKAGED_CONF} in the installed package nor {path}/config.yaml "
            f"exists. Reinstall lq (`pip install 'lq[cli]'`, or `pip install -e .` in a source checkout), or set "
            f"{CONF_ENV} to a copy of the repository's conf/ folder"
        )
    return path


def available_recipes(conf: Path | None = None) -> list[str]:
    """Names accepted by ``recipe=``: the YAML files of ``conf/recipe`` (= ``recipes/``)."""
    conf = conf or conf_dir()
    return sorted(p.stem for p in (conf / "recipe").glob("*.yaml"))


def recipe_help(conf: Path | None = None) -> str:
    """The recipe list, one per line with its first comment line."""
    conf = conf or conf_dir()
    lines = ["Available recipes (lq-train recipe=NAME):"]
    for name in available_recipes(conf):
        first = ""
        for line in (conf / "recipe" / f"{name}.yaml").read_text().splitlines():
            if line.startswith("#") and not line.startswith("# @package"):
                first = line.lstrip("# ").strip()
                break
        lines.append(f"  {name:<22} {first}")
    return "\n".join(lines)


def _job(cfg) -> None:  # noqa: ANN001 - a DictConfig from Hydra
    """One Hydra job: run the recipe's task (its runner prints the result table)."""
    global _STARTED
    from omegaconf import OmegaConf

    from lq.conf_check import ConfigError, check
    from lq.recipes import run_recipe

    if OmegaConf.is_missing(cfg, "task"):
        raise ValueError("no recipe given: run lq-train recipe=NAME (the recipes are listed below)")
    try:
        check(cfg)  # before any training: a mistake Hydra's composition cannot see fails here, naming the key
    except ConfigError as err:  # a command-line error (exit 2, then the recipe list), not a job's traceback
        print(f"lq-train: {err}", file=sys.stderr)
        sys.exit(2)
    _STARTED = True

    run_recipe(cfg)


def main() -> None:
    """Console script ``lq-train``: compose the config (Hydra) and run the recipe's task.

    A command line Hydra cannot compose (unknown recipe, unknown key, a value of the wrong type or not among
    the choices) or that ``lq.conf_check.check`` rejects gets the error, naming the key, followed by the list
    of recipes, and the runner is never called; ``--help`` prints Hydra's help and then the recipes with their
    descriptions. Errors inside the job (e.g. a data set that is not installed, whose message names the install
    command) are reported by Hydra as they are.
    """
    global _STARTED
    _STARTED = False
    try:
        hydra = import_extra("hydra", "lq-train")
        conf = conf_dir()
    except (ImportError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    app = hydra.main(config_path=str(conf), config_name="config", version_base="1.3")(_job)
    try:
        app()
    except SystemExit as exit_:
        if exit_.code not in (0, None) and not _STARTED:
            print("\n" + recipe_help(conf), file=sys.stderr)
        elif exit_.code in (0, None) and {"--help", "-h"} & set(sys.argv[1:]):
            print(recipe_help(conf))
        raise


if __name__ == "__main__":
    main()
