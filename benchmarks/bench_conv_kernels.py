"""Each int8 conv op's CPU kernel per layer shape, with ``lq/ops/amx.c``'s convolution kernels (the tile unit or
VNNI, ``lq.ops.native_quant.tile_unit()``) and without them (oneDNN / ``torch._int_mm``), interleaved in one run:
the measurements behind ``lq.ops.int8_conv_kernels.amx_conv_applies``' routing.

The kernels are called directly on int8 channels-last operands (what the training ops hand them): forward, the input
gradient and the weight gradient. ``with`` = the routing as it is; ``without`` = amx.c's kernels off. Where the
routing already sends an op to oneDNN (VNNI forwards), ``--force`` times amx.c's kernel itself
(``native_quant.amx_conv`` / ``amx_conv_grad_input``) in the ``with`` column.

    python benchmarks/bench_conv_kernels.py [--force] [--repeats 11]
"""

from __future__ import annotations

import argparse
import torch
from common import interleaved, without_tile_kernels

from lq.ops import hardware as hw
from lq.ops import int8_conv_kernels as K
from lq.ops import native_quant

#: (batch, C, O, H = W, k, stride, padding): the benchmark's ResNet layers and SmallResNet's (batch 64)
SHAPES = [
    (32, 64, 64, 56, 3, 1, 1), (32, 256, 256, 14, 3, 1, 1), (32, 128, 128, 28, 1, 1, 0), (64, 1, 16, 28, 3, 1, 1),
    (64, 16, 16, 28, 3, 1, 1), (64, 16, 32, 28, 3, 2, 1), (64, 16, 32, 28, 1, 2, 0), (64, 32, 64, 14, 3, 2, 1),
    (64, 64, 64, 7, 3, 1, 1), (64, 64, 128, 28, 3, 2, 1), (64, 128, 128, 14, 3, 1, 1),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="time amx.c's forward / grad-input even where not routed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unit = native_quant.tile_unit()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, oneDNN u8s8 {hw.onednn_mode()}, "
          f"amx.c conv kernels on: {unit}")
    if unit is None:
        print("no tile unit or AVX-512 VNNI here: nothing to compare")
        return
    print("ms, with / without amx.c's conv kernels (median of", args.repeats, "interleaved rounds)")
    for n, c, o, h, k, s, p in SHAPES:
        x = torch.randint(-127, 128, (n, c, h, h), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
        w = torch.randint(-127, 128, (o, c, k, k), dtype=torch.int8)
        ho = (h + 2 * p - k) // s + 1
        g = torch.randint(-127, 128, (n, o, ho, ho), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
        xs, ws = torch.tensor([0.01]), torch.rand(o) * 0.01
        geo = ([s, s], [p, p], [1, 1], 1)
        fwd = lambda: K._conv_fwd_cpu(x, w, xs, ws, 127, 127, None, *geo)  # noqa: E731
        gi = lambda: K._conv_grad_input_cpu(g, w, xs, 127, 127, [n, c, h, h], *geo)  # noqa: E731
        gw = lambda: K._conv_grad_weight_cpu(g, x, ws, xs, 127, 127, [o, c, k, k], *geo)  # noqa: E731
        fwd_on, gi_on = fwd, gi
        if args.force:
            fwd_on = lambda: native_quant.amx_conv(x, w, xs, ws, None, [p, p], 1 << 17, [s, s])  # noqa: E731
            gi_on = lambda: native_quant.amx_conv_grad_input(  # noqa: E731
                g, w, xs, [n, c, h, h], [s, s], [p, p], 1 << 17)
        with hw.record_kernels() as ran:
            fwd(), gi(), gw()
        fns = [fwd_on, without_tile_kernels(fwd), gi_on, without_tile_kernels(gi), gw, without_tile_kernels(gw)]
        r = [t * 1e3 for t in interleaved(dict(enumerate(fns)), args.repeats).values()]
        kernels = ", ".join(sorted({e.split(":")[1] for e in ran}))
        print(f"  {n:3d} x {c:3d} -> {o:3d} @{h:2d} k{k} s{s}: forward {r[0]:5.2f} / {r[1]:5.2f}   grad-input "
              f"{r[2]:5.2f} / {r[3]:5.2f}   grad-weight {r[4]:5.2f} / {r[5]:5.2f}   (routed: {kernels})")


if __name__ == "__main__":
    main()
