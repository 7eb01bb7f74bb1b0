"""Converted int8 inference (lq.convert, paper eq. 10) vs fp32, measured in one run, as ratios.

    python benchmarks/bench_convert.py            # 2 threads; prints a markdown table
    python benchmarks/bench_convert.py --quick    # fewer rounds
    python benchmarks/bench_convert.py --accuracy # + accuracy on MNIST and Fashion-MNIST 10k: fp32 / fake-quant /
                                                  #   int8 / ONNX Runtime (trains the Fashion CNN: minutes)

``lq int8 (convert, compile=True)`` is the same conversion compiled with torch.compile (``lq.deploy.traced``:
int8 im2col + ``torch._int_mm``, fused output stages, any graph). ``lq int8 (convert)`` is the default conversion: int8 layers in Sequentials hand each other uint8 integers
(``lq.deploy.chain``; Linear chains of up to 16 rows and Conv2d chains of small batches run in one call of
``lq/deploy/gemv.c``); ``fuse=False`` is the same model with every layer float in, float out.

Models: (a) MLP of four 1024x1024 Linear layers with ReLU; (b) the Fashion-MNIST CNN ``lq.models.SmallCNN``,
conv 1->32->64->128 (3x3, BN folded, ReLU, max-pool) + Linear(128, 10), 28x28 inputs (real Fashion-MNIST test images when
installed: signed, normalised pixels, so the first layer sees negative inputs). Batch 64 and batch 1.

Peers in the same run: torch.ao dynamic quantization (``quantize_dynamic``, Linear only, fbgemm),
bitsandbytes ``Linear8bitLt`` in eval mode (int8 weights; Linear only), and onnxruntime (CPU provider, default
graph optimizations): on the fp32 export, on ``lq.export_onnx(..., runtime="onnxruntime")`` (the form ORT fuses
into its int8 kernels), and on ``onnxruntime.quantization.quantize_static`` of the fp32 export with the same
calibration data (the anchor). The notes list which kernels ORT's optimized graph runs each layer with
(QLinearConv / QGemm / float Conv ...). Timing: the variants are interleaved
round after round (the machine may be shared) and each keeps its fastest round; ratios are fp32 time /
variant time (higher is better). A profile of the int8 model at batch 1 splits the time between activation
quantization (eq. 7) and the integer kernels.
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import lq
from lq.deploy import convert, onednn_mode
from lq.deploy.traced import graph_breaks

THREADS = 2


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "n/a"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(4):
        layers.append(nn.Linear(1024, 1024))
        if i < 3:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def randomised_bn(m: nn.Module) -> nn.Module:
    """``m`` with random BN statistics, so that folding changes the weights."""
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m


def cnn() -> nn.Module:
    """lq.models.SmallCNN (the Fashion-MNIST CNN of the recipes): conv 1->32->64->128 with BN, ReLU, two
    max-pools, global average pool, Linear(128, 10); BN statistics randomised so folding changes weights."""
    from lq.models import SmallCNN

    torch.manual_seed(0)
    return randomised_bn(SmallCNN().eval())


def resnet() -> nn.Module:
    """lq.models.SmallResNet (the int8 training recipe's model): stem, three stages of basic blocks with
    residual adds (a 1x1 stride-2 conv on the downsampling shortcuts), GAP, Linear; BN statistics randomised."""
    from lq.models import SmallResNet

    torch.manual_seed(0)
    return randomised_bn(SmallResNet().eval())


def images(n: int) -> tuple[torch.Tensor, str]:
    try:
        from lq.data import load_split

        x, _ = load_split("fashion_mnist", "test")
        return x[:n].contiguous(), "Fashion-MNIST test images"
    except Exception as err:  # noqa: BLE001 - any missing data falls back to synthetic inputs
        return torch.randn(n, 1, 28, 28), f"synthetic N(0,1) images ({type(err).__name__})"


def bench(fns: dict[str, Callable[[], object]], rounds: int, min_time: float = 0.05) -> dict[str, tuple[float, float]]:
    """(wall seconds, process CPU seconds) per call: interleaved rounds, fastest round per variant.

    CPU time counts only while this process runs, so it is far less disturbed by other jobs on a shared
    machine than wall time (at 1 thread it is the cost of the work itself; at 2 threads it also counts
    time a thread spins waiting for the other).
    """
    iters = {}
    with torch.no_grad():
        for k, f in fns.items():
            f()
            f()
            t = time.perf_counter()
            n = 0
            while time.perf_counter() - t < min_time:
                f()
                n += 1
            iters[k] = max(1, n)
        wall = {k: float("inf") for k in fns}
        cpu = {k: float("inf") for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                t, c = time.perf_counter(), time.process_time()
                for _ in range(iters[k]):
                    f()
                wall[k] = min(wall[k], (time.perf_counter() - t) / iters[k])
                cpu[k] = min(cpu[k], (time.process_time() - c) / iters[k])
    return {k: (wall[k], cpu[k]) for k in fns}


def quantized(model: nn.Module, calib: torch.Tensor, **config) -> nn.Module:
    m = copy.deepcopy(model)
    lq.quantize(m, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max"), **config))
    lq.calibrate(m, [calib], num_samples=None, method="max")
    return m


def peers(model: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out["torch.ao dynamic"] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        except Exception as err:  # noqa: BLE001
            print(f"torch.ao quantize_dynamic unavailable: {err}")
        try:
            import bitsandbytes as bnb

            m = copy.deepcopy(model)
            for name, mod in list(m.named_modules()):
                if isinstance(mod, nn.Linear):
                    new = bnb.nn.Linear8bitLt(mod.in_features, mod.out_features, mod.bias is not None,
                                              has_fp16_weights=False, threshold=0.0)
                    new.load_state_dict(mod.state_dict())
                    parent = m.get_submodule(name.rpartition(".")[0]) if "." in name else m
                    setattr(parent, name.rpartition(".")[2], new)
            out["bnb Linear8bitLt"] = m.eval()
        except Exception as err:  # noqa: BLE001
            print(f"bitsandbytes unavailable: {err}")
    return out


def ort_session(path: str, threads: int, optimized_path: str | None = None):
    """onnxruntime CPU session, default (all) graph optimizations; ``optimized_path`` saves ORT's optimized graph."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # ORT's pool threads spin after each run by default; interleaved with torch's OpenMP threads on a
    # 2-core machine they steal the cores torch is timed on (stalls of tens of ms). No spinning.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


#: ORT's kernels for a conv / GEMM / matmul layer: its int8 ones, and its float ones under their names
ORT_LAYER_KERNELS = {"QLinearConv": "QLinearConv", "QGemm": "QGemm", "QLinearMatMul": "QLinearMatMul",
                     "MatMulIntegerToFloat": "MatMulIntegerToFloat", "Conv": "float Conv", "FusedConv": "float Conv",
                     "Gemm": "float Gemm", "FusedGemm": "float Gemm", "MatMul": "float MatMul",
                     "FusedMatMul": "float MatMul"}


def ort_layer_kernels(optimized_path: str) -> str:
    """What ORT runs each conv / GEMM / matmul layer as, read from its optimized graph: 'QLinearConv x2, ...'."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(optimized_path).graph.node:
        kind = ORT_LAYER_KERNELS.get(node.op_type)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


def onnxruntime_variants(
    fp32: nn.Module, fq: nn.Module, x: torch.Tensor, threads: int, calib: torch.Tensor | None = None,
    fq_pooling: nn.Module | None = None,
) -> tuple[dict[str, Callable[[torch.Tensor], object]], list[str]]:
    """ONNX Runtime on the fp32 export, on lq.export_onnx's export in the form ORT fuses
    (``runtime="onnxruntime"``), and (the anchor a user would pick) on ``onnxruntime.quantization.quantize_static``
    of the fp32 export with the same calibration data (QDQ format, per-channel int8 weights, its default uint8
    activations and MinMax calibration). Also returns, per variant, the kernels ORT's optimized graph runs
    the layers with (the fusion evidence)."""
    import tempfile

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}, []
    from lq.deploy import export_onnx

    out: dict[str, Callable[[torch.Tensor], object]] = {}
    kernels: list[str] = []
    tmp = tempfile.mkdtemp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fp32, (x,), f"{tmp}/fp32.onnx", dynamo=False, opset_version=17, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
        export_onnx(fq, x, f"{tmp}/int8.onnx", runtime="onnxruntime")
    files = [("onnxruntime fp32", "fp32.onnx"), ("onnxruntime int8 (lq.export_onnx, runtime='onnxruntime')", "int8.onnx")]
    if fq_pooling is not None:  # the conv before global average pooling fuses too (QLinearGlobalAveragePool)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(fq_pooling, x, f"{tmp}/int8_pool.onnx", runtime="onnxruntime")
        files.append(("onnxruntime int8 (lq export, quantize_pooling=True, smoothquant=False)", "int8_pool.onnx"))
    if calib is not None:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"input": calib[i:i + 64].numpy()} for i in range(0, len(calib), 64)])

            def get_next(self) -> dict | None:
                return next(self.batches, None)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(f"{tmp}/fp32.onnx", f"{tmp}/static.onnx", Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8)
        files.append(("onnxruntime quantize_static int8 (anchor)", "static.onnx"))
    for name, file in files:
        optimized = f"{tmp}/{file}.optimized.onnx"
        sess = ort_session(f"{tmp}/{file}", threads, optimized)
        out[name] = lambda xb, s=sess: s.run(None, {"input": xb.numpy()})
        kernels.append(f"{name}: {ort_layer_kernels(optimized)}")
    return out, kernels


def profile_batch1(model: nn.Module, x: torch.Tensor) -> str:
    """Share of int8 inference time spent in the kernels vs activation quantization and glue."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(5):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(50):
                model(x)
    from lq.ops import hardware as hw

    with torch.no_grad(), hw.record_kernels() as ran:
        model(x)
    if ran and all(r.endswith(":gemv") for r in ran):
        return "every int8 layer runs in lq/deploy/gemv.c (one call per chain, C through ctypes: torch's profiler does not see it)"
    rows = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(rows.values())
    kernel = sum(v for k, v in rows.items() if "onednn::q" in k or k.startswith("quantized::linear"))
    top = sorted(rows.items(), key=lambda kv: -kv[1])[:6]
    parts = ", ".join(f"{k} {v / total:.0%}" for k, v in top)
    return f"int8 kernels {kernel / total:.0%} of op time; top ops: {parts}"


def deploy_accuracy(title: str, model: nn.Module, x_calib: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                    threads: int) -> None:
    """PTQ (max calibration on ``x_calib``): top-1 of fp32, fake-quant, ONNX Runtime on the Q/DQ export, and the
    converted int8 model, on the whole test split."""
    import tempfile

    import onnxruntime as ort

    from lq.deploy import export_onnx

    def acc(f: Callable[[torch.Tensor], torch.Tensor]) -> float:
        with torch.no_grad():
            pred = torch.cat([torch.as_tensor(f(x_test[i : i + 1000])).argmax(1) for i in range(0, len(x_test), 1000)])
        return 100.0 * (pred == y_test).float().mean().item()

    model.eval()
    rows = {"fp32": acc(model)}
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="max")))
    lq.calibrate(model, list(x_calib.split(256)), num_samples=None, method="max")
    rows["fake-quant (lq)"] = acc(model)
    path = export_onnx(model, x_test[:2], f"{tempfile.mkdtemp()}/model.onnx", runtime="onnxruntime")
    for name, level in (("onnxruntime int8 export, graph semantics (optimizations off)", "ORT_DISABLE_ALL"),
                        ("onnxruntime int8 export, ORT's fused int8 kernels (default optimizations)", "ORT_ENABLE_ALL")):
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        rows[name] = acc(lambda xb, s=sess: torch.from_numpy(s.run(None, {"input": xb.numpy()})[0]))
    int8 = convert(model)
    rows["lq int8 (convert)"] = acc(int8)
    print()
    print(f"| {title} | top-1 % |")
    print("|---|---:|")
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} |")


def mnist_accuracy(threads: int) -> None:
    """Pretrained MNIST CNN, PTQ (max calibration, 1024 train samples): top-1 on the 10k test split."""
    from lq.data import load_split
    from lq.models import pretrained_mnist_cnn

    x_train, _ = load_split("mnist", "train", limit_train=1024, seed=0)
    x_test, y_test = load_split("mnist", "test")
    deploy_accuracy("MNIST CNN (10k test), PTQ max calibration on 1024 train images", pretrained_mnist_cnn(),
                    x_train, x_test, y_test, threads)


def fashion_accuracy(threads: int, epochs: int) -> None:
    """lq.models.SmallCNN (BatchNorm) trained here on the Fashion-MNIST train split (no pretrained weights ship),
    then BN folded and PTQ (max calibration, 1024 train images): top-1 on the 10k test split."""
    import lightning.pytorch as pl

    from lq.data import FashionMNISTDataModule, load_split
    from lq.models import LitClassifier

    pl.seed_everything(0)
    dm = FashionMNISTDataModule(batch_size=128)
    lit = LitClassifier(arch="small_cnn", lr=0.1, scheduler="cosine")
    t = time.perf_counter()
    pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(lit, dm)
    print(f"\ntrained SmallCNN on Fashion-MNIST: {epochs} epoch(s) in {time.perf_counter() - t:.0f} s")
    model = lit.model.eval()
    lq.fold_bn(model)
    x_test, y_test = load_split("fashion_mnist", "test")
    deploy_accuracy(f"Fashion-MNIST SmallCNN with BN ({epochs} epoch(s), 10k test), BN folded, PTQ max on 1024 train images",
                    model, dm.split_tensors("train")[0][:1024], x_test, y_test, threads)


def layer_ratios(rounds: int) -> list[str]:
    """Single layers, fp32 vs converted int8 (eq. 10 kernel + activation quantization), batch 64."""
    torch.manual_seed(0)
    rows = []
    cases = (
        ("Linear 1024x1024", lambda: nn.Linear(1024, 1024), (64, 1024)),
        ("Conv2d 32->64 3x3 @14x14", lambda: nn.Conv2d(32, 64, 3, padding=1), (64, 32, 14, 14)),
        ("Conv2d 64->128 3x3 @7x7", lambda: nn.Conv2d(64, 128, 3, padding=1), (64, 64, 7, 7)),
    )
    for name, make, shape in cases:
        layer = make().eval()
        for sign, x in (("x >= 0", torch.randn(shape).relu()), ("signed x", torch.randn(shape))):
            fq = quantized(nn.Sequential(layer), x)
            int8 = convert(copy.deepcopy(fq))
            t = bench({"fp32": lambda m=layer, x=x: m(x), "int8": lambda m=int8, x=x: m(x)}, rounds)
            rows.append(f"| {name} | {sign} | {t['fp32'][1] * 1e3:.3f} | {t['int8'][1] * 1e3:.3f} | "
                        f"{t['fp32'][1] / t['int8'][1]:.2f}x |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 15, 5 with --quick)")
    p.add_argument("--accuracy", action="store_true",
                   help="also measure accuracy: pretrained MNIST CNN, and SmallCNN trained here on Fashion-MNIST")
    p.add_argument("--fashion-epochs", type=int, default=2, help="training epochs of the Fashion-MNIST CNN")
    args = p.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" per call
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    rounds = args.rounds or (5 if args.quick else 15)
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(l for l in f if l.startswith("flags"))
        flags = " ".join(sorted({t for t in line.split() if "avx512" in t or "vnni" in t or t in ("avx2", "amx_int8")}))
    except (OSError, StopIteration):
        pass
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {threads} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, flags: {flags or 'n/a'}, "
          f"{torch.get_num_interop_threads()} interop threads, 1-min load average at start {load_average()}")
    print(f"lq oneDNN int8 mode: {onednn_mode()} (full_range = VNNI-exact u8 range; half_range = AVX2, "
          "signed inputs cost two GEMMs)")
    print()
    print("| model | batch | variant | wall ms / batch | wall speed-up vs fp32 | CPU ms / batch | CPU-time speed-up vs fp32 |")
    print("|---|---:|---|---:|---:|---:|---:|")
    notes = []
    x_img, img_src = images(256)
    for mname, make, calib, inputs in (
        ("MLP 4x1024", mlp, torch.randn(256, 1024), {64: torch.randn(64, 1024), 1: torch.randn(1, 1024)}),
        ("CNN 1-32-64-128", cnn, x_img, {64: x_img[:64], 1: x_img[:1]}),
        ("ResNet 16-32-64", resnet, x_img, {64: x_img[:64], 1: x_img[:1]}),
    ):
        fp32 = make()
        if any(isinstance(mod, nn.BatchNorm2d) for mod in fp32.modules()):
            lq.fold_bn(fp32)  # the fp32 baseline gets BN folding too (int8 folds it): same graph, fair ratio
        fq = quantized(fp32, calib)
        int8 = convert(copy.deepcopy(fq))
        unfused = convert(copy.deepcopy(fq), fuse=False)
        variants: dict[str, nn.Module] = {
            "fp32": fp32, "fake-quant (lq, before convert)": fq, "lq int8 (convert)": int8,
            "lq int8 (convert, fuse=False: float between layers)": unfused,
        }
        variants.update(peers(fp32))
        calls = {k: (lambda xb, m=m: m(xb)) for k, m in variants.items()}
        # convert(compile=True): one copy per batch size, each compiled for its shape on its first call (a model
        # called with a second shape recompiles once with a dynamic batch dimension)
        # (graph_breaks resets dynamo, so it runs first, on its own copy)
        breaks_by_batch = {b: graph_breaks(convert(copy.deepcopy(fq)), xb) for b, xb in inputs.items()}
        compiled = {b: convert(copy.deepcopy(fq), compile=True) for b in inputs}
        for b, xb in inputs.items():
            start = time.perf_counter()
            with torch.no_grad():
                compiled[b](xb)
            breaks = breaks_by_batch[b]
            notes.append(f"{mname} batch {b}: convert(compile=True) compiled in {time.perf_counter() - start:.1f} s, "
                         f"graph breaks: {len(breaks)} {breaks[:3] if breaks else ''}")
        calls["lq int8 (convert, compile=True)"] = lambda xb, c=compiled: c[xb.shape[0]](xb)
        if mname.startswith("CNN"):
            # channels_last inputs: oneDNN's int8 conv output is NHWC, so no layout copy (lq returns outputs in
            # the input's memory format); the fp32 model gets the same layout for a fair comparison
            cl = torch.channels_last
            calls["fp32, channels_last input"] = lambda xb, m=fp32, f=cl: m(xb.contiguous(memory_format=f))
            calls["lq int8 (convert), channels_last input"] = lambda xb, m=int8, f=cl: m(xb.contiguous(memory_format=f))
        # ORT fuses the conv before global average pooling only with a quantizer on the pooling input (and
        # no SmoothQuant divisor on the head after it): the opt-in a user deploying to ORT would take
        pooled = None
        if any(isinstance(m, nn.AdaptiveAvgPool2d) for m in fp32.modules()):
            pooled = quantized(fp32, calib, quantize_pooling=True, smoothquant=False)
        ort_calls, ort_kernels = onnxruntime_variants(fp32, fq, inputs[64], threads, calib, pooled)
        calls.update(ort_calls)
        notes.extend(f"{mname}, ORT's optimized graph runs the layers as: {k}" for k in ort_kernels)
        for batch, x in inputs.items():
            t = bench({k: (lambda f=f, x=x: f(x)) for k, f in calls.items()}, rounds)
            w32, c32 = t["fp32"]
            for k, (w, c) in t.items():
                print(f"| {mname} | {batch} | {k} | {w * 1e3:.3f} | {w32 / w:.2f}x | {c * 1e3:.3f} | {c32 / c:.2f}x |")
            if batch == 1:
                notes.append(f"{mname} batch 1: {profile_batch1(int8, x)}")
        with torch.no_grad():
            err = (int8(inputs[64]) - fq(inputs[64])).abs().max().item()
            err_unfused = (int8(inputs[64]) - unfused(inputs[64])).abs().max().item()
            err_compiled = (compiled[64](inputs[64]) - unfused(inputs[64])).abs().max().item()
            scale = unfused(inputs[64]).abs().max().item()
        notes.append(f"{mname}: max |int8 - fake-quant| at batch 64 = {err:.2e}; fused vs fuse=False {err_unfused:.2e}; "
                     f"compile=True vs fuse=False (the per-layer path) {err_compiled:.2e} (outputs up to {scale:.2f})")
    print()
    print(f"1-min load average at the end: {load_average()} (other jobs share this machine's cores).")
    print(f"CNN inputs: {img_src}. MLP inputs: N(0,1) (signed, so layer 1 takes the two-GEMM path in half_range mode).")
    for n in notes:
        print(f"- {n}")
    print()
    print("| single layer, batch 64 | input | fp32 CPU ms | lq int8 CPU ms | speed-up |")
    print("|---|---|---:|---:|---:|")
    for row in layer_ratios(rounds):
        print(row)
    if args.accuracy:
        mnist_accuracy(threads)
        fashion_accuracy(threads, args.fashion_epochs)


if __name__ == "__main__":
    main()
