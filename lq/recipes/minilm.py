"""Runner ``minilm``: PTQ of the all-MiniLM-L6-v2 sentence encoder, GELU10 and partial quantization.

Metric: cosine similarity between each sentence's int8 (fake-quant) embedding and its fp32 embedding, on
real sentences never used for calibration (mean and worst sentence). Rows:

1. every Linear int8 with each activation calibrator in ``candidates`` (one histogram pass serves all), with
   the quant config as given (SmoothQuant on by default, ``lq.smooth_quant``), and for
   ``no_smoothquant_candidates`` the same without SmoothQuant (its effect, row by row);
2. the same with GELU10 (``QuantConfig(gelu10=True)``, paper Appendix D) for ``gelu10_candidates``;
   With ``attention_matmuls`` the attention's ``Q K^T`` and ``P V`` are quantized too (``lq.nn.hf_attention``).
3. partial quantization (paper Section 5.1): per-layer sensitivity on the calibration sentences, then the
   most sensitive layers kept in float until the mean cosine is within ``partial.target`` of fp32's 1.0,
   starting from the best row above.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import lq
from lq import tracking
from lq.recipes.common import (
    candidate_label,
    parse_candidate,
    print_table,
    quant_config,
    recipe_name,
    run_dir,
    setup,
    start_logger,
)
from lq.recipes.sentence_encoder import SentenceEncoder
from lq.nn.hf_attention import use_matmul_attention
from lq.smoothing import smoothings

log = logging.getLogger(__name__)


def _cosines(model: SentenceEncoder, sentences: Sequence[str], reference: torch.Tensor, batch: int) -> torch.Tensor:
    return (model.encode(sentences, batch) * reference).sum(1)  # unit vectors: the dot is the cosine


def _calibrated(
    encoder: SentenceEncoder, cfg: DictConfig, gelu10: bool, sentences: Sequence[str], batch: int,
    smoothquant: bool | None = None,
) -> SentenceEncoder:
    """A quantized copy of ``encoder`` with histogram statistics collected on ``sentences`` and the per-layer
    choice made (calibrator "layerwise": every candidate is read off the same histograms). ``smoothquant``:
    override the quant config's."""
    model = copy.deepcopy(encoder)
    config = quant_config(cfg, calibrator="layerwise")
    config.gelu10 = gelu10
    if smoothquant is not None:
        config.smoothquant = smoothquant
    lq.quantize(model, config)
    batches = [model.tokenize(sentences[i : i + batch]) for i in range(0, len(sentences), batch)]
    lq.calibrate(model, batches, num_samples=None, layerwise_scope=str(cfg.get("layerwise_scope", "layer")))
    return model


def _load(model: SentenceEncoder, method: str, pct: float | None) -> None:
    for n, q in lq.quantizers(model).items():
        if not n.endswith("weight_quantizer") and q.mode != "off" and q.calibrator is not None:
            q.load_calib_amax(method, percentile=pct)


def run(cfg: DictConfig) -> dict:
    """Prints the table; returns ``{"rows": {name: (mean cos, min cos)}, "partial": {...}, "run_dir"}``."""
    setup(cfg)
    out = run_dir(cfg)
    logger = start_logger(cfg, out)
    batch = int(cfg.get("batch_size", 16))
    try:
        splits = instantiate(cfg.data)
        calib, evals = splits["calibration"], splits["eval"]
        encoder = instantiate(cfg.model)
        if cfg.get("attention_matmuls", False):  # Q K^T and P V as Matmul modules, quantized like the Linears
            attention = use_matmul_attention(encoder)
            log.info("attention matmuls of %d attention modules are quantized too", len(attention))
        t0 = time.perf_counter()
        ref_eval = encoder.encode(evals, batch)
        ref_calib = encoder.encode(calib, batch)
        rows: dict[str, tuple[float, float]] = {"fp32": (1.0, 1.0)}
        models: dict[str, tuple[SentenceEncoder, tuple[str, float | None]]] = {}

        def score(model: SentenceEncoder, names: Sequence[str], suffix: str = "") -> None:
            """One row per calibration candidate: mean / min cosine to fp32 on the eval sentences."""
            for name in names:
                method, pct = parse_candidate(name)
                _load(model, method, pct)
                c = _cosines(model, evals, ref_eval, batch)
                label = f"PTQ {candidate_label(method, pct)}{suffix}"
                rows[label] = (float(c.mean()), float(c.min()))
                models[label] = (model, (method, pct))

        plain = _calibrated(encoder, cfg, False, calib, batch)
        smooth_on = bool(smoothings(plain))
        score(plain, cfg.candidates, " + SmoothQuant" if smooth_on else "")
        if smooth_on and cfg.get("no_smoothquant_candidates"):
            score(_calibrated(encoder, cfg, False, calib, batch, smoothquant=False), cfg.no_smoothquant_candidates)
        hists = tracking.log_calibration_histograms(
            logger, plain, out, _layers(cfg), tuple(cfg.tracking.get("percentiles", (99.9, 99.99, 99.999)))
        )
        gelu = None
        if cfg.get("gelu10_candidates"):
            gelu = _calibrated(encoder, cfg, True, calib, batch)
            score(gelu, cfg.gelu10_candidates, " + SmoothQuant + GELU10" if smooth_on else " + GELU10")
            tracking.log_calibration_histograms(logger, gelu, out, _layers(cfg), (99.99,), tag="gelu10")

        best = max((k for k in rows if k != "fp32"), key=lambda k: rows[k][0])
        model, (method, pct) = models[best]
        _load(model, method, pct)
        partial = None
        if cfg.get("partial", {}).get("enabled", True):

            def evaluate(m: SentenceEncoder) -> float:
                return float(_cosines(m, calib, ref_calib, batch).mean())

            report = lq.sensitivity(model, evaluate)
            result = lq.partial_quantize(model, evaluate, target=float(cfg.partial.target), report=report)
            c = _cosines(model, evals, ref_eval, batch)
            label = f"{best} + partial ({len(result.skipped)} in float)"
            rows[label] = (float(c.mean()), float(c.min()))
            partial = {
                "from": best,
                "skipped": list(result.skipped),
                "reached": bool(result.reached),
                "cosine": rows[label][0],
                "ranking": report.ranking()[:10],
            }
            tracking.log_table(
                logger,
                "lq/sensitivity",
                ["layer", "cosine_only_this_int8", "relative_drop", "kept_float"],
                [[n, v, d, n in result.skipped] for n, v, d in report.rows()],
                out,
            )
        elapsed = time.perf_counter() - t0
        table = [[k, m, lo] for k, (m, lo) in rows.items()]
        tracking.log_table(logger, "lq/minilm_results", ["model", "mean_cosine", "min_cosine"], table, out)
        tracking.log_scalars(logger, {f"lq/{k}/mean_cosine": m for k, (m, _) in rows.items()})
        tracking.log_amax(logger, model, out)
    finally:
        tracking.finish(logger)

    print_table(
        f"{recipe_name(cfg)}: all-MiniLM-L6-v2, {len(calib)} calibration / {len(evals)} evaluation sentences, "
        f"cosine similarity to fp32 embeddings ({elapsed:.0f}s)",
        ["model", "mean cosine", "min cosine"],
        [[k, f"{m:.4f}", f"{lo:.4f}"] for k, (m, lo) in rows.items()],
    )
    kinds = {"Linear": 0, "Matmul": 0}
    for layer in lq.quantized_layers(model).values():
        kinds["Matmul" if isinstance(layer, lq.nn.Matmul) else "Linear"] += 1
    print(f"int8: {kinds['Linear']} Linear layers and {kinds['Matmul']} attention matmuls (Q K^T, P V); float: softmax, "
          "mask addition, LayerNorm, GELU, embeddings (the paper quantizes the inputs of matrix multiplications only)"
          + ("" if kinds["Matmul"] else "; attention_matmuls=false keeps Q K^T and P V in float too"))
    if partial:
        print(
            f"partial quantization kept in float: {partial['skipped']} (target {cfg.partial.target:g}, "
            f"{'reached' if partial['reached'] else 'NOT reached'}); plots and tables in {out}"
        )
    return {"rows": rows, "best": best, "partial": partial, "histograms": hists, "run_dir": out}


def _layers(cfg: DictConfig) -> Any:
    layers = cfg.tracking.get("histogram_layers", 4)
    return int(layers) if isinstance(layers, int) else [str(x) for x in layers]
