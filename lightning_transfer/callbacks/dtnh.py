"""DTNH: project the regularizers' gradient where it conflicts with the task gradient."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_transfer.callbacks.base import GradientRegularizer, local_grads
from lightning_transfer.functional.projection import project_conflicting_
from lightning_transfer.functional.sharding import is_sharded, reduce_partial_sums
from lightning_transfer.validation import check_choice, check_number, check_strategy

__all__ = ["DTNH"]


class DTNH(Callback):
    """Deep transfer learning never hurts (Wan et al., ICDM 2019).

    At setup, DTNH takes over the gradient of every regularizer callback of this library in the Trainer
    (:class:`L2SP`, :class:`FeatureMapRegularization`): they hand it their ``r`` instead of adding it,
    whatever the order of the callbacks. In ``on_before_optimizer_step`` (after accumulation, AMP
    unscaling and the DDP all-reduce; before clipping) it sums their ``r``, projects it against the task
    gradient ``g = .grad`` where they conflict, and writes ``g + r'`` into ``.grad``. With L2SP alone no
    extra backward pass runs (its ``r`` is analytic). With several optimizers (manual optimization) each
    optimizer's step projects the ``r`` of its own parameters only, so each ``r`` is applied once. Logs ``dtnh/projected`` (fraction of tensors
    projected), ``dtnh/cosine`` (mean cosine of r and g) and ``dtnh/removed_norm``. Under sharded training
    (FSDP2) it works on local shards; the per-tensor sums are all-reduced once per step.

    Args:
        granularity: ``"tensor"`` (one projection per parameter tensor) or ``"global"``.
        eps: No projection where ``‖g‖² <= eps``.

    Example::

        trainer = Trainer(callbacks=[L2SP(alpha=0.01), DTNH()])
    """

    def __init__(self, granularity: Literal["tensor", "global"] = "tensor", eps: float = 1e-20) -> None:
        self.granularity = check_choice("DTNH", "granularity", granularity, ("tensor", "global"))
        self.eps = check_number("DTNH", "eps", eps, minimum=0)
        self._regularizers: list[GradientRegularizer] = []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "DTNH", sharded=True)
        if sum(isinstance(cb, DTNH) for cb in trainer.callbacks) > 1:
            raise ValueError("Only one DTNH callback per Trainer: it already projects every regularizer's gradient.")
        found = [cb for cb in trainer.callbacks if isinstance(cb, GradientRegularizer)]
        if not found:
            raise ValueError(
                "DTNH needs a regularizer callback to project: add L2SP(...) or FeatureMapRegularization(...) "
                "to Trainer(callbacks=[...])."
            )
        decoupled = [type(cb).__name__ for cb in found if not cb.contributes_gradient]
        if decoupled:
            raise ValueError(f"DTNH projects gradients, but {decoupled} act outside the gradient (decoupled=True). Use decoupled=False.")
        for cb in found:
            cb.defer(trainer)
        self._regularizers = found

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        merged: dict[int, tuple[torch.nn.Parameter, Tensor]] = {}
        for cb in self._regularizers:
            params, contributions = cb.regularizer_gradients(trainer, pl_module, optimizer)
            for p, r in zip(params, contributions):
                if id(p) in merged:
                    merged[id(p)] = (p, merged[id(p)][1] + r)
                else:
                    merged[id(p)] = (p, r)
        if not merged:
            return
        params = [p for p, _ in merged.values()]
        # under FSDP2, g and r are local shards: the per-tensor sums are all-reduced once
        reduce = (lambda v: reduce_partial_sums(v, params)) if any(is_sharded(p) for p in params) else None
        stats = project_conflicting_(local_grads(params), [r for _, r in merged.values()], self.granularity, self.eps,
                                     reduce=reduce)
        for key, value in stats.items():
            pl_module.log(f"dtnh/{key}", value, on_step=True, on_epoch=False)
