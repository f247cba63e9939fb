"""Lightning's weight averaging (``WeightAveraging``, ``EMAWeightAveraging``) seen from a callback that
chooses the final weights.

A :class:`~lightning.pytorch.callbacks.WeightAveraging` callback keeps an averaged copy of the model
(EMA or SWA). It swaps the average into the model at ``on_validation_epoch_start`` and back at
``on_validation_epoch_end``, copies it into the model at ``on_train_end``, and writes it as the
checkpoint's ``state_dict``. A callback that evaluates or sets the model's weights in those hooks would
see the average or the raw weights depending on the order of ``Trainer(callbacks=[...])``. These
helpers let it act on the average whatever the order: :func:`average_in_model` puts the average into
the model for a block, :func:`adopt_average` does what the averaging's ``on_train_end`` does, and
:func:`set_average` writes the model's final weights into the average, so that an averaging listed
later leaves them in place (and a checkpoint saved after fit holds them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

try:  # Lightning >= 2.5
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover - older Lightning has no weight averaging
    WeightAveraging = None

__all__ = ["adopt_average", "average_in_model", "find_weight_averaging", "runs_before", "set_average"]


def find_weight_averaging(trainer: Trainer, owner: str) -> Callback | None:
    """The Trainer's ``WeightAveraging`` callback (EMA, SWA), or ``None``.

    Raises:
        ValueError: If the Trainer has more than one (which average would ``owner`` act on?).
    """
    if WeightAveraging is None:
        return None
    found = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, WeightAveraging)]
    if len(found) > 1:
        raise ValueError(f"{owner} acts on the averaged weights, and this Trainer has {len(found)} weight-averaging "
                         f"callbacks ({', '.join(type(cb).__name__ for cb in found)}): keep one.")
    return found[0] if found else None


def runs_before(trainer: Trainer, first: Callback, second: Callback) -> bool:
    """Whether Lightning calls ``first``'s hooks before ``second``'s (their order in ``trainer.callbacks``)."""
    order = [id(cb) for cb in trainer.callbacks]
    return order.index(id(first)) < order.index(id(second))


def _average_of(averaging: Callback) -> nn.Module | None:
    """The averaged model (``None`` outside fit, where ``WeightAveraging`` swaps nothing either)."""
    if not hasattr(averaging, "_average_model"):
        raise RuntimeError(f"{type(averaging).__name__} has no _average_model: this Lightning version keeps its "
                           "average elsewhere, and lightning_transfer.weight_averaging needs updating.")
    return averaging._average_model


def _pairs(pl_module: LightningModule, averaging: Callback) -> Iterator[tuple[Tensor, Tensor]]:
    """(model tensor, averaged tensor) for every parameter and buffer, as ``WeightAveraging`` pairs them."""
    average = _average_of(averaging)
    if average is None:
        raise RuntimeError(f"{type(averaging).__name__} holds no averaged model at the end of training.")
    pairs = [(dict(pl_module.named_parameters()), dict(average.module.named_parameters())),
             (dict(pl_module.named_buffers()), dict(average.module.named_buffers()))]
    for mine, theirs in pairs:
        if mine.keys() != theirs.keys():
            raise RuntimeError(f"The averaged model of {type(averaging).__name__} no longer matches the model "
                               f"(tensors {sorted(mine.keys() ^ theirs.keys())[:5]}).")
        for name, tensor in mine.items():
            yield tensor, theirs[name]


@torch.no_grad()
def _swap(pl_module: LightningModule, averaging: Callback) -> None:
    for mine, theirs in _pairs(pl_module, averaging):
        kept = mine.detach().clone()
        mine.copy_(theirs)
        theirs.copy_(kept)


@contextmanager
def average_in_model(trainer: Trainer, pl_module: LightningModule, averaging: Callback | None,
                     caller: Callback) -> Iterator[None]:
    """In ``on_validation_epoch_end``: the model holds the averaged weights inside the block, as during
    the validation loop, whether the averaging's own hook (which swaps them out) ran before ``caller``'s or not.

    Bit for bit: on exit the model and the average hold what they held on entry.
    """
    swap = averaging is not None and runs_before(trainer, averaging, caller) and _average_of(averaging) is not None
    if swap:
        _swap(pl_module, averaging)
    try:
        yield
    finally:
        if swap:
            _swap(pl_module, averaging)


@torch.no_grad()
def adopt_average(trainer: Trainer, pl_module: LightningModule, averaging: Callback | None, caller: Callback) -> None:
    """In ``on_train_end``: leave the model at the averaged weights, as the averaging's ``on_train_end`` does
    (done here when that hook runs after ``caller``'s; it copies the same values again)."""
    if averaging is not None and not runs_before(trainer, averaging, caller):
        for mine, theirs in _pairs(pl_module, averaging):
            mine.copy_(theirs)


@torch.no_grad()
def set_average(pl_module: LightningModule, averaging: Callback | None) -> None:
    """Make the model's weights the average: an averaging whose ``on_train_end`` runs later then copies them
    back unchanged, and a checkpoint saved after fit (whose ``state_dict`` is the average) holds them."""
    if averaging is not None:
        for mine, theirs in _pairs(pl_module, averaging):
            theirs.copy_(mine)
