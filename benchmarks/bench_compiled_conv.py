"""Compiled converted convolutions: oneDNN's direct int8 conv vs the graph's im2col + ``torch._int_mm``, per geometry.

``lq.convert(model, compile=True)`` runs a 2-d convolution either as plain graph ops (an int8 im2col fused into
the quantizing loop, then ``torch._int_mm``) or through ``lq::onednn_conv`` (the layer's eager oneDNN kernel),
chosen by ``lq.deploy.onednn_op.prefer_onednn``. This measures both for the 11 convolution geometries of the
Fashion CNN (``lq.models.SmallCNN``) and SmallResNet at several batch sizes, each as a compiled single-layer
model (ReLU -> conv -> ReLU, so the quantization and output stage fuse as in a network), and prints which is
faster next to what the rule picks: the data the rule is fit on, to re-fit on another host class.

    python benchmarks/bench_compiled_conv.py [--batches 4 8 16 32 64] [--threads 2]

Run it on a quiet machine: each cell is the median of 5 rounds of 20 calls, microseconds per call.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

import lq
from lq.deploy import onednn_op
from lq.ops.hardware import onednn_mode

#: (name, in channels, out channels, input size, stride, kernel)
GEOMETRIES = [
    ("cnn conv1", 1, 32, 28, 1, 3), ("cnn conv2", 32, 64, 14, 1, 3), ("cnn conv3", 64, 128, 7, 1, 3),
    ("resnet stem", 1, 16, 28, 1, 3), ("resnet 16->16", 16, 16, 28, 1, 3), ("resnet 16->32 s2", 16, 32, 28, 2, 3),
    ("resnet 32->32", 32, 32, 14, 1, 3), ("resnet 16->32 1x1 s2", 16, 32, 28, 2, 1),
    ("resnet 32->64 s2", 32, 64, 14, 2, 3), ("resnet 64->64", 64, 64, 7, 1, 3), ("resnet 32->64 1x1 s2", 32, 64, 14, 2, 1),
]


def _time(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        model(x)
        model(x)
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(20):
                model(x)
            rounds.append((time.perf_counter() - start) / 20 * 1e6)
    return statistics.median(rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {args.threads} threads, host class {onednn_mode()}")
    print("cells: oneDNN us / im2col+_int_mm us, * = the kernel prefer_onednn picks")
    print("| geometry | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("|---|" + "---:|" * len(args.batches))
    real = onednn_op.prefer_onednn
    right = total = 0
    try:
        for name, cin, cout, size, stride, k in GEOMETRIES:
            torch.manual_seed(0)
            fp = nn.Sequential(nn.ReLU(), nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2), nn.ReLU()).eval()
            x = torch.randn(max(args.batches), cin, size, size)
            lq.quantize(fp, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
            lq.calibrate(fp, [x], num_samples=None, method="max")
            cells = []
            for batch in args.batches:
                xb = x[:batch].contiguous(memory_format=torch.channels_last)
                times = {}
                for use in (True, False):
                    onednn_op.prefer_onednn = lambda *a, use=use: use
                    torch._dynamo.reset()
                    times[use] = _time(lq.convert(copy.deepcopy(fp), compile=True), xb)
                onednn_op.prefer_onednn = real
                out = (size + 2 * (k // 2) - k) // stride + 1
                pick = real(batch * out * out, k * k, cin)
                total += 1
                right += pick == (times[True] < times[False])
                mark = ("*", "") if pick else ("", "*")
                cells.append(f"{times[True]:.0f}{mark[0]} / {times[False]:.0f}{mark[1]}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    finally:
        onednn_op.prefer_onednn = real
        torch._dynamo.reset()
    print(f"\nprefer_onednn picked the faster kernel in {right} of {total} cells")


if __name__ == "__main__":
    main()
