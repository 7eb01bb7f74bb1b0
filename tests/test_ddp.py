"""Under DDP every rank calibrates on its own shard; the statistics are reduced so all ranks hold the amax
that one process gets over all the data (max for max calibration, summed histograms for entropy)."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lq
from lq.callbacks import Int8PTQ
from test_callbacks import DigitsData, Plain, ReleaseProcessGroup, digits


def shard_loop(model):
    """Each rank sees a different half of the training inputs."""
    x = digits("train").tensors[0]
    model(x[model.trainer.global_rank :: model.trainer.world_size])


class SaveAmax(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_fit_start(self, trainer, pl_module):
        amax = {n: q.amax.clone() for n, q in lq.quantizers(pl_module).items() if not q.dynamic}
        amax.update({f"{n}:bias_correction": c.clone() for n, c in lq.bias_correction.corrections(pl_module).items()})
        torch.save(amax, f"{self.out_dir}/amax_rank{trainer.global_rank}.pt")


# entropy: summed histograms (the harder reduction); the max reduction is covered in tests/test_calib.py.
# max + bias correction: the per-channel shift statistics summed over ranks (Nagel et al. eq. 13 over all data)
@pytest.mark.parametrize(("calibrator", "bias_correction"), [("entropy", False), ("max", True)])
def test_ddp_two_cpu_processes_calibrate_like_one(tmp_path, calibrator, bias_correction):
    cfg = lq.QuantConfig(activation=lq.QuantSpec(calibrator=calibrator), bias_correction=bias_correction)
    torch.manual_seed(0)
    module = Plain()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[
            Int8PTQ(cfg, num_samples=4096, calibration_data=shard_loop), SaveAmax(tmp_path), ReleaseProcessGroup()
        ],
    )
    trainer.fit(module, DigitsData())
    r0 = torch.load(tmp_path / "amax_rank0.pt")
    r1 = torch.load(tmp_path / "amax_rank1.pt")
    # one process, all the data
    single = Plain()
    single.load_state_dict(state)
    lq.quantize(single, cfg)
    lq.calibrate(single, [digits("train").tensors[0]], num_samples=None)
    expected = {n: q.amax for n, q in lq.quantizers(single).items() if not q.dynamic}
    quantizer_names = {"net.0.input_quantizer", "net.2.input_quantizer", "net.4.input_quantizer"}
    if bias_correction:  # over all the data, as the two ranks' summed statistics
        lq.correct_bias(single, [digits("train").tensors[0]], num_samples=None)
        corrections = lq.bias_correction.corrections(single)
        assert set(corrections) == {"net.0", "net.2", "net.4"}
        expected.update({f"{n}:bias_correction": c for n, c in corrections.items()})
        quantizer_names |= {f"{n}:bias_correction" for n in corrections}
    assert set(r0) == set(expected) == quantizer_names
    for name, amax in expected.items():
        torch.testing.assert_close(r0[name], r1[name])
        torch.testing.assert_close(r0[name], amax, msg=name, rtol=1e-5, atol=1e-6)
