"""2-rank CPU FSDP2 fits (``ModelParallelStrategy``, gloo) of registry entries. Run as a script.

    python tests/contract/sharded_run.py OUT [--resume] NAME [NAME ...] [!REJECTED_NAME ...]

For each entry, rank 0 writes ``OUT/<NAME>.pt``: the full parameters after an uninterrupted sharded run
(``p.full_tensor()``), plus, per L2SP callback, the numel of this rank's anchors and of the anchored
parameters (per WiSEFT or LiNeS callback, the same of its own copies of ``w0``). With ``--resume`` it also writes ``OUT/<NAME>-resumed.pt``: a run interrupted at
``max_epochs // 2`` and resumed from its distributed checkpoint into a model initialized differently.
All entries run in one launch (process start-up dominates a tiny fit). A name prefixed with ``!`` is
expected to fail at setup: ``OUT/<NAME>.pt`` then holds the error message and the steps that ran.

Per-rank batches of 8 with a DistributedSampler(shuffle=False) (rank r gets r, r+2, ...; Lightning's own
sampler always shuffles the training data, so ``use_distributed_sampler=False``) make global batch b the
single-process batch b of size 16: :func:`reference` is that run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from lightning_transfer import (  # noqa: E402
    DTNH,
    L2SP,
    FeatureMapRegularization,
    FreezeSchedule,
    MaxEntropyHeadInit,
    RepresentationSimilarity,
)
from lightning_transfer.callbacks.weight_space import WeightSpaceSelection  # noqa: E402
from lightning_transfer.functional import save_fisher  # noqa: E402
from lightning_transfer.functional.sharding import fully_shard_linears, local  # noqa: E402
from tests.contract.multiprocess import finish, record_refusal  # noqa: E402
from tests.contract.registry import REGISTRY, Entry, Model  # noqa: E402
from tests.helpers import StopAfter, TinyClassifier, make_data, quiet_trainer  # noqa: E402

FISHER = "fisher.pt"  # written into OUT (and into the reference's folder) by make_fisher


def make_fisher(folder: Path) -> str:
    """A deterministic diagonal Fisher for TinyClassifier's transferred parameters."""
    g = torch.Generator().manual_seed(7)
    shapes = {n: p.shape for n, p in TinyClassifier(norm=False).named_parameters() if not n.startswith("head.")}
    path = folder / FISHER
    save_fisher({n: torch.rand(s, generator=g) + 0.5 for n, s in shapes.items()}, path)
    return str(path)


def extra_entries(folder: Path) -> dict[str, Entry]:
    """Configurations beyond the registry's that take other sharded code paths (norms, Fisher, fused, ...)."""
    return {
        "plain": Entry(make=lambda m: [], yaml=[]),  # the set-up alone
        "L2SP-l1": Entry(make=lambda m: [L2SP(alpha=0.1, beta=0.1, norm="l1")], yaml=[]),
        "L2SP-group_lasso": Entry(make=lambda m: [L2SP(alpha=0.1, beta=0.1, norm="group_lasso")], yaml=[]),
        "L2SP-fisher": Entry(make=lambda m: [L2SP(alpha=1.0, beta=0.1, fisher=make_fisher(folder))], yaml=[]),
        "L2SP-fused": Entry(make=lambda m: [L2SP(alpha=1.0, beta=0.1, fused=True)], yaml=[]),
        "DTNH-global+L2SP-gl": Entry(make=lambda m: [DTNH(granularity="global"), L2SP(alpha=1.0, norm="group_lasso")],
                                     yaml=[]),
        "MEI-log_prior": Entry(make=lambda m: [MaxEntropyHeadInit(bias="log_prior")], yaml=[]),
        # 5 classes: the head's rows split 3 + 2 over the ranks (uneven shards)
        "DTNH+L2SP-gl-uneven": Entry(make=lambda m: [DTNH(), L2SP(alpha=0.1, beta=0.1, norm="group_lasso")], yaml=[],
                                     module={"classes": 5}),
        # a parameter frozen by the user before fit stays frozen (fully_shard replaces the parameter objects)
        "FreezeSchedule-user-frozen": Entry(make=lambda m: [FreezeSchedule(milestones={0: 2, 2: 0})], yaml=[],
                                            module={"frozen": ("backbone.1.0.bias",)}),
    }


def entries(folder: Path) -> dict[str, Entry]:
    return {**REGISTRY, **extra_entries(folder)}


class Tiny(TinyClassifier):
    """TinyClassifier with ``frozen`` parameter names set to ``requires_grad=False`` (by the user) at init."""

    def __init__(self, frozen: tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        for n, p in self.named_parameters():
            if n in frozen:
                p.requires_grad_(False)


class PerRankBatches(Tiny):
    """The single-process run of a batch-dependent entry (BSS): each global batch of 16 as two micro-batches of 8,
    rank 0's part (its even indices, DistributedSampler's share) then rank 1's, accumulated: the average of the
    ranks' gradients, which is what a sharded (or DDP) run computes when each rank penalizes its own batch."""

    def train_dataloader(self):
        order = []
        for b in range(0, self.n, 16):
            order += list(range(b, min(b + 16, self.n), 2)) + list(range(b + 1, min(b + 16, self.n), 2))
        return DataLoader(make_data(self.n, self.dim, self.classes), batch_size=8, sampler=order)


class ShardedTiny(Tiny):
    """Tiny without BatchNorm (per-rank statistics would differ), ``fully_shard``-ed per Linear."""

    def configure_model(self):
        if self.device_mesh is not None:
            fully_shard_linears(self, self.device_mesh["data_parallel"])

    def train_dataloader(self):
        data = make_data(self.n, self.dim, self.classes)
        sampler = DistributedSampler(data, shuffle=False, **self.trainer.strategy.distributed_sampler_kwargs)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


def reference(entry: Entry) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The single-process run on the same global batches: its parameters and the callbacks' last logged values."""
    if entry.batch_dependent:  # each rank's own batch: micro-batches of 8 in the ranks' composition, accumulated
        model = PerRankBatches(batch_size=8, norm=False, **entry.module)
        extra = {"accumulate_grad_batches": 2}
    else:
        model, extra = Tiny(batch_size=16, norm=False, **entry.module), {}
    trainer = quiet_trainer(max_epochs=entry.max_epochs, callbacks=entry.make(Model()), accelerator="cpu",
                            log_every_n_steps=1, **{**entry.trainer, **extra})
    trainer.fit(model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, _metrics(trainer)


def _metrics(trainer: Trainer) -> dict[str, float]:
    """What the callbacks logged last (their keys hold a "/"), as this rank saw it."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}


def _fit(entry: Entry, seed: int = 0, callbacks=(), **kwargs) -> tuple[Trainer, ShardedTiny]:
    model = ShardedTiny(batch_size=8, norm=False, seed=seed, **entry.module)
    args = dict(accelerator="cpu", devices=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                max_epochs=entry.max_epochs, callbacks=[*entry.make(Model()), *callbacks], log_every_n_steps=1)
    args.update({**entry.trainer, **kwargs})
    return Trainer(**args), model


def _histories(trainer: Trainer) -> list[dict[str, list[float]]]:
    """RepresentationSimilarity's per-epoch values (a resumed run holds the whole history, restored)."""
    return [dict(cb.history) for cb in trainer.callbacks if isinstance(cb, RepresentationSimilarity)]


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
            for n, p in model.named_parameters()}


def run_rejected(folder: Path, name: str, entry: Entry) -> Trainer:
    """An entry expected to fail at setup: rank 0 records the error and how many steps ran."""
    trainer, model = _fit(entry)
    return record_refusal(trainer, lambda: trainer.fit(model), folder / f"{name}.pt")


def run(folder: Path, name: str, entry: Entry, resume: bool) -> Trainer:
    trainer, model = _fit(entry)
    trainer.fit(model)
    result = {"params": _full(model), "anchors": [], "w0": [], "reference": [], "metrics": _metrics(trainer),
              "history": _histories(trainer)}
    for cb in trainer.callbacks:
        if isinstance(cb, WeightSpaceSelection):  # WiSEFT, LiNeS: their own copies of w0
            result["w0"].append({"local": sum(t.numel() for t in cb._own.values()),
                                 "full": sum(cb._params[n].numel() for n in cb._own),
                                 "types": sorted({type(t).__name__ for t in cb._own.values()})})
        if isinstance(cb, FeatureMapRegularization):  # DELTA: its reference copy, sharded as the live model
            refs = list(cb._reference.parameters())
            result["reference"].append({"local": sum(local(p).numel() for p in refs),
                                        "full": sum(p.numel() for p in refs),
                                        "bytes": sum(local(p).numel() * p.element_size() for p in refs),
                                        "types": sorted({type(p).__name__ for p in refs})})
        if isinstance(cb, L2SP):
            result["anchors"].append({"local": sum(a.numel() for a in cb._anchors),
                                      "full": sum(p.numel() for p in cb._params),
                                      "types": sorted({type(a).__name__ for a in cb._anchors})})
    if resume:
        ckpt_dir = folder / f"ckpt-{name}"
        t1, first = _fit(entry, callbacks=[StopAfter(entry.max_epochs // 2),
                                           ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
                         enable_checkpointing=True)
        t1.fit(first)
        t2, resumed = _fit(entry, seed=123)  # a different init: everything must come from the checkpoint
        t2.fit(resumed, ckpt_path=str(ckpt_dir / "last.ckpt"))
        result["resumed"], result["resumed_history"] = _full(resumed), _histories(t2)
    if trainer.global_rank == 0:
        torch.save(result, folder / f"{name}.pt")
    return trainer


if __name__ == "__main__":
    out, args = Path(sys.argv[1]), sys.argv[2:]
    resume = "--resume" in args
    known = entries(out)
    trainers = []
    for name in [a for a in args if a != "--resume"]:
        if name.startswith("!"):  # expected to be rejected at setup (put these last)
            trainers.append(run_rejected(out, name[1:], known[name[1:]]))
        else:
            trainers.append(run(out, name, known[name], resume))
    finish(*trainers)
