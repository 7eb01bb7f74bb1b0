"""The paper's Fig. 5 workflow end to end on real data: Fashion-MNIST, SmallCNN with BatchNorm.

    python benchmarks/fashion_workflow.py [--epochs 3]

1. fp32 training (SGD, cosine) for --epochs epochs.
2. PTQ: fold_bn (Appendix C), then each calibrator (Int8PTQ in trainer.test), 1024 calibration samples.
3. Sensitivity + partial quantization (Int8Sensitivity on the validation split).
4. QAT (Int8QAT) from the best PTQ calibration for ~10% of the fp32 steps, paper schedule (Appendix A.2).
Accuracy is top-1 on the 10k test split; relative = (int8 - fp32) / fp32.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings

import lightning.pytorch as pl
import torch

import lq
from lq.callbacks import Int8PTQ, Int8QAT, Int8Sensitivity
from lq.data import FashionMNISTDataModule
from lq.models import LitClassifier

CALIBRATORS = [("max", None), ("entropy", None), ("percentile", 99.99), ("percentile", 99.999), ("mse", None)]


def make_trainer(root: str, callbacks=(), **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=root)
    args.update(kw)
    return pl.Trainer(callbacks=list(callbacks), **args)


def test_acc(module, dm, root, callbacks=()) -> float:
    return make_trainer(root, callbacks).test(module, dm, verbose=False)[0]["test_acc"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--root", default="outputs/fashion_workflow")
    p.add_argument("--fp32-ckpt", default=None, help="reuse an fp32 model saved by an earlier run (skips step 1)")
    args = p.parse_args()
    logging.getLogger("lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(2)
    pl.seed_everything(0)
    dm = FashionMNISTDataModule(batch_size=128)
    t0 = time.time()
    model = LitClassifier(arch="small_cnn", arch_kwargs={"width": args.width}, lr=0.1, scheduler="cosine")
    if args.fp32_ckpt:
        saved = torch.load(args.fp32_ckpt, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        fp32_steps = int(saved["steps"])
    else:
        trainer = make_trainer(args.root, max_epochs=args.epochs)
        trainer.fit(model, dm)
        fp32_steps = trainer.global_step
        torch.save({"state_dict": model.state_dict(), "steps": fp32_steps}, f"{args.root}/fp32.pt")
    fp32 = test_acc(model, dm, args.root)
    print(f"fp32: {fp32:.4f} after {args.epochs} epochs ({fp32_steps} steps, {time.time() - t0:.0f}s)")
    rows = [("fp32", fp32)]

    folded = copy.deepcopy(model).eval()
    pairs = lq.fold_bn(folded)
    fp32_folded = test_acc(folded, dm, args.root)
    rows.append((f"fp32, {len(pairs)} BN folded", fp32_folded))
    ptq = {}
    for method, pct in CALIBRATORS:
        m = copy.deepcopy(folded)
        cfg = lq.QuantConfig(activation=lq.QuantSpec(calibrator=method, percentile=pct or 99.99))
        acc = test_acc(m, dm, args.root, [Int8PTQ(cfg, num_samples=1024)])
        name = f"PTQ {method}" + (f" {pct:g}%" if pct else "")
        ptq[(method, pct)] = (acc, m)
        rows.append((name, acc))
    (best_method, best_pct), (best_acc, best_model) = max(ptq.items(), key=lambda kv: kv[1][0])

    # Sensitivity + partial quantization where PTQ lost most (the paper's Table 6 situation), and on the best.
    (worst_method, worst_pct), (_, worst_model) = min(ptq.items(), key=lambda kv: kv[1][0])
    for label, m in (("worst", worst_model), ("best", best_model)):
        sens = Int8Sensitivity(monitor="val_acc", target=0.005)
        make_trainer(args.root, [sens]).validate(m, dm, verbose=False)
        name = worst_method if label == "worst" else best_method
        rows.append((f"PTQ {name} + partial ({len(sens.result.skipped)} in float: {','.join(sens.result.skipped)})",
                     test_acc(m, dm, args.root)))

    qat_model = copy.deepcopy(model)
    qat_steps = max(1, fp32_steps // 10)
    cfg = lq.QuantConfig(activation=lq.QuantSpec(calibrator=best_method, percentile=best_pct or 99.99))
    t1 = time.time()
    make_trainer(args.root, [Int8QAT(cfg, num_samples=1024)], max_steps=qat_steps).fit(qat_model, dm)
    rows.append((f"QAT {qat_steps} steps from PTQ {best_method}", test_acc(qat_model, dm, args.root)))
    print(f"QAT took {time.time() - t1:.0f}s")

    print(f"\nFashion-MNIST SmallCNN(width={args.width}, BN), test split 10k")
    print(f"{'model':<44}{'top-1':>8}{'relative':>10}")
    for name, acc in rows:
        print(f"{name:<44}{acc:>8.2%}{(acc - fp32) / fp32:>+10.2%}")


if __name__ == "__main__":
    main()
