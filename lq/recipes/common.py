"""What every recipe runner shares: seeding, the run directory, the logger, Trainers built from the
``trainer`` config group, and a printed result table (a CLI printing its results)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lq import tracking

log = logging.getLogger(__name__)


def recipe_name(cfg: DictConfig) -> str:
    """The recipe's name (Hydra's choice for the ``recipe`` group), or the task name outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return str(HydraConfig.get().runtime.choices.get("recipe") or cfg.task)
    except Exception:  # noqa: BLE001 - only a name
        pass
    return str(cfg.get("name") or cfg.task)


def run_dir(cfg: DictConfig) -> str:
    """Where the run writes: ``cfg.run_dir``, else Hydra's output dir, else ``outputs/<recipe>``."""
    d = cfg.get("run_dir")
    if not d:
        try:
            from hydra.core.hydra_config import HydraConfig

            d = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
        except Exception:  # noqa: BLE001
            d = None
    d = d or os.path.join("outputs", recipe_name(cfg))
    os.makedirs(d, exist_ok=True)
    return str(d)


def setup(cfg: DictConfig) -> None:
    """Seed everything, set threads, quiet the known-harmless warnings."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Consider setting `persistent_workers=True`.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


def plain_config(cfg: DictConfig) -> dict:
    """The run config as plain, resolved Python containers (for loggers); choices (enums of the schema) as
    strings."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def start_logger(cfg: DictConfig, out: str) -> Any:
    """The run's logger (``logger`` group) with the config logged; ``None`` for ``logger=none``."""
    logger = tracking.make_logger(OmegaConf.to_container(cfg.get("logger") or {"kind": "none"}), out, recipe_name(cfg))
    tracking.log_config(logger, plain_config(cfg))
    OmegaConf.save(cfg, os.path.join(out, "lq_config.yaml"), resolve=True)
    return logger


def make_trainer(cfg: DictConfig, out: str, logger: Any, callbacks: Sequence[Any] = (), **overrides: Any) -> pl.Trainer:
    """A Trainer from the ``trainer`` group plus the run's callbacks and logger; ``overrides`` win."""
    # Lightning shows its rich progress bar when rich is installed (tqdm otherwise); the lq callbacks add
    # their calibration bars whenever the trainer has one (trainer.enable_progress_bar).
    return instantiate(
        cfg.trainer,
        callbacks=list(callbacks),
        logger=logger if logger is not None else False,
        default_root_dir=out,
        **overrides,
    )



def test_metric(cfg: DictConfig, out: str, logger: Any, model: Any, dm: Any, callbacks: Sequence[Any] = ()) -> float:
    """``trainer.test`` with the run's trainer settings; the logged ``cfg.metric`` (default ``test_acc``)."""
    trainer = make_trainer(cfg, out, logger, callbacks)
    return float(trainer.test(model, datamodule=dm, verbose=False)[0][cfg.get("metric", "test_acc")])

def quant_config(cfg: DictConfig, **activation: Any) -> Any:
    """``lq.QuantConfig`` from the ``quant`` group, with activation-spec fields replaced by ``activation``."""
    # enum_to_str: the schema's choices (lq.conf_schema) reach QuantSpec, and checkpoints, as plain strings
    node = OmegaConf.to_container(cfg.quant, resolve=True, enum_to_str=True)
    node["activation"].update(activation)
    return instantiate(node, _convert_="all")


def make_callback(cfg: DictConfig, config: Any = None, **kwargs: Any) -> Any:
    """The ``callback`` of the ``quant`` group (Int8PTQ / Int8QAT / Int8Training), with ``config`` if given."""
    factory = instantiate(cfg.callback, _partial_=True, **kwargs)
    return factory(config=config) if config is not None else factory()


#: the corrections a ``ptq_variants`` entry may join with "+" (Nagel et al. 2019; QuantConfig flags of the same name)
PTQ_CORRECTIONS = ("equalize", "bias_correction")


def parse_variant(name: str) -> dict[str, bool]:
    """ "equalize" / "bias_correction" / "equalize+bias_correction" -> the QuantConfig flags to set."""
    parts = str(name).split("+")
    unknown = [p for p in parts if p not in PTQ_CORRECTIONS]
    if unknown or not parts:
        raise ValueError(f"ptq variant {name!r}: join {list(PTQ_CORRECTIONS)} with '+', e.g. equalize+bias_correction")
    return {c: c in parts for c in PTQ_CORRECTIONS}


def parse_candidate(name: str) -> tuple[str, float | None]:
    """ "layerwise" / "max" / "entropy" / "mse" / "percentile_99.99" -> (method, percentile). "layerwise" is
    each quantizer's own per-layer choice (needs a "layerwise" calibration; ``lq.layer_choice``)."""
    method, _, pct = str(name).partition("_")
    if method not in ("layerwise", "max", "entropy", "mse", "percentile"):
        raise ValueError(
            f"calibrator candidate {name!r}: use layerwise, max, entropy, mse or percentile_<p> "
            "(e.g. percentile_99.99)"
        )
    if method == "percentile":
        return method, float(pct) if pct else 99.99
    return method, None


def candidate_label(method: str, percentile: float | None) -> str:
    return f"{method} {percentile:g}%" if method == "percentile" else method


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """The result table on stdout (rich when installed, plain text otherwise)."""
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        console = Console(width=max(100, len(title) + 4))
        console.print(title, style="bold")
        table = Table()
        for i, c in enumerate(columns):
            table.add_column(c, justify="left" if i == 0 else "right")
        for r in cells:
            table.add_row(*r)
        console.print(table)
    except ImportError:
        widths = [max(len(str(c)), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
        for r in cells:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
