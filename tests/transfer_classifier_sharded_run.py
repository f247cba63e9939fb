"""2-rank CPU FSDP2 fits of ``TransferClassifier`` as it is: its own ``configure_model`` shards it per block
under ``ModelParallelStrategy`` (gloo). Run as a script.

    python tests/transfer_classifier_sharded_run.py OUT FAMILY [FAMILY ...]

``FAMILY`` is ``cnn`` (:class:`SmallConvNet`, the user's own network) or ``bert`` (a tiny random-initialized
Hugging Face BERT on padded dict batches, from tests/contract/transformer_models.py). For each, rank 0
writes ``OUT/<FAMILY>.pt``: the full parameters after ``EPOCHS`` epochs (``p.full_tensor()``); the full
parameters of a run stopped at ``EPOCHS // 2`` and resumed from its distributed checkpoint into a model
initialized differently; whether that checkpoint is a folder (per-rank shards); the names of the modules
that are FSDP2 units; and the parameters' numel on this rank and in full. All families run in one launch.

Per-rank batches of 8 through a ``DistributedSampler(shuffle=False)`` (rank r gets examples r, r+2, ...)
make global batch b the single-process batch b of 16: :func:`reference` is that run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from lightning_transfer import TransferClassifier  # noqa: E402
from lightning_transfer.functional.sharding import is_sharded  # noqa: E402
from tests.contract.multiprocess import finish  # noqa: E402
from tests.contract.transformer_models import CLASSES, _images, _TokenData, build  # noqa: E402
from tests.helpers import StopAfter, params_of, quiet_trainer  # noqa: E402

EPOCHS, EXAMPLES = 4, 32  # 2 steps of 16 an epoch; the resumed run stops after epoch 2


class SmallConvNet(nn.Module):
    """A user's own conv net, ``fc`` its ImageNet-sized head. No BatchNorm (its batch statistics would be
    per rank): GroupNorm. The root's ``gain`` joins the first block, ``gain|stem.0`` (a BlockGroup: the conv
    is a unit, ``gain`` stays with the root's unit)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.stages = nn.Sequential(nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
                                    nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()))
        self.fc = nn.Linear(16, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x) * self.gain).mean((2, 3)))


def build_model(family: str, seed: int = 0) -> TransferClassifier:
    """The family's TransferClassifier: the CNN with SGD, weight decay and a warmed-up cosine schedule (their
    states are checkpointed too); BERT as the transformer contract builds it (SGD, constant LR)."""
    if family == "bert":
        return build("hf_bert", seed=seed)
    torch.manual_seed(seed)
    return TransferClassifier(SmallConvNet(), num_classes=CLASSES, lr=0.05, weight_decay=1e-4, warmup_steps=2)


def dataset(family: str) -> Dataset:
    return _TokenData(EXAMPLES, 0) if family == "bert" else _images(EXAMPLES, 0)


class SplitData(LightningDataModule):
    """``data`` in order; under several processes split over the ranks by a ``DistributedSampler(shuffle=False)``."""

    def __init__(self, data: Dataset, batch_size: int) -> None:
        super().__init__()
        self.data, self.batch_size = data, batch_size

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.trainer.world_size > 1:
            sampler = DistributedSampler(self.data, shuffle=False, **self.trainer.strategy.distributed_sampler_kwargs)
        return DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)


def reference(family: str) -> dict[str, torch.Tensor]:
    """The single-process run on global batches of 16: its parameters."""
    model = build_model(family)
    quiet_trainer(max_epochs=EPOCHS, accelerator="cpu").fit(model, datamodule=SplitData(dataset(family), 16))
    return params_of(model)


def _fit(family: str, seed: int = 0, ckpt_path: str | None = None, **kwargs) -> tuple[Trainer, TransferClassifier]:
    model = build_model(family, seed)
    args = dict(max_epochs=EPOCHS, accelerator="cpu", devices=2, use_distributed_sampler=False, deterministic=False,
                strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    trainer = quiet_trainer(**{**args, **kwargs})
    trainer.fit(model, datamodule=SplitData(dataset(family), 8), ckpt_path=ckpt_path)
    return trainer, model


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if is_sharded(p) else p).detach().clone() for n, p in model.named_parameters()}


def run(folder: Path, family: str) -> list[Trainer]:
    from torch.distributed.fsdp import FSDPModule

    trainer, model = _fit(family)
    model.configure_model()  # Lightning may call it again: nothing happens
    result = {"params": _full(model),
              "units": [n for n, m in model.named_modules() if isinstance(m, FSDPModule)],
              "numel": (sum(p.to_local().numel() for p in model.parameters()), sum(p.numel() for p in model.parameters()))}
    ckpt_dir = folder / f"ckpt-{family}"
    first, _ = _fit(family, callbacks=[StopAfter(EPOCHS // 2), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
                    enable_checkpointing=True)
    # a different initialization: everything must come from the checkpoint
    resumed_trainer, resumed = _fit(family, seed=123, ckpt_path=str(ckpt_dir / "last.ckpt"))
    result.update(resumed=_full(resumed), checkpoint_is_dir=(ckpt_dir / "last.ckpt").is_dir(),
                  resumed_step=resumed_trainer.global_step)
    if trainer.global_rank == 0:
        torch.save(result, folder / f"{family}.pt")
    return [trainer, first, resumed_trainer]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    finish(*[t for family in sys.argv[2:] for t in run(out, family)])
