"""MEI: maximum-entropy initialization of the new head."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_transfer.anatomy import final_linear, find_head
from lightning_transfer.functional.head_init import zero_head_

__all__ = ["MaxEntropyHeadInit"]


def class_counts_of(trainer: Trainer, num_classes: int) -> list[int]:
    """Count labels of the training data: a ``targets`` attribute when the dataset has one, else batches."""
    source = trainer.datamodule if trainer.datamodule is not None else trainer.lightning_module
    loader = source.train_dataloader()
    dataset = getattr(loader, "dataset", None)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = torch.cat([torch.as_tensor(batch[1]).flatten() for batch in loader])
    counts = torch.bincount(torch.as_tensor(targets).long().flatten(), minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"Class(es) {torch.nonzero(counts == 0).flatten().tolist()} have no training example; "
                         "pass class_counts or use bias='zero'.")
    return counts.tolist()


class MaxEntropyHeadInit(Callback):
    """Zero the new head's final linear layer when fit starts (Varno et al., arXiv 1905.10698).

    With ``W = 0, b = 0`` the softmax is uniform (entropy ``log K``) and the backbone gets exactly zero
    task gradient on the first optimizer step (``∂L/∂h = Wᵀδ = 0``); after that step the head is a
    class-mean classifier. Applied once, after all weights are loaded (``on_fit_start``), and never
    again on a resume. Only the final layer of an MLP head is zeroed (zeroing hidden layers would keep
    their units symmetric forever). Weight decay and BatchNorm running statistics still move on step 1.

    Args:
        head: Dotted name of the head; auto-detected by default.
        bias: ``"zero"`` (maximum entropy) or ``"log_prior"`` (log class frequencies: keeps the step-1
            stall but not the maximum entropy).
        class_counts: Class counts for ``"log_prior"``; counted from the training data when omitted.

    Example::

        trainer = Trainer(callbacks=[MaxEntropyHeadInit()])
    """

    def __init__(
        self,
        head: str | None = None,
        bias: Literal["zero", "log_prior"] = "zero",
        class_counts: list[int] | None = None,
    ) -> None:
        if bias not in ("zero", "log_prior"):
            raise ValueError(f"bias must be 'zero' or 'log_prior', got {bias!r}.")
        if class_counts is not None and (len(class_counts) < 1 or min(class_counts) <= 0):
            raise ValueError(f"class_counts must be positive counts, got {class_counts}.")
        self.head, self.bias, self.class_counts = head, bias, class_counts
        self.applied = False
        self._entropy: float | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
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
