"""Int8 training from scratch vs fp32, same seed and schedule (issue 4, Zhu et al. 2020).

    python benchmarks/int8_training.py --arch mlp --data mnist --epochs 2
    python benchmarks/int8_training.py --arch small_resnet --data fashion_mnist --epochs 2 --limit-train 20000

Both runs start from the same initial weights and see the same batches; the int8 run uses Int8Training
(every Linear/Conv2d: int8 forward, int8 grad_input and grad_weight, quantized output gradients with
direction-sensitive clipping). Prints top-1 on the test split and the wall-clock ratio.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings

import lightning.pytorch as pl
import torch

from lq.callbacks import Int8Training
from lq.data import get_datamodule
from lq.models import LitClassifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mlp", choices=["mlp", "small_cnn", "small_resnet"])
    p.add_argument("--data", default="mnist", choices=["mnist", "fashion_mnist"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--root", default="outputs/int8_training")
    args = p.parse_args()
    logging.getLogger("lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(2)
    pl.seed_everything(0)
    init = LitClassifier(arch=args.arch, lr=args.lr, scheduler="cosine")
    results = {}
    for name, callbacks in (("fp32", []), ("int8", [Int8Training()])):
        pl.seed_everything(1)
        dm = get_datamodule(args.data, batch_size=128, limit_train=args.limit_train)
        model = copy.deepcopy(init)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                             default_root_dir=args.root)
        t0 = time.perf_counter()
        trainer.fit(model, dm)
        elapsed = time.perf_counter() - t0
        acc = trainer.test(model, dm, verbose=False)[0]["test_acc"]
        results[name] = (acc, elapsed)
        print(f"{name}: test top-1 {acc:.4f}, training {elapsed:.0f}s")
    (a32, t32), (a8, t8) = results["fp32"], results["int8"]
    print(f"\n{args.arch} on {args.data}, {args.epochs} epochs (limit_train={args.limit_train}), same seed/schedule")
    print(f"fp32 {a32:.2%}  int8 {a8:.2%}  difference {100 * (a8 - a32):+.2f} points (target within 1.00)")
    print(f"training time int8 / fp32: {t8 / t32:.2f}x")


if __name__ == "__main__":
    main()
