"""Speed of lq.ops.int8_linear (forward + backward) against fp32 and bf16 autocast, measured in one run.

    python benchmarks/bench_int8_linear.py [--size 1024] [--repeats 7]

Prints median times and RATIOS (fp32 time / int8 time; > 1 means int8 is faster). fp32, bf16 and the int8
variants run in turn within every round (``common.interleaved``, each timed on its second call in a row), so
background load hits them alike (timed one after the other, the bf16 median alone moved 7.2-10.1 ms between runs
on the 2-core VM).
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from common import interleaved, median_time, add_cpu_malloc_flag, apply_cpu_malloc

from lq.ops import Int8ComputeConfig, int8_linear
from lq.ops import hardware as hw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="M = K = N")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    add_cpu_malloc_flag(ap)
    args = ap.parse_args()
    print(apply_cpu_malloc(args))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.size
    x = torch.randn(n, n, requires_grad=True)
    w = (torch.randn(n, n) / n**0.5).requires_grad_()
    b = torch.zeros(n, requires_grad=True)
    g = torch.randn(n, n)

    def step(f):
        def run():
            x.grad = w.grad = b.grad = None
            f().backward(g)
        return run

    def fp32():
        return F.linear(x, w, b)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.linear(x, w, b)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, VNNI flag {hw.cpu_has_vnni()}, oneDNN u8s8 {hw.onednn_mode()}, "
          f"fast _int_mm {hw.cpu_int_mm_is_fast()}")
    print(f"Linear M=K=N={n}, forward+backward (grad_input, grad_weight, grad_bias); median of {args.repeats}")
    configs = {}
    if hw.onednn_mode() == hw.FULL_RANGE:
        configs["int8 (8/8/8 bits)"] = Int8ComputeConfig()
        configs["int8 (8/8/8), no clip search"] = Int8ComputeConfig(grad_clip=False)
    else:
        configs["int8 (7/7/8 bits, for_cpu_without_vnni)"] = Int8ComputeConfig.for_cpu_without_vnni()
        configs["int8 (7/7/8), no clip search"] = Int8ComputeConfig.for_cpu_without_vnni(grad_clip=False)
        configs["int8 (8/8/8) -> exact reference fallback"] = Int8ComputeConfig()
    configs["int8 fwd only (float backward GEMMs)"] = (
        Int8ComputeConfig(quantize_grad=False) if hw.onednn_mode() == hw.FULL_RANGE
        else Int8ComputeConfig.for_cpu_without_vnni(quantize_grad=False)
    )
    # kernel limit: one GEMM alone, operands already int8 (what the fast path can at best achieve)
    qa = 127 if hw.onednn_mode() == hw.FULL_RANGE else 63
    a8 = torch.randint(-qa, qa + 1, (n, n), dtype=torch.int8)
    b8 = torch.randint(-qa, qa + 1, (n, n), dtype=torch.int8)
    one = torch.ones(1)
    t_mm32 = median_time(lambda: x.detach() @ w.detach().t(), args.warmup, args.repeats)
    t_mm8 = median_time(lambda: torch.ops.lq.int8_mm(a8, b8, one, one, qa, qa, None), args.warmup, args.repeats)
    line = f"  kernel limit: one {n}^3 GEMM fp32 {t_mm32 * 1e3:.2f} ms, lq::int8_mm {t_mm8 * 1e3:.2f} ms "
    if hw.cpu_int_mm_is_fast():  # the raw kernel lq::int8_mm calls here (int32 sums, no scaling)
        t_raw = median_time(lambda: torch._int_mm(a8, b8.t()), args.warmup, args.repeats)
        line += f"(raw torch._int_mm {t_raw * 1e3:.2f} ms, lq::int8_mm / raw {t_mm8 / t_raw:.2f}) "
    print(line + f"-> {t_mm32 / t_mm8:.2f}x fp32")
    variants = {"fp32": step(fp32), "bf16 autocast": step(bf16)}
    for label, cfg in configs.items():
        # a clip-state dict of its own, as a quantized layer passes (the default clip_every searches every 16th)
        variants[label] = step(lambda cfg=cfg, st={}: int8_linear(x, w, b, cfg, name="bench", clip_state=st))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        times = interleaved(variants, args.repeats, args.warmup, settle=1)
    t32, tbf = times.pop("fp32"), times.pop("bf16 autocast")
    print(f"  fp32           {t32 * 1e3:8.2f} ms")
    print(f"  bf16 autocast  {tbf * 1e3:8.2f} ms")
    for label, t8 in times.items():
        print(f"  {label:42s} {t8 * 1e3:8.2f} ms   int8/fp32 speedup {t32 / t8:5.2f}x   "
              f"int8/bf16 speedup {tbf / t8:5.2f}x")


if __name__ == "__main__":
    main()
