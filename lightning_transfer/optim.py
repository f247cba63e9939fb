"""Optimizer parameter groups built from the model's anatomy (layer-wise learning-rate decay)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_transfer.anatomy import list_blocks

__all__ = ["build_param_groups", "norm_and_bias_ids"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def norm_and_bias_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters that are biases, 1-d gains, or belong to a normalization layer."""
    ids = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    ids |= {id(p) for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")}
    return ids


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    decay_norm_and_bias: bool = False,
    blocks: Sequence[str] | None = None,
    head: str | None = None,
) -> list[dict[str, Any]]:
    """Named optimizer parameter groups.

    Without ``layer_decay``: one group ``"decay"`` and one ``"no_decay"`` (norm and bias tensors, unless
    ``decay_norm_and_bias``). With ``layer_decay = ξ``: one pair per block of :func:`list_blocks`, the
    block at distance ``d`` from the head getting ``lr·ξ^d`` (the head ``lr``). Frozen parameters are kept
    (they get no gradient, hence no update, and train at their group's rate once unfrozen). Each group carries ``name`` (``LearningRateMonitor`` shows it) and ``initial_lr_scale``.

    Example::

        >>> import torchvision
        >>> groups = build_param_groups(torchvision.models.resnet18(weights=None), 0.1, 1e-4, layer_decay=0.5)
        >>> [(g["name"], g["lr"]) for g in groups][:2]
        [('conv1|bn1', 0.003125), ('conv1|bn1.no_decay', 0.003125)]
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}. Use None to turn it off.")
    no_decay = set() if decay_norm_and_bias else norm_and_bias_ids(model)
    if layer_decay is None:
        sections = [("", 1.0, [p for p in model.parameters()])]
    else:
        found = list_blocks(model, blocks=blocks, head=head)
        depth = len(found) - 1
        sections = [(name, layer_decay ** (depth - i), list(block.parameters())) for i, (name, block) in enumerate(found)]

    groups: list[dict[str, Any]] = []
    for name, scale, params in sections:
        decay = [p for p in params if id(p) not in no_decay]
        plain = [p for p in params if id(p) in no_decay]
        for suffix, members, wd in (("", decay, weight_decay), ("no_decay", plain, 0.0)):
            if members:
                label = ".".join(x for x in (name, suffix) if x) or "decay"
                groups.append({"name": label, "params": members, "lr": lr * scale, "weight_decay": wd,
                               "initial_lr_scale": scale})
    return groups
