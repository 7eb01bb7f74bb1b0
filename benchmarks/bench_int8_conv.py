"""Speed of lq.ops.int8_conv2d (forward + backward) against fp32 and bf16 autocast on ResNet shapes,
measured in one run.

    python benchmarks/bench_int8_conv.py [--batch 32] [--repeats 5]

Prints median times and RATIOS (fp32 time / int8 time; > 1 means int8 is faster).
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from common import add_cpu_malloc_flag, apply_cpu_malloc, interleaved, without_tile_kernels

from lq.ops import Int8ComputeConfig, int8_conv2d
from lq.ops import hardware as hw
from lq.ops import native_quant

# (channels, spatial size, kernel): ResNet-50 stage shapes, same channels in and out, stride 1
SHAPES = [(64, 56, 3), (256, 14, 3), (128, 28, 1)]


def run_shape(c: int, hw_size: int, k: int, cfg: Int8ComputeConfig, args: argparse.Namespace):
    """Median seconds: fp32, int8, bf16 fwd+bwd and fp32, int8 forward-only kernels for one shape."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, c, hw_size, hw_size).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(c, c, k, k) / (c * k * k) ** 0.5).requires_grad_()
    pad = k // 2
    g = torch.randn(args.batch, c, hw_size, hw_size).contiguous(memory_format=fmt)

    def step(f):
        def run():
            x.grad = w.grad = None
            f().backward(g)
        return run

    def fp32():
        return F.conv2d(x, w, None, 1, pad)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.conv2d(x, w, None, 1, pad)

    state: dict = {}  # the layer's clip state, as a quantized layer passes (clip_every: the default searches every 16th)

    def int8():
        return int8_conv2d(x, w, None, 1, pad, config=cfg, name="bench", clip_state=state)

    # kernel limit: the forward conv alone on int8 operands vs fp32 forward
    qx = cfg.act_bits and (2 ** (cfg.act_bits - 1) - 1)
    qw = 2 ** (cfg.weight_bits - 1) - 1
    x8 = torch.randint(-qx, qx + 1, tuple(x.shape), dtype=torch.int8)
    w8 = torch.randint(-qw, qw + 1, tuple(w.shape), dtype=torch.int8)
    one, ones = torch.ones(1), torch.ones(c)
    kernels = interleaved({
        "fp32": lambda: F.conv2d(x.detach(), w.detach(), None, 1, pad),
        "int8": lambda: torch.ops.lq.int8_conv2d(x8, w8, one, ones, qx, qw, None, [1, 1], [pad, pad], [1, 1], 1),
    }, args.repeats, 1)
    # every variant in turn within each round, each after one untimed call of itself (the shared hosts' load moved
    # fp32 alone 57-85 ms between runs on one shape; interleaved, it hits all of them alike)
    fns = {"fp32": step(fp32), "int8": step(int8)}
    if native_quant.tile_unit() is not None:  # and without amx.c's conv kernels
        fns["int8 off"] = without_tile_kernels(step(int8))
    if args.bf16:
        fns["bf16"] = step(bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = interleaved(fns, args.repeats, args.warmup, settle=1)
    nan = float("nan")
    return t["fp32"], t["int8"], t.get("bf16", nan), kernels["fp32"], kernels["int8"], t.get("int8 off", nan)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true",
                    help="input and output gradient channels-last (as inside a CNN) for every variant")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="also time bf16 autocast (very slow on CPUs without AVX512-BF16: --no-bf16 there)")
    add_cpu_malloc_flag(ap)
    args = ap.parse_args()
    print(apply_cpu_malloc(args))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, VNNI flag {hw.cpu_has_vnni()}, oneDNN u8s8 {hw.onednn_mode()}")
    cfg = Int8ComputeConfig() if hw.onednn_mode() == hw.FULL_RANGE else Int8ComputeConfig.for_cpu_without_vnni()
    label = "8/8/8 bits" if hw.onednn_mode() == hw.FULL_RANGE else "7/7/8 bits (for_cpu_without_vnni)"
    print(f"Conv2d fwd+bwd (grad_input, grad_weight), N={args.batch}, int8 config {label}; median of {args.repeats}")
    totals = {"fp32": 0.0, "int8": 0.0, "bf16": 0.0}
    for c, hw_size, k in SHAPES:
        t32, t8, tbf, tk32, tk8, t8_off = run_shape(c, hw_size, k, cfg, args)
        totals["fp32"] += t32
        totals["int8"] += t8
        totals["bf16"] += tbf
        bf16 = f"  bf16 {tbf * 1e3:8.1f} ms" if args.bf16 else ""
        vs_bf16 = f"   int8/bf16 speedup {tbf / t8:5.2f}x" if args.bf16 else ""
        print(f"  {c:4d}ch {hw_size:3d}x{hw_size:<3d} {k}x{k}: fp32 {t32 * 1e3:8.1f} ms{bf16}  "
              f"int8 {t8 * 1e3:8.1f} ms   int8/fp32 speedup {t32 / t8:5.2f}x{vs_bf16}   "
              f"(kernel limit, forward conv alone: {tk32 / tk8:.2f}x)"
              + (f"   without {native_quant.tile_unit()} conv kernels {t8_off * 1e3:.1f} ms ({t8_off / t8:.2f}x slower)"
                 if t8_off == t8_off else ""))
    print(f"  all three: int8/fp32 speedup {totals['fp32'] / totals['int8']:.2f}x"
          + (f", int8/bf16 speedup {totals['bf16'] / totals['int8']:.2f}x" if args.bf16 else ""))


if __name__ == "__main__":
    main()
