"""PTQ on real data (DATA.md): the pretrained MNIST CNN and a Fashion-MNIST CNN with BatchNorm (issue 2)."""

import pytest
import torch

import lq

import lq.data
import lq.models as models

mnist = lq.data.load_split


def accuracy(model, x, y, batch=2500):
    model.eval()
    with torch.no_grad():
        return sum((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item() for i in range(0, len(x), batch)) / len(x)


@pytest.fixture(scope="module")
def mnist_ptq():
    """The pretrained CNN, quantized, with one histogram calibration pass over 1024 train samples."""
    try:
        x_train, _ = mnist("mnist", "train")
        x_test, y_test = mnist("mnist", "test")
        model = models.pretrained_mnist_cnn()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"MNIST data or weights not installed ({err}); run scripts/setup.sh")
    fp32 = accuracy(model, x_test, y_test)
    torch.manual_seed(0)
    calib = x_train[torch.randperm(len(x_train))[:1024]]
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="entropy")))
    lq.calibrate(model, calib.split(256), num_samples=None)
    return model, fp32, x_test, y_test, calib


def load_all(model, method, pct=None):
    for q in lq.quantizers(model).values():
        if not q.dynamic:
            q.load_calib_amax(method, percentile=pct)


def test_mnist_fp32_reference(mnist_ptq):
    _, fp32, *_ = mnist_ptq
    assert fp32 == pytest.approx(0.9905, abs=5e-4)  # DATA.md


@pytest.mark.parametrize("method,pct", [("max", None), ("percentile", 99.99), ("percentile", 99.999), ("mse", None)])
def test_mnist_ptq_within_half_percent_relative(mnist_ptq, method, pct):
    model, fp32, x, y, _ = mnist_ptq
    load_all(model, method, pct)
    int8 = accuracy(model, x, y)
    assert (fp32 - int8) / fp32 <= 0.005, f"{method} {pct}: {int8:.4f} vs fp32 {fp32:.4f}"


def test_mnist_entropy_with_partial_quantization_within_half_percent(mnist_ptq):
    """Entropy (KL) calibration clips this model's first two inputs hard: |x| of the normalised background is
    one spike at 0.4242 holding ~80% of the mass, and KL prefers to represent the spike (clip ~0.43). The
    paper's remedy is the workflow: sensitivity, then keep the most sensitive layers in float (Section 5.1)."""
    model, fp32, x, y, _ = mnist_ptq
    load_all(model, "entropy")
    xs, ys = x[:2000], y[:2000]
    result = lq.partial_quantize(model, lambda m: accuracy(m, xs, ys), target=0.002)
    try:
        int8 = accuracy(model, x, y)
        assert result.skipped and len(result.skipped) < len(lq.quantized_layers(model))
        assert (fp32 - int8) / fp32 <= 0.005, f"entropy + {result.skipped} in float: {int8:.4f} vs {fp32:.4f}"
    finally:
        lq.set_quantization(model, True)


def test_mnist_auto_calibration_keeps_ptq_best(mnist_ptq):
    model, fp32, x, y, _ = mnist_ptq
    xs, ys = x[:2000], y[:2000]
    choice = lq.choose_calibration(model, lambda m: accuracy(m, xs, ys))
    assert choice.scores[choice.best] == max(choice.scores.values())
    assert (fp32 - accuracy(model, x, y)) / fp32 <= 0.005


def test_fashion_mnist_cnn_fold_bn_then_ptq_within_one_percent(tmp_path):
    """A small CNN with BatchNorm trained here on real Fashion-MNIST, BN folded (Appendix C), then PTQ."""
    import lightning.pytorch as pl

    data = lq.data
    try:
        dm = data.FashionMNISTDataModule(batch_size=128, limit_train=8000)
        dm.setup("fit")
        x_test, y_test = data.load_split("fashion_mnist", "test")
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"Fashion-MNIST not installed ({err}); run scripts/setup.sh")
    pl.seed_everything(0)
    lit = models.LitClassifier(arch="small_cnn", arch_kwargs={"width": 16}, lr=0.1, scheduler="cosine")
    pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path).fit(lit, dm)
    model = lit.model.eval()
    fp32 = accuracy(model, x_test, y_test)
    assert fp32 > 0.6  # one short epoch: a sanity bound, the point is the int8 vs fp32 gap below
    folded = lq.fold_bn(model)
    assert len(folded) == 3 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert accuracy(model, x_test, y_test) == pytest.approx(fp32, abs=5e-4)  # folding is exact up to fp rounding
    x_train = dm.split_tensors("train")[0]
    lq.quantize(model, lq.QuantConfig(activation=lq.QuantSpec(calibrator="entropy")))
    lq.calibrate(model, x_train[:1024].split(256), num_samples=None)
    for method, pct in [("max", None), ("percentile", 99.99), ("mse", None)]:
        load_all(model, method, pct)
        int8 = accuracy(model, x_test, y_test)
        assert (fp32 - int8) / fp32 <= 0.01, f"{method}: {int8:.4f} vs fp32 {fp32:.4f}"
    _deploy_checks(model, x_test, y_test, tmp_path)  # issue 6 on this real model (max calibration loaded last)
    # Entropy clips the first conv's input at the normalised background value (one |x| spike holding most of
    # the mass, as on MNIST); the workflow's answer is partial quantization (Section 5.1).
    load_all(model, "entropy")
    result = lq.partial_quantize(model, lambda m: accuracy(m, x_test[:2000], y_test[:2000]), target=0.005)
    int8 = accuracy(model, x_test, y_test)
    assert len(result.skipped) < len(lq.quantized_layers(model))
    assert (fp32 - int8) / fp32 <= 0.01, f"entropy + {result.skipped} in float: {int8:.4f} vs fp32 {fp32:.4f}"


def _deploy_checks(model, x_test, y_test, tmp_path) -> None:
    """The deployment must-shows on the trained Fashion-MNIST CNN (BN folded, PTQ max): ONNX Runtime runs the
    Q/DQ export within one output quantization step of the fake-quant model, the graph holds one Q/DQ pair per
    quantized input and weight, and ``lq.convert``'s int8 model (int8 chains through the Sequential) keeps
    the fake-quant accuracy within 0.1%.

    "Within one output step" holds row by row except where an earlier layer's value sits on a rounding tie:
    the fake-quant model sums dequantized products in fp32 (in an order that differs between AVX2 and
    AVX-512 kernels), the int8 kernels sum integers exactly, ORT in its own order, so a value within an ulp
    of ``k + 0.5`` steps can round to a neighbouring integer, and that one-step change in a hidden layer
    reaches the logits through the layers after it (seen: 1.16 steps on one row of 10k on the VNNI host).
    So: at most 0.5% of rows beyond one step, none beyond four, and the same accuracy."""
    import copy

    from lq.deploy import Int8Sequential, convert, count_qdq, export_onnx

    layers = list(lq.quantized_layers(model).values())
    last = layers[-1]
    bound = last.input_quantizer.amax.item() / 127 * last.weight.detach().abs().max().item()
    with torch.no_grad():
        ref = torch.cat([model(xb) for xb in x_test.split(2500)])
    fq_acc = (ref.argmax(1) == y_test).float().mean().item()
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(model, x_test[:2], tmp_path / "fashion_cnn.onnx")
    assert count_qdq(path) == {"QuantizeLinear": 2 * len(layers), "DequantizeLinear": 2 * len(layers)}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own semantics
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    y_ort = torch.cat([torch.from_numpy(sess.run(None, {"input": xb.numpy()})[0]) for xb in x_test[:2000].split(500)])
    _within_output_steps(y_ort, ref[:2000], bound)
    int8 = convert(copy.deepcopy(model))
    assert isinstance(int8.features, Int8Sequential)
    with torch.no_grad():
        y_int8 = torch.cat([int8(xb) for xb in x_test.split(2500)])
    _within_output_steps(y_int8, ref, bound)
    assert abs((y_int8.argmax(1) == y_test).float().mean().item() - fq_acc) <= 0.001


def _within_output_steps(y, ref, step) -> None:
    steps = (y - ref).abs().amax(1) / step  # per row, in output steps
    assert (steps > 1).float().mean().item() <= 0.005, f"{int((steps > 1).sum())} rows beyond one step"
    assert steps.max().item() <= 4, f"max {steps.max().item():.2f} output steps"
