"""MEI: maximum-entropy initialization of the new head."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset
from typing_extensions import override

from lightning_transfer.anatomy import final_linear, find_head
from lightning_transfer.batches import batch_labels, train_loader_of
from lightning_transfer.functional.head_init import zero_head_
from lightning_transfer.validation import (
    check_choice,
    check_int_list,
    check_optional_str,
    check_strategy,
)

__all__ = ["MaxEntropyHeadInit", "class_counts_of"]

_OWNER = "MaxEntropyHeadInit"


def class_counts_of(trainer: Trainer, num_classes: int) -> list[int]:
    """Count the labels of the training data that fit uses (loaders passed to ``fit``, DataModule, module hook).

    Reads ``loader.dataset.targets`` when the dataset has it (torchvision), else iterates the batches
    (``(x, y)`` tuples or dicts with ``labels``). Negative labels (``ignore_index``, e.g. -100) are skipped.
    """
    way_out = "pass class_counts=[...] or use bias='zero'"
    loader = train_loader_of(trainer)
    if loader is None:
        raise ValueError(f"MaxEntropyHeadInit(bias='log_prior') counts classes in the training data, and this fit has no "
                         f"training loader; {way_out}.")
    if isinstance(loader, (Mapping, list, tuple)):
        raise ValueError("MaxEntropyHeadInit(bias='log_prior') cannot tell which of several training loaders holds the "
                         f"labels; {way_out}.")
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler) \
            and not isinstance(loader.dataset, IterableDataset):
        # a loader built with its own DistributedSampler yields this rank's part only: count the whole data,
        # as every rank must draw the same head
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size or 1, collate_fn=loader.collate_fn)
    targets = getattr(getattr(loader, "dataset", None), "targets", None)
    if targets is None:
        targets = torch.cat([batch_labels(batch).flatten() for batch in loader])
    labels = torch.as_tensor(targets).flatten()
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"MaxEntropyHeadInit(bias='log_prior') needs integer class labels, got {labels.dtype} labels "
                         f"(one-hot or multi-label?); {way_out}.")
    labels = labels[labels >= 0].long()
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"The training labels go up to {int(labels.max())} but the head has {num_classes} outputs; "
                         f"check the head or {way_out}.")
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"Class(es) {torch.nonzero(counts == 0).flatten().tolist()} have no training example; "
                         f"{way_out}.")
    return counts.tolist()


class MaxEntropyHeadInit(Callback):
    """Zero the new head's final linear layer when fit starts (Varno et al., arXiv 1905.10698).

    With ``W = 0, b = 0`` the softmax is uniform (entropy ``log K``) and the backbone gets exactly zero
    task gradient on the first optimizer step (``∂L/∂h = Wᵀδ = 0``); after that step the head is a
    class-mean classifier. Applied once, after all weights are loaded (``on_fit_start``), and never
    again on a resume (also under FSDP2, which restores the checkpoint after ``on_fit_start``). Only the
    final layer of an MLP head is zeroed (zeroing hidden layers would keep their units symmetric forever). Weight decay and BatchNorm running statistics still move on step 1.

    Args:
        head: Dotted name of the head; auto-detected by default.
        bias: ``"zero"`` (maximum entropy) or ``"log_prior"`` (log class frequencies: keeps the step-1
            stall but not the maximum entropy).
        class_counts: Class counts for ``"log_prior"`` (positive integers, one per output); counted from
            the training loader that fit uses (loaders passed to ``fit``, DataModule or module hook) when
            omitted, from ``dataset.targets`` or else by iterating its batches (tuples or dicts).

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> model = TransferClassifier(net, num_classes=3, weight_decay=0.0)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 12), torch.randint(0, 3, (8,))), batch_size=4)
        >>> trainer = Trainer(max_steps=0, callbacks=[MaxEntropyHeadInit()],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(model, data)  # no step: the head is zeroed at fit start
        >>> float(model.backbone[2].weight.abs().sum()), float(model.backbone[2].bias.abs().sum())
        (0.0, 0.0)
    """

    def __init__(
        self,
        head: str | None = None,
        bias: Literal["zero", "log_prior"] = "zero",
        class_counts: list[int] | None = None,
    ) -> None:
        self.head = check_optional_str(_OWNER, "head", head)
        self.bias = check_choice(_OWNER, "bias", bias, ("zero", "log_prior"))
        if class_counts is not None:
            class_counts = check_int_list(_OWNER, "class_counts", class_counts, minimum=1,
                                          empty_hint="pass None to count the training labels")
        self.class_counts = class_counts
        self.applied = False
        self._entropy: float | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer, _OWNER, sharded=True)
            find_head(pl_module, self.head)  # unknown names fail here, before any step
            self.applied = False  # a new fit (a resume restores True after setup)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.applied:  # restored from a checkpoint: the head already trained
            return
        _, head = find_head(pl_module, self.head)
        layer = final_linear(head)
        log_prior = None
        if self.bias == "log_prior":
            counts = self.class_counts or class_counts_of(trainer, layer.weight.shape[0])
            if len(counts) != layer.weight.shape[0]:
                raise ValueError(f"class_counts has {len(counts)} entries but the head has {layer.weight.shape[0]} outputs.")
            counts_t = torch.tensor(counts, dtype=torch.float32)
            log_prior = torch.log(counts_t / counts_t.sum())
        self._entropy = zero_head_(layer, log_prior)
        self.applied = True
        rank_zero_info(f"MaxEntropyHeadInit: zeroed {type(layer).__name__} head; initial output entropy {self._entropy:.4f} (log K = {math.log(layer.weight.shape[0]):.4f}).")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._entropy is not None:
            pl_module.log("mei/initial_entropy", self._entropy, on_step=True, on_epoch=False)
            self._entropy = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict["applied"])
        if self.applied:  # a sharded strategy restores after on_fit_start: the head it zeroed is overwritten
            self._entropy = None
