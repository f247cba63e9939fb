"""2-rank CPU fits of registry entries on one transformer family (hf_bert by default). Run as a script.

    python tests/contract/transformer_multiprocess_run.py {ddp|fsdp2} OUT [--family F] [--blocks] NAME [!NAME ...]

Each rank writes ``OUT/<NAME>-rank<r>.pt``: its full parameters after the fit (FSDP2: ``full_tensor()``), and
``OUT/<NAME>-metrics-rank<r>.pt``: what the callbacks logged last (keys holding a "/"), as that rank saw it.
Per-rank batches of 8 through a ``DistributedSampler(shuffle=False)`` (rank r gets examples r, r+2, ...)
make global batch b the single-process batch b of 16: :func:`single_process_reference` is that run.

FSDP2 (``ModelParallelStrategy``): by default the test's :class:`ShardedTransfer` shards per ``nn.Linear``
then the root; with ``--blocks`` the library's own ``TransferClassifier.configure_model`` shards, one
``fully_shard`` unit per anatomy block (the head included) then the root.
All entries run in one launch, one after the other (process start-up dominates a tiny fit). A name prefixed
with ``!`` is expected to fail before the first step (put it last): rank 0 writes ``OUT/<NAME>-refused.pt``,
the error message (None if the fit ran) and the global step reached.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from lightning_transfer import TransferClassifier  # noqa: E402
from lightning_transfer.functional.sharding import fully_shard_linears  # noqa: E402
from tests.contract.multiprocess import finish, record_refusal  # noqa: E402
from tests.contract.registry import REGISTRY  # noqa: E402
from tests.contract.transformer_models import FAMILIES, FamilyData, build, lr_for  # noqa: E402
from tests.helpers import params_of, quiet_trainer  # noqa: E402

FAMILY = "hf_bert"  # the default family


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


def callback_metrics(trainer: Trainer) -> dict[str, float]:
    """What the callbacks logged last (their keys hold a "/"), as this rank saw it."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}


@functools.cache
def _reference(name: str, family: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    entry = REGISTRY[name]
    model = build(family, lr=lr_for(entry))
    trainer = quiet_trainer(max_epochs=entry.max_epochs, callbacks=entry.make(FAMILIES[family].model),
                            accelerator="cpu", log_every_n_steps=1, **entry.trainer)
    trainer.fit(model, datamodule=FamilyData(family, batch_size=16))
    return params_of(model), callback_metrics(trainer)


def single_process_reference(name: str, family: str = FAMILY) -> dict[str, torch.Tensor]:
    """The entry's single-process run on global batches of 16: its parameters (cached: compare, never modify)."""
    return _reference(name, family)[0]


def single_process_metrics(name: str, family: str = FAMILY) -> dict[str, float]:
    """What the callbacks of that single-process run logged last."""
    return _reference(name, family)[1]


def run(kind: str, out: Path, name: str, family: str = FAMILY, blocks: bool = False) -> Trainer:
    refused = name.startswith("!")
    name = name.removeprefix("!")
    entry = REGISTRY[name]
    sharded = kind == "fsdp2"
    cls = ShardedTransfer if sharded and not blocks else TransferClassifier  # TransferClassifier shards per block
    model = build(family, lr=lr_for(entry), cls=cls)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "ddp"
    trainer = quiet_trainer(max_epochs=entry.max_epochs, accelerator="cpu", devices=2, strategy=strategy,
                            use_distributed_sampler=False, deterministic=False, log_every_n_steps=1,
                            callbacks=entry.make(FAMILIES[family].model), **entry.trainer)
    if refused:
        return record_refusal(trainer, lambda: trainer.fit(model, datamodule=ShardedData(family, batch_size=8)),
                              out / f"{name}-refused.pt")
    trainer.fit(model, datamodule=ShardedData(family, batch_size=8))
    state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
             for n, p in model.named_parameters()}
    torch.save(state, out / f"{name}-rank{trainer.global_rank}.pt")
    torch.save(callback_metrics(trainer), out / f"{name}-metrics-rank{trainer.global_rank}.pt")
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["ddp", "fsdp2"])
    parser.add_argument("out", type=Path)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--family", default=FAMILY, choices=sorted(FAMILIES))
    parser.add_argument("--blocks", action="store_true", help="FSDP2: TransferClassifier's own per-block sharding")
    args = parser.parse_args()
    trainers = [run(args.kind, args.out, n, args.family, args.blocks) for n in args.names]
    finish(*trainers)
