"""Every callback of the library, with a realistic configuration: a new callback joins with one entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lightning.pytorch import Callback

from lightning_transfer import (
    DTNH,
    L2SP,
    RIFLE,
    AnatomyError,
    FeatureMapRegularization,
    FreezeSchedule,
    MaxEntropyHeadInit,
    RepresentationSimilarity,
)


@dataclass
class Model:
    """What a callback may need to know of the model it is configured for."""

    head: str | None = None
    layers: tuple[str, ...] = ("backbone.0", "backbone.1")


@dataclass
class Entry:
    make: Callable[[Model], list[Callback]]
    yaml: list[dict]  # trainer.callbacks entries for LightningCLI
    bad: list[tuple[Callable[[], list[Callback]], type[Exception], str]] = field(default_factory=list)
    max_epochs: int = 4  # resume tests stop at max_epochs // 2
    stateful: bool = True
    two_instances: bool = False
    trainer: dict = field(default_factory=dict)  # extra Trainer arguments the callback needs


def _l2sp(m: Model) -> list[Callback]:
    return [L2SP(alpha=1.0, beta=0.1, head=m.head)]


REGISTRY: dict[str, Entry] = {
    "L2SP": Entry(
        make=_l2sp,
        yaml=[{"class_path": "lightning_transfer.L2SP", "init_args": {"alpha": 0.5, "norm": "l1"}}],
        bad=[(lambda: [L2SP(head="nope")], AnatomyError, "Unknown head"),
             (lambda: [L2SP(exclude=["zzz"])], AnatomyError, "matches no parameter")],
        two_instances=True,
    ),
    "L2SP-decoupled": Entry(
        make=lambda m: [L2SP(alpha=1.0, decoupled=True, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.L2SP", "init_args": {"alpha": 0.5, "decoupled": True}}],
    ),
    "FeatureMapRegularization": Entry(
        make=lambda m: [FeatureMapRegularization(list(m.layers), alpha=1.0)],
        yaml=[{"class_path": "lightning_transfer.FeatureMapRegularization",
               "init_args": {"layers": ["backbone.0"], "alpha": 0.1}}],
        bad=[(lambda: [FeatureMapRegularization(["backbone.9"])], AnatomyError, "Unknown layer")],
        two_instances=True,
    ),
    "FeatureMapRegularization-attention": Entry(  # attention measured at the start of epoch 1
        make=lambda m: [FeatureMapRegularization(list(m.layers), alpha=1.0, attention=True, attention_epoch=1)],
        yaml=[{"class_path": "lightning_transfer.FeatureMapRegularization",
               "init_args": {"layers": ["backbone.1"], "attention": True, "attention_epoch": 2}}],
    ),
    "DTNH+L2SP": Entry(
        make=lambda m: [DTNH(), *_l2sp(m)],
        yaml=[{"class_path": "lightning_transfer.DTNH"},
              {"class_path": "lightning_transfer.L2SP", "init_args": {"alpha": 1.0}}],
        bad=[(lambda: [DTNH()], ValueError, "needs a regularizer")],
    ),
    "DTNH+FeatureMapRegularization": Entry(
        make=lambda m: [FeatureMapRegularization(list(m.layers), alpha=1.0), DTNH(granularity="global")],
        yaml=[{"class_path": "lightning_transfer.DTNH", "init_args": {"granularity": "global"}},
              {"class_path": "lightning_transfer.FeatureMapRegularization", "init_args": {"layers": ["backbone.1"]}}],
    ),
    "MaxEntropyHeadInit": Entry(
        make=lambda m: [MaxEntropyHeadInit(head=m.head)],
        yaml=[{"class_path": "lightning_transfer.MaxEntropyHeadInit", "init_args": {"bias": "zero"}}],
        bad=[(lambda: [MaxEntropyHeadInit(bias="log_prior", class_counts=[1, 1])], ValueError, "class_counts has 2")],
    ),
    "RIFLE": Entry(
        make=lambda m: [RIFLE(points=[3], min_epochs_after=2, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.RIFLE", "init_args": {"num_reinits": 1, "min_epochs_after": 1}}],
        bad=[(lambda: [RIFLE(num_reinits=9)], ValueError, "cannot place")],
        max_epochs=6,
    ),
    "FreezeSchedule": Entry(  # block 0 frozen throughout, block 1 unfrozen at epoch 2 (after the DDP wrap)
        make=lambda m: [FreezeSchedule(milestones={0: 2, 2: 1}, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.FreezeSchedule", "init_args": {"milestones": {0: "all", 1: 0}}}],
        bad=[(lambda: [FreezeSchedule(depth=3)], ValueError, "out of range"),
             (lambda: [FreezeSchedule(milestones={0: 1, 9: 0})], ValueError, "past max_epochs")],
    ),
    "FreezeSchedule-gradual": Entry(
        make=lambda m: [FreezeSchedule.gradual(every=1, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.FreezeSchedule", "init_args": {"depth": 1, "unfreeze_every": 2}}],
        bad=[(lambda: [FreezeSchedule(depth=1, blocks=["backbone.9"])], AnatomyError, "match no parameter")],
    ),
    "RepresentationSimilarity": Entry(
        make=lambda m: [RepresentationSimilarity(blocks=None, probe_size=16, measures=["cka", "overlap"], k=3)],
        yaml=[{"class_path": "lightning_transfer.RepresentationSimilarity", "init_args": {"probe_size": 64}}],
        bad=[(lambda: [RepresentationSimilarity(blocks=["backbone.5"])], AnatomyError, "match no parameter")],
        trainer={"limit_val_batches": 2},
    ),
}
