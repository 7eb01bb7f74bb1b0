"""Cost of fake quantization (issue 2 "Numbers"), as ratios measured in one run, 2 threads.

    python benchmarks/bench_fake_quant.py [--repeats 20] [--threads 1] [--default-malloc]

1. QAT training step (forward + backward + SGD step) of a ResNet-like conv net with fake-quantized inputs
   and weights vs the same step in fp32. Target <= 1.2x.
2. Entropy calibration (histogram collection on every quantized input) over 1024 samples vs the plain
   forward passes over the same samples. Target <= 1.5x. The default "layerwise" calibration (histograms,
   then the per-layer choice scored on 256 replayed samples) vs that calibration pass: target <= 3x.
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved, train_step

import lq
from lq.cpu_memory import keep_freed_cpu_memory
from lq.models import SmallResNet


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc settings alone (lq callbacks with cpu_malloc=True apply lq.cpu_memory on CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # What the lq callbacks do on CPU with cpu_malloc=True (see lq/cpu_memory.py); held to the process end.
    kept = False if args.default_malloc else keep_freed_cpu_memory()
    print(f"threads {args.threads}; lq.cpu_memory.keep_freed_cpu_memory applied: {kept}")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    fp32 = SmallResNet(widths=tuple(args.widths)).train()
    qat = SmallResNet(widths=tuple(args.widths)).train()
    qat.load_state_dict(fp32.state_dict())
    lq.quantize(qat, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
    lq.calibrate(qat, [x], method="max")

    t_fp32, t_qat = (
        interleaved({"fp32": train_step(fp32, x, y), "qat": train_step(qat, x, y)}, args.repeats, warmup=3).values()
    )
    print(f"SmallResNet widths={args.widths}, batch {args.batch}, {len(lq.quantized_layers(qat))} quantized layers")
    print(f"  train step fp32 {t_fp32 * 1e3:.1f} ms, fake-quant {t_qat * 1e3:.1f} ms: ratio {t_qat / t_fp32:.2f}x (target <= 1.2x)")

    data = torch.randn(1024, 1, 28, 28).split(args.batch)
    calib_model = SmallResNet(widths=tuple(args.widths)).eval()
    lq.quantize(calib_model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="entropy")))

    def plain():
        with torch.no_grad(), lq.quantization_disabled(calib_model):
            for b in data:
                calib_model(b)

    def entropy():
        lq.calibrate(calib_model, data, num_samples=1024, method="entropy")

    def layerwise():  # the default: histograms + the per-layer choice scored on 256 replayed samples
        lq.calibrate(calib_model, data, num_samples=1024, method="layerwise")

    t_plain, t_ent, t_lw = interleaved(
        {"plain": plain, "entropy": entropy, "layerwise": layerwise}, max(3, args.repeats // 3), warmup=1
    ).values()
    print(f"  1024 samples: plain forward {t_plain:.3f} s, entropy calibration {t_ent:.3f} s: "
          f"ratio {t_ent / t_plain:.2f}x (target <= 1.5x)")
    print(f"  layerwise (default) calibration {t_lw:.3f} s: {t_lw / t_plain:.2f}x plain forward, "
          f"{t_lw / t_ent:.2f}x the entropy calibration pass (target <= 3x)")


if __name__ == "__main__":
    main()
