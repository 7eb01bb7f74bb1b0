"""Runner ``workflow``: the paper's Fig. 5 end to end on a model trained here (Wu et al. 2020, Section 6).

1. fp32 training (the ``trainer`` group: ``trainer.max_epochs``), test accuracy.
2. BN folding (Appendix C) when ``fold_bn``, then PTQ (``Int8PTQ`` in ``trainer.test``) with each calibrator in
   ``calibrators``; then, for each of ``ptq_variants`` (``equalize``, ``bias_correction``,
   ``equalize+bias_correction``: Nagel et al. 2019), PTQ with the first calibrator and that correction.
3. Sensitivity + partial quantization (``Int8Sensitivity`` on the validation split) from the best PTQ.
4. QAT (the ``quant`` group's callback, ``Int8QAT``) from the best PTQ calibration for ``qat_fraction`` of the
   fp32 steps (or ``qat_steps``), with the paper's schedule (Appendix A.2).
Accuracy is top-1 on the test split; relative = (int8 - fp32) / fp32.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

import lq
from lq import tracking
from lq.callbacks import Int8PTQ, Int8Sensitivity
from lq.recipes.common import (
    candidate_label,
    make_callback,
    make_trainer,
    parse_candidate,
    parse_variant,
    print_table,
    quant_config,
    recipe_name,
    run_dir,
    setup,
    start_logger,
    test_metric,
)

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Prints the table; returns ``{"rows": {name: test_acc}, "skipped": [...], "best_ptq", "run_dir"}``."""
    setup(cfg)
    out = run_dir(cfg)
    logger = start_logger(cfg, out)
    num_samples = int(cfg.callback.num_samples)
    cpu_malloc = bool(cfg.callback.get("cpu_malloc", False))  # the quant group's choice, for every lq callback here
    try:
        dm = instantiate(cfg.data)
        model = instantiate(cfg.model)
        t0 = time.perf_counter()
        trainer = make_trainer(cfg, out, logger)
        trainer.fit(model, datamodule=dm)
        fp32_steps = trainer.global_step
        fp32 = test_metric(cfg, out, logger, model, dm)
        rows: dict[str, float] = {"fp32": fp32}
        timings = {"fp32 training": time.perf_counter() - t0}

        folded = copy.deepcopy(model).eval()
        if cfg.get("fold_bn", True):
            pairs = lq.fold_bn(folded)
            rows[f"fp32, {len(pairs)} BN folded"] = test_metric(cfg, out, logger, folded, dm)

        def run_ptq(method: str, pct: float | None, **flags: bool) -> tuple[float, Any]:
            """PTQ of a copy of the folded model with this calibrator (and QuantConfig flags): accuracy, model."""
            m = copy.deepcopy(folded)
            qcfg = quant_config(cfg, calibrator=method, **({"percentile": pct} if pct else {}))
            for flag, value in flags.items():
                setattr(qcfg, flag, value)
            callback = Int8PTQ(qcfg, num_samples=num_samples, cpu_malloc=cpu_malloc)
            return test_metric(cfg, out, logger, m, dm, [callback]), m

        ptq: dict[str, tuple[float, Any, tuple[str, float | None]]] = {}
        for name in cfg.calibrators:
            method, pct = parse_candidate(name)
            acc, m = run_ptq(method, pct)
            label = f"PTQ {candidate_label(method, pct)}"
            ptq[label] = (acc, m, (method, pct))
            rows[label] = acc
        # Nagel et al. 2019's two data-free corrections, each apart and both, on the first calibrator's PTQ
        base_method, base_pct = parse_candidate(cfg.calibrators[0])
        for variant in cfg.get("ptq_variants") or []:
            acc, _ = run_ptq(base_method, base_pct, **parse_variant(variant))
            rows[f"PTQ {candidate_label(base_method, base_pct)} + {variant}"] = acc
        best = max(ptq, key=lambda k: ptq[k][0])
        best_acc, best_model, (best_method, best_pct) = ptq[best]
        tracking.log_amax(logger, best_model, out)
        # Fig. 2 needs histogram statistics: from the best PTQ model that has them (max keeps only the maximum)
        hist_model = next((v[1] for v in sorted(ptq.values(), key=lambda v: -v[0]) if v[2][0] != "max"), best_model)
        tracking.log_calibration_histograms(
            logger, hist_model, out, _layers(cfg), tuple(cfg.tracking.get("percentiles", (99.9, 99.99, 99.999)))
        )

        sens_cfg = cfg.get("sensitivity", {})
        sens = Int8Sensitivity(
            monitor="val_acc",
            target=float(sens_cfg.get("target", 0.005)),
            limit_batches=sens_cfg.get("limit_batches", 1.0),
            cpu_malloc=cpu_malloc,
        )
        make_trainer(cfg, out, logger, [sens]).validate(best_model, datamodule=dm, verbose=False)
        skipped = list(sens.result.skipped) if sens.result else []
        rows[f"{best} + partial ({len(skipped)} in float)"] = test_metric(cfg, out, logger, best_model, dm)

        qat_model = copy.deepcopy(model)
        qat_steps = int(cfg.get("qat_steps") or max(1, round(fp32_steps * float(cfg.get("qat_fraction", 0.1)))))
        qcfg = quant_config(cfg, calibrator=best_method, **({"percentile": best_pct} if best_pct else {}))
        t1 = time.perf_counter()
        make_trainer(cfg, out, logger, [make_callback(cfg, qcfg)], max_steps=qat_steps, max_epochs=-1).fit(
            qat_model, datamodule=dm
        )
        timings["QAT"] = time.perf_counter() - t1
        rows[f"QAT {qat_steps} steps from PTQ {candidate_label(best_method, best_pct)}"] = test_metric(
            cfg, out, logger, qat_model, dm
        )

        table = [[k, v, (v - fp32) / fp32] for k, v in rows.items()]
        tracking.log_table(logger, "lq/workflow_results", ["model", "test_acc", "relative"], table, out)
        tracking.log_scalars(logger, {f"lq/{k}/test_acc": v for k, v in rows.items()})
    finally:
        tracking.finish(logger)

    print_table(
        f"{recipe_name(cfg)}: {cfg.model.get('arch')} on {type(dm).__name__}, fp32 {fp32_steps} steps "
        f"({timings['fp32 training']:.0f}s), QAT {qat_steps} steps ({timings['QAT']:.0f}s)",
        ["model", "top-1", "relative"],
        [[k, f"{v:.2%}", f"{(v - fp32) / fp32:+.2%}"] for k, v in rows.items()],
    )
    print(f"kept in float by partial quantization: {skipped}; plots and tables in {out}")
    return {
        "rows": rows,
        "skipped": skipped,
        "best_ptq": best,
        "fp32_steps": fp32_steps,
        "qat_steps": qat_steps,
        "run_dir": out,
    }


def _layers(cfg: DictConfig) -> Any:
    layers = cfg.tracking.get("histogram_layers", 4)
    return int(layers) if isinstance(layers, int) else [str(x) for x in layers]
