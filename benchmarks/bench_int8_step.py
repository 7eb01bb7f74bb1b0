"""Whole training step with int8 compute vs fp32 and bf16 autocast, and int8 Linear vs its peers (issue 4).

    python benchmarks/bench_int8_step.py [--threads 2] [--repeats 10] [--compile] [--widths 64,128,256] [--step-only]

1. SmallResNet (lq.models, the fashion_int8_train recipe's model) train step -- forward, backward, SGD --
   on a Fashion-MNIST-sized batch: fp32, bf16 autocast, and lq int8 compute (what ``Int8Training`` runs:
   every Conv2d/Linear forward, grad_input and grad_weight as int8 products; this machine's
   ``Int8ComputeConfig.for_this_machine()``), with and without direction-sensitive clip search, and with the
   clip searched every step (``clip_every=1``; the default searches every 16th). Steps are interleaved round after round so background
   load hits every variant alike, each timed on its second call in a row (``common.interleaved(settle=1)``:
   a variant timed right after another one paid for the other's heap state); medians. ``--compile`` adds the
   int8 and fp32 models under ``torch.compile`` (the int8 graph searches the clip every step: no Python state
   or host reads inside a graph; its noise bytes come from the opaque ``lq::noise_bytes`` op). ``--widths``: the
   stages' channels (default 16,32,64, the recipe's; 64,128,256 is a ResNet-18-wide variant on the same input, where
   int8's products, not its per-layer overhead, decide the step).
2. Linear(1024, 1024) on a 1024-row batch against the int8 peers that exist in the ecosystem:
   bitsandbytes ``Linear8bitLt`` (trainable, has_fp16_weights=True) and torch.ao dynamic quantization
   (``quantize_dynamic``: inference only, no backward). Forward+backward where the peer supports it,
   forward alone for all.

Prints times and RATIOS measured in this run (fp32 time / variant time: > 1 means faster than fp32).
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from common import add_cpu_malloc_flag, apply_cpu_malloc, interleaved, train_step, without_tile_kernels
from torch import nn

import lq
from lq.models import SmallResNet
from lq.nn.int8_compute import use_int8_compute
from lq.ops import Int8ComputeConfig
from lq.ops import hardware as hw
from lq.quant.functional import qmax


def int8_model(base: nn.Module, cfg: Int8ComputeConfig) -> nn.Module:
    """The model as ``Int8Training`` prepares it (no fake quantization; int8 products with dynamic scales)."""
    m = copy.deepcopy(base)
    off = lq.QuantSpec(enabled=False)
    lq.quantize(m, lq.QuantConfig(weight=off, activation=off, layers=["Linear", "Conv2d"]))
    use_int8_compute(m, cfg)
    return m


def report(title: str, times: dict[str, float], ref: str = "fp32") -> None:
    print(title)
    for k, t in times.items():
        print(f"  {k:44s} {t * 1e3:9.2f} ms   {ref}/this {times[ref] / t:5.2f}x")


def bench_step(args) -> None:
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    base = SmallResNet(widths=args.widths).train()
    cfg = Int8ComputeConfig.for_this_machine()
    qa = qmax(cfg.act_bits)  # Int8Training(int8_saved=True): saved activations kept as int8 (lq.ops.saved_int8)
    fns = {
        "fp32": train_step(copy.deepcopy(base), x, y, momentum=0.9),
        "bf16 autocast": train_step(copy.deepcopy(base), x, y, momentum=0.9, autocast=True),
        f"int8 ({cfg.act_bits}/{cfg.weight_bits}/{cfg.grad_bits} bits, {cfg.grad_rounding}, Int8Training default)":
            train_step(int8_model(base, cfg), x, y, momentum=0.9),
        "int8, int8 saved activations (int8_saved=True)": train_step(
            int8_model(base, cfg), x, y, momentum=0.9, saved_int8_qmax=qa),
        "int8, stochastic_hash rounding (fused noise)": train_step(
            int8_model(base, Int8ComputeConfig.for_this_machine(grad_rounding="stochastic_hash")), x, y, momentum=0.9),
        "int8, nearest gradient rounding": train_step(
            int8_model(base, Int8ComputeConfig.for_this_machine(grad_rounding="nearest")), x, y, momentum=0.9),
        "int8, clip searched every step (clip_every=1)": train_step(
            int8_model(base, Int8ComputeConfig.for_this_machine(clip_every=1)), x, y, momentum=0.9),
        "int8, no clip search": train_step(
            int8_model(base, Int8ComputeConfig.for_this_machine(grad_clip=False)), x, y, momentum=0.9),
    }
    from lq.ops import native_quant

    if native_quant.tile_unit() is not None:  # the same int8 model without amx.c's conv kernels (oneDNN, _int_mm)
        fns[f"int8, without the {native_quant.tile_unit()} conv kernels (LQ_TILE_UNIT=off)"] = without_tile_kernels(
            train_step(int8_model(base, cfg), x, y, momentum=0.9))
    if args.compile:  # torch.compile of the int8 model (one graph; clip searched every step) and of fp32
        fns["int8, torch.compile (clip searched every step)"] = train_step(
            torch.compile(int8_model(base, cfg)), x, y, momentum=0.9)
        fns["int8, torch.compile, no clip search"] = train_step(
            torch.compile(int8_model(base, Int8ComputeConfig.for_this_machine(grad_clip=False))), x, y, momentum=0.9)
        fns["fp32, torch.compile"] = train_step(torch.compile(copy.deepcopy(base)), x, y, momentum=0.9)
    if args.no_bf16:
        fns.pop("bf16 autocast")
    times = interleaved(fns, args.repeats, settle=1)
    report(f"SmallResNet (widths {','.join(map(str, args.widths))}) train step, batch {args.batch} x 1 x 28 x 28 "
           f"(median of {args.repeats})", times)
    if "bf16 autocast" in times:
        k8 = next(k for k in times if k.startswith("int8 ("))
        print(f"  int8 / bf16 autocast speed: {times['bf16 autocast'] / times[k8]:.2f}x")


def bench_linear_peers(args) -> None:
    n = 1024
    torch.manual_seed(0)
    x = torch.randn(n, n)
    g = torch.randn(n, n)
    fp32 = nn.Linear(n, n)
    lq_lin = copy.deepcopy(fp32)
    off = lq.QuantSpec(enabled=False)
    holder = nn.Sequential(lq_lin)
    lq.quantize(holder, lq.QuantConfig(weight=off, activation=off, layers=["Linear"]))
    use_int8_compute(holder, Int8ComputeConfig.for_this_machine())
    fwd_bwd = {"fp32": fp32, "lq int8 (Int8Training op)": holder}
    fwd_only = {"fp32": fp32, "lq int8 (Int8Training op)": holder}
    try:
        import bitsandbytes as bnb

        b = bnb.nn.Linear8bitLt(n, n, has_fp16_weights=True, threshold=0.0)
        b.load_state_dict(fp32.state_dict())
        fwd_bwd["bitsandbytes Linear8bitLt"] = b
        fwd_only["bitsandbytes Linear8bitLt"] = b
    except Exception as err:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
        print(f"  (bitsandbytes Linear8bitLt unavailable: {err})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ao = torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(fp32)), {nn.Linear}, torch.qint8)
        fwd_only["torch.ao dynamic (inference only)"] = ao
    except Exception as err:  # noqa: BLE001
        print(f"  (torch.ao dynamic quantization unavailable: {err})")

    xr = x.clone().requires_grad_()

    def fb(mod):
        def run() -> None:
            mod.zero_grad(set_to_none=True)
            xr.grad = None
            mod(xr).backward(g)
        return run

    def fo(mod):
        def run() -> None:
            with torch.no_grad():
                mod(x)
        return run

    report(f"Linear {n}x{n}, {n} rows, forward+backward (median of {args.repeats})",
           interleaved({k: fb(m) for k, m in fwd_bwd.items()}, args.repeats, settle=1))
    report(f"Linear {n}x{n}, {n} rows, forward only, no_grad (median of {args.repeats})",
           interleaved({k: fo(m) for k, m in fwd_only.items()}, args.repeats, settle=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-bf16", action="store_true", help="skip bf16 autocast (very slow without AVX512-BF16)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd int8 and fp32 steps (~1 min to compile)")
    ap.add_argument("--widths", type=lambda v: tuple(int(w) for w in v.split(",")), default=(16, 32, 64),
                    help="SmallResNet's stage widths, comma-separated (default 16,32,64)")
    ap.add_argument("--step-only", action="store_true", help="only the SmallResNet step, not the Linear peers")
    add_cpu_malloc_flag(ap)
    args = ap.parse_args()
    print(apply_cpu_malloc(args))
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, oneDNN u8s8 {hw.onednn_mode()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bench_step(args)
        if not args.step_only:
            bench_linear_peers(args)


if __name__ == "__main__":
    main()
