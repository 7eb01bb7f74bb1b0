"""Two CPU ranks (gloo) under Lightning's ModelParallelStrategy with torch's FSDP2 ``fully_shard``; run by
tests/test_fsdp.py as ``python tests/fsdp_worker.py <out_dir>``.

ModelParallelStrategy launches its other ranks by re-running this script (Lightning's subprocess launcher;
it has no spawn launcher), which is why this is a script and not a test: inside pytest the launcher would
re-run the whole pytest command in the second rank.

Two fits in the same two processes, each rank saving ``<out_dir>/<fit>_rank<r>.pt``:
  qat:      Int8QAT with entropy activations and a per-channel percentile weight calibration (static: read
            outside a forward) on each rank's half of the training inputs; saves every static amax.
  training: Int8Training for one step, rank r on training samples r, r+2, ... (its own loader, no
            distributed sampler: Lightning's would shuffle); saves the whole parameters after the step and
            which int8 kernels ran.
Both start from ``<out_dir>/init.pt`` (the float Plain module's state), written by the test.
"""

import sys
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).parent))

import lq  # noqa: E402
from lq.callbacks import Int8QAT, Int8Training  # noqa: E402
from lq.ops.hardware import record_kernels  # noqa: E402
from test_callbacks import DigitsData, Plain, digits  # noqa: E402

QAT_CONFIG = lq.QuantConfig(
    weight=lq.QuantSpec(granularity="per_channel", calibrator="percentile", percentile=99.9),
    activation=lq.QuantSpec(calibrator="entropy"),
)
BATCH = 100  # per rank


class ShardedPlain(Plain):
    """The user's module made FSDP2-ready the way Lightning documents it: fully_shard in configure_model
    (which runs after the callbacks' setup, so it shards the layers lq swapped in)."""

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def configure_optimizers(self):  # plain SGD with momentum; the test repeats it in one process
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class HalfPerRank(pl.LightningDataModule):
    """Rank r trains on training samples r, r+2, r+4, ... in order, BATCH at a time."""

    def train_dataloader(self):
        data = digits("train")
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(Subset(data, range(rank, len(data), world)), batch_size=BATCH)


def shard_loop(model):
    """Each rank sees a different half of the training inputs."""
    x = digits("train").tensors[0]
    model(x[model.trainer.global_rank :: model.trainer.world_size])


def whole(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor shard: every rank calls it in the same order)."""
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


class SaveQAT(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_fit_start(self, trainer, pl_module):  # after Int8QAT's on_fit_start: calibrated
        torch.save(
            {
                "amax": {n: q.amax.clone() for n, q in lq.quantizers(pl_module).items() if not q.dynamic},
                "sharded": sorted(n for n, p in pl_module.named_parameters() if isinstance(p, DTensor)),
                "layers": {n: type(m).__name__ for n, m in lq.quantized_layers(pl_module).items()},
            },
            f"{self.out_dir}/qat_rank{trainer.global_rank}.pt",
        )


class SaveParams(Callback):
    def __init__(self, out_dir, ran):
        self.out_dir, self.ran = out_dir, ran

    def on_train_end(self, trainer, pl_module):
        params = {n: whole(p) for n, p in pl_module.named_parameters()}
        sharded = sorted(n for n, p in pl_module.named_parameters() if isinstance(p, DTensor))
        torch.save({"params": params, "sharded": sharded, "kernels": Counter(self.ran)},
                   f"{self.out_dir}/training_rank{trainer.global_rank}.pt")


def trainer(callbacks, max_steps, **kw):
    return pl.Trainer(**kw,
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )


def fresh(init):
    m = ShardedPlain()
    m.load_state_dict(init)
    return m


def main(out_dir: str) -> None:
    init = torch.load(f"{out_dir}/init.pt")
    qat = Int8QAT(QAT_CONFIG, num_samples=4096, calibration_data=shard_loop)
    trainer([qat, SaveQAT(out_dir)], max_steps=1).fit(fresh(init), DigitsData(shuffle=False))

    with record_kernels() as ran:
        t = trainer([Int8Training(compute=lq.ops.Int8ComputeConfig.for_this_machine(grad_rounding="nearest")), SaveParams(out_dir, ran)], 1,
                    use_distributed_sampler=False)
        t.fit(fresh(init), HalfPerRank())


if __name__ == "__main__":
    main(sys.argv[1])
