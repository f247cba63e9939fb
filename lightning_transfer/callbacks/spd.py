"""Selective Projection Decay: decay toward w0 after the optimizer step, only where the gradient pulls away."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_transfer.callbacks.base import check_still_frozen, is_logging_step, local_grads
from lightning_transfer.callbacks.l2sp import L2SP
from lightning_transfer.functional.sharding import local, reduce_partial_sums
from lightning_transfer.functional.spd import spd_after_norms, spd_before_step, spd_decay_, spd_factors
from lightning_transfer.validation import check_number

__all__ = ["SPD"]


class SPD(L2SP):
    """Selective Projection Decay (Tian et al., NeurIPS 2024, "Rethinking Weight Decay for Robust Fine-Tuning
    of Foundation Models").

    After each optimizer step, per tensor ``i``: where ``⟨g_i, w_i − w0_i⟩ > 0`` (the paper's condition
    ``c_i < 0``, with ``g`` and ``w`` of before the step),
    ``w'_i ← w'_i − λ·r_i·(w'_i − w0_i)`` with ``r_i = clamp((‖w'_i − w0_i‖ − ‖w_i − w0_i‖)/(‖w'_i − w0_i‖ + ε), 0, 1)``
    (the relative growth of the tensor's distance from ``w0`` in this step); other tensors are left as the
    optimizer made them. Works with any optimizer: ``g`` and ``w`` are read in ``on_before_optimizer_step``
    (after accumulation and unscaling) and the decay runs in the optimizer's step post-hook, so it follows
    real steps only (not accumulation micro-batches, nor steps a GradScaler skips).

    ``w0`` is kept exactly as :class:`~lightning_transfer.L2SP` keeps it (this class reuses its anchor
    storage: saved in checkpoints, restored on resume, 1/N per rank under FSDP2), not in the optimizer's
    state. ``peft=True`` decays toward ``0`` instead (the paper's PEFT mode: adapters start at, and are pulled
    toward, zero) and stores no anchors. Norms and dots are sums over shards under FSDP2 (one all-reduce
    before and one after each step); the rule costs about 32 bytes per fp32 parameter per step.

    Args:
        lam: The strength ``λ`` (the paper's ``weight_decay`` of AdamSPD; it tuned values about 0.1 to 1).
        head: Dotted name of the new head (left out: it has no ``w0``); auto-detected by default.
        exclude: Regexes of parameter names left out of the decay.
        include_norm_and_bias: Also decay norm-layer and bias tensors.
        peft: Decay toward zero (for adapters such as LoRA), without stored anchors.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> model = TransferClassifier(net, num_classes=3, weight_decay=0.0)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 12), torch.randint(0, 3, (8,))), batch_size=4)
        >>> trainer = Trainer(max_epochs=1, callbacks=[SPD(lam=0.5)], log_every_n_steps=1,
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(model, data)
        >>> 0.0 <= float(trainer.callback_metrics["spd/decayed_fraction"]) <= 1.0
        True
    """

    def __init__(
        self,
        lam: float = 1.0,
        head: str | None = None,
        exclude: list[str] | None = None,
        include_norm_and_bias: bool = True,
        peft: bool = False,
    ) -> None:
        lam = check_number("SPD", "lam", lam, minimum=0)
        if not isinstance(peft, bool):
            raise TypeError(f"SPD: peft must be True or False, got {peft!r} ({type(peft).__name__}).")
        super().__init__(alpha=0.0, beta=0.0, head=head, exclude=exclude,
                         include_norm_and_bias=include_norm_and_bias, decoupled=True)
        self.lam, self.peft = lam, peft
        self.prefix = "spd"
        self._handles: list[Any] = []
        self._pending: dict[int, tuple[list[int], Tensor]] = {}  # optimizer id -> (indices, dots, squares)
        self._trainer: Trainer | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(lam=self.lam, head=self.head, exclude=self.exclude, peft=self.peft)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.peft:
            self._anchors = []
        self._remove_hooks()
        self._trainer, self._pending = trainer, {}
        for opt in trainer.optimizers:
            self._handles.append(opt.register_step_post_hook(self._post_hook))

    def _apply_loaded(self) -> None:
        if self.peft:  # no anchors: w0 = 0
            self._loaded = None
            return
        super()._apply_loaded()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._remove_hooks()

    def _selection(self, optimizer: Optimizer) -> tuple[list[int], list[Tensor], list[Tensor] | None]:
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        idx = [i for i, p in enumerate(self._params) if p.requires_grad and p.grad is not None and id(p) in ids]
        params = [local(self._params[i]) for i in idx]
        return idx, params, None if self.peft else [self._anchors[i] for i in idx]

    def _before_step(self, optimizer: Optimizer) -> None:
        """The dots and norms of before the step, from the gradient of this step (Lightning runs the closure,
        hence backward, inside ``optimizer.step``: a step pre-hook would see the previous step's gradient)."""
        idx, params, anchors = self._selection(optimizer)
        dots, squares = spd_before_step(params, local_grads([self._params[i] for i in idx]), anchors)
        sums = reduce_partial_sums(torch.cat([dots, squares]).to(params[0].device if params else "cpu"),
                                   self._params) if idx else dots
        self._pending[id(optimizer)] = (idx, sums)

    def _post_hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        idx, sums = self._pending.pop(id(optimizer), ([], None))
        if not idx:
            return
        params = [local(self._params[i]) for i in idx]
        anchors = None if self.peft else [self._anchors[i] for i in idx]
        after = reduce_partial_sums(spd_after_norms(params, anchors).to(sums.device), self._params)
        n = len(idx)
        factors = spd_factors(sums[:n], sums[n:], after, self.lam)
        spd_decay_(params, anchors, factors)
        trainer = self._trainer
        if trainer is not None and trainer.lightning_module is not None and is_logging_step(trainer):
            module = trainer.lightning_module
            module.log("spd/decayed_fraction", (factors > 0).float().mean(), on_step=True, on_epoch=False)
            module.log("spd/mean_factor", factors.mean(), on_step=True, on_epoch=False)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        check_still_frozen(self._fixed, "SPD", "the pre-trained anchor w0",
                           "or pass exclude=[...] to leave them out of SPD knowingly")
        self._before_step(optimizer)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.peft:
            return {"anchors": {}}
        return super().state_dict()
