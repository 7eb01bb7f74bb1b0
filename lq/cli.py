"""``lq-train``: the Hydra entry point that runs a recipe.

    lq-train recipe=mnist_ptq
    lq-train recipe=mnist_ptq quant.activation.calibrator=max logger=csv
    lq-train -m recipe=mnist_ptq quant.activation.calibrator=max,entropy,percentile
    lq-train --help                    # Hydra's help: the config groups and their options

Where the configs live: ``conf/`` (groups model/, data/, quant/, trainer/, logger/) and ``recipes/`` at the
repository root, found relative to this file (``<root>/lq/cli.py`` -> ``<root>/conf``), which holds for a
source checkout and for ``pip install -e .``. ``conf/recipe`` is a link to ``../recipes``, so the recipes are
Hydra's ``recipe`` group (``recipe=NAME``, sweepable in a multirun). ``$LQ_CONF_DIR`` points elsewhere (e.g. a
copy of ``conf/`` next to a non-editable install); Hydra's own ``--config-dir`` adds a folder of your recipes.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

#: environment variable naming the config folder (default: ``<repo root>/conf``)
CONF_ENV = "LQ_CONF_DIR"

log = logging.getLogger(__name__)
_STARTED = False  # set once a job runs: failures after that are the job's, not the command line's


def conf_dir() -> Path:
    """The Hydra config folder: ``$LQ_CONF_DIR`` or ``conf/`` beside the ``lq`` package.

    Raises:
        FileNotFoundError: no ``config.yaml`` there; the message says how to get one.
    """
    env = os.environ.get(CONF_ENV)
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"lq-train: no Hydra config at {path}/config.yaml. lq-train runs from a source checkout "
            f"(git clone, then `pip install -e .`), or set {CONF_ENV} to a copy of the repository's conf/ folder"
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

    from lq.recipes import run_recipe

    if OmegaConf.is_missing(cfg, "task"):
        raise ValueError("no recipe given: run lq-train recipe=NAME (the recipes are listed below)")
    _STARTED = True

    run_recipe(cfg)


def main() -> None:
    """Console script ``lq-train``: compose the config (Hydra) and run the recipe's task.

    A command line Hydra cannot compose (unknown recipe, unknown key) gets Hydra's error followed by the
    list of recipes. Errors inside the job (e.g. a data set that is not installed, whose message names the
    install command) are reported by Hydra as they are.
    """
    import hydra

    global _STARTED
    _STARTED = False
    try:
        conf = conf_dir()
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    app = hydra.main(config_path=str(conf), config_name="config", version_base="1.3")(_job)
    try:
        app()
    except SystemExit as exit_:
        if exit_.code not in (0, None) and not _STARTED:
            print("\n" + recipe_help(conf), file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
