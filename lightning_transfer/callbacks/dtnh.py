"""DTNH: project the regularizers' gradient where it conflicts with the task gradient."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_transfer.callbacks.base import (
    GradientRegularizer,
    carried_grad_scale,
    is_logging_step,
    local_grads,
)
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
    gradient ``g = .grad`` where they conflict, and writes ``g + r'`` into ``.grad`` (``S·(g + r')`` for
    a fused optimizer under a 16-bit GradScaler, whose step unscales by ``S``). With L2SP alone no
    extra backward pass runs (its ``r`` is analytic). With several optimizers (manual optimization) each
    optimizer's step projects the ``r`` of its own parameters only, so each ``r`` is applied once. Logs ``dtnh/projected`` (fraction of tensors
    projected), ``dtnh/cosine`` (mean cosine of r and g, on the steps the loggers record) and ``dtnh/removed_norm``. Under sharded training
    (FSDP2) it works on local shards; the per-tensor sums are all-reduced once per step.

    Args:
        granularity: ``"tensor"`` (one projection per parameter tensor) or ``"global"``.
        eps: No projection where ``‖g‖² <= eps``.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> model = TransferClassifier(net, num_classes=3, weight_decay=0.0)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 12), torch.randint(0, 3, (8,))), batch_size=4)
        >>> from lightning_transfer import L2SP
        >>> trainer = Trainer(max_epochs=1, callbacks=[L2SP(alpha=0.1), DTNH()],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(model, data)
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("dtnh/"))
        ['dtnh/cosine', 'dtnh/projected', 'dtnh/removed_norm']
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
        params, rs, eps = [p for p, _ in merged.values()], [r for _, r in merged.values()], self.eps
        # a fused optimizer under a 16-bit GradScaler unscales in its step, so g still carries S here: the
        # projection is invariant to scaling g and linear in r, so project S·r against S·g (and ‖S·g‖² > S²·eps)
        carried = carried_grad_scale(trainer, optimizer)
        if carried is not None:
            rs, eps = [r * carried for r in rs], carried.float().square() * eps
        # under FSDP2, g and r are local shards: the per-tensor sums are all-reduced once
        reduce = (lambda v: reduce_partial_sums(v, params)) if any(is_sharded(p) for p in params) else None
        # the cosine costs a pass over r: computed on the steps the loggers record
        stats = project_conflicting_(local_grads(params), rs, self.granularity, eps, reduce=reduce,
                                     cosine=is_logging_step(trainer))
        if carried is not None:  # report the norm removed from r, not from S·r
            stats["removed_norm"] = stats["removed_norm"] / carried.float()
        for key, value in stats.items():
            pl_module.log(f"dtnh/{key}", value, on_step=True, on_epoch=False)
