"""Every callback of the library, with a realistic configuration: a new callback joins with one entry."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from lightning_transfer import (
    BSS,
    DTNH,
    L2SP,
    RIFLE,
    SPD,
    AnatomyError,
    CoTuning,
    FeatureMapRegularization,
    FreezeSchedule,
    LiNeS,
    MaxEntropyHeadInit,
    RepresentationSimilarity,
    StochNorm,
    WiSEFT,
)
from tests.helpers import TinyClassifier


@dataclass
class Model:
    """What a callback may need to know of the model it is configured for."""

    head: str | None = None
    layers: tuple[str, ...] = ("backbone.0", "backbone.1")


TINY = Model()  # TinyClassifier's


@dataclass
class Entry:
    make: Callable[[Model], list[Callback]]
    yaml: list[dict]  # trainer.callbacks entries for LightningCLI
    bad: list[tuple[Callable[[], list[Callback]], type[Exception], str]] = field(default_factory=list)
    max_epochs: int = 4  # resume tests stop at max_epochs // 2
    stateful: bool = True
    two_instances: bool = False
    trainer: dict = field(default_factory=dict)  # extra Trainer arguments the callback needs
    module: dict = field(default_factory=dict)  # extra TinyClassifier arguments (e.g. layer_decay)
    transitions: list[int] = field(default_factory=list)  # epochs at whose start the callbacks change something
    # An independent reference: (module kwargs, callbacks) whose run must equal the entry's run, e.g. the
    # regularizer replaced by its penalty in the loss, differentiated by autograd. Called with no argument
    # for TinyClassifier, or with the Model of another network (tests/contract/test_transformers.py).
    reference: Callable[..., tuple[dict, list[Callback]]] | None = None
    # The penalty is a function of the whole batch (BSS's singular values, like BatchNorm's statistics): a window
    # of micro-batches then gives the sum of the micro-batches' penalties, which the accumulation columns check
    # against ``reference`` run with the same accumulation instead of against one full batch.
    batch_dependent: bool = False


class SourceHead(torch.nn.Module):
    """A fixed random Linear to ``classes`` source classes, its input width taken at the first call: Co-Tuning's
    source head for any model (TinyClassifier, the transformer families), the same weights in every run."""

    def __init__(self, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        self.classes, self.seed = classes, seed
        self.weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.weight.shape[1] != x.shape[-1]:
            g = torch.Generator().manual_seed(self.seed)
            self.weight = (torch.randn(self.classes, x.shape[-1], generator=g) / x.shape[-1] ** 0.5).to(x.device)
        return F.linear(x, self.weight.to(x.device, x.dtype))


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
    "WiSEFT": Entry(
        make=lambda m: [WiSEFT(alphas=[0.0, 0.5, 1.0], head=m.head)],
        yaml=[{"class_path": "lightning_transfer.WiSEFT", "init_args": {"alphas": [0.0, 0.5, 1.0], "select": "best"}}],
        bad=[(lambda: [WiSEFT(head="nope")], AnatomyError, "Unknown head"),
             (lambda: [WiSEFT(alphas=[0.5, 1.5])], ValueError, "alphas")],
    ),
    # One candidate a = 0.5 and the slope b = 0.5 (coefficients 0.5 ... 1 by depth): every column checks the depth
    # scaling itself, never a choice between candidates that bf16 or compile could flip on 32 validation examples
    # (the choice is checked in tests/test_lines.py, and under FSDP2 by "L2SP+LiNeS").
    "LiNeS": Entry(
        make=lambda m: [LiNeS(alphas=[0.5], beta=0.5, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.LiNeS", "init_args": {"alphas": [0.0, 0.5, 1.0], "beta": 0.5}}],
        bad=[(lambda: [LiNeS(head="nope")], AnatomyError, "Unknown head"),
             (lambda: [LiNeS(blocks=["backbone.9"])], AnatomyError, "match no parameter"),
             (lambda: [LiNeS(beta=-0.5)], ValueError, "beta")],
    ),
    "CoTuning": Entry(
        make=lambda m: [CoTuning(SourceHead(), alpha=1.0, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.CoTuning",
               "init_args": {"source_head": {"class_path": "torch.nn.Linear",
                                             "init_args": {"in_features": 32, "out_features": 5}}, "alpha": 2.3}}],
        bad=[(lambda: [CoTuning(SourceHead(), head="nope")], AnatomyError, "Unknown head"),
             (lambda: [CoTuning(torch.nn.Linear(7, 5))], ValueError, "source_head cannot take"),
             (lambda: [CoTuning(SourceHead(), alpha=-1.0)], ValueError, "alpha")],
    ),
    # A fixed seed: every column compares runs, which must draw the same masks (seed=None is saved and restored).
    "StochNorm": Entry(
        make=lambda m: [StochNorm(p=0.5, seed=0)],
        yaml=[{"class_path": "lightning_transfer.StochNorm", "init_args": {"p": 0.5, "seed": 1}}],
        bad=[(lambda: [StochNorm(p=1.5)], ValueError, "p must be"),
             (lambda: [StochNorm(seed=-1)], ValueError, "seed")],
    ),
    "SPD": Entry(
        make=lambda m: [SPD(lam=1.0, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.SPD", "init_args": {"lam": 0.5}}],
        bad=[(lambda: [SPD(head="nope")], AnatomyError, "Unknown head"),
             (lambda: [SPD(exclude=["zzz"])], AnatomyError, "matches no parameter"),
             (lambda: [SPD(lam=-1.0)], ValueError, "lam")],
    ),
    "BSS": Entry(
        make=lambda m: [BSS(eta=0.5, k=2, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.BSS", "init_args": {"eta": 0.01, "k": 1}}],
        bad=[(lambda: [BSS(head="nope")], AnatomyError, "Unknown head"),
             (lambda: [BSS(k=0)], ValueError, "k must be")],
        stateful=False,
        reference=lambda m=TINY: ({"cls": BSSPenaltyInLoss, "eta": 0.5, "k": 2}, []),
        batch_dependent=True,
    ),
}


def l2sp_in_loss(alpha: float, beta: float, head: str = "head") -> Callable:
    """``α/2·‖w − w0‖²`` on every non-head parameter and ``β/2·‖w‖²`` on the head, added to the loss.

    ``w0`` is taken at the first training step, before any update: the weights at fit start.
    """
    anchors: dict[str, torch.Tensor] = {}

    def extra_loss(module):
        named = dict(module.named_parameters())
        if not anchors:
            anchors.update({n: p.detach().clone() for n, p in named.items()})
        total = 0.0
        for n, p in named.items():
            total = total + (beta / 2 * p.square().sum() if n.startswith(head + ".")
                             else alpha / 2 * (p - anchors[n]).square().sum())
        return total

    return extra_loss


class BSSPenaltyInLoss(TinyClassifier):
    """TinyClassifier whose loss includes BSS's ``η·Σ_{i≤k} σ_i²`` of the head's input (autograd through svdvals)."""

    def __init__(self, eta: float = 0.5, k: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.eta, self.k = eta, k

    def training_step(self, batch, batch_idx):
        x, y = batch
        f = self.backbone(x)
        s = torch.linalg.svdvals(f.float())
        loss = F.cross_entropy(self.head(f), y) + self.eta * s[-self.k:].square().sum()
        return loss + self.extra_loss(self) if self.extra_loss is not None else loss


class FeaturePenaltyInLoss(TinyClassifier):
    """TinyClassifier whose loss includes DELTA's penalty ``α/2·Σ_layers mean_batch ‖F − F0‖²`` itself.

    ``F0`` comes from an eval-mode copy of the backbone taken at the first training step (the weights at
    fit start), run on the same inputs: an independent implementation of FeatureMapRegularization.
    """

    def __init__(self, layers: tuple[str, ...] = ("backbone.0", "backbone.1"), alpha: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.layers, self.alpha = layers, alpha
        self._frozen: list[torch.nn.Module] = []  # a list: not registered as a submodule

    def training_step(self, batch, batch_idx):
        if not self._frozen:
            self._frozen.append(copy.deepcopy(self.backbone).eval().requires_grad_(False))
        x, y = batch
        live, ref = {}, {}
        hooks = [self.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: live.__setitem__(n, o))
                 for n in self.layers]
        hooks += [self._frozen[0].get_submodule(n.split(".", 1)[1]).register_forward_hook(
            lambda m, a, o, n=n: ref.__setitem__(n, o)) for n in self.layers]
        logits = self(x)
        with torch.no_grad():
            self._frozen[0](x)
        for h in hooks:
            h.remove()
        penalty = sum((live[n] - ref[n]).square().flatten(1).sum(1).mean() for n in self.layers)
        return F.cross_entropy(logits, y) + self.alpha / 2 * penalty


# Callback combinations that the README recommends or permits. Each runs every contract test above
# (resume, DDP, precision, accumulation, clipping, state, CLI) plus a resume at each of its transitions
# and, where one exists, a comparison with an independent reference.
COMBINATIONS: dict[str, Entry] = {
    "SPD+FreezeSchedule": Entry(
        make=lambda m: [SPD(lam=1.0, head=m.head), FreezeSchedule(milestones={0: 2, 2: 1}, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.SPD", "init_args": {"lam": 0.5}},
              {"class_path": "lightning_transfer.FreezeSchedule", "init_args": {"depth": 1}}],
        transitions=[2],
    ),
    "BSS+L2SP": Entry(
        make=lambda m: [BSS(eta=0.5, k=2, head=m.head), L2SP(alpha=1.0, beta=0.1, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.BSS", "init_args": {"eta": 0.01}},
              {"class_path": "lightning_transfer.L2SP", "init_args": {"alpha": 0.5}}],
        reference=lambda m=TINY: ({"cls": BSSPenaltyInLoss, "eta": 0.5, "k": 2,
                                   "extra_loss": l2sp_in_loss(1.0, 0.1, m.head or "head")}, []),
        batch_dependent=True,
        max_epochs=6,  # its fp16 backward overflows at a loss scale of 2**20 for 4 steps: 2 more are taken
    ),
    "StochNorm+FreezeSchedule": Entry(  # block 0 (with the BatchNorm) frozen, in eval mode, until epoch 2
        make=lambda m: [StochNorm(p=0.5, seed=0), FreezeSchedule(milestones={0: 1, 2: 0}, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.StochNorm", "init_args": {"p": 0.5}},
              {"class_path": "lightning_transfer.FreezeSchedule", "init_args": {"milestones": {0: 1, 2: 0}}}],
        transitions=[2],
    ),
    "L2SP+FreezeSchedule": Entry(
        make=lambda m: [L2SP(alpha=1.0, beta=0.1, head=m.head), FreezeSchedule(milestones={0: 2, 2: 1}, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.L2SP", "init_args": {"alpha": 0.5}},
              {"class_path": "lightning_transfer.FreezeSchedule", "init_args": {"depth": 1}}],
        transitions=[2],
        reference=lambda m=TINY: ({"extra_loss": l2sp_in_loss(1.0, 0.1, m.head or "head")},
                                     [FreezeSchedule(milestones={0: 2, 2: 1})]),
    ),
    "DELTA+LP-FT": Entry(
        make=lambda m: [FeatureMapRegularization(list(m.layers), alpha=1.0), FreezeSchedule.lp_ft(probe_epochs=2)],
        yaml=[{"class_path": "lightning_transfer.FeatureMapRegularization", "init_args": {"layers": ["backbone.1"]}},
              {"class_path": "lightning_transfer.FreezeSchedule", "init_args": {"milestones": {0: "all", 2: 0}}}],
        transitions=[2],
        reference=lambda m=TINY: ({"cls": FeaturePenaltyInLoss, "layers": m.layers, "alpha": 1.0},
                                     [FreezeSchedule.lp_ft(probe_epochs=2)]),
    ),
    "DTNH+DELTA+gradual": Entry(
        make=lambda m: [FeatureMapRegularization(list(m.layers), alpha=1.0), DTNH(), FreezeSchedule.gradual(every=1)],
        yaml=[{"class_path": "lightning_transfer.FeatureMapRegularization", "init_args": {"layers": ["backbone.0"]}},
              {"class_path": "lightning_transfer.DTNH"},
              {"class_path": "lightning_transfer.FreezeSchedule", "init_args": {"depth": "all", "unfreeze_every": 1}}],
        transitions=[1, 2],
    ),
    "DTNH+L2SP+LP-FT": Entry(
        make=lambda m: [DTNH(), L2SP(alpha=1.0, beta=0.1, head=m.head), FreezeSchedule.lp_ft(probe_epochs=1, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.DTNH"}, {"class_path": "lightning_transfer.L2SP"},
              {"class_path": "lightning_transfer.FreezeSchedule", "init_args": {"milestones": {0: "all", 1: 0}}}],
        transitions=[1],
    ),
    "MEI+RIFLE": Entry(
        make=lambda m: [MaxEntropyHeadInit(head=m.head), RIFLE(points=[2], min_epochs_after=1, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.MaxEntropyHeadInit"},
              {"class_path": "lightning_transfer.RIFLE", "init_args": {"num_reinits": 1, "min_epochs_after": 1}}],
        transitions=[2],
    ),
    "RIFLE+FreezeSchedule": Entry(
        make=lambda m: [RIFLE(points=[2], min_epochs_after=1, head=m.head),
                        FreezeSchedule(milestones={0: 2, 1: 1, 3: 0}, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.RIFLE", "init_args": {"num_reinits": 1, "min_epochs_after": 1}},
              {"class_path": "lightning_transfer.FreezeSchedule", "init_args": {"milestones": {0: 1, 1: 0}}}],
        transitions=[1, 2, 3],
    ),
    "L2SP+layer_decay": Entry(
        make=lambda m: [L2SP(alpha=1.0, beta=0.1, head=m.head)],
        yaml=[{"class_path": "lightning_transfer.L2SP", "init_args": {"alpha": 0.1}}],
        module={"layer_decay": 0.5},
        reference=lambda m=TINY: ({"layer_decay": 0.5, "extra_loss": l2sp_in_loss(1.0, 0.1, m.head or "head")}, []),
    ),
    "L2SP+WiSEFT": Entry(  # WiSE-FT interpolates toward L2SP's anchors (one copy of w0)
        make=lambda m: [L2SP(alpha=1.0, beta=0.1, head=m.head), WiSEFT(alphas=[0.0, 0.5, 1.0], head=m.head)],
        yaml=[{"class_path": "lightning_transfer.L2SP", "init_args": {"alpha": 0.1}},
              {"class_path": "lightning_transfer.WiSEFT", "init_args": {"alphas": [0.0, 0.5, 1.0]}}],
    ),
    "L2SP+LiNeS": Entry(  # LiNeS after L2SP: its depth scaling toward L2SP's anchors (one copy of w0)
        make=lambda m: [L2SP(alpha=1.0, beta=0.1, head=m.head), LiNeS(alphas=[0.0, 0.5, 1.0], head=m.head)],
        yaml=[{"class_path": "lightning_transfer.L2SP", "init_args": {"alpha": 0.1}},
              {"class_path": "lightning_transfer.LiNeS", "init_args": {"alphas": [0.0, 0.5, 1.0]}}],
    ),
    "FreezeSchedule+RepresentationSimilarity": Entry(
        make=lambda m: [FreezeSchedule(milestones={0: 2, 2: 0}, head=m.head),
                        RepresentationSimilarity(probe_size=16, measures=["cka", "overlap"], k=3)],
        yaml=[{"class_path": "lightning_transfer.FreezeSchedule", "init_args": {"depth": 1}},
              {"class_path": "lightning_transfer.RepresentationSimilarity", "init_args": {"probe_size": 16}}],
        transitions=[2],
        trainer={"limit_val_batches": 2},
    ),
}

SINGLE = list(REGISTRY)
REGISTRY.update(COMBINATIONS)
