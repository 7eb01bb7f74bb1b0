"""Figures and tables for people: the sensitivity chart (paper Fig. 3), logged to the trainer's loggers
(W&B gets a table, native bar and line charts and the image; any logger gets scalars) and saved as PNG for
users without W&B.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure`` on an Agg canvas), never
pyplot: pyplot would pick or switch the process's backend (breaking a notebook's inline plots) and keep
every figure in its global registry until closed. ``matplotlib.rcParams`` are read (colours), never set.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lq.extras import import_extra
from lq.tracking import log_bar_chart, log_line_chart
from lq.workflow import PartialQuantization, SensitivityReport

log = logging.getLogger(__name__)


def new_figure(figsize: tuple[float, float]) -> Any:
    """A ``matplotlib.figure.Figure`` with its own Agg canvas: no pyplot, no backend switch, nothing global
    (the figure is garbage-collected like any object; ``fig.savefig`` writes PNG)."""
    canvas = import_extra("matplotlib.backends.backend_agg", "lq's charts").FigureCanvasAgg
    fig = import_extra("matplotlib.figure", "lq's charts").Figure(figsize=figsize)
    canvas(fig)
    return fig


#: inches added to the right of the sensitivity chart for its legend (outside the axes, never over a bar)
LEGEND_WIDTH = 2.0


def sensitivity_ylim(values: list[float], lines: list[float]) -> tuple[float, float]:
    """The y range of the sensitivity chart: every bar top, every point of the partial-quantization line and
    both reference lines (fp32, all int8) inside, with a margin of 8% of their spread on each side (so a line
    at the bottom or top is never on the frame)."""
    ys = [float(v) for v in values + lines]
    lo, hi = min(ys), max(ys)
    pad = 0.08 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 1e-3)
    return lo - pad, hi + pad


def sensitivity_figure(report: SensitivityReport, result: PartialQuantization | None, metric: str, top: int = 20):
    """Bars: the metric with only each layer quantized (most sensitive first); line: the metric with that
    layer and all to its left kept in float (partial quantization), as in the paper's Fig. 3; dashed: fp32,
    dotted: all layers int8. The y axis holds all of them (:func:`sensitivity_ylim`, whatever the metric's
    direction), and the legend sits outside the axes, to the right, so it never covers a bar. Returns a
    ``matplotlib.figure.Figure`` (object API: the process's backend and pyplot state are left alone)."""
    names = report.ranking()[:top]
    values = [report.layers[n] for n in names]
    fig = new_figure((max(6, 0.45 * len(names) + 2) + LEGEND_WIDTH, 4.5))
    ax = fig.subplots()
    ax.bar(range(len(names)), values, color="tab:blue", label="only this layer quantized")
    partial: list[float] = []
    if result is not None and len(result.history) > 1:
        points = [(k, v) for k, v in result.history[1:] if k <= len(names)]
        partial = [v for _, v in points]
        ax.plot([k - 1 for k, _ in points], partial, "o-", color="tab:orange", label="this and left in float")
    ax.axhline(report.fp32, color="k", ls="--", lw=1, label=f"fp32 {report.fp32:.4f}")
    ax.axhline(report.int8, color="tab:red", ls=":", lw=1.4, label=f"all int8 {report.int8:.4f}")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(*sensitivity_ylim(values + partial, [report.fp32, report.int8]))
    ax.set_ylabel(metric)
    ax.set_title("Per-layer sensitivity (Wu et al. 2020, Fig. 3)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def _log_dir(trainer: Any) -> str:
    d = getattr(trainer, "log_dir", None) or trainer.default_root_dir
    os.makedirs(d, exist_ok=True)
    return d


def log_sensitivity(
    trainer: Any, report: SensitivityReport, result: PartialQuantization | None, metric: str
) -> str | None:
    """Save the chart as PNG in the run's log dir and send table/image/scalars to the loggers; W&B also gets
    the chart natively: ``lq/sensitivity_bar`` (``wandb.plot.bar``, the metric with only each layer quantized,
    most sensitive first) and ``lq/partial_quantization`` (``wandb.plot.line``, the metric against the number
    of layers kept in float). Returns the PNG path, or None without matplotlib (``lq[plots]``): then the
    table, the native charts and the scalars go out."""
    try:
        fig = sensitivity_figure(report, result, metric)
    except ImportError as err:
        if err.name != "matplotlib":
            raise
        log.warning("lq: no sensitivity chart (%s); the table and scalars are logged", err)
        path = None
    else:
        path = os.path.join(_log_dir(trainer), "lq_sensitivity.png")
        fig.savefig(path, dpi=110)
    rows = [[n, v, d, n in (result.skipped if result else [])] for n, v, d in report.rows()]
    for logger in trainer.loggers:
        try:
            from lightning.pytorch.loggers import WandbLogger

            if isinstance(logger, WandbLogger):
                logger.log_table("lq/sensitivity", columns=["layer", metric, "relative_drop", "kept_float"], data=rows)
                if path is not None:
                    logger.log_image("lq/sensitivity_chart", images=[path])
                step = trainer.global_step
                names = report.ranking()
                log_bar_chart(logger, "lq/sensitivity_bar", names, [report.layers[n] for n in names], "layer",
                              metric, f"{metric} with only this layer quantized (fp32 {report.fp32:.4f}, all int8 "
                              f"{report.int8:.4f})", step=step)
                if result is not None and result.history:
                    log_line_chart(logger, "lq/partial_quantization", [k for k, _ in result.history],
                                   [v for _, v in result.history], "layers_in_float", metric,
                                   f"{metric} with the most sensitive layers in float (partial quantization)",
                                   step=step)
            scalars = {f"lq/sensitivity/{n}": v for n, v, _ in report.rows()}
            scalars.update({"lq/fp32": report.fp32, "lq/int8": report.int8})
            if result is not None:
                scalars.update({"lq/partial_int8": result.metric, "lq/skipped_layers": float(len(result.skipped))})
            logger.log_metrics(scalars, step=trainer.global_step)
        except Exception as err:  # noqa: BLE001 - a logger failing must not lose the analysis
            log.warning("lq: could not log sensitivity to %s: %s", type(logger).__name__, err)
    if path is not None:
        log.info("lq: sensitivity chart saved to %s", path)
    return path
