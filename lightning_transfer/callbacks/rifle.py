"""RIFLE: re-initialize the new head a few times during fine-tuning."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_transfer.anatomy import final_linear, find_head
from lightning_transfer.functional.head_init import reinitialize_, zero_head_
from lightning_transfer.optim import check_fresh_state_supported, reset_optimizer_state
from lightning_transfer.validation import (
    check_choice,
    check_int,
    check_int_list,
    check_optional_str,
    check_strategy,
)

__all__ = ["RIFLE", "reinit_points"]

_OWNER = "RIFLE"


def reinit_points(total: int, num_reinits: int, min_after: int) -> list[int]:
    """Evenly spaced re-init points (epoch or step indices at whose start the head is re-initialized).

    Spacing ``s = min(total/(n+1), (total − min_after)/n)``: the authors' ``10, 20, 30`` for 40 epochs
    and 3 re-inits, compressed when needed so that none falls in the last ``min_after`` units (and so
    none after the final one). Raises when the schedule cannot fit.
    """
    if num_reinits < 1:
        raise ValueError(f"num_reinits must be at least 1, got {num_reinits}.")
    horizon = total - min_after
    if horizon < num_reinits:
        raise ValueError(
            f"RIFLE cannot place {num_reinits} re-init(s) in {total} units of training while keeping the last "
            f"{min_after} free of re-inits. Train longer, lower num_reinits, or lower min_epochs_after."
        )
    spacing = min(total / (num_reinits + 1), horizon / num_reinits)
    points = [int(math.floor(i * spacing + 0.5)) for i in range(1, num_reinits + 1)]
    if len(set(points)) != len(points) or points[0] < 1:
        raise ValueError(f"RIFLE re-init points {points} collide; lower num_reinits or train longer.")
    return points


class RIFLE(Callback):
    """Re-initialize the fully-connected head at evenly spaced points (Li et al., ICML 2020).

    Re-initializing the head lets large errors reach the deep layers again. Points are epoch starts
    (``interval="epoch"``) or optimizer steps (``"step"``, for ``max_steps`` training). By default none
    falls in the last 5 epochs or last eighth of training (whichever is larger) and none after the
    final one. The head's optimizer state (momentum, Adam moments) is cleared by default. The draw is
    seeded per re-init, so DDP ranks get the same head and a resumed run the same one as an
    uninterrupted run; under FSDP2 each rank keeps its shard of the full draw of a single-process run.
    Validation metrics dip after each re-init: early stopping and "best" checkpoints
    should know.

    Args:
        num_reinits: How many re-inits, spread evenly (ignored when ``points`` is given).
        points: Explicit epoch (or step) indices at whose start to re-initialize.
        interval: ``"epoch"`` or ``"step"``.
        min_epochs_after: Units at the end kept free of re-inits (default: max(5 epochs, 1/8 of
            training) for epochs; 1/8 of training for steps).
        reset_optimizer_state: Clear the head's optimizer state (``False`` reproduces the authors' code).
        init: ``"random"`` (the head's own ``reset_parameters``) or ``"zero"`` (MEI-style).
        head: Dotted name of the head; auto-detected by default.
        seed: Base seed of the draws (an integer >= 0); by default taken from ``torch.initial_seed()`` on
            rank 0.
        min_steps_after_last: RIFLE's regime: the head must re-learn after the last re-init, so fewer
            optimizer steps than this after it is a warning at train start ("out of regime"; the
            paper's runs had on the order of a thousand). Logged as ``rifle/steps_after_last_reinit``.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> model = TransferClassifier(net, num_classes=3, weight_decay=0.0)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 12), torch.randint(0, 3, (8,))), batch_size=4)
        >>> rifle = RIFLE(points=[1], min_epochs_after=1, min_steps_after_last=1)
        >>> trainer = Trainer(max_epochs=2, callbacks=[rifle],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(model, data)
        >>> rifle.done, rifle.steps_after_last  # re-initialized at epoch 1, then 2 optimizer steps
        ([1], 2)
        >>> reinit_points(40, 3, 5)  # RIFLE(num_reinits=3) in 40 epochs: the paper's schedule
        [10, 20, 30]
    """

    def __init__(
        self,
        num_reinits: int = 2,
        points: list[int] | None = None,
        interval: Literal["epoch", "step"] = "epoch",
        min_epochs_after: int | None = None,
        reset_optimizer_state: bool = True,
        init: Literal["random", "zero"] = "random",
        head: str | None = None,
        seed: int | None = None,
        min_steps_after_last: int = 100,
    ) -> None:
        num_reinits = check_int(_OWNER, "num_reinits", num_reinits, minimum=1)
        if points is not None:
            points = sorted(check_int_list(_OWNER, "points", points, minimum=1, distinct=True,
                                           empty_hint="pass None to use num_reinits"))
        interval = check_choice(_OWNER, "interval", interval, ("epoch", "step"))
        if min_epochs_after is not None:
            min_epochs_after = check_int(_OWNER, "min_epochs_after", min_epochs_after, minimum=0)
        if not isinstance(reset_optimizer_state, bool):
            raise TypeError(f"{_OWNER}: reset_optimizer_state must be True or False, got {reset_optimizer_state!r}.")
        init = check_choice(_OWNER, "init", init, ("random", "zero"))
        head = check_optional_str(_OWNER, "head", head)
        if seed is not None:
            seed = check_int(_OWNER, "seed", seed, minimum=0)
        self.num_reinits, self.points, self.interval = num_reinits, points, interval
        self.min_epochs_after, self.reset_optimizer_state, self.init = min_epochs_after, reset_optimizer_state, init
        self.head, self.seed = head, seed
        self.min_steps_after_last = check_int(_OWNER, "min_steps_after_last", min_steps_after_last, minimum=0)
        self.steps_after_last: int | None = None
        self.schedule: list[int] = []
        self.done: list[int] = []
        self._seed: int | None = seed
        self._pending_log: int | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, _OWNER, sharded=True)
        find_head(pl_module, self.head)
        self.done = []  # a new fit (a resume restores its re-inits after setup)
        if self.interval == "epoch":
            total = trainer.max_epochs
            if total is None or total < 0:
                raise ValueError("RIFLE(interval='epoch') needs Trainer(max_epochs=...); use interval='step' with max_steps.")
            default_after = max(5, math.ceil(total / 8))
        else:
            total = trainer.max_steps
            if total is None or total < 0:
                raise ValueError("RIFLE(interval='step') needs Trainer(max_steps=...).")
            default_after = math.ceil(total / 8)
        after = self.min_epochs_after if self.min_epochs_after is not None else default_after
        if self.points is not None:
            late = [p for p in self.points if p > total - after or p >= total]
            if late:
                raise ValueError(f"RIFLE points {late} fall in the last {after} {self.interval}s of {total} (or after the end).")
            self.schedule = list(self.points)
        else:
            self.schedule = reinit_points(total, self.num_reinits, after)
        self._seed = self.seed if self.seed is not None else int(trainer.strategy.broadcast(torch.initial_seed() % 2**31))
        rank_zero_warn(
            f"RIFLE re-initializes the head at {self.interval}s {self.schedule}: validation metrics dip after each; "
            "early stopping and best-checkpoint selection see those dips.",
            category=UserWarning,
        )

    def _maybe_reinit(self, trainer: Trainer, pl_module: LightningModule, point: int) -> None:
        if point not in self.schedule or point in self.done:
            return
        _, head = find_head(pl_module, self.head)
        index = self.schedule.index(point)
        if self.init == "zero":
            zero_head_(final_linear(head))
        else:
            reinitialize_(head, self._seed + 1000 * (index + 1))
        if self.reset_optimizer_state:
            reset_optimizer_state(trainer.optimizers, list(head.parameters()))
        self.done.append(point)
        self._pending_log = len(self.done)
        rank_zero_info(f"RIFLE: re-initialized the head at {self.interval} {point} ({len(self.done)}/{len(self.schedule)}).")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.reset_optimizer_state:
            check_fresh_state_supported(trainer.optimizers, "RIFLE")
        batches = trainer.num_training_batches
        if not self.schedule or not isinstance(batches, int) or batches <= 0:
            return
        steps_per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
        if self.interval == "epoch":
            total = trainer.max_epochs * steps_per_epoch
            if trainer.max_steps is not None and trainer.max_steps >= 0:
                total = min(total, trainer.max_steps)
            self.steps_after_last = total - self.schedule[-1] * steps_per_epoch
        else:
            self.steps_after_last = trainer.max_steps - self.schedule[-1]
        if self.steps_after_last < self.min_steps_after_last:
            rank_zero_warn(
                f"RIFLE is out of its regime: only {self.steps_after_last} optimizer steps follow the last re-init "
                f"({self.interval} {self.schedule[-1]}, {steps_per_epoch} steps per epoch), fewer than "
                f"min_steps_after_last={self.min_steps_after_last}; the new head may not re-learn, and the result is "
                "not what the method does. Re-initialize earlier (points=..., or interval='step'), use fewer "
                "re-inits, or train longer, at a learning rate that is still useful after the last re-init.",
                category=UserWarning,
            )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.interval == "epoch":
            self._maybe_reinit(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.interval == "step":
            self._maybe_reinit(trainer, pl_module, trainer.global_step)
        if self._pending_log is not None:
            pl_module.log("rifle/reinit", float(self._pending_log), on_step=True, on_epoch=False)
            self._pending_log = None
        if batch_idx == 0 and self.steps_after_last is not None:
            pl_module.log("rifle/steps_after_last_reinit", float(self.steps_after_last), on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": list(self.done), "schedule": list(self.schedule), "seed": self._seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = list(state_dict["done"])
        self._seed = state_dict["seed"]
        saved = list(state_dict["schedule"])
        if not self.schedule:
            self.schedule = saved
        elif saved != self.schedule:
            rank_zero_warn(f"RIFLE schedule changed on resume: checkpoint {saved}, now {self.schedule}.")
