"""What WiSE-FT and LiNeS share: ``w0`` kept at fit start, candidates evaluated on validation data when
training ends (BatchNorm re-estimated for each), the best one chosen, and ``w0`` in checkpoints.

A subclass names itself (``owner``, ``prefix``) and says how a coefficient ``a`` turns ``w0`` and ``w_ft``
into a candidate (:meth:`WeightSpaceSelection._candidate`). Under FSDP2 (``ModelParallelStrategy``) every
tensor here is this rank's local shard: ``w0`` is copied shard by shard, candidates are combined shard by
shard, the sharded forward evaluates them (every rank runs every validation batch, so the ranks run the
same collectives and count the same examples), and checkpoints hold the full ``w0`` (gathered when saved).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_transfer.anatomy import lora_factors
from lightning_transfer.batches import train_loader_of, val_loader_of
from lightning_transfer.batchnorm import batchnorm_state_kept, reestimate_batchnorm
from lightning_transfer.callbacks.base import check_still_frozen, movable_parameters, select_parameters
from lightning_transfer.callbacks.l2sp import L2SP
from lightning_transfer.functional.interpolation import check_low_rank_start
from lightning_transfer.functional.sharding import check_shardable, full_tensor, is_sharded, local, shard_like
from lightning_transfer.soup import count_correct, has_batchnorm
from lightning_transfer.validation import (
    check_choice,
    check_int,
    check_number,
    check_optional_str,
    check_strategy,
)
from lightning_transfer.weight_averaging import (
    adopt_average,
    average_in_model,
    find_weight_averaging,
    set_average,
)

__all__ = ["DEFAULT_ALPHAS", "WeightSpaceSelection", "alpha_name"]

DEFAULT_ALPHAS = [i / 10 for i in range(11)]


def alpha_name(a: float) -> str:
    return f"{a:.2f}" if round(a, 2) == a else f"{a:g}"


class WeightSpaceSelection(Callback):
    """Base of :class:`~lightning_transfer.WiSEFT` and :class:`~lightning_transfer.LiNeS` (see theirs for the
    behaviour); a subclass sets ``owner`` and ``prefix`` and implements :meth:`_candidate`."""

    owner = "WeightSpaceSelection"
    prefix = "weight_space"

    def __init__(self, alphas: Sequence[float] | None, select: str, every_validation: bool, head: str | None,
                 interpolate_head: bool, bn_batches: int | None, val_batches: int | None) -> None:
        owner = self.owner
        if alphas is None:
            alphas = list(DEFAULT_ALPHAS)
        if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence):
            raise TypeError(f"{owner}: alphas must be a list of numbers in [0, 1], got {alphas!r}.")
        if not alphas:
            raise ValueError(f"{owner}: alphas must not be empty; e.g. [0.0, 0.5, 1.0] (1.0 is the fine-tuned model).")
        self.alphas = [check_number(owner, "alphas entries", a, minimum=0, maximum=1) for a in alphas]
        if len({alpha_name(a) for a in self.alphas}) != len(self.alphas):
            raise ValueError(f"{owner}: alphas must be distinct, got {self.alphas}.")
        self.select = check_choice(owner, "select", select, ("best", "finetuned"))
        for name, flag in (("every_validation", every_validation), ("interpolate_head", interpolate_head)):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner}: {name} must be True or False, got {flag!r} ({type(flag).__name__}).")
        self.every_validation, self.interpolate_head = every_validation, interpolate_head
        self.head = check_optional_str(owner, "head", head)
        self.bn_batches = None if bn_batches is None else check_int(owner, "bn_batches", bn_batches, minimum=1)
        self.val_batches = None if val_batches is None else check_int(owner, "val_batches", val_batches, minimum=1)
        self.curve: dict[float, float] = {}
        self.best_alpha: float | None = None
        self.history: list[dict[float, float]] = []  # one curve per validation (every_validation)
        self._own: dict[str, Tensor] = {}  # w0 of the parameters L2SP does not anchor (local shards under FSDP2)
        self._params: dict[str, torch.nn.Parameter] = {}  # the parameters w0 is kept for
        self._l2sp: L2SP | None = None
        self._shared: list[str] = []  # names whose w0 is L2SP's anchor
        self._fixed: list[tuple[str, torch.nn.Parameter]] = []  # transferred, frozen by the user: no w0
        self._low_rank: list[tuple[str, str]] = []  # (A, B) names of LoRA factors
        self._loaded: dict[str, Any] | None = None
        self._missing_state = False
        self._started = False  # on_fit_start ran (sharded strategies restore checkpoints after it)
        self._modes: dict[str, bool] = {}  # module name -> training flag, as training uses them
        self._modes_fresh = False

    def _candidate(self, w0: Mapping[str, Tensor], w_ft: Mapping[str, Tensor], a: float) -> dict[str, Tensor]:
        """The candidate's values of the entries of ``w0`` for coefficient ``a`` (plain or local tensors)."""
        raise NotImplementedError

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, self.owner, sharded=True)
        select_parameters(pl_module, self.head)  # an unknown head fails here
        self._low_rank = lora_factors(pl_module)  # DoRA fails here, and so does a LoRA start B0@A0 != 0
        if not trainer.ckpt_path:  # a resume checks the restored w0 at fit start
            check_low_rank_start(dict(pl_module.named_parameters()), self._low_rank, self.owner)
        find_weight_averaging(trainer, self.owner)  # two averages to choose between fail here
        if val_loader_of(trainer) is None:
            raise ValueError(f"{self.owner} selects a on validation data, and this fit has none: give the DataModule "
                             "or the LightningModule a val_dataloader, or pass val_dataloaders to trainer.fit.")
        self._loaded, self._missing_state, self._started = None, False, False  # a resume restores state later

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self.state_key not in (checkpoint.get("callbacks") or {}):
            self._missing_state = True  # added on resume: only L2SP's restored anchors can tell w0
            if self._started:  # sharded strategies restore after on_fit_start
                self._refuse_missing_state()

    def _refuse_missing_state(self) -> None:
        if self._own:
            raise ValueError(f"{self.owner} was not in the run that saved this checkpoint, so w0 of "
                             f"{list(self._own)[:5]} is unknown (the resumed weights have moved). Resume without "
                             f"{self.owner}, or start a new fit from the pre-trained weights.")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        transferred, head_params, _ = select_parameters(pl_module, self.head)
        transferred, self._fixed = movable_parameters(trainer, transferred)  # what never moves needs no w0
        named = transferred + (head_params if self.interpolate_head else [])
        check_shardable(named, self.owner)
        if self._low_rank and any(is_sharded(p) for _, p in named):
            raise ValueError(f"{self.owner} does not combine LoRA factors of a sharded (FSDP2) model: the check of "
                             "B0@A0 needs whole factors. Use DDP or a single device with LoRA.")
        # an L2SP (or SPD without peft=True) holds w0 of the transferred parameters: share it
        l2sp = next((cb for cb in trainer.callbacks if isinstance(cb, L2SP) and not getattr(cb, "peft", False)), None)
        shared = set(l2sp.anchored_names(pl_module, trainer)) if l2sp is not None else set()
        self._shared = [n for n, _ in named if n in shared]
        self._l2sp = l2sp if self._shared else None
        self._params = dict(named)
        own = [(n, p) for n, p in named if n not in shared]
        self._own = {n: local(p).detach().clone() for n, p in own}  # a resume replaces them below
        self._started = True
        if self._loaded is not None:  # resume: w0 from the checkpoint, never from the resumed weights
            self._apply_loaded()
        elif self._missing_state:
            self._refuse_missing_state()

    def _apply_loaded(self) -> None:
        loaded, self._loaded = self._loaded["w0"], None
        missing = [n for n in self._own if n not in loaded]
        if missing:
            raise KeyError(f"{self.owner}: the checkpoint lacks w0 for {missing[:5]}: the run that saved it shared them "
                           "with an L2SP callback (keep that L2SP in the resumed run) or had another head setting "
                           "(interpolate_head).")
        self._own = {n: shard_like(loaded[n].to(local(self._params[n]).device), self._params[n])
                     .to(self._own[n].dtype, copy=True) for n in self._own}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_low_rank_start(self.pretrained(), self._low_rank, self.owner)  # w0 complete: L2SP's too, or resumed

    def pretrained(self) -> dict[str, Tensor]:
        """``w0`` by parameter name: this callback's copies and, for what L2SP anchors, L2SP's own tensors
        (this rank's shards under FSDP2)."""
        anchors = self._l2sp.anchors if self._l2sp is not None else {}
        return {**self._own, **{n: anchors[n] for n in self._shared}}

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._modes_fresh = False

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        check_still_frozen(self._fixed, self.owner, "the pre-trained weights w0", "or keep them frozen")
        if not self._modes_fresh:  # after every epoch-start change (FreezeSchedule puts frozen BN in eval)
            self._modes = {n: m.training for n, m in pl_module.named_modules()}
            self._modes_fresh = True

    def _set_training_modes(self, pl_module: LightningModule) -> None:
        pl_module.train()
        for name, module in pl_module.named_modules():
            module.training = self._modes.get(name, module.training)

    def _write(self, values: Mapping[str, Tensor]) -> None:
        for n, v in values.items():
            local(self._params[n]).copy_(v)

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict[float, float], dict]:
        """The curve, and each candidate's re-estimated BatchNorm statistics; the model is left as it was."""
        w0 = self.pretrained()
        w_ft = {n: local(self._params[n]).detach().clone() for n in w0}
        batchnorm = has_batchnorm(pl_module)
        val, train = val_loader_of(trainer), train_loader_of(trainer) if batchnorm else None
        if batchnorm and train is None:
            raise ValueError(f"{self.owner}: the model has BatchNorm, whose statistics are re-estimated for each "
                             "candidate from the training loader, and none was found.")
        # DDP: each rank counts its share of the batches, summed below. FSDP2: every rank runs every batch (the
        # sharded forward needs the same calls on every rank) and the counts are averaged.
        sharded = any(is_sharded(p) for p in self._params.values())
        rank, world = (0, 1) if sharded else (trainer.global_rank, trainer.world_size)
        counts, stats = [], {}
        with torch.no_grad(), batchnorm_state_kept(pl_module), trainer.strategy.precision_plugin.forward_context():
            try:
                for a in self.alphas:
                    self._write(self._candidate(w0, w_ft, a))
                    if train is not None:
                        self._set_training_modes(pl_module)
                        reestimate_batchnorm(pl_module, train, self.bn_batches)
                        stats[a] = self._bn_stats(trainer, pl_module)
                    counts.append(count_correct(pl_module.eval(), val, self.val_batches, rank, world))
            finally:
                self._write(w_ft)
        totals = trainer.strategy.reduce(torch.tensor(counts, dtype=torch.float64, device=pl_module.device),
                                         reduce_op="mean" if sharded else "sum")
        if float(totals[0, 1]) == 0:
            raise ValueError(f"{self.owner}: the validation loader yielded no examples.")
        return {a: float(c / t) for a, (c, t) in zip(self.alphas, totals.cpu().tolist())}, stats

    @staticmethod
    def _bn_stats(trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """Re-estimated statistics, made identical on every rank (rank 0's)."""
        out = {}
        for name, m in pl_module.named_modules():
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
                for key in ("running_mean", "running_var"):
                    buf = getattr(m, key)
                    if trainer.world_size > 1 and torch.distributed.is_initialized():
                        torch.distributed.broadcast(buf, src=0)
                    out[f"{name}.{key}"] = buf.clone()
        return out

    @staticmethod
    def _best(curve: dict[float, float]) -> float:
        return max(curve, key=lambda a: (curve[a], a))

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.every_validation or trainer.sanity_checking:
            return
        with average_in_model(trainer, pl_module, find_weight_averaging(trainer, self.owner), self):
            curve, _ = self._evaluate(trainer, pl_module)  # the weights this validation measured
        self.history.append(curve)
        for a, acc in curve.items():
            pl_module.log(f"{self.prefix}/val_acc_a{alpha_name(a)}", acc)
        pl_module.log(f"{self.prefix}/best_alpha", self._best(curve))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        averaging = find_weight_averaging(trainer, self.owner)
        adopt_average(trainer, pl_module, averaging, self)  # w_ft: the average, whatever the callbacks' order
        self.curve, stats = self._evaluate(trainer, pl_module)
        self.best_alpha = self._best(self.curve)
        if self.select == "best":
            w0 = self.pretrained()
            with torch.no_grad():
                self._write(self._candidate(w0, {n: local(self._params[n]).detach() for n in w0}, self.best_alpha))
                buffers = dict(pl_module.named_buffers())
                for n, v in stats.get(self.best_alpha, {}).items():
                    buffers[n].copy_(v)
        set_average(pl_module, averaging)  # an averaging listed after this callback then leaves the choice in place
        metrics = {f"{self.prefix}/val_acc_a{alpha_name(a)}": acc for a, acc in self.curve.items()}
        metrics[f"{self.prefix}/best_alpha"] = self.best_alpha
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._started = False

    @override
    def state_dict(self) -> dict[str, Any]:
        """The full ``w0`` this callback keeps (under FSDP2 gathered from every rank's shard: all ranks call this)."""
        if self._loaded is not None:  # loaded, not yet applied by a fit
            return dict(self._loaded)
        return {"w0": {n: full_tensor(t.detach(), self._params[n]).cpu() for n, t in self._own.items()},
                "shared_with_l2sp": list(self._shared)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the loaded ``w0`` for ``on_fit_start``, or apply it now if that already ran (FSDP2 restores
        checkpoints after ``on_fit_start``)."""
        self._loaded = dict(state_dict)
        if self._started:
            self._apply_loaded()
