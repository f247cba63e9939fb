"""Co-Tuning: the pre-trained source head, fed the new head's features, is trained toward p(y_s | y_t)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_transfer.anatomy import find_head
from lightning_transfer.batches import batch_inputs, batch_labels, call_model, logits_of, train_loader_of
from lightning_transfer.batchnorm import batchnorm_state_kept
from lightning_transfer.callbacks.base import loss_factor
from lightning_transfer.compilation import eager, recompile
from lightning_transfer.functional.co_tuning import (
    co_tuning_loss_and_feature_grad,
    relationship,
    relationship_sums,
)
from lightning_transfer.functional.feature_maps import add_gradient_hooks
from lightning_transfer.validation import check_int, check_number, check_optional_str, check_strategy

__all__ = ["CoTuning", "PretrainedHead"]


class PretrainedHead(nn.Module):
    """The source classifier of a pre-trained model of :func:`~lightning_transfer.build_backbone`
    (``num_classes=None`` keeps it), e.g. EfficientNet-Lite0's ImageNet head: Co-Tuning's ``source_head`` in a
    config (``class_path: lightning_transfer.callbacks.co_tuning.PretrainedHead``). The weights come from the
    library's asset cache, as the backbone's do.

    Args:
        name: A :func:`~lightning_transfer.build_backbone` name, e.g. ``"efficientnet_lite0"``.
    """

    def __init__(self, name: str = "efficientnet_lite0") -> None:
        super().__init__()
        from lightning_transfer.model import build_backbone

        self.head = find_head(build_backbone(name, num_classes=None)[0])[1]

    def forward(self, features: Tensor) -> Tensor:
        return self.head(features)


class CoTuning(Callback):
    """Co-Tuning (You et al., "Co-Tuning for Transfer Learning", NeurIPS 2020).

    The pre-trained model's source classifier (``source_head``, e.g. the ImageNet head the new head replaced)
    is applied to the features the new head sees (the head's input), and its output is trained toward the
    source-label distribution of the example's target label: ``α·CE(p(y_s | y_t), source_head(features))`` is
    added to the loss. ``p(y_s | y_t)`` is learned when training starts, from the model as it is then: the
    average of ``softmax(source_head(features))`` over the training examples of each target class (the paper's
    direct approach; tllib's calibrated variant is not implemented), with per-class sums all-reduced across DDP
    ranks (a class without examples gets the uniform distribution). It is saved in the checkpoint, so a resumed
    run uses the same one.

    The source head stays fixed (no gradient reaches its parameters; the loss shapes the features). Its gradient
    with respect to the features is computed on a small graph of the source head alone and added to the
    gradient flowing into the features by a gradient hook (the shared helper of
    :class:`~lightning_transfer.FeatureMapRegularization`), so it enters the main backward, scaled as Lightning
    scales the loss (GradScaler, gradient accumulation). Logged: ``cotuning/loss``.

    Args:
        source_head: The pre-trained classifier over the source classes, taking the new head's input (``(B, D)``).
        alpha: Weight ``λ`` of the Co-Tuning loss (tllib's default trade-off is 2.3).
        head: Dotted name of the new head; auto-detected by default.
        relationship_batches: At most this many training batches to learn ``p(y_s | y_t)`` (``None``: all).

    Example::

        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> source = torch.nn.Linear(8, 5)  # e.g. the pre-trained head over 5 source classes
        >>> cb = CoTuning(source, alpha=1.0)
        >>> trainer = Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
        >>> trainer.fit(TransferClassifier(net, num_classes=3), torch.utils.data.DataLoader(data, batch_size=8))
        >>> tuple(cb.relationship.shape), bool(torch.allclose(cb.relationship.sum(1), torch.ones(3)))
        ((3, 5), True)
    """

    def __init__(self, source_head: nn.Module, alpha: float = 2.3, head: str | None = None,
                 relationship_batches: int | None = None) -> None:
        super().__init__()
        if not isinstance(source_head, nn.Module):
            raise TypeError(f"CoTuning: source_head must be a torch.nn.Module (the pre-trained source classifier), "
                            f"got {source_head!r} ({type(source_head).__name__}).")
        self.source_head = source_head
        self.alpha = check_number("CoTuning", "alpha", alpha, minimum=0.0)
        self.head = check_optional_str("CoTuning", "head", head)
        self.relationship_batches = None if relationship_batches is None else check_int(
            "CoTuning", "relationship_batches", relationship_batches, minimum=1)
        self.relationship: Tensor | None = None
        self._handles: list = []
        self._labels: Tensor | None = None
        self._unfired = 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "CoTuning", sharded=True)
        find_head(pl_module, self.head)  # an unknown or wrong-kind head fails here
        self.relationship = None  # a new fit (a resume restores it after setup)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove()
        self.source_head.requires_grad_(False).eval()
        device = next(pl_module.parameters()).device
        self.source_head.to(device)
        _, head = find_head(pl_module, self.head)
        if self.relationship is None:
            self.relationship = self._learn_relationship(trainer, pl_module, head)
        self.relationship = self.relationship.to(device)
        self._handles = [head.register_forward_pre_hook(self._on_head_input)]
        recompile(pl_module)  # a compiled model's cached graphs run without hooks added after them
        self._unfired = 0

    @torch.no_grad()
    def _learn_relationship(self, trainer: Trainer, pl_module: LightningModule, head: nn.Module) -> Tensor:
        loader = train_loader_of(trainer)
        if loader is None:
            raise RuntimeError("CoTuning found no training loader to learn p(y_s | y_t) from.")
        seen: list[Tensor] = []
        probe = head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        sums = counts = None
        device = next(pl_module.parameters()).device
        try:
            with batchnorm_state_kept(pl_module), eager():
                pl_module.eval()
                for i, batch in enumerate(loader):
                    if self.relationship_batches is not None and i >= self.relationship_batches:
                        break
                    batch = trainer.strategy.batch_to_device(batch)
                    seen.clear()
                    logits = logits_of(call_model(pl_module, batch_inputs(batch)))
                    features = self._features(seen[-1] if seen else None)
                    s, c = relationship_sums(self._source_logits(features), batch_labels(batch).to(device),
                                             logits.shape[-1])
                    sums, counts = (s, c) if sums is None else (sums + s, counts + c)
        finally:
            probe.remove()
        if sums is None:
            raise RuntimeError("CoTuning: the training loader gave no batch to learn p(y_s | y_t) from.")
        if trainer.world_size > 1:  # every rank's examples count: per-class sums, then the average
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        if bool((counts == 0).any()):
            rank_zero_warn(f"CoTuning: {int((counts == 0).sum())} target class(es) have no training example; their "
                           "p(y_s | y_t) is uniform.")
        return relationship(sums, counts).to(device)

    def _features(self, features: Tensor | None) -> Tensor:
        if features is None:
            raise RuntimeError(f"CoTuning: the head {self.head or '(auto-detected)'} was not called in the model's "
                               "forward; pass head='<the module that produces the logits>'.")
        if features.dim() != 2:
            raise ValueError(f"CoTuning needs (batch, features) head inputs for the source head, but the head gets "
                             f"shape {tuple(features.shape)} (a per-token head?). Pass head= a head on pooled features.")
        return features

    def _source_logits(self, features: Tensor) -> Tensor:
        try:
            return self.source_head(features.float())
        except RuntimeError as err:
            raise ValueError(f"CoTuning: source_head cannot take the head's input of shape {tuple(features.shape)}: "
                             f"{err}. Pass the pre-trained classifier over those features.") from None

    def _on_head_input(self, module: nn.Module, args: tuple) -> None:
        if not (module.training and torch.is_grad_enabled() and self.alpha > 0 and self._labels is not None):
            return
        features = self._features(args[0] if args else None)
        if not features.requires_grad:  # nothing trainable upstream of the head (linear probing)
            return
        assert self.relationship is not None
        value, grad = co_tuning_loss_and_feature_grad(features, self._labels, self.relationship, self.alpha,
                                                      self.source_head)
        self._trainer.lightning_module.log("cotuning/loss", value, on_step=True, on_epoch=False)
        self._unfired += 1
        add_gradient_hooks([features], [grad], lambda: loss_factor(self._trainer), self._on_fire)

    def _on_fire(self) -> None:
        self._unfired -= 1

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._trainer = trainer
        self._labels = batch_labels(batch)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._unfired and outputs is not None and pl_module.automatic_optimization:
            raise RuntimeError("CoTuning: no gradient reached the head's input in the backward, so the Co-Tuning "
                               "loss could not enter it. Does the loss use the head's output? Under torch.compile, "
                               "compile the backbone and the head separately.")
        self._labels, self._unfired = None, 0

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove()
        self._labels = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"relationship": None if self.relationship is None else self.relationship.cpu()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rel = state_dict["relationship"]
        self.relationship = None if rel is None else rel.clone()
