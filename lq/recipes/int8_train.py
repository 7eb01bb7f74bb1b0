"""Runner ``int8_train``: training with int8 compute (``Int8Training``, Zhu et al. 2020) vs fp32.

Both runs start from the same initial weights, the same seed (same batches) and the same schedule (the
``trainer`` group); the int8 run adds the ``quant`` group's callback. Prints test top-1 and the wall-clock
ratio measured in the same process.
"""

from __future__ import annotations

import copy
import logging
import time

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from lq import tracking
from lq.recipes.common import make_callback, make_trainer, print_table, recipe_name, run_dir, setup, start_logger

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Prints the table; returns ``{"fp32": (acc, seconds), "int8": (acc, seconds), "difference", "run_dir"}``."""
    setup(cfg)
    out = run_dir(cfg)
    logger = start_logger(cfg, out)
    results: dict[str, tuple[float, float]] = {}
    try:
        init = instantiate(cfg.model)
        for name in ("fp32", "int8"):
            pl.seed_everything(int(cfg.get("seed", 0)) + 1, workers=True, verbose=False)
            dm = instantiate(cfg.data)
            model = copy.deepcopy(init)
            callbacks = [make_callback(cfg)] if name == "int8" else []
            trainer = make_trainer(cfg, out, logger, callbacks)
            t0 = time.perf_counter()
            trainer.fit(model, datamodule=dm)
            elapsed = time.perf_counter() - t0
            acc = float(trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"])
            results[name] = (acc, elapsed)
            tracking.log_scalars(logger, {f"lq/{name}/test_acc": acc, f"lq/{name}/train_seconds": elapsed})
        (a32, t32), (a8, t8) = results["fp32"], results["int8"]
        rows = [["fp32", a32, t32], ["int8 (Int8Training)", a8, t8]]
        tracking.log_table(logger, "lq/int8_training_results", ["run", "test_acc", "train_seconds"], rows, out)
        tracking.log_scalars(
            logger, {"lq/int8_minus_fp32_points": 100 * (a8 - a32), "lq/time_ratio_int8_fp32": t8 / t32}
        )
    finally:
        tracking.finish(logger)

    print_table(
        f"{recipe_name(cfg)}: {cfg.model.get('arch')} on {type(dm).__name__}, same init/seed/schedule",
        ["run", "top-1", "train time"],
        [["fp32", f"{a32:.2%}", f"{t32:.0f}s"], ["int8 (Int8Training)", f"{a8:.2%}", f"{t8:.0f}s"]],
    )
    print(f"difference {100 * (a8 - a32):+.2f} points; time int8/fp32 {t8 / t32:.2f}x; logs in {out}")
    return {"fp32": results["fp32"], "int8": results["int8"], "difference": a8 - a32, "run_dir": out}
