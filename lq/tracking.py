"""Experiment tracking for the recipes: loggers (W&B offline by default), per-layer amax, calibration
histograms with the candidate ranges marked (Wu et al. 2020, Fig. 2), result tables.

Everything is written twice: to the loggers (W&B gets ``wandb.Table`` objects and images; any logger gets
scalars) and to the run directory (PNG and CSV), so users without W&B see the same plots.

W&B never blocks: without ``WANDB_MODE`` the run is offline unless the caller asks for online *and* a login
exists (``WANDB_API_KEY`` or ``~/.netrc``); ``WANDB_SILENT`` defaults to true.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import math
import netrc
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lq.calib import HistogramCalibrator
from lq.extras import import_extra
from lq.workflow import quantizers

log = logging.getLogger(__name__)

LOGGER_KINDS = ("wandb", "csv", "none")
WANDB_HOST = "api.wandb.ai"


# --------------------------------------------------------------------------------------------- loggers
def wandb_logged_in() -> bool:
    """True when W&B credentials exist (``WANDB_API_KEY`` or a netrc entry for the W&B host); no network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        return os.path.isfile(path) and netrc.netrc(path).authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(offline: bool = True) -> str:
    """The W&B mode a run will use: ``$WANDB_MODE`` when set ("offline", "disabled", ...), else "offline"
    unless ``offline=False``. Online (asked either way) needs a login: without one it is "offline", because
    wandb would otherwise stop and prompt for an API key."""
    env = os.environ.get("WANDB_MODE")
    wanted = env if env else ("offline" if offline else "online")
    if wanted in ("online", "run") and not wandb_logged_in():
        log.warning("lq: W&B online requested but no login found (wandb login / WANDB_API_KEY): logging offline")
        return "offline"
    return wanted


def make_logger(cfg: Mapping[str, Any] | None, save_dir: str | os.PathLike, default_name: str) -> Any:
    """A Lightning logger from the ``logger`` config group (``kind``: wandb | csv | none), or ``None``.

    The W&B logger writes under ``save_dir/wandb`` and never prompts (see :func:`wandb_mode`).
    """
    cfg = dict(cfg or {"kind": "none"})
    kind = cfg.get("kind", "none")
    if kind not in LOGGER_KINDS:
        raise ValueError(f"logger.kind must be one of {LOGGER_KINDS}, got {kind!r}")
    save_dir = str(save_dir)
    os.makedirs(save_dir, exist_ok=True)
    name = cfg.get("name") or default_name
    if kind == "none":
        return None
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=save_dir, name=name)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(bool(cfg.get("offline", True)))
    log.info("lq: W&B mode %s, run files under %s", mode, os.path.join(save_dir, "wandb"))
    return WandbLogger(
        project=cfg.get("project", "lq"),
        name=name,
        save_dir=save_dir,
        log_model=bool(cfg.get("log_model", False)),
        mode=mode,
    )


def is_wandb(logger: Any) -> bool:
    """True for a Lightning ``WandbLogger``."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - lightning always ships it
        return False
    return isinstance(logger, WandbLogger)


def as_list(logger: Any) -> list[Any]:
    """``[logger]`` or ``[]`` for ``None``; lists pass through."""
    if logger is None:
        return []
    return list(logger) if isinstance(logger, (list, tuple)) else [logger]


def _safely(logger: Any, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - a logger failing must not lose the results
        log.warning("lq: could not log %s to %s: %s", what, type(logger).__name__, err)


def log_config(loggers: Any, config: Mapping[str, Any]) -> None:
    """Send the (resolved, plain) run config to every logger as hyperparameters."""
    for logger in as_list(loggers):
        _safely(logger, "the config", logger.log_hyperparams, dict(config))


def log_table(
    loggers: Any, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], run_dir: str | None
) -> str | None:
    """Log a table (``wandb.Table`` for W&B) and save it as ``<run_dir>/<key with / as _>.csv``; the CSV path."""
    path = None
    if run_dir is not None:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, key.replace("/", "_") + ".csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(rows)
    for logger in as_list(loggers):
        if is_wandb(logger):
            _safely(logger, key, logger.log_table, key, columns=list(columns), data=[list(r) for r in rows])
    return path


def log_scalars(loggers: Any, metrics: Mapping[str, float], step: int = 0) -> None:
    """Scalars to every logger."""
    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    for logger in as_list(loggers):
        _safely(logger, "scalars", logger.log_metrics, clean, step=step)


def log_image(loggers: Any, key: str, path: str) -> None:
    """A saved PNG to every W&B logger (other loggers: the PNG in the run directory is the record)."""
    for logger in as_list(loggers):
        if is_wandb(logger):
            _safely(logger, key, logger.log_image, key, images=[path])


def finish(loggers: Any) -> None:
    """Flush and close the loggers (ends the W&B run, so a multirun starts a new one per job)."""
    for logger in as_list(loggers):
        _safely(logger, "finalize", logger.finalize, "success")
        if is_wandb(logger):
            import wandb

            if wandb.run is not None:
                _safely(logger, "finish", wandb.finish)


# ---------------------------------------------------------------------------------------------- amax
def amax_summary(model: nn.Module) -> dict[str, tuple[str, int, float, float]]:
    """``{quantizer: (kind, channels, min amax, max amax)}`` for every calibrated quantizer."""
    out = {}
    for name, q in quantizers(model).items():
        if q.mode == "off" or not q.is_calibrated:
            continue
        a = q.amax.detach().float().reshape(-1)
        kind = "weight" if name.endswith("weight_quantizer") else "activation"
        out[name] = (kind, int(a.numel()), float(a.min()), float(a.max()))
    return out


def calibration_label(q: Any) -> str:
    """How a quantizer's range was computed: its calibrator, with the per-layer choice of "layerwise"
    (``layerwise: percentile 99.99``)."""
    name = q.spec.calibrator
    if q.dynamic:
        return "max (dynamic)"
    if name == "layerwise" and q.calib_choice is not None:
        method, pct = q.calib_choice
        return f"layerwise: {method} {pct:g}" if method == "percentile" else f"layerwise: {method}"
    return name


def log_amax(loggers: Any, model: nn.Module, run_dir: str | None, key: str = "lq/amax") -> dict[str, float]:
    """Log the per-layer amax (a table: quantizer, kind, channels, min, max, calibration; scalars for
    activations) and save ``<run_dir>/lq_amax.csv``. Returns ``{activation quantizer: amax}``."""
    summary = amax_summary(model)
    qs = quantizers(model)
    rows = [[n, k, c, lo, hi, calibration_label(qs[n])] for n, (k, c, lo, hi) in summary.items()]
    log_table(loggers, key, ["quantizer", "kind", "channels", "amax_min", "amax_max", "calibration"], rows, run_dir)
    acts = {n: hi for n, (k, _, _, hi) in summary.items() if k == "activation"}
    log_scalars(loggers, {f"{key}/{n}": v for n, v in acts.items()})
    return acts


# -------------------------------------------------------------------------------- Fig. 2 histograms
def histogram_quantizers(model: nn.Module, layers: int | Iterable[str]) -> dict[str, Any]:
    """Activation quantizers holding a histogram: the first ``layers`` of them (an int) or those matching
    any of the globs (a list)."""
    found = {
        n: q
        for n, q in quantizers(model).items()
        if not n.endswith("weight_quantizer")
        and isinstance(q.calibrator, HistogramCalibrator)
        and q.calibrator.has_data
    }
    if isinstance(layers, int):
        return dict(list(found.items())[: max(0, layers)])
    patterns = [str(p) for p in layers]
    return {n: q for n, q in found.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def candidate_ranges(
    calibrator: HistogramCalibrator, percentiles: Iterable[float] = (99.9, 99.99, 99.999), bits: int = 8
) -> dict[str, float]:
    """amax of each method on one histogram: max, entropy, mse and the given percentiles."""
    out = {"max": float(calibrator.compute_amax("max", bits=bits))}
    out["entropy"] = float(calibrator.compute_amax("entropy", bits=bits))
    for p in percentiles:
        out[f"percentile {float(p):g}%"] = float(calibrator.compute_amax("percentile", percentile=float(p), bits=bits))
    out["mse"] = float(calibrator.compute_amax("mse", bits=bits))
    return out


def calibration_histogram_figure(
    counts: torch.Tensor, hist_range: float, ranges: Mapping[str, float], title: str
) -> Any:
    """The paper's Fig. 2: histogram of ``|x|`` (log counts) with each calibrator's amax as a vertical line.
    A ``matplotlib.figure.Figure`` built with the object API (``lq.plots.new_figure``): the process's
    backend, pyplot and rcParams are left alone."""
    from lq.plots import new_figure

    matplotlib = import_extra("matplotlib", "the calibration histograms")

    counts = counts.detach().cpu().double()
    nz = torch.nonzero(counts).flatten()
    last = int(nz.max()) + 1 if nz.numel() else counts.numel()
    width = float(hist_range) / counts.numel()
    shown = counts[:last].numpy()
    fig = new_figure((7, 3.8))
    ax = fig.subplots()
    # one filled step outline (not one bar per bin: 2048 bar patches take seconds to draw)
    ax.stairs(shown, [i * width for i in range(last + 1)], fill=True, color="tab:gray", baseline=0.5)
    ax.set_yscale("log")
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]  # read, never set
    for i, (name, value) in enumerate(ranges.items()):
        ax.axvline(
            value,
            color=colors[i % len(colors)],
            lw=1.4,
            ls="--" if "percentile" in name else "-",
            label=f"{name}: {value:.4g}",
        )
    ax.set_xlabel("|x| (activation magnitude)")
    ax.set_ylabel("count (log)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def log_calibration_histograms(
    loggers: Any,
    model: nn.Module,
    run_dir: str,
    layers: int | Iterable[str] = 4,
    percentiles: Iterable[float] = (99.9, 99.99, 99.999),
    key: str = "lq/calibration_histogram",
    tag: str = "",
) -> dict[str, dict[str, float]]:
    """Fig. 2 for the chosen activation quantizers: PNG ``<run_dir>/lq_hist_<layer>.png`` and a W&B image
    each (``tag`` is appended to the file name and the title, e.g. "gelu10"). Needs histogram statistics
    (activation calibrator entropy / percentile / mse / auto). Returns ``{quantizer: {method: amax}}`` (empty,
    with a log line, when no quantizer holds a histogram)."""
    chosen = histogram_quantizers(model, layers)
    if not chosen:
        log.info("lq: no histogram statistics (max calibration keeps only the maximum): no Fig. 2 plots")
        return {}
    os.makedirs(run_dir, exist_ok=True)
    out = {}
    for name, q in chosen.items():
        ranges = candidate_ranges(q.calibrator, percentiles, q.spec.bits)
        counts, hist_range = q.calibrator.histogram()
        fig = calibration_histogram_figure(
            counts,
            float(hist_range),
            ranges,
            f"{name.removesuffix('.input_quantizer')}{' (' + tag + ')' if tag else ''}: "
            "input |x| and calibrated ranges (Wu et al. 2020, Fig. 2)",
        )
        layer = name.removesuffix(".input_quantizer")
        suffix = f"_{tag}" if tag else ""
        path = os.path.join(run_dir, f"lq_hist_{layer.replace('/', '_')}{suffix}.png")
        fig.savefig(path, dpi=100)
        log_image(loggers, f"{key}/{layer}{suffix}", path)
        out[name] = ranges
    return out


def run_files(run_dir: str | os.PathLike) -> list[Path]:
    """Every file under a run directory (PNGs, CSVs, the W&B offline run), sorted; for users and tests."""
    return sorted(p for p in Path(run_dir).rglob("*") if p.is_file())
