"""Freezing the first blocks of a model, and depth schedules over epochs.

Parameters a user froze (``requires_grad=False`` before any schedule acted) are never thawed: every
function here takes their ids as ``user_frozen`` and leaves them, and BatchNorm layers all of whose
parameters are among them, untouched. Parameters frozen by :func:`freeze_blocks` are remembered (weakly,
by identity) so that a later schedule on the same model does not mistake them for the user's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence, Set
from numbers import Integral
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from lightning_transfer.batches import batch_inputs, batch_labels, call_model, logits_of
from lightning_transfer.batchnorm import batchnorm_state_kept
from lightning_transfer.compilation import eager
from lightning_transfer.validation import check_int

__all__ = ["accuracy_across_unfreeze", "check_depth", "check_milestones", "depth_at", "freeze_blocks",
           "gradual_milestones", "set_frozen_bn_eval", "trains_batchnorm", "user_frozen_ids"]

ALL = "all"

# parameters that freeze_blocks set to requires_grad=False (not the user): identity-keyed, weak
_FROZEN_BY_SCHEDULE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_depth(owner: str, name: str, value: Any) -> int | str:
    """A depth: an integer >= 0 (not a bool, not a float) or ``"all"``."""
    if value == ALL and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, Integral):
        error = ValueError if isinstance(value, str) else TypeError
        raise error(f"{owner}: {name} must be an integer >= 0 or 'all', got {value!r} ({type(value).__name__}).")
    return check_int(owner, name, value, minimum=0)


def check_milestones(owner: str, value: Any) -> dict[int, int | str]:
    """``{epoch: depth}`` with integer epochs >= 0 (decimal strings such as ``"5"`` are accepted as keys)."""
    if not isinstance(value, Mapping) or not value:
        raise ValueError(
            f"{owner}: milestones must be a non-empty dict {{epoch: depth}}, e.g. {{0: 'all', 5: 0}}; got {value!r}."
        )
    result: dict[int, int | str] = {}
    for epoch, depth in value.items():
        if isinstance(epoch, str) and re.fullmatch(r"\d+", epoch.strip()):
            epoch = int(epoch)
        result[check_int(owner, f"milestones epoch {epoch!r}", epoch, minimum=0)] = check_depth(
            owner, f"milestones[{epoch!r}] (a depth)", depth
        )
    return result


def user_frozen_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters frozen by the user: ``requires_grad=False`` and not frozen by a schedule."""
    return {id(p) for p in model.parameters() if not p.requires_grad and p not in _FROZEN_BY_SCHEDULE}


def _resolve(depth: int | str, num_blocks: int) -> int:
    if depth == ALL:
        return num_blocks
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise ValueError(f"A depth is an int or 'all', got {depth!r}.")
    if not 0 <= depth <= num_blocks:
        raise ValueError(
            f"depth {depth} is out of range: the model has {num_blocks} blocks before the head "
            f"(depth 0..{num_blocks}, or 'all'; the head is never frozen)."
        )
    return depth


def depth_at(epoch: int, milestones: Mapping[int, int | str], num_blocks: int) -> int:
    """The depth in force at ``epoch``: the value of the last milestone at or before it (0 before any)."""
    current = 0
    for start in sorted(milestones):
        if start <= epoch:
            current = _resolve(milestones[start], num_blocks)
    return current


def gradual_milestones(num_blocks: int, every: int, start: int | str = ALL) -> dict[int, int]:
    """Gradual unfreezing (ULMFiT): from ``start`` frozen blocks, one block fewer every ``every`` epochs."""
    if every < 1:
        raise ValueError(f"unfreeze_every must be at least 1, got {every}.")
    first = _resolve(start, num_blocks)
    return {i * every: first - i for i in range(first + 1)}


def _is_users(module: nn.Module, user_frozen: Set[int]) -> bool:
    """A module all of whose (one or more) parameters the user froze: its mode is the user's."""
    ids = [id(p) for p in module.parameters()]
    return bool(ids) and all(i in user_frozen for i in ids)


def freeze_blocks(
    blocks: Sequence[tuple[str, nn.Module]],
    depth: int,
    bn: str = "eval",
    training: bool = True,
    user_frozen: Set[int] = frozenset(),
) -> None:
    """Freeze the first ``depth`` blocks (``requires_grad=False``), unfreeze the rest; head = last block.

    Frozen BatchNorm layers go to eval mode when ``bn == "eval"`` (running statistics fixed); those of
    trainable blocks follow ``training`` (Lightning restores each module's own mode after validation
    instead of calling ``model.train()``, so an unfrozen block must be put back in train mode here).
    Parameters in ``user_frozen`` (ids) stay frozen, and BatchNorm layers all of whose parameters are
    in it keep whatever mode they have.
    """
    _resolve(depth, len(blocks) - 1)
    for i, (_, block) in enumerate(blocks):
        for p in block.parameters():
            if id(p) in user_frozen:
                continue
            p.requires_grad_(i >= depth)
            if i >= depth:
                _FROZEN_BY_SCHEDULE.pop(p, None)
            else:
                _FROZEN_BY_SCHEDULE[p] = True
        if i >= depth:
            for m in block.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _is_users(m, user_frozen):
                    m.train(training)
    set_frozen_bn_eval(blocks, depth, bn, user_frozen)


def set_frozen_bn_eval(
    blocks: Sequence[tuple[str, nn.Module]], depth: int, bn: str = "eval", user_frozen: Set[int] = frozenset()
) -> None:
    """Put BatchNorm layers of frozen blocks in eval mode (``model.train()`` undoes it; call again).

    BatchNorm layers all of whose parameters are in ``user_frozen`` (ids) are left in their mode.
    """
    if bn != "eval":
        return
    for _, block in blocks[:depth]:
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and not _is_users(m, user_frozen):
                m.eval()


def trains_batchnorm(blocks: Sequence[tuple[str, nn.Module]], user_frozen: Set[int] = frozenset()) -> bool:
    """Whether any block holds a BatchNorm layer with running statistics that is not the user's."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and not _is_users(m, user_frozen)
               for _, block in blocks for m in block.modules())


@torch.no_grad()
def accuracy_across_unfreeze(model: nn.Module, batch: Any, blocks: Sequence[tuple[str, nn.Module]], before: int,
                             bn: str, user_frozen: Set[int] = frozenset()) -> tuple[float, float] | None:
    """Accuracy on ``batch`` with the modes of the depth ``before`` an unfreeze, and with the current
    modes (after it): what the switch does to the trained head, e.g. BatchNorm moving from running to
    batch statistics. Same dropout masks for both; statistics, modes and RNG are left as they were.
    ``None`` for a batch without labels, or a module without a ``forward`` of its own (nothing to call)."""
    forward = type(model).forward
    if forward is nn.Module.forward or getattr(forward, "__qualname__", "") == "LightningModule.forward":
        return None
    try:
        labels = batch_labels(batch)
    except ValueError:
        return None
    inputs = batch_inputs(batch)
    accuracies = []
    with batchnorm_state_kept(model), eager():  # a one-off pass: not worth a compiled graph
        seed = int(torch.randint(0, 2**31 - 1, ()))
        for step in ("after", "before"):
            if step == "before":
                set_frozen_bn_eval(blocks, before, bn, user_frozen)
            torch.manual_seed(seed)
            logits = logits_of(call_model(model, inputs))
            accuracies.append(float((logits.argmax(-1) == labels.to(logits.device)).float().mean()))
    after_acc, before_acc = accuracies
    return before_acc, after_acc
