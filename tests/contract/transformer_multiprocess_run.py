"""2-rank CPU fits of registry entries on the Hugging Face BERT family. Run as a script.

    python tests/contract/transformer_multiprocess_run.py {ddp|fsdp2} OUT NAME [NAME ...]

Each rank writes ``OUT/<NAME>-rank<r>.pt``: its full parameters after the fit (FSDP2: ``full_tensor()``).
Per-rank batches of 8 through a ``DistributedSampler(shuffle=False)`` (rank r gets examples r, r+2, ...)
make global batch b the single-process batch b of 16: :func:`single_process_reference` is that run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from lightning_transfer import TransferClassifier  # noqa: E402
from lightning_transfer.functional.sharding import fully_shard_linears  # noqa: E402
from tests.contract.multiprocess import finish  # noqa: E402
from tests.contract.registry import REGISTRY  # noqa: E402
from tests.contract.transformer_models import FAMILIES, FamilyData, build, lr_for  # noqa: E402
from tests.helpers import params_of, quiet_trainer  # noqa: E402

FAMILY = "hf_bert"


class ShardedData(FamilyData):
    """FamilyData split over the ranks in order (no shuffle): the global batch is the single-process one."""

    def train_dataloader(self) -> DataLoader:
        data = self._data(self.n, 0)
        sampler = DistributedSampler(data, shuffle=False, **self.trainer.strategy.distributed_sampler_kwargs)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


class ShardedTransfer(TransferClassifier):
    """TransferClassifier ``fully_shard``-ed per Linear, then as a whole (FSDP2)."""

    def configure_model(self) -> None:
        if self.device_mesh is not None:
            fully_shard_linears(self, self.device_mesh["data_parallel"])


def single_process_reference(name: str) -> dict[str, torch.Tensor]:
    """The entry's single-process run on global batches of 16."""
    entry = REGISTRY[name]
    model = build(FAMILY, lr=lr_for(entry))
    quiet_trainer(max_epochs=entry.max_epochs, callbacks=entry.make(FAMILIES[FAMILY].model), accelerator="cpu",
                  **entry.trainer).fit(model, datamodule=FamilyData(FAMILY, batch_size=16))
    return params_of(model)


def run(kind: str, out: Path, name: str) -> Trainer:
    entry = REGISTRY[name]
    sharded = kind == "fsdp2"
    model = build(FAMILY, lr=lr_for(entry), cls=ShardedTransfer if sharded else TransferClassifier)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "ddp"
    trainer = quiet_trainer(max_epochs=entry.max_epochs, accelerator="cpu", devices=2, strategy=strategy,
                            use_distributed_sampler=False, deterministic=False,
                            callbacks=entry.make(FAMILIES[FAMILY].model), **entry.trainer)
    trainer.fit(model, datamodule=ShardedData(FAMILY, batch_size=8))
    state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
             for n, p in model.named_parameters()}
    torch.save(state, out / f"{name}-rank{trainer.global_rank}.pt")
    return trainer


if __name__ == "__main__":
    kind, folder = sys.argv[1], Path(sys.argv[2])
    trainers = [run(kind, folder, entry_name) for entry_name in sys.argv[3:]]
    finish(*trainers)
