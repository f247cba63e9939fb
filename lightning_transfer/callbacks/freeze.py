"""FreezeSchedule: freeze the first k blocks, with schedules (LP-FT, gradual unfreezing, milestones)."""

from __future__ import annotations

import math
import weakref
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_transfer.anatomy import list_blocks
from lightning_transfer.compilation import recompile
from lightning_transfer.freezing import (
    ALL,
    accuracy_across_unfreeze,
    check_depth,
    check_milestones,
    depth_at,
    freeze_blocks,
    gradual_milestones,
    set_frozen_bn_eval,
    trains_batchnorm,
    user_frozen_ids,
)
from lightning_transfer.optim import check_fresh_state_supported, reset_optimizer_state
from lightning_transfer.validation import check_choice, check_int, check_strategy, check_strings

__all__ = ["FreezeSchedule"]

_OWNER = "FreezeSchedule"


class FreezeSchedule(Callback):
    """Freeze the first ``k`` blocks of :func:`~lightning_transfer.list_blocks` (the head never).

    ``depth`` fixes k for the whole run (the "transfer depth"); ``milestones`` (epoch → depth) change it
    at epoch starts; ``unfreeze_every`` unfreezes one block more every n epochs, top-down (gradual
    unfreezing); :meth:`lp_ft` and :meth:`gradual` build the two common schedules.

    What it guarantees, where Lightning's ``BackboneFinetuning`` and finetuning-scheduler do not:

    * Frozen parameters get ``requires_grad=False`` (no gradient is computed), so momentum and weight
      decay never move them; BatchNorm layers of frozen blocks stay in eval mode (``bn="eval"``) even
      though Lightning calls ``model.train()`` every epoch.
    * It never thaws what it did not freeze: parameters with ``requires_grad=False`` at setup (frozen
      by you, e.g. embeddings or a ``layer3``) stay frozen at every depth, in every schedule and after
      a resume (freeze them again before ``fit``, as the checkpointed run did). A BatchNorm layer all
      of whose parameters you froze is yours too: its train/eval mode is never changed (Lightning's
      ``model.train()`` puts it in train mode, so its running statistics update unless you put it in
      eval mode yourself). Your frozen parameters need not be in the optimizer.
    * The optimizer holds all parameters from the start (frozen ones get no update), so a block that is
      unfrozen trains with fresh optimizer state (cleared on unfreeze) at the learning rate its param
      group has under any LR scheduler (OneCycleLR, LambdaLR, ...). A parameter it may unfreeze that is
      in no optimizer group is a clear error.
    * Resume: the depth is a function of the epoch, re-applied at every epoch start, so a resumed run is
      frozen exactly like an uninterrupted one (BackboneFinetuning stays frozen forever after a resume
      past its unfreeze epoch, Lightning issue #21901).
    * DDP: the first depth is applied before the model is wrapped; blocks unfrozen later are unknown to
      DDP (Lightning issue #20340), so their gradients are averaged across ranks here, in one flat
      all-reduce per step. A schedule that freezes more later needs
      ``DDPStrategy(find_unused_parameters=True)`` and says so at setup.
    * FSDP2 (``ModelParallelStrategy`` with ``fully_shard``): FSDP2 keeps one DTensor per parameter and
      reduce-scatters the gradient of every parameter that has one, so ``requires_grad`` may differ per
      block and change at any epoch (also for a block frozen when ``fully_shard`` ran); no extra
      all-reduce is needed. ``fully_shard`` replaces the parameter objects, so the parameters you froze
      are remembered by name and found again at fit start. FSDP1 and DeepSpeed are rejected at setup.
    * The schedule runs on epochs: milestones past ``max_epochs`` are an error; a gradual schedule that
      cannot unfreeze every block by the last epoch, or any schedule cut short by ``max_steps`` (also
      with ``max_epochs=-1``), is a warning naming the depth the run ends at.

    Args:
        depth: Blocks frozen for the whole run (int >= 0 or ``"all"``).
        milestones: ``{epoch: depth}``; before the first milestone the depth is 0.
        unfreeze_every: Gradual unfreezing: start at ``depth`` (default ``"all"``), one block fewer every
            ``unfreeze_every`` epochs (an int >= 1).
        bn: ``"eval"`` (frozen BatchNorm keeps its running statistics) or ``"train"`` (they keep updating).
            At each unfreeze the accuracy on the first batch with the modes before and after it is logged
            (``freeze/acc_before_unfreeze``, ``freeze/acc_after_unfreeze``).
        blocks: Explicit blocks (module names or regexes), see :func:`~lightning_transfer.list_blocks`.
        head: Explicit head name.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> model = TransferClassifier(net, num_classes=3, weight_decay=0.0)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 12), torch.randint(0, 3, (8,))), batch_size=4)
        >>> schedule = FreezeSchedule(depth=1)  # the first block (backbone.0) frozen all run
        >>> trainer = Trainer(max_epochs=1, callbacks=[schedule],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(model, data)
        >>> [(name, p.requires_grad) for name, p in model.named_parameters()]
        [('backbone.0.weight', False), ('backbone.0.bias', False),
         ('backbone.2.weight', True), ('backbone.2.bias', True)]
        >>> FreezeSchedule.lp_ft(probe_epochs=5).milestones  # linear probing for 5 epochs, then everything trains
        {0: 'all', 5: 0}
    """

    def __init__(
        self,
        depth: int | Literal["all"] | None = None,
        milestones: dict[int, int | Literal["all"]] | None = None,
        unfreeze_every: int | None = None,
        bn: Literal["eval", "train"] = "eval",
        blocks: list[str] | None = None,
        head: str | None = None,
    ) -> None:
        if depth is not None:
            check_depth(_OWNER, "depth", depth)
        if unfreeze_every is not None:
            check_int(_OWNER, "unfreeze_every", unfreeze_every, minimum=1)
        if milestones is not None:
            milestones = check_milestones(_OWNER, milestones)
        check_choice(_OWNER, "bn", bn, ("eval", "train"))
        if blocks is not None:
            blocks = check_strings(_OWNER, "blocks", blocks, allow_empty=False)
        if head is not None and not isinstance(head, str):
            raise TypeError(f"{_OWNER}: head must be a module name (str) or None, got {head!r} ({type(head).__name__}).")
        if sum(x is not None for x in (milestones, unfreeze_every)) + (depth is not None and unfreeze_every is None) != 1:
            raise ValueError("Give exactly one of: depth (fixed), milestones, or unfreeze_every (with an optional start depth).")
        self.depth, self.unfreeze_every, self.bn = depth, unfreeze_every, bn
        self.milestones = milestones
        self.blocks, self.head = blocks, head
        self._blocks: list[tuple[str, torch.nn.Module]] = []
        self._schedule: dict[int, int] = {}
        self.current_depth: int | None = None
        self._ddp_managed: set[int] = set()
        self._user_frozen: set[int] = set()
        self._user_frozen_names: list[str] | None = None
        self._may_train: set[str] = set()  # parameter names some depth of the schedule trains
        self._trainable = 0.0
        self._trainer: weakref.ref | None = None  # the Trainer of the current fit (for a late restore)
        self._started = False  # on_fit_start ran in this fit
        self._unfrozen_from: int | None = None  # depth before an unfreeze at this epoch's start

    @classmethod
    def lp_ft(cls, probe_epochs: int, bn: Literal["eval", "train"] = "train", **kwargs: Any) -> FreezeSchedule:
        """Linear probing for ``probe_epochs`` (everything but the head frozen), then full fine-tuning.

        ``bn="train"`` (the default here) trains the probe on the BatchNorm statistics fine-tuning will
        use (batch statistics), so the probe survives the unfreeze; with ``bn="eval"`` the probe learns
        on running statistics and BatchNorm switches to batch statistics at the unfreeze, which can
        throw the probe away (a warning says so). To probe to convergence on cached features instead,
        see :func:`~lightning_transfer.probe.linear_probe`.
        """
        check_int(f"{_OWNER}.lp_ft", "probe_epochs", probe_epochs, minimum=1)
        return cls(milestones={0: ALL, probe_epochs: 0}, bn=bn, **kwargs)

    @classmethod
    def gradual(cls, every: int, start: int | Literal["all"] = ALL, **kwargs: Any) -> FreezeSchedule:
        """Gradual unfreezing: one block more every ``every`` epochs, top-down, from ``start`` frozen blocks."""
        check_int(f"{_OWNER}.gradual", "every", every, minimum=1)
        check_depth(f"{_OWNER}.gradual", "start", start)
        return cls(depth=start, unfreeze_every=every, **kwargs)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, _OWNER, sharded=True)
        self._blocks = list_blocks(pl_module, self.blocks, self.head)
        n = len(self._blocks) - 1
        if self.milestones is not None:
            self._schedule = {e: depth_at(e, self.milestones, n) for e in self.milestones}
        elif self.unfreeze_every is not None:
            self._schedule = gradual_milestones(n, self.unfreeze_every, ALL if self.depth is None else self.depth)
        else:
            self._schedule = {0: depth_at(0, {0: self.depth}, n)}
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        late = [e for e in self._schedule if max_epochs is not None and e >= max_epochs and e > 0]
        if late and self.unfreeze_every is None:
            raise ValueError(
                f"{_OWNER}: milestones at epochs {late} are past max_epochs={max_epochs}: they would never apply. "
                f"Use milestone epochs < {max_epochs}, or max_epochs >= {max(late) + 1}."
            )
        if late:
            self._warn_unfinished(max_epochs - 1, f"max_epochs={max_epochs}", f"max_epochs >= {max(late) + 1}")
        depths = [self._schedule[e] for e in sorted(self._schedule)]
        refreezes = any(b > a for a, b in zip(depths, depths[1:]))
        if refreezes and isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1:
            if not trainer.strategy._ddp_kwargs.get("find_unused_parameters", False):
                raise ValueError(
                    "This schedule freezes more blocks later; under DDP that needs "
                    "Trainer(strategy=DDPStrategy(find_unused_parameters=True))."
                )
        # what the user froze, before this callback changes anything: never thawed
        self._user_frozen = user_frozen_ids(pl_module)
        self._user_frozen_names = [name for name, p in pl_module.named_parameters() if id(p) in self._user_frozen]
        lowest = min(self._schedule.values(), default=0)
        trained = {id(p) for _, block in self._blocks[lowest:] for p in block.parameters()} - self._user_frozen
        self._may_train = {name for name, p in pl_module.named_parameters() if id(p) in trained}
        self.current_depth = None
        self._apply(trainer, self._depth_for(0))  # before DDP wraps the model
        self._trainer, self._started = weakref.ref(trainer), False
        lp_ft_shape = len(depths) > 1 and depths[0] == n and depths[1] == 0  # a probe, then everything trains
        if lp_ft_shape and self.bn == "eval" and trains_batchnorm(self._blocks[:-1], self._user_frozen):
            rank_zero_warn(
                f"{_OWNER}: linear probing then full fine-tuning (LP-FT) with bn='eval' on a network with "
                "BatchNorm: the probe learns on running statistics, and at the unfreeze (epoch "
                f"{max(self._schedule)}) BatchNorm switches to batch statistics, which can throw the trained probe "
                "away (on EfficientNet-Lite0 its accuracy fell from 0.66 to 0.23 at once). Use bn='train' (the "
                "default of FreezeSchedule.lp_ft). The switch is logged as freeze/acc_before_unfreeze and "
                "freeze/acc_after_unfreeze."
            )

    def may_train_names(self) -> set[str]:
        """Names of the parameters that some depth of this fit's schedule trains (never those frozen by you):
        what :class:`~lightning_transfer.L2SP` anchors besides the parameters trainable at fit start."""
        return set(self._may_train)

    def _warn_unfinished(self, last_epoch: int, limit: str, longer: str) -> None:
        final = self._schedule[max(self._schedule)]
        reached = self._depth_for(last_epoch)
        if self.unfreeze_every is not None:
            first = self._schedule[0]
            ways = [f"every (unfreeze_every) <= {last_epoch // first}"] if last_epoch // first >= 1 else []
            ways += [longer, f"a start depth <= {last_epoch // self.unfreeze_every}"]
            how = ", or ".join(ways)
            what = f"Gradual unfreezing (every={self.unfreeze_every}, start depth {first})"
        else:
            how = f"milestones within the run, or {longer}"
            what = f"The milestones {dict(sorted(self._schedule.items()))}"
        rank_zero_warn(
            f"{_OWNER}: {what} reaches depth {final} at epoch {max(self._schedule)}, but the run ends "
            f"at epoch {last_epoch} ({limit}) with depth {reached} ({reached} of {len(self._blocks) - 1} blocks "
            f"still frozen). To finish the schedule, use {how}."
        )

    def _depth_for(self, epoch: int) -> int:
        return depth_at(epoch, self._schedule, len(self._blocks) - 1)

    def _apply(self, trainer: Trainer | None, depth: int, training: bool = True) -> None:
        previous = self.current_depth
        freeze_blocks(self._blocks, depth, self.bn, training, self._user_frozen)
        fitting = trainer or (self._trainer() if self._trainer is not None else None)
        if depth != previous and fitting is not None and fitting.lightning_module is not None:
            # each requires_grad pattern is a new graph of a compiled model; keeping the old ones would
            # reach dynamo's recompile_limit within a few transitions and leave the network uncompiled
            recompile(fitting.lightning_module)
        if trainer is not None and previous is not None and depth < previous:
            # blocks depth..previous-1 train again: fresh optimizer state (momentum from before is stale)
            thawed = [p for _, block in self._blocks[depth:previous] for p in block.parameters()
                      if id(p) not in self._user_frozen]
            reset_optimizer_state(trainer.optimizers, thawed)
        self.current_depth = depth

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # configure_model (FSDP2's fully_shard) may have replaced the parameter objects since setup
        names = set(self._user_frozen_names or ())
        self._user_frozen = {id(p) for n, p in pl_module.named_parameters() if n in names}
        in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        in_blocks = {id(p) for _, block in self._blocks for p in block.parameters()} - self._user_frozen
        missing = [n for n, p in pl_module.named_parameters() if id(p) in in_blocks and id(p) not in in_optimizer]
        if missing:
            raise ValueError(
                f"{len(missing)} parameter(s) that FreezeSchedule may unfreeze are in no optimizer param group "
                f"(e.g. {missing[:3]}). Build the optimizer over all parameters, e.g. "
                "torch.optim.SGD(self.parameters(), ...): frozen ones get no gradient and no update."
            )
        check_fresh_state_supported(trainer.optimizers, "FreezeSchedule")
        self._ddp_managed = {id(p) for p in pl_module.parameters() if p.requires_grad}
        self._started = True

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._started = False

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # max_steps may end the run before max_epochs (or with max_epochs=-1): the schedule is on epochs
        batches = trainer.num_training_batches
        if trainer.max_steps <= 0 or not isinstance(batches, int) or batches <= 0:
            return
        steps_per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
        last = math.ceil(trainer.max_steps / steps_per_epoch) - 1
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        if (max_epochs is None or last < max_epochs - 1) and max(self._schedule, default=0) > last:
            need = (max(self._schedule) + 1) * steps_per_epoch
            self._warn_unfinished(last, f"max_steps={trainer.max_steps} at {steps_per_epoch} steps per epoch",
                                  f"max_steps >= {need}")

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        depth = self._depth_for(trainer.current_epoch)
        if depth != self.current_depth:
            if self.current_depth is not None and depth < self.current_depth:
                self._unfrozen_from = self.current_depth
            self._apply(trainer, depth, pl_module.training)
        set_frozen_bn_eval(self._blocks, depth, self.bn, self._user_frozen)
        self._trainable = float(sum(p.numel() for p in pl_module.parameters() if p.requires_grad))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # validation calls model.train()
        set_frozen_bn_eval(self._blocks, self.current_depth or 0, self.bn, self._user_frozen)
        if self._unfrozen_from is not None:  # the first step after an unfreeze: what the switch did
            accuracies = accuracy_across_unfreeze(pl_module, batch, self._blocks, self._unfrozen_from, self.bn,
                                                  self._user_frozen)
            self._unfrozen_from = None
            if accuracies is not None:  # each rank measures its own batch: the mean is the global batch's
                for key, value in zip(("freeze/acc_before_unfreeze", "freeze/acc_after_unfreeze"), accuracies):
                    pl_module.log(key, value, on_step=True, on_epoch=False, sync_dist=trainer.world_size > 1)
        pl_module.log("freeze/depth", float(self.current_depth or 0), on_step=True, on_epoch=False)
        pl_module.log("freeze/trainable_params", self._trainable, on_step=True, on_epoch=False)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size <= 1 or not isinstance(trainer.strategy, DDPStrategy):
            return
        # Blocks unfrozen after DDP wrapped the model are unknown to DDP: average their gradients here,
        # after every backward (linear, so exact under accumulation) and before any callback reads them.
        # The user's frozen parameters never get requires_grad, so they are never part of it.
        late = [p for p in pl_module.parameters() if p.requires_grad and id(p) not in self._ddp_managed]
        if late:
            for p in late:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = trainer.strategy.reduce(torch.cat([p.grad.reshape(-1) for p in late]), reduce_op="mean")
            torch._foreach_copy_([p.grad for p in late], [c.view_as(p) for c, p in zip(flat.split([p.numel() for p in late]), late)])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"schedule": dict(self._schedule), "depth": self.current_depth, "user_frozen": self._user_frozen_names}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {int(k): v for k, v in state_dict["schedule"].items()}
        if self._schedule and saved != self._schedule:
            raise ValueError(f"The checkpoint was trained with freeze schedule {saved}, this run has {self._schedule}.")
        self._schedule = saved
        theirs = state_dict.get("user_frozen")
        if theirs is not None and self._user_frozen_names is not None and sorted(theirs) != sorted(self._user_frozen_names):
            rank_zero_warn(
                f"{_OWNER}: the checkpointed run had {len(theirs)} parameter(s) frozen by you before fit "
                f"(e.g. {sorted(set(theirs) ^ set(self._user_frozen_names))[:3]} differ), this run has "
                f"{len(self._user_frozen_names)}. Freeze the same parameters before fit as the checkpointed run "
                "did, or the resumed run will not continue it."
            )
        elif self._user_frozen_names is None:
            self._user_frozen_names = theirs  # loaded before setup: setup records this run's own
        if self._blocks and state_dict["depth"] is not None:
            # restored before DDP wraps the model: freeze as the checkpointed run was at its last epoch
            trainable = [p.requires_grad for _, block in self._blocks for p in block.parameters()]
            self.current_depth = None
            self._apply(None, state_dict["depth"])
            if self._started and trainable != [p.requires_grad for _, b in self._blocks for p in b.parameters()]:
                self._reload_optimizer_state()
        else:
            self.current_depth = state_dict["depth"]

    def _reload_optimizer_state(self) -> None:
        """Load the optimizer state again, now that the parameters are frozen as when it was saved.

        Sharded strategies (FSDP2) restore the checkpoint after ``on_fit_start``, loading the optimizer
        state only for the parameters trainable at that moment (the depth of epoch 0), before this
        callback's state arrives: the momentum of blocks the checkpointed run had unfrozen would be lost.
        """
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None or trainer.ckpt_path is None or not trainer.strategy.restore_checkpoint_after_setup:
            return
        for opt in trainer.optimizers:
            opt.state.clear()
        trainer.strategy.load_checkpoint(trainer.ckpt_path)
