"""Experiment tracking for the recipes: loggers (W&B offline by default), per-layer amax, calibration
histograms with the candidate ranges marked (Wu et al. 2020, Fig. 2), result tables.

Everything is written twice: to the loggers (W&B gets ``wandb.Table`` objects, native charts, images and
artifacts; any logger gets scalars) and to the run directory (PNG and CSV), so users without W&B see the same
plots.

W&B artifacts (:func:`log_artifact`): the ONNX file and the converted model the callbacks export, and the amax
table. An offline run records each artifact in its ``run-<id>.wandb`` file and stages a copy of the file in
wandb's data directory (``WANDB_DATA_DIR``, default ``~/.local/share/wandb``); ``wandb sync <run dir>``
uploads both.

W&B never blocks: without ``WANDB_MODE`` the run is offline unless the caller asks for online *and* wandb's
own credential lookup finds an API key for the configured server (``WANDB_BASE_URL`` or the host stored by
``wandb login --host``; the key from ``WANDB_API_KEY``, the netrc file or wandb's settings), see
:func:`wandb_logged_in`; ``WANDB_SILENT`` defaults to true.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import logging
import math
import netrc
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn

from lq.calib import HistogramCalibrator
from lq.extras import import_extra
from lq.workflow import quantizers

log = logging.getLogger(__name__)

LOGGER_KINDS = ("wandb", "csv", "none")
#: W&B's public server, where the netrc fallback of :func:`wandb_logged_in` also looks
WANDB_HOST = "api.wandb.ai"


# --------------------------------------------------------------------------------------------- loggers
def wandb_base_url() -> str:
    """The W&B server a run would log to: ``$WANDB_BASE_URL``, else wandb's settings (the host ``wandb login
    --host`` stores, or wandb's default server). Reads no network."""
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url
    try:
        from wandb.sdk import wandb_setup

        return str(wandb_setup.singleton().settings.base_url)
    except Exception:  # noqa: BLE001 - wandb absent or its internals moved: W&B's public server
        return f"https://{WANDB_HOST}"


def _wandb_lookup(url: str) -> bool | None:
    """wandb's own credential lookup for ``url`` (what ``wandb.init`` runs before it would prompt): True /
    False, or None when this wandb has neither the lookup of wandb >= 0.22 (``wandb.sdk.lib.wbauth``) nor the
    older ``wandb.sdk.lib.apikey``. No prompt, no network (credentials are not verified against the server)."""
    try:
        from wandb.sdk.lib import wbauth
    except ImportError:
        wbauth = None
    if wbauth is not None and hasattr(wbauth, "authenticate_session"):
        try:
            host = wbauth.HostUrl(url)
            auth = wbauth.authenticate_session(host=host, source="lq", prompt=False, update_session=False)
        except TypeError:  # the private signature changed: try the next way
            pass
        except Exception:  # noqa: BLE001 - a malformed key or URL: wandb.init would fail on it too
            return False
        else:
            same = getattr(getattr(auth, "host", None), "is_same_url", None)
            return auth is not None and (same is None or bool(same(host)))
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import apikey  # wandb < 0.22
    except ImportError:
        return None
    try:
        settings = wandb_setup.singleton().settings
        if str(settings.base_url).rstrip("/") != url.rstrip("/"):
            return None  # its lookup reads the settings' server, not this one: the netrc fallback decides
        return bool(apikey.api_key(settings=settings))
    except Exception:  # noqa: BLE001 - the private API changed: the netrc fallback decides
        return None


def _netrc_has_key(url: str) -> bool:
    """Fallback when wandb's lookup is unavailable: a netrc entry (``$NETRC`` or ``~/.netrc``) with a password
    for ``url``'s host (or W&B's public server for wandb's own default hosts)."""
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        if not os.path.isfile(path):
            return False
        entries = netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        return False
    hosts = [urlsplit(url).netloc or url]
    if "wandb.ai" in url or "coreweave.com" in url:
        hosts.append(WANDB_HOST)
    return any((entries.authenticators(h) or (None, None, None))[2] for h in hosts)


def wandb_logged_in(base_url: str | None = None) -> bool:
    """True when W&B has an API key for the configured server (``base_url``, default :func:`wandb_base_url`:
    ``$WANDB_BASE_URL`` for a self-hosted server). Decided by wandb's own credential lookup (``WANDB_API_KEY``,
    the netrc entry for that host, wandb's settings), as ``wandb.init`` does; where the installed wandb lacks
    that (private) API, ``WANDB_API_KEY`` or a netrc entry for the host. No network, never prompts."""
    url = base_url or wandb_base_url()
    found = _wandb_lookup(url)
    if found is None:
        found = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_key(url)
    return found


def wandb_mode(offline: bool = True) -> str:
    """The W&B mode a run will use: ``$WANDB_MODE`` when set ("offline", "disabled", ...), else "offline"
    unless ``offline=False``. Online (asked either way) needs a login: without one it is "offline", because
    wandb would otherwise stop and prompt for an API key."""
    env = os.environ.get("WANDB_MODE")
    wanted = env if env else ("offline" if offline else "online")
    if wanted in ("online", "run") and not wandb_logged_in():
        log.warning(
            "lq: W&B online requested but no API key for %s (wandb login [--host URL] / WANDB_API_KEY): "
            "logging offline",
            wandb_base_url(),
        )
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


def wandb_loggers(loggers: Any) -> list[Any]:
    """The Lightning ``WandbLogger`` objects among ``loggers`` (a logger, a list, or None)."""
    return [logger for logger in as_list(loggers) if is_wandb(logger)]


def artifact_name(name: str) -> str:
    """``name`` as a valid W&B artifact name (letters, digits, ``-``, ``_``, ``.``; other runs become ``-``)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-.")
    return clean or "lq"


def log_artifact(
    loggers: Any,
    path: str | os.PathLike,
    name: str,
    type: str,  # noqa: A002 - W&B's own word
    metadata: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> list[str]:
    """Log the file at ``path`` as a W&B artifact ``<name>-<run id>`` of kind ``type`` (W&B's convention for
    per-run artifacts, as Lightning's ``log_model``) to every ``WandbLogger`` among ``loggers``; the file's
    sha256 goes into the metadata. Other loggers get nothing (the file on disk is the record); without wandb,
    or with a disabled W&B run, nothing happens. An offline run records the artifact in its ``.wandb`` file
    and stages a copy of the file (``wandb sync`` uploads both). Never raises: a failing logger is a warning.
    Returns the names of the artifacts logged."""
    path = Path(path)
    targets = wandb_loggers(loggers)
    if not targets:
        return []
    if not path.is_file():
        log.warning("lq: no W&B artifact %s: %s is not a file", name, path)
        return []
    import wandb

    sha = hashlib.sha256()
    with open(path, "rb") as f:  # in blocks: a converted model can be large
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    digest = sha.hexdigest()
    logged = []
    for logger in targets:
        try:
            run = logger.experiment
            run_id = getattr(run, "id", None)
            full = artifact_name(f"{name}-{run_id}" if isinstance(run_id, str) and run_id else name)
            artifact = wandb.Artifact(
                full, type=type, description=description, metadata={**dict(metadata or {}), "sha256": digest}
            )
            artifact.add_file(str(path), name=path.name)
            run.log_artifact(artifact)
        except Exception as err:  # noqa: BLE001 - a logger failing must not lose the results
            log.warning("lq: could not log artifact %s to %s: %s", name, logger.__class__.__name__, err)
        else:
            logged.append(full)
    return logged


def log_bar_chart(
    loggers: Any,
    key: str,
    labels: Sequence[str],
    values: Sequence[float],
    label_column: str,
    value_column: str,
    title: str,
    step: int | None = None,
) -> None:
    """A native W&B bar chart (``wandb.plot.bar`` over a two-column ``wandb.Table``) to every W&B logger."""
    rows = [[str(a), float(b)] for a, b in zip(labels, values)]
    _log_table_plot(loggers, key, label_column, value_column, rows, "bar", title, step)


def log_line_chart(
    loggers: Any,
    key: str,
    xs: Sequence[float],
    ys: Sequence[float],
    x_column: str,
    y_column: str,
    title: str,
    step: int | None = None,
) -> None:
    """A native W&B line chart (``wandb.plot.line`` over a two-column ``wandb.Table``) to every W&B logger."""
    rows = [[float(a), float(b)] for a, b in zip(xs, ys)]
    _log_table_plot(loggers, key, x_column, y_column, rows, "line", title, step)


def _log_table_plot(loggers: Any, key: str, x_column: str, y_column: str, rows: list[list[Any]], kind: str,
                    title: str, step: int | None) -> None:
    """``wandb.plot.<kind>`` (bar / line) over a two-column ``wandb.Table`` of ``rows``, to every W&B logger."""
    for logger in wandb_loggers(loggers):
        import wandb

        def send(logger: Any = logger) -> None:
            table = wandb.Table(columns=[x_column, y_column], data=rows)
            plot = getattr(wandb.plot, kind)(table, x_column, y_column, title=title)
            logger.log_metrics({key: plot}, step=step)

        _safely(logger, key, send)


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
    (``layerwise: percentile 99.99``), and `` + SmoothQuant`` for the input of a smoothed layer (of ``x / s``)."""
    name = q.spec.calibrator
    smooth = " + SmoothQuant" if getattr(q, "smoothing", None) is not None else ""
    if q.dynamic:
        return "max (dynamic)"
    if name == "layerwise" and q.calib_choice is not None:
        method, pct = q.calib_choice
        return (f"layerwise: {method} {pct:g}" if method == "percentile" else f"layerwise: {method}") + smooth
    return name + smooth


def log_amax(loggers: Any, model: nn.Module, run_dir: str | None, key: str = "lq/amax") -> dict[str, float]:
    """Log the per-layer amax (a table: quantizer, kind, channels, min, max, calibration; scalars for
    activations) and save ``<run_dir>/lq_amax.csv``, also a W&B artifact ``lq-amax-<run id>`` (type
    "amax-table") for W&B loggers. Returns ``{activation quantizer: amax}``."""
    summary = amax_summary(model)
    qs = quantizers(model)
    rows = [[n, k, c, lo, hi, calibration_label(qs[n])] for n, (k, c, lo, hi) in summary.items()]
    path = log_table(
        loggers, key, ["quantizer", "kind", "channels", "amax_min", "amax_max", "calibration"], rows, run_dir
    )
    if path is not None:  # the CSV as a W&B artifact (the calibrated ranges that go with an exported model)
        log_artifact(loggers, path, artifact_name(key.replace("/", "-")), "amax-table", {"quantizers": len(rows)})
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


#: the most bins a ``wandb.Histogram`` holds
WANDB_MAX_BINS = 512


def histogram_for_wandb(
    counts: torch.Tensor, hist_range: float, max_bins: int = WANDB_MAX_BINS
) -> tuple[list[float], list[float]]:
    """``(counts, bin edges)`` of a calibration histogram (``|x|`` in ``[0, hist_range)``, equal bins) cut after
    its last non-empty bin and merged by whole groups of adjacent bins to at most ``max_bins`` bins: the
    ``np_histogram`` a ``wandb.Histogram`` takes. Counts are preserved (the sum is the same)."""
    counts = counts.detach().cpu().double()
    counts = counts.reshape(-1, counts.shape[-1]).sum(0)  # per-channel histograms (same bins): their sum
    nz = torch.nonzero(counts).flatten()
    last = int(nz.max()) + 1 if nz.numel() else 1
    width = float(hist_range) / counts.numel()
    group = max(1, math.ceil(last / max_bins))
    n = math.ceil(last / group)
    padded = torch.zeros(n * group, dtype=torch.float64)
    padded[:last] = counts[:last]
    merged = padded.reshape(n, group).sum(1)
    return merged.tolist(), [i * group * width for i in range(n + 1)]


def log_calibration_charts(
    loggers: Any, key: str, counts: torch.Tensor, hist_range: float, ranges: Mapping[str, float], title: str
) -> None:
    """Fig. 2 as native W&B charts, for every W&B logger: ``<key>/histogram`` (a ``wandb.Histogram`` of ``|x|``,
    at most 512 bins), ``<key>/log_counts`` (a line chart of log10(count + 1) over ``|x|``: the PNG's log
    scale, where the tails that decide the ranges are visible) and ``<key>/ranges`` (a table: calibrator,
    amax, the candidate ranges drawn as lines on the PNG)."""
    targets = wandb_loggers(loggers)
    if not targets:
        return
    import wandb

    values, edges = histogram_for_wandb(counts, hist_range)
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    for logger in targets:

        def send(logger: Any = logger) -> None:
            hist = wandb.Histogram(np_histogram=(values, edges))
            line = wandb.Table(
                columns=["abs_x", "log10_count"], data=[[c, math.log10(v + 1.0)] for c, v in zip(centres, values)]
            )
            table = wandb.Table(columns=["calibrator", "amax"], data=[[k, float(v)] for k, v in ranges.items()])
            logger.log_metrics(
                {
                    f"{key}/histogram": hist,
                    f"{key}/log_counts": wandb.plot.line(line, "abs_x", "log10_count", title=title),
                    f"{key}/ranges": table,
                },
                step=None,
            )

        _safely(logger, key, send)


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
    each, and for W&B the native charts of :func:`log_calibration_charts` under ``<key>/<layer>``
    (``tag`` is appended to the file name, the keys and the title, e.g. "gelu10"). Needs histogram statistics
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
        layer = name.removesuffix(".input_quantizer")
        suffix = f"_{tag}" if tag else ""
        title = f"{layer}{' (' + tag + ')' if tag else ''}: input |x| and calibrated ranges (Wu et al. 2020, Fig. 2)"
        log_calibration_charts(loggers, f"{key}/{layer}{suffix}", counts, float(hist_range), ranges, title)
        fig = calibration_histogram_figure(counts, float(hist_range), ranges, title)
        path = os.path.join(run_dir, f"lq_hist_{layer.replace('/', '_')}{suffix}.png")
        fig.savefig(path, dpi=100)
        log_image(loggers, f"{key}/{layer}{suffix}", path)
        out[name] = ranges
    return out


def run_files(run_dir: str | os.PathLike) -> list[Path]:
    """Every file under a run directory (PNGs, CSVs, the W&B offline run), sorted; for users and tests."""
    return sorted(p for p in Path(run_dir).rglob("*") if p.is_file())
