"""Freezing the first blocks of a model, and depth schedules over epochs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

__all__ = ["depth_at", "freeze_blocks", "gradual_milestones", "set_frozen_bn_eval"]

ALL = "all"


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


def freeze_blocks(blocks: Sequence[tuple[str, nn.Module]], depth: int, bn: str = "eval", training: bool = True) -> None:
    """Freeze the first ``depth`` blocks (``requires_grad=False``), unfreeze the rest; head = last block.

    Frozen BatchNorm layers go to eval mode when ``bn == "eval"`` (running statistics fixed); those of
    trainable blocks follow ``training`` (Lightning restores each module's own mode after validation
    instead of calling ``model.train()``, so an unfrozen block must be put back in train mode here).
    """
    _resolve(depth, len(blocks) - 1)
    for i, (_, block) in enumerate(blocks):
        block.requires_grad_(i >= depth)
        if i >= depth:
            for m in block.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(training)
    set_frozen_bn_eval(blocks, depth, bn)


def set_frozen_bn_eval(blocks: Sequence[tuple[str, nn.Module]], depth: int, bn: str = "eval") -> None:
    """Put BatchNorm layers of frozen blocks in eval mode (``model.train()`` undoes it; call again)."""
    if bn != "eval":
        return
    for _, block in blocks[:depth]:
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                m.eval()
