"""Runner ``ptq_table``: PTQ of a trained model with each activation calibrator, the paper's Table 5 row.

With ``quant.activation.calibrator=auto`` every calibrator in ``candidates`` gets a row: one calibration
pass collects the histograms (``Int8PTQ`` in ``trainer.test``), then each candidate's ranges are read off the
same histograms and the test split is evaluated again. With one calibrator (``max``, ``entropy``,
``percentile``, ``mse``) the table has one int8 row, so a multirun sweeps calibrators one job each.
Logs the config, fp32/int8 metrics, per-layer amax per calibrator and the Fig. 2 histograms.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

import lq
from lq import tracking
from lq.recipes.common import (
    candidate_label,
    make_callback,
    parse_candidate,
    print_table,
    quant_config,
    recipe_name,
    run_dir,
    setup,
    start_logger,
    test_metric,
)

log = logging.getLogger(__name__)

#: the table row of the default calibration (label-free per-layer choice, lq.layer_choice)
LAYERWISE_LABEL = "layerwise (default)"


def run(cfg: DictConfig) -> dict:
    """fp32 vs int8 for each calibrator; prints the table and returns ``{"fp32", "int8": {name: acc}, "best", ...}``."""
    setup(cfg)
    out = run_dir(cfg)
    logger = start_logger(cfg, out)
    try:
        dm = instantiate(cfg.data)
        model = instantiate(cfg.model)
        t0 = time.perf_counter()
        fp32 = test_metric(cfg, out, logger, model, dm)

        spec = cfg.quant.activation
        if spec.calibrator == "auto":
            candidates = [
                parse_candidate(c) for c in cfg.get("candidates") or ["max", "entropy", "percentile_99.99", "mse"]
            ]
            collect = "layerwise"  # the default (per-layer choice) on a histogram: every candidate is read off it
        else:
            candidates = [(str(spec.calibrator), float(spec.percentile) if spec.calibrator == "percentile" else None)]
            collect = str(spec.calibrator)
        callback = make_callback(cfg, quant_config(cfg, calibrator=collect))
        first_acc = test_metric(cfg, out, logger, model, dm, [callback])  # swaps, calibrates, tests

        acts = {n: q for n, q in lq.quantizers(model).items() if not n.endswith("weight_quantizer") and q.mode != "off"}
        results: dict[str, float] = {}
        amax: dict[str, dict[str, float]] = {}
        if collect == "layerwise":  # the default's row first: the ranges Int8PTQ chose per layer, as measured
            results[LAYERWISE_LABEL] = first_acc
            amax[LAYERWISE_LABEL] = {n: float(q.amax.max()) for n, q in acts.items()}
            candidates = [("layerwise", None), *candidates]
        for method, pct in candidates:
            if method == "layerwise":
                continue
            label = candidate_label(method, pct)
            if method == collect and (method != "percentile" or pct == float(spec.percentile)):
                for q in acts.values():
                    q.load_calib_amax(method, percentile=pct)
                acc = first_acc  # the ranges Int8PTQ calibrated: already measured
            else:
                for q in acts.values():
                    q.load_calib_amax(method, percentile=pct)
                acc = test_metric(cfg, out, logger, model, dm, [callback])
            results[label] = acc
            amax[label] = {n: float(q.amax.max()) for n, q in acts.items()}
        elapsed = time.perf_counter() - t0

        best = max(results, key=results.get)
        method, pct = candidates[list(results).index(best)]
        for q in acts.values():  # leave the model on the best calibration for the amax log
            q.load_calib_amax(method, percentile=pct)  # "layerwise": each quantizer's own choice

        rows = [["fp32", fp32, 0.0]] + [[k, v, (v - fp32) / fp32] for k, v in results.items()]
        tracking.log_table(logger, "lq/ptq_results", ["calibration", "test_acc", "relative"], rows, out)
        tracking.log_scalars(
            logger, {"lq/fp32/test_acc": fp32, **{f"lq/int8/{k}/test_acc": v for k, v in results.items()}}
        )
        names = list(acts)
        tracking.log_table(
            logger,
            "lq/amax_per_calibrator",
            ["quantizer", *results],
            [[n, *(amax[k][n] for k in results)] for n in names],
            out,
        )
        tracking.log_amax(logger, model, out)
        hists = tracking.log_calibration_histograms(
            logger, model, out, _layers(cfg), tuple(cfg.tracking.get("percentiles", (99.9, 99.99, 99.999)))
        )
    finally:
        tracking.finish(logger)

    title = (
        f"{recipe_name(cfg)}: {cfg.model.get('arch', type(model).__name__)} on {type(dm).__name__}, "
        f"{cfg.callback.num_samples} calibration samples ({elapsed:.0f}s)"
    )
    print_table(
        title,
        ["calibration", "top-1", "relative"],
        [["fp32", f"{fp32:.2%}", ""]] + [[k, f"{v:.2%}", f"{(v - fp32) / fp32:+.2%}"] for k, v in results.items()],
    )
    print(f"best: {best} ({results[best]:.2%}); plots and tables in {out}")
    return {"fp32": fp32, "int8": results, "best": best, "amax": amax, "histograms": hists, "run_dir": out}


def _layers(cfg: DictConfig) -> Any:
    layers = cfg.tracking.get("histogram_layers", 4)
    return int(layers) if isinstance(layers, int) else [str(x) for x in layers]
