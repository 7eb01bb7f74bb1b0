"""PTQ of the pretrained MNIST CNN with every calibrator (the paper's Table 5 row for this model).

    python benchmarks/ptq_mnist.py [--num-samples 1024]

Weights per-channel max, activations per-tensor with each calibrator, 1024 calibration samples from the
MNIST train split, top-1 on the full 10k test split. Prints fp32 vs int8 and the relative change.
"""

from __future__ import annotations

import argparse
import time

import torch

import lq
from lq.data import load_split
from lq.models import pretrained_mnist_cnn

CANDIDATES = [("max", None), ("entropy", None), ("percentile", 99.9), ("percentile", 99.99),
              ("percentile", 99.999), ("percentile", 99.9999), ("mse", None)]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=1024)
    args = p.parse_args()
    torch.manual_seed(0)
    x_train, _ = load_split("mnist", "train")
    x_test, y_test = load_split("mnist", "test")
    calib = x_train[torch.randperm(len(x_train))[: args.num_samples]]
    fp32 = accuracy(pretrained_mnist_cnn(), x_test, y_test)
    model = lq.quantize(pretrained_mnist_cnn(), lq.QuantConfig(activation=lq.QuantSpec(calibrator="entropy")))
    t0 = time.perf_counter()
    lq.calibrate(model, calib.split(256), num_samples=None)  # one histogram pass serves every method
    t_cal = time.perf_counter() - t0
    rows = []
    for method, pct in CANDIDATES:
        for q in lq.quantizers(model).values():
            if not q.dynamic:
                q.load_calib_amax(method, percentile=pct)
        acc = accuracy(model, x_test, y_test)
        rows.append((f"{method}" + (f" {pct:g}%" if pct else ""), acc))
    print(f"MNIST CNN (ccexam), {args.num_samples} calibration samples, 10k test split; calibration pass {t_cal:.2f}s")
    print(f"{'calibration':<20}{'top-1':>8}{'relative':>10}")
    print(f"{'fp32':<20}{fp32:>8.2%}{'':>10}")
    for name, acc in rows:
        print(f"{name:<20}{acc:>8.2%}{(acc - fp32) / fp32:>+10.2%}")
    best = max(rows, key=lambda r: r[1])
    print(f"best: {best[0]} ({best[1]:.2%})")


if __name__ == "__main__":
    main()
